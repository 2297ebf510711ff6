"""Verdicts on where the image matters by depth: fusion layers, the plateau, the review layer, early exit and the
Hellinger distance to the final layer. Depths are relative (layer / number of layers), so the rules apply to any model."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..paper import EARLY_EXIT_FROM, LATE_FROM, LAYERS, REVIEW_LAYER, depth_fraction
from . import stats
from .stats import ALPHA
from .verdicts import (
    EARLY_EXIT_JUMP_SHARE,
    HELLINGER_RISE,
    INCONCLUSIVE,
    MIN_ACC_DROP,
    MIN_LOGPROB,
    NO,
    PLATEAU_MARGIN,
    REPRODUCES,
    decide,
    decide_absence,
    decide_depth,
    fmt_ci,
    fmt_p,
    groups_of,
    matrix,
    na_row,
    require,
    paper_family,
    split_rows,
    verdict_row,
)

#: the primary measure of the layer claims, declared before any data is seen: the paired per-sample change of the
#: gold answer's first-token log-probability (nats) when the records carry it, else the 0/1 score (older records)
MEASURES = {"logprob": ("plain_gold_logprob", "gold_logprob", MIN_LOGPROB, " nats",
                        "gold answer's first-token log-prob"),
            "accuracy": ("plain_score", "score", MIN_ACC_DROP, "", "accuracy")}


def measure_of(records: pd.DataFrame) -> str:
    cols = getattr(records, "columns", ())
    if {"gold_logprob", "plain_gold_logprob"} <= set(cols) and records["gold_logprob"].notna().any():
        return "logprob"
    return "accuracy"


def masking_drops(records: pd.DataFrame, mode: str | None, who: str, measure: str = "accuracy") -> pd.DataFrame:
    """Samples x layers of the drop the mask causes in ``measure`` (plain minus masked)."""
    require(records, ["id", "layer", "score", "plain_score"], who)
    plain, masked = MEASURES[measure][:2]
    r = records
    if mode is not None and "mode" in r.columns:
        r = r[r["mode"] == mode]
    r = r.assign(drop=r[plain].astype(float) - r[masked].astype(float))
    return matrix(r, "drop")


def late_layers(layers, n_layers: int) -> list[int]:
    return [j for j in layers if j >= math.ceil(depth_fraction(LATE_FROM) * n_layers)]


def pick_layers(found: dict, n_layers: int) -> tuple[list[int], int, str]:
    """Fusion layers and the layer the soft mask acts on, from a masking run's findings, with a note saying how
    they were chosen (no fusion layer found -> the shallow half; no review layer -> the paper's review depth, 0-based layer 28 of 32, the paper's 29).

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
                 f"no review layer found, so the soft mask acts at layer {apply_layer} (the paper's review depth: "
                 f"0-based layer {REVIEW_LAYER} of 32, the paper's {REVIEW_LAYER + 1})")
    return fusion, apply_layer, "; ".join(notes)


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
    reported = (f"fusion layers {list(rep['reported']['fusion_layers'])} of 32 as printed (indexing base unknown; "
                f"0-based {rep['fusion_layers']} if 1-based)" if rep.get("fusion_layers") else
                "few shallow fusion layers (LLaVA-1.5: 2, 4, 8, 11-13 of 32 as printed)")
    if records is None or len(records) == 0:
        return [na_row("fusion_shallow", model, "the masking run has no records", reported=reported),
                na_row("plateau", model, "the masking run has no records")]
    measure = measure_of(records)
    D = masking_drops(records, mode, "fusion_verdicts", measure)
    if D.empty:
        return [na_row("fusion_shallow", model, f"no sample has a masking record at every layer (mode {mode!r})",
                    reported=reported), na_row("plateau", model, "no complete masking curve")]
    A = masking_drops(records, mode, "fusion_verdicts").reindex(index=D.index, columns=D.columns)
    groups = groups_of(records)
    return [_fusion_shallow(model, D, A, measure, n_layers, threshold, reported, seed),
            _plateau(model, D, A, measure, n_layers, seed, groups)]


