"""The baseline table's verdict ("ours beats the baselines") and its latency table.

Verdict rule: the best baseline is chosen on the dev split (highest accuracy), and ours is compared with it on the
test split, paired by question (bootstrap 95% CI of the mean difference, `stats.paired_test`). The effect it is
judged against is the paper's margin over its best baseline, per backbone (`paper_margins`: 0.37 to 1.05 points).

- "reproduces": the CI lies above zero (ours ahead, the paper's direction);
- "does not reproduce": the CI lies below the paper's smallest margin (the effect is smaller, or opposite);
- "inconclusive": the CI holds both zero and the paper's margin; the row names the n that would decide.

A percentile bootstrap of a handful of 0/±1 differences is degenerate (one loss among ties gives the CI [−x, 0]), so
a CI is only read once the test split has at least `stats.min_n_sign_test` questions and, when ours and the baseline
disagree anywhere, at least that many disagreements; below that the verdict is "inconclusive" with the n that would
give them.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..paper import LATENCY_S, MAIN_TABLE
from . import stats

BASELINE_COLUMNS = ("CD", "DoLa", "OPERA", "ViCrop")
# our method names for the paper's latency rows
LATENCY_NAMES = {"cd": "CD", "opera": "OPERA", "vicrop": "ViCrop", "ours": "ours", "sam": "SAM", "clip": "CLIP"}


def paper_margins() -> dict:
    """Per backbone, the paper's accuracy margin of ours over its best baseline, in points.

    >>> {k: round(v, 2) for k, v in paper_margins().items()}
    {'LLaVA-1.5': 1.05, 'LLaVA-NeXT': 0.92, 'Qwen2.5-VL': 0.37}
    """
    t = MAIN_TABLE.set_index("backbone")
    return {b: float(t.loc[b, "ours"] - t.loc[b, list(BASELINE_COLUMNS)].max()) for b in t.index}


def beats_baselines(records: pd.DataFrame, ours: str = "ours", *, margin: float | None = None,
                    seed: int = 0) -> dict:
    """The verdict row. ``records``: per-sample ``id, method, score`` for ours (``method == ours``) and the
    baselines (``plain`` is not a baseline). ``margin``: the paper's effect as a fraction (default: the smallest of
    `paper_margins`, /100)."""
    margin = min(paper_margins().values()) / 100 if margin is None else float(margin)
    base = [m for m in records["method"].unique() if m not in (ours, "plain")]
    if ours not in set(records["method"]) or not base:
        return {"verdict": "n/a: needs records of ours and of at least one baseline"}
    wide = records.pivot_table(index="id", columns="method", values="score", aggfunc="mean")
    dev, test = stats.split_ids(wide.index.tolist())
    if len(dev) < 1 or len(test) < 2:
        return {"verdict": f"n/a: {len(wide)} questions are too few for a dev/test split"}
    best = max(base, key=lambda m: (wide.loc[dev, m].mean(), -base.index(m)))
    d = (wide.loc[test, ours] - wide.loc[test, best]).dropna().to_numpy(float)
    t = stats.paired_test(d, seed)
    lo, hi = t["lo"], t["hi"]
    floor, differ = stats.min_n_sign_test(), int(np.count_nonzero(d))
    if len(d) < floor or 0 < differ < floor:
        rate = differ / max(1, len(d)) if differ else 1.0
        need = math.ceil(floor / rate * len(wide) / max(1, len(d)))
        verdict = f"inconclusive (n too small: needs ≈ {need})"
    elif lo > 0:
        verdict = "reproduces"
    elif hi < margin:
        verdict = "does not reproduce"
    else:
        sd = t["sd"] if np.isfinite(t["sd"]) and t["sd"] > 0 else 2 * margin
        # a CI half-width below margin/2 cannot hold both 0 and the margin
        need = math.ceil((2 * 1.96 * sd / margin) ** 2) * len(wide) / max(1, len(d))
        verdict = f"inconclusive (n too small: needs ≈ {int(math.ceil(need))})"
    return {"claim": "ours beats the best baseline", "best_baseline": best, "n_test": len(d), "mean": t["mean"],
            "ci": (lo, hi), "paper_margin": margin, "verdict": verdict,
            "split": stats.describe_split(len(dev), len(test))}


NAMES = {"plain": "plain", "cd": "CD", "dola": "DoLa", "opera": "OPERA", "vcd": "VCD", "vicrop": "ViCrop",
         "ours": "ours"}
PAPER_BACKBONES = {"LLaVA-1.5": "LLaVA-1.5", "LLaVA-NeXT": "LLaVA-NeXT", "Qwen2.5-VL": "Qwen2.5-VL"}


def method_table(summaries: dict, verdicts: dict) -> pd.DataFrame:
    """The chapter's baseline table: one row per method (accuracy in %, per model, from each model's baselines run
    ``summaries[model]``), the paper's reported averages beside them, and a last row with each model's verdict on
    "ours beats the baselines" (``verdicts[model]``: `beats_baselines`) and the paper's margin. Strings throughout,
    so the table shows no NaN: a method a model did not run reads "not run"."""
    paper = MAIN_TABLE.set_index("backbone")
    rows = []
    for key, name in NAMES.items():
        row = {"method": name}
        for model, summary in summaries.items():
            hit = summary[summary["method"] == key]
            row[model] = f"{100 * float(hit['accuracy'].iloc[0]):.1f}" if len(hit) else "not run"
        for b in PAPER_BACKBONES:
            col = "base" if key == "plain" else name
            row[f"paper: {b}"] = f"{paper.loc[b, col]:.2f}" if col in paper.columns else ""
        rows.append(row)
    last = {"method": "verdict: ours beats the best baseline"}
    for model in summaries:
        v = verdicts.get(model, {})
        ci = v.get("ci")
        detail = (f" ({100 * v['mean']:+.1f} pts vs {NAMES.get(v['best_baseline'], v['best_baseline'])}, 95% CI "
                  f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}], n = {v['n_test']})") if ci else ""
        last[model] = v.get("verdict", "n/a") + detail
    for b, m in paper_margins().items():
        last[f"paper: {b}"] = f"+{m:.2f} over the best baseline"
    rows.append(last)
    return pd.DataFrame(rows).reset_index(drop=True)


def latency_table(seconds: dict, *, reference: str = "plain") -> pd.DataFrame:
    """method, seconds, ratio to plain, ratio to ours, the paper's ratio to its own method: one row per method
    measured (``seconds``: per sample, from one run), in the baseline table's order. The paper times no plain
    decoding, so its ratios are to "ours"; compare them with the "ratio to ours" column. Blank where a ratio has no
    reference.

    >>> latency_table({"plain": 1.0, "cd": 2.0, "opera": 4.0, "ours": 2.0}).columns.tolist()
    ['method', 'seconds', 'ratio to plain', 'ratio to ours', 'paper: ratio to ours']
    """
    if reference not in seconds:
        raise ValueError(f"latency_table needs the {reference!r} method's seconds to form ratios.")
    order = {k: i for i, k in enumerate(NAMES)}
    rows = []
    for m, s in sorted(seconds.items(), key=lambda kv: (order.get(str(kv[0]).lower(), len(order)), str(kv[0]))):
        paper = LATENCY_NAMES.get(str(m).lower())
        rows.append({"method": NAMES.get(str(m).lower(), str(m)), "seconds": f"{s:.3f}",
                     "ratio to plain": f"{s / seconds[reference]:.2f}",
                     "ratio to ours": f"{s / seconds['ours']:.2f}" if "ours" in seconds else "",
                     "paper: ratio to ours": f"{LATENCY_S[paper] / LATENCY_S['ours']:.2f}" if paper in LATENCY_S
                     else ""})
    return pd.DataFrame(rows).reset_index(drop=True)


__all__ = ["BASELINE_COLUMNS", "NAMES", "paper_margins", "beats_baselines", "method_table", "latency_table"]
