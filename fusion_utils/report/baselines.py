"""The baseline table's verdict ("ours beats the baselines"), its share of the oracle gain, and its latency table.

Where a run has the bounds (`experiments.bounds`: the oracle crop of the ground-truth relevant cells, a random crop
of its size), each method is also read as its share of the oracle's gain over plain (`oracle_shares`), with a paired
bootstrap CI over questions; the bounds are never "the best baseline".

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

from ..experiments.bounds import BOUNDS
from ..paper import LATENCY_S, MAIN_TABLE, main_gains
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
    base = [m for m in records["method"].unique() if m not in (ours, "plain", *BOUNDS)]
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


NAMES = {"plain": "plain", "random_crop": "random crop (lower bound)", "cd": "CD", "dola": "DoLa", "opera": "OPERA",
         "vcd": "VCD", "vicrop": "ViCrop", "ours": "ours", "oracle_crop": "oracle crop (upper bound)"}
PAPER_BACKBONES = {"LLaVA-1.5": "LLaVA-1.5", "LLaVA-NeXT": "LLaVA-NeXT", "Qwen2.5-VL": "Qwen2.5-VL"}


SHARE_NA = "n/a (oracle gain not above zero: the CI holds 0)"
SHARE_NA_BELOW = "n/a (oracle gain not above zero: the CI lies below 0)"


def oracle_shares(records: pd.DataFrame, *, seed: int = 0, n_boot: int = stats.N_BOOT, level: float = 0.95,
                  plain: str = "plain", oracle: str = "oracle_crop") -> pd.DataFrame:
    """Each method's share of the oracle crop's gain, ``(method − plain) / (oracle − plain)``, with a paired
    bootstrap CI.

    ``records``: per-sample ``id, method, score`` of one baselines run that holds ``plain`` and ``oracle`` (the
    questions every method answered are kept, so every share is on the same questions). The bootstrap resamples
    questions, and one resample of question indices serves every method: the numerator and denominator of a share
    move together, as do two methods' shares. Percentile CI of the ratio over the resamples.

    The share is only defined when the oracle gains: when the oracle gain's CI reaches 0 or below, every share reads
    `SHARE_NA` rather than a ratio over noise (its denominator could be zero or negative). The rare resamples whose
    oracle gain is not positive even so give the share its limit from above, ±inf, which widens the CI rather than
    flipping its sign.

    Columns: method, n, accuracy, gain (method − plain), share, share_lo, share_hi, oracle_gain_lo, oracle_gain_hi,
    defined (bool). Empty without ``plain`` or ``oracle``.

    >>> r = pd.DataFrame({"id": list(range(8)) * 3, "method": ["plain"] * 8 + ["oracle_crop"] * 8 + ["m"] * 8,
    ...                   "score": [0] * 8 + [1] * 8 + [1, 0] * 4})
    >>> t = oracle_shares(r).set_index("method")
    >>> [float(t.loc[m, "share"]) for m in ("plain", "oracle_crop", "m")]
    [0.0, 1.0, 0.5]
    """
    cols = ["method", "n", "accuracy", "gain", "share", "share_lo", "share_hi", "oracle_gain_lo", "oracle_gain_hi",
            "defined"]
    if records is None or len(records) == 0 or not {plain, oracle} <= set(records["method"]):
        return pd.DataFrame(columns=cols)
    order = list(dict.fromkeys(records["method"]))
    wide = records.pivot_table(index="id", columns="method", values="score", aggfunc="mean")[order].dropna()
    x = wide.to_numpy(float)
    n = len(x)
    if n == 0:
        return pd.DataFrame(columns=cols)
    ip, io = order.index(plain), order.index(oracle)
    idx = np.random.default_rng(np.random.SeedSequence(int(seed))).integers(0, n, size=(n_boot, n))
    means = x[idx].mean(axis=1)  # [resample, method]: every method on the same resampled questions
    num = means - means[:, [ip]]
    den = num[:, io]
    a = (1 - level) / 2
    den_lo, den_hi = (float(v) for v in np.quantile(den, [a, 1 - a]))
    acc = x.mean(axis=0)
    gain = acc - acc[ip]
    defined = den_lo > 0 and gain[io] > 0
    rows = []
    for j, m in enumerate(order):
        share = lo = hi = float("nan")
        if defined:
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(den > 0, num[:, j] / den, np.sign(num[:, j]) * np.inf)
            share = float(gain[j] / gain[io])
            lo, hi = (float(v) for v in np.quantile(ratio, [a, 1 - a], method="inverted_cdf"))
        rows.append({"method": m, "n": n, "accuracy": float(acc[j]), "gain": float(gain[j]), "share": share,
                     "share_lo": lo, "share_hi": hi, "oracle_gain_lo": den_lo, "oracle_gain_hi": den_hi,
                     "defined": defined})
    return pd.DataFrame(rows, columns=cols)


def share_text(row) -> str:
    """One cell of the method table's share column (``row``: a row of `oracle_shares`)."""
    na = SHARE_NA_BELOW if row["oracle_gain_hi"] < 0 else SHARE_NA
    if row["method"] == "plain":
        return "0 (the reference)"
    if row["method"] == "oracle_crop":
        ci = f"oracle gain {100 * row['gain']:+.1f} pts, 95% CI [{100 * row['oracle_gain_lo']:+.1f}, " \
             f"{100 * row['oracle_gain_hi']:+.1f}]"
        return f"1 (the bound; {ci})" if row["defined"] else f"{na}; {ci}"
    if not row["defined"]:
        return na
    return f"{row['share']:.2f} [{row['share_lo']:.2f}, {row['share_hi']:.2f}] ({100 * row['gain']:+.1f} pts)"


