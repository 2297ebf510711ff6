"""Crop boxes from a map over an image's token grid: the paper's crop variant and ViCrop's adaptive window.

Maps are 2-D arrays ``[rows, cols]`` over the token grid of the part of the image the model saw, ``extent`` =
``(left, top, right, bottom)`` as fractions of the image (``(0, 0, 1, 1)``: all of it; LLaVA-1.5 shows the central
square of a non-square image; values outside [0, 1] are padding). Boxes are pixel ``(left, top, right, bottom)``
for PIL's ``Image.crop``, always inside the image.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Sequence

import numpy as np
import torch


FULL_EXTENT = (0.0, 0.0, 1.0, 1.0)

# ViCrop (saccharomycetes/MLLMs_know_where_to_look, utils.py `bbox_from_att_image_adaptive`): window sides tried, as
# multiples of the model's input resolution
VICROP_RATIOS = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0)
# ViCrop's attention layer for LLaVA-1.5 (`ATT_LAYER = 14`, an index into the 32 decoder layers' attentions)
VICROP_LAYER_OF_32 = 14
# ViCrop's attention layer per architecture: (layer, depth of the official model, source). Architectures the
# official code does not cover take the layer of the official model with the same language model and depth.
VICROP_LAYERS = {
    "llava": (14, 32, "saccharomycetes/mllms_know llava_methods.py:14 `ATT_LAYER = 14` (LLaVA-1.5-7B)"),
    "llava_next": (14, 32, "as llava: no official LLaVA-NeXT entry; same 32-layer Vicuna-7B decoder"),
    "vipllava": (14, 32, "as llava: no official VipLLaVA entry; same 32-layer Vicuna-7B decoder"),
    "qwen2_5_vl": (22, 28, "saccharomycetes/mllms_know qwen2_5_methods.py:9 `ATT_LAYER = 22` (Qwen2.5-VL-7B)"),
    "qwen2_vl": (22, 28, "as qwen2_5_vl: no official Qwen2-VL entry; same 28-layer decoder depth"),
}
# ViCrop tiles images above this side (utils.py `high_res_split_threshold(image, res_threshold=1024)`)
HIGH_RES = 1024


def _as_map(value_map) -> np.ndarray:
    m = value_map.detach().float().cpu().numpy() if torch.is_tensor(value_map) else value_map
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"A crop needs a non-empty 2-D map [rows, cols], got shape {m.shape}; reshape per-token "
                         "values with the image grid's View.to_map first.")
    return m


def _grid_to_px(extent, image_size, rows: int, cols: int):
    """Pixel coordinate of grid line (k of n) along x and y, before clipping to the image."""
    W, H = float(image_size[0]), float(image_size[1])
    ex0, ey0, ex1, ey1 = extent
    return (lambda k: (ex0 + (ex1 - ex0) * k / cols) * W), (lambda k: (ey0 + (ey1 - ey0) * k / rows) * H)


def peak_crop_box(value_map, image_size, *, extent=FULL_EXTENT, frac: float = 0.1, min_side: float = 0.25,
                  pad: int = 1) -> tuple[int, int, int, int]:
    """The paper-variant crop: a box around the high-value region of ``value_map`` (``I_A`` on the token grid).

    Take the top ``frac`` of the cells with positive value, keep the 4-connected component that holds the peak
    (first maximum in row-major order), take its bounding box, pad it by ``pad`` cells, map it to pixels through
    ``extent``, widen each side to at least ``min_side`` of the image's, and clip to the image.

    >>> m = np.zeros((4, 4)); m[1, 1] = 1.0
    >>> peak_crop_box(m, (80, 40), frac=0.1, min_side=0.0, pad=0)
    (20, 10, 40, 20)
    """
    m = _as_map(value_map)
    W, H = int(image_size[0]), int(image_size[1])
    m = np.where(np.isfinite(m), m, -np.inf)
    rows, cols = m.shape
    peak = np.unravel_index(int(np.argmax(m)), m.shape)
    pos = m[m > 0]
    if pos.size:
        k = max(1, int(math.ceil(frac * m.size)))
        high = m >= np.sort(pos)[::-1][min(k, pos.size) - 1]
    else:
        high = np.zeros_like(m, dtype=bool)
    high[peak] = True
    rr, cc = np.nonzero(_component(high, peak))
    r0, r1 = max(0, rr.min() - pad), min(rows, rr.max() + 1 + pad)
    c0, c1 = max(0, cc.min() - pad), min(cols, cc.max() + 1 + pad)
    gx, gy = _grid_to_px(extent, image_size, rows, cols)
    left, right = _widen(min(W, max(0.0, gx(c0))), min(W, max(0.0, gx(c1))), min_side * W, W)
    top, bottom = _widen(min(H, max(0.0, gy(r0))), min(H, max(0.0, gy(r1))), min_side * H, H)
    box = (int(math.floor(left)), int(math.floor(top)), int(math.ceil(right)), int(math.ceil(bottom)))
    return (max(0, box[0]), max(0, box[1]), min(W, max(box[2], box[0] + 1)), min(H, max(box[3], box[1] + 1)))


def _component(mask: np.ndarray, seed) -> np.ndarray:
    out = np.zeros_like(mask, dtype=bool)
    q = deque([tuple(int(x) for x in seed)])
    out[q[0]] = True
    R, C = mask.shape
    while q:
        r, c = q.popleft()
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            a, b = r + dr, c + dc
            if 0 <= a < R and 0 <= b < C and mask[a, b] and not out[a, b]:
                out[a, b] = True
                q.append((a, b))
    return out


def _widen(lo: float, hi: float, min_len: float, size: float) -> tuple[float, float]:
    if hi - lo < min_len:
        mid = 0.5 * (lo + hi)
        lo, hi = mid - min_len / 2, mid + min_len / 2
        if lo < 0:
            lo, hi = 0.0, min_len
        if hi > size:
            lo, hi = size - min_len, size
    return max(0.0, lo), min(float(size), hi)


def cells_crop_box(cells, image_size, *, pad: int = 1, min_side: float = 0.25) -> tuple[int, int, int, int]:
    """The crop box of a given set of cells, by the paper-variant crop's box rule (`peak_crop_box`): the bounding box
    of the True cells of ``cells`` (a bool grid ``[rows, cols]`` laid uniformly over the whole image), padded by
    ``pad`` cells, each side widened to at least ``min_side`` of the image's, clipped to the image. With the cells a
    question is about (ground truth) it is the oracle crop: the box a crop method would draw if its map were perfect.

    >>> m = np.zeros((6, 6), bool); m[2, 3] = True
    >>> cells_crop_box(m, (192, 192))
    (64, 32, 160, 128)
    """
    m = np.asarray(cells, dtype=bool)
    if m.ndim != 2 or not m.any():
        raise ValueError(f"A crop of cells needs a 2-D bool grid with at least one True cell, got shape {m.shape} "
                         f"with {int(m.sum())} True; pass the cells the crop must hold.")
    W, H = int(image_size[0]), int(image_size[1])
    rows, cols = m.shape
    rr, cc = np.nonzero(m)
    r0, r1 = max(0, rr.min() - pad), min(rows, rr.max() + 1 + pad)
    c0, c1 = max(0, cc.min() - pad), min(cols, cc.max() + 1 + pad)
    gx, gy = _grid_to_px(FULL_EXTENT, image_size, rows, cols)
    left, right = _widen(gx(c0), gx(c1), min_side * W, W)
    top, bottom = _widen(gy(r0), gy(r1), min_side * H, H)
    box = (int(math.floor(left)), int(math.floor(top)), int(math.ceil(right)), int(math.ceil(bottom)))
    return (max(0, box[0]), max(0, box[1]), min(W, max(box[2], box[0] + 1)), min(H, max(box[3], box[1] + 1)))


def random_crop_box(like, image_size, grid, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box of the size of the pixel box ``like`` at a random position (drawn from ``rng``), aligned to the cells of
    a ``grid`` = (rows, cols) laid over the image as ``like`` is, and inside the image: the random crop, a crop that
    knows nothing about where to look. Only its position is drawn, so it keeps the size a crop method's box rule
    gives (the oracle's box), and a method that beats it has chosen *where* better than chance.

    >>> b = random_crop_box((64, 32, 160, 128), (192, 192), (6, 6), np.random.default_rng(0))
    >>> (b[2] - b[0], b[3] - b[1]), all(v % 32 == 0 for v in b)
    ((96, 96), True)
    """
    W, H = int(image_size[0]), int(image_size[1])
    w, h = int(like[2]) - int(like[0]), int(like[3]) - int(like[1])
    rows, cols = (int(v) for v in grid)
    if not (0 < w <= W and 0 < h <= H):
        raise ValueError(f"random_crop_box got a box of {w} x {h} px for an image of {W} x {H}; pass a box inside the "
                         "image.")
    lefts = sorted({round(c * W / cols) for c in range(cols)} | {0})
    tops = sorted({round(r * H / rows) for r in range(rows)} | {0})
    lefts = [x for x in lefts if x + w <= W] or [0]
    tops = [y for y in tops if y + h <= H] or [0]
    x, y = lefts[int(rng.integers(len(lefts)))], tops[int(rng.integers(len(tops)))]
    return x, y, x + w, y + h


