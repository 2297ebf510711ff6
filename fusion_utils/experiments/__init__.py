"""The paper's experiments, one function each: ``fn(lm, dataset, **params) -> ExperimentResult``.

- ``masking`` (Sec. 3): ``masking.masking``, accuracy vs masked layer, fusion and review layers;
- ``hellinger`` (Sec. 3-4): ``layers.hellinger``, attention distance to the final layer;
- ``early_exit`` (Sec. 3): ``layers.early_exit``, each layer's early-exit answer;
- ``attention`` (Sec. 4): ``attention.attention``, relevant vs irrelevant mass, persistent tokens;
- ``contrastive`` (Sec. 5): ``contrastive.contrastive``, soft mask and crop, with ablations;
- ``baselines`` (Sec. 6): ``baselines.baselines``, plain, ViCrop, VCD, DoLa;
- ``accuracy``: ``accuracy.accuracy``, plain accuracy per family under an image condition (original, blank, two
  images); the organisms' bar is measured with it;
- ``atlas`` (issue 31): ``atlas.atlas``, one model's fusion profile, review-layer inputs and persistent-noise share,
  composed from the masking and attention runs.
"""
from __future__ import annotations

import importlib

from .common import Decoding, ExperimentResult, answer

_REGISTRY = {
    "masking": ("masking", "masking"),
    "hellinger": ("layers", "hellinger"),
    "early_exit": ("layers", "early_exit"),
    "attention": ("attention", "attention"),
    "contrastive": ("contrastive", "contrastive"),
    "baselines": ("baselines", "baselines"),
    "accuracy": ("accuracy", "accuracy"),
    "atlas": ("atlas", "atlas"),
}
EXPERIMENTS = tuple(_REGISTRY)


def get_experiment(name: str):
    try:
        module, fn = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}.") from None
    return getattr(importlib.import_module(f"{__name__}.{module}"), fn)


__all__ = ["EXPERIMENTS", "get_experiment", "Decoding", "ExperimentResult", "answer"]
