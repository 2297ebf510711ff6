"""Layer sweeps that share the work common to all variants (Sec. 3's masking curves, early exit).

`masking_sweep` returns, for every masked layer ℓ, the logits at the last prompt position -- the same numbers as
running one masked forward per layer (``method="naive"``), computed with less work:

- ``knockout`` and one-layer ``zero``: both only change what the question tokens read at the masked layers, and
  nothing before the end of the image attends to a question token, so the keys and values of the prompt up to the
  image's end are computed once and shared by every variant (for zero, the masked layer's own image keys and values
  are computed once from zeroed inputs); only the question tokens are recomputed, all variants in one growing batch.
  Unpadded prompts keep one copy of the prefix keys and values: every variant's question rows read it through the
  split attention of `prefix` (prefix part folded over the variants, own suffix part, combined through their
  log-sum-exps); a padded batch tiles the prefix per variant under a masked attention.
  (A prompt that puts text before its last image token gets a shorter shared prefix; nothing else changes.)
- persistent ``zero`` (``onward=True``): layers below the first masked layer do not depend on the mask, so one
  plain pass records every layer's input; each variant starts from the recorded input of its first masked layer,
  and the variants run together as one growing batch through the layers above.

`early_exit_logits` applies the final norm and LM head to every layer's output.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch

from .intervene import intervene
from .plans import AttentionEdit, MaskImage, Plan, block_edges, check_layer, image_blocks, layer_window
from .prefix import Group, KeysRead, Unshareable, shared_prefix_attention
from .replay import (Ambiguous, fork_cache, head, language_model_cache, last_logits_only, layer_kv, position_slice,
                     record_decoder_call, record_inputs, record_outputs, reusable, set_layer_kv, text_after_image_start,
                     tile)


@dataclass(frozen=True)
class RowKnockout(Plan):
    """Image -> text knockout at each of ``layers``, in the rows of the batch that ``rows[layer]`` ([batch] bool)
    selects: the variants of a sweep, stacked along the batch, each with its own masked layers."""

    rows: dict

    def compile(self, site):
        img, text = site.groups["image"], site.groups["text"]
        return [AttentionEdit(j, block_edges(img, text, True, r)) for j, r in self.rows.items()]


def plain_forward(lm, batch, **extra):
    return lm.model(**batch.inputs, use_cache=False, **extra)


@torch.no_grad()
def masking_sweep(lm, batch, layers: Sequence[int] | None = None, *, mode: str = "zero", window: int = 1,
                  onward: bool = False, method: str = "reuse", chunk: int | None = None) -> dict:
    """Last-position logits with the image masked at each layer.

    Returns ``{"layers": [...], "logits": float32 [n_layers_swept, batch, vocab], "plain": float32 [batch, vocab]}``.
    ``method="naive"`` runs one masked forward per layer (the reference the fast path is tested against).
    ``chunk`` bounds how many variants run in one batch (memory); default all.

    >>> sweep = masking_sweep(lm, batch, mode="knockout")
    >>> tuple(sweep["logits"].shape)  # [layers, batch, vocab]
    (8, 2, 115)
    """
    L = lm.num_layers
    layers = list(range(L)) if layers is None else [check_layer(j, L) for j in layers]
    MaskImage(0, mode, window)  # validates mode / window
    if method not in ("reuse", "naive"):
        raise ValueError("method must be 'reuse' or 'naive'.")
    if lm.spec.injections or lm.spec.bidirectional_prefix:
        # the replays run decoder layers alone and would miss what the model adds between layers (DeepStack); a
        # prefix that attends both ways lets the image read the question, so no prefix is shared
        method = "naive"
    if method == "naive":
        plain = plain_forward(lm, batch).logits[:, -1].float()
        out = []
        for j in layers:
            with intervene(lm, batch, MaskImage(j, mode, window, onward)):
                out.append(plain_forward(lm, batch).logits[:, -1].float())
        return {"layers": layers, "logits": torch.stack(out), "plain": plain}
    if mode == "zero" and onward:
        return zero_sweep(lm, batch, layers, window, onward, chunk)
    if mode == "zero":
        try:
            return one_layer_zero_sweep(lm, batch, layers, window)
        except Ambiguous:  # batch dimension of a recorded input unclear: one variant at a time (never tiled)
            try:
                res = [one_layer_zero_sweep(lm, batch, [v], window) for v in layers]
            except Ambiguous:  # a cache it cannot fork (sliding-window layers): one masked forward per layer
                return masking_sweep(lm, batch, layers, mode=mode, window=window, method="naive")
            return {"layers": layers, "logits": torch.cat([r["logits"] for r in res]), "plain": res[0]["plain"]}
    try:
        return knockout_sweep(lm, batch, layers, window, onward)
    except Ambiguous:
        pass
    try:
        return knockout_sweep_batched(lm, batch, layers, window, onward, chunk)
    except Ambiguous:  # a cache it cannot crop and extend (sliding-window layers): one masked forward per layer
        return masking_sweep(lm, batch, layers, mode=mode, window=window, onward=onward, method="naive")


def zero_sweep(lm, batch, layers, window, onward, chunk):
    L = lm.num_layers
    with record_inputs(lm) as rec:
        plain = plain_forward(lm, batch).logits[:, -1].float()
    B = batch.size
    img = batch.image_mask
    windows = {v: set(layer_window(v, window, L, onward)) for v in layers}
    chunk = chunk or len(layers)
    results = {}
    for c in range(0, len(layers), chunk):
        variants = layers[c:c + chunk]
        try:
            results.update(run_growing(lm, rec, variants, windows, img, B, batched=True))
        except Ambiguous:
            for v in variants:
                results.update(run_growing(lm, rec, [v], windows, img, B, batched=False))
    return {"layers": layers, "logits": torch.stack([results[v] for v in layers]), "plain": plain}


def join(hidden, active: list, rec, j: int, new: list, P: int):
    """The growing batch at layer j: variants whose first masked layer is j join it (``active`` is extended in
    place) with the plain pass's layer-j input from position P on; below that layer they equal the plain run."""
    if not new:
        return hidden
    h0 = rec.hidden(j)[:, P:]
    active += new
    return torch.cat([hidden] + [h0] * len(new)) if hidden is not None else torch.cat([h0] * len(new))


