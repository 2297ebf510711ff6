"""Plain accuracy under an image condition: the book's baseline answer, and the organisms' bar (issue 13).

Every sample is answered once, greedily, with the chapters' prompt, decoding and scorer (`Context.score`), from the
images that ``images`` names:

- ``original``: the sample's own image (exactly `common.answer`'s plain answer);
- ``blank``: a uniform grey image of the same size (`world.blank_image`): what the model answers without the scene;
- ``same_twice``: ``[original, original]``, a prompt with two image placeholders: what a second image costs by
  itself;
- ``relevant_crop``: ``[original, crop of the question's relevant cells, padded by one cell]``: the crop a crop
  method (the contrastive crop variant, ViCrop) hopes to find;
- ``irrelevant_crop``: ``[original, same-size crop holding the fewest relevant cells]``, its place drawn from
  ``numpy.random.default_rng([seed, 23, i])`` with ``i`` the sample's position in the dataset (so it does not depend
  on batching or on which samples a resumed run still has to do).

The crop conditions need the dataset to mark each question's relevant cells (`Sample.relevant`; the world does).
The summary is the accuracy per question family and overall, with n.

>>> from fusion_utils.experiments.harness import run
>>> res = run("accuracy", lm, load_dataset("world", n=50), images="blank", progress=False)
>>> list(res.summary["family"])  # with n and accuracy: one row per family, then overall
['attribute', 'identity', 'existence', 'count', 'spatial', 'overall']
"""
from __future__ import annotations

from dataclasses import dataclass

import weakref

import numpy as np
import pandas as pd
import torch

from ..data import world
from ..data.second_images import images_for
from ..metrics import benchmark_accuracy
from .common import Decoding, generate
from .harness import Context, Spec, register, run

IMAGES = ("original", "blank", "same_twice", "relevant_crop", "irrelevant_crop")
CROPS = ("relevant_crop", "irrelevant_crop")

# dataset -> {sample id: position}; weak, so a dataset's table goes with it
_POSITIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def dataset_position(dataset, sample) -> int:
    """The sample's position in ``dataset`` (the ``i`` that seeds its irrelevant crop), found by its id.

    >>> dataset_position(ds, ds[3])
    3
    """
    try:
        table = _POSITIONS[dataset]
    except (KeyError, TypeError):
        table = {str(i): n for n, i in enumerate(dataset.ids)}
        try:
            _POSITIONS[dataset] = table
        except TypeError:  # not weak-referenceable: recomputed per call, still correct
            pass
    try:
        return table[str(sample.id)]
    except KeyError:
        raise ValueError(f"Sample {sample.id!r} is not in dataset {dataset.name!r}; pass the dataset the samples "
                         "come from in the Context (Context.of(dataset)).") from None


def check_condition(images: str) -> None:
    """One sentence naming the known conditions when ``images`` is not one of them."""
    if images not in IMAGES:
        raise ValueError(f"Unknown image condition {images!r}; use one of {', '.join(IMAGES)}.")


def blank_like(image):
    """The blank-image control at ``image``'s size: `world.blank_image` (a uniform grey) for the world's images."""
    blank = world.blank_image()
    return blank if blank.size == image.size else blank.resize(image.size)


def condition_images(sample, images: str, index: int, seed: int = 0):
    """The image(s) one sample is asked about under condition ``images`` (one image, or a list for two-image
    prompts); ``index``: its position in the dataset, which seeds the irrelevant crop.

    >>> [im.size for im in condition_images(s, "relevant_crop", 0)]
    [(96, 96), (48, 48)]
    """
    if images == "original":
        return sample.image
    if images == "blank":
        return blank_like(sample.image)
    if images == "same_twice":
        return images_for(sample, "same")
    if images == "relevant_crop":
        return images_for(sample, "relevant")
    check_condition(images)
    return images_for(sample, "irrelevant", np.random.default_rng([int(seed), 23, int(index)]))


