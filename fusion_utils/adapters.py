"""From samples to model inputs, and where the image tokens are.

`prepare` renders each sample's prompt (chat template, or InstructBLIP's own format), runs the processor batched
with left padding, and finds the image tokens **by token id** in every row. For each image of each sample it
records an `ImageGrid`: how that image's tokens tile the picture (LLaVA: rows x cols; LLaVA-NeXT: the base view and
the high-resolution tiles with their newline column; Qwen2-VL: the merged patch grid; InstructBLIP: 32 query tokens
with no spatial layout).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .data.sample import Sample
from .prompts import POST_PROMPT, render_prompt, user_text


@dataclass(frozen=True)
class View:
    """A rectangular block of image tokens: token ``offset + r * pitch + c`` shows cell (r, c) of the image."""

    name: str  # "base", "tiles", "merged", "queries"
    offset: int  # first token of the block, counted within this image's tokens
    rows: int
    cols: int
    pitch: int  # tokens per row (cols, or cols + 1 with LLaVA-NeXT's newline token)
    spatial: bool = True
    # the part of the original image the block shows, (left, top, right, bottom) as fractions of its width and height:
    # the whole image, except where the processor centre-crops (LLaVA-1.5: the central square of a non-square image)
    # or pads it to a square (values outside [0, 1])
    extent: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)

    def indices(self) -> np.ndarray:
        r = np.arange(self.rows)[:, None] * self.pitch + np.arange(self.cols)[None, :]
        return self.offset + r

    def to_map(self, values) -> np.ndarray:
        """Reshape per-token values of this image ([n_tokens] or [..., n_tokens]) into [..., rows, cols]."""
        if torch.is_tensor(values):
            values = values.detach().float().cpu().numpy()
        v = np.asarray(values)
        return v[..., self.indices()]


@dataclass(frozen=True)
class ImageGrid:
    """Layout of one image's tokens. ``views[0]`` is the primary view used for maps and relevance."""

    n_tokens: int
    views: tuple[View, ...]

    main: int | None = None  # index of the primary view where the rule below does not pick it (a global image)

    @property
    def primary(self) -> View:
        if self.main is not None:
            return self.views[self.main]
        return self.views[-1] if self.views[0].name == "base" and len(self.views) > 1 else self.views[0]

    @property
    def spatial(self) -> bool:
        return self.primary.spatial

    def relevance(self, sample_relevant: np.ndarray | None) -> np.ndarray | None:
        """Per-token relevance (fraction of the token's cell covered by relevant regions), NaN off-grid tokens."""
        if sample_relevant is None or not self.spatial:
            return None
        from .data.sample import resample_mask

        out = np.full(self.n_tokens, np.nan)
        for v in self.views:
            if v.spatial:
                out[v.indices().ravel()] = resample_mask(np.asarray(sample_relevant, bool), v.rows, v.cols,
                                                         v.extent).ravel()
        return out


@dataclass
class Batch:
    """Model inputs for a batch plus the bookkeeping every intervention and analysis needs."""

    inputs: dict  # tensors for model(**inputs) / generate(**inputs)
    image_mask: torch.Tensor  # bool [B, S], True at image-token positions
    image_positions: list[torch.Tensor]  # per sample, sequence positions of its image tokens (all images, in order)
    grids: list[list[ImageGrid]]  # per sample, per image
    prompts: list[str]
    samples: list[Sample] | None = None
    meta: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.image_mask.shape[0]

    @property
    def seq_len(self) -> int:
        return self.image_mask.shape[1]

    @property
    def n_image_tokens(self) -> list[int]:
        return [len(p) for p in self.image_positions]

    def to(self, device) -> "Batch":
        self.inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.inputs.items()}
        self.image_mask = self.image_mask.to(device)
        return self

    def tile(self, n: int, interleave: bool = False) -> "Batch":
        """This batch repeated ``n`` times: variant-major (rows b, B+b, ...) or, with ``interleave``, sample-major
        (rows n·b .. n·b+n-1). Token-level inputs (ids, masks, token types) are tiled; pixel inputs are not, so the
        result describes the rows of a replay (engine sweeps), not a batch to run the vision tower on."""
        def rep(t):
            return t.repeat_interleave(n, dim=0) if interleave else t.repeat(n, *([1] * (t.ndim - 1)))

        def each(xs):
            return [x for x in xs for _ in range(n)] if interleave else list(xs) * n

        B = self.size
        inputs = {k: rep(v) for k, v in self.inputs.items() if torch.is_tensor(v) and v.ndim == 2 and v.shape[0] == B}
        return Batch(inputs, rep(self.image_mask), each(self.image_positions), each(self.grids), each(self.prompts),
                     None if self.samples is None else each(self.samples), dict(self.meta))

    def image_tokens_of(self, b: int, image: int = 0) -> torch.Tensor:
        """Sequence positions of image number ``image`` of sample ``b``."""
        start = sum(g.n_tokens for g in self.grids[b][:image])
        return self.image_positions[b][start:start + self.grids[b][image].n_tokens]


