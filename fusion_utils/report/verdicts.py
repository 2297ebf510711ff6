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
         split="", p=float("nan"), value=float("nan"), ci=(float("nan"), float("nan")), paper=None,
         measure="") -> dict:
    """One verdict row: the columns of `verdict_table`, plus the numbers behind them for tests and plots
    (``paper``: the effect the rule decides against; ``measure``: the rule's primary measure)."""
    return {"claim": CLAIM_TEXT[claim], "key": claim, "model": model, "rule": rule, "chance": chance,
            "effect": effect, "uncertainty": uncertainty, "n": n, "needed n": fmt_n(needed), "verdict": verdict,
            "reported": reported, "split": split, "p": p, "value": value, "ci": ci, "needed_n": needed,
            "paper_effect": paper, "measure": measure}


def with_holm(rows: list[dict]) -> list[dict]:
    """The rows with ``p_holm`` (and the shown ``"p (Holm)"``): each row's p-value adjusted by Holm's method across
    all the rows given, so a claim that "reproduces" on its own p may be seen to fall short family-wise.

    >>> [r["p (Holm)"] for r in with_holm([{"p": 0.01}, {"p": 0.04}, {"p": float("nan")}])]
    ['p = 0.02', 'p = 0.04', '—']
    """
    adjusted = stats.holm(r.get("p", float("nan")) for r in rows)
    return [{**r, "p_holm": a, "p (Holm)": fmt_p(a)} for r, a in zip(rows, adjusted)]


# --- the effect each claim's rule decides against, declared before any data is seen --------------------------------
# Where the paper gives a number it is used; where it gives only a shape ("collapses", "barely changes", "jumps"),
# the constant is the smallest effect that would support the claim, and says so.

#: nats of the gold answer's first-token log-probability: a change of about 10% of its probability (log 1.1); the
#: paper reports accuracy only, so this is the smallest change of the primary measure that supports a layer claim
MIN_LOGPROB = 0.1
#: accuracy points (0-1) masking a fusion layer must cost more than a deep layer: the fusion threshold (5 points);
#: the paper reports a collapse (LLaVA-1.5 fusion layers 2, 4, 8, 11-13 of 32, `paper.LAYERS`), far above it
MIN_ACC_DROP = 0.05
#: the late masking effect that "barely changes accuracy" stays below (plateau; Qwen's absent review layer)
PLATEAU_MARGIN = {"logprob": MIN_LOGPROB, "accuracy": MIN_ACC_DROP}
#: the share of the first-to-final rise by which the early-exit curve stays below the straight line up to 45% of
#: depth: a step at 18 of 32 (`paper.CLAIMS["early_exit"]`) gives about 0.22; a linear ramp gives 0
EARLY_EXIT_JUMP_SHARE = 0.1
#: Hellinger rise at the review layer over the mid-depth trough (the paper shows a curve, no number)
HELLINGER_RISE = 0.02
#: share of persistent tokens irrelevant beyond chance (1 − relevant area); the paper shows maps, no number
NOISE_EXCESS = 0.05
#: rise of relevant attention / relevant area (1 = chance) from the first to the last quarter of depth
RELEVANT_RISE = 0.1
#: the smallest average gain the paper reports (LLaVA-NeXT: 68.65 − 66.22 = +2.43 points, `paper.MAIN_TABLE`)
PAPER_GAIN = 0.024
#: fusion vs shallow candidate set in the paper's ablation (GQA: 69.4 vs 68.3, `paper.CANDIDATE_ABLATION`)
PAPER_FUSION_MARGIN = 0.011
#: share of I_A's positive mass on relevant tokens beyond A_post's own: the contrast must sharpen A_post this much
IA_OVER_POST = 0.05


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
    "beats_baselines": "ours beats the dev split's best baseline on the test split (paired test)",
}


def na_row(claim, model, reason: str, *, rule="", reported="", n=None, chance="", split="") -> dict:
    return verdict_row(claim, model, rule=rule or RULES[claim], chance=chance, effect="", n=n, verdict=f"{NA}: {reason}",
                reported=reported, split=split)


