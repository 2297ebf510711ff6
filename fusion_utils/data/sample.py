"""The unit every experiment consumes: one image, one question, its gold answers.

A `Sample` is model-agnostic. `relevant` is the ground-truth relevance of image regions when a dataset knows it
(the procedural world does; real benchmarks do not): a boolean grid laid uniformly over the whole image, in any
resolution. `relevant_fraction` resamples it onto a model's patch grid.

`group` is the key a dev/test split must keep on one side: samples sharing it share their image or are copies of
one question. The loaders set it where they know one: GQA's ``imageId``, VQAv2's and TextVQA's ``image_id``,
DocVQA's ``docId``, MMBench's question index (``index`` modulo 10^6, which joins a question's rotated copies; the
copies share the image too), the world's scene (one question per scene, so the sample id). ``None`` means the
sample is its own group (`Sample.group_key` then gives the id).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

SCORERS = ("vqa", "exact", "anls", "option")


@dataclass
class Sample:
    id: str
    image: Image.Image
    question: str
    answers: list[str]
    relevant: np.ndarray | None = None  # bool [rows, cols] over the whole image, or None
    family: str | None = None  # question family / type, for per-family tables
    choices: list[str] | None = None  # multiple-choice options (MMBench), answers hold the letter
    meta: dict[str, Any] = field(default_factory=dict)
    group: str | None = None  # the split key: image / question-copies group (module docstring); None: the id

    @property
    def group_key(self) -> str:
        """The key a dev/test split groups by: ``group`` where the loader set one, else the sample id."""
        return self.id if self.group is None else str(self.group)

    def relevant_fraction(self, rows: int, cols: int) -> np.ndarray | None:
        """Fraction of each cell of a rows x cols patch grid covered by relevant regions (float [rows, cols])."""
        if self.relevant is None:
            return None
        return resample_mask(np.asarray(self.relevant, dtype=bool), rows, cols)


def resample_mask(mask: np.ndarray, rows: int, cols: int, extent=(0.0, 0.0, 1.0, 1.0)) -> np.ndarray:
    """Area-weighted resampling of a boolean grid covering [0,1]^2 onto a rows x cols grid that covers ``extent``
    = (left, top, right, bottom) of the image, as fractions (default: the whole image; a centre-cropping processor
    shows less of a non-square image, a padding one more, and the padding holds nothing relevant)."""
    r0, c0 = mask.shape
    left, top, right, bottom = (float(x) for x in extent)
    wr = _overlap(r0, rows, top, bottom)  # [rows, r0]
    wc = _overlap(c0, cols, left, right)  # [cols, c0]
    return wr @ mask.astype(np.float64) @ wc.T


def _overlap(n_src: int, n_dst: int, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """[n_dst, n_src]: the fraction of each destination cell (uniform over [lo, hi]) that each source cell (uniform
    over [0, 1]) covers; rows sum to 1 where the destination lies inside [0, 1]."""
    src = np.linspace(0.0, 1.0, n_src + 1)
    dst = np.linspace(lo, hi, n_dst + 1)
    a = np.maximum(dst[:-1, None], src[None, :-1])
    b = np.minimum(dst[1:, None], src[None, 1:])
    return np.clip(b - a, 0.0, None) / np.diff(dst)[:, None]


class SampleSet(Sequence[Sample]):
    """A named, scored, finite dataset of samples. Benchmarks and the procedural world both return one."""

    def __init__(self, name: str, samples: Sequence[Sample], scorer: str, meta: dict[str, Any] | None = None):
        if scorer not in SCORERS:
            raise ValueError(f"Unknown scorer {scorer!r}; use one of {', '.join(SCORERS)}.")
        self.name = name
        self._samples = list(samples)
        self.scorer = scorer
        self.meta = dict(meta or {})

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return SampleSet(self.name, self._samples[i], self.scorer, self.meta)
        return self._samples[i]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._samples)

    def head(self, n: int | None) -> "SampleSet":
        return self if n is None else self[:n]

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self._samples]

    def fingerprint(self) -> str:
        """Hash of the dataset name, scorer and sample ids, questions and answers (not pixels)."""
        h = hashlib.sha256(f"{self.name}|{self.scorer}".encode())
        for s in self._samples:
            h.update(f"|{s.id}|{s.question}|{'/'.join(s.answers)}".encode())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"SampleSet({self.name!r}, n={len(self)}, scorer={self.scorer!r})"