def run_growing(lm, rec, variants, windows, img, B, batched):
    """Run variants through the decoder from their first masked layer, stacked as one growing batch."""
    check_replayable(lm)
    start = {v: min(windows[v]) for v in variants}
    active: list[int] = []
    hidden = None
    for j in range(min(start.values()), lm.num_layers):
        args, kwargs = rec.rest(j)
        hidden = join(hidden, active, rec, j, [v for v in variants if start[v] == j], 0)
        n = len(active)
        zero_rows = torch.tensor([j in windows[v] for v in active], device=img.device).repeat_interleave(B)
        if zero_rows.any():
            m = img.repeat(n, 1) & zero_rows[:, None]
            hidden = hidden.masked_fill(m[..., None].to(hidden.device), 0.0)  # layer j's device (device_map)
        kw = {k: tile(v, B, n) for k, v in kwargs.items()}
        out = lm.layers[j](hidden, *(tile(a, B, n) for a in args), **kw)
        hidden = out[0] if isinstance(out, tuple) else out
    last = head(lm, hidden[:, -1])
    return {v: last[i * B:(i + 1) * B] for i, v in enumerate(active)}


def check_replayable(lm) -> None:
    """A replay runs decoder layers alone; it would miss what the model adds between layers (`ArchSpec.injections`)."""
    if lm.spec.injections:
        raise ValueError(f"{lm.spec.label} has injections between layers ({lm.spec.injections}); a replay of its "
                         "layers would miss them: use method='naive'.")
    if lm.spec.bidirectional_prefix:
        raise ValueError(f"{lm.spec.label}'s image reads the question (a prefix that attends both ways); a replay "
                         "that shares the prompt up to the image would miss it: use method='naive'.")