def _fusion_shallow(model, D: pd.DataFrame, A: pd.DataFrame, measure: str, n_layers: int, threshold: float,
                    reported: str, seed: int) -> dict:
    _, _, paper, unit, name = MEASURES[measure]
    rule = (f"primary measure: the per-sample drop of the {name} when masking a shallow-half layer minus a deep-half "
            f"layer; reproduces when its 95% CI lies above 0 (sign-flip p < 0.05) and the curve beats each sample's "
            f"layers shuffled (permutation p < 0.05); does not when the CI lies below {paper}{unit}, the smallest effect "
            "that supports the claim (the paper reports a collapse of accuracy)")
    layers = list(D.columns)
    shallow = [i for i, j in enumerate(layers) if j < n_layers / 2]
    deep = [i for i, j in enumerate(layers) if j >= n_layers / 2]
    n = len(D)
    split = f"all {n} samples (nothing is selected)"
    if not shallow or not deep:
        return na_row("fusion_shallow", model, "the masked layers do not cover both halves of depth", rule=rule,
                   reported=reported, n=n)
    curve, acc = D.mean(axis=0).to_numpy(), A.mean(axis=0).to_numpy()
    if not (D.to_numpy() != 0).any():
        return na_row("fusion_shallow", model, "masking the image changes nothing at any layer (the model does not use "
                   "the image here), so there is no fusion layer to place in depth", rule=rule, reported=reported,
                   n=n, chance="shuffled layers: 0")
    X = D.to_numpy()
    t = stats.paired_test(X[:, shallow].mean(axis=1) - X[:, deep].mean(axis=1), seed)

    def gap(c):
        return c[shallow].mean() - c[deep].mean()

    p_perm = stats.layer_shuffle_p(X, gap, seed=seed)
    v, need = decide_depth(t, paper, p_perm, n_total=n, unit=unit)
    fusion = [int(j) for j, c in zip(layers, acc) if c > threshold]
    return verdict_row("fusion_shallow", model, rule=rule,
                chance=f"each sample's layers shuffled: 0 in expectation (95% of shuffles below "
                       f"{stats.layer_shuffle_quantile(X, gap, seed=seed):+.3f})",
                effect=f"{name} drop {curve[shallow].mean():.3f} (shallow half) vs {curve[deep].mean():.3f} (deep "
                       f"half): {t['mean']:+.3f}{unit}; beside it, accuracy drop {acc[shallow].mean():.3f} vs "
                       f"{acc[deep].mean():.3f}; layers with accuracy drop > {threshold:.2f}: {fusion} of {n_layers}",
                uncertainty=f"{fmt_ci(t['lo'], t['hi'])}; sign-flip {fmt_p(t['p'])}; shuffled layers "
                            f"{fmt_p(p_perm)}",
                n=n, needed=need, verdict=v, reported=reported, split=split, p=max(t["p"], p_perm),
                value=t["mean"], ci=(t["lo"], t["hi"]), paper=paper, measure=name)


def _plateau(model, D: pd.DataFrame, A: pd.DataFrame, measure: str, n_layers: int, seed: int, groups: dict) -> dict:
    late_from = math.ceil(depth_fraction(LATE_FROM) * n_layers)
    _, _, _, unit, name = MEASURES[measure]
    margin = PLATEAU_MARGIN[measure]
    rule = (f"primary measure: the {name} drop masking causes; on test samples, the mean drop over layers >= "
            f"{late_from} (the dev split's review layer aside) lies below {margin}{unit} (95% CI) and below the "
            f"earlier layers' drop by more than {margin}{unit} (95% CI above 0, sign-flip p < 0.05)")
    reported = "masking barely matters after layer 18-20 of 32 (1-based)"
    layers = list(D.columns)
    late = late_layers(layers, n_layers)
    early = [j for j in layers if j < late_from]
    if not late or not early:
        return na_row("plateau", model, f"no masked layer on both sides of layer {late_from} (62.5% of depth)",
                   rule=rule, reported=reported)
    if not (D.to_numpy() != 0).any():
        return na_row("plateau", model, "masking the image changes nothing at any layer (the model does not use the "
                   "image here), so a plateau says nothing", rule=rule, reported=reported, n=len(D))
    ids = list(D.index)
    dev_ids, test_ids, na = split_rows("plateau", model, ids, rule=rule, reported=reported, n=len(ids), groups=groups)
    if na:
        return na
    dev_curve = D.loc[dev_ids, late].mean(axis=0)
    review = int(dev_curve.idxmax()) if dev_curve.max() > margin and len(late) > 1 else None
    keep = [j for j in late if j != review]
    T = D.loc[test_ids]
    e = T[keep].mean(axis=1).to_numpy()
    tc = stats.paired_test(T[early].mean(axis=1).to_numpy() - e, seed)
    v, te, need = decide_absence(e, margin, n_total=len(ids), seed=seed, unit=unit)
    if v == REPRODUCES:
        v, need = decide(tc, margin, n_total=len(ids), unit=unit)
    AT = A.loc[test_ids]
    return verdict_row("plateau", model, rule=rule,
                chance=f"shuffled layers: late drop = mean drop of all layers ({float(T.to_numpy().mean()):.3f})",
                effect=f"{name} drop {margin - te['mean']:+.3f}{unit} (late) vs {T[early].to_numpy().mean():+.3f} "
                       f"(earlier); beside it, accuracy drop {AT[keep].to_numpy().mean():+.3f} vs "
                       f"{AT[early].to_numpy().mean():+.3f}"
                       + ("" if review is None else f" (review layer {review}, picked on dev, excluded)"),
                uncertainty=f"late drop {fmt_ci(margin - te['hi'], margin - te['lo'])}, below {margin}: "
                            f"{fmt_p(te['p'])}; earlier minus late {fmt_ci(tc['lo'], tc['hi'])}, {fmt_p(tc['p'])}",
                n=len(test_ids), needed=need, verdict=v, reported=reported,
                split=stats.describe_split(len(dev_ids), len(test_ids)), p=max(te["p"], tc["p"]),
                value=margin - te["mean"], ci=(margin - te["hi"], margin - te["lo"]), paper=margin, measure=name)