def prepare(lm, samples: Sequence[Sample] | Sequence[tuple], *, post_prompt: str | None = POST_PROMPT,
            questions: Sequence[str] | None = None, images: Sequence | None = None) -> Batch:
    """Build a `Batch` for ``samples`` (Sample objects, or (image, question) pairs).

    ``questions`` / ``images`` override the samples' own (e.g. a generic prompt for ViCrop, a blank or noised
    image for contrastive decoding, or a list ``[original, crop]`` per sample for two-image prompts).
    """
    samples = list(samples)
    if not samples:
        raise ValueError("prepare() needs at least one sample.")
    objs = [s if isinstance(s, Sample) else None for s in samples]
    qs = list(questions) if questions is not None else [s.question if isinstance(s, Sample) else s[1] for s in samples]
    ims = list(images) if images is not None else [s.image if isinstance(s, Sample) else s[0] for s in samples]
    if len(qs) != len(samples) or len(ims) != len(samples):
        raise ValueError("prepare(): questions and images must have one entry per sample.")
    ims = [list(i) if isinstance(i, (list, tuple)) else [i] for i in ims]
    ims = [[_rgb(x) for x in per] for per in ims]
    proc = lm.processor
    prompts = [render_prompt(proc, user_text(q, post_prompt), n_images=len(per), style=lm.spec.prompt)
               for q, per in zip(qs, ims)]
    placeholder = getattr(proc, "image_token", None)
    if lm.spec.prompt == "chat_template" and placeholder:
        for b, (prompt, per) in enumerate(zip(prompts, ims)):
            if prompt.count(str(placeholder)) != len(per):
                raise ValueError(
                    f"Sample {b} has no image token for each of its {len(per)} image(s) in its prompt "
                    f"({prompt.count(str(placeholder))} x {placeholder}); the chat template must insert the image "
                    "placeholder for every image content entry."
                )
    flat = [x for per in ims for x in per]
    if lm.spec.prompt == "instructblip" and any(len(per) != 1 for per in ims):
        raise ValueError("InstructBLIP takes exactly one image per prompt; crop-and-concatenate variants need "
                         "another architecture.")
    enc = proc(images=ims if lm.spec.nested_images else flat, text=prompts, padding=True, return_tensors="pt")
    inputs = dict(enc)
    inputs.pop("labels", None)  # PaliGemma's processor adds training labels; a probe never wants a loss
    ids = inputs["input_ids"]
    tok_id = lm.image_token_id
    image_mask = ids == tok_id
    positions = [torch.nonzero(image_mask[b]).flatten() for b in range(ids.shape[0])]
    for b, p in enumerate(positions):
        if len(p) == 0:
            raise ValueError(
                f"Sample {b} has no image token (id {tok_id}) in its prompt; the processor must expand the image "
                "placeholder (check the chat template inserts the image)."
            )
    grids = _grids(lm, inputs, ims, positions)
    device = lm.device
    inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
    if "pixel_values" in inputs and torch.is_floating_point(inputs["pixel_values"]):
        inputs["pixel_values"] = inputs["pixel_values"].to(lm.dtype)
    return Batch(inputs, image_mask.to(device), [p.to(device) for p in positions], grids, prompts,
                 [o for o in objs] if all(o is not None for o in objs) else None)


def _rgb(img) -> Image.Image:
    if isinstance(img, Image.Image):
        return img.convert("RGB") if img.mode != "RGB" else img
    if isinstance(img, np.ndarray):
        return Image.fromarray(img).convert("RGB")
    raise TypeError(f"Expected a PIL image or an array, got {type(img).__name__}.")


