"""The paper's experiments, one function each: ``fn(lm, dataset, **params) -> ExperimentResult``.

| name          | paper           | function                                   |
|---------------|-----------------|--------------------------------------------|
| masking       | Sec. 3, Fig. 2  | `masking.masking` (fusion + review layers) |
| hellinger     | Sec. 3-4        | `layers.hellinger`                         |
| early_exit    | Sec. 3          | `layers.early_exit`                        |
| attention     | Sec. 4, Fig. 3  | `attention.attention`                      |
| contrastive   | Sec. 5          | `contrastive.contrastive`                  |
| baselines     | Sec. 6 tables   | `baselines.baselines`                      |
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
}
EXPERIMENTS = tuple(_REGISTRY)


def get_experiment(name: str):
    try:
        module, fn = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}.") from None
    return getattr(importlib.import_module(f"{__name__}.{module}"), fn)


__all__ = ["EXPERIMENTS", "get_experiment", "Decoding", "ExperimentResult", "answer"]
