"""Interventions on the image tokens of a decoder, installed by one context manager (cf. baukit's nethook).

Plans say *what* to do; `intervene(lm, batch, *plans)` installs them and always removes them:

- `MaskImage(layer, mode="zero")` -- the paper's masking probe (Sec. 3): image-position hidden states set to zero at
  the input of a layer. ``mode="knockout"``: at that layer, non-image queries cannot attend to image keys.
  ``window=k`` covers k consecutive layers centred on ``layer`` (the cross-modal information flow protocol uses 9);
  ``onward=True`` masks from ``layer`` to the last layer.
- `Knockout(layer, src, dst)` -- general attention-edge knockout between token groups (image, text, prefix,
  question, last), e.g. image -> last.
- `ScaleImage(layer, factor, tokens)` -- scale the hidden states of chosen image tokens by λ at a layer's input
  (the soft mask of contrastive attention, Sec. 5).
- `CaptureAttention()` -- per layer and head, the attention of the last prompt token (and optionally of every
  generated token) to each image token, in float32, computed for those rows only.

Hidden-state plans are forward pre-hooks on decoder layers. Attention-level plans go through one attention function
registered with transformers' ``AttentionInterface`` (with its mask function registered alongside, so causality is
kept); it wraps the model's own kernel (sdpa or eager) and calls it unchanged for every other row and layer. All
plans act in prefill and in every generation step.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import torch

GROUPS = ("image", "text", "prefix", "question", "last")
_ACTIVE: dict[int, tuple["_State", int]] = {}  # id(attention module) -> (state, layer index)
_REGISTERED: set[str] = set()


# --- plans ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MaskImage:
    layer: int
    mode: str = "zero"  # "zero" | "knockout"
    window: int = 1
    onward: bool = False

    def __post_init__(self):
        if self.mode not in ("zero", "knockout"):
            raise ValueError(f"Unknown masking mode {self.mode!r}; use 'zero' or 'knockout'.")
        if self.window < 1:
            raise ValueError("window must be a positive number of layers.")


@dataclass(frozen=True)
class Knockout:
    layer: int
    src: str = "image"  # keys that cannot be attended to
    dst: str = "text"  # queries that lose access
    window: int = 1

    def __post_init__(self):
        for g in (self.src, self.dst):
            if g not in GROUPS:
                raise ValueError(f"Unknown token group {g!r}; use one of {', '.join(GROUPS)}.")


@dataclass(frozen=True)
class ScaleImage:
    layer: int
    factor: float
    tokens: Sequence | None = None  # per sample: indices into its image tokens, or a bool mask; None = all


@dataclass(frozen=True)
class CaptureAttention:
    layers: Sequence[int] | None = None  # None = every layer
    steps: str = "prefill"  # "prefill": the last prompt token; "all": also every generated token

    def __post_init__(self):
        if self.steps not in ("prefill", "all"):
            raise ValueError("CaptureAttention.steps must be 'prefill' or 'all'.")


def layer_window(layer: int, window: int, n_layers: int, onward: bool = False) -> list[int]:
    if onward:
        return list(range(layer, n_layers))
    lo = layer - (window - 1) // 2
    return [j for j in range(lo, lo + window) if 0 <= j < n_layers]


def check_layer(layer: int, n_layers: int) -> int:
    if not isinstance(layer, (int,)) or isinstance(layer, bool):
        raise TypeError(f"Layer must be an int, got {type(layer).__name__}.")
    idx = layer + n_layers if layer < 0 else layer
    if not 0 <= idx < n_layers:
        raise ValueError(f"Layer {layer} is out of range: this model has {n_layers} decoder layers (0 to {n_layers - 1}).")
    return idx


# --- captured attention -----------------------------------------------------------------------------------------

@dataclass
class AttentionMaps:
    """Last-token -> image-token attention. ``values``: float32 [batch, layers, heads, image tokens] (NaN pads
    samples with fewer image tokens). ``steps`` holds generated tokens' rows when captured with steps='all'."""

    values: torch.Tensor
    layers: list[int]
    n_tokens: list[int]
    grids: list
    steps: list[torch.Tensor] = field(default_factory=list)  # each [batch, layers, heads, image tokens]

    def head_mean(self, renormalize: bool = True) -> torch.Tensor:
        """[batch, layers, image tokens]: mean over heads, renormalised to sum to 1 over the image tokens."""
        m = self.values.mean(dim=2)
        if renormalize:
            m = m / m.nansum(dim=-1, keepdim=True).clamp_min(1e-30)
        return m

    def sample(self, b: int, renormalize: bool = True) -> torch.Tensor:
        """[layers, n_tokens of sample b] head-mean map of one sample, padding removed."""
        return self.head_mean(renormalize)[b, :, : self.n_tokens[b]]

    def image_mass(self) -> torch.Tensor:
        """[batch, layers, heads]: total attention the query gives to the image (before renormalisation)."""
        return self.values.nansum(dim=-1)