def groups_of(records: pd.DataFrame | None, id_col: str = "id") -> dict:
    """id -> split key from the records' ``split_group`` column (see `attach_groups`), or {} (each id alone)."""
    if records is None or "split_group" not in getattr(records, "columns", ()):
        return {}
    return dict(zip(records[id_col].astype(str), records["split_group"].astype(str)))


def attach_groups(records: pd.DataFrame, dataset, id_col: str = "id") -> pd.DataFrame:
    """The records with a ``split_group`` column from the dataset (`stats.split_group`: the image where images
    repeat, MMBench's question for its rotated copies), which `dev_split` and every rule then split by."""
    keys = {str(s.id): stats.split_group(s) for s in dataset}
    return records.assign(split_group=records[id_col].astype(str).map(keys).fillna(records[id_col].astype(str)))


def split_rows(claim, model, ids, *, rule, reported, n=None, groups=None):
    """(dev ids, test ids, None), or (None, None, an n/a row) when the samples are too few for a dev/test split."""
    ids = list(ids)
    dev_ids, test_ids = stats.split_ids(ids, groups=groups)
    if len(test_ids) < 2 or not dev_ids:
        return None, None, na_row(claim, model, f"{len(set(map(str, ids)))} samples are too few for a dev/test split",
                               rule=rule, reported=reported, n=n)
    return dev_ids, test_ids, None


def n_to_decide(sd: float, mean: float, paper: float | None) -> float:
    """Samples at which a CI around ``mean`` would exclude zero or the paper's effect, whichever is farther from it,
    with 80% power (so the verdict is no longer inconclusive). The farther of the two is at least half the paper's
    effect away, so this is finite whenever the paper states an effect."""
    gap = abs(mean) if paper is None else max(abs(mean), abs(paper - mean), abs(paper) / 2)
    if not np.isfinite(gap) or gap == 0:
        return float("inf")
    # no spread observed (e.g. no discordant pair): a 0/1 difference at rate q has variance about q
    return stats.n_for_mean(sd if np.isfinite(sd) and sd > 0 else math.sqrt(max(abs(paper or 0.0), gap)), gap)


def decide(t: dict, paper: float | None, *, n_total: int, n_judged: int | None = None, direction: int = 1,
           p: float | None = None, unit: str = "", show: float = 1.0) -> tuple[str, float]:
    """The one three-way rule every chapter uses: ``(verdict, needed build size)`` from a paired test ``t``
    (`stats.paired_test`/`compare_paired`: mean, 95% CI lo/hi, p, sd) and the paper's effect ``paper`` (or the
    smallest effect that would support the claim), both in the paper's ``direction``.

    - CI entirely on the wrong side of zero: does not reproduce (opposite);
    - CI entirely below the paper's effect: does not reproduce (smaller than reported), whatever the n;
    - CI above zero (and p < 0.05): reproduces;
    - otherwise the CI holds both zero and the paper's effect: inconclusive, with the build size that would decide.

    ``paper=None`` for a claim that an effect stays below a margin (the measure is then margin − effect, and any
    positive value supports the claim). ``n_judged``: the samples the test saw; below a handful no p-value can
    reach 0.05 and no CI is trustworthy, so the verdict is inconclusive whatever the data. ``show``/``unit``: how
    the sentence prints values (100, " points" for accuracy).

    >>> decide(dict(mean=0.03, lo=-0.01, hi=0.07, p=0.2, sd=0.2, n=60), 0.024, n_total=120)[0][:12]
    'inconclusive'
    >>> print(decide(dict(mean=0.0, lo=-0.004, hi=0.004, p=0.9, sd=0.02, n=800), 0.024, n_total=800)[0])
    does not reproduce (smaller than reported: the 95% CI ends at +0.004, below the paper's +0.024)
    """
    mean, lo, hi, sd = (float(t.get(k, float("nan"))) for k in ("mean", "lo", "hi", "sd"))
    p = float(t.get("p", float("nan"))) if p is None else p
    if not all(np.isfinite(x) for x in (mean, lo, hi, p)):
        return f"{NA}: the test could not be computed on these records", float("nan")
    n_judged = int(t.get("n", n_total)) if n_judged is None else n_judged
    scale = n_total / max(1, n_judged)
    m, a, b = direction * mean, min(direction * lo, direction * hi), max(direction * lo, direction * hi)
    ref = None if paper is None else direction * paper
    need = n_to_decide(sd, m, ref) * scale
    floor = stats.min_n_sign_test()
    if 0 < n_judged < floor:
        need = max(floor * scale, need if math.isfinite(need) else 0.0)
        return f"{INCONCLUSIVE} ({n_judged} test samples cannot reach p < 0.05: needs {fmt_n(need)})", need
    if b < 0:
        return (f"{NO} (opposite: the 95% CI [{show * lo:+.3g}, {show * hi:+.3g}]{unit} excludes zero on the "
                "other side from the paper)"), float("nan")
    if ref is not None and b < ref:
        return (f"{NO} (smaller than reported: the 95% CI ends at {show * direction * b:+.3g}{unit}, below the "
                f"paper's {show * paper:+.3g}{unit})"), float("nan")
    if a > 0 and p < ALPHA:
        return REPRODUCES, float("nan")
    held = "zero and the paper's effect" if ref is not None else "zero"
    return f"{INCONCLUSIVE} (the 95% CI holds {held}; needs {fmt_n(need)})", need