def decoder_inputs(lm, batch):
    """One plain pass with a KV cache; returns (plain last logits, the kwargs the decoder received, the cache)."""
    check_replayable(lm)
    with record_decoder_call(lm) as captured:
        out = lm.model(**batch.inputs, use_cache=True)
    if "positional" in captured or captured.get("inputs_embeds") is None:
        raise RuntimeError(f"{lm.spec.label}: the decoder was not called with inputs_embeds; use method='naive'.")
    cache = language_model_cache(out)
    if not reusable(cache):
        raise Ambiguous
    return out.logits[:, -1].float(), captured, cache


def knockout_sweep_batched(lm, batch, layers, window, onward, chunk):
    """Fallback: every variant's question suffix through every layer, all variants in one batch."""
    L, B, S = lm.num_layers, batch.size, batch.seq_len
    plain, kw, cache = decoder_inputs(lm, batch)
    embeds = kw.pop("inputs_embeds")
    mask2d = kw.pop("attention_mask", None)
    pos = kw.pop("position_ids", None)
    for k in ("past_key_values", "use_cache", "input_ids", "return_dict", "output_hidden_states",
              "output_attentions", "cache_position"):
        kw.pop(k, None)
    if mask2d is not None and (not torch.is_tensor(mask2d) or mask2d.ndim != 2):
        raise RuntimeError("knockout sweep expects a 2-D padding mask; use method='naive'.")
    P = text_after_image_start(batch.image_mask, mask2d)
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
        vbatch = batch.tile(n, interleave=True)
        # each row knocks out at its own variant's layers
        owner = {j: torch.tensor([j in windows[v] for v in variants], device=batch.image_mask.device).repeat(B)
                 for j in sorted(set().union(*(windows[v] for v in variants)))}
        with intervene(lm, vbatch, RowKnockout(owner)):
            out = lm.decoder(inputs_embeds=suffix, attention_mask=m2, position_ids=p2, past_key_values=cc,
                             use_cache=True, **kw)
        last = lm.lm_head(out.last_hidden_state[:, -1]).float().view(B, n, -1)
        for i, v in enumerate(variants):
            results[v] = last[:, i]
    return {"layers": layers, "logits": torch.stack([results[v] for v in layers]), "plain": plain}


def knockout_sweep(lm, batch, layers, window, onward):
    """Shared prefix + growing batch over the question suffix, for knockout and one-layer zero masks.

    Nothing before the image's end depends on either mask, and below its first masked layer a variant's question
    tokens are the plain run's. So one plain pass (with a KV cache, recording each layer's input) serves every
    variant: at layer j, the variants whose window has started run their question tokens through layer j, attending
    to the prefix keys and values of that layer plus their own. For knockout the prefix keys and values are the
    plain ones (the edit is on the attention of the question rows); for one-layer zero they are the plain ones except
    at the variant's masked layers, where they are computed once from zeroed image inputs.
    """
    return suffix_sweep(lm, batch, layers, window, onward, "knockout")


def one_layer_zero_sweep(lm, batch, layers, window):
    return suffix_sweep(lm, batch, layers, window, False, "zero")


