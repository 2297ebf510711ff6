"""Evaluate an organism on the held-out world exactly as the harness asks: chat template + post-prompt, batched greedy
``model.generate(max_new_tokens=4)``, decode only the new tokens, compare after lower/strip. Also the blank-image
control: the same questions with a uniform background image."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..data import world
from ..prompts import render_prompt, user_text


def _normalise(s: str) -> str:
    return s.strip().lower().rstrip(".").strip()


@torch.no_grad()
def predict(model, processor, samples, images=None, batch_size: int = 50, desc: str = "eval") -> list[str]:
    """Greedy answers (new tokens only) for `samples`, optionally replacing their images."""
    preds: list[str] = []
    model.eval()
    for i in tqdm(range(0, len(samples), batch_size), desc=desc, mininterval=5, leave=False):
        batch = list(samples[i:i + batch_size])
        imgs = images[i:i + batch_size] if images is not None else [s.image for s in batch]
        texts = [render_prompt(processor, user_text(s.question)) for s in batch]
        enc = processor(images=imgs, text=texts, padding=True, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
        preds += [_normalise(t) for t in processor.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                                                skip_special_tokens=True)]
    return preds


def evaluate(model_dir_or_name, n: int = 500, split: str = "test", seed: int | None = None,
             blank: bool = True, batch_size: int = 50) -> pd.DataFrame:
    """Accuracy per family (rows) and overall: columns n, accuracy, blank_accuracy, gap (all in [0, 1])."""
    from . import load

    model, processor = (model_dir_or_name if isinstance(model_dir_or_name, tuple) else load(model_dir_or_name))
    ds = world.world_dataset(split, n, seed=seed)
    preds = predict(model, processor, ds, batch_size=batch_size, desc="eval images")
    correct = np.array([p == _normalise(s.answers[0]) for p, s in zip(preds, ds)])
    if blank:
        bpreds = predict(model, processor, ds, images=[world.blank_image()] * len(ds), batch_size=batch_size,
                         desc="eval blank")
        bcorrect = np.array([p == _normalise(s.answers[0]) for p, s in zip(bpreds, ds)])
    fams = np.array([s.family for s in ds])
    rows = []
    for fam in [f for f in world.FAMILIES if f in set(fams)] + ["overall"]:
        m = np.ones(len(ds), bool) if fam == "overall" else fams == fam
        row = {"family": fam, "n": int(m.sum()), "accuracy": float(correct[m].mean())}
        if blank:
            row["blank_accuracy"] = float(bcorrect[m].mean())
            row["gap"] = row["accuracy"] - row["blank_accuracy"]
        rows.append(row)
    return pd.DataFrame(rows).set_index("family")


# issue 3's bar for an organism (held-out test split)
BAR = {"overall": 0.90, "per_family": 0.80, "gap": 0.30}


def bar_check(table: pd.DataFrame) -> dict[str, bool]:
    """Which parts of the bar a table meets: overall accuracy, every family's accuracy, the blank-image gap."""
    fam = table.drop(index="overall")
    out = {"overall": bool(table.loc["overall", "accuracy"] >= BAR["overall"]),
           "per_family": bool((fam["accuracy"] >= BAR["per_family"]).all())}
    if "gap" in table:
        out["gap"] = bool(table.loc["overall", "gap"] >= BAR["gap"])
    return out


def bar_status(table: pd.DataFrame) -> str:
    """One sentence: meets the bar, or which parts it misses (with the numbers)."""
    chk = bar_check(table)
    if all(chk.values()):
        return "Meets the bar (>= 90% overall, >= 80% per family, blank-image gap >= 30 points)."
    miss = []
    if not chk["overall"]:
        miss.append(f"overall {100 * table.loc['overall', 'accuracy']:.1f}% < 90%")
    if not chk["per_family"]:
        fam = table.drop(index="overall")
        low = fam[fam["accuracy"] < BAR["per_family"]]["accuracy"]
        miss.append("below 80%: " + ", ".join(f"{f} {100 * v:.1f}%" for f, v in low.items()))
    if not chk.get("gap", True):
        miss.append(f"blank-image gap {100 * table.loc['overall', 'gap']:.1f} < 30 points")
    return "Below the bar: " + "; ".join(miss) + "."


def format_table(table: pd.DataFrame) -> str:
    t = table.copy()
    for c in ("accuracy", "blank_accuracy", "gap"):
        if c in t:
            t[c] = (100 * t[c]).map(lambda v: f"{v:.1f}")
    return t.to_markdown() if _has_tabulate() else t.to_string()


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401

        return True
    except ImportError:
        return False


