"""The atlas (issue 31): one model's fusion profile, review-layer inputs and persistent-noise share, on relative depth.

Nothing here is new math. For one model the atlas composes two experiments of the paper:

- ``masking`` (Sec. 3) with the one-layer zero probe: the fusion profile (accuracy drop per masked layer), its
  fusion layers, plateau start and review layer (`masking.find_layers`); its per-sample records are what
  `fusion_utils.report.review_verdicts` tests the review layer on;
- ``attention`` (Sec. 4): the persistent-noise share (`attention.persistent_noise`), the share of persistent top-k
  tokens that are irrelevant, with the chance level 1 − relevant area that `report.attention_verdicts` compares it
  with.

`atlas` runs the two through the harness, each in its own run directory keyed by its configuration: a chapter that
ran the same configuration shares its records, and a rerun resumes where it stopped. The registered spec
``atlas`` runs both per-batch functions on each batch instead (one run directory; ``fusion-utils run atlas``); both
give the same records, tagged ``part`` = "masking" or "attention", and the same summary and row.

Depth is relative: ``rel_depth = layer / n_layers`` (0-based layers), so models of any depth share one axis.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from . import attention as attention_exp
from . import masking as masking_exp
from .common import Decoding, ExperimentResult
from .harness import Context, Spec, register, run

PROFILE_MODE = "zero"  # the fusion profile is the one-layer zero curve (the paper's probe read per layer)


@dataclass(frozen=True)
class AtlasParams:
    """``modes``: masking modes to run (the profile reads ``"zero"``; add ``"knockout"`` to share the fusion chapter's
    run); ``decode``: masking's answer decoding (``"first_token"`` is cheaper); ``k``/``persist``: the attention
    experiment's top-k size and persistence share; ``threshold``: the drop that makes a fusion layer."""

    modes: Sequence[str] = (PROFILE_MODE,)
    decode: str = "generate"
    k: int = 5
    persist: float = 0.75
    threshold: float = 0.05


def masking_params(**given) -> dict:
    """The masking spec's parameters for the atlas's ``given`` ones (its defaults for the rest)."""
    return masking_exp.SPEC.parse(**given)


def atlas_batch(lm, samples, ctx: Context, *, modes: Sequence[str], decode: str, k: int, persist: float) -> list[dict]:
    """The masking and attention experiments' per-batch records for ``samples``, each tagged with its ``part``."""
    mp = {k_: v for k_, v in masking_params(modes=modes, decode=decode).items() if k_ != "threshold"}
    rows = [dict(r, part="masking") for r in masking_exp.masking_batch(lm, samples, ctx, **mp)]
    rows += [dict(r, part="attention") for r in attention_exp.attention_batch(lm, samples, ctx, k=k, persist=persist)]
    return rows


def resolve(lm, dataset, *, modes: Sequence[str], decode: str, k: int, persist: float, threshold: float) -> dict:
    """Validated parameters (the masking spec's own checks, then the atlas's: the profile needs the zero mode)."""
    m = masking_exp.resolve(lm, dataset, **masking_params(modes=modes, decode=decode, threshold=threshold))
    if PROFILE_MODE not in m["modes"]:
        raise ValueError(f"The atlas's fusion profile is the one-layer {PROFILE_MODE!r} curve; add {PROFILE_MODE!r} to "
                         f"modes (got {list(modes)}).")
    if not (isinstance(k, int) and k >= 1) or not (0 < float(persist) <= 1):
        raise ValueError(f"k must be a positive integer and persist a share in (0, 1]; got k={k!r}, "
                         f"persist={persist!r}.")
    return dict(modes=m["modes"], decode=decode, k=k, persist=persist, threshold=threshold, n_layers=lm.num_layers)