# --- grids, one function per layout declared in ArchSpec.grid ---------------------------------------------------

def _grids(lm, inputs, ims, positions) -> list[list[ImageGrid]]:
    layout = lm.spec.grid
    fn = {"square": _square, "anyres": _anyres, "merged_thw": _merged, "none": _queries,
          "tiles_global": _tiles_global, "tiles_thumbnail": _tiles_thumbnail, "rows_break": _rows_break}[layout]
    out, k = [], 0
    for b, per in enumerate(ims):
        grids = [fn(lm, inputs, k + i, img) for i, img in enumerate(per)]
        k += len(per)
        if sum(g.n_tokens for g in grids) != len(positions[b]):
            raise ValueError(
                f"Sample {b}: {len(positions[b])} image tokens in the prompt but the {lm.spec.label} layout predicts "
                f"{sum(g.n_tokens for g in grids)}; the processor and model config disagree."
            )
        out.append(grids)
    return out


def _square(lm, inputs, i, img) -> ImageGrid:
    side = square_side(lm.config)
    n = side * side
    extra = class_tokens(lm.config)
    extent = processed_extent(lm.processor.image_processor, *img.size)
    return ImageGrid(n + extra, (View("base", extra, side, side, side, extent=extent),))


def square_side(config) -> int:
    """Image tokens per side of a square layout: the pooled count where the projector pools (Gemma 3's
    ``mm_tokens_per_image``), else one per vision patch."""
    pooled = getattr(config, "mm_tokens_per_image", None)
    if pooled:
        return int(round(pooled ** 0.5))
    vc = config.vision_config
    return vc.image_size // vc.patch_size


def class_tokens(config) -> int:
    """1 where the "full" feature strategy keeps a CLIP tower's class token before the patch tokens (SigLIP has
    none)."""
    full = getattr(config, "vision_feature_select_strategy", "default") == "full"
    return 1 if full and config.vision_config.model_type.startswith("clip") else 0