def decide_depth(t: dict, paper: float | None, p_layers: float, *, n_total: int, n_judged: int | None = None,
                 unit: str = "") -> tuple[str, float]:
    """`decide` for a claim about where in depth something happens: the samples must show the effect, and the
    mean curve must place it beyond what it gives with each sample's layers shuffled (`stats.layer_shuffle_p`, whose
    power grows with the samples like the paired test's). When only the second test fails, the needed n is the
    paired test's at half its observed effect (a conservative guess: the shuffle test has no closed-form power)."""
    v, need = decide(t, paper, n_total=n_total, n_judged=n_judged, unit=unit)
    if v == REPRODUCES and not p_layers < ALPHA:
        n_judged = int(t.get("n", n_total)) if n_judged is None else n_judged
        need = stats.n_for_mean(float(t.get("sd", float("nan"))), float(t["mean"]) / 2) * n_total / max(1, n_judged)
        return (f"{INCONCLUSIVE} (the effect's place in depth is within what shuffled layers give, {fmt_p(p_layers)}; "
                f"needs {fmt_n(max(need, n_total + 1))})"), max(need, n_total + 1)
    return v, need


def decide_absence(diffs, margin: float, *, n_total: int, seed: int, unit: str = "") -> tuple[str, dict, float]:
    """Verdict, the test of ``margin − effect`` and the needed build size for a claim that an effect is absent
    (stays below ``margin``): `decide` on margin − effect, so the CI must lie below the margin to reproduce and
    above it to fail; a small build cannot "show" absence by a non-significant difference."""
    d = np.asarray(diffs, float)
    t = stats.paired_test(margin - d, seed)
    v, need = decide(t, None, n_total=n_total, unit=unit)
    if v.startswith(NO):
        v = (f"{NO} (opposite: the effect's 95% CI [{margin - t['hi']:+.3g}, {margin - t['lo']:+.3g}]{unit} lies above "
             f"the margin {margin:+.3g})")
    return v, t, need


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


def dev_split(records: pd.DataFrame, id_col: str = "id", groups: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The records of the dev and the test samples (a stable hash decides; see `stats.split_of`) of the sample's
    split key: its image or its question's copies when the records carry ``split_group`` (`attach_groups`) or
    ``groups`` maps id -> key, else the sample id.

    Choose anything that is tuned (fusion layers, ρ, λ, candidate set) on the first, judge on the second.

    >>> recs = pd.DataFrame({"id": [f"q{i}" for i in range(10)], "score": 1.0})
    >>> dev, test = dev_split(recs)
    >>> len(dev) + len(test)
    10
    """
    if records is None or len(records) == 0:
        return records, records
    groups = groups or groups_of(records, id_col)
    side = records[id_col].map(lambda i: stats.split_of(groups.get(str(i), str(i))))
    return records[side == "dev"], records[side == "test"]


def matrix(records: pd.DataFrame, value: str) -> pd.DataFrame:
    """Samples x layers of one per-sample value; samples missing a layer are dropped (a curve needs all layers)."""
    m = records.pivot_table(index="id", columns="layer", values=value, aggfunc="mean")
    return m.dropna(axis=0, how="any").sort_index(axis=1)
