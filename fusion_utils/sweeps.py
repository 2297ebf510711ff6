"""Layer sweeps that share the work common to all variants (Sec. 3's masking curves, early exit).

`masking_sweep` returns, for every masked layer ℓ, the logits at the last prompt position -- the same numbers as
running one masked forward per layer (``method="naive"``), computed with less work:

- ``zero``: layers below the first masked layer do not depend on the mask, so one plain pass records every layer's
  input; each variant starts from the recorded input of its first masked layer, and the variants run together as
  one growing batch through the layers above.
- ``knockout``: a knockout only changes non-image queries, and nothing before the end of the image attends to one,
  so the keys and values of the prompt up to the image's end are computed once and shared by every variant; only
  the question tokens are recomputed, all variants in one batch. (A prompt that puts text before its last image
  token gets a shorter shared prefix; nothing else changes.)

`early_exit_logits` applies the final norm and LM head to every layer's output.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch

from .interventions import MaskImage, _State, check_layer, intervene, layer_window


class _Recorder:
    """Records each decoder layer's input (args, kwargs) during one forward pass."""

    def __init__(self, layers):
        self.inputs: list = [None] * len(layers)
        self.handles = [layer.register_forward_pre_hook(self._hook(j), with_kwargs=True) for j, layer in enumerate(layers)]

    def _hook(self, j):
        def hook(module, args, kwargs):
            self.inputs[j] = (args, dict(kwargs))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _hidden_of(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _batch_dim(t: torch.Tensor, B: int) -> int | None:
    """Where the batch dimension of a recorded layer kwarg is; None if absent or ambiguous."""
    dims = [d for d in range(min(t.ndim, 2)) if t.shape[d] == B]
    if t.ndim >= 3 and len(dims) == 2:
        return None if B != 1 else -1  # ambiguous (e.g. M-RoPE [3, B, ...] with B == 3)
    return dims[0] if dims else -1


def _expand(obj, B: int, n: int):
    """Tile batch-carrying tensors n times along their batch dimension (variant-major)."""
    if n == 1:
        return obj
    if torch.is_tensor(obj):
        d = _batch_dim(obj, B)
        if d is None:
            raise _Ambiguous
        if d == -1:
            return obj
        reps = [1] * obj.ndim
        reps[d] = n
        return obj.repeat(*reps)
    if isinstance(obj, tuple):
        return tuple(_expand(o, B, n) for o in obj)
    if isinstance(obj, list):
        return [_expand(o, B, n) for o in obj]
    if isinstance(obj, dict):
        return {k: _expand(v, B, n) for k, v in obj.items()}
    return obj


class _Ambiguous(Exception):
    pass


def _head(lm, hidden_last: torch.Tensor) -> torch.Tensor:
    return lm.lm_head(lm.final_norm(hidden_last)).float()


def _plain_forward(lm, batch, **extra):
    return lm.model(**batch.inputs, use_cache=False, **extra)


@torch.no_grad()
def masking_sweep(lm, batch, layers: Sequence[int] | None = None, *, mode: str = "zero", window: int = 1,
                  onward: bool = False, method: str = "reuse", chunk: int | None = None) -> dict:
    """Last-position logits with the image masked at each layer.

    Returns ``{"layers": [...], "logits": float32 [n_layers_swept, batch, vocab], "plain": float32 [batch, vocab]}``.
    ``method="naive"`` runs one masked forward per layer (the reference the fast path is tested against).
    ``chunk`` bounds how many variants run in one batch (memory); default all.
    """
    L = lm.num_layers
    layers = list(range(L)) if layers is None else [check_layer(j, L) for j in layers]
    MaskImage(0, mode, window)  # validates mode / window
    if method not in ("reuse", "naive"):
        raise ValueError("method must be 'reuse' or 'naive'.")
    if method == "naive":
        plain = _plain_forward(lm, batch).logits[:, -1].float()
        out = []
        for j in layers:
            with intervene(lm, batch, MaskImage(j, mode, window, onward)):
                out.append(_plain_forward(lm, batch).logits[:, -1].float())
        return {"layers": layers, "logits": torch.stack(out), "plain": plain}
    if mode == "zero":
        return _zero_sweep(lm, batch, layers, window, onward, chunk)
    try:
        return _knockout_sweep(lm, batch, layers, window, onward)
    except _Ambiguous:
        return _knockout_sweep_batched(lm, batch, layers, window, onward, chunk)


def _zero_sweep(lm, batch, layers, window, onward, chunk):
    L = lm.num_layers
    rec = _Recorder(lm.layers)
    try:
        plain = _plain_forward(lm, batch).logits[:, -1].float()
    finally:
        rec.remove()
    B = batch.size
    img = batch.image_mask
    windows = {v: set(layer_window(v, window, L, onward)) for v in layers}
    chunk = chunk or len(layers)
    results = {}
    for c in range(0, len(layers), chunk):
        variants = layers[c:c + chunk]
        try:
            results.update(_run_growing(lm, rec, variants, windows, img, B, batched=True))
        except _Ambiguous:
            for v in variants:
                results.update(_run_growing(lm, rec, [v], windows, img, B, batched=False))
    return {"layers": layers, "logits": torch.stack([results[v] for v in layers]), "plain": plain}


def _run_growing(lm, rec, variants, windows, img, B, batched):
    """Run variants through the decoder from their first masked layer, stacked as one growing batch."""
    start = {v: min(windows[v]) for v in variants}
    active: list[int] = []
    hidden = None
    for j in range(min(start.values()), lm.num_layers):
        args, kwargs = rec.inputs[j]
        new = [v for v in variants if start[v] == j]
        if new:
            h0 = _hidden_of(args, kwargs)
            hidden = torch.cat([hidden] + [h0] * len(new)) if hidden is not None else torch.cat([h0] * len(new))
            active += new
        n = len(active)
        zero_rows = torch.tensor([j in windows[v] for v in active], device=img.device).repeat_interleave(B)
        if zero_rows.any():
            m = img.repeat(n, 1) & zero_rows[:, None]
            hidden = hidden.masked_fill(m[..., None], 0.0)
        kw = {k: _expand(v, B, n) for k, v in kwargs.items() if k != "hidden_states"}
        rest = tuple(_expand(a, B, n) for a in args[1:])
        out = lm.layers[j](hidden, *rest, **kw)
        hidden = out[0] if isinstance(out, tuple) else out
    last = _head(lm, hidden[:, -1])
    return {v: last[i * B:(i + 1) * B] for i, v in enumerate(active)}


def _decoder_inputs(lm, batch):
    """One plain pass with a KV cache; returns (plain last logits, the kwargs the decoder received, the cache)."""
    captured = {}

    def hook(module, args, kwargs):
        captured.update(kwargs)
        if args:
            captured["_args"] = args

    h = lm.decoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = lm.model(**batch.inputs, use_cache=True)
    finally:
        h.remove()
    if "_args" in captured or captured.get("inputs_embeds") is None:
        raise RuntimeError(f"{lm.spec.label}: the decoder was not called with inputs_embeds; use method='naive'.")
    cache = getattr(out, "past_key_values", None)
    if cache is None:  # InstructBLIP nests the language model's outputs
        cache = out.language_model_outputs.past_key_values
    return out.logits[:, -1].float(), captured, cache


def _knockout_sweep_batched(lm, batch, layers, window, onward, chunk):
    """Fallback: every variant's question suffix through every layer, all variants in one batch."""
    L, B, S = lm.num_layers, batch.size, batch.seq_len
    plain, kw, cache = _decoder_inputs(lm, batch)
    embeds = kw.pop("inputs_embeds")
    mask2d = kw.pop("attention_mask", None)
    pos = kw.pop("position_ids", None)
    for k in ("past_key_values", "use_cache", "input_ids", "return_dict", "output_hidden_states",
              "output_attentions", "cache_position"):
        kw.pop(k, None)
    if mask2d is not None and (not torch.is_tensor(mask2d) or mask2d.ndim != 2):
        raise RuntimeError("knockout sweep expects a 2-D padding mask; use method='naive'.")
    positions = torch.arange(S, device=batch.image_mask.device)
    last_img = torch.where(batch.image_mask, positions, -1).max(dim=1).values
    P = int(last_img.min().item()) + 1  # shared prefix: every position up to the earliest image end
    cache.crop(P - S)  # keep the plain pass's keys and values of the shared prefix (negative = tokens removed)
    windows = {v: layer_window(v, window, L, onward) for v in layers}
    chunk = chunk or len(layers)
    results = {}
    for c in range(0, len(layers), chunk):
        variants = layers[c:c + chunk]
        n = len(variants)
        cc = copy.deepcopy(cache) if c + chunk < len(layers) else cache
        cc.batch_repeat_interleave(n)  # rows: sample-major, variant-minor
        suffix = embeds[:, P:].repeat_interleave(n, dim=0)
        m2 = None if mask2d is None else mask2d.repeat_interleave(n, dim=0)
        p2 = None if pos is None else pos[..., P:].repeat_interleave(n, dim=-2)
        vbatch = _VariantBatch(batch, n)
        # each row knocks out at its own variant's layers: one plan per distinct layer, rows filtered by owner
        row_sets = [set(windows[v]) for v in variants]
        with _row_knockout(lm, vbatch, row_sets):
            out = lm.decoder(inputs_embeds=suffix, attention_mask=m2, position_ids=p2, past_key_values=cc,
                             use_cache=True, **kw)
        last = lm.lm_head(out.last_hidden_state[:, -1]).float().view(B, n, -1)
        for i, v in enumerate(variants):
            results[v] = last[:, i]
    return {"layers": layers, "logits": torch.stack([results[v] for v in layers]), "plain": plain}


def _knockout_sweep(lm, batch, layers, window, onward):
    """Shared prefix + growing batch over the question suffix.

    Nothing before the image's end depends on a knockout, and below its first knocked-out layer a variant's question
    tokens are the plain run's. So one plain pass (with a KV cache, recording each layer's input) serves every
    variant: at layer j, the variants whose window has started run their question tokens through layer j, attending
    to the plain prefix keys and values of that layer plus their own.
    """
    L, B, S = lm.num_layers, batch.size, batch.seq_len
    rec = _Recorder(lm.layers)
    try:
        out = lm.model(**batch.inputs, use_cache=True)
    finally:
        rec.remove()
    plain = out.logits[:, -1].float()
    cache = getattr(out, "past_key_values", None)
    if cache is None:
        cache = out.language_model_outputs.past_key_values
    if any(type(layer).__name__ != "DynamicLayer" for layer in getattr(cache, "layers", [None])):
        raise _Ambiguous
    positions = torch.arange(S, device=batch.image_mask.device)
    last_img = torch.where(batch.image_mask, positions, -1).max(dim=1).values
    P = int(last_img.min().item()) + 1
    prefix_kv = [(layer.keys[..., :P, :], layer.values[..., :P, :]) for layer in cache.layers]
    windows = {v: set(layer_window(v, window, L, onward)) for v in layers}
    start = {v: min(windows[v]) for v in layers}
    active: list[int] = []
    hidden = None
    for j in range(min(start.values()), L):
        args, kwargs = rec.inputs[j]
        new = [v for v in layers if start[v] == j]
        if new:
            h0 = _hidden_of(args, kwargs)[:, P:]
            hidden = torch.cat([hidden] + [h0] * len(new)) if hidden is not None else torch.cat([h0] * len(new))
            active += new
        n = len(active)
        kw = {}
        for k, val in kwargs.items():
            if k in ("hidden_states", "past_key_values"):
                continue
            if k == "attention_mask":
                kw[k] = _suffix_mask(val, B, P, S, batch.image_mask.device)
            elif k == "position_embeddings":
                kw[k] = tuple(t[..., P:, :] for t in val)
            elif torch.is_tensor(val) and val.ndim >= 1 and val.shape[-1] == S and not torch.is_floating_point(val):
                kw[k] = val[..., P:]
            else:
                kw[k] = val
        kw = {k: _expand(v, B, n) for k, v in kw.items()}
        k0, v0 = prefix_kv[j]
        layer_cache = cache.layers[j]
        layer_cache.keys, layer_cache.values = k0.repeat(n, 1, 1, 1), v0.repeat(n, 1, 1, 1)
        rows = torch.tensor([j in windows[v] for v in active], device=batch.image_mask.device).repeat_interleave(B)
        tiled = _TiledBatch(batch, n)
        with intervene(lm, tiled, MaskImage(j, "knockout")) as run:
            run._state.row_filter = {j: rows}
            res = lm.layers[j](hidden, *tuple(_expand(a, B, n) for a in args[1:]), past_key_values=cache, **kw)
        hidden = res[0] if isinstance(res, tuple) else res
    last = _head(lm, hidden[:, -1])
    results = {v: last[i * B:(i + 1) * B] for i, v in enumerate(active)}
    return {"layers": layers, "logits": torch.stack([results[v] for v in layers]), "plain": plain}


def _suffix_mask(mask, B, P, S, device):
    """The attention-mask rows of the question suffix ([B, 1, S - P, S], True = may attend)."""
    if mask is None:
        q = torch.arange(P, S, device=device)
        return (torch.arange(S, device=device)[None, :] <= q[:, None])[None, None].expand(B, 1, S - P, S)
    if not torch.is_tensor(mask) or mask.ndim != 4:
        raise _Ambiguous
    return mask[:, :, P:, :]


class _TiledBatch:
    """A batch tiled n times (variant-major), as far as interventions need to know."""

    def __init__(self, batch, n):
        self.image_mask = batch.image_mask.repeat(n, 1)
        am = batch.inputs.get("attention_mask")
        self.inputs = {} if am is None else {"attention_mask": am.repeat(n, 1)}
        self.image_positions = list(batch.image_positions) * n
        self.grids = list(batch.grids) * n


class _VariantBatch:
    """A batch tiled n times (sample-major), as far as interventions need to know."""

    def __init__(self, batch, n):
        self.image_mask = batch.image_mask.repeat_interleave(n, dim=0)
        am = batch.inputs.get("attention_mask")
        self.inputs = {} if am is None else {"attention_mask": am.repeat_interleave(n, dim=0)}
        self.image_positions = [p for p in batch.image_positions for _ in range(n)]
        self.grids = [g for g in batch.grids for _ in range(n)]


class _row_knockout:
    """Knockout image -> text where each row has its own set of layers."""

    def __init__(self, lm, vbatch, row_sets):
        self.lm, self.vbatch, self.row_sets = lm, vbatch, row_sets

    def __enter__(self):
        n = len(self.row_sets)
        all_layers = sorted(set().union(*self.row_sets))
        plans = [MaskImage(j, "knockout") for j in all_layers]
        self.cm = intervene(self.lm, self.vbatch, *plans)
        run = self.cm.__enter__()
        state: _State = run._state
        B = self.vbatch.image_mask.shape[0] // n
        owner = {j: torch.tensor([j in s for s in self.row_sets], device=self.vbatch.image_mask.device).repeat(B)
                 for j in all_layers}
        state.row_filter = owner
        return run

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)


@torch.no_grad()
def early_exit_logits(lm, batch) -> torch.Tensor:
    """float32 [layers, batch, vocab]: final norm + LM head applied to each layer's output at the last position
    (the last entry equals the model's own logits)."""
    outs: list = [None] * lm.num_layers

    def hook(j):
        def h(module, args, output):
            hs = output[0] if isinstance(output, tuple) else output
            outs[j] = hs[:, -1]
        return h

    handles = [layer.register_forward_hook(hook(j)) for j, layer in enumerate(lm.layers)]
    try:
        _plain_forward(lm, batch)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([_head(lm, o) for o in outs])


__all__ = ["masking_sweep", "early_exit_logits"]
