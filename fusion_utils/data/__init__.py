"""Datasets: the procedural world (ground-truth relevance per cell) and the paper's VQA benchmarks."""
from __future__ import annotations

from .sample import SCORERS, Sample, SampleSet, resample_mask

# the procedural worlds: ``world``, and ``world-fine``, its headroom split (small objects on larger images)
WORLDS = ("world", "world-fine")
BENCHMARKS = ("gqa", "vqav2", "okvqa", "vizwiz", "textvqa", "docvqa", "mmbench")


def load_dataset(name: str, *, split: str | None = None, n: int | None = None, source: str | None = None,
                 seed: int | None = None) -> SampleSet:
    """Load a dataset by name: ``world`` or ``world-fine`` (procedural, offline; ``world:count,spatial`` keeps those
    families) or one of the paper's benchmarks.

    Benchmarks come from ``source``: a Hugging Face ``datasets`` id or a local JSONL/Parquet file or folder.
    """
    key = name.lower()
    base = key.split(":", 1)[0]
    if base in WORLDS:
        from .world import world_dataset

        families = key.split(":", 1)[1].split(",") if ":" in key else None
        return world_dataset(split=split or "test", n=n, seed=seed, families=families, fine=base == "world-fine")
    if key in BENCHMARKS:
        from .benchmarks import load_benchmark

        return load_benchmark(key, source=source, split=split, n=n)
    raise ValueError(f"Unknown dataset {name!r}; use 'world', 'world-fine' or one of {', '.join(BENCHMARKS)}.")


__all__ = ["Sample", "SampleSet", "SCORERS", "WORLDS", "BENCHMARKS", "load_dataset", "resample_mask"]