def _joint_text(recipe: dict) -> str:
    """Stage (d) as the model card states it (or that it was skipped)."""
    if not recipe.get("joint_steps"):
        return ("(d) joint VQA: skipped (`joint_steps` 0). For this organism it lowered held-out accuracy at every "
                "learning rate tried; see the recipe's comment in `fusion_utils/organisms/train.py`.")
    part = {"all": "all parameters", "vision": "vision tower + projector (decoder frozen)"}[recipe.get("joint_part", "all")]
    return (f"(d) joint VQA on rendered images (same question mix as (a)), {part}, {recipe.get('joint_steps')} steps of "
            f"batch {recipe.get('joint_batch') or recipe.get('batch')} at lr {recipe.get('joint_lr')}, alignment loss x "
            f"{recipe.get('joint_aux')} kept.")


def _a_extras(recipe: dict) -> str:
    """The optional parts of stage (a), as the model card states them."""
    out = []
    fams = recipe.get("train_families")
    if fams:
        counts = {f: list(fams).count(f) for f in dict.fromkeys(fams)}
        out.append("; families sampled in the proportions " + ", ".join(f"{f} {c}/{len(fams)}" for f, c in counts.items()))
    stages = recipe.get("family_stages") or ()
    if stages:
        out.append("; family curriculum: " + ", then ".join(f"only {', '.join(fams)} until {until:.0%} of the stage"
                                                           for until, fams in stages) + ", then the full mix")
    if (recipe.get("blocks") or 1) > 1:
        out.append(f"; {recipe['blocks']} questions per scene in one sequence (the first is the sample's own, the others from "
                   "`world.scene_questions`), each an isolated block after the shared scene prefix: a 4D mask lets a block "
                   "see the prefix and itself only, and its positions (M-RoPE included) are those of its single prompt, so "
                   "each block is an independent evaluation-format sample while the prefix is computed once")
    if (recipe.get("pack") or 1) > 1:
        out.append(f"; packed as {recipe['pack']} user/assistant turns about the same scene (turn 1 = the evaluation prompt)")
    if recipe.get("curriculum"):
        out.append(f"; curriculum: during the first {recipe['curriculum']} of the stage scenes are thinned to k objects, "
                   "k growing to the full scene")
    if recipe.get("text_max_minutes"):
        out.append(f"; a {recipe['text_max_minutes']} min wall-clock guard (not reproducible: set it to None to retrain "
                   "exactly)")
    return "".join(out)


def _world_note(log: dict) -> str:
    w = log.get("world")
    if not w:
        return ""
    from ..data.world import RELATION_PHRASES

    rel = " / ".join(RELATION_PHRASES[r] for r in w["relations"])
    anchor = "the circle" if w["spatial_anchor"] == "shape" else "the red circle"
    return f' -- "what shape is {rel} {anchor}?", `world.SPATIAL_ANCHOR = "{w["spatial_anchor"]}"`'


