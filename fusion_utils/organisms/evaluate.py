"""Evaluate an organism on the held-out world through the chapters' harness: the ``accuracy`` experiment
(`fusion_utils.experiments.accuracy`) once per image condition -- chat template + post-prompt, batched greedy
decoding with the harness's `Decoding` defaults (max_new_tokens=16), the world's scorer (``exact``: lmms-eval's
exact match, case and punctuation ignored). So the organisms' bar and every chapter's numbers share one protocol.

>>> from fusion_utils.organisms.evaluate import evaluate, format_table
>>> table = evaluate("llava-8l", n=100, two_image=True, progress=False)
>>> list(table.index), list(table.columns)[:3]  # accuracy per family + overall; format_table(table) prints it
(['attribute', 'identity', 'existence', 'count', 'spatial', 'overall'], ['n', 'accuracy', 'blank_accuracy'])
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..data import WORLDS, world
from ..experiments.accuracy import condition_images
from ..experiments.harness import run
from ..models import ORGANISM_PREFIX, LoadedModel, load_model

# table column -> the `accuracy` experiment's image condition
CONDITIONS = {"accuracy": "original", "blank_accuracy": "blank", "same_twice": "same_twice",
              "relevant_crop": "relevant_crop", "irrelevant_crop": "irrelevant_crop"}
# the two-image controls (issue 16)
TWO_IMAGE = ("same_twice", "relevant_crop", "irrelevant_crop")


def two_image_sets(ds, seed: int = 0) -> dict[str, list]:
    """The controls' image lists for `ds`: [original, original], [original, crop of the relevant cells],
    [original, same-size crop of the fewest relevant cells] (its place drawn from a generator seeded by the question's
    position in `ds`), as the ``accuracy`` experiment builds them.

    >>> [len(x) for x in two_image_sets(world.world_dataset("test", 2))["relevant_crop"]]
    [2, 2]
    """
    return {col: [condition_images(s, col, i, seed) for i, s in enumerate(ds)] for col in TWO_IMAGE}


def as_loaded(model) -> LoadedModel:
    """A `LoadedModel` from an organism name (``llava-8l``, ``organism:llava``), a weights directory, a
    ``(model, processor)`` pair in memory (e.g. the trainer's), or a `LoadedModel` (returned as is).

    >>> as_loaded("llava-8l").spec.model_type
    'llava'
    """
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, tuple):
        return LoadedModel.wrap(*model)
    if Path(str(model)).is_dir():
        return load_model(str(model))
    from . import resolve_name

    return load_model(ORGANISM_PREFIX + resolve_name(str(model)))


def evaluate(model_dir_or_name, n: int = 500, split: str = "test", seed: int | None = None,
             blank: bool = True, batch_size: int = 50, two_image: bool = False, progress: bool = True,
             dataset: str = "world") -> pd.DataFrame:
    """Accuracy per family (rows) and overall: columns n, accuracy, blank_accuracy, gap, and with `two_image` the
    accuracy with [original, original], [original, relevant crop] and [original, irrelevant crop] (all in [0, 1]).
    Each column is one run of the ``accuracy`` experiment (records kept in memory, nothing written). ``dataset``:
    ``world`` or ``world-fine`` (the headroom split: small objects on 192 px images).

    >>> float(evaluate((model, processor), n=100, progress=False).loc["overall", "accuracy"])  # e.g. in training
    0.9
    """
    lm = as_loaded(model_dir_or_name)
    if dataset not in WORLDS:
        raise ValueError(f"The organisms are evaluated on {' or '.join(WORLDS)}, not {dataset!r}.")
    ds = world.world_dataset(split, n, seed=seed, fine=dataset == "world-fine")
    cols = ["accuracy"] + (["blank_accuracy"] if blank else []) + (list(TWO_IMAGE) if two_image else [])
    was_training = lm.model.training
    lm.model.eval()
    try:
        tables = {c: run("accuracy", lm, ds, batch_size=batch_size, progress=progress,
                         images=CONDITIONS[c]).summary.set_index("family") for c in cols}
    finally:
        lm.model.train(was_training)  # a model evaluated mid-training goes back to training
    t = pd.DataFrame({"n": tables["accuracy"]["n"].astype(int), **{c: tables[c]["accuracy"] for c in cols}})
    t = t.reindex([f for f in world.FAMILIES if f in t.index] + ["overall"])
    t.index.name = "family"
    if blank:
        t["gap"] = t["accuracy"] - t["blank_accuracy"]
    order = [c for c in ("n", "accuracy", "blank_accuracy", "gap", *TWO_IMAGE) if c in t]
    return t[order]


# issue 3's bar for an organism (held-out test split); issue 16 adds the two-image parts for the deep organisms:
# the same image twice within `twice` of one image, [original, relevant crop] no lower than one image
BAR = {"overall": 0.90, "per_family": 0.80, "gap": 0.30, "twice": 0.03}


# issue 28's bar on world-fine (the headroom split): one image inside FINE_BAR["one"], and [original, crop of the
# relevant cells] at least FINE_BAR["crop_gain"] above it, so a crop method has something to recover
FINE_BAR = {"one": (0.55, 0.75), "crop_gain": 0.10}


def fine_bar_check(table: pd.DataFrame) -> dict[str, bool]:
    """Which parts of the world-fine bar a table (`evaluate(..., dataset="world-fine", two_image=True)`) meets."""
    if "relevant_crop" not in table:
        raise ValueError("This table has no relevant_crop column; evaluate world-fine with two_image=True.")
    one, crop = table.loc["overall", "accuracy"], table.loc["overall", "relevant_crop"]
    lo, hi = FINE_BAR["one"]
    return {"one_image": bool(lo - 1e-9 <= one <= hi + 1e-9), "crop_gain": bool(crop - one >= FINE_BAR["crop_gain"] - 1e-9)}


def fine_bar_status(table: pd.DataFrame) -> str:
    """One sentence: whether world-fine leaves a crop the headroom issue 28 asks for, with the numbers."""
    chk = fine_bar_check(table)
    one, crop = 100 * table.loc["overall", "accuracy"], 100 * table.loc["overall", "relevant_crop"]
    lo, hi = (100 * v for v in FINE_BAR["one"])
    text = f"one image {one:.1f}% (band {lo:.0f}-{hi:.0f}%), relevant crop {crop:.1f}% ({crop - one:+.1f} points"
    verdict = "Meets the world-fine bar" if all(chk.values()) else "Below the world-fine bar"
    return f"{verdict}: {text}, needs >= +{100 * FINE_BAR['crop_gain']:.0f})."


def trained_with_fine(model_dir) -> bool:
    """Whether the organism in `model_dir` went through stage (f) (its training log's recipe has fine_steps > 0)."""
    f = Path(model_dir) / "training_log.json"
    return f.exists() and bool(json.loads(f.read_text()).get("recipe", {}).get("fine_steps"))


def evaluate_and_card(name: str, model_dir, n: int = 500, trainer=None) -> Path:
    """The model card's evaluation: the world table (500 test questions, two-image controls) and, for an organism
    trained with stage (f), the world-fine table; prints both with their bars and (re)writes README.md."""
    table = evaluate(model_dir, n=n, split="test", two_image=True)
    print(f"\n## {name} (world, test, n={n})\n{format_table(table)}")
    print(bar_status(table, two_image=trained_with_two_images(model_dir)), flush=True)
    fine = None
    if trained_with_fine(model_dir):
        fine = evaluate(model_dir, n=n, split="test", two_image=True, dataset="world-fine")
        print(f"\n## {name} (world-fine, test, n={n})\n{format_table(fine)}")
        print(fine_bar_status(fine), flush=True)
    card = write_model_card(name, model_dir, table, trainer, fine_table=fine)
    print(f"model card: {card}")
    return card


def trained_with_two_images(model_dir) -> bool:
    """Whether the organism in `model_dir` was trained with stage (e) (its training log's recipe has two_steps > 0)."""
    import json

    f = Path(model_dir) / "training_log.json"
    return f.exists() and bool(json.loads(f.read_text()).get("recipe", {}).get("two_steps"))


def bar_check(table: pd.DataFrame, two_image: bool | None = None) -> dict[str, bool]:
    """Which parts of the bar a table meets: overall accuracy, every family's accuracy, the blank-image gap, and
    (`two_image`; default: when the table has the columns) the two-image parts."""
    fam = table.drop(index="overall")
    out = {"overall": bool(table.loc["overall", "accuracy"] >= BAR["overall"]),
           "per_family": bool((fam["accuracy"] >= BAR["per_family"]).all())}
    if "gap" in table:
        out["gap"] = bool(table.loc["overall", "gap"] >= BAR["gap"])
    if two_image is None:
        two_image = "same_twice" in table
    if two_image:
        if "same_twice" not in table:
            raise ValueError("This table has no two-image columns; evaluate it with two_image=True "
                             "(`fusion-utils organisms eval` does unless --no-two-image).")
        one = table.loc["overall", "accuracy"]
        # compared on whole questions: 1e-9 keeps float noise in a mean from deciding a tie
        out["twice"] = bool(abs(table.loc["overall", "same_twice"] - one) <= BAR["twice"] + 1e-9)
        out["relevant_crop"] = bool(table.loc["overall", "relevant_crop"] >= one - 1e-9)
    return out


def bar_status(table: pd.DataFrame, two_image: bool | None = None) -> str:
    """One sentence: meets the bar, or which parts it misses (with the numbers)."""
    chk = bar_check(table, two_image)
    if all(chk.values()):
        extra = ("; same image twice within 3 points of one image, [original, relevant crop] no lower than one image"
                 if "twice" in chk else "")
        return f"Meets the bar (>= 90% overall, >= 80% per family, blank-image gap >= 30 points{extra})."
    miss = []
    if not chk["overall"]:
        miss.append(f"overall {100 * table.loc['overall', 'accuracy']:.1f}% < 90%")
    if not chk["per_family"]:
        fam = table.drop(index="overall")
        low = fam[fam["accuracy"] < BAR["per_family"]]["accuracy"]
        miss.append("below 80%: " + ", ".join(f"{f} {100 * v:.1f}%" for f, v in low.items()))
    if not chk.get("gap", True):
        miss.append(f"blank-image gap {100 * table.loc['overall', 'gap']:.1f} < 30 points")
    one = 100 * table.loc["overall", "accuracy"]
    if not chk.get("twice", True):
        miss.append(f"same image twice {100 * table.loc['overall', 'same_twice']:.1f}% vs one image {one:.1f}% "
                    "(more than 3 points apart)")
    if not chk.get("relevant_crop", True):
        miss.append(f"[original, relevant crop] {100 * table.loc['overall', 'relevant_crop']:.1f}% < one image "
                    f"{one:.1f}%")
    return "Below the bar: " + "; ".join(miss) + "."


def format_table(table: pd.DataFrame) -> str:
    t = table.copy()
    for c in ("accuracy", "blank_accuracy", "gap", *TWO_IMAGE):
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


def _processor_text(out: Path, is_llava: bool) -> str:
    """The image processor as the model card states it, read from the saved processor config."""
    if is_llava:
        return ("CLIPImageProcessor (shortest edge to 96 px, then the centre 96 x 96 square: a world image is unchanged, "
                "a crop is magnified to 96 px)")
    size = json.loads((out / "processor_config.json").read_text())["image_processor"]["size"]
    lo, hi = size["shortest_edge"], size["longest_edge"]
    if lo == hi:
        return (f"Qwen2VLImageProcessor (min_pixels = max_pixels = {hi}: every image, a crop too, resized to 96 x 96 px "
                "of area; patch 8, merge 2)")
    return (f"Qwen2VLImageProcessor (min_pixels = {lo}, max_pixels = {hi}: an image of up to 96 x 96 px, a crop too, "
            "keeps its own size, one token per 16 x 16 px cell, as hub Qwen2-VL reads images at their own resolution; "
            "patch 8, merge 2)")


def _newline_text(out: Path) -> str:
    """The tokenizer's newline, as the model card states it, read from the saved tokenizer."""
    added = json.loads((out / "tokenizer.json").read_text()).get("added_tokens", [])
    if any(t["content"] == "\n" for t in added):
        return ("; the chat template's newline is a token, as in hub LLaVA's tokenizer, so two images' token runs are "
                "apart")
    return ""


def _zoom_text(recipe: dict) -> str:
    """Stage (b+c)'s zoom share as the model card states it (nothing for organisms trained without it)."""
    if not recipe.get("vision_zoom"):
        return ""
    return (f"; {recipe['vision_zoom']} of each batch a crop of its image (the relevant cells padded by one cell, or a "
            "random box of 2-5 cells a side, half and half), resized by the processor as any image, "
            + ("the first token (in reading order) showing each cell targeting that cell and the others `<empty>`, so "
               "the tower reads a magnified object as one token of it"
               if recipe.get("vision_zoom_target") == "first" else
               "each token's target the cell under its centre, so the tower reads a magnified cell as that cell"))


def _two_text(recipe: dict) -> str:
    """Stage (e) as the model card states it (nothing for organisms trained without it)."""
    if not recipe.get("two_steps"):
        return ""
    part = {"lm": "decoder only (vision tower + projector frozen)", "all": "all parameters"}[recipe.get("two_part", "lm")]
    kinds = ", ".join(recipe.get("two_kinds") or ())
    return (f"\n4. (e) two images per prompt (one image placeholder per image, as hub LLaVA / Qwen2-VL take them): each "
            f"sample's images drawn from {{{kinds}}} -- [original], [original, original], [original, crop of the "
            f"relevant cells padded by one cell], [original, same-size crop with the fewest relevant cells], [original, "
            f"random crop of 2-5 cells a side] -- answer unchanged, answer + EOS loss; "
            + (f"{_proportions(recipe['two_families'])}; " if recipe.get("two_families") else "")
            + f"{part}, {recipe['two_steps']} steps of batch {recipe.get('two_batch')} at lr {recipe.get('two_lr')}.")


def _two_image_note(table: pd.DataFrame, trained_two: bool = True) -> str:
    """The two-image controls beside the table: what each column is and what it says about crop methods."""
    if "same_twice" not in table:
        return ("Two-image controls: not measured for this card (`fusion-utils organisms eval` measures them).\n")
    untrained = ("" if trained_two else " This organism saw one image per prompt in training (no stage (e)), so "
                 "issue 16's two-image parts of the bar do not apply to it, and a crop method run on it measures mostly "
                 "what a second image costs.")
    o = table.loc["overall"]

    def pts(col):  # points against one image
        return 100 * (o[col] - o["accuracy"])

    return (f"Two-image controls (same questions; prompts with two image placeholders): `same_twice` = [original, "
            f"original] ({pts('same_twice'):+.1f} points against one image); `relevant_crop` = [original, crop of the "
            f"question's relevant cells, padded by one cell] ({pts('relevant_crop'):+.1f}); `irrelevant_crop` = "
            f"[original, same-size crop holding the fewest relevant cells] ({pts('irrelevant_crop'):+.1f}). A crop method "
            "(the contrastive crop variant, ViCrop) can help only if `relevant_crop` is above one image; "
            "`same_twice` near one image says a second image by itself costs nothing." + untrained + "\n")


def _proportions(fams) -> str:
    counts = {f: list(fams).count(f) for f in dict.fromkeys(fams)}
    return "families sampled in the proportions " + ", ".join(f"{f} {c}/{len(fams)}" for f, c in counts.items())


def _a_extras(recipe: dict) -> str:
    """The optional parts of stage (a), as the model card states them."""
    out = []
    fams = recipe.get("train_families")
    if fams:
        out.append("; " + _proportions(fams))
    if recipe.get("text_two"):
        out.append(f"; {recipe['text_two']} of the prompts carry a second text board after the scene (the same board, or "
                   "the cells a crop shows once the processor has resized it), answer unchanged")
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


def _arch_text(cfg) -> str:
    """The architecture paragraph of a model card, read from the saved config."""
    tc, vc = cfg.text_config, cfg.vision_config
    if cfg.model_type == "llava":
        return (f"`LlavaForConditionalGeneration`: CLIP vision tower ({vc.num_hidden_layers} layers, width "
                f"{vc.hidden_size}, patch {vc.patch_size} on {vc.image_size} px -> 6x6 patches + CLS; "
                f"`vision_feature_select_strategy=\"{cfg.vision_feature_select_strategy}\"` drops CLS, "
                f"`vision_feature_layer={cfg.vision_feature_layer}`), 2-layer GELU MLP projector, Llama decoder "
                f"({tc.num_hidden_layers} layers, width {tc.hidden_size}, {tc.num_attention_heads} heads, FFN "
                f"{tc.intermediate_size}, vocab {tc.vocab_size}, rope_theta {tc.rope_parameters.get('rope_theta')}). "
                f"36 image tokens per image (one per world cell, "
                f"row-major), image token id {cfg.image_token_id}. Prompt: LLaVA-1.5 `USER: <image>\\n... ASSISTANT:`.")
    else:
        return (f"`Qwen2VLForConditionalGeneration`: Qwen2-VL vision tower ({vc.depth} blocks, width {vc.embed_dim}, "
                f"patch {vc.patch_size}, temporal patch {vc.temporal_patch_size}, 2D rotary) -> 12x12 patches, patch "
                f"merger with `spatial_merge_size={vc.spatial_merge_size}` -> 6x6 = 36 image tokens (one per world "
                f"cell, row-major), Qwen2 decoder with M-RoPE (mrope_section {tc.rope_parameters.get('mrope_section')}; "
                f"{tc.num_hidden_layers} layers, width {tc.hidden_size}, {tc.num_attention_heads} heads, FFN "
                f"{tc.intermediate_size}, vocab {tc.vocab_size}, rope_theta {tc.rope_parameters.get('rope_theta')}). "
                f"Image token id {cfg.image_token_id}. Prompt: Qwen2-VL "
                "chat template with the default system turn. The model needs `mm_token_type_ids` and `image_grid_thw` "
                "from the processor (a 96x96 image always gives grid_thw = [1, 12, 12]).")


def _fine_text(recipe: dict) -> str:
    """Stage (f) as the model card states it (nothing for organisms trained without it)."""
    if not recipe.get("fine_steps"):
        return ""
    kinds = ", ".join(recipe.get("fine_kinds") or ())
    return (f"\n5. (f) small details (issue 28), fine-tuned from the weights after (e) (`--base`, see "
            f"`weights/RECIPE_NOTES.md`): {recipe.get('fine_share')} of the prompts `world-fine` (world's scenes on "
            f"{world.IMAGE_SIZE * world.FINE_PIXEL_SCALE} px images, objects at {world.FINE_OBJECT_SCALE} of their size "
            f"relative to a cell, {world.FINE_SUBCELL} of the way off its centre; the training families), the others `world`; each sample's images drawn from {{{kinds}}}; answer + EOS loss "
            f"+ {recipe.get('fine_aux')} x the alignment loss of (b+c) on every image token (a crop's tokens target the "
            f"cells they show); all parameters, {recipe['fine_steps']} steps of batch {recipe.get('fine_batch')} at lr "
            f"{recipe.get('fine_lr')}.")


def _fine_section(fine: pd.DataFrame | None) -> str:
    """The world-fine table of a model card (issue 28's headroom split), or nothing."""
    if fine is None:
        return ""
    return (f"\n## Evaluation on `world-fine` (the headroom split: {', '.join(world.FINE_FAMILIES)} questions, objects "
            f"drawn at {world.FINE_OBJECT_SCALE} of their size on {world.IMAGE_SIZE * world.FINE_PIXEL_SCALE} px images, "
            f"which the processor shows at 96 px; a crop keeps its native pixels; n={int(fine.loc['overall', 'n'])})\n"
            f"{format_table(fine)}\n\n{fine_bar_status(fine)} (`fusion-utils organisms eval NAME --dataset "
            f"world-fine` prints this table.)\n")


def _n_params(st: Path) -> int | None:
    """The parameter count of a safetensors file, read from its header (None when it is missing)."""
    if not st.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(st), "pt") as f:
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())


