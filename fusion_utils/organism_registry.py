"""The model organisms' registry (layer 0): their names, architectures, weight directories and the default alias
(``organism:llava`` -> ``llava-16l``), and loading shipped weights. Loading needs nothing else, so `models` (layer
0) reads this module, while training and evaluation (`fusion_utils.organisms`, layer 5) sit on top of everything.

Two architectures, ``llava`` (LlavaForConditionalGeneration) and ``qwen2_vl`` (Qwen2VLForConditionalGeneration), each
at several depths: the 16-layer ones (``llava-16l``, ``qwen2_vl-16l``: ``DEEP``, trained with two-image prompts and
stage (f)'s small details), the fast 8-layer ones (``llava-8l``, ``qwen2_vl-8l``: ``FAST``, one image per prompt)
and, as recipes without shipped weights, the depths of LLaVA-1.5-7B and Qwen2.5-VL-7B (``llava-32l``,
``qwen2_vl-28l``). ``llava`` / ``qwen2_vl`` name the default of each architecture (``DEFAULT_VARIANT``). Weights,
processor and model card live in ``organisms/weights/<variant>/`` and load offline with
``<ModelClass>.from_pretrained(dir)`` + ``AutoProcessor.from_pretrained(dir)``.

>>> resolve_name("organism:llava"), arch_of("qwen2_vl-8l")
('llava-16l', 'qwen2_vl')
"""
from __future__ import annotations

from pathlib import Path

# variant -> architecture (its model sizes are organisms.build.SIZES, its recipe organisms.train.ORGANISM_RECIPE)
VARIANTS = {"llava-8l": "llava", "qwen2_vl-8l": "qwen2_vl", "llava-32l": "llava", "qwen2_vl-28l": "qwen2_vl",
            "llava-16l": "llava", "qwen2_vl-16l": "qwen2_vl"}  # -16l: issue 16's fallback depth (build.SIZES)
# what `organism:llava` / `organism:qwen2_vl` load: the deep organisms, since both meet issue 16's bar
# (`fusion-utils organisms eval --all` says whether they do; tests/test_organisms.py asserts it)
DEFAULT_VARIANT = {"llava": "llava-16l", "qwen2_vl": "qwen2_vl-16l"}
ORGANISMS = tuple(DEFAULT_VARIANT)  # the default pair's architecture names (the book's models)
DEEP = ("llava-16l", "qwen2_vl-16l")  # what `make organisms` trains (organisms.train.ORGANISM_RECIPE says why 16)
FAST = ("llava-8l", "qwen2_vl-8l")  # half the depth, one image per prompt: for tests that need speed, not depth
WEIGHTS_ROOT = Path(__file__).resolve().parent / "organisms" / "weights"
MODEL_CLASSES = {"llava": "LlavaForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration"}


def resolve_name(name: str) -> str:
    """The variant an organism name means (``organism:llava`` -> ``llava-16l``, the default)."""
    name = name.split(":", 1)[1] if name.startswith("organism:") else name
    name = DEFAULT_VARIANT.get(name, name)
    if name not in VARIANTS:
        raise ValueError(f"Unknown organism {name!r}; use one of {', '.join(list(DEFAULT_VARIANT) + list(VARIANTS))}.")
    return name


def arch_of(name: str) -> str:
    """The architecture (``llava`` or ``qwen2_vl``) of an organism name or variant."""
    return VARIANTS[resolve_name(name)]


def weights_dir(name: str) -> Path:
    return WEIGHTS_ROOT / resolve_name(name)


def shipped(names=None) -> list[str]:
    """The variants whose weights are in the package."""
    return [n for n in (names or VARIANTS) if (weights_dir(n) / "model.safetensors").exists()]


def model_class(name: str):
    """The transformers class of an organism (name, variant or architecture)."""
    import transformers

    arch = name if name in MODEL_CLASSES else arch_of(name)
    return getattr(transformers, MODEL_CLASSES[arch])


def load(name_or_dir, dtype=None):
    """(model, processor) from an organism name or a weights directory, offline."""
    import torch
    from transformers import AutoConfig, AutoProcessor

    path = Path(name_or_dir) if Path(str(name_or_dir)).is_dir() else weights_dir(str(name_or_dir))
    cfg = AutoConfig.from_pretrained(path)
    model = model_class(cfg.model_type).from_pretrained(path, use_safetensors=True, dtype=dtype or torch.float32)
    model.eval()
    return model, AutoProcessor.from_pretrained(path)


__all__ = ["ORGANISMS", "VARIANTS", "DEFAULT_VARIANT", "DEEP", "FAST", "WEIGHTS_ROOT", "MODEL_CLASSES", "resolve_name",
           "arch_of", "weights_dir", "shipped", "model_class", "load"]
