"""What a chapter notebook calls first: check its parameters, load its data, and load its models one at a time."""
from __future__ import annotations

import gc
from typing import Iterable, Iterator

from ..report.tables import label

__all__ = ["check_params", "load_data", "iter_models", "label"]


_DTYPES = ("float32", "bfloat16", "float16", None)


def check_params(*, models, dataset, samples, device, dtype, seed, source=None, **knobs) -> None:
    """Validate a chapter's papermill parameters; raise ValueError with one sentence naming the fix."""
    if isinstance(models, str) or not isinstance(models, (list, tuple)) or not models:
        raise ValueError(f"models must be a non-empty list of model names, e.g. ['organism:llava'], got {models!r}.")
    from ..data import BENCHMARKS

    if not isinstance(dataset, str) or not (dataset.lower().startswith("world") or dataset.lower() in BENCHMARKS):
        raise ValueError(f"dataset must be 'world' or one of {', '.join(BENCHMARKS)}, got {dataset!r}.")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}.")
    if not isinstance(device, str) or not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}.")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of float32, bfloat16, float16 (or None for the checkpoint's), got {dtype!r}.")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}.")
    for k, v in knobs.items():
        if k in ("rho", "lam", "threshold") and not (isinstance(v, (int, float)) and 0 <= v <= 1):
            raise ValueError(f"{k} must be a number between 0 and 1, got {v!r}.")
        if k in ("rhos", "lams") and not (isinstance(v, (list, tuple)) and all(0 <= x <= 1 for x in v)):
            raise ValueError(f"{k} must be a list of numbers between 0 and 1, got {v!r}.")
    if dataset.lower() not in ("world",) and not dataset.lower().startswith("world") and source is None:
        pass  # the lmms-eval hub dataset is used (needs network + `datasets`)


def load_data(dataset: str, samples: int, seed: int, source=None):
    from ..data import load_dataset

    return load_dataset(dataset, n=samples, source=source, seed=seed if dataset.startswith("world") else None)


def iter_models(models: Iterable[str], device: str = "cpu", dtype=None) -> Iterator:
    """Load each model in turn, yield it, and free it before the next (two 7B models need not fit at once)."""
    from ..models import load_model

    for name in models:
        lm = load_model(name, device=device, dtype=dtype)
        try:
            yield lm
        finally:
            del lm
            gc.collect()
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:  # pragma: no cover
                pass