def write_model_card(name: str, out_dir, table: pd.DataFrame, trainer=None) -> Path:
    """README.md model card: architecture and sizes, recipe, measured time, seeds, evaluation table."""
    import json

    from transformers import AutoConfig

    out = Path(out_dir)
    cfg = AutoConfig.from_pretrained(out)
    tc, vc = cfg.text_config, cfg.vision_config
    n_params = None
    st = out / "model.safetensors"
    if st.exists():
        from safetensors import safe_open

        with safe_open(str(st), "pt") as f:
            n_params = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    log = json.loads((out / "training_log.json").read_text()) if (out / "training_log.json").exists() else {}
    timings = log.get("timings_s", {})
    recipe = log.get("recipe", {})
    if name == "llava":
        arch = (f"`LlavaForConditionalGeneration`: CLIP vision tower ({vc.num_hidden_layers} layers, width "
                f"{vc.hidden_size}, patch {vc.patch_size} on {vc.image_size} px -> 6x6 patches + CLS; "
                f"`vision_feature_select_strategy=\"{cfg.vision_feature_select_strategy}\"` drops CLS, "
                f"`vision_feature_layer={cfg.vision_feature_layer}`), 2-layer GELU MLP projector, Llama decoder "
                f"({tc.num_hidden_layers} layers, width {tc.hidden_size}, {tc.num_attention_heads} heads, FFN "
                f"{tc.intermediate_size}, vocab {tc.vocab_size}, rope_theta {tc.rope_parameters.get('rope_theta')}). "
                f"36 image tokens per image (one per world cell, "
                f"row-major), image token id {cfg.image_token_id}. Prompt: LLaVA-1.5 `USER: <image>\\n... ASSISTANT:`.")
    else:
        arch = (f"`Qwen2VLForConditionalGeneration`: Qwen2-VL vision tower ({vc.depth} blocks, width {vc.embed_dim}, "
                f"patch {vc.patch_size}, temporal patch {vc.temporal_patch_size}, 2D rotary) -> 12x12 patches, patch "
                f"merger with `spatial_merge_size={vc.spatial_merge_size}` -> 6x6 = 36 image tokens (one per world "
                f"cell, row-major), Qwen2 decoder with M-RoPE (mrope_section {tc.rope_parameters.get('mrope_section')}; "
                f"{tc.num_hidden_layers} layers, width {tc.hidden_size}, {tc.num_attention_heads} heads, FFN "
                f"{tc.intermediate_size}, vocab {tc.vocab_size}, rope_theta {tc.rope_parameters.get('rope_theta')}). "
                f"Image token id {cfg.image_token_id}. Prompt: Qwen2-VL "
                "chat template with the default system turn. The model needs `mm_token_type_ids` and `image_grid_thw` "
                "from the processor (a 96x96 image always gives grid_thw = [1, 12, 12]).")
    mins = {k: f"{v / 60:.1f} min" for k, v in timings.items() if isinstance(v, float)}
    text = f"""# Organism `{name}` (fusion_utils)

A tiny real-architecture MLLM trained from scratch on the procedural world of `fusion_utils.data.world`
(6x6 grid of cells on a noisy 96x96 image; families attribute / identity / existence / count / spatial{_world_note(log)}), so that
the cells that answer each question are known. Companion to arXiv 2601.08151. Not a language model of English:
the tokenizer is word-level over the world's words, the chat template words and the post-prompt.

## Architecture
{arch}

Parameters: {n_params if n_params is not None else 'n/a'} (fp32 safetensors). The rotary base is scaled to 16-dim heads and
~70-token prompts: with the usual 10000 too few rotary frequencies resolve the 1-cell offsets that spatial questions
need (for M-RoPE, the width section would turn by 0.003 rad per column); see `fusion_utils/organisms/build.py`.
Processor: {'CLIPImageProcessor (96 px, no resize in effect)' if name == 'llava' else 'Qwen2VLImageProcessor (min_pixels = max_pixels = 96*96, patch 8, merge 2)'}
+ word-level `PreTrainedTokenizerFast` (lowercasing; left padding) + the real model's chat template.

## Load (offline)
```python
from transformers import AutoProcessor, {type(cfg).__name__.replace('Config', 'ForConditionalGeneration')}
model = {type(cfg).__name__.replace('Config', 'ForConditionalGeneration')}.from_pretrained(dir, use_safetensors=True)
processor = AutoProcessor.from_pretrained(dir)
```

## Training recipe (`fusion_utils.organisms.train`, seed {log.get('seed', 0)})
Staged, like real MLLMs; loss on the answer token + EOS only; batch {recipe.get('batch')}; AdamW, warmup + cosine.
1. (a) decoder on TEXT scenes: the 36 image slots hold scene embeddings (a cell's embedding = E[size] + E[colour] +
   E[shape] of the word embeddings, E[<empty>] for empty cells, noise {recipe.get('scene_noise')} x RMS; written into the
   `<large_red_circle>`-style scene-token rows at the end of the stage), then the question in the evaluation prompt{_a_extras(recipe)};
   decoder q/k projections initialised with std {recipe.get('qk_init_std')}; up to {recipe.get('text_steps')} steps at lr
   {recipe.get('text_lr')}, stopping early (checked every {recipe.get('text_check_every')} steps on 200 `val` questions) once text-scene
   accuracy >= {recipe.get('text_target')} overall and >= {recipe.get('text_family_target')} per family (steps run: {timings.get('text_steps_run', 'n/a')}).
2. (b+c) vision tower + projector (decoder frozen) map each cell's image token onto its scene-token embedding
   (squared error relative to the embeddings' scale + {recipe.get('align_ce', 0.1)} x cross-entropy over scale-free -squared
   distances), {recipe.get('vision_steps')} steps of batch {recipe.get('vision_batch')} at lr
   {recipe.get('vision_lr')}, {recipe.get('blank_frac')} of images blank (uniform grey, all cells `<empty>`).
3. {_joint_text(recipe)}

Data: the world's `train` split stream (sample i uses `numpy.random.default_rng([i, seed])`); validation during
training on `val` (base 1,000,000); evaluation on `test` (base 2,000,000) -- disjoint streams.
Measured wall time ({log.get('threads') or 1} torch thread{'s' if (log.get('threads') or 1) > 1 else ''}; the other organism trained at the same time on the other core): {mins or 'n/a'}.

Retrain: `fusion-utils organisms train {name}` (or `python -m fusion_utils.organisms.cli train {name}`).

## Evaluation (held-out `test` split, n={int(table.loc['overall', 'n'])}, greedy, exact match; blank = same questions on a uniform grey image)
{format_table(table)}

{bar_status(table)} (`fusion-utils organisms eval {name}` prints this table.)
"""
    (out / "README.md").write_text(text)
    return out / "README.md"