def suffix_sweep(lm, batch, layers, window, onward, mode):
    L, B, S = lm.num_layers, batch.size, batch.seq_len
    with record_inputs(lm) as rec:
        out = lm.model(**batch.inputs, use_cache=True, **last_logits_only(lm))
    plain = out.logits[:, -1].float()
    cache = language_model_cache(out)
    if not reusable(cache):
        raise Ambiguous
    P = text_after_image_start(batch.image_mask, batch.inputs.get("attention_mask"))
    device = batch.image_mask.device
    img = batch.image_mask
    prefix_kv = [layer_kv(cache, j, P) for j in range(L)]
    windows = {v: set(layer_window(v, window, L, onward)) for v in layers}
    start = {v: min(windows[v]) for v in layers}
    zero_kv = {}
    if mode == "zero":  # each masked layer's prefix keys and values, computed once from zeroed image inputs
        for j in sorted(set().union(*windows.values())):
            args, kwargs = rec.rest(j)
            h = rec.hidden(j)[:, :P]
            h = h.masked_fill(img[:, :P, None].to(h.device), 0.0)
            scratch = fork_cache(cache, j)
            lm.layers[j](h, *args, past_key_values=scratch, **position_slice(kwargs, 0, P, S, P, B, device))
            zero_kv[j] = layer_kv(scratch, j)
    suffix_img = img[:, P:]
    suffix_block = image_blocks(img, batch.image_positions, batch.grids)[:, P:]  # restored after a one-layer zero
    if shares_prefix(rec, img, P, S):
        try:
            results = shared_suffix_pass(lm, rec, layers, windows, start, prefix_kv, zero_kv, img, P, S, mode)
        except Unshareable:
            results = None
        if results is not None:
            return {"layers": layers, "logits": torch.stack([results[v] for v in layers]), "plain": plain}
    active: list[int] = []
    hidden = None
    for j in range(min(start.values()), L):
        args, kwargs = rec.rest(j)
        hidden = join(hidden, active, rec, j, [v for v in layers if start[v] == j], P)
        n = len(active)
        kw = {k: tile(v, B, n) for k, v in position_slice(kwargs, P, S, S, S, B, device).items()}
        masked = torch.tensor([j in windows[v] for v in active], device=device).repeat_interleave(B)  # rows
        k0, v0 = prefix_kv[j]
        if mode == "zero" and masked.any():
            kz, vz = zero_kv[j]
            pick = masked[:, None, None, None].to(kz.device)
            set_layer_kv(cache, j, torch.where(pick, kz.repeat(n, 1, 1, 1), k0.repeat(n, 1, 1, 1)),
                         torch.where(pick, vz.repeat(n, 1, 1, 1), v0.repeat(n, 1, 1, 1)))
        else:
            set_layer_kv(cache, j, k0.repeat(n, 1, 1, 1), v0.repeat(n, 1, 1, 1))
        rest = tuple(tile(a, B, n) for a in args)
        if mode == "knockout":
            with intervene(lm, batch.tile(n), RowKnockout({j: masked})):
                res = lm.layers[j](hidden, *rest, past_key_values=cache, **kw)
            hidden = res[0] if isinstance(res, tuple) else res
            continue
        zero_here = suffix_img.repeat(n, 1) & masked[:, None]  # image positions past P of the masked rows
        res = lm.layers[j](hidden.masked_fill(zero_here[..., None].to(hidden.device), 0.0), *rest,
                           past_key_values=cache, **kw)
        out_j = res[0] if isinstance(res, tuple) else res
        keep = suffix_block.repeat(n, 1) & masked[:, None]
        if keep.any() and j + 1 < L:  # the image blocks' own outputs stay unmasked: the plain pass's
            out_j = torch.where(keep[..., None].to(out_j.device),
                                rec.hidden(j + 1)[:, P:].repeat(n, 1, 1).to(out_j.device), out_j)
        hidden = out_j
    last = head(lm, hidden[:, -1])
    results = {v: last[i * B:(i + 1) * B] for i, v in enumerate(active)}
    return {"layers": layers, "logits": torch.stack([results[v] for v in layers]), "plain": plain}


def shares_prefix(rec, img, P: int, S: int) -> bool:
    """Whether every question row reads every prefix key and its own suffix causally, at every layer (no image token
    after P, no padding, no other masking): then all variants can share one copy of the prefix (`prefix`)."""
    if P >= S or img[:, P:].any():
        return False
    verdict: dict[int, bool] = {}  # layers usually share one mask tensor: check each tensor once
    for j in range(len(rec.inputs)):
        args, kwargs = rec.rest(j)
        if args:  # positional inputs: their positions could not be sliced
            return False
        mask = kwargs.get("attention_mask")
        if mask is None:  # the kernel's own causal mask
            continue
        if id(mask) not in verdict:
            verdict[id(mask)] = causal_rows(mask, P, S)
        if not verdict[id(mask)]:
            return False
    return True


def causal_rows(mask, P: int, S: int) -> bool:
    """Whether rows [P, S) of a recorded [batch, 1, q, k] mask are exactly causal over keys [0, S)."""
    if not torch.is_tensor(mask) or mask.ndim != 4 or mask.shape[-2] < S or mask.shape[-1] < S:
        return False
    m = mask[:, :, P:S, :S]
    allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    q = torch.arange(P, S, device=m.device)
    return bool((allowed == (torch.arange(S, device=m.device)[None, :] <= q[:, None])).all())


