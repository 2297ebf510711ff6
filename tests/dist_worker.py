"""A data-parallel experiment run for the tests and the benchmark; start it with torchrun (or plain python for one
process). It runs `harness.run` as `fusion-utils run` does, and can stand in a per-batch function that logs which
sample ids this process computed, kills this process, or raises on a chosen sample (to test resume and failures).

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py --out DIR --model organism:llava-8l \
        --experiment masking --samples 8 [--computed-log FILE] [--die-on ID --die-rank 1] [--raise-on ID]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--experiment", action="append", required=True)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--param", action="append", default=[], help="EXPERIMENT:NAME=JSON")
    p.add_argument("--computed-log", help="append 'rank id' for every sample this process computes")
    p.add_argument("--die-on", help="os._exit(9) on this rank before computing the batch holding this sample id")
    p.add_argument("--die-rank", type=int, default=1)
    p.add_argument("--raise-on", help="raise ValueError when computing this sample id")
    p.add_argument("--timing", help="rank 0 writes {'seconds': ...} of the runs (after a start barrier) here")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--in-memory", help="also run the first experiment on the first model without a run directory; "
                                       "rank 0 writes its records (clocks left out) here as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from fusion_utils import distributed, load_model
    from fusion_utils.data import load_dataset
    from fusion_utils.experiments import harness

    distributed.setup()
    rank = distributed.rank()
    dataset = load_dataset("world", n=args.samples)
    params: dict[str, dict] = {}
    for text in args.param:
        exp, kv = text.split(":", 1)
        k, v = kv.split("=", 1)
        params.setdefault(exp, {})[k] = json.loads(v)

    def wrap(spec):
        def per_batch(lm, samples, ctx, **kw):
            ids = [str(s.id) for s in samples]
            if args.die_on in ids and rank == args.die_rank:
                os._exit(9)  # a killed rank: no cleanup, no message
            if args.raise_on in ids:
                raise ValueError(f"injected failure on {args.raise_on}")
            records = spec.per_batch(lm, samples, ctx, **harness.accepted(spec.per_batch, kw))
            if args.computed_log:
                with open(args.computed_log, "a") as f:
                    f.write("".join(f"{rank} {i}\n" for i in ids))
            return records
        # the same name and parameters as the registered experiment: the same run directory and configuration
        return dataclasses.replace(spec, per_batch=per_batch)

    models = [load_model(m) for m in args.model]
    distributed.barrier()  # the clock starts when every rank has its models
    t0, c0 = time.perf_counter(), time.process_time()
    for lm in models:
        for exp in args.experiment:
            spec = harness.get_spec(exp)
            if args.computed_log or args.die_on or args.raise_on:
                spec = wrap(spec)
            harness.run(spec, lm, dataset, out=args.out, batch_size=args.batch_size, progress=rank == 0,
                        **params.get(exp, {}))
    seconds = time.perf_counter() - t0
    cpu = distributed.gather_objects(time.process_time() - c0)  # every rank's CPU seconds, for the benchmark
    if args.in_memory:
        exp = args.experiment[0]
        res = harness.run(exp, models[0], dataset, batch_size=args.batch_size, progress=False, **params.get(exp, {}))
        if rank == 0:
            df = res.records.drop(columns=[c for c in ("seconds", "plain_seconds") if c in res.records.columns])
            with open(args.in_memory, "w") as f:
                f.write(df.to_json(orient="records", double_precision=15))
    if args.timing and rank == 0:
        with open(args.timing, "w") as f:
            json.dump({"seconds": seconds, "cpu_seconds": cpu, "world_size": distributed.world_size()}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
