"""The two bounds the contrastive chapter places every method between: the oracle crop and the random crop.

Both are crop methods answering from ``[original, crop]``, the two-image prompt of the contrastive crop and ViCrop,
and both read the question's **ground-truth relevant cells** (`Sample.relevant`), which only a dataset that marks
them has (the procedural world: ``world``, ``world-fine``). No attention map is involved:

- ``oracle_crop`` (upper bound): the box around the relevant cells by the paper-variant crop's box rule
  (`methods.cells_crop_box`: padded by one cell, each side at least a quarter of the image's, as
  `experiments.contrastive.crop_box` pads and widens ``I_A``'s peak region). It is what a crop method gets when its map
  points exactly at what the question is about.
- ``random_crop`` (lower bound): a box of the oracle's size at a random cell-aligned position
  (`methods.random_crop_box`), seeded per sample and run seed, so a sample's crop does not depend on its batch. It
  reads the relevant cells only for the size, so a method above it has chosen *where* better than chance, not
  merely gained from a second image of that size.

"Share of the oracle gain" (`report.baselines.oracle_shares`) then reads each method as
``(method − plain) / (oracle − plain)``.
"""
from __future__ import annotations

import zlib

import numpy as np

from ..methods import cells_crop_box, crop_images, random_crop_box
from ..prompts import POST_PROMPT
from .common import Decoding, generate

BOUNDS = ("oracle_crop", "random_crop")
# the paper-variant crop's padding and least side (`experiments.contrastive.crop_box`'s defaults)
PAD, MIN_SIDE = 1, 0.25


def _no_relevance(sample) -> bool:
    rel = getattr(sample, "relevant", None)
    return rel is None or not np.asarray(rel, bool).any()


def require_relevance(samples, dataset_name: str = "this dataset") -> None:
    """Refuse, in one sentence naming the fix, samples without ground-truth relevant cells."""
    missing = [s for s in samples if _no_relevance(s)]
    if missing:
        raise ValueError(f"The oracle and random crops read each question's ground-truth relevant cells, which "
                         f"{dataset_name} does not mark ({len(missing)} of {len(list(samples))} questions, e.g. "
                         f"{missing[0].id!r}); drop 'oracle_crop' and 'random_crop' from methods, or run them on "
                         "world or world-fine.")


def oracle_boxes(samples, *, pad: int = PAD, min_side: float = MIN_SIDE) -> list[tuple]:
    """Per sample, the pixel box around its relevant cells (`methods.cells_crop_box`)."""
    samples = list(samples)
    require_relevance(samples)
    return [cells_crop_box(s.relevant, s.image.size, pad=pad, min_side=min_side) for s in samples]


def sample_rng(seed: int, sample) -> np.random.Generator:
    """The random crop's generator for one sample: from the run's seed and the sample id, not its batch."""
    return np.random.default_rng([int(seed), zlib.crc32(str(sample.id).encode())])


def random_boxes(samples, *, seed: int = 0, pad: int = PAD, min_side: float = MIN_SIDE) -> list[tuple]:
    """Per sample, a box of its oracle box's size at a random cell-aligned position (`methods.random_crop_box`)."""
    samples = list(samples)
    return [random_crop_box(box, s.image.size, np.asarray(s.relevant).shape, sample_rng(seed, s))
            for s, box in zip(samples, oracle_boxes(samples, pad=pad, min_side=min_side))]


def crop_answers(lm, samples, boxes, *, post_prompt: str | None = POST_PROMPT,
                 decoding: Decoding | None = None) -> list[str]:
    """Answers to ``[original, crop]`` with the given pixel boxes, as the crop methods answer."""
    samples = list(samples)
    batch = lm.prepare(samples, post_prompt=post_prompt, images=crop_images([s.image for s in samples], boxes))
    return generate(lm, batch, (), decoding)


def oracle_crop(lm, samples, *, post_prompt: str | None = POST_PROMPT, decoding: Decoding | None = None,
                return_boxes: bool = False):
    """The oracle crop's answers (the upper bound); ``return_boxes``: also the boxes."""
    boxes = oracle_boxes(samples)
    preds = crop_answers(lm, samples, boxes, post_prompt=post_prompt, decoding=decoding)
    return (preds, boxes) if return_boxes else preds


def random_crop(lm, samples, *, seed: int = 0, post_prompt: str | None = POST_PROMPT,
                decoding: Decoding | None = None, return_boxes: bool = False):
    """The random crop's answers (the lower bound), seeded per sample; ``return_boxes``: also the boxes."""
    boxes = random_boxes(samples, seed=seed)
    preds = crop_answers(lm, samples, boxes, post_prompt=post_prompt, decoding=decoding)
    return (preds, boxes) if return_boxes else preds


__all__ = ["BOUNDS", "require_relevance", "oracle_boxes", "random_boxes", "sample_rng", "crop_answers",
           "oracle_crop", "random_crop"]