def _size_get(size, key):
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def processed_extent(ip, width: int, height: int) -> tuple[float, float, float, float]:
    """The part of a ``width`` x ``height`` image that a CLIP-style image processor's output shows, as fractions
    (left, top, right, bottom) of the image: LLaVA's optional pad to a square (``do_pad``), the resize (a shortest
    edge keeps the aspect ratio, height/width stretches), then the optional centre crop. Mirrors transformers'
    arithmetic (integer sizes, crop offset ``int((size - crop) / 2)``)."""
    left, top, right, bottom = 0.0, 0.0, float(width), float(height)  # the frame, in original pixels
    if getattr(ip, "do_pad", False) and hasattr(ip, "pad_to_square") and width != height:
        m = max(width, height)
        left, top = -float((m - width) // 2), -float((m - height) // 2)
        right, bottom = left + m, top + m
    fw, fh = right - left, bottom - top
    nw, nh = fw, fh
    if getattr(ip, "do_resize", False) and getattr(ip, "size", None) is not None:
        se = _size_get(ip.size, "shortest_edge")
        if se:
            short, long = min(fw, fh), max(fw, fh)
            new_long = int(se * long / short)
            nw, nh = (se, new_long) if fw <= fh else (new_long, se)
        elif _size_get(ip.size, "height") and _size_get(ip.size, "width"):
            nh, nw = _size_get(ip.size, "height"), _size_get(ip.size, "width")
    if getattr(ip, "do_center_crop", False) and getattr(ip, "crop_size", None) is not None:
        ch, cw = _size_get(ip.crop_size, "height"), _size_get(ip.crop_size, "width")
        sx, sy = nw / fw, nh / fh  # output pixels per original pixel
        x0, y0 = int((nw - cw) / 2.0), int((nh - ch) / 2.0)  # negative: the crop pads
        left, right = left + x0 / sx, left + (x0 + cw) / sx
        top, bottom = top + y0 / sy, top + (y0 + ch) / sy
    return (left / width, top / height, right / width, bottom / height)


def _anyres(lm, inputs, i, img) -> ImageGrid:
    from transformers.image_processing_utils import select_best_resolution

    proc = lm.processor
    vc = lm.config.vision_config
    side = vc.image_size // vc.patch_size
    extra = class_tokens(lm.config)
    orig_h, orig_w = (int(x) for x in inputs["image_sizes"][i])
    best_h, best_w = select_best_resolution([orig_h, orig_w], lm.config.image_grid_pinpoints)
    cur_h, cur_w = side * (best_h // vc.image_size), side * (best_w // vc.image_size)
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        cur_h -= ((cur_h - new_h) // 2) * 2
    else:
        new_w = int(round(orig_w * (cur_h / orig_h), 7))
        cur_w -= ((cur_w - new_w) // 2) * 2
    limit = getattr(lm.config, "vision_aspect_ratio", "") or ""
    if limit.startswith("anyres_max_"):  # LLaVA-OneVision shrinks a grid of more than N tiles' worth of tokens
        ratio = math.sqrt(cur_h * cur_w / (int(limit[len("anyres_max_"):]) * side ** 2))
        if ratio > 1.1:
            cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
    base = View("base", extra, side, side, side)
    tiles = View("tiles", extra + side * side, cur_h, cur_w, cur_w + 1)
    del proc
    return ImageGrid(extra + side * side + cur_h * (cur_w + 1), (base, tiles))


def _merged(lm, inputs, i, img) -> ImageGrid:
    t, h, w = (int(x) for x in inputs["image_grid_thw"][i])
    m = lm.config.vision_config.spatial_merge_size
    rows, cols = h // m, w // m
    return ImageGrid(t * rows * cols, (View("merged", 0, rows, cols, cols),))


def _queries(lm, inputs, i, img) -> ImageGrid:
    n = lm.config.num_query_tokens
    return ImageGrid(n, (View("queries", 0, 1, n, n, spatial=False),))


def tile_views(rows: int, cols: int, side: int, seq: int, offset: int = 0) -> list[View]:
    """One view per tile of a ``rows`` x ``cols`` split of the image, in reading order, ``seq`` tokens each
    (``side`` x ``side``), each showing its own part of the picture."""
    return [View(f"tile {r},{c}", offset + (r * cols + c) * seq, side, side, side,
                 extent=(c / cols, r / rows, (c + 1) / cols, (r + 1) / rows))
            for r in range(rows) for c in range(cols)]


def _tiles_global(lm, inputs, i, img) -> ImageGrid:
    """Idefics3 / SmolVLM: tiles tagged <row_r_col_c> in reading order, then the global image (alone when the
    image is not split)."""
    seq = int(lm.processor.image_seq_len)
    side = int(round(seq ** 0.5))
    out = lm.processor.image_processor([[img]], return_row_col_info=True)
    rows, cols = int(out["rows"][0][0]), int(out["cols"][0][0])
    tiles = tile_views(rows, cols, side, seq)
    glob = View("global", rows * cols * seq, side, side, side)
    return ImageGrid(seq * (rows * cols + 1), tuple(tiles) + (glob,), main=len(tiles))


def _tiles_thumbnail(lm, inputs, i, img) -> ImageGrid:
    """InternVL: tiles in reading order with nothing between them, then a thumbnail of the whole image when there
    is more than one tile."""
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    ip = lm.processor.image_processor
    seq = int(lm.processor.image_seq_length)
    side = int(round(seq ** 0.5))
    tile = (_size_get(ip.size, "height"), _size_get(ip.size, "width"))
    cols, rows = get_optimal_tiled_canvas((img.height, img.width), tile, ip.min_patches, ip.max_patches) \
        if getattr(ip, "crop_to_patches", False) else (1, 1)
    tiles = tile_views(rows, cols, side, seq)
    if rows * cols == 1:
        return ImageGrid(seq, (View("base", 0, side, side, side),))
    thumb = View("thumbnail", rows * cols * seq, side, side, side)
    return ImageGrid(seq * (rows * cols + 1), tuple(tiles) + (thumb,), main=len(tiles))


def _rows_break(lm, inputs, i, img) -> ImageGrid:
    """Mistral 3 (Pixtral): rows of image tokens, each but the last followed by [IMG_BREAK] and the last by
    [IMG_END]; those two have their own ids, so the image tokens found by id form a plain rows x cols block."""
    h, w = (int(x) for x in inputs["image_sizes"][i])
    step = lm.config.vision_config.patch_size * lm.config.spatial_merge_size
    rows, cols = h // step, w // step
    return ImageGrid(rows * cols, (View("merged", 0, rows, cols, cols),))
