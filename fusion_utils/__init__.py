"""fusion_utils: where vision meets language in multimodal LLMs (companion to arXiv 2601.08151).

Core API (import from here):

- `load_model` -- a hub id, a local ``save_pretrained`` directory, or ``organism:llava`` / ``organism:qwen2_vl``.
- `LoadedModel.prepare(samples)` -> `Batch` (model inputs, image-token positions found by id, per-image grids).
- `intervene(lm, batch, *plans)` with `MaskImage`, `Knockout`, `ScaleImage`, `ScaleAttention`, `CaptureAttention`,
  or a `Plan` of your own (`fusion_utils.engine.plans`).
- `masking_sweep`, `early_exit_logits` -- layer sweeps that reuse the work shared by all variants.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .archs import ARCHS, ArchSpec, get_spec
from .engine import (AttentionMaps, CaptureAttention, Knockout, MaskImage, Plan, ScaleAttention, ScaleImage,
                     early_exit_logits, intervene, masking_sweep)
from .models import LoadedModel, checkpoint_fingerprint, load_model

__all__ = [
    "__version__", "ARCHS", "ArchSpec", "get_spec", "load_model", "LoadedModel", "checkpoint_fingerprint", "intervene",
    "MaskImage", "Knockout", "ScaleImage", "ScaleAttention", "CaptureAttention", "AttentionMaps", "Plan",
    "masking_sweep", "early_exit_logits",
]

