"""Verdicts on attention evolution: persistent attention to irrelevant image tokens (noise) and attention to the
question-relevant region rising with depth."""
from __future__ import annotations

import numpy as np
import pandas as pd

from . import stats
from .verdicts import (
    NOISE_EXCESS,
    RELEVANT_RISE,
    REPRODUCES,
    decide,
    decide_depth,
    fmt_ci,
    fmt_p,
    matrix,
    na_row,
    verdict_row,
)


def attention_verdicts(model: str, records: pd.DataFrame, n_layers: int, *, seed: int = 0) -> list[dict]:
    """Verdicts on persistent irrelevant attention ("noise") and on relevant attention rising with depth.

    ``records``: the attention run's per-(sample, layer) records. The noise rule reads the per-sample row (the one
    with ``n_tokens``: ``persistent``, ``persistent_irrelevant`` and the sample's relevant share of tokens,
    ``relevant_area``, or failing that ``rel_mass / rel_ratio``); the rise rule reads ``rel_ratio`` per layer.

    >>> [r["verdict"] for r in attention_verdicts("m", pd.DataFrame(), 8)]
    ['n/a: the attention run has no records', 'n/a: the attention run has no records']
    """
    if records is None or len(records) == 0:
        return [na_row("noise", model, "the attention run has no records"),
                na_row("relevant_rises", model, "the attention run has no records")]
    return [_noise(model, records, n_layers, seed), _relevant_rises(model, records, n_layers, seed)]


def _noise(model, records, n_layers, seed) -> dict:
    reported = "irrelevant patches stay highlighted at every layer"
    rule = ("per sample with a persistent token (top-k at >= 75% of layers): irrelevant share of its persistent tokens "
            "minus 1 − relevant area (what a random token gives); 95% CI above 0 (sign-flip p < 0.05) and not wholly "
            f"below {NOISE_EXCESS}, the smallest excess that supports the claim (the paper shows maps, no number)")
    if "n_tokens" not in records.columns or "persistent" not in records.columns:
        raise ValueError("attention_verdicts needs the attention run's records (columns n_tokens, persistent, ...).")
    last = records.dropna(subset=["n_tokens"])
    if "persistent_irrelevant" not in last.columns or last["persistent_irrelevant"].isna().all():
        return na_row("noise", model, "the image tokens have no relevance labels (no spatial grid, or a dataset "
                   "without relevant regions)", rule=rule, reported=reported, n=len(last))
    last = last.dropna(subset=["persistent_irrelevant"])
    n_persist = last["persistent"].apply(len).astype(float)
    if not (n_persist > 0).any():
        return na_row("noise", model, "no token was persistent in any sample", rule=rule, reported=reported,
                   n=len(last))
    area = _relevant_area(last)
    ok = (n_persist > 0) & area.notna()
    if not ok.any():
        return na_row("noise", model, "the records carry no per-sample relevant area ('relevant_area') to set chance by",
                   rule=rule, reported=reported, n=len(last))
    share = last.loc[ok, "persistent_irrelevant"].astype(float) / n_persist[ok]
    chance = 1.0 - area[ok]
    d = (share - chance).to_numpy()
    t = stats.paired_test(d, seed)
    n = int(ok.sum())
    v, need = decide(t, NOISE_EXCESS, n_total=len(last), n_judged=n)
    return verdict_row("noise", model, rule=rule, chance=f"1 − relevant area = {chance.mean():.3f}",
                effect=f"{share.mean():.3f} of persistent tokens irrelevant ({t['mean']:+.3f} vs chance; "
                       f"{n_persist[ok].mean():.1f} persistent tokens per sample)",
                uncertainty=f"{fmt_ci(t['lo'], t['hi'])}; sign-flip {fmt_p(t['p'])}", n=n, needed=need,
                verdict=v, reported=reported,
                split=f"all {n} samples with a persistent token (nothing is selected)", p=t["p"], value=t["mean"],
                ci=(t["lo"], t["hi"]), paper=NOISE_EXCESS, measure="irrelevant share of persistent tokens")


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
            f"first {q}: 95% CI above 0 (sign-flip p < 0.05) and not wholly below {RELEVANT_RISE}, larger than with the "
            "layers shuffled (permutation p < 0.05), and the late ratio's CI above 1")
    if "rel_ratio" not in records.columns or records["rel_ratio"].isna().all():
        return na_row("relevant_rises", model, "the image tokens have no relevance labels (no spatial grid, or a dataset "
                   "without relevant regions)", rule=rule, reported=reported)
    R = matrix(records.dropna(subset=["rel_ratio"]), "rel_ratio")
    if R.empty or R.shape[1] < 2 * q:
        return na_row("relevant_rises", model, "no sample has a relevance ratio at every layer", rule=rule,
                   reported=reported)
    X = R.to_numpy()
    early, late = X[:, :q].mean(axis=1), X[:, -q:].mean(axis=1)
    t = stats.paired_test(late - early, seed)
    above = stats.paired_test(late - 1.0, seed)
    curve = X.mean(axis=0)

    def rise(c):
        return c[-q:].mean() - c[:q].mean()

    p_perm = stats.layer_shuffle_p(X, rise, seed=seed)
    p = max(t["p"], p_perm, above["p"])
    n = len(R)
    v, need = decide_depth(t, RELEVANT_RISE, p_perm, n_total=n)
    if v == REPRODUCES:
        v, need = decide(above, None, n_total=n)
        v = v if v == REPRODUCES else f"{v}; the late ratio is not above chance"
    return verdict_row("relevant_rises", model, rule=rule, chance="ratio 1 at every layer; shuffled layers: rise 0",
                effect=f"ratio {early.mean():.2f} (first {q} layers) → {late.mean():.2f} (last {q}), peak at layer "
                       f"{int(np.argmax(curve))}",
                uncertainty=f"rise {fmt_ci(t['lo'], t['hi'])}, {fmt_p(t['p'])}; shuffled layers {fmt_p(p_perm)}; "
                            f"late ratio > 1: {fmt_p(above['p'])}",
                n=n, needed=need, verdict=v, reported=reported, split=f"all {n} samples (nothing is selected)", p=p,
                value=t["mean"], ci=(t["lo"], t["hi"]), paper=RELEVANT_RISE,
                measure="relevant attention / relevant area")
