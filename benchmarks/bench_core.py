"""Performance figures of the intervention core (`make bench`). Prints one `name value` line per figure.

All figures are ratios measured side by side in one run, on a shrunk-width model with realistic depth (32 decoder
layers) and LLaVA-1.5's 576 image tokens, CPU. The question (`QUESTION`) is one VQA question: the tiny tokenizer
gives 57 text tokens, 53 of them after the image, where LLaVA-1.5's own tokenizer gives roughly 45 with its chat
template (an estimate: 18 words and marks, the template's "USER: ... ASSISTANT:" and its answer-format line). Until
issue 27 the question was written twice (94 text tokens, 90 after the image), against this docstring's "~40 text
tokens". That matters for the sweeps, whose cost grows with the text
after the image (each variant recomputes it) while a naive forward's hardly does.

- zero_sweep_speedup_vs_naive       full 32-layer one-layer-zero sweep: naive (one forward per layer) / shared prefix
- knockout_sweep_speedup_vs_naive   same for knockout (shared prefix cache, batched question suffixes)
- capture_time_vs_plain             forward with CaptureAttention / plain forward (sdpa)
- capture_peak_mem_vs_plain         memory a forward adds on top of the loaded model, capture / plain
- capture_peak_mem_vs_eager_attentions   capture / (eager attention with output_attentions=True)
- contrastive_latency_vs_plain      soft contrastive answer (both passes) / plain greedy answer
- opera_latency_vs_plain            OPERA (5 beams, 5 candidates; bench_baselines.py) / plain greedy answer
- cd_latency_vs_plain               CD with an 8-layer amateur / plain greedy answer (same run as OPERA's)
- dp2_speedup_vs_single             one organism run (masking + contrastive on organism:llava, 64 samples): wall time
                                    of 1 process x 1 thread / 2 gloo processes (torchrun) x 1 thread each; the
                                    clock runs from a barrier after the model is loaded to the merged records and
                                    summary, so process start-up and loading are left out. Must be >= 1.6.
- dp2_cpu_seconds_vs_single         CPU seconds of both ranks together / the single process's: what data
                                    parallelism costs in work (near 1: no work lost to merging or barriers)
- dp2_balanced_speedup              single CPU seconds / the busier rank's: the speedup if each rank had a core
                                    to itself (on a shared machine the wall-clock figure falls below it)

Timings alternate A and B and report the median of the per-pair ratios. Memory: each variant runs in its own
process; after a warm-up, torch's profiler records every tensor the forward allocates and frees, and the figure is
the peak of the bytes held by tensors during the forward minus what was held at its start (`torch.profiler`'s
memory timeline). Tensor sizes do not depend on the allocator's state, so the figure is the same from run to run.
The RSS a forward adds (peak RSS minus the RSS before it, after /proc/self/clear_refs) is printed beside it
(``forward_added_rss_mib_*``) for reference: it depends on what malloc kept from earlier calls.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
QUESTION = "what is the color of the small object left of the large red circle in this picture ?"


def bench_model():
    from fusion_utils import load_model
    from fusion_utils.testing import tiny_model_dir

    return load_model(tiny_model_dir("llava", num_layers=32, image_size=336, hidden_size=128))


def bench_batch(lm):
    from PIL import Image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8))
    return lm.prepare([(img, QUESTION)])


def paired_ratio(a, b, reps: int) -> float:
    """Median over reps of time(a) / time(b), running a and b alternately."""
    ratios = []
    for _ in range(reps):
        t0 = time.perf_counter(); a(); ta = time.perf_counter() - t0
        t0 = time.perf_counter(); b(); tb = time.perf_counter() - t0
        ratios.append(ta / tb)
    return statistics.median(ratios)


def timing_figures(reps: int) -> dict:
    from fusion_utils import CaptureAttention, intervene
    from fusion_utils.engine.sweeps import masking_sweep

    lm = bench_model()
    b = bench_batch(lm)
    out = {}
    with torch.no_grad():
        lm.model(**b.inputs)  # warm-up
        for mode, key in (("zero", "zero_sweep_speedup_vs_naive"), ("knockout", "knockout_sweep_speedup_vs_naive")):
            fast = masking_sweep(lm, b, mode=mode)
            naive = masking_sweep(lm, b, mode=mode, method="naive")
            err = (fast["logits"] - naive["logits"]).abs().max().item()
            out[key] = paired_ratio(lambda: masking_sweep(lm, b, mode=mode, method="naive"),
                                    lambda: masking_sweep(lm, b, mode=mode), max(1, reps // 3))
            out[key.replace("speedup_vs_naive", "max_abs_logit_diff")] = err

        def plain():
            lm.model(**b.inputs)

        def capture():
            with intervene(lm, b, CaptureAttention()):
                lm.model(**b.inputs)

        out["capture_time_vs_plain"] = paired_ratio(capture, plain, reps * 3)
    return out


def _status_kib(field: str) -> int:
    """A /proc/self/status memory field (VmRSS: current, VmHWM: peak since the last reset), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_variant(variant: str) -> dict:
    """Bytes of tensors a forward adds at its peak (deterministic), and KiB of RSS it adds, in its own process."""
    from fusion_utils import CaptureAttention, intervene

    lm = bench_model()
    b = bench_batch(lm)

    def run():
        with torch.no_grad():
            if variant == "plain":
                lm.model(**b.inputs)
            elif variant == "capture":
                with intervene(lm, b, CaptureAttention()) as r:
                    lm.model(**b.inputs)
                r.attention
            elif variant == "eager":
                lm.model(**b.inputs, output_attentions=True)
            else:
                raise ValueError(variant)

    if variant == "eager":
        lm.set_attention("eager")
    run()  # warm-up: one-time allocations (kernels, caches) are not the forward's
    return {"bytes": tensor_peak_bytes(run), "rss_kib": rss_added_kib(run)}


