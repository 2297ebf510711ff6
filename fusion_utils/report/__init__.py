"""Chapter support: parameter checks, one model at a time, and a verdict per claim of the paper.

A verdict compares what a run measured with what the paper reports, by a rule that a null model fails:

- every rule compares with its chance level (a random token, a shuffled-layer curve, plain decoding);
- whatever is tuned (ρ, λ, candidate set, fusion or review layer) is chosen on a dev split and judged on a disjoint
  test split (a stable hash of the sample id, `stats.split_of`);
- the effect carries its uncertainty (bootstrap CI; McNemar or sign-flip p-value; a shuffled-layer permutation
  p-value where the claim is about depth), and "reproduces" needs the paper's direction *and* p < 0.05;
- when the test cannot decide, the verdict says so and names the sample size it would need (80% power);
- when the analysis does not apply (nothing persistent, no relevance labels, a flat curve, a no-op intervention),
  the verdict is "n/a: <reason>" rather than an exception.

The rules take per-sample records (``result.records``), not summaries, because a test needs the samples.
Depths are relative (layer / number of layers) so the rules apply to models of any depth.

>>> rows = attention_verdicts("m", pd.DataFrame(), 8)
>>> bool(verdict_table(rows)["verdict"].str.startswith("n/a").all())
True
"""
from __future__ import annotations

import gc
import math
from typing import Iterable, Iterator

import numpy as np
import pandas as pd

from . import stats
from ..paper import CLAIMS, LATENCY_S, LAYERS
from .stats import ALPHA

REPRODUCES, NO, INCONCLUSIVE, NA = "reproduces", "does not reproduce", "inconclusive", "n/a"
PARTLY = "partly"  # kept for callers that compare with it; no rule returns it any more
LLAVA_FAMILY = ("llava", "llava_next", "vipllava", "instructblip")
QWEN_FAMILY = ("qwen2_vl", "qwen2_5_vl")
_DTYPES = ("float32", "bfloat16", "float16", None)


def check_params(*, models, dataset, samples, device, dtype, seed, source=None, **knobs) -> None:
    """Validate a chapter's papermill parameters; raise ValueError with one sentence naming the fix."""
    if isinstance(models, str) or not isinstance(models, (list, tuple)) or not models:
        raise ValueError(f"models must be a non-empty list of model names, e.g. ['organism:llava'], got {models!r}.")
    from ..data import BENCHMARKS

    if not isinstance(dataset, str) or not (dataset.lower().startswith("world") or dataset.lower() in BENCHMARKS):
        raise ValueError(f"dataset must be 'world' or one of {', '.join(BENCHMARKS)}, got {dataset!r}.")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}.")
    if not isinstance(device, str) or not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}.")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of float32, bfloat16, float16 (or None for the checkpoint's), got {dtype!r}.")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}.")
    for k, v in knobs.items():
        if k in ("rho", "lam", "threshold") and not (isinstance(v, (int, float)) and 0 <= v <= 1):
            raise ValueError(f"{k} must be a number between 0 and 1, got {v!r}.")
        if k in ("rhos", "lams") and not (isinstance(v, (list, tuple)) and all(0 <= x <= 1 for x in v)):
            raise ValueError(f"{k} must be a list of numbers between 0 and 1, got {v!r}.")
    if dataset.lower() not in ("world",) and not dataset.lower().startswith("world") and source is None:
        pass  # the lmms-eval hub dataset is used (needs network + `datasets`)


def load_data(dataset: str, samples: int, seed: int, source=None):
    from ..data import load_dataset

    return load_dataset(dataset, n=samples, source=source, seed=seed if dataset.startswith("world") else None)


def iter_models(models: Iterable[str], device: str = "cpu", dtype=None) -> Iterator:
    """Load each model in turn, yield it, and free it before the next (two 7B models need not fit at once)."""
    from ..models import load_model

    for name in models:
        lm = load_model(name, device=device, dtype=dtype)
        try:
            yield lm
        finally:
            del lm
            gc.collect()
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:  # pragma: no cover
                pass


def label(lm) -> str:
    name = lm.name.split("/")[-1]
    return f"{name} [{lm.spec.label}]" if not name.startswith("organism:") else f"{lm.spec.label} organism"


CLAIM_TEXT = {**CLAIMS,
              "ia_relevant": "The contrast I_A = A_post − A_pre concentrates on the question-relevant image regions."}


# --- one verdict row --------------------------------------------------------------------------------------------

def _fmt_n(n) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "—"
    if not math.isfinite(n):
        return "∞ (no effect in the paper's direction)"
    return f"≈ {int(math.ceil(n))}"


def _fmt_p(p) -> str:
    if p is None or not np.isfinite(p):
        return "—"
    return f"p = {p:.2g}" if p >= 0.001 else "p < 0.001"


def _fmt_ci(lo, hi, scale: float = 1.0, unit: str = "") -> str:
    if lo is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return ""
    return f"95% CI [{scale * lo:+.3g}, {scale * hi:+.3g}]{unit}"


