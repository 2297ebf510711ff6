"""Side-by-side experiments on stage (a) of the organism recipe (the decoder on text scenes, issue 3's bottleneck).

Runs stage (a) of ``fusion_utils.organisms.train`` for the first STOP steps of its usual schedule (the learning-rate
schedule is the full stage's, so runs stopped at the same step are comparable), with recipe and model-size overrides,
and prints text-scene validation accuracy per family every ``text_check_every`` steps and on 500 questions at the end.

    python scripts/organism_stage_a.py llava 2000                      # the shipped recipe
    python scripts/organism_stage_a.py llava 2000 blocks=4 batch=32     # a recipe override (JSON values)
    python scripts/organism_stage_a.py llava 2000 m.head_dim=32 m.rope_theta=10000   # a model-size override
    python scripts/organism_stage_a.py llava 2000 'train_families=["spatial"]' 'families=["spatial"]' 'family_stages=[]'
    python scripts/organism_stage_a.py llava 1000 w.SPATIAL_ANCHOR='"color_shape"' 'w.RELATIONS=["left","right","above","below"]'
                                                                        # a world variant (the pre-November world)
    python scripts/organism_stage_a.py llava 1000 threads=2             # torch threads (default 1)

Run two at a time on a 2-core machine (one torch thread each). Numbers measured with it are in the issue-3 notes.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np
from tqdm.auto import tqdm

from fusion_utils.data import world
from fusion_utils.organisms.train import Trainer


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit(__doc__)
    name, stop = argv[0], int(argv[1])
    recipe, model = {"text_check_every": 500, "text_target": 2.0}, {}  # target 2.0: never stop early
    threads = 1
    for kv in argv[2:]:
        if "=" not in kv:
            sys.exit(f"Override {kv!r} is not KEY=JSON; write it like batch=32 or m.head_dim=32.")
        if kv.startswith("threads="):
            threads = int(kv.split("=", 1)[1])
            continue
        if kv.startswith("w."):  # a world setting: SPATIAL_ANCHOR, or RELATIONS as a list of relation names
            k, v = kv[2:].split("=", 1)
            if k not in ("SPATIAL_ANCHOR", "RELATIONS"):
                sys.exit(f"World override {kv!r}: only w.SPATIAL_ANCHOR and w.RELATIONS can be set.")
            v = json.loads(v)
            setattr(world, k, {r: world.ALL_RELATIONS[r] for r in v} if k == "RELATIONS" else v)
            continue
        k, v = kv.split("=", 1)
        try:
            value = json.loads(v)
        except json.JSONDecodeError:
            sys.exit(f"Override {kv!r}: the value is not JSON; quote lists like 'families=[\"spatial\"]'.")
        (model if k.startswith("m.") else recipe)[k[2:] if k.startswith("m.") else k] = value

    class StopEarly(Trainer):
        def _begin(self, part, lr, steps, desc, stage=None):
            params, opt, sched, bar, t0 = super()._begin(part, lr, steps, desc, stage)
            return params, opt, sched, tqdm(range(min(stop, steps)), desc=desc, mininterval=30), t0

    tr = StopEarly(name, seed=0, threads=threads, recipe=recipe, **model)
    t0 = time.time()
    tr.stage_text()
    losses = [r["loss"] for r in tr.log if r["stage"] == "text"]
    print("loss per 200 steps:", [round(float(np.mean(losses[i:i + 200])), 3) for i in range(0, len(losses), 200)])
    print(f"{name} {' '.join(argv[2:]) or '(shipped recipe)'}: {len(losses)} steps in {(time.time() - t0) / 60:.1f} min, "
          f"text-scene val accuracy {tr.quick_accuracy(500, 'text')}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