# --- state shared by hooks and the attention function ----------------------------------------------------------

class _State:
    def __init__(self, lm, batch, plans):
        self.lm = lm
        self.n_layers = lm.num_layers
        img = batch.image_mask.bool()
        valid = batch.inputs.get("attention_mask")
        valid = torch.ones_like(img) if valid is None else valid.bool().to(img.device)
        B, S = img.shape
        self.B, self.S, self.device = B, S, img.device
        pos = torch.arange(S, device=img.device)
        first = torch.where(img, pos, S).min(dim=1).values
        last_img = torch.where(img, pos, -1).max(dim=1).values
        text = valid & ~img
        self.groups = {
            "image": img,
            "text": text,
            "prefix": text & (pos[None] < first[:, None]),
            "question": text & (pos[None] > last_img[:, None]) & (pos[None] < S - 1),
            "last": text & (pos[None] == S - 1),
        }
        self.image_positions = batch.image_positions
        self.grids = batch.grids
        self.zero: dict[int, bool] = {}
        self.scale: dict[int, torch.Tensor] = {}  # layer -> factors [B, S]
        self.knock: dict[int, list[tuple[str, str]]] = {}
        self.capture: CaptureAttention | None = None
        self.captured: dict[int, list[torch.Tensor]] = {}
        self.row_filter: dict[int, torch.Tensor] | None = None  # sweeps: per layer, the rows its knockout edits
        for p in plans:
            self._add(p, batch)

    # plans -> per-layer tables
    def _add(self, p, batch):
        L = self.n_layers
        if isinstance(p, MaskImage):
            layers = layer_window(check_layer(p.layer, L), p.window, L, p.onward)
            for j in layers:
                if p.mode == "zero":
                    self.zero[j] = True
                else:
                    self.knock.setdefault(j, []).append(("image", "text"))
        elif isinstance(p, Knockout):
            for j in layer_window(check_layer(p.layer, L), p.window, L):
                self.knock.setdefault(j, []).append((p.src, p.dst))
        elif isinstance(p, ScaleImage):
            j = check_layer(p.layer, L)
            f = self.scale.get(j, torch.ones(self.B, self.S, device=self.device))
            f = f.clone()
            for b in range(self.B):
                pos = self.image_positions[b]
                sel = p.tokens[b] if p.tokens is not None else None
                if sel is None:
                    chosen = pos
                else:
                    sel = torch.as_tensor(sel, device=pos.device)
                    if sel.dtype == torch.bool:
                        if sel.numel() != len(pos):
                            raise ValueError(f"ScaleImage: sample {b} has {len(pos)} image tokens but the mask has "
                                             f"{sel.numel()} entries.")
                        chosen = pos[sel]
                    else:
                        if len(sel) and (sel.max() >= len(pos) or sel.min() < -len(pos)):
                            raise ValueError(f"ScaleImage: token index out of range for sample {b} "
                                             f"({len(pos)} image tokens).")
                        chosen = pos[sel.long()]
                f[b, chosen] = f[b, chosen] * float(p.factor)
            self.scale[j] = f
        elif isinstance(p, CaptureAttention):
            if self.capture is not None:
                raise ValueError("Pass one CaptureAttention plan per intervene() call.")
            self.capture = p
            self.capture_layers = set(range(L)) if p.layers is None else {check_layer(j, L) for j in p.layers}
        else:
            raise TypeError(f"Unknown plan {p!r}; use MaskImage, Knockout, ScaleImage or CaptureAttention.")

    @property
    def needs_attention(self) -> bool:
        return bool(self.knock) or self.capture is not None

    def group(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Membership of absolute positions [start, stop) in a token group; generated tokens are text and last."""
        m = self.groups[name]
        inside = m[:, start:min(stop, self.S)]
        if stop > self.S:
            gen = torch.full((self.B, stop - max(start, self.S)), name in ("text", "last"), device=m.device)
            inside = torch.cat([inside, gen], dim=1)
        return inside

    # hidden-state edits (forward pre-hook on decoder layer j)
    def edit_hidden(self, j: int, hidden: torch.Tensor, offset: int) -> torch.Tensor:
        q = hidden.shape[1]
        if offset >= self.S:
            return hidden  # generated tokens are never image tokens
        if self.zero.get(j):
            img = self.group("image", offset, offset + q)
            hidden = hidden.masked_fill(img[..., None], 0.0)
        if j in self.scale:
            f = self.scale[j][:, offset:offset + q]
            if q > f.shape[1]:
                f = torch.cat([f, torch.ones(self.B, q - f.shape[1], device=f.device)], dim=1)
            hidden = hidden * f[..., None].to(hidden.dtype)
        return hidden

    # attention-level edits (inside the registered attention function)
    def allowed(self, j, mask, q_len, k_len, dtype_kind) -> torch.Tensor | None:
        """Boolean [B, 1, q, k] mask with this layer's knockouts applied (None if nothing to change)."""
        edges = self.knock.get(j)
        if not edges:
            return None
        start = k_len - q_len
        allowed = _as_bool(mask, self.B, q_len, k_len, start, self.device)
        block = torch.zeros(self.B, q_len, k_len, dtype=torch.bool, device=self.device)
        for src, dst in edges:
            block |= self.group(dst, start, k_len)[:, :, None] & self.group(src, 0, k_len)[:, None, :]
        if self.row_filter is not None:
            block &= self.row_filter[j][:, None, None]
        new = allowed & ~block[:, None]
        keep = new.any(dim=-1, keepdim=True)  # never leave a row with nothing to attend (padding rows)
        return torch.where(keep, new, allowed)

    def record(self, j, module, query, key, mask, scaling):
        """Attention of the captured query rows to the image tokens, float32, for these rows only."""
        q_len, k_len = query.shape[2], key.shape[2]
        start = k_len - q_len
        if start <= self.S - 1 < k_len:
            rows = [self.S - 1 - start]
        elif start >= self.S and self.capture.steps == "all":
            rows = list(range(q_len))
        else:
            return
        B, H, _, D = query.shape
        Hkv = key.shape[1]
        g = H // Hkv
        r = len(rows)
        q = query[:, :, rows, :].float().reshape(B, Hkv, g * r, D)
        scores = torch.matmul(q, key.float().transpose(-1, -2)).reshape(B, H, r, k_len)
        scores = scores * (scaling if scaling is not None else D ** -0.5)
        allowed = _rows_bool(mask, self.B, rows, q_len, k_len, start, self.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # [B, H, r, K]
        idx, pad = self._gather_index(probs.device)
        n_max = idx.shape[1]
        img = probs.gather(-1, idx[:, None, None, :].expand(B, H, r, n_max))
        img = img.masked_fill(pad[:, None, None, :], float("nan"))
        self.captured.setdefault(j, []).append(img.permute(2, 0, 1, 3).detach())  # [r, B, H, N]

    def _gather_index(self, device):
        if getattr(self, "_gather", None) is None:
            n_max = max(len(p) for p in self.image_positions)
            idx = torch.zeros(self.B, n_max, dtype=torch.long, device=device)
            pad = torch.ones(self.B, n_max, dtype=torch.bool, device=device)
            for b, p in enumerate(self.image_positions):
                idx[b, : len(p)] = p
                pad[b, : len(p)] = False
            self._gather = (idx, pad)
        return self._gather

    def attention_maps(self) -> AttentionMaps:
        if self.capture is None:
            raise ValueError("No attention was captured: add CaptureAttention() to the intervene() call.")
        if not self.captured:
            raise RuntimeError("CaptureAttention was installed but no forward pass ran inside the with-block.")
        layers = sorted(self.captured)
        per_layer = [torch.cat(self.captured[j], dim=0) for j in layers]  # each [rows total, B, H, N]
        stacked = torch.stack(per_layer, dim=2)  # [rows, B, L, H, N]
        return AttentionMaps(stacked[0], layers, [len(p) for p in self.image_positions], self.grids,
                             steps=list(stacked[1:]))


def _as_bool(mask, B, q_len, k_len, start, device) -> torch.Tensor:
    """The layer's attention mask as booleans [B, 1, q, k] (True = may attend), building the causal one if absent."""
    if mask is None:
        qpos = torch.arange(start, start + q_len, device=device)
        causal = torch.arange(k_len, device=device)[None, :] <= qpos[:, None]
        return causal[None, None].expand(B, 1, q_len, k_len)
    mask = mask[..., -q_len:, :k_len]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask.expand(B, 1, q_len, k_len)


def _rows_bool(mask, B, rows, q_len, k_len, start, device) -> torch.Tensor:
    """Rows ``rows`` (indices into this call's queries) of the boolean mask: [B, 1, len(rows), k]."""
    if mask is None:
        qpos = torch.tensor(rows, device=device) + start
        causal = torch.arange(k_len, device=device)[None, :] <= qpos[:, None]
        return causal[None, None].expand(B, 1, len(rows), k_len)
    return _as_bool(mask, B, q_len, k_len, start, device)[:, :, rows, :]


# --- the registered attention function --------------------------------------------------------------------------

def _inner_function(name: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager":
        from transformers.models.llama.modeling_llama import eager_attention_forward

        return eager_attention_forward
    if name not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"Cannot wrap attention implementation {name!r}; load the model with "
                         "attn_implementation='sdpa' or 'eager'.")
    return ALL_ATTENTION_FUNCTIONS[name]


def _ensure_registered(inner_name: str) -> str:
    name = f"fusion_{inner_name}"
    if name in _REGISTERED:
        return name
    if inner_name not in ("sdpa", "eager"):
        raise ValueError(f"Attention-level interventions need attn_implementation 'sdpa' or 'eager', not "
                         f"{inner_name!r}; reload the model with attn_implementation='sdpa'.")
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    inner = _inner_function(inner_name)
    boolean = inner_name == "sdpa"

    def fusion_attention(module, query, key, value, attention_mask, *args, scaling=None, **kwargs):
        entry = _ACTIVE.get(id(module))
        if entry is not None:
            state, j = entry
            q_len, k_len = query.shape[2], key.shape[2]
            new = state.allowed(j, attention_mask, q_len, k_len, boolean)
            if new is not None:
                if boolean:
                    attention_mask = new
                else:
                    dtype = attention_mask.dtype if attention_mask is not None else query.dtype
                    attention_mask = torch.zeros(new.shape, dtype=dtype, device=new.device).masked_fill(
                        ~new, torch.finfo(dtype).min)
            if state.capture is not None and j in state.capture_layers:
                state.record(j, module, query, key, attention_mask, scaling)
        return inner(module, query, key, value, attention_mask, *args, scaling=scaling, **kwargs)

    AttentionInterface.register(name, fusion_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner_name])
    _REGISTERED.add(name)
    return name


# --- the context manager ------------------------------------------------------------------------------------------

class Intervention:
    """What `intervene` yields: the installed state; ``.attention`` gives the captured maps after a forward."""

    def __init__(self, state: _State):
        self._state = state

    @property
    def attention(self) -> AttentionMaps:
        return self._state.attention_maps()


def _offset(kwargs, j) -> int:
    cache = kwargs.get("past_key_values")
    return cache.get_seq_length(j) if cache is not None else 0


@contextmanager
def intervene(lm, batch, *plans):
    """Install ``plans`` on ``lm`` for the prompts of ``batch``; everything is removed on exit, also on errors.

    >>> with intervene(lm, batch, MaskImage(3), CaptureAttention()) as run:
    ...     logits = lm.model(**batch.inputs).logits
    >>> run.attention.values.shape  # [batch, layers, heads, image tokens]
    """
    state = _State(lm, batch, plans)
    layers = lm.layers
    attn_modules = [layer.self_attn for layer in layers]
    if any(id(m) in _ACTIVE for m in attn_modules):
        raise RuntimeError("This model is already inside an intervene() block; pass all plans to one intervene() call.")
    cfg = lm.decoder.config
    old_impl = cfg._attn_implementation
    handles = []
    try:
        if state.needs_attention:
            cfg._attn_implementation = _ensure_registered(old_impl)
            for j, m in enumerate(attn_modules):
                _ACTIVE[id(m)] = (state, j)
        for j in sorted(set(state.zero) | set(state.scale)):
            def pre_hook(module, args, kwargs, j=j):
                if args:
                    return (state.edit_hidden(j, args[0], _offset(kwargs, j)), *args[1:]), kwargs
                kwargs["hidden_states"] = state.edit_hidden(j, kwargs["hidden_states"], _offset(kwargs, j))
                return args, kwargs

            handles.append(layers[j].register_forward_pre_hook(pre_hook, with_kwargs=True))
        yield Intervention(state)
    finally:
        for h in handles:
            h.remove()
        for m in attn_modules:
            _ACTIVE.pop(id(m), None)
        cfg._attn_implementation = old_impl


__all__ = ["MaskImage", "Knockout", "ScaleImage", "CaptureAttention", "AttentionMaps", "Intervention", "intervene",
           "layer_window", "check_layer", "GROUPS"]