def paper_gain_text(key: str) -> str:
    """The paper's gain over the base model for a method, in points, as the range over its backbones."""
    if key == "plain":
        return "0 (the base)"
    if key in BOUNDS:
        return "none: needs ground-truth relevance"
    g = main_gains().set_index("backbone")
    col = NAMES.get(key, key)
    if col not in g.columns:
        return ""
    lo, hi = float(g[col].min()), float(g[col].max())
    return f"{lo:+.2f} to {hi:+.2f}"


def method_table(summaries: dict, verdicts: dict, shares: dict | None = None) -> pd.DataFrame:
    """The chapter's baseline table: one row per method (accuracy in %, per model, from each model's baselines run
    ``summaries[model]``), the paper's reported averages beside them, and a last row with each model's verdict on
    "ours beats the baselines" (``verdicts[model]``: `beats_baselines`) and the paper's margin. Strings throughout,
    so the table shows no NaN: a method a model did not run reads "not run".

    ``shares[model]``: `oracle_shares` of that model's run; where given, a column "<model>: share of the oracle gain"
    per model (`share_text`) and the paper's gain over its base model (points, range over backbones) beside them.
    The bound rows (oracle and random crop) appear only when some model ran them."""
    paper = MAIN_TABLE.set_index("backbone")
    shares = {m: t for m, t in (shares or {}).items() if len(t)}
    ran = {str(k) for s in summaries.values() for k in s["method"]}
    rows = []
    for key, name in NAMES.items():
        if key in BOUNDS and key not in ran:
            continue
        row = {"method": name}
        for model, summary in summaries.items():
            hit = summary[summary["method"] == key]
            row[model] = f"{100 * float(hit['accuracy'].iloc[0]):.1f}" if len(hit) else "not run"
            if model in shares:
                sh = shares[model].set_index("method")
                row[f"{model}: share of the oracle gain"] = (share_text(sh.loc[key].to_dict() | {"method": key})
                                                             if key in sh.index else "not run")
        if shares:
            row["paper: gain over base (points)"] = paper_gain_text(key)
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
    return pd.DataFrame(rows).fillna("").reset_index(drop=True)


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


__all__ = ["BASELINE_COLUMNS", "NAMES", "SHARE_NA", "SHARE_NA_BELOW", "paper_margins", "beats_baselines", "oracle_shares", "share_text",
           "paper_gain_text", "method_table", "latency_table"]
