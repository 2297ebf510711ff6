"""Verdicts on where the image matters by depth: fusion layers, the plateau, the review layer, early exit and the
Hellinger distance to the final layer. Depths are relative (layer / number of layers), so the rules apply to any model."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..paper import LAYERS
from . import stats
from .stats import ALPHA
from .verdicts import (  # noqa
    INCONCLUSIVE,
    NO,
    REPRODUCES,
    decide,
    decide_absence,
    decide_depth,
    fmt_ci,
    fmt_p,
    matrix,
    na_row,
    needed,
    require,
    paper_family,
    verdict_row,
    split_rows,
)


def masking_drops(records: pd.DataFrame, mode: str | None, who: str) -> pd.DataFrame:
    require(records, ["id", "layer", "score", "plain_score"], who)
    r = records
    if mode is not None and "mode" in r.columns:
        r = r[r["mode"] == mode]
    r = r.assign(drop=r["plain_score"].astype(float) - r["score"].astype(float))
    return matrix(r, "drop")


def late_layers(layers, n_layers: int) -> list[int]:
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
        return [na_row("fusion_shallow", model, "the masking run has no records", reported=reported),
                na_row("plateau", model, "the masking run has no records")]
    D = masking_drops(records, mode, "fusion_verdicts")
    if D.empty:
        return [na_row("fusion_shallow", model, f"no sample has a masking record at every layer (mode {mode!r})",
                    reported=reported), na_row("plateau", model, "no complete masking curve")]
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
        return na_row("fusion_shallow", model, "the masked layers do not cover both halves of depth", rule=rule,
                   reported=reported, n=n)
    curve = D.mean(axis=0).to_numpy()
    if not (curve > threshold).any():
        return na_row("fusion_shallow", model, f"no layer's masking drops accuracy by more than {threshold:.2f}, so there "
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
        v = decide_depth(t["mean"], t["p"], p_perm, n, needed(t["sd"], t["mean"], 1, 1.0))
    fusion = [int(j) for j, c in zip(layers, curve) if c > threshold]
    return verdict_row("fusion_shallow", model, rule=rule,
                chance=f"shuffled layers: 0 in expectation (95% of shuffles below "
                       f"{_perm_quantile(curve, gap, seed):+.3f})",
                effect=f"drop {curve[shallow].mean():.3f} (shallow half) vs {curve[deep].mean():.3f} (deep half): "
                       f"{t['mean']:+.3f}; layers with drop > {threshold:.2f}: {fusion} of {n_layers}",
                uncertainty=f"{fmt_ci(t['lo'], t['hi'])}; sign-flip {fmt_p(t['p'])}; shuffled layers "
                            f"{fmt_p(p_perm)}",
                n=n, needed=needed(t["sd"], t["mean"], 1, 1.0), verdict=v, reported=reported, split=split, p=p,
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
    late = late_layers(layers, n_layers)
    early = [j for j in layers if j < late_from]
    if not late or not early:
        return na_row("plateau", model, f"no masked layer on both sides of layer {late_from} (62.5% of depth)",
                   rule=rule, reported=reported)
    if not (D.to_numpy() != 0).any():
        return na_row("plateau", model, "masking the image changes no answer at any layer (the model does not use the "
                   "image here), so a plateau says nothing", rule=rule, reported=reported, n=len(D))
    ids = list(D.index)
    dev_ids, test_ids, na = split_rows("plateau", model, ids, rule=rule, reported=reported, n=len(ids))
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
    v_abs, p_below, need_abs = decide_absence(te["mean"], te["sd"], threshold, e, len(ids), scale, seed)
    need_c = needed(tc["sd"], tc["mean"], 1, scale)
    need = max(need_abs, need_c)
    p = max(p_below, tc["p"])
    if v_abs == REPRODUCES:
        v = decide(tc["mean"], tc["p"], len(ids), need_c, n_judged=len(test_ids))
    else:
        v = v_abs
    return verdict_row("plateau", model, rule=rule,
                chance=f"shuffled layers: late drop = mean drop of all layers ({float(T.to_numpy().mean()):.3f})",
                effect=f"late drop {te['mean']:+.3f} vs earlier layers {T[early].to_numpy().mean():+.3f}"
                       + ("" if review is None else f" (review layer {review}, picked on dev, excluded)"),
                uncertainty=f"late drop {fmt_ci(te['lo'], te['hi'])}, below {threshold:.2f}: one-sided "
                            f"{fmt_p(p_below)}; below earlier layers: {fmt_p(tc['p'])}",
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
    reported = "~29 of 32 (LLaVA family)" if expect else "none (Qwen2/2.5-VL)"
    late_from = math.ceil(0.625 * n_layers)
    rule = (f"the layer >= {late_from} whose masking drops accuracy most on the dev split; on test, its drop minus the "
            "other late layers' (sign-flip) " + ("> 0 with p < 0.05 and the layer at >= 75% of depth" if expect else
                                                 f"< {threshold:.2f} (one-sided test against that margin)"))
    if onward or (records is not None and "onward" in getattr(records, "columns", ()) and records["onward"].any()):
        return na_row("review", model, "a mask kept from each layer onward hides the image from every later layer, so "
                   "it cannot show a late dip; use the one-layer probe", rule=rule, reported=reported)
    if records is None or len(records) == 0:
        return na_row("review", model, "no masking records", rule=rule, reported=reported)
    D = masking_drops(records, mode, "review_verdicts")
    late = late_layers(list(D.columns), n_layers)
    if len(late) < 2:
        return na_row("review", model, f"fewer than two masked layers after {late_from} of {n_layers}: a review layer "
                   "cannot be told from the plateau", rule=rule, reported=reported)
    if not (D.to_numpy() != 0).any():
        return na_row("review", model, "masking the image changes no answer at any layer (the model does not use the "
                   "image here)", rule=rule, reported=reported, n=len(D))
    dev_ids, test_ids, na = split_rows("review", model, D.index, rule=rule, reported=reported, n=len(D))
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
        need = needed(t["sd"], t["mean"], 1, scale)
        v = decide(t["mean"], t["p"], n_all, need, n_judged=len(test_ids))
        if v == REPRODUCES and r < 0.75 * n_layers:
            v = f"{NO} (the dip is at layer {r}, before 75% of depth)"
        p = t["p"]
    else:
        v, p, need = decide_absence(t["mean"], t["sd"], threshold, d, n_all, scale, seed)
    return verdict_row("review", model, rule=rule, chance=chance, effect=effect,
                uncertainty=f"{fmt_ci(t['lo'], t['hi'])}; " + (f"sign-flip {fmt_p(p)}" if expect else
                                                                f"below {threshold:.2f}: one-sided {fmt_p(p)}"),
                n=len(test_ids), needed=need, verdict=v, reported=reported, split=split, p=p, value=t["mean"],
                ci=(t["lo"], t["hi"]))


def _early_exit(model, records, n_layers, seed) -> dict:
    reported = "jump after ~18 of 32 (56%)"
    rule = ("with m the last layer below 45% of depth: per sample, mean accuracy after m minus up to m > 0 (sign-flip) "
            "and larger than with the layers shuffled (permutation, final layer fixed), and half the first-to-final "
            "gain not yet reached at m (final + first − 2·acc(m) > 0, sign-flip); all p < 0.05")
    if len(records) == 0:
        return na_row("early_exit", model, "no early-exit records", rule=rule, reported=reported)
    require(records, ["id", "layer", "score"], "review_verdicts (early exit)")
    S = matrix(records, "score")
    n, L = len(S), S.shape[1]
    if L < 3:
        return na_row("early_exit", model, "fewer than three layers: no jump to locate", rule=rule, reported=reported)
    X = S.to_numpy()
    m = max(0, min(L - 2, math.ceil(0.45 * L) - 1))
    rise = stats.paired_test(X[:, -1] - X[:, 0], seed)
    if not (rise["mean"] > 0 and rise["p"] < ALPHA):
        return na_row("early_exit", model, f"the early-exit curve is flat (final minus first layer {rise['mean']:+.3f}, "
                   f"{fmt_p(rise['p'])}): no jump to locate", rule=rule, reported=reported, n=n)
    t = stats.paired_test(X[:, m + 1:].mean(axis=1) - X[:, :m + 1].mean(axis=1), seed)
    w = stats.paired_test(X[:, -1] + X[:, 0] - 2 * X[:, m], seed)
    curve = X.mean(axis=0)

    def late_minus_early(c):
        return c[m + 1:].mean() - c[:m + 1].mean()

    p_perm = stats.layer_permutation_p(curve, late_minus_early, fixed=[L - 1], seed=seed)
    p = max(t["p"], w["p"], p_perm)
    need = max(needed(t["sd"], t["mean"], 1, 1.0), needed(w["sd"], w["mean"], 1, 1.0))
    half = curve.min() + 0.5 * (curve[-1] - curve.min())
    jump = int(np.argmax(curve >= half))
    return verdict_row("early_exit", model, rule=rule,
                chance="shuffled layers: accuracy after m equals accuracy up to m (0)",
                effect=f"accuracy {curve[:m + 1].mean():.2f} (layers 0-{m}) vs {curve[m + 1:].mean():.2f} (after); "
                       f"{curve[0]:.2f} → {curve[m]:.2f} (layer {m}) → {curve[-1]:.2f} (final); half-way at layer "
                       f"{jump} of {L} ({jump / L:.0%})",
                uncertainty=f"{fmt_ci(t['lo'], t['hi'])}; sign-flip {fmt_p(t['p'])}; shuffled layers "
                            f"{fmt_p(p_perm)}; half-way after m: {fmt_p(w['p'])}",
                n=n, needed=need,
                verdict=decide_depth(min(t["mean"], w["mean"]), max(t["p"], w["p"]), p_perm, n, need),
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
    dev_ids, test_ids, na = split_rows("hellinger", model, H.index, rule=rule, reported=reported, n=len(H))
    if na:
        return na
    lo_l = int(H.loc[dev_ids, mid].mean(axis=0).idxmin())
    hi_l = int(H.loc[dev_ids, late].mean(axis=0).idxmax())
    d = (H.loc[test_ids, hi_l] - H.loc[test_ids, lo_l]).to_numpy()
    t = stats.paired_test(d, seed)
    n_all, scale = len(H), len(H) / len(test_ids)
    if expect:
        need = needed(t["sd"], t["mean"], 1, scale)
        v, p = decide(t["mean"], t["p"], n_all, need, n_judged=len(test_ids)), t["p"]
    else:
        v, p, need = decide_absence(t["mean"], t["sd"], margin, d, n_all, scale, seed)
    return verdict_row("hellinger", model, rule=rule, chance="no late rise: 0 (a dev-picked peak on a flat curve does not "
                "replicate on test)",
                effect=f"H(layer {hi_l}) − H(layer {lo_l}) = {t['mean']:+.3f} on test",
                uncertainty=f"{fmt_ci(t['lo'], t['hi'])}; " + (f"sign-flip {fmt_p(p)}" if expect else
                                                                f"below {margin}: one-sided {fmt_p(p)}"),
                n=len(test_ids), needed=need, verdict=v,
                reported=reported, split=stats.describe_split(len(dev_ids), len(test_ids)), p=p, value=t["mean"],
                ci=(t["lo"], t["hi"]))