def _row(claim, model, *, rule, chance="", effect="", uncertainty="", n=None, needed=None, verdict, reported="",
         split="", p=float("nan"), value=float("nan"), ci=(float("nan"), float("nan"))) -> dict:
    """One verdict row: the columns of `verdict_table`, plus the numbers behind them for tests and plots."""
    return {"claim": CLAIM_TEXT[claim], "key": claim, "model": model, "rule": rule, "chance": chance,
            "effect": effect, "uncertainty": uncertainty, "n": n, "needed n": _fmt_n(needed), "verdict": verdict,
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


def _na(claim, model, reason: str, *, rule="", reported="", n=None, chance="", split="") -> dict:
    return _row(claim, model, rule=rule or RULES[claim], chance=chance, effect="", n=n, verdict=f"{NA}: {reason}",
                reported=reported, split=split)


def _split(claim, model, ids, *, rule, reported, n=None):
    """(dev ids, test ids, None), or (None, None, an n/a row) when the samples are too few for a dev/test split."""
    ids = list(ids)
    dev_ids, test_ids = stats.split_ids(ids)
    if len(test_ids) < 2 or not dev_ids:
        return None, None, _na(claim, model, f"{len(set(map(str, ids)))} samples are too few for a dev/test split",
                               rule=rule, reported=reported, n=n)
    return dev_ids, test_ids, None


def _decide(effect: float, p: float, n_total: int, needed_total: float, direction: int = 1,
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
        return f"{INCONCLUSIVE} (n too small: needs {_fmt_n(need)})"
    if needed_total is not None and math.isfinite(needed_total) and needed_total > n_total:
        return f"{INCONCLUSIVE} (n too small: needs {_fmt_n(needed_total)})"
    return NO


def _decide_depth(effect: float, p_samples: float, p_layers: float, n_total: int, needed_total: float) -> str:
    """`_decide` for a claim about where in depth something happens: the samples must show the effect, and the
    curve must place it beyond what the same curve with its layers shuffled gives. More samples cannot fix the
    second test, so its failure alone is not "n too small"."""
    if effect > 0 and p_samples < ALPHA <= p_layers:
        return (f"{INCONCLUSIVE} (the effect's place in depth is within what shuffled layers give; more layers, "
                "not more samples, could decide it)")
    return _decide(effect, max(p_samples, p_layers), n_total, needed_total)


def _decide_absence(mean: float, sd: float, margin: float, diffs, n_total: int, scale: float, seed: int):
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
        return f"{INCONCLUSIVE} (n too small: needs {_fmt_n(need)})", p_below, need
    if p_below < ALPHA:
        v = REPRODUCES
    elif p_above < ALPHA or not (math.isfinite(need) and need > n_total):
        v = NO
    else:
        v = f"{INCONCLUSIVE} (n too small: needs {_fmt_n(need)})"
    return v, p_below, need


def _needed(sd, mean, direction: int, scale: float, paper_delta: float | None = None) -> float:
    """Build size for 80% power: at the observed effect when it points the paper's way, else at the paper's."""
    if np.isfinite(mean) and mean * direction > 0:
        return stats.n_for_mean(sd, mean) * scale
    if paper_delta is not None:
        return stats.n_for_mean(sd if np.isfinite(sd) and sd > 0 else 2 * abs(paper_delta), paper_delta) * scale
    return float("inf")


def _require(df: pd.DataFrame, columns, who: str) -> None:
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


def _matrix(records: pd.DataFrame, value: str) -> pd.DataFrame:
    """Samples x layers of one per-sample value; samples missing a layer are dropped (a curve needs all layers)."""
    m = records.pivot_table(index="id", columns="layer", values=value, aggfunc="mean")
    return m.dropna(axis=0, how="any").sort_index(axis=1)


def _masking_drops(records: pd.DataFrame, mode: str | None, who: str) -> pd.DataFrame:
    _require(records, ["id", "layer", "score", "plain_score"], who)
    r = records
    if mode is not None and "mode" in r.columns:
        r = r[r["mode"] == mode]
    r = r.assign(drop=r["plain_score"].astype(float) - r["score"].astype(float))
    return _matrix(r, "drop")


def _late_layers(layers, n_layers: int) -> list[int]:
    return [j for j in layers if j >= math.ceil(0.625 * n_layers)]


def pick_layers(found: dict, n_layers: int) -> tuple[list[int], int, str]:
    """Fusion layers and the layer the soft mask acts on, from a masking run's findings, with a note saying how
    they were chosen (no fusion layer found -> the shallow half; no review layer -> 28/32 of depth).

    Pass the findings of the dev split (`dev_split`) when a verdict is to be judged on the test split.

    >>> pick_layers({"fusion_layers": [0, 1], "review_layer": 6}, 8)[:2]
    ([0, 1], 6)
    """
    from ..methods import candidate_layers, default_apply_layer

    fusion = list(found.get("fusion_layers") or [])
    notes = []
    if not fusion:
        fusion = candidate_layers("shallow", n_layers)
        notes.append("no layer passed the fusion threshold, so the shallow half stands in for the fusion set")
    review = found.get("review_layer")
    apply_layer = review if review is not None else default_apply_layer(n_layers)
    notes.append(f"soft mask applied at the review layer {review}" if review is not None else
                 f"no review layer found, so the soft mask acts at layer {apply_layer} (28/32 of depth)")
    return fusion, apply_layer, "; ".join(notes)


def usable_candidates(kinds, n_layers: int, fusion_layers) -> tuple[list[str], str]:
    """The candidate sets that are non-empty for this depth, and a note naming any dropped.

    >>> usable_candidates(["fusion", "deep"], 2, [0])
    (['fusion'], "candidate sets ['deep'] are empty at 2 layers and were skipped")
    """
    from ..methods import candidate_layers

    keep, dropped = [], []
    for k in kinds:
        try:
            candidate_layers(k, n_layers, fusion_layers)
            keep.append(k)
        except ValueError:
            dropped.append(k)
    note = f"candidate sets {dropped} are empty at {n_layers} layers and were skipped" if dropped else ""
    return keep, note


# --- layer claims -------------------------------------------------------------------------------------------------

def fusion_verdicts(model: str, arch: str, records: pd.DataFrame, n_layers: int, *, threshold: float = 0.05,
                    mode: str | None = "zero", seed: int = 0) -> list[dict]:
    """Verdicts on "fusion at shallow layers" and "plateau after ~60% of depth" from a masking run's records.

    ``records``: per (sample, layer) rows with ``id, layer, score, plain_score`` (and ``mode``; only ``mode`` is used).

    >>> recs = pd.DataFrame([dict(id=f"q{i}", layer=j, plain_score=1.0, score=float(j >= 2 or i % 5 == 0))
    ...                      for i in range(40) for j in range(8)])
    >>> [r["key"] for r in fusion_verdicts("m", "llava", recs, 8)]
    ['fusion_shallow', 'plateau']
    """
    rep = LAYERS.get(arch, {})
    reported = (f"fusion layers {rep['fusion_layers']} of 32" if rep.get("fusion_layers") else
                "few shallow fusion layers (LLaVA-1.5: 2, 4, 8, 11-13 of 32)")
    if records is None or len(records) == 0:
        return [_na("fusion_shallow", model, "the masking run has no records", reported=reported),
                _na("plateau", model, "the masking run has no records")]
    D = _masking_drops(records, mode, "fusion_verdicts")
    if D.empty:
        return [_na("fusion_shallow", model, f"no sample has a masking record at every layer (mode {mode!r})",
                    reported=reported), _na("plateau", model, "no complete masking curve")]
    return [_fusion_shallow(model, D, n_layers, threshold, reported, seed), _plateau(model, D, n_layers, threshold,
                                                                                    seed)]


def _fusion_shallow(model, D: pd.DataFrame, n_layers: int, threshold: float, reported: str, seed: int) -> dict:
    rule = ("per-sample accuracy drop when masking a shallow-half layer minus a deep-half layer > 0 (sign-flip test "
            "over samples) and larger than on the same curve with its layers shuffled (permutation test); both "
            "p < 0.05")
    layers = list(D.columns)
    shallow = [i for i, j in enumerate(layers) if j < n_layers / 2]
    deep = [i for i, j in enumerate(layers) if j >= n_layers / 2]
    n = len(D)
    split = f"all {n} samples (nothing is selected)"
    if not shallow or not deep:
        return _na("fusion_shallow", model, "the masked layers do not cover both halves of depth", rule=rule,
                   reported=reported, n=n)
    curve = D.mean(axis=0).to_numpy()
    if not (curve > threshold).any():
        return _na("fusion_shallow", model, f"no layer's masking drops accuracy by more than {threshold:.2f}, so there "
                   "is no fusion layer to place in depth", rule=rule, reported=reported, n=n,
                   chance="shuffled layers: 0")
    X = D.to_numpy()
    d = X[:, shallow].mean(axis=1) - X[:, deep].mean(axis=1)
    t = stats.paired_test(d, seed)

    def gap(c):
        return c[shallow].mean() - c[deep].mean()

    p_perm = stats.layer_permutation_p(curve, gap, seed=seed)
    min_perm = 1 / math.comb(len(layers), len(shallow))
    p = max(t["p"], p_perm)
    if min_perm >= ALPHA:
        v = f"{INCONCLUSIVE} ({len(layers)} layers are too few for the shuffled-layer test to reach p < 0.05)"
    else:
        v = _decide_depth(t["mean"], t["p"], p_perm, n, _needed(t["sd"], t["mean"], 1, 1.0))
    fusion = [int(j) for j, c in zip(layers, curve) if c > threshold]
    return _row("fusion_shallow", model, rule=rule,
                chance=f"shuffled layers: 0 in expectation (95% of shuffles below "
                       f"{_perm_quantile(curve, gap, seed):+.3f})",
                effect=f"drop {curve[shallow].mean():.3f} (shallow half) vs {curve[deep].mean():.3f} (deep half): "
                       f"{t['mean']:+.3f}; layers with drop > {threshold:.2f}: {fusion} of {n_layers}",
                uncertainty=f"{_fmt_ci(t['lo'], t['hi'])}; sign-flip {_fmt_p(t['p'])}; shuffled layers "
                            f"{_fmt_p(p_perm)}",
                n=n, needed=_needed(t["sd"], t["mean"], 1, 1.0), verdict=v, reported=reported, split=split, p=p,
                value=t["mean"], ci=(t["lo"], t["hi"]))


def _perm_quantile(curve, statistic, seed: int, q: float = 0.95, n: int = 500) -> float:
    rng = np.random.default_rng(seed)
    c = np.asarray(curve, float)
    return float(np.quantile([statistic(c[rng.permutation(len(c))]) for _ in range(n)], q))


def _plateau(model, D: pd.DataFrame, n_layers: int, threshold: float, seed: int) -> dict:
    late_from = math.ceil(0.625 * n_layers)
    rule = (f"on test samples, the mean drop over layers >= {late_from} (the dev split's review layer aside) is below "
            f"{threshold:.2f} (one-sided sign-flip vs the margin) and below the earlier layers' drop (sign-flip); "
            "both p < 0.05")
    reported = "masking barely matters after layer 18-20 of 32"
    layers = list(D.columns)
    late = _late_layers(layers, n_layers)
    early = [j for j in layers if j < late_from]
    if not late or not early:
        return _na("plateau", model, f"no masked layer on both sides of layer {late_from} (62.5% of depth)",
                   rule=rule, reported=reported)
    if not (D.to_numpy() != 0).any():
        return _na("plateau", model, "masking the image changes no answer at any layer (the model does not use the "
                   "image here), so a plateau says nothing", rule=rule, reported=reported, n=len(D))
    ids = list(D.index)
    dev_ids, test_ids, na = _split("plateau", model, ids, rule=rule, reported=reported, n=len(ids))
    if na:
        return na
    dev_curve = D.loc[dev_ids, late].mean(axis=0)
    review = int(dev_curve.idxmax()) if dev_curve.max() > threshold and len(late) > 1 else None
    keep = [j for j in late if j != review]
    T = D.loc[test_ids]
    e = T[keep].mean(axis=1).to_numpy()
    c = T[early].mean(axis=1).to_numpy() - e
    te, tc = stats.paired_test(e, seed), stats.paired_test(c, seed)
    scale = len(ids) / len(test_ids)
    v_abs, p_below, need_abs = _decide_absence(te["mean"], te["sd"], threshold, e, len(ids), scale, seed)
    need_c = _needed(tc["sd"], tc["mean"], 1, scale)
    need = max(need_abs, need_c)
    p = max(p_below, tc["p"])
    if v_abs == REPRODUCES:
        v = _decide(tc["mean"], tc["p"], len(ids), need_c, n_judged=len(test_ids))
    else:
        v = v_abs
    return _row("plateau", model, rule=rule,
                chance=f"shuffled layers: late drop = mean drop of all layers ({float(T.to_numpy().mean()):.3f})",
                effect=f"late drop {te['mean']:+.3f} vs earlier layers {T[early].to_numpy().mean():+.3f}"
                       + ("" if review is None else f" (review layer {review}, picked on dev, excluded)"),
                uncertainty=f"late drop {_fmt_ci(te['lo'], te['hi'])}, below {threshold:.2f}: one-sided "
                            f"{_fmt_p(p_below)}; below earlier layers: {_fmt_p(tc['p'])}",
                n=len(test_ids), needed=need, verdict=v, reported=reported,
                split=stats.describe_split(len(dev_ids), len(test_ids)), p=p, value=te["mean"],
                ci=(te["lo"], te["hi"]))


def review_verdicts(model: str, arch: str, masking_records: pd.DataFrame | None, hellinger: pd.DataFrame | None,
                    early: pd.DataFrame | None, n_layers: int, *, threshold: float = 0.05, mode: str | None = "zero",
                    onward: bool = False, margin: float = 0.02, seed: int = 0) -> list[dict]:
    """Verdicts on the review layer, the early-exit jump and the late Hellinger rise, from per-sample records.

    ``masking_records``: a one-layer masking run's records (``id, layer, score, plain_score``); ``onward=True`` says
    the run masked from each layer onward, which cannot show a late dip. ``hellinger``: ``id, layer, hellinger``;
    ``early``: ``id, layer, score``. ``margin``: the Hellinger rise a model without a review layer stays below.

    >>> rows = review_verdicts("m", "qwen2_vl", None, None, None, 8)
    >>> rows[0]["verdict"].startswith("n/a")
    True
    """
    family = "llava" if arch in LLAVA_FAMILY else "qwen" if arch in QWEN_FAMILY else None
    if family is None:
        rows = [_na("review", model, f"the paper makes no review-layer claim for {arch!r} models")]
    else:
        rows = [_review(model, family, masking_records, n_layers, threshold, mode, onward, seed)]
    if early is not None:
        rows.append(_early_exit(model, early, n_layers, seed))
    if hellinger is not None:
        rows.append(_hellinger(model, family, hellinger, n_layers, margin, seed) if family is not None else
                    _na("hellinger", model, f"the paper makes no late-Hellinger claim for {arch!r} models"))
    return rows


def _review(model, family, records, n_layers, threshold, mode, onward, seed) -> dict:
    expect = family == "llava"
    reported = "~29 of 32 (LLaVA family)" if expect else "none (Qwen2/2.5-VL)"
    late_from = math.ceil(0.625 * n_layers)
    rule = (f"the layer >= {late_from} whose masking drops accuracy most on the dev split; on test, its drop minus the "
            "other late layers' (sign-flip) " + ("> 0 with p < 0.05 and the layer at >= 75% of depth" if expect else
                                                 f"< {threshold:.2f} (one-sided test against that margin)"))
    if onward or (records is not None and "onward" in getattr(records, "columns", ()) and records["onward"].any()):
        return _na("review", model, "a mask kept from each layer onward hides the image from every later layer, so "
                   "it cannot show a late dip; use the one-layer probe", rule=rule, reported=reported)
    if records is None or len(records) == 0:
        return _na("review", model, "no masking records", rule=rule, reported=reported)
    D = _masking_drops(records, mode, "review_verdicts")
    late = _late_layers(list(D.columns), n_layers)
    if len(late) < 2:
        return _na("review", model, f"fewer than two masked layers after {late_from} of {n_layers}: a review layer "
                   "cannot be told from the plateau", rule=rule, reported=reported)
    if not (D.to_numpy() != 0).any():
        return _na("review", model, "masking the image changes no answer at any layer (the model does not use the "
                   "image here)", rule=rule, reported=reported, n=len(D))
    dev_ids, test_ids, na = _split("review", model, D.index, rule=rule, reported=reported, n=len(D))
    if na:
        return na
    r = int(D.loc[dev_ids, late].mean(axis=0).idxmax())
    others = [j for j in late if j != r]
    T = D.loc[test_ids]
    d = (T[r] - T[others].mean(axis=1)).to_numpy()
    t = stats.paired_test(d, seed)
    n_all, scale = len(D), len(D) / len(test_ids)
    split = stats.describe_split(len(dev_ids), len(test_ids))
    chance = "shuffled layers: the dev-picked layer drops no more than the other late layers on test (0)"
    effect = f"layer {r} of {n_layers} (dev pick): test drop {T[r].mean():+.3f} vs {T[others].to_numpy().mean():+.3f}"
    if expect:
        need = _needed(t["sd"], t["mean"], 1, scale)
        v = _decide(t["mean"], t["p"], n_all, need, n_judged=len(test_ids))
        if v == REPRODUCES and r < 0.75 * n_layers:
            v = f"{NO} (the dip is at layer {r}, before 75% of depth)"
        p = t["p"]
    else:
        v, p, need = _decide_absence(t["mean"], t["sd"], threshold, d, n_all, scale, seed)
    return _row("review", model, rule=rule, chance=chance, effect=effect,
                uncertainty=f"{_fmt_ci(t['lo'], t['hi'])}; " + (f"sign-flip {_fmt_p(p)}" if expect else
                                                                f"below {threshold:.2f}: one-sided {_fmt_p(p)}"),
                n=len(test_ids), needed=need, verdict=v, reported=reported, split=split, p=p, value=t["mean"],
                ci=(t["lo"], t["hi"]))


def _early_exit(model, records, n_layers, seed) -> dict:
    reported = "jump after ~18 of 32 (56%)"
    rule = ("with m the last layer below 45% of depth: per sample, mean accuracy after m minus up to m > 0 (sign-flip) "
            "and larger than with the layers shuffled (permutation, final layer fixed), and half the first-to-final "
            "gain not yet reached at m (final + first − 2·acc(m) > 0, sign-flip); all p < 0.05")
    if len(records) == 0:
        return _na("early_exit", model, "no early-exit records", rule=rule, reported=reported)
    _require(records, ["id", "layer", "score"], "review_verdicts (early exit)")
    S = _matrix(records, "score")
    n, L = len(S), S.shape[1]
    if L < 3:
        return _na("early_exit", model, "fewer than three layers: no jump to locate", rule=rule, reported=reported)
    X = S.to_numpy()
    m = max(0, min(L - 2, math.ceil(0.45 * L) - 1))
    rise = stats.paired_test(X[:, -1] - X[:, 0], seed)
    if not (rise["mean"] > 0 and rise["p"] < ALPHA):
        return _na("early_exit", model, f"the early-exit curve is flat (final minus first layer {rise['mean']:+.3f}, "
                   f"{_fmt_p(rise['p'])}): no jump to locate", rule=rule, reported=reported, n=n)
    t = stats.paired_test(X[:, m + 1:].mean(axis=1) - X[:, :m + 1].mean(axis=1), seed)
    w = stats.paired_test(X[:, -1] + X[:, 0] - 2 * X[:, m], seed)
    curve = X.mean(axis=0)

    def late_minus_early(c):
        return c[m + 1:].mean() - c[:m + 1].mean()

    p_perm = stats.layer_permutation_p(curve, late_minus_early, fixed=[L - 1], seed=seed)
    p = max(t["p"], w["p"], p_perm)
    need = max(_needed(t["sd"], t["mean"], 1, 1.0), _needed(w["sd"], w["mean"], 1, 1.0))
    half = curve.min() + 0.5 * (curve[-1] - curve.min())
    jump = int(np.argmax(curve >= half))
    return _row("early_exit", model, rule=rule,
                chance="shuffled layers: accuracy after m equals accuracy up to m (0)",
                effect=f"accuracy {curve[:m + 1].mean():.2f} (layers 0-{m}) vs {curve[m + 1:].mean():.2f} (after); "
                       f"{curve[0]:.2f} → {curve[m]:.2f} (layer {m}) → {curve[-1]:.2f} (final); half-way at layer "
                       f"{jump} of {L} ({jump / L:.0%})",
                uncertainty=f"{_fmt_ci(t['lo'], t['hi'])}; sign-flip {_fmt_p(t['p'])}; shuffled layers "
                            f"{_fmt_p(p_perm)}; half-way after m: {_fmt_p(w['p'])}",
                n=n, needed=need,
                verdict=_decide_depth(min(t["mean"], w["mean"]), max(t["p"], w["p"]), p_perm, n, need),
                reported=reported,
                split=f"all {n} samples (nothing is selected)", p=p, value=t["mean"], ci=(t["lo"], t["hi"]))


def _hellinger(model, family, records, n_layers, margin, seed) -> dict:
    expect = family == "llava"
    reported = "rises again at ~29 (LLaVA); flat after ~24 (Qwen)"
    a, b = int(0.5 * n_layers), int(0.75 * n_layers)
    rule = (f"dev split picks the lowest layer in [{a}, {b}) and the highest in [{b}, {n_layers - 1}) (final "
            "excluded); on test, per-sample H(high) − H(low) " +
            ("> 0 (sign-flip p < 0.05)" if expect else f"< {margin} (one-sided test against that margin)"))
    if len(records) == 0:
        return _na("hellinger", model, "no Hellinger records", rule=rule, reported=reported)
    _require(records, ["id", "layer", "hellinger"], "review_verdicts (Hellinger)")
    H = _matrix(records, "hellinger")
    mid = [j for j in H.columns if a <= j < b]
    late = [j for j in H.columns if b <= j < n_layers - 1]
    if not mid or not late:
        return _na("hellinger", model, f"too few layers ({n_layers}) for a mid window and a late window before the "
                   "final layer", rule=rule, reported=reported)
    if float(np.nanmax(np.abs(H[mid + late].to_numpy() - H[mid + late].to_numpy().mean()))) < 1e-9:
        return _na("hellinger", model, "the Hellinger curve is flat: every layer's attention is the same distance "
                   "from the final layer's", rule=rule, reported=reported, n=len(H))
    dev_ids, test_ids, na = _split("hellinger", model, H.index, rule=rule, reported=reported, n=len(H))
    if na:
        return na
    lo_l = int(H.loc[dev_ids, mid].mean(axis=0).idxmin())
    hi_l = int(H.loc[dev_ids, late].mean(axis=0).idxmax())
    d = (H.loc[test_ids, hi_l] - H.loc[test_ids, lo_l]).to_numpy()
    t = stats.paired_test(d, seed)
    n_all, scale = len(H), len(H) / len(test_ids)
    if expect:
        need = _needed(t["sd"], t["mean"], 1, scale)
        v, p = _decide(t["mean"], t["p"], n_all, need, n_judged=len(test_ids)), t["p"]
    else:
        v, p, need = _decide_absence(t["mean"], t["sd"], margin, d, n_all, scale, seed)
    return _row("hellinger", model, rule=rule, chance="no late rise: 0 (a dev-picked peak on a flat curve does not "
                "replicate on test)",
                effect=f"H(layer {hi_l}) − H(layer {lo_l}) = {t['mean']:+.3f} on test",
                uncertainty=f"{_fmt_ci(t['lo'], t['hi'])}; " + (f"sign-flip {_fmt_p(p)}" if expect else
                                                                f"below {margin}: one-sided {_fmt_p(p)}"),
                n=len(test_ids), needed=need, verdict=v,
                reported=reported, split=stats.describe_split(len(dev_ids), len(test_ids)), p=p, value=t["mean"],
                ci=(t["lo"], t["hi"]))


# --- attention claims -----------------------------------------------------------------------------------------------

def attention_verdicts(model: str, records: pd.DataFrame, n_layers: int, *, seed: int = 0) -> list[dict]:
    """Verdicts on persistent irrelevant attention ("noise") and on relevant attention rising with depth.

    ``records``: the attention run's per-(sample, layer) records. The noise rule reads the per-sample row (the one
    with ``n_tokens``: ``persistent``, ``persistent_irrelevant`` and the sample's relevant share of tokens,
    ``relevant_area``, or failing that ``rel_mass / rel_ratio``); the rise rule reads ``rel_ratio`` per layer.

    >>> [r["verdict"] for r in attention_verdicts("m", pd.DataFrame(), 8)]
    ['n/a: the attention run has no records', 'n/a: the attention run has no records']
    """
    if records is None or len(records) == 0:
        return [_na("noise", model, "the attention run has no records"),
                _na("relevant_rises", model, "the attention run has no records")]
    return [_noise(model, records, n_layers, seed), _relevant_rises(model, records, n_layers, seed)]


def _noise(model, records, n_layers, seed) -> dict:
    reported = "irrelevant patches stay highlighted at every layer"
    rule = ("per sample with a persistent token (top-k at >= 75% of layers): irrelevant share of its persistent tokens "
            "minus 1 − relevant area (what a random token gives); mean > 0 with sign-flip p < 0.05")
    if "n_tokens" not in records.columns or "persistent" not in records.columns:
        raise ValueError("attention_verdicts needs the attention run's records (columns n_tokens, persistent, ...).")
    last = records.dropna(subset=["n_tokens"])
    if "persistent_irrelevant" not in last.columns or last["persistent_irrelevant"].isna().all():
        return _na("noise", model, "the image tokens have no relevance labels (no spatial grid, or a dataset "
                   "without relevant regions)", rule=rule, reported=reported, n=len(last))
    last = last.dropna(subset=["persistent_irrelevant"])
    n_persist = last["persistent"].apply(len).astype(float)
    if not (n_persist > 0).any():
        return _na("noise", model, "no token was persistent in any sample", rule=rule, reported=reported,
                   n=len(last))
    area = _relevant_area(last)
    ok = (n_persist > 0) & area.notna()
    if not ok.any():
        return _na("noise", model, "the records carry no per-sample relevant area ('relevant_area') to set chance by",
                   rule=rule, reported=reported, n=len(last))
    share = last.loc[ok, "persistent_irrelevant"].astype(float) / n_persist[ok]
    chance = 1.0 - area[ok]
    d = (share - chance).to_numpy()
    t = stats.paired_test(d, seed)
    n = int(ok.sum())
    need = _needed(t["sd"], t["mean"], 1, len(last) / n)
    return _row("noise", model, rule=rule, chance=f"1 − relevant area = {chance.mean():.3f}",
                effect=f"{share.mean():.3f} of persistent tokens irrelevant ({t['mean']:+.3f} vs chance; "
                       f"{n_persist[ok].mean():.1f} persistent tokens per sample)",
                uncertainty=f"{_fmt_ci(t['lo'], t['hi'])}; sign-flip {_fmt_p(t['p'])}", n=n, needed=need,
                verdict=_decide(t["mean"], t["p"], len(last), need, n_judged=n), reported=reported,
                split=f"all {n} samples with a persistent token (nothing is selected)", p=t["p"], value=t["mean"],
                ci=(t["lo"], t["hi"]))


def _relevant_area(last: pd.DataFrame) -> pd.Series:
    if "relevant_area" in last.columns:
        return last["relevant_area"].astype(float)
    if {"rel_mass", "rel_ratio"} <= set(last.columns):
        # rel_ratio = rel_mass / area, so the area comes back wherever some attention fell on relevant tokens
        ratio = last["rel_ratio"].astype(float)
        return (last["rel_mass"].astype(float) / ratio).where(ratio > 0)
    return pd.Series(np.nan, index=last.index)


def _relevant_rises(model, records, n_layers, seed) -> dict:
    reported = "rises with depth (peak near layer 20 of 32 in the example)"
    q = max(1, n_layers // 4)
    rule = (f"per sample, relevant attention / relevant area (1 = chance) averaged over the last {q} layers minus the "
            f"first {q}: > 0 (sign-flip), larger than with the layers shuffled (permutation), and the late ratio > 1 "
            "(sign-flip); all p < 0.05")
    if "rel_ratio" not in records.columns or records["rel_ratio"].isna().all():
        return _na("relevant_rises", model, "the image tokens have no relevance labels (no spatial grid, or a dataset "
                   "without relevant regions)", rule=rule, reported=reported)
    R = _matrix(records.dropna(subset=["rel_ratio"]), "rel_ratio")
    if R.empty or R.shape[1] < 2 * q:
        return _na("relevant_rises", model, "no sample has a relevance ratio at every layer", rule=rule,
                   reported=reported)
    X = R.to_numpy()
    early, late = X[:, :q].mean(axis=1), X[:, -q:].mean(axis=1)
    t = stats.paired_test(late - early, seed)
    above = stats.paired_test(late - 1.0, seed)
    curve = X.mean(axis=0)

    def rise(c):
        return c[-q:].mean() - c[:q].mean()

    p_perm = stats.layer_permutation_p(curve, rise, seed=seed)
    p = max(t["p"], p_perm, above["p"])
    n = len(R)
    need = max(_needed(t["sd"], t["mean"], 1, 1.0), _needed(above["sd"], above["mean"], 1, 1.0))
    v = _decide_depth(min(t["mean"], above["mean"]), max(t["p"], above["p"]), p_perm, n, need)
    return _row("relevant_rises", model, rule=rule, chance="ratio 1 at every layer; shuffled layers: rise 0",
                effect=f"ratio {early.mean():.2f} (first {q} layers) → {late.mean():.2f} (last {q}), peak at layer "
                       f"{int(np.argmax(curve))}",
                uncertainty=f"rise {_fmt_ci(t['lo'], t['hi'])}, {_fmt_p(t['p'])}; shuffled layers {_fmt_p(p_perm)}; "
                            f"late ratio > 1: {_fmt_p(above['p'])}",
                n=n, needed=need, verdict=v, reported=reported, split=f"all {n} samples (nothing is selected)", p=p,
                value=t["mean"], ci=(t["lo"], t["hi"]))


# --- the method -----------------------------------------------------------------------------------------------------

# the cache-reuse pass may differ from the first pass by float32 rounding; no edit that matters is this small
NOOP_TOL = 1e-4
PAPER_GAIN = 0.024  # the smallest average gain the paper reports (LLaVA-NeXT: +2.43 points)
PAPER_FUSION_MARGIN = 0.011  # fusion vs shallow candidate set in the paper's ablation (GQA: 69.4 vs 68.3)
_SETTING = ["variant", "candidates", "rho", "lam"]


def _settings(records: pd.DataFrame) -> pd.DataFrame:
    r = records.copy()
    for k in _SETTING:
        if k not in r.columns:
            r[k] = None
        r[k] = r[k].astype(object).where(r[k].notna(), "-")
    return r.drop_duplicates(subset=["id"] + _SETTING, keep="first")


def _noop(group: pd.DataFrame) -> str | None:
    """Why a setting is a no-op, or None when the records show it changed something.

    The contrastive run records, per soft-mask answer, ``dlogit`` (the largest change of a last-position logit the
    mask caused) and ``n_masked`` (image tokens masked); older records only allow comparing answers.
    """
    if (group["variant"] == "crop").all():
        return None  # a second image changes the input itself
    col = next((c for c in ("dlogit", "max_abs_dlogit") if c in group.columns and group[c].notna().any()), None)
    if col is not None:
        if "n_masked" in group.columns and (group["n_masked"].fillna(0) == 0).all():
            return "the soft mask chose no image token (n_masked = 0)"
        if float(group[col].abs().max()) <= NOOP_TOL:
            return "the soft mask changed no logit"
        return None
    if "plain_pred" in group.columns and (group["pred"].astype(str) == group["plain_pred"].astype(str)).all():
        return ("the soft mask changed no answer, and the records carry no 'dlogit' to tell a no-op from a null "
                "effect")
    return None


def _setting_name(key) -> str:
    variant, cands, rho, lam = key
    return f"{variant}, {cands}" + ("" if rho == "-" else f", ρ={rho}, λ={lam}")


def contrastive_verdicts(model: str, records: pd.DataFrame, *, fusion_from: str | None = None,
                         seed: int = 0) -> list[dict]:
    """Verdicts on the contrastive gain, the fusion candidate set and where I_A points.

    ``records``: per-sample records of one or more contrastive runs on the same samples (e.g. the chapter's main run
    and its ρ/λ grid, concatenated): ``id, variant, candidates, rho, lam, score, plain_score, pred, plain_pred`` and,
    where recorded, ``dlogit`` and ``n_masked`` (a soft mask that changed no logit gets no verdict) and the relevance
    columns. Settings are chosen on the dev split and judged on the test split. ``fusion_from``: which samples the
    fusion layers were picked on; the candidate-set verdict needs ``"dev"``.

    >>> rows = contrastive_verdicts("m", pd.DataFrame())
    >>> rows[0]["verdict"]
    'n/a: the contrastive run has no records'
    """
    if records is None or len(records) == 0:
        return [_na("contrastive_gain", model, "the contrastive run has no records", reported="+2.4 to +2.8 points")]
    _require(records, ["id", "variant", "candidates", "score", "plain_score"], "contrastive_verdicts")
    r = _settings(records)
    rows = [_gain(model, r, seed)]
    for variant in sorted(r["variant"].unique(), key=lambda v: (v != "soft", v)):
        row = _candidates(model, r[r["variant"] == variant], variant, fusion_from, seed)
        if row is not None:
            rows.append(row)
    rows.append(_ia_relevant(model, r, seed))
    return rows


def _gain(model, r: pd.DataFrame, seed) -> dict:
    reported = "+2.4 to +2.8 points"
    rule = ("the setting (variant, candidate set, ρ, λ) with the best gain on the dev split, judged on the test "
            "split: "
            "gain over plain decoding on the same questions > 0 with McNemar (0/1 scores) or sign-flip p < 0.05")
    # ordered by name, not by position in the records, so ties between settings break the same way every time
    groups = dict(sorted(r.groupby(_SETTING, sort=False), key=lambda kv: tuple(map(str, kv[0]))))
    noops = {k: _noop(g) for k, g in groups.items()}
    acting = [k for k in groups if noops[k] is None]
    if not acting:
        reasons = sorted(set(noops.values()))
        return _na("contrastive_gain", model, "; ".join(reasons), rule=rule, reported=reported)
    dev_ids, test_ids, na = _split("contrastive_gain", model, r["id"].tolist(), rule=rule, reported=reported)
    if na:
        return na
    dev, test = set(map(str, dev_ids)), set(map(str, test_ids))

    def gain_on(k, ids):
        g = groups[k]
        g = g[g["id"].astype(str).isin(ids)]
        return float((g["score"] - g["plain_score"]).mean()) if len(g) else float("-inf")

    best = max(acting, key=lambda k: (gain_on(k, dev), -acting.index(k)))
    g = groups[best]
    g = g[g["id"].astype(str).isin(test)]
    c = stats.compare_paired(g["score"].to_numpy(float), g["plain_score"].to_numpy(float), seed)
    n_all = r["id"].nunique()
    scale = n_all / max(1, len(g))
    need = c["needed"] * scale if c["mean"] > 0 else _paper_need(c, PAPER_GAIN) * scale
    skipped = [k for k in groups if noops[k] is not None]
    row = _row("contrastive_gain", model, rule=rule, chance="plain decoding on the same questions: +0",
                effect=f"{100 * c['mean']:+.1f} points on test with {_setting_name(best)} (dev gain "
                       f"{100 * gain_on(best, dev):+.1f}; chosen among {len(acting)} settings"
                       + (f", {len(skipped)} no-op settings skipped" if skipped else "") + ")",
                uncertainty=f"{c['test']} {_fmt_p(c['p'])}; {_fmt_ci(c['lo'], c['hi'], 100, ' points')}",
                n=len(g), needed=need, verdict=_decide(c["mean"], c["p"], n_all, need, n_judged=len(g)),
                reported=reported,
                split=stats.describe_split(len(dev_ids), len(test_ids)), p=c["p"], value=c["mean"],
                ci=(c["lo"], c["hi"]))
    row["setting"] = _setting_name(best)
    return row


def _paper_need(c: dict, delta: float) -> float:
    """Samples to detect the paper's effect ``delta`` at the discordance (or spread) these records show."""
    if c["test"].startswith("McNemar"):
        n = max(1, c["n"])
        discordant = max((c["b10"] + c["b01"]) / n, delta)
        return stats.mcnemar_n((discordant + delta) / 2, (discordant - delta) / 2)
    return stats.n_for_mean(c["sd"] if np.isfinite(c["sd"]) and c["sd"] > 0 else 2 * delta, delta)


def _candidates(model, r: pd.DataFrame, variant: str, fusion_from, seed) -> dict | None:
    reported = "fusion set best (GQA 69.4 vs shallow 68.3, all 65.4, deep 60.3)"
    rule = (f"{variant}: on the test split, the fusion candidate set beats every other set on the same questions "
            "(McNemar or sign-flip per pair, each p < 0.05); the fusion layers must come from the dev split")
    sets = r["candidates"].unique()
    if len(sets) < 2:
        return None
    if "fusion" not in sets:
        return _na("fusion_candidates", model, f"the {variant} runs have no 'fusion' candidate set", rule=rule,
                   reported=reported)
    # the (ρ, λ) pair shared by the most candidate sets: chosen from the design, never from the outcomes
    per = r.groupby(["rho", "lam"])["candidates"].nunique()
    rho, lam = per.idxmax()
    r = r[(r["rho"] == rho) & (r["lam"] == lam)]
    if r["candidates"].nunique() < 2:
        return None
    if fusion_from != "dev":
        return _na("fusion_candidates", model, "the fusion layers were not picked on the dev split "
                   f"(fusion_from={fusion_from!r}), so the fusion set would be judged on the samples it was chosen "
                   "from", rule=rule, reported=reported)
    fusion = r[r["candidates"] == "fusion"]
    why = _noop(fusion)
    if why is not None:
        return _na("fusion_candidates", model, why, rule=rule, reported=reported)
    _, test_ids = stats.split_ids(r["id"].tolist())
    test = set(map(str, test_ids))
    f = fusion[fusion["id"].astype(str).isin(test)].set_index("id")
    comps, same = {}, []
    for other in sorted(s for s in r["candidates"].unique() if s != "fusion"):
        o = r[(r["candidates"] == other) & r["id"].astype(str).isin(test)].set_index("id")
        ids = f.index.intersection(o.index)
        # a set that picks the same pre layer as the fusion set on every question gives the same I_A, so the same
        # answers: comparing them says nothing (e.g. the shallow half standing in when no fusion layer was found)
        if "pre_layer" in f.columns and len(ids) and (f.loc[ids, "pre_layer"] == o.loc[ids, "pre_layer"]).all():
            same.append(other)
        elif len(ids) >= 2:
            comps[other] = stats.compare_paired(f.loc[ids, "score"].to_numpy(float),
                                                o.loc[ids, "score"].to_numpy(float), seed)
    if not comps:
        why = (f"the fusion set picks the same pre layer as {same} on every test question" if same else
               "too few test samples shared by the candidate sets")
        return _na("fusion_candidates", model, why, rule=rule, reported=reported)
    n_all = r["id"].nunique()
    worst = min(comps, key=lambda k: comps[k]["mean"])
    p = max(c["p"] for c in comps.values())
    eff = comps[worst]["mean"]
    n_test = max(c["n"] for c in comps.values())
    scale = n_all / max(1, n_test)
    need = max((c["needed"] if c["mean"] > 0 else _paper_need(c, PAPER_FUSION_MARGIN)) for c in comps.values()) * scale
    v = _decide(eff, p, n_all, need, n_judged=n_test)
    diffs = ", ".join(f"{k} {100 * c['mean']:+.1f}" for k, c in comps.items())
    return _row("fusion_candidates", model, rule=rule,
                chance="every candidate set equal: 0 points between them",
                effect=f"fusion minus {diffs} points" + ("" if rho == "-" else f" (ρ={rho}, λ={lam})")
                       + (f"; not compared: {same} (same pre layer as fusion on every question)" if same else ""),
                uncertainty="; ".join(f"vs {k}: {c['test']} {_fmt_p(c['p'])}" for k, c in comps.items()),
                n=n_test, needed=need, verdict=v, reported=reported,
                split=stats.describe_split(*map(len, stats.split_ids(r["id"].tolist()))) +
                "; fusion layers picked on dev", p=p, value=eff, ci=(comps[worst]["lo"], comps[worst]["hi"]))


def _ia_relevant(model, r: pd.DataFrame, seed) -> dict:
    reported = "I_A picks out the question-relevant region (the paper's crops)"
    rule = ("per sample, the share of I_A's positive mass on relevant tokens minus the relevant area (what a map "
            "blind to relevance gives): mean > 0 with sign-flip p < 0.05")
    if not {"ia_relevant_mass", "relevant_area"} <= set(r.columns) or r["ia_relevant_mass"].isna().all():
        return _na("ia_relevant", model, "the image tokens have no relevance labels (no spatial grid, or a dataset "
                   "without relevant regions)", rule=rule, reported=reported)
    sets = list(r["candidates"].unique())
    cands = "fusion" if "fusion" in sets else sets[0]
    s = r[r["candidates"] == cands].drop_duplicates("id").dropna(subset=["ia_relevant_mass", "relevant_area"])
    if s.empty:
        return _na("ia_relevant", model, "I_A has no positive mass in any sample", rule=rule, reported=reported)
    d = (s["ia_relevant_mass"] - s["relevant_area"]).to_numpy(float)
    t = stats.paired_test(d, seed)
    n = len(s)
    need = _needed(t["sd"], t["mean"], 1, 1.0)
    post = ""
    if "post_relevant_mass" in s.columns and s["post_relevant_mass"].notna().any():
        post = f"; A_post alone {s['post_relevant_mass'].mean():.3f}"
    return _row("ia_relevant", model, rule=rule, chance=f"relevant area {s['relevant_area'].mean():.3f}",
                effect=f"{s['ia_relevant_mass'].mean():.3f} of I_A's positive mass on relevant tokens "
                       f"({t['mean']:+.3f} vs chance; candidates {cands}{post})",
                uncertainty=f"{_fmt_ci(t['lo'], t['hi'])}; sign-flip {_fmt_p(t['p'])}", n=n, needed=need,
                verdict=_decide(t["mean"], t["p"], n, need), reported=reported,
                split=f"all {n} samples (nothing is selected)", p=t["p"], value=t["mean"], ci=(t["lo"], t["hi"]))


# --- tables for the chapters ------------------------------------------------------------------------------------

def pick_examples(dataset, n: int) -> list:
    """Up to ``n`` samples, one per question family first (so figures show different kinds of question)."""
    chosen, seen = [], set()
    for s in dataset:
        if s.family not in seen:
            chosen.append(s)
            seen.add(s.family)
        if len(chosen) == n:
            return chosen
    rest = [s for s in dataset if s not in chosen]
    return (chosen + rest)[:n]


def _setting(row) -> str:
    if row["variant"] == "crop":
        return f"ours: crop ({row['candidates']})"
    return f"ours: soft ({row['candidates']})"


def method_table(runs: dict) -> pd.DataFrame:
    """model, method, accuracy: plain, each contrastive variant (fusion candidates), and each baseline."""
    rows = []
    for name, r in runs.items():
        base = r["base"].summary
        for _, b in base.iterrows():
            rows.append(dict(model=name, method=str(b["method"]), accuracy=float(b["accuracy"])))
        main = r["main"].summary
        for _, c in main[main["candidates"] == "fusion"].iterrows():
            rows.append(dict(model=name, method=_setting(c), accuracy=float(c["accuracy"])))
    return pd.DataFrame(rows)


def candidate_table(runs: dict) -> pd.DataFrame:
    rows = []
    for name, r in runs.items():
        s = r["main"].summary
        for _, c in s[s["variant"] == "soft"].iterrows():
            rows.append(dict(model=name, candidates=c["candidates"], accuracy=float(c["accuracy"]),
                             plain=float(c["plain_accuracy"]), gain=float(c["gain"])))
    return pd.DataFrame(rows)


def model_row(lm, found: dict, masking_summary: pd.DataFrame, contrastive: pd.DataFrame) -> dict:
    """One row of the across-models table.

    ``contrastive``: the contrastive run's per-sample records, so the gain shown is the dev-chosen setting's on the
    test split (as in the verdict); a summary table is still accepted and then gives the best setting's gain on all
    questions, which overstates it.
    """
    plain = float(masking_summary["plain_accuracy"].mean())
    setting, gain = None, None
    if len(contrastive) and "id" in contrastive.columns:
        row = _gain(label(lm), _settings(contrastive), 0)
        if row.get("setting") is not None:
            setting, gain = row["setting"], 100 * row["value"]
    elif len(contrastive):
        best = contrastive.sort_values("gain", ascending=False).iloc[0]
        setting, gain = f"{best['variant']} ({best['candidates']})", 100 * float(best["gain"])
    return dict(model=label(lm), arch=lm.spec.label, layers=lm.num_layers, fusion_layers=found.get("fusion_layers"),
                plateau_from=found.get("plateau_start"), review_layer=found.get("review_layer"),
                plain_accuracy=round(plain, 3), best_variant=setting,
                gain_points=None if gain is None else round(gain, 2), fingerprint=lm.fingerprint)


def reported_model_table() -> pd.DataFrame:
    """The paper's layer findings and gains per model family."""
    gains = {"llava": "LLaVA-1.5", "llava_next": "LLaVA-NeXT", "qwen2_5_vl": "Qwen2.5-VL"}
    from ..paper import MAIN_TABLE

    t = MAIN_TABLE.set_index("backbone")
    rows = []
    for arch, r in LAYERS.items():
        g = gains.get(arch)
        rows.append(dict(model=r["label"], layers=r["n_layers"], fusion_layers=r["fusion_layers"],
                         plateau_from=r["plateau_from"], review_layer=r["review_layer"],
                         base_accuracy=None if g is None else t.loc[g, "base"],
                         gain_points=None if g is None else round(t.loc[g, "ours"] - t.loc[g, "base"], 2)))
    return pd.DataFrame(rows)


def gain_table(table: pd.DataFrame) -> pd.DataFrame:
    """Our best gains and the paper's, as one table for a bar chart (gain in points)."""
    from ..paper import main_gains

    ours = [dict(model=r["model"], gain=r["gain_points"]) for _, r in table.iterrows() if r["gain_points"] is not None]
    rep = [dict(model=f"{r['backbone']} (reported)", gain=r["ours"]) for _, r in main_gains().iterrows()]
    return pd.DataFrame(ours + rep)


VERDICT_COLUMNS = ["claim", "model", "rule", "chance", "effect", "uncertainty", "n", "needed n", "verdict",
                   "reported", "split"]


def verdict_table(rows: list[dict]) -> pd.DataFrame:
    """The verdict rows as the chapters show them: claim, rule, chance level, effect, p-value or CI, n, the n the
    test would need (80% power, whole build), verdict, the paper's value and the dev/test split.

    >>> verdict_table([]).columns[:4].tolist()
    ['claim', 'model', 'rule', 'chance']
    """
    t = pd.DataFrame([{c: r.get(c, "") for c in VERDICT_COLUMNS} for r in rows], columns=VERDICT_COLUMNS)
    t["n"] = pd.to_numeric(t["n"], errors="coerce").astype("Int64")
    return t


# --- latency beside the paper's ---------------------------------------------------------------------------------

# our method names for each row of the paper's latency table; the first match in a measurement dict is used
LATENCY_ALIASES = {"SAM": ("sam",), "CLIP": ("clip",), "CD": ("vcd", "cd"), "ViCrop": ("vicrop",),
                   "OPERA": ("opera",), "ours": ("ours", "contrastive", "crop", "soft")}


def latency_table(ours: dict | None = None, *, reference: str = "ours") -> pd.DataFrame:
    """The paper's per-sample latency (GQA, one RTX A6000) beside ours, each also relative to its own ``reference``
    row so that numbers from different hardware can be compared.

    ``ours``: seconds per sample by method name (``plain``, ``vcd``, ``vicrop``, ``dola``, ``crop``/``soft``/``ours``,
    ...). Methods the paper does not time get a row with the paper's columns empty.

    >>> t = latency_table({"plain": 0.5, "vcd": 1.0, "crop": 0.8})
    >>> t = t.set_index("method")
    >>> float(t.loc["CD", "ours_s"]), float(t.loc["ours", "paper_s"]), float(t.loc["CD", "ours_rel"])
    (1.0, 1.392, 1.25)
    """
    ours = {str(k).lower(): float(v) for k, v in (ours or {}).items()}
    used, rows = set(), []
    for name, paper_s in LATENCY_S.items():
        key = next((a for a in LATENCY_ALIASES.get(name, (name.lower(),)) if a in ours), None)
        if key is not None:
            used.add(key)
        rows.append(dict(method=name, ours_as=key, paper_s=paper_s, ours_s=ours.get(key, float("nan"))))
    for key, v in ours.items():
        if key not in used:
            rows.append(dict(method=key, ours_as=key, paper_s=float("nan"), ours_s=v))
    t = pd.DataFrame(rows, columns=["method", "ours_as", "paper_s", "ours_s"])
    ref = t.set_index("method").loc[reference] if reference in set(t["method"]) else None
    t["paper_rel"] = t["paper_s"] / (ref["paper_s"] if ref is not None else float("nan"))
    t["ours_rel"] = t["ours_s"] / (ref["ours_s"] if ref is not None else float("nan"))
    return t


def latency_from_records(records: pd.DataFrame, *, method: str = "method", seconds: str = "seconds") -> dict:
    """Mean seconds per sample by method, from per-sample records that time each answer (``n/a`` -> empty dict).

    >>> latency_from_records(pd.DataFrame({"method": ["plain", "plain"], "seconds": [1.0, 3.0]}))
    {'plain': 2.0}
    """
    if records is None or len(records) == 0 or seconds not in records.columns or method not in records.columns:
        return {}
    return {str(k): float(v) for k, v in records.groupby(method)[seconds].mean().items()}


__all__ = ["pick_examples", "method_table", "candidate_table", "model_row", "reported_model_table", "gain_table",
           "usable_candidates", "check_params", "load_data", "iter_models", "label", "pick_layers", "dev_split",
           "fusion_verdicts", "review_verdicts", "attention_verdicts", "contrastive_verdicts", "verdict_table",
           "latency_table", "latency_from_records", "CLAIM_TEXT", "RULES", "VERDICT_COLUMNS", "REPRODUCES", "PARTLY",
           "NO", "INCONCLUSIVE", "NA", "LLAVA_FAMILY", "QWEN_FAMILY"]
