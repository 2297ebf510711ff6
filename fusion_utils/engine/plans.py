"""Plans: what to change in a forward pass. Each plan compiles itself into edits the engine knows how to install.

A plan is any object with ``compile(site) -> iterable of edits``. The engine (`intervene`) installs three kinds of
edit and nothing else:

- `HiddenEdit(layer, fn, at="input" | "output", restore=None)` -- replace the hidden states entering (or leaving) a
  decoder layer by ``fn(hidden, step)``. ``restore`` ([batch, seq] bool) names positions whose *output* of that layer
  stays the unedited one: the edit then changes only what other positions read from them at that layer (a
  one-layer probe).
- `AttentionEdit(layer, fn)` -- ``fn(step)`` returns the edges to block (bool [batch, 1, queries, keys], True =
  blocked), an additive bias on that layer's attention logits (float, same shape; ``log λ`` scales an edge's weight
  by λ), or None.
- `AttentionRead(layer, fn)` -- ``fn(call)`` sees the layer's queries, keys and final mask (capture).

`Site` is what a plan compiles against: the model's depth and the batch's token groups. A user-defined plan needs
nothing else; e.g. mean-ablation of the image at one layer (the README has the same example)::

    @dataclass(frozen=True)
    class MeanAblateImage(Plan):
        layer: int

        def compile(self, site):
            img = site.groups["image"]

            def edit(hidden, step):
                m = step.queries(img)[..., None]  # image positions among this call's queries
                if not m.any():
                    return hidden
                mean = (hidden * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1)
                return torch.where(m, mean.to(hidden.dtype), hidden)

            return [HiddenEdit(site.layer(self.layer), edit)]

    with intervene(lm, batch, MeanAblateImage(3)):
        logits = lm.model(**batch.inputs).logits
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from ..depth import layer_index

GROUPS = ("image", "text", "prefix", "question", "last")


# --- what a plan compiles against -------------------------------------------------------------------------------

check_layer = layer_index  # the name the plans have always exported


def layer_window(layer: int, window: int, n_layers: int, onward: bool = False) -> list[int]:
    """The layers a plan at ``layer`` covers: ``window`` consecutive layers centred on it, or all from it onward."""
    if onward:
        return list(range(layer, n_layers))
    lo = layer - (window - 1) // 2
    return [j for j in range(lo, lo + window) if 0 <= j < n_layers]


def token_groups(image_mask: torch.Tensor, attention_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per token group, bool [batch, seq]: image; text; the text before the first image token (prefix); the text
    after the last image token but the last position (question); the last position."""
    img = image_mask.bool()
    valid = torch.ones_like(img) if attention_mask is None else attention_mask.bool().to(img.device)
    B, S = img.shape
    pos = torch.arange(S, device=img.device)
    first = torch.where(img, pos, S).min(dim=1).values
    last_img = torch.where(img, pos, -1).max(dim=1).values
    text = valid & ~img
    return {
        "image": img,
        "text": text,
        "prefix": text & (pos[None] < first[:, None]),
        "question": text & (pos[None] > last_img[:, None]) & (pos[None] < S - 1),
        "last": text & (pos[None] == S - 1),
    }


def image_blocks(image_mask: torch.Tensor, image_positions, grids) -> torch.Tensor:
    """bool [batch, seq]: each image's tokens and the layout tokens between its first and last one (Idefics3's tile
    tags, Pixtral's row breaks). A one-layer zero restores the whole block: a tag between two tiles read the zeroed
    first tile, and the next tile would carry that into the layers above."""
    out = image_mask.clone()
    for b, pos in enumerate(image_positions):
        start = 0
        for grid in grids[b]:
            part = pos[start:start + grid.n_tokens]
            start += grid.n_tokens
            if len(part):
                out[b, int(part[0]):int(part[-1]) + 1] = True
    return out