def review_verdicts(model: str, arch: str, masking_records: pd.DataFrame | None, hellinger: pd.DataFrame | None,
                    early: pd.DataFrame | None, n_layers: int, *, threshold: float = 0.05, mode: str | None = "zero",
                    onward: bool = False, margin: float = HELLINGER_RISE, seed: int = 0) -> list[dict]:
    """Verdicts on the review layer, the early-exit jump and the late Hellinger rise, from per-sample records.

    ``masking_records``: a one-layer masking run's records (``id, layer, score, plain_score``); ``onward=True`` says
    the run masked from each layer onward, which cannot show a late dip. ``hellinger``: ``id, layer, hellinger``;
    ``early``: ``id, layer, score``. ``margin``: the Hellinger rise a model without a review layer stays below.

    >>> rows = review_verdicts("m", "qwen2_vl", None, None, None, 8)
    >>> rows[0]["verdict"].startswith("n/a")
    True
    """
    family = paper_family(arch)
    if family is None:
        rows = [na_row("review", model, f"the paper makes no review-layer claim for {arch!r} models")]
    else:
        rows = [_review(model, family, masking_records, n_layers, threshold, mode, onward, seed)]
    if early is not None:
        rows.append(_early_exit(model, early, n_layers, seed))
    if hellinger is not None:
        rows.append(_hellinger(model, family, hellinger, n_layers, margin, seed) if family is not None else
                    na_row("hellinger", model, f"the paper makes no late-Hellinger claim for {arch!r} models"))
    return rows