def vicrop_box(att_map, image_size, bbox_size: float, *, extent=FULL_EXTENT,
               ratios: Sequence[float] = VICROP_RATIOS) -> tuple[int, int, int, int]:
    """ViCrop's adaptive window, as ``bbox_from_att_image_adaptive`` (MLLMs_know_where_to_look, ``utils.py``).

    For each ratio r, a window of ``bbox_size·r`` pixels (``bbox_size``: the model's input resolution, 336 for
    LLaVA-1.5) covers ``int(bbox_size·r / cell)`` cells per side; it slides over ``att_map`` (ViCrop's relative
    attention) and stops at the first position (x outer, y inner) with the largest sum. The ratio kept is the one
    whose best window stands out most from its 4 neighbouring windows, ``(best − mean(neighbours)) / cells``
    (first ratio on ties). The box is that window's centre with side ``bbox_size·r``, shifted to lie inside the
    image. A window already covering the whole map at ratio 1 gives the whole image; larger ratios that cover it
    are skipped.

    Departure from the official code: cells map to pixels through ``extent`` (the official code spreads the map over
    the whole image, which misplaces LLaVA-1.5's centre-cropped map of a non-square image); with the default extent
    the two agree. Non-finite cells count as 0, and a window narrower than one cell counts as one cell (the official
code then sums empty windows).

    >>> m = np.zeros((8, 8)); m[2, 5] = 1.0
    >>> vicrop_box(m, (96, 96), 24)
    (48, 12, 72, 36)
    """
    m = _as_map(att_map)
    m = np.where(np.isfinite(m), m, 0.0)
    if bbox_size <= 0 or not ratios:
        raise ValueError("vicrop_box needs a positive bbox_size (the model's input resolution in pixels) and at "
                         "least one ratio.")
    W, H = float(image_size[0]), float(image_size[1])
    rows, cols = m.shape
    ex0, ey0, ex1, ey1 = extent
    cell = ((ex1 - ex0) * W / cols, (ey1 - ey0) * H / rows)
    # window sums for every window size via a summed-area table (the official code loops over positions)
    sat = np.zeros((rows + 1, cols + 1))
    sat[1:, 1:] = m.cumsum(0).cumsum(1)
    best = None  # (difference, ratio, (x, y), (nx, ny))
    for ratio in ratios:
        nx = min(int(bbox_size * ratio / cell[0]), cols)
        ny = min(int(bbox_size * ratio / cell[1]), rows)
        if cols - nx < 1 and rows - ny < 1:
            if ratio == ratios[0]:
                return 0, 0, int(W), int(H)
            continue
        nx, ny = max(nx, 1), max(ny, 1)
        sums = sat[ny:, nx:] - sat[:-ny, nx:] - sat[ny:, :-nx] + sat[:-ny, :-nx]  # [y, x]: window at (x, y)
        flat = int(np.argmax(sums.T))  # x outer, y inner, first maximum: the official loop order
        x, y = divmod(flat, sums.shape[0])
        neighbours = [sums[y, x + dx] for dx in (-1, 1) if 0 <= x + dx < sums.shape[1]]
        neighbours += [sums[y + dy, x] for dy in (-1, 1) if 0 <= y + dy < sums.shape[0]]
        difference = (sums[y, x] - np.mean(neighbours)) / (nx * ny)
        if best is None or difference > best[0]:
            best = (difference, ratio, (x, y), (nx, ny))
    _, ratio, (x, y), (nx, ny) = best
    side = bbox_size * ratio
    half = side // 2
    xc = int(ex0 * W + x * cell[0] + cell[0] * nx / 2)
    yc = int(ey0 * H + y * cell[1] + cell[1] * ny / 2)
    xc = min(max(xc, half), W - half)
    yc = min(max(yc, half), H - half)
    box = (max(0, xc - half), max(0, yc - half), min(W, xc + half), min(H, yc + half))
    return tuple(int(v) for v in box)


