"""Kept for code written against earlier releases: the plans and `intervene` live in `fusion_utils.engine`."""
from __future__ import annotations

import warnings

warnings.warn("fusion_utils.interventions is deprecated and will be removed; import from fusion_utils.engine instead.",
              DeprecationWarning, stacklevel=2)

from .engine.capture import AttentionMaps
from .engine.intervene import Intervention, intervene
from .engine.plans import (GROUPS, CaptureAttention, Knockout, MaskImage, ScaleAttention, ScaleImage, check_layer,
                           layer_window)

__all__ = ["MaskImage", "Knockout", "ScaleImage", "ScaleAttention", "CaptureAttention", "AttentionMaps",
           "Intervention", "intervene", "layer_window", "check_layer", "GROUPS"]