class Site:
    """The model and batch a plan compiles against.

    ``groups``: bool [batch, seq] per token group (`GROUPS`); ``image_positions``: per sample, the sequence positions
    of its image tokens; ``results``: where a plan leaves what it collects (``CaptureAttention`` puts its maps under
    ``"attention"``).
    """

    def __init__(self, lm, batch):
        self.lm = lm
        self.n_layers = lm.num_layers
        self.groups = token_groups(batch.image_mask, batch.inputs.get("attention_mask"))
        self.batch_size, self.seq_len = batch.image_mask.shape
        self.device = batch.image_mask.device
        self.image_positions = batch.image_positions
        self.grids = batch.grids
        self.results: dict = {}

    def layer(self, layer: int) -> int:
        return check_layer(layer, self.n_layers)

    def image_blocks(self) -> torch.Tensor:
        """bool [batch, seq]: each image's tokens and the layout tokens between its first and last one
        (`image_blocks`)."""
        return image_blocks(self.groups["image"], self.image_positions, self.grids)

    def image_tokens(self, tokens: Sequence | None, who: str = "plan") -> torch.Tensor:
        """bool [batch, seq]: the image tokens chosen per sample -- indices into its image tokens, or a bool mask over
        them; ``None`` = all of them."""
        out = torch.zeros(self.batch_size, self.seq_len, dtype=torch.bool, device=self.device)
        if tokens is None:
            return self.groups["image"].clone()
        if len(tokens) != self.batch_size:
            raise ValueError(f"{who}: tokens has {len(tokens)} entries for a batch of {self.batch_size}; give one "
                             "selection per sample (or None for all image tokens).")
        for b, pos in enumerate(self.image_positions):
            sel = tokens[b]
            if sel is None:
                out[b, pos] = True
                continue
            sel = torch.as_tensor(sel, device=pos.device)
            if sel.dtype == torch.bool:
                if sel.numel() != len(pos):
                    raise ValueError(f"{who}: sample {b} has {len(pos)} image tokens but the mask has {sel.numel()} "
                                     "entries.")
                out[b, pos[sel]] = True
            else:
                if len(sel) and (sel.max() >= len(pos) or sel.min() < -len(pos)):
                    raise ValueError(f"{who}: token index out of range for sample {b} ({len(pos)} image tokens).")
                out[b, pos[sel.long()]] = True
        return out


@dataclass(frozen=True)
class Step:
    """One call of one layer: queries are absolute positions [offset, offset + q_len), keys [0, k_len)."""

    layer: int
    offset: int
    q_len: int
    k_len: int
    seq_len: int  # the prompt's length; positions >= seq_len are generated tokens
    # the device of this layer's hidden states / queries: with the decoder split across devices (device_map),
    # masks built on the batch's device are moved here, so every edit combines tensors of one device
    device: torch.device | None = None

    def queries(self, member: torch.Tensor, generated: bool = False) -> torch.Tensor:
        """bool [batch, q_len]: which of this call's queries are in ``member`` ([batch, seq]); generated tokens
        count as ``generated``."""
        return _window(member, self.offset, self.offset + self.q_len, self.seq_len, generated, self.device)

    def keys(self, member: torch.Tensor, generated: bool = False) -> torch.Tensor:
        """bool [batch, k_len]: which keys are in ``member``."""
        return _window(member, 0, self.k_len, self.seq_len, generated, self.device)


def _window(member, start, stop, S, generated, device=None):
    inside = member[:, start:min(stop, S)]
    if stop > S:
        gen = torch.full((member.shape[0], stop - max(start, S)), generated, dtype=torch.bool, device=member.device)
        inside = torch.cat([inside, gen], dim=1)
    return inside if device is None else inside.to(device)


# --- edits --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HiddenEdit:
    layer: int
    fn: Callable  # (hidden [batch, q, d], Step) -> hidden
    at: str = "input"  # "input" | "output"
    restore: torch.Tensor | None = None  # bool [batch, seq]: positions whose output of this layer stays unedited

    def __post_init__(self):
        if self.at not in ("input", "output"):
            raise ValueError("HiddenEdit.at must be 'input' or 'output'.")
        if self.restore is not None and self.at != "input":
            raise ValueError("HiddenEdit.restore applies to input edits only.")


@dataclass(frozen=True)
class AttentionEdit:
    layer: int
    fn: Callable  # Step -> bool blocked edges or float bias [batch, 1, q, k] (or broadcastable), or None


@dataclass(frozen=True)
class AttentionRead:
    layer: int
    fn: Callable  # AttentionCall -> None


class AttentionCall:
    """What an `AttentionRead` sees: this call's queries and keys ([batch, heads, q|k, dim]), the final additive mask
    (``mask``: float32 [batch, 1, q, k], edits applied) and the softmax scaling.

    ``mask`` may be given as a function ``rows -> those query rows of the mask`` (rows: a list of query indices, or
    None for all): a read that needs a few rows (`CaptureAttention`: the last prompt token) then calls
    ``mask_rows(rows)`` and the [q, k] mask of a long prompt is never built (it cost a third of a prefill)."""

    def __init__(self, step: Step, query: torch.Tensor, key: torch.Tensor, mask, scaling: float):
        self.step, self.query, self.key, self.scaling = step, query, key, scaling
        self.source = mask if callable(mask) else (lambda rows: mask if rows is None else mask[:, :, rows, :])
        self.full = None

    @property
    def mask(self) -> torch.Tensor:
        if self.full is None:
            self.full = self.source(None)
        return self.full

    def mask_rows(self, rows) -> torch.Tensor:
        """float32 [batch, 1, len(rows), k]: the additive mask of these query rows only."""
        return self.source(list(rows)) if self.full is None else self.full[:, :, list(rows), :]


