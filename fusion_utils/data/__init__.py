"""Datasets: the procedural world (ground-truth relevance per cell) and the paper's VQA benchmarks."""
from __future__ import annotations

from .sample import SCORERS, Sample, SampleSet, resample_mask

BENCHMARKS = ("gqa", "vqav2", "okvqa", "vizwiz", "textvqa", "docvqa", "mmbench")


def load_dataset(name: str, *, split: str | None = None, n: int | None = None, source: str | None = None,
                 seed: int | None = None) -> SampleSet:
    """Load a dataset by name: ``world`` (procedural, offline) or one of the paper's benchmarks.

    Benchmarks come from ``source``: a Hugging Face ``datasets`` id or a local JSONL/Parquet file or folder.
    """
    key = name.lower()
    if key == "world" or key.startswith("world:"):
        from .world import world_dataset

        families = key.split(":", 1)[1].split(",") if ":" in key else None
        return world_dataset(split=split or "test", n=n, seed=seed, families=families)
    if key in BENCHMARKS:
        from .benchmarks import load_benchmark

        return load_benchmark(key, source=source, split=split, n=n)
    raise ValueError(f"Unknown dataset {name!r}; use 'world' or one of {', '.join(BENCHMARKS)}.")


__all__ = ["Sample", "SampleSet", "SCORERS", "BENCHMARKS", "load_dataset", "resample_mask"]
