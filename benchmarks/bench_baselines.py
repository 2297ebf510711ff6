"""Latency of OPERA and CD relative to the plain greedy answer, measured side by side in one run.

A 32-layer tiny LLaVA at LLaVA-1.5's image resolution (336 px, 576 image tokens), on CPU, answering 4 new tokens.
OPERA runs its official defaults (5 beams, 5 look-ahead candidates per beam); CD's amateur is an 8-layer tiny LLaVA
with the same tokenizer (the paper's amateur is a smaller model of the same family). Each repetition runs plain,
CD and OPERA in turn; the figure is the median of the per-repetition ratios. The paper's latency table gives
CD 2.871 s and OPERA 1.990 s per GQA sample (its plain decoding is not timed).

    python benchmarks/bench_baselines.py   # prints "opera_latency_vs_plain <ratio>" and "cd_latency_vs_plain <ratio>"
"""
from __future__ import annotations

import statistics
import time

import torch


def baselines_latency_vs_plain(*, max_new_tokens: int = 4, repeats: int = 3, warmup: int = 1) -> dict:
    from fusion_utils import load_model
    from fusion_utils.data.sample import Sample
    from fusion_utils.experiments.baselines import cd, opera, plain
    from fusion_utils.experiments.common import Decoding
    from fusion_utils.testing import sample_images, tiny_model_dir

    lm = load_model(tiny_model_dir("llava", num_layers=32, image_size=336))
    amateur = load_model(tiny_model_dir("llava", num_layers=8, image_size=336))
    sample = [Sample("bench", sample_images(3, seed=0)[2], "what is the color of the large object on the left ?",
                     ["red"])]
    dec = Decoding(max_new_tokens=max_new_tokens)
    runs = {"plain": lambda: plain(lm, sample, decoding=dec),
            "cd": lambda: cd(lm, sample, amateur=amateur, decoding=dec),
            "opera": lambda: opera(lm, sample, decoding=dec)}
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    ratios: dict[str, list[float]] = {"cd": [], "opera": []}
    for _ in range(repeats):
        seconds = {}
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            seconds[name] = time.perf_counter() - t0
        for name in ratios:
            ratios[name].append(seconds[name] / seconds["plain"])
    return {f"{name}_latency_vs_plain": statistics.median(r) for name, r in ratios.items()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    for k, v in baselines_latency_vs_plain().items():
        print(f"{k} {v:.4g}")