def attention_ratio(task, generic, eps: float = 1e-6):
    """ViCrop's relative attention: the task prompt's attention to each image token divided by the generic prompt's
    (``rel_attention_llava``: ``att_map / general_att_map``; ``eps`` guards a zero denominator).

    >>> attention_ratio(torch.tensor([0.2, 0.4]), torch.tensor([0.4, 0.4]), eps=0.0).tolist()
    [0.5, 1.0]
    """
    return task / (generic + eps)


def vicrop_layer(n_layers: int, arch: str = "llava") -> int:
    """ViCrop's attention layer for ``arch`` (`VICROP_LAYERS`), scaled by relative depth when the model's depth
    differs from the official model's (e.g. the 16-layer organisms): ``round(layer / depth · n_layers)``.

    >>> vicrop_layer(32), vicrop_layer(28, "qwen2_5_vl"), vicrop_layer(16, "qwen2_vl"), vicrop_layer(4)
    (14, 22, 13, 2)
    """
    layer, depth, _ = VICROP_LAYERS.get(arch, VICROP_LAYERS["llava"])
    if n_layers == depth:
        return layer
    return int(min(n_layers - 1, max(0, round(layer / depth * n_layers))))


def high_res_tiles(image_size, res_threshold: int = HIGH_RES):
    """``(boxes, rows, cols)``: ViCrop's tiles of an image (``high_res_split_threshold``): ``rows = ceil(H / 1024)``,
    ``cols = int(rows · W / H)`` (at least 1: the official code gives 0 for a tall image), tiles of
    ``ceil(W / cols) × ceil(H / rows)`` pixels in row-major order (the last may reach past the image, as there).

    >>> high_res_tiles((2000, 1500))
    ([(0, 0, 1000, 750), (1000, 0, 2000, 750), (0, 750, 1000, 1500), (1000, 750, 2000, 1500)], 2, 2)
    """
    W, H = int(image_size[0]), int(image_size[1])
    rows = int(math.ceil(H / res_threshold))
    cols = max(1, int(rows * W / H))
    tw, th = int(math.ceil(W / cols)), int(math.ceil(H / rows))
    boxes = [(i * tw, j * th, (i + 1) * tw, (j + 1) * th) for j in range(rows) for i in range(cols)]
    return boxes, rows, cols


