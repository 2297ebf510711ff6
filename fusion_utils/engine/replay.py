"""Replay: reuse one plain pass instead of running the model again.

The only code that reads or edits a KV cache. It records what each decoder layer received, runs layers k..L from a
recorded input, forks a cache below a layer, finds the prompt prefix every variant shares, reads per-layer outputs
(early exit, DoLa), and lets ``generate`` continue from a cache whose first-step logits were computed elsewhere.

>>> with record_inputs(lm) as rec:
...     out = lm.model(**batch.inputs, use_cache=True)
>>> cache = language_model_cache(out)
>>> hidden = run_layers(lm, rec, start=5, hidden=rec.hidden(5) * 0.5, cache=fork_cache(cache, 5))
>>> logits = head(lm, hidden[:, -1])
"""
from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager
from typing import Sequence

import torch

from ..archs import resolve


class LayerInputs:
    """What each decoder layer received in one forward pass: ``args`` and ``kwargs`` per layer."""

    def __init__(self, n_layers: int):
        self.inputs: list = [None] * n_layers

    def hidden(self, j: int) -> torch.Tensor:
        args, kwargs = self.inputs[j]
        return args[0] if args else kwargs["hidden_states"]

    def rest(self, j: int) -> tuple[tuple, dict]:
        """Layer j's other positional arguments and its keyword arguments, without the hidden states."""
        args, kwargs = self.inputs[j]
        return tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"}


@contextmanager
def record_inputs(lm, layers: Sequence[int] | None = None):
    """Record the inputs of decoder ``layers`` (default all) during the forward passes inside the block."""
    rec = LayerInputs(lm.num_layers)

    def hook(j):
        def h(module, args, kwargs):
            rec.inputs[j] = (args, dict(kwargs))
        return h

    chosen = range(lm.num_layers) if layers is None else layers
    handles = [lm.layers[j].register_forward_pre_hook(hook(j), with_kwargs=True) for j in chosen]
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record_stream(lm, indices: Sequence[int], position: int = -1, *, offset: int = 0):
    """``{index - offset: residual stream at ``position``}`` by hidden-state index, as transformers' ``hidden_states``
    counts them: 0 is the embedding output (the input of layer 0), j >= 1 the output of decoder layer j-1. Refreshed
    at every forward call inside the block (so a logits processor sees the current generation step's values)."""
    out: dict[int, torch.Tensor] = {}

    def after(j):
        def h(module, args, output):
            out[j - offset] = (output[0] if isinstance(output, tuple) else output)[:, position]
        return h

    def before(module, args, kwargs):
        out[-offset] = (args[0] if args else kwargs["hidden_states"])[:, position]

    indices = sorted(set(indices))
    handles = [lm.layers[j - 1].register_forward_hook(after(j)) for j in indices if j > 0]
    if 0 in indices:
        handles.append(lm.layers[0].register_forward_pre_hook(before, with_kwargs=True))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def record_outputs(lm, layers: Sequence[int], position: int = -1):
    """``{layer: hidden state at ``position`` of that decoder layer's output}`` (`record_stream` keyed by layer)."""
    return record_stream(lm, [j + 1 for j in layers], position, offset=1)


@contextmanager
def record_decoder_call(lm):
    """The keyword arguments the decoder (the language model's layer stack) receives in the passes inside the block."""
    captured: dict = {}

    def hook(module, args, kwargs):
        captured.update(kwargs)
        if args:
            captured["positional"] = args

    h = lm.decoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        h.remove()


