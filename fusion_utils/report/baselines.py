"""The baseline table's verdict ("ours beats the baselines"), its share of the oracle gain, and its latency table.

Where a run has the bounds (`experiments.bounds`: the oracle crop of the ground-truth relevant cells, a random crop
of its size), each method is also read as its share of the oracle's gain over plain (`oracle_shares`), with a paired
bootstrap CI over questions; the bounds are never "the best baseline".

Verdict rule (`beats_baselines`): the best baseline is chosen on the dev split (highest accuracy), and ours is
compared with it on the test split, paired by question (`stats.compare_paired`: McNemar for 0/1 scores). The effect
it is judged against is the paper's margin over its best baseline (`paper_margins`: 0.37 to 1.05 points; the
smallest is the rule's), and `verdicts.decide` reads the CI three ways, as every chapter's rules do.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..experiments.bounds import BOUNDS
from ..paper import LATENCY_S, MAIN_TABLE, main_gains
from . import stats
from .verdicts import decide, fmt_ci, fmt_p, groups_of, na_row, split_rows, verdict_row

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
                    seed: int = 0, model: str = "") -> dict:
    """The verdict row on "ours beats the best baseline" (`verdicts.decide`, the rule of every chapter), with
    ``best_baseline``, ``n_test``, ``mean`` and ``paper_margin`` beside the row's columns. ``records``: per-sample
    ``id, method, score`` for ours (``method == ours``) and the baselines (``plain`` and the bounds are not
    baselines), split by their ``split_group`` column where they have one. ``margin``: the paper's effect as a
    fraction (default: the smallest of `paper_margins`, /100).

    >>> r = pd.DataFrame({"id": [f"q{i}" for i in range(40) for _ in range(2)], "method": ["ours", "cd"] * 40,
    ...                   "score": [1.0, 0.0] * 40})
    >>> v = beats_baselines(r)
    >>> v["verdict"], v["best_baseline"]
    ('reproduces', 'cd')
    """
    margins = sorted(paper_margins().values())
    margin = margins[0] / 100 if margin is None else float(margin)
    reported = f"+{margins[0]:.2f} to +{margins[-1]:.2f} points over the best baseline"
    rule = ("the baseline with the best accuracy on the dev split, against ours on the test split, paired by "
            "question: the difference has a 95% CI above 0 (McNemar for 0/1 scores, else sign-flip, p < 0.05) and not "
            f"wholly below the paper's smallest margin, {100 * margin:+.2f} points")
    base = [m for m in records["method"].unique() if m not in (ours, "plain", *BOUNDS)]
    if ours not in set(records["method"]) or not base:
        return na_row("beats_baselines", model, "needs records of ours and of at least one baseline", rule=rule,
                      reported=reported)
    wide = records.pivot_table(index="id", columns="method", values="score", aggfunc="mean")
    dev, test, na = split_rows("beats_baselines", model, wide.index.tolist(), rule=rule, reported=reported,
                               groups=groups_of(records))
    if na:
        return na
    best = max(base, key=lambda m: (wide.loc[dev, m].mean(), -base.index(m)))
    pair = wide.loc[test, [ours, best]].dropna()
    c = stats.compare_paired(pair[ours].to_numpy(float), pair[best].to_numpy(float), seed)
    v, need = decide(c, margin, n_total=len(wide), n_judged=len(pair), show=100, unit=" points")
    row = verdict_row("beats_baselines", model, rule=rule, chance="ours equal to the best baseline: +0 points",
                      effect=f"{100 * c['mean']:+.1f} points vs {NAMES.get(best, best)} on test (the best of "
                             f"{len(base)} baselines on dev)",
                      uncertainty=f"{c['test']} {fmt_p(c['p'])}; {fmt_ci(c['lo'], c['hi'], 100, ' points')}",
                      n=len(pair), needed=need, verdict=v, reported=reported,
                      split=stats.describe_split(len(dev), len(test)), p=c["p"], value=c["mean"],
                      ci=(c["lo"], c["hi"]), paper=margin, measure="accuracy (0/1 per question)")
    row.update(best_baseline=best, n_test=len(pair), mean=c["mean"], paper_margin=margin)
    return row


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
        detail = ""
        if "best_baseline" in v:  # the CI once: the verdict's own sentence may already state it
            ci = "" if "95% CI [" in v["verdict"] else f", 95% CI [{100 * v['ci'][0]:+.1f}, {100 * v['ci'][1]:+.1f}]"
            detail = (f" ({100 * v['mean']:+.1f} pts vs {NAMES.get(v['best_baseline'], v['best_baseline'])}{ci}, "
                      f"n = {v['n_test']})")
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
