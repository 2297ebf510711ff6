"""Second images for two-image prompts ``[original, second]`` (issue 16): the same image again, a crop of the
question's relevant cells, or a crop of a region that holds none of them.

Boxes are pixel boxes ``(left, top, right, bottom)`` on the world's 96 x 96 image, aligned to its 6 x 6 cells. The
relevant crop is what a crop method hopes to find (the contrastive crop variant, ViCrop: a box around the attention
peak, padded by one cell); the irrelevant one, of the same size, is what it gets when the map points elsewhere.
"""
from __future__ import annotations

import numpy as np

from ..data import world

KINDS = ("one", "same", "relevant", "irrelevant", "random")
CELL = world.IMAGE_SIZE // world.GRID


def _cells_to_px(r0, c0, r1, c1) -> tuple[int, int, int, int]:
    return (int(c0) * CELL, int(r0) * CELL, int(c1) * CELL, int(r1) * CELL)


def relevant_box(sample, pad: int = 1, min_cells: int = 2) -> tuple[int, int, int, int]:
    """The bounding box of the sample's relevant cells, padded by `pad` cells, at least `min_cells` a side."""
    rel = np.asarray(sample.relevant, bool)
    if not rel.any():
        raise ValueError("This sample has no relevant cells (Sample.relevant is all False); a relevant crop needs "
                         "at least one -- use the 'same' or 'random' second image.")
    n = world.GRID
    rr, cc = np.nonzero(rel)
    r0, r1 = max(0, rr.min() - pad), min(n, rr.max() + 1 + pad)
    c0, c1 = max(0, cc.min() - pad), min(n, cc.max() + 1 + pad)

    def widen(lo, hi):  # grow towards the side with room, so a box at the border keeps its minimum size
        while hi - lo < min_cells:
            if hi < n:
                hi += 1
            elif lo > 0:
                lo -= 1
        return lo, hi

    r0, r1 = widen(r0, r1)
    c0, c1 = widen(c0, c1)
    return _cells_to_px(r0, c0, r1, c1)


def irrelevant_box(sample, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box of the relevant box's size that overlaps the fewest relevant cells (none where there is room); ties
    broken by `rng`."""
    l, t, r, b = relevant_box(sample)
    h, w = (b - t) // CELL, (r - l) // CELL
    rel = np.asarray(sample.relevant, bool)
    n = world.GRID
    options = [(int(rel[i:i + h, j:j + w].sum()), i, j) for i in range(n - h + 1) for j in range(n - w + 1)]
    best = min(o[0] for o in options)
    cands = [(i, j) for k, i, j in options if k == best]
    i, j = cands[int(rng.integers(len(cands)))]
    return _cells_to_px(i, j, i + h, j + w)


def random_box(rng: np.random.Generator, lo: int = 2, hi: int = 5) -> tuple[int, int, int, int]:
    """A cell-aligned box of lo..hi cells a side anywhere in the image."""
    n = world.GRID
    h, w = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    i, j = int(rng.integers(0, n - h + 1)), int(rng.integers(0, n - w + 1))
    return _cells_to_px(i, j, i + h, j + w)


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
    if kind == "random":
        return [img, img.crop(random_box(rng))]
    raise ValueError(f"Unknown second-image kind {kind!r}; use one of {', '.join(KINDS)}.")


__all__ = ["KINDS", "relevant_box", "irrelevant_box", "random_box", "images_for"]