def needs_tiling(image_size, res_threshold: int = HIGH_RES) -> bool:
    """Whether ViCrop tiles this image: a side above 1024 px (its README: "high-resolution images (>1K)")."""
    return max(int(image_size[0]), int(image_size[1])) > res_threshold


def merge_tiles(maps, rows: int, cols: int) -> np.ndarray:
    """The tiles' maps (row-major) as one map, ``np.block`` as ``high_res`` does.

    >>> merge_tiles([np.zeros((2, 2)), np.ones((2, 2))], 1, 2).shape
    (2, 4)
    """
    maps = [_as_map(m) for m in maps]
    return np.block([maps[j:j + cols] for j in range(0, rows * cols, cols)])


def crop_images(images, boxes) -> list[list]:
    """Per sample, ``[image, crop]``: the two-image prompt both crop methods answer from (PIL images, pixel boxes).

    The crop keeps its native pixels, with no upsampling for Qwen: ViCrop's Qwen2.5-VL path (``vicrop_qa`` in
    ``run.py``, model "qwen2_5", of MLLMs_know_where_to_look's Qwen2.5 port) hands ``image.crop(bbox)`` to the
    processor as it is (max_pixels 256·28·28, the default minimum), its window at least ``bbox_size`` = 224 px. So a
    crop gives a Qwen model more tokens per object only when the original is larger than the processor's max_pixels,
    as on ``world-fine``; the processor's own minimum decides the rest.

    >>> from PIL import Image
    >>> [c.size for _, c in crop_images([Image.new("RGB", (8, 8))], [(2, 0, 6, 4)])]
    [(4, 4)]
    """
    images, boxes = list(images), list(boxes)
    if len(images) != len(boxes):
        raise ValueError(f"crop_images got {len(images)} images but {len(boxes)} boxes; pass one box per image.")
    return [[im, im.convert("RGB").crop(tuple(int(v) for v in box))] for im, box in zip(images, boxes)]


__all__ = ["cells_crop_box", "random_crop_box", "VICROP_LAYERS", "HIGH_RES", "high_res_tiles", "needs_tiling", "merge_tiles", "FULL_EXTENT", "VICROP_RATIOS",
           "VICROP_LAYER_OF_32", "peak_crop_box", "vicrop_box", "attention_ratio",
           "vicrop_layer", "crop_images"]