class Plan:
    """Base class of plans (optional: any object with ``compile(site)`` is a plan)."""

    def compile(self, site: Site) -> Iterable:
        raise NotImplementedError(f"{type(self).__name__} must define compile(site) -> edits.")


# --- the built-in plans -------------------------------------------------------------------------------------------

def zero_positions(member: torch.Tensor) -> Callable:
    """An input edit that zeroes the hidden states at the positions in ``member`` ([batch, seq])."""
    def edit(hidden, step):
        m = step.queries(member)
        return hidden if not m.any() else hidden.masked_fill(m[..., None], 0.0)
    return edit


def block_edges(src: torch.Tensor, dst: torch.Tensor, dst_generated: bool = True,
                rows: torch.Tensor | None = None) -> Callable:
    """An attention edit: queries in ``dst`` cannot attend to keys in ``src`` (both [batch, seq]).
    ``dst_generated``: whether generated tokens count as ``dst`` queries (they are text, and the last position);
    ``rows`` ([batch] bool) limits the edit to some rows of the batch."""
    def edit(step):
        block = step.queries(dst, generated=dst_generated)[:, :, None] & step.keys(src)[:, None, :]
        if rows is not None:
            block &= rows[:, None, None]
        return block[:, None] if block.any() else None
    return edit


@dataclass(frozen=True)
class MaskImage(Plan):
    """The paper's masking probe at ``layer`` (Sec. 3).

    ``mode="zero"`` (one layer): that layer reads zeros at the image positions -- their hidden states are zeroed at
    its input, so its keys and values there come from zeros -- while the image positions' own outputs of the layer
    stay the unmasked ones: from the next layer on they carry the unmasked stream again (so do layout tokens inside
    the image block, `Site.image_blocks`). Only layer ``layer``'s
    computation changes, which is what lets a late "review" layer show up in a masking curve.
    ``mode="knockout"``: at that layer, text queries cannot attend to image keys.
    ``window=k``: k consecutive layers centred on ``layer``, each as above (the cross-modal information-flow protocol
    uses 9). ``onward=True`` (persistent): every layer from ``layer`` on is masked -- for ``zero``, the image
    positions' inputs are zeroed at each of them and never restored, so no layer from ``layer`` on sees the image.
    A persistent curve can only fall with depth and cannot show a review layer.
    """

    layer: int
    mode: str = "zero"  # "zero" | "knockout"
    window: int = 1
    onward: bool = False

    def __post_init__(self):
        if self.mode not in ("zero", "knockout"):
            raise ValueError(f"Unknown masking mode {self.mode!r}; use 'zero' or 'knockout'.")
        if self.window < 1:
            raise ValueError("window must be a positive number of layers.")

    def layers(self, n_layers: int) -> list[int]:
        return layer_window(check_layer(self.layer, n_layers), self.window, n_layers, self.onward)

    def compile(self, site):
        img = site.groups["image"]
        if self.mode == "knockout":
            return [AttentionEdit(j, block_edges(img, site.groups["text"])) for j in self.layers(site.n_layers)]
        restore = None if self.onward else site.image_blocks()
        return [HiddenEdit(j, zero_positions(img), restore=restore) for j in self.layers(site.n_layers)]


@dataclass(frozen=True)
class Knockout(Plan):
    """General attention-edge knockout at ``layer`` (and ``window`` layers around it): queries of group ``dst``
    cannot attend to keys of group ``src`` (groups: image, text, prefix, question, last)."""

    layer: int
    src: str = "image"  # keys that cannot be attended to
    dst: str = "text"  # queries that lose access
    window: int = 1

    def __post_init__(self):
        for g in (self.src, self.dst):
            if g not in GROUPS:
                raise ValueError(f"Unknown token group {g!r}; use one of {', '.join(GROUPS)}.")

    def compile(self, site):
        edit = block_edges(site.groups[self.src], site.groups[self.dst], self.dst in ("text", "last"))
        return [AttentionEdit(j, edit) for j in layer_window(site.layer(self.layer), self.window, site.n_layers)]


