"""Attention of many variants' suffix queries to one shared prompt prefix, without copying the prefix per variant.

A sweep stacks its variants along the batch; each runs only the question suffix [P, S) through a layer, and all of
them read the same prefix keys and values [0, P) (or one of a few shared sets: a one-layer zero mask's zeroed image,
a knockout's prefix without the image). Tiling the prefix per variant and running one masked attention over
[prefix + suffix] made the prefix copies (and sdpa's repeat_kv of them) and the mask edits cost about as much as the
attention itself. Here a layer's attention is split by keys:

- the prefix part: the suffix queries of every variant that reads the same prefix, folded into the query rows of
  one call (variants x GQA group x suffix positions) against the single copy of the prefix, no mask;
- the suffix part: each variant's own suffix, causal;

and the two are combined exactly through their log-sum-exps (softmax over the union of the keys). Inside
`shared_prefix_attention` the decoder runs this attention function; layers are called without a cache, so the keys
and values the attention receives are the suffix's own.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .override import attention_modules, attention_override, override_of, register_attention

NAME = "fusion_shared_prefix"


class Unshareable(Exception):
    """The layer's attention has a feature the split cannot reproduce (sliding window, soft-capping, sinks,
    dropout): the caller runs its unshared path."""


@dataclass
class Group:
    """Batch rows (variant-major, ``B`` samples per variant) that read the same prefix keys and values
    ([B, kv heads, P', dim]; P' = 0: no prefix key is visible to them)."""

    rows: slice | torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor


class KeysRead(Exception):
    """Raised by `split_attention` in a keys-only call (`SharedPrefix.keys_only`) once it has stored the call's
    keys and values: what the layer computes after its attention is not needed."""


class SharedPrefix:
    """What the attention of the current layer call reads besides the suffix: ``groups`` covers every batch row.

    A sweep's final layer is called twice, because only its last position's output is read (the head): first with
    ``keys_only`` set, for every suffix position (the attention stores their keys and values in ``suffix_kv`` and
    raises `KeysRead`, so the layer's output projection and MLP never run on positions nobody reads), then with the
    last position alone, which attends to ``suffix_kv`` instead of its own key and value."""

    def __init__(self, batch_size: int):
        self.B = batch_size
        self.groups: list[Group] = []
        self.keys_only = False
        self.suffix_kv: tuple[torch.Tensor, torch.Tensor] | None = None


def attend(q, k, v, scale: float, causal: bool, fused: bool | None = None):
    """(softmax(q k^T * scale) v, its log-sum-exp [.., q]) -- float32 log-sum-exp; causal aligns the first query
    with the first key. ``fused`` (default: on CPU) uses torch's CPU flash kernel, the one sdpa runs there, which
    also returns the log-sum-exp; elsewhere the scores are materialised."""
    if fused is None:
        # the kernel is an aten op outside torch's public API: a torch build without it takes the portable path
        fused = q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    if fused:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse.float()
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        n, m = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(n, m, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]), v.float()).to(q.dtype)
    return out, lse


def fold(x: torch.Tensor, B: int, kv_heads: int) -> torch.Tensor:
    """[m*B, H, T, D] (variant-major) -> [B, kv heads, m * group * T, D]: every query of a KV head in one row block."""
    N, H, T, D = x.shape
    m, g = N // B, H // kv_heads
    return x.reshape(m, B, kv_heads, g, T, D).permute(1, 2, 0, 3, 4, 5).reshape(B, kv_heads, m * g * T, D)


def unfold(x: torch.Tensor, B: int, H: int, T: int) -> torch.Tensor:
    """The inverse of `fold`, also for log-sum-exps (no trailing dim)."""
    kv_heads = x.shape[1]
    m, g = x.shape[2] // (H // kv_heads * T), H // kv_heads
    tail = x.shape[3:]
    return x.reshape(B, kv_heads, m, g, T, *tail).permute(2, 0, 1, 3, 4, *range(5, 5 + len(tail))).reshape(
        m * B, H, T, *tail)


def split_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    state = override_of(module)
    if not isinstance(state, SharedPrefix):
        raise RuntimeError("shared-prefix attention called outside a shared_prefix_attention() block.")
    if dropout or any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux")):
        raise Unshareable
    if state.keys_only:
        state.suffix_kv = (key, value)
        raise KeysRead
    causal = state.suffix_kv is None  # else the queries are the last positions of suffix_kv: they read all of it
    if not causal:
        key, value = state.suffix_kv
    N, H, T, D = query.shape
    kv_heads, K = key.shape[1], key.shape[2]
    g = H // kv_heads
    scale = scaling if scaling is not None else D ** -0.5
    if g > 1:  # the suffix is short: repeating its keys and values is cheap
        key, value = (x[:, :, None].expand(N, kv_heads, g, K, D).reshape(N, H, K, D) for x in (key, value))
    out, lse = attend(query, key, value, scale, causal=causal and T > 1)
    for grp in state.groups:
        if grp.keys.shape[-2] == 0:
            continue
        o_p, lse_p = attend(fold(query[grp.rows], state.B, kv_heads), grp.keys, grp.values, scale, causal=False)
        combine(out, lse, grp.rows, unfold(o_p, state.B, H, T), unfold(lse_p, state.B, H, T))
    return out.transpose(1, 2).contiguous(), None


def combine(out, lse, rows, o_p, lse_p) -> None:
    """out[rows] (attention over the suffix keys, log-sum-exp lse[rows]) becomes the attention over the suffix and
    the prefix keys: the softmax over the union weighs the prefix part by sigmoid(lse_p - lse_s)."""
    w = torch.sigmoid(lse_p - lse[rows])[..., None]
    if out.dtype == torch.float32 and isinstance(rows, slice):  # in place: one pass, no temporaries
        out[rows].lerp_(o_p, w)
        return
    o_s = out[rows].float()
    out[rows] = (o_s + (o_p.float() - o_s) * w).to(out.dtype)


def ensure_registered() -> str:
    return register_attention(NAME, split_attention, mask_like="sdpa")


@contextmanager
def shared_prefix_attention(lm, batch_size: int):
    """Inside the block, every decoder layer's attention is `split_attention` reading the yielded `SharedPrefix`
    (set its ``groups`` before each layer call, and call layers with ``past_key_values=None``)."""
    state = SharedPrefix(batch_size)
    current = [override_of(m) for m in attention_modules(lm)]
    if any(isinstance(c, SharedPrefix) for c in current):
        raise RuntimeError("shared_prefix_attention() blocks cannot nest.")
    if any(c is not None for c in current):  # attention edits of an enclosing intervene() must still apply
        raise Unshareable
    with attention_override(lm, ensure_registered(), payloads=[state] * len(current)):
        yield state


__all__ = ["Group", "KeysRead", "SharedPrefix", "Unshareable", "shared_prefix_attention", "split_attention", "attend"]