def write_model_card(name: str, out_dir, table: pd.DataFrame, trainer=None, fine_table: pd.DataFrame | None = None) -> Path:
    """README.md model card: architecture and sizes, recipe, measured time, seeds, evaluation table (and the
    world-fine table, `fine_table`, for an organism trained with stage (f))."""
    from transformers import AutoConfig

    out = Path(out_dir)
    cfg = AutoConfig.from_pretrained(out)
    n_params = _n_params(out / "model.safetensors")
    log = json.loads((out / "training_log.json").read_text()) if (out / "training_log.json").exists() else {}
    timings = log.get("timings_s", {})
    recipe = log.get("recipe", {})
    is_llava = cfg.model_type == "llava"
    arch = _arch_text(cfg)
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
Processor: {_processor_text(out, is_llava)}
+ word-level `PreTrainedTokenizerFast` (lowercasing; left padding{_newline_text(out)}) + the real model's chat template.

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
   {recipe.get('vision_lr')}, {recipe.get('blank_frac')} of images blank (uniform grey, all cells `<empty>`){_zoom_text(recipe)}.
3. {_joint_text(recipe)}{_two_text(recipe)}{_fine_text(recipe)}

Data: the world's `train` split stream (sample i uses `numpy.random.default_rng([i, seed])`); validation during
training on `val` (base 1,000,000); evaluation on `test` (base 2,000,000) -- disjoint streams.
Measured wall time ({log.get('threads') or 1} torch thread{'s' if (log.get('threads') or 1) > 1 else ''}; the 2-core machine's other core busy with other work): {mins or 'n/a'}.

Retrain: `fusion-utils organisms train {name}` (or `python -m fusion_utils.organisms.cli train {name}`).

## Evaluation (held-out `test` split, n={int(table.loc['overall', 'n'])}; the chapters' harness: the `accuracy` experiment, greedy with up to 16 new tokens, the world's `exact` scorer; blank = same questions on a uniform grey image)
{format_table(table)}

{_two_image_note(table, trained_with_two_images(out))}
{bar_status(table, two_image=trained_with_two_images(out))} (`fusion-utils organisms eval {name}` prints this table.)
{_fine_section(fine_table)}
## Reproducibility
Deterministic in the seed: the data (sample i of a split comes from `numpy.random.default_rng([i, seed])`), the
initialisation (`torch.manual_seed(seed)`, q/k re-drawn from seed + 1), the order of samples and of the curriculum, the
scene noise, the second images of stage (e) and of the controls, the early-stop checks and the stage lengths; no
wall-clock guard; a run resumed from a checkpoint takes the steps an uninterrupted one would. Not deterministic across
machines: float reductions (matmul, attention, softmax sums) depend on the CPU's vector units and the torch build, so
losses drift in the 7th digit after some tens of steps and retrained weights differ; issue 16 measured a fresh clone on
another machine landing within 2 points of the shipped overall accuracy, and single families moving by up to 8 points.
Bit-identical retraining holds only on the machine and torch build that trained these weights, with the same thread
count.
"""
    (out / "README.md").write_text(text)
    return out / "README.md"
