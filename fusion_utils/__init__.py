"""fusion_utils: where vision meets language in multimodal LLMs (companion to arXiv 2601.08151).

Core API (import from here):

- `load_model` -- a hub id, a local ``save_pretrained`` directory, or ``organism:llava`` / ``organism:qwen2_vl``.
- `LoadedModel.prepare(samples)` -> `Batch` (model inputs, image-token positions found by id, per-image grids).
- `intervene(lm, batch, *plans)` with `MaskImage`, `Knockout`, `ScaleImage`, `CaptureAttention`.
- `masking_sweep`, `early_exit_logits` -- layer sweeps that reuse the work shared by all variants.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .archs import ARCHS, ArchSpec, get_spec
from .interventions import AttentionMaps, CaptureAttention, Knockout, MaskImage, ScaleImage, intervene
from .models import LoadedModel, fingerprint, load_model

__all__ = [
    "__version__", "ARCHS", "ArchSpec", "get_spec", "load_model", "LoadedModel", "fingerprint", "intervene",
    "MaskImage", "Knockout", "ScaleImage", "CaptureAttention", "AttentionMaps",
]


def __getattr__(name):  # lazy: sweeps import torch-heavy helpers only when asked for
    if name in ("masking_sweep", "early_exit_logits"):
        from . import sweeps

        return getattr(sweeps, name)
    raise AttributeError(f"module 'fusion_utils' has no attribute {name!r}")
