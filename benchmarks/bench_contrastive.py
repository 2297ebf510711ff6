"""Latency of the soft contrastive answer (both passes) relative to the plain greedy answer.

A 32-layer tiny LLaVA at LLaVA-1.5's image resolution (336 px, 576 image tokens, ~40 text tokens), on CPU. The two
are measured side by side in one run (alternating A/B repetitions) and the median of the per-pair ratios is
reported. Target: <= 1.3 (the paper reports 1.392 s vs ViCrop's 1.357 s per GQA sample).

    python benchmarks/bench_contrastive.py   # prints "contrastive_latency_vs_plain <ratio>"
"""
from __future__ import annotations

import statistics
import time

import torch


def contrastive_latency_vs_plain(model_dir=None, *, apply_layer: int = 28, max_new_tokens: int = 4,
                                 repeats: int = 7, warmup: int = 1) -> float:
    from fusion_utils import load_model
    from fusion_utils.data.sample import Sample
    from fusion_utils.experiments.common import Decoding, generate
    from fusion_utils.experiments.contrastive import contrastive_answer
    from fusion_utils.testing import sample_images, tiny_model_dir

    torch.set_num_threads(1)
    if model_dir is None:
        model_dir = tiny_model_dir("llava", num_layers=32, image_size=336)
    lm = load_model(model_dir)
    image = sample_images(3, seed=0)[2]
    question = ("what is the color of the large object on the left side of the table next to the red car in the "
                "picture ?")
    sample = Sample("bench", image, question, ["red"])
    dec = Decoding(max_new_tokens=max_new_tokens)
    L = lm.num_layers
    fusion = [j for j in (2, 4, 8, 11, 12, 13) if j < L - 1] or [0]

    def plain():
        batch = lm.prepare([sample])
        return generate(lm, batch, (), dec)

    def contrast():
        return contrastive_answer(lm, [sample], variant="soft", candidates="fusion", fusion_layers=fusion,
                                  apply_layer=min(apply_layer, L - 1), decoding=dec)

    for _ in range(warmup):
        plain(), contrast()
    ratios = []
    for i in range(repeats):
        order = (plain, contrast) if i % 2 == 0 else (contrast, plain)
        t = {}
        for fn in order:
            t0 = time.perf_counter()
            fn()
            t[fn] = time.perf_counter() - t0
        ratios.append(t[contrast] / t[plain])
    return float(statistics.median(ratios))


if __name__ == "__main__":
    print(f"contrastive_latency_vs_plain {contrastive_latency_vs_plain():.3f}")
