"""Tiny real-architecture MLLMs ("model organisms") trained on the procedural world: their training recipe
(`train`), evaluation and model cards (`evaluate`) and command line (`cli`) -- layer 5, on top of everything.

The registry (names, weight directories, the default alias ``organism:llava`` -> ``llava-16l``, loading) is
`fusion_utils.organism_registry` (layer 0, what `fusion_utils.models` reads); its names are re-exported here.
"""
from __future__ import annotations

from ..organism_registry import (DEEP, DEFAULT_VARIANT, FAST, ORGANISMS, VARIANTS, WEIGHTS_ROOT, arch_of, load,
                                 model_class, resolve_name, shipped, weights_dir)

__all__ = ["ORGANISMS", "VARIANTS", "DEFAULT_VARIANT", "DEEP", "FAST", "WEIGHTS_ROOT", "resolve_name", "arch_of",
           "weights_dir", "shipped", "model_class", "load"]