def shared_suffix_pass(lm, rec, layers, windows, start, prefix_kv, zero_kv, img, P, S, mode):
    """The question suffix of every variant, stacked as one growing batch, through the layers from its first masked
    layer, all reading one copy of the prefix keys and values (`prefix.split_attention`); None if a knockout's
    prefix differs between the samples of the batch."""
    L, B = lm.num_layers, img.shape[0]
    keep = None
    if mode == "knockout":  # the prefix keys a knocked-out question row still reads: the text before the image
        text = ~img[:, :P]
        if not bool((text == text[:1]).all()):
            return None
        keep = text[0].nonzero().squeeze(1)
    active: list[int] = []
    hidden = None
    with shared_prefix_attention(lm, B) as shared:
        for j in range(min(start.values()), L):
            args, kwargs = rec.rest(j)
            hidden = join(hidden, active, rec, j, [v for v in layers if start[v] == j], P)
            n = len(active)
            sliced = position_slice({k: v for k, v in kwargs.items() if k != "attention_mask"}, P, S, S, S, B,
                                    img.device)
            kw = {k: tile(v, B, n) for k, v in sliced.items()}
            if "attention_mask" in kwargs:
                kw["attention_mask"] = None  # split_attention masks by construction (checked by shares_prefix)
            k0, v0 = prefix_kv[j]
            masked = [j in windows[v] for v in active]
            groups, i = [], 0
            while i < n:  # runs of consecutive variants that read the same prefix
                e = i
                while e < n and masked[e] == masked[i]:
                    e += 1
                kv = (k0, v0)
                if masked[i] and mode == "zero":
                    kv = zero_kv[j]
                elif masked[i]:
                    idx = keep.to(k0.device)
                    kv = (k0.index_select(-2, idx), v0.index_select(-2, idx))
                groups.append(Group(slice(i * B, e * B), *kv))
                i = e
            shared.groups = groups
            if j == L - 1:  # only the last position of the final layer is read (the head below)
                hidden = final_layer(lm, j, hidden, shared, kw, kwargs, n, P, S, B, img.device)
                break
            res = lm.layers[j](hidden, past_key_values=None, **kw)
            hidden = res[0] if isinstance(res, tuple) else res
    last = head(lm, hidden[:, -1])
    return {v: last[i * B:(i + 1) * B] for i, v in enumerate(active)}


def final_layer(lm, j, hidden, shared, kw, kwargs, n, P, S, B, device):
    """The last layer for the last position: one call reads every suffix position's keys and values and stops at
    the attention (`KeysRead`); a second runs the last position alone through the whole layer, attending to them."""
    shared.keys_only = True
    try:
        lm.layers[j](hidden, past_key_values=None, **kw)
    except KeysRead:
        pass
    finally:
        shared.keys_only = False
    if shared.suffix_kv is None:
        raise Unshareable  # the layer never called its attention (a model we do not know): take the unshared path
    last = position_slice({k: v for k, v in kwargs.items() if k != "attention_mask"}, S - 1, S, S, S, B, device)
    kw_last = {k: tile(v, B, n) for k, v in last.items()}
    if "attention_mask" in kw:
        kw_last["attention_mask"] = None
    try:
        res = lm.layers[j](hidden[:, -1:], past_key_values=None, **kw_last)
    finally:
        shared.suffix_kv = None
    return res[0] if isinstance(res, tuple) else res


@torch.no_grad()
def early_exit_logits(lm, batch) -> torch.Tensor:
    """float32 [layers, batch, vocab]: final norm + LM head applied to each layer's output at the last position
    (the last entry equals the model's own logits)."""
    with record_outputs(lm, range(lm.num_layers)) as outs:
        plain_forward(lm, batch)
    return torch.stack([head(lm, outs[j]) for j in range(lm.num_layers)])


__all__ = ["masking_sweep", "early_exit_logits", "RowKnockout", "plain_forward"]
