"""The engine: the only code that registers hooks or touches a KV cache.

- `plans`: what to change (`MaskImage`, `Knockout`, `ScaleImage`, `ScaleAttention`, `CaptureAttention`, or a plan
  of your own: any object with ``compile(site) -> edits``);
- `intervene`: installs plans for one batch and always removes them;
- `replay`: record a layer's inputs, run layers k..L, fork a cache, continue ``generate`` from a replayed prompt;
- `sweeps`: every layer's variant at the cost of little more than one pass;
- `stepping`: token-by-token decoding with a KV cache whose rows regroup (beam search, look-ahead, CD's amateur).
"""
from __future__ import annotations

from .capture import AttentionMaps
from .intervene import Intervention, intervene
from .plans import (GROUPS, AttentionCall, AttentionEdit, AttentionRead, CaptureAttention, ExitAt, HiddenEdit,
                    Knockout,
                    MaskImage, Plan, ScaleAttention, ScaleImage, Site, Step, check_layer, layer_window)
from .sweeps import early_exit_logits, masking_sweep

__all__ = ["AttentionMaps", "Intervention", "intervene", "GROUPS", "AttentionCall", "AttentionEdit", "AttentionRead",
           "CaptureAttention", "ExitAt", "HiddenEdit", "Knockout", "MaskImage", "Plan", "ScaleAttention", "ScaleImage", "Site",
           "Step", "check_layer", "layer_window", "early_exit_logits", "masking_sweep"]