@dataclass(frozen=True)
class ScaleImage(Plan):
    """Scale the hidden states of chosen image tokens by ``factor`` at a layer's input (the v1 soft mask as a
    hidden-state edit). ``tokens``: per sample, indices into its image tokens or a bool mask over them; None = all.

    On pre-RMSNorm decoders (Llama, Qwen) this layer's own keys and values do not change (RMSNorm(λh) = RMSNorm(h));
    the edit reaches later layers through the residual stream. `ScaleAttention` acts at the layer itself."""

    layer: int
    factor: float
    tokens: Sequence | None = None

    def compile(self, site):
        chosen = site.image_tokens(self.tokens, "ScaleImage")
        f = float(self.factor)

        def edit(hidden, step):
            m = step.queries(chosen)
            if not m.any():
                return hidden
            scale = torch.where(m, torch.tensor(f, device=m.device), torch.tensor(1.0, device=m.device))
            return hidden * scale[..., None].to(hidden.dtype)

        return [HiddenEdit(site.layer(self.layer), edit)]


@dataclass(frozen=True)
class ScaleAttention(Plan):
    """Scale the attention that text queries (prompt text after the image, and generated tokens) give to chosen image
    keys by ``factor`` at ``layer``: their logits get ``+ log factor`` before the softmax, so the weights are
    renormalised. ``factor=0`` is exactly the knockout of those keys; ``factor=1`` is exactly the plain model.
    ``tokens`` as in `ScaleImage`."""

    layer: int
    factor: float
    tokens: Sequence | None = None

    def __post_init__(self):
        if not (self.factor >= 0) or math.isinf(self.factor):
            raise ValueError(f"ScaleAttention.factor must be a finite number >= 0, got {self.factor!r}.")

    def compile(self, site):
        j = site.layer(self.layer)
        if float(self.factor) == 1.0:
            return []
        chosen = site.image_tokens(self.tokens, "ScaleAttention")
        text = site.groups["text"]
        bias = math.log(self.factor) if self.factor > 0 else float("-inf")

        def edit(step):
            hit = step.queries(text, generated=True)[:, :, None] & step.keys(chosen)[:, None, :]
            if not hit.any():
                return None
            if self.factor == 0:
                return hit[:, None]  # blocked edges: the knockout of those keys, exactly
            return torch.zeros(hit.shape, dtype=torch.float32, device=hit.device).masked_fill(hit, bias)[:, None]

        return [AttentionEdit(j, edit)]


@dataclass(frozen=True)
class ExitAt(Plan):
    """Answer from decoder layer ``layer`` (early exit): the last layer's output is replaced by that layer's, so the
    final norm and LM head read it -- in prefill and in every generated step, so ``generate`` gives the layer's own
    greedy answer. ``ExitAt(-1)`` is the plain model."""

    layer: int

    def compile(self, site):
        j, last = site.layer(self.layer), site.n_layers - 1
        if j == last:
            return []
        held: dict = {}

        def keep(hidden, step):
            held["h"] = hidden
            return hidden

        def swap(hidden, step):
            return held.pop("h")

        return [HiddenEdit(j, keep, at="output"), HiddenEdit(last, swap, at="output")]


@dataclass(frozen=True)
class CaptureAttention(Plan):
    """Per layer and head, the attention of the last prompt token (and, with ``steps="all"``, of every generated
    token) to each image token, in float32, computed for those rows only. Read it as ``run.attention``."""

    layers: Sequence[int] | None = None  # None = every layer
    steps: str = "prefill"  # "prefill": the last prompt token; "all": also every generated token

    def __post_init__(self):
        if self.steps not in ("prefill", "all"):
            raise ValueError("CaptureAttention.steps must be 'prefill' or 'all'.")

    def compile(self, site):
        from .capture import Collector

        if "attention" in site.results:
            raise ValueError("Pass one CaptureAttention plan per intervene() call.")
        col = Collector(site, self.steps)
        site.results["attention"] = col
        layers = range(site.n_layers) if self.layers is None else sorted({site.layer(j) for j in self.layers})
        return [AttentionRead(j, col.read) for j in layers]


__all__ = ["Plan", "Site", "Step", "HiddenEdit", "AttentionEdit", "AttentionRead", "AttentionCall", "MaskImage",
           "Knockout", "ScaleImage", "ScaleAttention", "ExitAt", "CaptureAttention", "GROUPS", "check_layer", "layer_window",
           "token_groups", "zero_positions", "block_edges"]
