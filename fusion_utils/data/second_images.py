"""Second images for two-image prompts ``[original, second]`` (issue 16): the same image again, a crop of the
question's relevant cells, or a crop of a region that holds none of them.

Boxes are pixel boxes ``(left, top, right, bottom)`` aligned to the cells of the sample's relevance grid
(`Sample.relevant`, laid uniformly over the whole image): on the world, its 6 x 6 cells of 16 px on the 96 x 96 image.
The relevant crop is what a crop method hopes to find (the contrastive crop variant, ViCrop: a box around the
attention peak, padded by one cell); the irrelevant one, of the same size, is what it gets when the map points
elsewhere. Used by the ``accuracy`` experiment's crop conditions and the organisms' stage (e).

>>> from fusion_utils.data.world import world_dataset
>>> s = world_dataset("test", 1)[0]
>>> [im.size for im in images_for(s, "relevant")]  # [original, crop of the relevant cells padded by one cell]
[(96, 96), (48, 48)]
"""
from __future__ import annotations

import numpy as np

from . import world

KINDS = ("one", "same", "relevant", "irrelevant", "random")
CELL = world.IMAGE_SIZE // world.GRID


def relevance_grid(sample) -> np.ndarray:
    """The sample's relevant cells as a bool grid, or one sentence naming the fix when it has none."""
    if sample.relevant is None:
        raise ValueError(f"Sample {sample.id!r} has no relevant cells (Sample.relevant is None); a crop of the "
                         "relevant or an irrelevant region needs them -- use a dataset that marks them (the world), or "
                         "the 'same' or 'random' second image.")
    rel = np.asarray(sample.relevant, bool)
    if not rel.any():
        raise ValueError("This sample has no relevant cells (Sample.relevant is all False); a relevant crop needs "
                         "at least one -- use the 'same' or 'random' second image.")
    return rel


def cells_to_px(r0, c0, r1, c1, grid=(world.GRID, world.GRID), size=(world.IMAGE_SIZE, world.IMAGE_SIZE)):
    """The pixel box of cells [r0, r1) x [c0, c1) of a ``grid`` = (rows, cols) laid over an image of ``size`` = (W, H).

    >>> cells_to_px(1, 2, 3, 5)
    (32, 16, 80, 48)
    """
    (rows, cols), (w, h) = grid, size
    return (round(int(c0) * w / cols), round(int(r0) * h / rows), round(int(c1) * w / cols), round(int(r1) * h / rows))


def relevant_cells(sample, pad: int = 1, min_cells: int = 2) -> tuple[int, int, int, int]:
    """(r0, c0, r1, c1): the cells of the bounding box of the sample's relevant cells, padded by `pad` cells, at
    least `min_cells` a side."""
    rel = relevance_grid(sample)
    rows, cols = rel.shape
    rr, cc = np.nonzero(rel)
    r0, r1 = max(0, rr.min() - pad), min(rows, rr.max() + 1 + pad)
    c0, c1 = max(0, cc.min() - pad), min(cols, cc.max() + 1 + pad)

    def widen(lo, hi, n):  # grow towards the side with room, so a box at the border keeps its minimum size
        while hi - lo < min(min_cells, n):
            if hi < n:
                hi += 1
            elif lo > 0:
                lo -= 1
        return lo, hi

    r0, r1 = widen(r0, r1, rows)
    c0, c1 = widen(c0, c1, cols)
    return int(r0), int(c0), int(r1), int(c1)


def relevant_box(sample, pad: int = 1, min_cells: int = 2) -> tuple[int, int, int, int]:
    """The pixel box of the sample's relevant cells, padded by `pad` cells, at least `min_cells` a side.

    >>> from fusion_utils.data.world import world_dataset
    >>> relevant_box(world_dataset("test", 1)[0])
    (0, 16, 48, 64)
    """
    rel = relevance_grid(sample)
    return cells_to_px(*relevant_cells(sample, pad, min_cells), grid=rel.shape, size=sample.image.size)


