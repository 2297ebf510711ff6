"""The verdict vocabulary every rule shares: the three outcomes, one row per claim and model, the dev/test split and the
decision from an effect, its p-value and the sample size that would decide."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..archs import family_of
from ..paper import CLAIMS, LAYERS
from . import stats
from .stats import ALPHA

REPRODUCES, NO, INCONCLUSIVE, NA = "reproduces", "does not reproduce", "inconclusive", "n/a"


PARTLY = "partly"  # kept for callers that compare with it; no rule returns it any more


def paper_family(arch: str) -> str | None:
    """The family whose result the paper reports for ``arch`` ("llava" or "qwen", from `ArchSpec.family`), or None
    for an architecture the paper did not study (its claims then state no expected direction)."""
    return family_of(arch) or None if arch in LAYERS else None


LLAVA_FAMILY = tuple(a for a in LAYERS if paper_family(a) == "llava")  # the paper's LLaVA-family architectures
QWEN_FAMILY = tuple(a for a in LAYERS if paper_family(a) == "qwen")


CLAIM_TEXT = {**CLAIMS,
              "ia_relevant": "The contrast I_A = A_post − A_pre concentrates on the question-relevant image regions."}


def fmt_n(n) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "—"
    if not math.isfinite(n):
        return "∞ (no effect in the paper's direction)"
    return f"≈ {int(math.ceil(n))}"


def fmt_p(p) -> str:
    if p is None or not np.isfinite(p):
        return "—"
    return f"p = {p:.2g}" if p >= 0.001 else "p < 0.001"


def fmt_ci(lo, hi, scale: float = 1.0, unit: str = "") -> str:
    if lo is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return ""
    return f"95% CI [{scale * lo:+.3g}, {scale * hi:+.3g}]{unit}"


def verdict_row(claim, model, *, rule, chance="", effect="", uncertainty="", n=None, needed=None, verdict, reported="",
         split="", p=float("nan"), value=float("nan"), ci=(float("nan"), float("nan"))) -> dict:
    """One verdict row: the columns of `verdict_table`, plus the numbers behind them for tests and plots."""
    return {"claim": CLAIM_TEXT[claim], "key": claim, "model": model, "rule": rule, "chance": chance,
            "effect": effect, "uncertainty": uncertainty, "n": n, "needed n": fmt_n(needed), "verdict": verdict,
            "reported": reported, "split": split, "p": p, "value": value, "ci": ci, "needed_n": needed}


# the rule of each claim in brief, for rows where the analysis did not run far enough to state it in full
RULES = {
    "fusion_shallow": "masking a shallow-half layer drops accuracy more than a deep-half layer, beyond shuffled layers",
    "plateau": "late layers' masking drop below the threshold and below the earlier layers' (test split)",
    "review": "the dev split's worst late layer drops accuracy more than the other late layers on test",
    "early_exit": "early-exit accuracy rises after 45% of depth, beyond shuffled layers",
    "hellinger": "the dev split's late Hellinger peak stands above its mid-depth trough on test",
    "noise": "persistent top-k tokens irrelevant more often than 1 − relevant area",
    "relevant_rises": "relevant attention / relevant area rises with depth, beyond shuffled layers, and ends above 1",
    "contrastive_gain": "the dev split's best setting beats plain decoding on the test split (paired test)",
    "fusion_candidates": "the fusion candidate set beats every other set on the test split (paired tests)",
    "ia_relevant": "I_A's positive mass on relevant tokens above the relevant area",
}


def na_row(claim, model, reason: str, *, rule="", reported="", n=None, chance="", split="") -> dict:
    return verdict_row(claim, model, rule=rule or RULES[claim], chance=chance, effect="", n=n, verdict=f"{NA}: {reason}",
                reported=reported, split=split)


def split_rows(claim, model, ids, *, rule, reported, n=None):
    """(dev ids, test ids, None), or (None, None, an n/a row) when the samples are too few for a dev/test split."""
    ids = list(ids)
    dev_ids, test_ids = stats.split_ids(ids)
    if len(test_ids) < 2 or not dev_ids:
        return None, None, na_row(claim, model, f"{len(set(map(str, ids)))} samples are too few for a dev/test split",
                               rule=rule, reported=reported, n=n)
    return dev_ids, test_ids, None


def decide(effect: float, p: float, n_total: int, needed_total: float, direction: int = 1,
            n_judged: int | None = None) -> str:
    """The verdict from an effect, its p-value and the sample size the test would need.

    Significant in the paper's direction: reproduces; significant the other way: does not reproduce; not significant:
    inconclusive when a reachable larger build could decide it, otherwise does not reproduce. ``n_judged``: the
    samples the test saw (the test split's); below a handful no p-value can reach 0.05, whatever the data.
    """
    if not (np.isfinite(effect) and np.isfinite(p)):
        return f"{NA}: the test could not be computed on these records"
    if p < ALPHA:
        return REPRODUCES if effect * direction > 0 else NO
    n_judged = n_total if n_judged is None else n_judged
    floor = stats.min_n_sign_test()
    if 0 < n_judged < floor:
        need = floor * n_total / n_judged
        if needed_total is not None and math.isfinite(needed_total):
            need = max(need, needed_total)
        return f"{INCONCLUSIVE} (n too small: needs {fmt_n(need)})"
    if needed_total is not None and math.isfinite(needed_total) and needed_total > n_total:
        return f"{INCONCLUSIVE} (n too small: needs {fmt_n(needed_total)})"
    return NO


def decide_depth(effect: float, p_samples: float, p_layers: float, n_total: int, needed_total: float) -> str:
    """`decide` for a claim about where in depth something happens: the samples must show the effect, and the
    curve must place it beyond what the same curve with its layers shuffled gives. More samples cannot fix the
    second test, so its failure alone is not "n too small"."""
    if effect > 0 and p_samples < ALPHA <= p_layers:
        return (f"{INCONCLUSIVE} (the effect's place in depth is within what shuffled layers give; more layers, "
                "not more samples, could decide it)")
    return decide(effect, max(p_samples, p_layers), n_total, needed_total)


def decide_absence(mean: float, sd: float, margin: float, diffs, n_total: int, scale: float, seed: int):
    """Verdict, p-value and needed build size for a claim that an effect is absent (below ``margin``).

    Absence cannot be shown by a non-significant difference (a small build would always "show" it), so the test is
    one-sided against the margin: H0 says the effect is at least ``margin``.
    """
    p_below = stats.below_margin_p(diffs, margin, seed)
    p_above = stats.sign_flip_p(np.asarray(diffs, float) - margin, seed, alternative="greater")
    need = stats.n_for_mean(sd, margin - mean, two_sided=False) * scale if mean < margin else float("inf")
    floor = stats.min_n_sign_test(two_sided=False)
    if p_below >= ALPHA and len(diffs) < floor:
        need = max(need if math.isfinite(need) else 0.0, floor * scale)
        return f"{INCONCLUSIVE} (n too small: needs {fmt_n(need)})", p_below, need
    if p_below < ALPHA:
        v = REPRODUCES
    elif p_above < ALPHA or not (math.isfinite(need) and need > n_total):
        v = NO
    else:
        v = f"{INCONCLUSIVE} (n too small: needs {fmt_n(need)})"
    return v, p_below, need


def needed(sd, mean, direction: int, scale: float, paper_delta: float | None = None) -> float:
    """Build size for 80% power: at the observed effect when it points the paper's way, else at the paper's."""
    if np.isfinite(mean) and mean * direction > 0:
        return stats.n_for_mean(sd, mean) * scale
    if paper_delta is not None:
        return stats.n_for_mean(sd if np.isfinite(sd) and sd > 0 else 2 * abs(paper_delta), paper_delta) * scale
    return float("inf")


def require(df: pd.DataFrame, columns, who: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{who} needs a run's per-sample records as a DataFrame (result.records), got "
                         f"{type(df).__name__}.")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{who} needs per-sample records with columns {list(columns)}; these records lack "
                         f"{missing} (pass the run's .records, not its .summary).")


def dev_split(records: pd.DataFrame, id_col: str = "id") -> tuple[pd.DataFrame, pd.DataFrame]:
    """The records of the dev and the test samples (a stable hash of the sample id decides; see `stats.split_of`).

    Choose anything that is tuned (fusion layers, ρ, λ, candidate set) on the first, judge on the second.

    >>> recs = pd.DataFrame({"id": [f"q{i}" for i in range(10)], "score": 1.0})
    >>> dev, test = dev_split(recs)
    >>> len(dev) + len(test)
    10
    """
    if records is None or len(records) == 0:
        return records, records
    side = records[id_col].map(lambda i: stats.split_of(str(i)))
    return records[side == "dev"], records[side == "test"]


def matrix(records: pd.DataFrame, value: str) -> pd.DataFrame:
    """Samples x layers of one per-sample value; samples missing a layer are dropped (a curve needs all layers)."""
    m = records.pivot_table(index="id", columns="layer", values=value, aggfunc="mean")
    return m.dropna(axis=0, how="any").sort_index(axis=1)