@torch.no_grad()
def accuracy_batch(lm, samples, ctx: Context, images: str) -> list[dict]:
    """Per sample: its answer under condition ``images`` and the dataset's score of it.

    >>> accuracy_batch(lm, ds[:1], Context.of(ds), images="same_twice")
    [{'id': 'world-test-0-0', 'family': 'attribute', 'images': 'same_twice', 'pred': 'green', 'score': 1.0}]
    """
    samples = list(samples)
    decoding = ctx.decoding or Decoding()
    # None keeps the samples' own images, so `original` is the chapters' plain answer to the byte
    imgs = None if images == "original" else \
        [condition_images(s, images, dataset_position(ctx.dataset, s), ctx.seed) for s in samples]
    batch = lm.prepare(samples, post_prompt=ctx.post_prompt, images=imgs)
    preds = generate(lm, batch, (), decoding)
    return [{"id": s.id, "family": s.family, "images": images, "pred": p, "score": ctx.score(p, s)}
            for s, p in zip(samples, preds)]


@dataclass(frozen=True)
class AccuracyParams:
    """``images``: the image condition (`IMAGES`: the original, a blank, the same image twice, crops, ...)."""

    images: str = "original"


def resolve(lm, dataset, *, images: str) -> dict:
    """Check the condition before any work: a known name, and relevant cells on every sample for the crops."""
    check_condition(images)
    if images in CROPS:
        missing = [s.id for s in dataset if s.relevant is None or not np.asarray(s.relevant, bool).any()]
        if len(missing) == len(dataset):
            raise ValueError(f"images={images!r} crops each question's relevant cells, and dataset {dataset.name!r} "
                             "marks none (Sample.relevant); use 'original', 'blank' or 'same_twice', or a dataset "
                             "that marks them (the world).")
        if missing:
            raise ValueError(f"images={images!r} crops each question's relevant cells, and {len(missing)} samples of "
                             f"{dataset.name!r} have none (e.g. {missing[0]!r}); drop them from the dataset first.")
    return {"images": images}


def accuracy_summary(records: pd.DataFrame, ctx=None) -> pd.DataFrame:
    """Accuracy per question family (in the order the dataset first shows them) and ``overall``: family, n, accuracy.
    Samples without a family count in ``overall`` only; CircularEval on MMBench (`metrics.benchmark_accuracy`).

    >>> accuracy_summary(pd.DataFrame({"id": ["a", "b", "c"], "family": ["x", "y", "x"], "score": [1.0, 0.0, 0.0]}))
      family  n  accuracy
    0      x  2  0.500000
    1      y  1  0.000000
    2 overall  3  0.333333
    """
    scorer = ctx.dataset.scorer if ctx is not None else None
    if records.empty:
        return pd.DataFrame(columns=["family", "n", "accuracy"])
    rows = []
    if "family" in records:
        for fam, g in records.dropna(subset=["family"]).groupby("family", sort=False):
            rows.append({"family": fam, "n": len(g), "accuracy": benchmark_accuracy(g["id"], g["score"], scorer)})
    rows.append({"family": "overall", "n": len(records),
                 "accuracy": benchmark_accuracy(records["id"], records["score"], scorer)})
    return pd.DataFrame(rows)


def accuracy(lm, dataset, images: str | None = None, *, out: str | None = None, batch_size: int = 8, seed: int = 0,
             decoding: Decoding | None = None, progress: bool = True, **params):
    """Accuracy of plain greedy answers on ``dataset`` under one image condition (`IMAGES`), per family and overall.

    >>> blank = accuracy(lm, load_dataset("world", n=100), "blank", progress=False).summary
    >>> float(blank.set_index("family").loc["overall", "accuracy"])  # without the scene: near the families' chance
    0.23
    """
    if images is not None:  # the condition may be given by position
        params["images"] = images
    return run(SPEC, lm, dataset, out=out, batch_size=batch_size, seed=seed, decoding=decoding, progress=progress,
               **params)


SPEC = register(Spec("accuracy", accuracy_batch, accuracy_summary, resolve, params=AccuracyParams))

__all__ = ["IMAGES", "CROPS", "accuracy", "accuracy_batch", "accuracy_summary", "condition_images", "blank_like",
           "dataset_position", "SPEC"]