def tensor_peak_bytes(run) -> int:
    """Peak bytes held by tensors while ``run()`` runs, above what was held when it started."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    held = [sum(s) for s in sizes]
    return int(max(held) - held[0])


def rss_added_kib(run) -> int:
    """Median over 5 calls of the peak RSS during ``run()`` minus the RSS just before it (allocator-dependent)."""
    import ctypes
    import gc

    libc = ctypes.CDLL("libc.so.6")
    added = []
    for _ in range(5):
        gc.collect()
        libc.malloc_trim(0)  # hand freed heap back to the OS so the forward must take it again
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter
        before = _status_kib("VmRSS")
        run()
        added.append(_status_kib("VmHWM") - before)
    return int(statistics.median(added))


def memory_figures() -> dict:
    got = {}
    for v in ("plain", "capture", "eager"):
        res = subprocess.run([sys.executable, __file__, "--memory-variant", v], capture_output=True, text=True,
                             check=True)
        got[v] = json.loads(res.stdout.strip().splitlines()[-1])
    mib = {v: got[v]["bytes"] / 2**20 for v in got}
    return {"capture_peak_mem_vs_plain": mib["capture"] / mib["plain"],
            "capture_peak_mem_vs_eager_attentions": mib["capture"] / mib["eager"],
            "forward_tensor_mib_plain": mib["plain"], "forward_tensor_mib_capture": mib["capture"],
            "forward_tensor_mib_eager_attentions": mib["eager"],
            "forward_added_rss_mib_plain": got["plain"]["rss_kib"] / 1024,
            "forward_added_rss_mib_capture": got["capture"]["rss_kib"] / 1024}


DP_RUN = ["--model", "organism:llava", "--experiment", "masking", "--experiment", "contrastive",
          "--param", "contrastive:fusion_layers=[0,1]", "--param", "contrastive:apply_layer=2",
          "--samples", "64", "--batch-size", "4", "--threads", "1"]


def dp_seconds(nproc: int, scratch: Path) -> dict:
    """Wall time and each rank's CPU time of the organism run (`DP_RUN`) in ``nproc`` processes with one thread each,
    in a fresh directory."""
    import shutil
    import tempfile

    out = Path(tempfile.mkdtemp(dir=scratch))
    timing = out / "timing.json"
    worker = [str(HERE.parent / "tests" / "dist_worker.py"), "--out", str(out / "runs"), "--timing", str(timing),
              *DP_RUN]
    cmd = ([sys.executable, *worker] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *worker])
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    timing = json.loads(timing.read_text())
    shutil.rmtree(out, ignore_errors=True)
    return timing


def dp_figures(reps: int) -> dict:
    """dp2_speedup_vs_single: median over ``reps`` alternating pairs of (1 process) / (2 gloo processes)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fusion_utils_dp_") as scratch:
        wall, cpu, balanced = [], [], []
        for _ in range(reps):
            single = dp_seconds(1, Path(scratch))
            double = dp_seconds(2, Path(scratch))
            wall.append(single["seconds"] / double["seconds"])
            cpu.append(sum(double["cpu_seconds"]) / single["cpu_seconds"][0])
            balanced.append(single["cpu_seconds"][0] / max(double["cpu_seconds"]))
    return {"dp2_speedup_vs_single": statistics.median(wall), "dp2_cpu_seconds_vs_single": statistics.median(cpu),
            "dp2_balanced_speedup": statistics.median(balanced)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-variant", help=argparse.SUPPRESS)
    p.add_argument("--only", choices=["dp"], help="print only these figures (dp: dp2_speedup_vs_single)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_variant:
        print(json.dumps(memory_variant(args.memory_variant)))
        return 0
    figures = {}
    if args.only == "dp":
        figures.update(dp_figures(max(5, args.reps // 2)))
        for k, v in figures.items():
            print(f"{k} {v:.4g}")
        return 0
    figures.update(timing_figures(args.reps))
    figures.update(memory_figures())
    sys.path.insert(0, str(HERE))
    from bench_contrastive import contrastive_latency_vs_plain

    figures["contrastive_latency_vs_plain"] = contrastive_latency_vs_plain()
    from bench_baselines import baselines_latency_vs_plain

    figures.update(baselines_latency_vs_plain())  # opera_ and cd_latency_vs_plain, side by side in one run
    figures.update(dp_figures(max(5, args.reps // 2)))
    for k, v in figures.items():
        print(f"{k} {v:.4g}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