def head(lm, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits of hidden states: the final norm, then the LM head."""
    return lm.lm_head(lm.final_norm(hidden)).float()


def last_logits_only(lm) -> dict:
    """Forward kwargs that compute logits for the last position only, where the model supports it."""
    try:
        params = inspect.signature(lm.model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def language_model_cache(out):
    """The language model's KV cache from a model output (InstructBLIP nests it in ``language_model_outputs``)."""
    cache = getattr(out, "past_key_values", None)
    if cache is None and getattr(out, "language_model_outputs", None) is not None:
        cache = out.language_model_outputs.past_key_values
    return cache


def reusable(cache) -> bool:
    """Whether the cache is one this module can fork and extend (dynamic layers that grow by concatenation)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def fork_cache(cache, keep_below: int, prefix: int = 0):
    """A cache sharing ``cache``'s tensors for layers < ``keep_below``, and above them only for positions
    [0, ``prefix``) (default: empty). The original is untouched: dynamic layers grow by concatenation, never in
    place."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    for j in range(keep_below, len(new.layers)):
        layer = new.layers[j]
        if prefix > 0 and layer.keys is not None and layer.keys.numel():
            layer.keys, layer.values = layer.keys[..., :prefix, :], layer.values[..., :prefix, :]
        else:
            layer.reset()
    return new


def layer_kv(cache, j: int, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of layer ``j`` for positions [0, stop)."""
    layer = cache.layers[j]
    return layer.keys[..., :stop, :], layer.values[..., :stop, :]


def set_layer_kv(cache, j: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Replace layer ``j``'s keys and values (a variant batch's own prefix)."""
    cache.layers[j].keys, cache.layers[j].values = keys, values


def text_after_image_start(image_mask: torch.Tensor, attention_mask: torch.Tensor | None = None) -> int:
    """Positions [0, P) lie before every row's first text token that follows one of its image tokens. An edit of
    what text queries read from the image (knockout, `ScaleAttention`) changes nothing there, at any layer: earlier
    text sees no image (causal), and image tokens are not text queries. Clamped to S - 1 so a rerun from P always
    recomputes the last position."""
    img = image_mask.bool()
    S = img.shape[1]
    text_after = (img.cumsum(dim=1) > 0) & ~img
    if attention_mask is not None:
        text_after &= attention_mask.bool().to(img.device)
    positions = torch.arange(S, device=img.device)
    first = torch.where(text_after, positions, S).min(dim=1).values
    return min(int(first.min().item()), S - 1)


def position_slice(kwargs: dict, lo: int, hi: int, S: int, keys_to: int, B: int, device) -> dict:
    """A layer's recorded kwargs for queries [lo, hi) and keys [0, keys_to) of a length-S prompt."""
    kw = {}
    for k, val in kwargs.items():
        if k == "past_key_values":
            continue
        if k == "attention_mask":
            if val is None:  # the model relied on a causal kernel: spell the causal mask out for these rows
                q = torch.arange(lo, hi, device=device)
                val = (torch.arange(keys_to, device=device)[None, :] <= q[:, None])[None, None].expand(
                    B, 1, hi - lo, keys_to)
                kw[k] = val
                continue
            if not torch.is_tensor(val) or val.ndim != 4:
                raise Ambiguous
            kw[k] = val[:, :, lo:hi, :keys_to]
        elif k == "position_embeddings":
            kw[k] = tuple(t[..., lo:hi, :] for t in val)
        elif torch.is_tensor(val) and val.ndim >= 1 and val.shape[-1] == S and not torch.is_floating_point(val):
            kw[k] = val[..., lo:hi]
        else:
            kw[k] = val
    return kw


def run_layers(lm, rec: LayerInputs, start: int, hidden: torch.Tensor, cache=None, stop: int | None = None,
               rows: int = 1, first: int = 0, **overrides) -> torch.Tensor:
    """Run decoder layers ``start`` .. ``stop - 1`` (default: to the end) from ``hidden``, with each layer's other
    inputs as recorded (tiled ``rows`` times along the batch when ``hidden`` stacks several variants).

    ``first``: ``hidden`` holds only the prompt positions [first, S), and ``cache`` already holds every run layer's
    keys and values of [0, first) (`fork_cache` with ``prefix=first``): the positions before ``first`` are not
    recomputed."""
    stop = lm.num_layers if stop is None else stop
    for j in range(start, stop):
        args, kw = rec.rest(j)
        B, S = rec.hidden(j).shape[:2]
        if first:
            kw = position_slice(kw, first, S, S, S, B, hidden.device)
        kw = {k: tile(v, B, rows) for k, v in kw.items()}
        kw.update(overrides)
        kw["past_key_values"] = cache  # never the recorded pass's own cache
        out = lm.layers[j](hidden, *(tile(a, B, rows) for a in args), **kw)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


class Ambiguous(Exception):
    """A recorded input whose batch dimension cannot be told apart (e.g. M-RoPE positions [3, B, ...] with B = 3)."""


def batch_dim(t: torch.Tensor, B: int) -> int | None:
    """Where the batch dimension of a recorded layer kwarg is; -1 if absent, None if ambiguous."""
    dims = [d for d in range(min(t.ndim, 2)) if t.shape[d] == B]
    if t.ndim >= 3 and len(dims) == 2:
        return None if B != 1 else -1
    return dims[0] if dims else -1


def tile(obj, B: int, n: int):
    """Repeat batch-carrying tensors n times along their batch dimension (variant-major)."""
    if n == 1:
        return obj
    if torch.is_tensor(obj):
        d = batch_dim(obj, B)
        if d is None:
            raise Ambiguous
        if d == -1:
            return obj
        reps = [1] * obj.ndim
        reps[d] = n
        return obj.repeat(*reps)
    if isinstance(obj, tuple):
        return tuple(tile(o, B, n) for o in obj)
    if isinstance(obj, list):
        return [tile(o, B, n) for o in obj]
    if isinstance(obj, dict):
        return {k: tile(v, B, n) for k, v in obj.items()}
    return obj


# --- generation that continues from a replayed prompt -----------------------------------------------------------

def generator_model(lm):
    """The module whose ``generate`` continues decoding from a language-model cache (`ArchSpec.language_model`)."""
    return resolve(lm.model, lm.spec.language_model) if lm.spec.language_model else lm.model


def rope_state(lm) -> list:
    """Position offsets some models keep between calls (Qwen2-VL's M-RoPE ``rope_deltas``), to restore later."""
    return [(m, m.rope_deltas) for m in lm.model.modules() if hasattr(m, "rope_deltas")]


def restore_rope(state) -> None:
    for m, v in state:
        m.rope_deltas = v


def continue_generate(lm, batch, cache, first_logits: torch.Tensor, generate_kwargs: dict, rope=None):
    """``generate`` from a prompt whose KV ``cache`` (all prompt positions) and last-position logits
    (``first_logits`` [B, 1, V]) were computed elsewhere, e.g. by `run_layers` with an edit.

    ``generate`` must produce the first token itself (its logits processors, sampling, stopping): it gets the cache
    without the last prompt position, recomputes that one position, and a hook on the LM head puts back the given
    logits and the cache entries they came with.
    """
    S = batch.seq_len
    last = []
    for layer in cache.layers:
        last.append((layer.keys[..., -1:, :], layer.values[..., -1:, :]))
        layer.crop(-1)
    pending = {"first": True}

    def head_hook(module, inp, output):
        if not pending["first"]:
            return None
        pending["first"] = False
        for layer, (k, v) in zip(cache.layers, last):
            if layer.keys.shape[-2] != S:
                raise RuntimeError("Cache reuse: unexpected cache length after the first decoding step.")
            layer.keys[..., S - 1:S, :] = k
            layer.values[..., S - 1:S, :] = v
        new = output.clone()
        new[:, -1:, :] = first_logits.to(new.dtype)
        return new

    inputs = {"input_ids": batch.inputs["input_ids"]}
    if batch.inputs.get("attention_mask") is not None:
        inputs["attention_mask"] = batch.inputs["attention_mask"]
    if rope is not None:
        restore_rope(rope)
    h = lm.lm_head.register_forward_hook(head_hook)
    try:
        out = generator_model(lm).generate(**inputs, past_key_values=cache, **generate_kwargs)
    finally:
        h.remove()
    if pending["first"]:
        raise RuntimeError("Cache reuse: generate() never called the LM head.")
    return out


__all__ = ["LayerInputs", "record_inputs", "record_outputs", "record_stream", "record_decoder_call", "head", "last_logits_only",
           "language_model_cache", "reusable", "fork_cache", "layer_kv", "set_layer_kv",
           "text_after_image_start", "position_slice", "run_layers", "Ambiguous", "batch_dim", "tile",
           "generator_model", "rope_state", "restore_rope", "continue_generate"]