def _review(model, family, records, n_layers, threshold, mode, onward, seed) -> dict:
    expect = family == "llava"
    reported = (f"~29 of 32, 1-based (0-based {REVIEW_LAYER}; LLaVA family)" if expect else "none (Qwen2/2.5-VL)")
    late_from = math.ceil(depth_fraction(LATE_FROM) * n_layers)
    measure = measure_of(records) if records is not None and len(records) else "accuracy"
    _, _, paper, unit, name = MEASURES[measure]
    rule = (f"primary measure: the {name} drop masking causes; the layer >= {late_from} with the largest drop on the "
            "dev split; on test, its drop minus the other late layers' " +
            (f"has a 95% CI above 0 (sign-flip p < 0.05), not wholly below {paper}{unit}, at >= 75% of depth"
             if expect else f"has a 95% CI below {paper}{unit} (no review layer)"))
    if onward or (records is not None and "onward" in getattr(records, "columns", ()) and records["onward"].any()):
        return na_row("review", model, "a mask kept from each layer onward hides the image from every later layer, so "
                   "it cannot show a late dip; use the one-layer probe", rule=rule, reported=reported)
    if records is None or len(records) == 0:
        return na_row("review", model, "no masking records", rule=rule, reported=reported)
    D = masking_drops(records, mode, "review_verdicts", measure)
    late = late_layers(list(D.columns), n_layers)
    if len(late) < 2:
        return na_row("review", model, f"fewer than two masked layers after {late_from} of {n_layers}: a review layer "
                   "cannot be told from the plateau", rule=rule, reported=reported)
    if not (D.to_numpy() != 0).any():
        return na_row("review", model, "masking the image changes nothing at any layer (the model does not use the "
                   "image here)", rule=rule, reported=reported, n=len(D))
    dev_ids, test_ids, na = split_rows("review", model, D.index, rule=rule, reported=reported, n=len(D),
                                       groups=groups_of(records))
    if na:
        return na
    r = int(D.loc[dev_ids, late].mean(axis=0).idxmax())
    others = [j for j in late if j != r]
    T = D.loc[test_ids]
    d = (T[r] - T[others].mean(axis=1)).to_numpy()
    t = stats.paired_test(d, seed)
    n_all = len(D)
    AT = masking_drops(records, mode, "review_verdicts").reindex(index=T.index, columns=T.columns)
    effect = (f"layer {r} of {n_layers} (dev pick): test {name} drop {T[r].mean():+.3f} vs "
              f"{T[others].to_numpy().mean():+.3f}{unit} (other late layers); beside it, accuracy drop "
              f"{AT[r].mean():+.3f} vs {AT[others].to_numpy().mean():+.3f}")
    if expect:
        v, need = decide(t, paper, n_total=n_all, unit=unit)
        if v == REPRODUCES and r < 0.75 * n_layers:
            v = f"{NO} (the dip is at layer {r}, before 75% of depth)"
        p = t["p"]
    else:
        v, ta, need = decide_absence(d, paper, n_total=n_all, seed=seed, unit=unit)
        p = ta["p"]
    return verdict_row("review", model, rule=rule,
                chance="shuffled layers: the dev-picked layer drops no more than the other late layers on test (0)",
                effect=effect, uncertainty=f"{fmt_ci(t['lo'], t['hi'])}; sign-flip {fmt_p(t['p'])}",
                n=len(test_ids), needed=need, verdict=v, reported=reported,
                split=stats.describe_split(len(dev_ids), len(test_ids)), p=p, value=t["mean"],
                ci=(t["lo"], t["hi"]), paper=paper, measure=name)


def _early_exit(model, records, n_layers, seed) -> dict:
    reported = f"jump after ~18 of 32, 1-based (0-based from {EARLY_EXIT_FROM})"
    if len(records) == 0:
        return na_row("early_exit", model, "no early-exit records", rule=RULES_EARLY, reported=reported)
    require(records, ["id", "layer", "score"], "review_verdicts (early exit)")
    lp = "gold_logprob" in records.columns and records["gold_logprob"].notna().any()
    name, col = ("gold answer's first-token log-prob", "gold_logprob") if lp else ("accuracy", "score")
    rule = (f"primary measure: each layer's {name}, read off by early exit (independent of the batch); with m the "
            "last layer below 45% of depth, per sample the straight line from the first to the final layer minus the "
            f"curve, averaged over layers 1..m (a jump sits below the line, a linear ramp on it), has a 95% CI above "
            f"0 (sign-flip p < 0.05) and not wholly below {EARLY_EXIT_JUMP_SHARE} of the first-to-final rise; and "
            "the layers after m beat the layers up to m beyond shuffled layers (permutation, final fixed)")
    S = matrix(records, col)
    n, L = len(S), S.shape[1]
    if L < 3:
        return na_row("early_exit", model, "fewer than three layers: no jump to locate", rule=rule, reported=reported)
    X = S.to_numpy()
    m = max(1, min(L - 2, math.ceil(0.45 * L) - 1))
    rise = stats.paired_test(X[:, -1] - X[:, 0], seed)
    if not (rise["mean"] > 0 and (rise["p"] < ALPHA or n < stats.min_n_sign_test())):
        return na_row("early_exit", model, f"the early-exit curve is flat (final minus first layer {rise['mean']:+.3f}, "
                   f"{fmt_p(rise['p'])}): no jump to locate", rule=rule, reported=reported, n=n)
    frac = np.arange(1, m + 1) / (L - 1)
    chord = X[:, :1] + frac[None, :] * (X[:, -1:] - X[:, :1])
    t = stats.paired_test((chord - X[:, 1:m + 1]).mean(axis=1), seed)
    paper = EARLY_EXIT_JUMP_SHARE * rise["mean"]
    curve = X.mean(axis=0)

    def late_minus_early(c):
        return c[m + 1:].mean() - c[:m + 1].mean()

    p_perm = stats.layer_shuffle_p(X, late_minus_early, fixed=[L - 1], seed=seed)
    v, need = decide_depth(t, paper, p_perm, n_total=n)
    half = curve.min() + 0.5 * (curve[-1] - curve.min())
    jump = int(np.argmax(curve >= half))
    acc = matrix(records, "score").to_numpy().mean(axis=0) if lp else curve
    return verdict_row("early_exit", model, rule=rule,
                chance="a linear ramp (the curve on the straight line: 0) and shuffled layers",
                effect=f"{name} {curve[0]:.2f} → {curve[m]:.2f} (layer {m}) → {curve[-1]:.2f} (final); below the "
                       f"straight line by {t['mean']:+.3f} up to layer {m} (the claim needs {paper:+.3f}); half-way "
                       f"at layer {jump} of {L} ({jump / L:.0%}); beside it, accuracy {acc[0]:.2f} → {acc[m]:.2f} → "
                       f"{acc[-1]:.2f}",
                uncertainty=f"{fmt_ci(t['lo'], t['hi'])}; sign-flip {fmt_p(t['p'])}; shuffled layers {fmt_p(p_perm)}",
                n=n, needed=need, verdict=v, reported=reported, split=f"all {n} samples (nothing is selected)",
                p=max(t["p"], p_perm), value=t["mean"], ci=(t["lo"], t["hi"]), paper=paper, measure=name)


