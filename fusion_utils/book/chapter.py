"""What a chapter notebook calls first: check its parameters, load its data, and load its models one at a time."""
from __future__ import annotations

import gc
from typing import Iterable, Iterator

from ..report.tables import label

__all__ = ["check_params", "load_data", "load_split", "load_pilot", "choose_test_n", "dev_pilot", "widen",
           "iter_models", "label"]


_DTYPES = ("float32", "bfloat16", "float16", None)


def check_params(*, models, dataset, samples, device, dtype, seed, source=None, test_cap=None, **knobs) -> None:
    """Validate a chapter's papermill parameters; raise ValueError with one sentence naming the fix.

    ``test_cap``: None (``samples`` questions, split into dev and test by the verdicts' hash) or the most test
    questions a claim may draw; then ``samples`` is the pilot's size, in dev questions (see `load_pilot`)."""
    caps = {"test_cap": test_cap, **{k: v for k, v in knobs.items() if k.endswith("_cap")}}
    for name, cap in caps.items():  # test_cap, and a chapter's caps for its cheaper claims (layers_cap, gain_cap)
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
            raise ValueError(f"{name} must be None or a positive integer (test questions per claim), got {cap!r}.")
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


def load_split(dataset: str, dev: int, test: int, seed: int, source=None):
    """The first ``dev`` dev-side and the first ``test`` test-side questions of the dataset's stream, in stream
    order, by the verdicts' own hash of each question's split key (`report.stats.split_of` of `split_group`: the
    image or a question's copies where they repeat). Rules re-split these records by the same hash, so a test
    question is never on the dev side. The same seed gives the same questions, and a larger ``test`` (or ``dev``)
    keeps the smaller draw's questions as its first ones (the stream is read from its start; a dataset too short for
    the draw gives all it has)."""
    from ..data import SampleSet
    from ..report import stats

    want = {"dev": int(dev), "test": int(test)}
    m = max(16, 2 * (want["dev"] + want["test"]) + 16)
    while True:
        ds = load_data(dataset, m, seed, source)
        sides = [stats.split_of(stats.split_group(s)) for s in ds]
        if (len(ds) < m or sum(x == "dev" for x in sides) >= want["dev"]
                and sum(x == "test" for x in sides) >= want["test"]):
            break
        m *= 2
    taken = {"dev": 0, "test": 0}
    picked = []
    for s, side in zip(ds, sides):
        if taken[side] < want[side]:
            taken[side] += 1
            picked.append(s)
    return SampleSet(ds.name, picked, ds.scorer, meta={**ds.meta, "dev": taken["dev"], "test": taken["test"]})


def load_pilot(dataset: str, samples: int, seed: int, source=None, test_cap=None):
    """The questions a chapter runs first: without ``test_cap``, its whole build (`load_data`); with it, the pilot:
    ``samples`` dev-side questions only, from which `choose_test_n` decides how many test questions to draw."""
    if test_cap is None:
        return load_data(dataset, samples, seed, source)
    return load_split(dataset, samples, 0, seed, source)


def choose_test_n(pilot_rows, pilot, test_cap: int, *, floor: int | None = None) -> dict:
    """The power record from the chapter's verdict rows on its pilot (`report.power.choose`): the test questions
    each claim needs and how many to draw, at least ``floor`` (default: as many as the pilot has, so a claim decided
    on the pilot is judged on no fewer questions) and at most ``test_cap``."""
    from ..report import power

    n_pilot = len(pilot)
    return power.choose(pilot_rows, n_pilot=n_pilot, cap=test_cap,
                        floor=min(test_cap, n_pilot if floor is None else floor))


def dev_pilot(records, data):
    """The records of ``data``'s dev-side questions, as a pilot (`report.power.as_pilot`): what a rule run on them
    says about the test n its claim needs, without a look at any test question."""
    from ..report import power, stats

    dev = {str(s.id) for s in data if stats.split_of(stats.split_group(s)) == "dev"}
    return power.as_pilot(records[records["id"].astype(str).isin(dev)])


def widen(pilot_rows, data, cap: int, dataset: str, seed: int, source=None):
    """``(power record, draw)`` for claims whose ``pilot_rows`` were judged on the dev questions of ``data`` (a fixed
    build, `dev_pilot`): the test questions each needs (`choose_test_n`, never fewer than ``data`` has, at most
    ``cap``), and the draw of ``data``'s dev questions with that many test questions. ``data`` being the first
    questions of the stream (`load_data`), the draw holds all of them, so runs adopt their records
    (`runs.adopt`) and compute only the new questions."""
    from ..report import power, stats

    n_dev = sum(stats.split_of(stats.split_group(s)) == "dev" for s in data)
    pw = power.choose(pilot_rows, n_pilot=n_dev, cap=cap, floor=min(cap, len(data) - n_dev))
    return pw, load_split(dataset, n_dev, pw["drawn"], seed, source)


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
