"""`attention_override`: run every decoder layer's attention through a function of ours, and always restore it.

The function is registered once with transformers' ``AttentionInterface`` (its mask function registered alongside
under the same name, so the model builds the mask that function expects), and the decoder is switched to it with
the public ``set_attn_implementation``. What the function needs at each layer (an `intervene` installation, a
shared-prefix sweep) is kept on that layer's attention module while the block runs, never in a module global, so
two models, or two threads on two models, never see each other's state.

>>> from transformers import AttentionInterface
>>> sdpa = AttentionInterface()["sdpa"]
>>> def logged(module, query, key, value, attention_mask, **kw):
...     print(override_of(module), end=" ")              # what this block put on the module: the layer's payload
...     return sdpa(module, query, key, value, attention_mask, **kw)
>>> name = register_attention("logged_sdpa", logged, mask_like="sdpa")
>>> with attention_override(lm, name, payloads=range(lm.num_layers)):
...     out = lm.model(**batch.inputs)
0 1 2 3 4 5 6 7
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Sequence

STATE = "fusion_utils_attention"  # the attribute an attention module carries while an override serves it


def attention_modules(lm) -> list:
    """Each decoder layer's attention module (the path is the architecture's, `ArchSpec.attention`)."""
    return lm.attention_modules


def override_of(module):
    """What the override serving ``module`` put there (None outside any override)."""
    return getattr(module, STATE, None)


def register_attention(name: str, function: Callable, mask_like: str) -> str:
    """Register ``function`` under ``name`` with its mask function that of ``mask_like`` (once); returns ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if name not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_like])
    return name


def base_implementation(lm) -> str:
    """The attention implementation the model was loaded with (``sdpa`` unless the user chose another)."""
    return lm.meta.get("attn_implementation") or "sdpa"


@contextmanager
def attention_override(lm, name: str, *, payloads: Sequence):
    """Inside the block, every decoder layer's attention is the function registered as ``name`` (see
    `register_attention`), and layer j's
    attention module carries ``payloads[j]`` (`override_of`). On exit, also after an error, the payloads are
    removed and the model's own implementation is set back. Overrides do not nest: a second one on the same model
    raises RuntimeError (callers that can fall back check `override_of` first)."""
    modules = attention_modules(lm)
    if any(override_of(m) is not None for m in modules):
        raise RuntimeError("This model's attention is already overridden (an intervene() or sweep block is open); "
                           "pass all plans to one intervene() call.")
    base = base_implementation(lm)
    try:
        for m, payload in zip(modules, payloads):
            setattr(m, STATE, payload)
        lm.decoder.set_attn_implementation(name)
        yield modules
    finally:
        for m in modules:
            if hasattr(m, STATE):
                delattr(m, STATE)
        lm.decoder.set_attn_implementation(base)


__all__ = ["attention_override", "attention_modules", "override_of", "register_attention", "base_implementation",
           "STATE"]