RULES_EARLY = "the early-exit curve stays below the straight line up to 45% of depth, beyond shuffled layers"


def _hellinger(model, family, records, n_layers, margin, seed) -> dict:
    expect = family == "llava"
    reported = "rises again at ~29 (LLaVA); flat after ~24 (Qwen)"
    a, b = int(0.5 * n_layers), int(0.75 * n_layers)
    rule = (f"dev split picks the lowest layer in [{a}, {b}) and the highest in [{b}, {n_layers - 1}) (final "
            "excluded); on test, per-sample H(high) − H(low) " +
            (f"has a 95% CI above 0 (sign-flip p < 0.05), not wholly below {margin}" if expect else
             f"has a 95% CI below {margin}"))
    if len(records) == 0:
        return na_row("hellinger", model, "no Hellinger records", rule=rule, reported=reported)
    require(records, ["id", "layer", "hellinger"], "review_verdicts (Hellinger)")
    H = matrix(records, "hellinger")
    mid = [j for j in H.columns if a <= j < b]
    late = [j for j in H.columns if b <= j < n_layers - 1]
    if not mid or not late:
        return na_row("hellinger", model, f"too few layers ({n_layers}) for a mid window and a late window before the "
                   "final layer", rule=rule, reported=reported)
    if float(np.nanmax(np.abs(H[mid + late].to_numpy() - H[mid + late].to_numpy().mean()))) < 1e-9:
        return na_row("hellinger", model, "the Hellinger curve is flat: every layer's attention is the same distance "
                   "from the final layer's", rule=rule, reported=reported, n=len(H))
    dev_ids, test_ids, na = split_rows("hellinger", model, H.index, rule=rule, reported=reported, n=len(H),
                                       groups=groups_of(records))
    if na:
        return na
    lo_l = int(H.loc[dev_ids, mid].mean(axis=0).idxmin())
    hi_l = int(H.loc[dev_ids, late].mean(axis=0).idxmax())
    d = (H.loc[test_ids, hi_l] - H.loc[test_ids, lo_l]).to_numpy()
    t = stats.paired_test(d, seed)
    n_all = len(H)
    if expect:
        (v, need), p = decide(t, margin, n_total=n_all), t["p"]
    else:
        v, ta, need = decide_absence(d, margin, n_total=n_all, seed=seed)
        p = ta["p"]
    return verdict_row("hellinger", model, rule=rule, chance="no late rise: 0 (a dev-picked peak on a flat curve does not "
                "replicate on test)",
                effect=f"H(layer {hi_l}) − H(layer {lo_l}) = {t['mean']:+.3f} on test",
                uncertainty=f"{fmt_ci(t['lo'], t['hi'])}; sign-flip {fmt_p(t['p'])}",
                n=len(test_ids), needed=need, verdict=v,
                reported=reported, split=stats.describe_split(len(dev_ids), len(test_ids)), p=p, value=t["mean"],
                ci=(t["lo"], t["hi"]), paper=margin, measure="Hellinger distance to the final layer")
