"""Two tiny real-architecture MLLMs ("model organisms") trained on the procedural world.

``llava`` (LlavaForConditionalGeneration) and ``qwen2_vl`` (Qwen2VLForConditionalGeneration); weights, processor
and model card live in ``weights/<name>/`` and load offline with ``<ModelClass>.from_pretrained(dir)`` +
``AutoProcessor.from_pretrained(dir)``.
"""
from __future__ import annotations

from pathlib import Path

ORGANISMS = ("llava", "qwen2_vl")
WEIGHTS_ROOT = Path(__file__).resolve().parent / "weights"


def weights_dir(name: str) -> Path:
    name = name.split(":", 1)[1] if name.startswith("organism:") else name
    if name not in ORGANISMS:
        raise ValueError(f"Unknown organism {name!r}; use one of {', '.join(ORGANISMS)}.")
    return WEIGHTS_ROOT / name


def load(name_or_dir, dtype=None):
    """(model, processor) from an organism name or a weights directory, offline."""
    import torch
    from transformers import AutoConfig, AutoProcessor

    from .build import model_class

    path = Path(name_or_dir) if Path(str(name_or_dir)).is_dir() else weights_dir(str(name_or_dir))
    cfg = AutoConfig.from_pretrained(path)
    model = model_class(cfg.model_type).from_pretrained(path, use_safetensors=True, dtype=dtype or torch.float32)
    model.eval()
    return model, AutoProcessor.from_pretrained(path)


__all__ = ["ORGANISMS", "WEIGHTS_ROOT", "weights_dir", "load"]