def irrelevant_cells(sample, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(r0, c0, r1, c1): a box of the relevant box's size that overlaps the fewest relevant cells (none where there is
    room); ties broken by `rng`."""
    r0, c0, r1, c1 = relevant_cells(sample)
    h, w = r1 - r0, c1 - c0
    rel = relevance_grid(sample)
    rows, cols = rel.shape
    options = [(int(rel[i:i + h, j:j + w].sum()), i, j) for i in range(rows - h + 1) for j in range(cols - w + 1)]
    best = min(o[0] for o in options)
    cands = [(i, j) for k, i, j in options if k == best]
    i, j = cands[int(rng.integers(len(cands)))]
    return i, j, i + h, j + w


def irrelevant_box(sample, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """The pixel box of `irrelevant_cells`."""
    return cells_to_px(*irrelevant_cells(sample, rng), grid=relevance_grid(sample).shape, size=sample.image.size)


def random_cells(rng: np.random.Generator, lo: int = 2, hi: int = 5) -> tuple[int, int, int, int]:
    """(r0, c0, r1, c1): a box of lo..hi cells a side anywhere on the world's board."""
    n = world.GRID
    h, w = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    i, j = int(rng.integers(0, n - h + 1)), int(rng.integers(0, n - w + 1))
    return i, j, i + h, j + w


def random_box(rng: np.random.Generator, lo: int = 2, hi: int = 5) -> tuple[int, int, int, int]:
    """The pixel box of `random_cells`: a cell-aligned box of lo..hi cells a side anywhere in the world's image."""
    return cells_to_px(*random_cells(rng, lo, hi))


def zoomed_cells(box_cells, tokens) -> tuple[np.ndarray, np.ndarray]:
    """Which cell of the board each token of a crop shows once the processor has resized the crop: for a crop of
    cells ``box_cells`` = (r0, c0, r1, c1) encoded as a ``tokens`` = (rows, cols) token grid, the (row, col) cell under
    each token's centre, as two int arrays of shape ``tokens``. A crop of 3 cells a side resized to 6 x 6 tokens shows
    each cell on 2 x 2 tokens; a crop of 4 cells puts some token centres on a cell border, which counts for the cell
    after it. The box may be fractional: a processor that centre-crops a wide crop to a square shows only its middle
    (`fusion_utils.adapters.processed_extent`). Used to teach a vision tower to read a magnified cell as that cell
    (the organisms' stage (b+c)).

    >>> rows, cols = zoomed_cells((1, 2, 4, 5), (6, 6))
    >>> rows[:, 0].tolist(), cols[0].tolist()
    ([1, 1, 2, 2, 3, 3], [2, 2, 3, 3, 4, 4])
    """
    r0, c0, r1, c1 = (float(v) for v in box_cells)
    th, tw = (int(v) for v in tokens)
    rr = np.floor(r0 + (np.arange(th) + 0.5) * (r1 - r0) / th + 1e-9).astype(int)
    cc = np.floor(c0 + (np.arange(tw) + 0.5) * (c1 - c0) / tw + 1e-9).astype(int)
    return np.repeat(rr[:, None], tw, 1), np.repeat(cc[None, :], th, 0)


def first_token_of_each_cell(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Of a token grid's cells (``zoomed_cells``' output), True at the first token in reading order that shows each
    cell: teaching only that token a magnified cell's object (the rest `<empty>`) keeps one token per object, so a
    decoder that counts tokens counts a magnified object once.

    >>> first_token_of_each_cell(*zoomed_cells((0, 0, 3, 3), (6, 6)))[:2].astype(int).tolist()
    [[1, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0]]
    """
    cell = rows.astype(np.int64) * 1_000_003 + cols
    _, first = np.unique(cell.reshape(-1), return_index=True)
    out = np.zeros(cell.size, dtype=bool)
    out[first] = True
    return out.reshape(cell.shape)


def images_for(sample, kind: str, rng: np.random.Generator | None = None, image=None) -> list:
    """The prompt's images for `kind`: [original] ('one'), [original, original] ('same'), or [original, crop]."""
    img = (image if image is not None else sample.image).convert("RGB")
    if kind == "one":
        return [img]
    if kind == "same":
        return [img, img]
    if kind == "relevant":
        return [img, img.crop(relevant_box(sample))]
    rng = rng if rng is not None else np.random.default_rng(0)
    if kind == "irrelevant":
        return [img, img.crop(irrelevant_box(sample, rng))]
    if kind == "random":  # cells scaled to the image, so a `world-fine` image (192 px) gets the same cells
        return [img, img.crop(cells_to_px(*random_cells(rng), size=img.size))]
    raise ValueError(f"Unknown second-image kind {kind!r}; use one of {', '.join(KINDS)}.")


__all__ = ["KINDS", "CELL", "relevance_grid", "cells_to_px", "relevant_cells", "relevant_box", "irrelevant_cells", "irrelevant_box",
           "random_cells", "random_box", "zoomed_cells", "first_token_of_each_cell", "images_for"]
