"""The staged training recipe of the organisms (mirrors how real MLLMs are built).

(a) ``text``   -- pretrain the decoder on TEXT scenes: the image-token slots hold the embeddings of scene tokens (one
                  per cell: ``<large_red_circle>`` or ``<empty>``, lightly noised), followed by the question in the
                  exact evaluation prompt; loss on the answer token + EOS only.
(b+c) ``vision`` -- train the vision tower and projector (decoder frozen) so that each image token lands on its
                  cell's scene-token embedding: cross-entropy over the 41 scene tokens with logits = -squared
                  distance to their embeddings, plus the mean squared error to the target embedding. A few blank
                  (uniform) images teach "all empty"; with ``vision_zoom``, crops of the images teach a magnified cell
                  (each token's target is the cell it shows), as the crop methods feed them.
(d) ``joint``  -- VQA on rendered images end to end (every parameter, lower learning rate), answer + EOS loss, with the
                  alignment loss of (b+c) kept as a small auxiliary term.
(e) ``two``    -- prompts with two image placeholders, [original, original] or [original, a crop of it], mixed with
                  one-image prompts; the answer is unchanged (the deep organisms; `fusion_utils.organisms.two_images`).
(f) ``fine``   -- small details (issue 28's ``world-fine``): world and world-fine prompts with one or two images, every
                  parameter, answer loss + the alignment loss on every image token; fine-tuned from weights of (a)-(e).

One module per stage: `train_text` (a), `train_vision` (b+c, d), `train_two` (e), `train_fine` (f), on the shared
`trainer_base`; the recipe is `recipe`, what was tried on the way `weights/RECIPE_NOTES.md`. This module puts them
together and runs them (checkpoints, resume). Everything is deterministic in ``seed`` (torch.manual_seed, numpy streams of the world, fixed thread count).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .recipe import FINE_RECIPE, ORGANISM_RECIPE, RECIPE, world_settings
from .train_fine import FineStage
from .train_text import TextStage
from .train_two import TwoStage
from .train_vision import VisionStage
from .trainer_base import TrainerBase


class Trainer(TextStage, VisionStage, TwoStage, FineStage, TrainerBase):
    """The staged recipe of one organism: `TrainerBase`'s shared parts and one mixin per stage."""


STAGES = ("text", "vision", "joint", "two", "fine")


def checkpoint_key(tr: Trainer, overrides: dict | None = None) -> str:
    """The stage checkpoints' key: the full recipe, the built model config and the world settings, so a changed
    recipe, model default (e.g. a rotary setting, which no weight shape reveals) or world never resumes a stale stage."""
    from ..runs import config_hash

    return config_hash({"recipe": tr.recipe, "overrides": overrides or {}, "threads": tr.threads,
                        "config": tr.model.config.to_json_string(use_diff=False), "world": world_settings()})[:10]


def load_base(tr: Trainer, base_dir) -> None:
    """Start `tr` where the weights in `base_dir` ended (stages (a)-(e) done): their parameters, data position,
    training log and timings, so stage (f) fine-tunes them as it would at the end of a full run."""
    base = Path(base_dir)
    log = json.loads((base / "training_log.json").read_text())
    trained = type(tr.model).from_pretrained(base, use_safetensors=True, dtype=torch.float32)
    try:
        tr.model.load_state_dict(trained.state_dict())
    except RuntimeError as e:
        raise ValueError(f"The weights in {base} are not a {tr.name} organism ({str(e).splitlines()[0]}); pass the "
                         f"directory of a {tr.name} training.") from None
    tr.counter, tr.composed = int(log["samples_seen"]), True
    tr.base_log, tr.timings = list(log.get("log", [])), dict(log.get("timings_s", {}))
    tr.base = {"dir": str(base), "samples_seen": tr.counter, "recipe_steps": {k: v for k, v in log["recipe"].items()
                                                                              if k.endswith("_steps")}}


