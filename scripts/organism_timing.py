"""Seconds per step of stage (a) of the organism recipe for candidate model sizes (how build.SIZES was chosen).

Runs STEPS steps of stage (a) (batch and data as in the recipe, mid-curriculum) on one torch thread (``--threads=N``:
N threads) and prints the mean seconds/step after two warm-up steps, with the parameter count.

    python scripts/organism_timing.py llava-32l                         # a variant as it ships
    python scripts/organism_timing.py llava 8 text_layers=32 width=48 heads=3 ffn=144     # a candidate size
    python scripts/organism_timing.py llava-16l 10 --bf16               # the forward under CPU bf16 autocast
    python scripts/organism_timing.py llava-16l 10 --compile            # the decoder under torch.compile
    python scripts/organism_timing.py llava-16l 10 --threads=2          # two torch threads (`make organisms`, not -j2)

``--bf16`` and ``--compile`` are the two ways a step could get cheaper without changing the recipe; on this machine
(avx512_bf16, no AMX) neither pays (train.ORGANISM_RECIPE records the figures). The compile's warm-up is excluded.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time

import torch

from fusion_utils.organisms.train import Trainer

FLAGS = ("--bf16", "--compile", "--threads=N")


def main(argv: list[str]) -> None:
    thread_flags = [a for a in argv if a.startswith("--threads")]
    given = thread_flags[-1].partition("=")[2] if thread_flags else "1"
    if not given.isdigit() or int(given) < 1:
        sys.exit(f"{thread_flags[-1]}: use --threads=N with N a whole number of threads, at least 1.")
    threads = int(given)
    flags = {a for a in argv if a.startswith("--")} - set(thread_flags)
    if flags - set(FLAGS):
        sys.exit(f"Unknown option {sorted(flags - set(FLAGS))[0]}; use {', '.join(FLAGS[:-1])} or {FLAGS[-1]}.")
    argv = [a for a in argv if not a.startswith("--")]
    if not argv:
        sys.exit(__doc__)
    name = argv[0]
    steps = int(argv[1]) if len(argv) > 1 and "=" not in argv[1] else 8
    if steps < 3:
        sys.exit(f"STEPS={steps}: use at least 3 (two are warm-up).")
    sizes = {}
    for kv in argv[1:]:
        if "=" in kv:
            k, v = kv.split("=", 1)
            sizes[k] = json.loads(v)
    tr = Trainer(name, seed=0, threads=threads, recipe={"text_check_every": 0}, **sizes)
    R = tr.recipe
    if "--compile" in flags:
        # dynamic: the padded length of a batch varies with its questions
        tr.model.model.language_model.compile(dynamic=True)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if "--bf16" in flags else contextlib.nullcontext
    params, opt, sched, _, _ = tr._begin("lm", R["text_lr"], R["text_steps"], "timing")
    times = []
    for _ in range(steps):
        t = time.time()
        samples = tr._samples(R["batch"], with_image=False, progress=0.5)
        enc = tr._encode_text_only(tr._texts_packed(samples))
        with autocast():
            logits = tr._lm_forward(enc, tr._scene_embeds(tr.cell_targets(samples)))
        loss = tr._answer_loss(logits.float(), enc["input_ids"])
        tr._update(loss, params, opt, sched)
        times.append(time.time() - t)
    cfg = tr.model.config.text_config
    n = sum(p.numel() for p in tr.model.parameters())
    how = " ".join(sorted(flags)) or "fp32"
    thread_s = "one thread" if threads == 1 else f"{threads} threads"
    print(f"{name} {cfg.num_hidden_layers} layers x {cfg.hidden_size}, {cfg.num_attention_heads} heads, FFN "
          f"{cfg.intermediate_size} ({how}): {sum(times[2:]) / len(times[2:]):.3f} s/step (stage a, batch "
          f"{R['batch']}, {thread_s}), {n} params", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
