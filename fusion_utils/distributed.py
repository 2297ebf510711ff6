"""Data parallelism across processes with torch.distributed (torchrun, ``accelerate launch``, or a file rendezvous).

A launcher sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``); `setup` then joins the
process group (NCCL when the process has a GPU, gloo on CPU) with a timeout on every collective. Without a launcher
nothing here does anything: `rank` is 0, `world_size` is 1, `barrier` returns at once, and the experiments run
exactly as in one process.

How an experiment splits (see `fusion_utils.experiments.common.run_experiment`): the samples not yet recorded are cut
into batches exactly as one process would cut them, and batch k goes to rank k mod world size. So a fresh
distributed run computes every sample in the same batch as a single-process run, and its records hold the same
values. The ranks do not wait for each other between batches; progress and failures pass through small notes in
the run directory (rank 0's bar counts every rank's samples; a failed rank's error stops the others after their
current batch), and at the end every rank, failed or not, meets in one exchange (`step`), so a failure on one rank
stops all of them with that rank's message instead of leaving the others waiting.

Environment: ``FUSION_UTILS_DIST_TIMEOUT`` (seconds, default 1800) bounds every barrier and exchange.
"""
from __future__ import annotations

import datetime as dt
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["launched", "setup", "teardown", "active", "alone", "rank", "world_size", "is_main", "barrier", "shard",
           "step", "device_for", "timeout", "RankFailed", "gather_objects", "Status", "failure"]


_ALONE = False  # inside `alone()`: this rank works as a single process although the job has several


class RankFailed(RuntimeError):
    """Raised on every rank when one rank's batch raised: the message names that rank, its sample ids and error."""


def timeout() -> dt.timedelta:
    """The bound on every barrier and exchange (``FUSION_UTILS_DIST_TIMEOUT`` seconds, default 30 minutes)."""
    raw = os.environ.get("FUSION_UTILS_DIST_TIMEOUT", "1800")
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"FUSION_UTILS_DIST_TIMEOUT={raw!r} is not a number of seconds; set it to e.g. 1800.") from None
    return dt.timedelta(seconds=seconds)


def launched() -> bool:
    """True when a launcher (torchrun, accelerate launch) started this process as one of several."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def setup(backend: str | None = None, init_method: str | None = None, *, rank_: int | None = None,
          world_size_: int | None = None) -> bool:
    """Join the process group if a launcher asked for one (or ``init_method`` is given); True when distributed.

    Idempotent. ``backend`` defaults to NCCL when CUDA is available and gloo otherwise; on NCCL each process takes
    the GPU ``LOCAL_RANK``.
    """
    import torch.distributed as dist

    if _ALONE or not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if init_method is None and not launched():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kwargs = {"backend": backend, "timeout": timeout()}
    if init_method is not None:
        kwargs.update(init_method=init_method, rank=rank_, world_size=world_size_)
    dist.init_process_group(**kwargs)
    return dist.get_world_size() > 1


def teardown() -> None:
    """Leave the process group (if this process joined one), so the job exits cleanly."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    import torch.distributed as dist

    return not _ALONE and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextmanager
def alone():
    """Inside, this rank runs as if it were the only process (`setup` and `active` say no, `rank` is 0), so the
    experiments do not split their samples: for jobs split by whole tasks, e.g. one model per rank in
    ``fusion-utils atlas``. Take the rank and world size before entering."""
    global _ALONE
    saved, _ALONE = _ALONE, True
    try:
        yield
    finally:
        _ALONE = saved


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def device_for(device: str | torch.device) -> torch.device | str:
    """The device this rank should use for ``device``: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` under a launcher."""
    if str(device) == "cuda" and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def barrier() -> None:
    """Wait for every rank, at most `timeout()`; a no-op in one process.

    gloo's monitored barrier names the ranks that did not arrive; NCCL's barrier is bounded by the group's timeout.
    """
    import torch.distributed as dist

    if not active():
        return
    if dist.get_backend() == "gloo":
        dist.monitored_barrier(timeout=timeout(), wait_all_ranks=True)
    else:
        dist.barrier()


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    import torch.distributed as dist

    if not active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(n_batches: int, rank_: int | None = None, world: int | None = None) -> list[int]:
    """The batch indices this rank computes: k, k + W, k + 2W, ... (round robin, so every rank gets a near-equal
    share and a single-process run's batches are kept whole)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    return list(range(rank_, n_batches, world))


@dataclass
class Status:
    """What a rank reports at the final exchange of a run."""

    rank: int
    done: int  # samples finished
    error: str | None = None  # "rank r failed on sample ID: Type: message"


def step(done: int, error: str | None = None) -> list[Status]:
    """Exchange each rank's count of finished samples and its error, if any (collective: every rank calls it)."""
    return gather_objects(Status(rank(), done, error))


def failure(statuses: Sequence[Status]) -> str | None:
    """The first failed rank's message, or None."""
    for s in statuses:
        if s.error is not None:
            return s.error
    return None