def _run_stage(tr: Trainer, stage: str, ckpt: Path, resume: bool) -> None:
    """One stage, or its checkpoint when it exists; a mid-stage checkpoint of it resumes at its step."""
    fns = {"text": (tr.stage_text, "text"), "vision": (tr.stage_vision, "image"), "joint": (tr.stage_joint, "image"),
           "two": (tr.stage_two, "image"), "fine": (tr.stage_fine, "image")}
    fn, mode = fns[stage]
    f = ckpt / f"{stage}.pt"
    if resume and f.exists():
        tr.load_state(torch.load(f, weights_only=True))
        print(f"[{tr.name}] resumed after stage {stage} from {f}", flush=True)
        return
    part = ckpt / "partial.pt"
    if resume and part.exists():
        st = torch.load(part, weights_only=True)
        if st["stage"] == stage:
            tr.load_state(st)
            tr.partial = st
            print(f"[{tr.name}] resuming stage {stage} at step {st['step']} from {part}", flush=True)
    fn()
    if tr.recipe.get(f"{stage}_steps", 1):  # optional stages (e) and (f) print nothing when skipped
        print(f"[{tr.name}] after stage {stage}: {mode} val accuracy {tr.quick_accuracy(200, mode)}", flush=True)
    torch.save(tr.state(), f)


def train(name: str, out_dir=None, seed: int = 0, threads: int | None = 1, recipe: dict | None = None,
          evaluate_after: bool = True, ckpt_dir=None, resume: bool = True, stop_after: str | None = None,
          ckpt_every: int = 100, base_dir=None, **overrides):
    """Run the full staged recipe for organism `name` and save it to `out_dir` (default: the shipped weights dir).

    After each stage the trainer state is checkpointed in `ckpt_dir` (default: <tmp>/fusion_utils_organisms/<name>
    -seed<seed>-<key>), and every `ckpt_every` steps within a stage in `partial.pt` there; with `resume=True` finished
    stages are loaded instead of retrained and a partial stage continues from its last checkpoint (same batches, same
    schedule: a resumed run takes the steps an uninterrupted one would). `stop_after` (one of `STAGES`) ends the run
    after that stage's checkpoint, without saving weights. `base_dir`: weights that already went through stages
    (a)-(e) (`load_base`); only stage (f) runs.
    """
    import tempfile

    from . import weights_dir

    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after={stop_after!r}: use one of {', '.join(STAGES)}.")
    out_dir = Path(out_dir) if out_dir else weights_dir(name)
    t0 = time.time()
    tr = Trainer(name, seed=seed, threads=threads, recipe=recipe, **overrides)
    key = checkpoint_key(tr, overrides)
    if base_dir is not None:
        load_base(tr, base_dir)
        key += "-base"
    ckpt = Path(ckpt_dir) if ckpt_dir else \
        Path(tempfile.gettempdir()) / "fusion_utils_organisms" / f"{tr.name}-seed{seed}-{key}"
    ckpt.mkdir(parents=True, exist_ok=True)
    tr.ckpt_file, tr.ckpt_every = ckpt / "partial.pt", ckpt_every
    for stage in STAGES[STAGES.index("fine"):] if base_dir is not None else STAGES:
        _run_stage(tr, stage, ckpt, resume)
        if stage == stop_after:
            print(f"[{tr.name}] stopped after stage {stage}; checkpoints in {ckpt}", flush=True)
            return tr
    tr.timings["total"] = sum(v for k, v in tr.timings.items() if k in STAGES)
    tr.timings["wall_this_run"] = time.time() - t0
    tr.save(out_dir)
    print(f"[{tr.name}] saved to {out_dir}; training time {tr.timings['total'] / 60:.1f} min", flush=True)
    if evaluate_after:
        try:
            from .evaluate import evaluate_and_card

            evaluate_and_card(tr.name, out_dir, trainer=tr)
        except Exception as e:  # keep the weights even if evaluation fails
            print(f"[{tr.name}] evaluation failed: {e!r}", flush=True)
    return tr


__all__ = ["RECIPE", "ORGANISM_RECIPE", "FINE_RECIPE", "STAGES", "Trainer", "world_settings", "checkpoint_key", "load_base", "train"]