def split(records: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(masking records, attention records) of an atlas run, each with only its own columns."""
    if "part" not in records.columns:
        raise ValueError("These records have no 'part' column; pass an atlas result's records.")
    parts = []
    for part in ("masking", "attention"):
        r = records[records["part"] == part].drop(columns=["part"])
        parts.append(r.dropna(axis=1, how="all").reset_index(drop=True))
    return parts[0], parts[1]


def atlas_summary(records: pd.DataFrame, ctx=None, *, n_layers: int | None = None) -> pd.DataFrame:
    """Per layer: the fusion profile (one-layer zero masking summary) beside the attention summary, and
    ``rel_depth`` = layer / n_layers."""
    m, a = split(records)
    prof = masking_exp.masking_summary(m)
    prof = prof[prof["mode"] == PROFILE_MODE].drop(columns=["mode"])
    att = attention_exp.attention_summary(a) if len(a) else pd.DataFrame({"layer": []})
    out = prof.merge(att, on="layer", how="outer").sort_values("layer").reset_index(drop=True)
    L = n_layers or int(out["layer"].max()) + 1
    out.insert(1, "rel_depth", relative_depth(out["layer"], L))
    return out


def noise_chance(attention_records: pd.DataFrame) -> float:
    """Mean of 1 − relevant area over the samples with a persistent token: the irrelevant share a random token
    would give (the chance level of `report.attention_verdicts`' noise rule); NaN without relevance labels."""
    if "n_tokens" not in attention_records.columns or "relevant_area" not in attention_records.columns:
        return float("nan")
    last = attention_records.dropna(subset=["n_tokens", "relevant_area"])
    last = last[last["persistent"].apply(len) > 0]
    return float((1 - last["relevant_area"].astype(float)).mean()) if len(last) else float("nan")


def atlas_row(summary: pd.DataFrame, layers: dict, noise: dict, attention_records: pd.DataFrame,
              n_layers: int) -> dict:
    """The model's numbers for the atlas table: layers found (0-based and relative), noise share and its chance."""
    def rel(j):
        return None if j is None else float(j) / n_layers

    fusion = list(layers["fusion_layers"])
    return {"n_layers": n_layers, "fusion_layers": fusion, "fusion_depths": [rel(j) for j in fusion],
            "plateau_start": layers["plateau_start"], "plateau_depth": rel(layers["plateau_start"]),
            "review_layer": layers["review_layer"], "review_depth": rel(layers["review_layer"]),
            "threshold": layers["threshold"], "plain_accuracy": float(summary["plain_accuracy"].dropna().mean()),
            "max_drop": float(summary["drop"].max()), "samples": int(summary["n"].max()),
            "noise_share": noise.get("irrelevant_share_of_persistent", float("nan")),
            "noise_chance": noise_chance(attention_records),
            "persistent_tokens": noise.get("mean_persistent_tokens", float("nan"))}


def atlas_extras(records, summary, *, threshold: float, n_layers: int | None = None) -> dict:
    m, a = split(records)
    L = n_layers or int(summary["layer"].max()) + 1
    prof = masking_exp.masking_summary(m)
    layers = masking_exp.find_layers(prof[prof["mode"] == PROFILE_MODE], threshold=threshold)
    noise = attention_exp.persistent_noise(a) if len(a) else {}
    return {"layers": layers, "noise": noise, "n_layers": L, "row": atlas_row(summary, layers, noise, a, L)}


SPEC = register(Spec("atlas", atlas_batch, atlas_summary, resolve, atlas_extras,
                     summary_params=("threshold", "n_layers"), params=AtlasParams))


def atlas(lm, dataset, *, decoding: Decoding | None = None, out: str | None = None, batch_size: int = 8,
          seed: int = 0, progress: bool = True, **given) -> ExperimentResult:
    """The atlas entry of one model, from the masking and attention experiments' own runs (shared and resumable);
    parameters: `AtlasParams`.

    The result's ``extra`` holds ``layers`` (find_layers), ``noise`` (persistent_noise), ``row`` (`atlas_row`) and
    ``runs`` (the two run directories); its records are both runs' records, tagged ``part``.
    """
    params = SPEC.prepared(lm, dataset, **given)
    decode, k, persist, threshold = (params[x] for x in ("decode", "k", "persist", "threshold"))
    kw = dict(out=out, batch_size=batch_size, seed=seed, progress=progress)
    m = run(masking_exp.SPEC, lm, dataset, decoding=decoding, modes=params["modes"], decode=decode,
            threshold=threshold, **kw)
    a = run(attention_exp.SPEC, lm, dataset, k=k, persist=persist, **kw)
    records = pd.concat([m.records.assign(part="masking"), a.records.assign(part="attention")], ignore_index=True)
    summary = atlas_summary(records, n_layers=params["n_layers"])
    extras = atlas_extras(records, summary, threshold=threshold, n_layers=params["n_layers"])
    config = {"experiment": "atlas", "params": params, "parts": {"masking": m.config, "attention": a.config}}
    return ExperimentResult("atlas", records, summary, config, None,
                            {**extras, "runs": {"masking": m.run_dir, "attention": a.run_dir}})


def relative_depth(layers, n_layers: int) -> np.ndarray:
    """``layer / n_layers`` for 0-based layers (the atlas's x axis)."""
    return np.asarray(layers, float) / n_layers


__all__ = ["atlas", "atlas_batch", "atlas_summary", "atlas_extras", "atlas_row", "noise_chance", "split",
           "relative_depth", "PROFILE_MODE", "SPEC"]
