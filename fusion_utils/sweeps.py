"""Kept for code written against earlier releases: the sweeps live in `fusion_utils.engine.sweeps`."""
from __future__ import annotations

import warnings

warnings.warn("fusion_utils.sweeps is deprecated and will be removed; import from fusion_utils.engine.sweeps instead.",
              DeprecationWarning, stacklevel=2)

from .engine.sweeps import early_exit_logits, masking_sweep

__all__ = ["masking_sweep", "early_exit_logits"]
