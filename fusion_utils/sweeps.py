"""Kept for code written against earlier releases: the sweeps live in `fusion_utils.engine.sweeps`."""
from __future__ import annotations

from .engine.sweeps import early_exit_logits, masking_sweep

__all__ = ["masking_sweep", "early_exit_logits"]
