"""The two organisms: offline loading through the public transformers API, the accuracy bar, and the recipe."""
import os

import numpy as np
import pytest
import torch

from fusion_utils.organisms import ORGANISMS, weights_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BAR_N = 500  # the model cards' held-out sample: the first 500 `test` questions, 100 per family


def _have(name):
    return (weights_dir(name) / "model.safetensors").exists()


@pytest.fixture(scope="module", params=ORGANISMS)
def organism(request):
    name = request.param
    if not _have(name):
        pytest.fail(f"organism weights missing: {weights_dir(name)} (run `fusion-utils organisms train {name}`)")
    import transformers
    from transformers import AutoProcessor

    from fusion_utils.archs import get_spec

    d = weights_dir(name)
    spec = get_spec(name)
    model = getattr(transformers, spec.model_class).from_pretrained(d, use_safetensors=True, trust_remote_code=False)
    processor = AutoProcessor.from_pretrained(d, trust_remote_code=False)
    model.eval()
    return name, model, processor


def test_weights_small_and_documented():
    for name in ORGANISMS:
        d = weights_dir(name)
        assert _have(name)
        size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
        assert size <= 10 * 2**20, (name, size)
        for f in ("config.json", "model.safetensors", "README.md", "tokenizer.json", "processor_config.json"):
            assert (d / f).exists() or f == "processor_config.json", (name, f)
        card = (d / "README.md").read_text()
        assert "Evaluation" in card and "overall" in card


def test_structure(organism):
    name, model, processor = organism
    from fusion_utils.archs import get_spec, resolve

    spec = get_spec(name)
    assert model.config.model_type == name
    dec = resolve(model, spec.decoder)
    assert len(dec.layers) >= 8
    assert processor.tokenizer.padding_side == "left"
    img_id = next(getattr(model.config, a) for a in spec.image_token_attrs if getattr(model.config, a, None) is not None)
    from fusion_utils.data.world import world_dataset
    from fusion_utils.prompts import render_prompt, user_text

    ds = world_dataset("test", 3)
    texts = [render_prompt(processor, user_text(s.question)) for s in ds]
    enc = processor(images=[s.image for s in ds], text=texts, padding=True, return_tensors="pt")
    assert ((enc["input_ids"] == img_id).sum(-1) == 36).all()  # one image token per world cell
    for k in spec.extra_model_inputs:
        assert k in enc
    if name == "qwen2_vl":
        assert enc["image_grid_thw"].tolist() == [[1, 12, 12]] * 3
    else:
        assert texts[0].startswith("USER: <image>\n") and texts[0].endswith("ASSISTANT:")
    assert processor.tokenizer.unk_token_id not in enc["input_ids"]


@pytest.fixture(scope="module")
def held_out_table(organism):
    name, model, processor = organism
    from fusion_utils.organisms.evaluate import evaluate

    table = evaluate((model, processor), n=BAR_N, split="test")
    print(name, table, sep="\n")
    return table


def test_image_matters(held_out_table):
    """The bar's blank-image criterion: the same questions with a blank image score >= 30 points lower; and a floor on
    overall accuracy a few points below the weakest shipped organism (qwen2_vl 91.4%, llava 91.8% on these questions),
    which still holds for an organism listed in BELOW_BAR."""
    t = held_out_table
    assert t.loc["overall", "gap"] >= 0.30, t
    assert t.loc["overall", "accuracy"] >= 0.85, t


# organisms whose shipped weights are below issue 3's accuracy bar (their model cards say by how much); both meet it now
BELOW_BAR: dict[str, str] = {}


def test_meets_the_issue_bar(organism, held_out_table, request):
    """Issue 3's bar on a held-out sample: >= 90% overall, >= 80% on every family, blank image >= 30 points lower.
    An organism listed in BELOW_BAR is a strict xfail: the test starts failing once it meets the bar, as a reminder
    to drop it from the list."""
    from fusion_utils.organisms.evaluate import bar_check

    if organism[0] in BELOW_BAR:
        request.applymarker(pytest.mark.xfail(strict=True, reason=BELOW_BAR[organism[0]]))
    assert all(bar_check(held_out_table).values()), held_out_table


def test_models_load_helper():
    from fusion_utils.organisms import load

    model, processor = load("organism:llava")
    assert model.config.model_type == "llava" and processor.chat_template


@pytest.mark.parametrize("name", ORGANISMS)
def test_recipe_lowers_loss(name):
    """A few steps of each stage on a tiny config run and lower the loss; the text-only fast path equals the processor."""
    from fusion_utils.organisms.train import Trainer

    torch.manual_seed(0)
    tiny = dict(text_layers=2, width=32, heads=2, ffn=64, vision_layers=1, vision_width=32, vision_ffn=64)
    tr = Trainer(name, seed=0, threads=None, recipe={"batch": 8, "vision_batch": 8, "text_check_every": 0}, **tiny)
    s = tr._samples(3, with_image=True)
    a, b = tr._encode_text_only(tr._texts(s)), tr._encode(s)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    tr.stage_text(steps=25, lr=5e-3)
    losses = [r["loss"] for r in tr.log if r["stage"] == "text"]
    assert np.mean(losses[-8:]) < np.mean(losses[:4]) - 0.5, losses
    tr.stage_vision(steps=8, lr=5e-3)
    vl = [r["loss"] for r in tr.log if r["stage"] == "vision"]
    assert np.mean(vl[-3:]) < np.mean(vl[:3]), vl
    tr.stage_joint(steps=2)
    assert all(np.isfinite(r["loss"]) for r in tr.log if "loss" in r)


def test_joint_stage_parts():
    """Stage (d) trains what the recipe names: 'vision' leaves the decoder as it was, 'all' moves it, 0 steps
    moves nothing, and a bad part is one sentence."""
    from fusion_utils.organisms.train import Trainer

    tiny = dict(text_layers=2, width=32, heads=2, ffn=64, vision_layers=1, vision_width=32, vision_ffn=64)

    def changed(**recipe):
        tr = Trainer("qwen2_vl", seed=0, threads=None, recipe={"joint_batch": 4, **recipe}, **tiny)
        before = {k: v.clone() for k, v in tr.model.state_dict().items()}
        tr.stage_joint(steps=recipe.get("joint_steps", 2))
        after = tr.model.state_dict()
        return {k.startswith("model.language_model") for k in before if not torch.equal(before[k], after[k])}

    assert changed(joint_part="vision") == {False}
    assert changed(joint_part="all") == {False, True}
    assert changed(joint_steps=0) == set()
    with pytest.raises(ValueError, match="joint_part"):
        changed(joint_part="decoder")


def test_same_seed_same_weights():
    """Retraining is reproducible: the recipe is deterministic in its seed (no wall-clock guards, seeded streams), so
    two runs of the same stages give bit-identical weights; another seed gives other weights."""
    from fusion_utils.organisms.train import Trainer

    tiny = dict(text_layers=2, width=32, heads=2, ffn=64, vision_layers=1, vision_width=32, vision_ffn=64)
    recipe = {"batch": 4, "vision_batch": 4, "joint_batch": 4, "text_check_every": 3, "text_steps": 6}

    def run(seed):
        tr = Trainer("llava", seed=seed, threads=None, recipe=recipe, **tiny)
        tr.stage_text().stage_vision(steps=3).stage_joint(steps=2)
        return tr.model.state_dict(), tr.log

    (a, la), (b, lb), (c, _) = run(0), run(0), run(1)
    assert la == lb
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_checkpoint_key_sees_config_and_world(monkeypatch):
    """A stage checkpoint is resumed only by the same recipe, model config and world: a rotary setting (no weight
    shape shows it) or a world setting changes the key."""
    from fusion_utils.data import world
    from fusion_utils.organisms.train import Trainer, checkpoint_key

    tiny = dict(text_layers=2, width=32, heads=2, ffn=64, vision_layers=1, vision_width=32, vision_ffn=64)
    a = checkpoint_key(Trainer("qwen2_vl", seed=0, threads=None, **tiny))
    assert a == checkpoint_key(Trainer("qwen2_vl", seed=0, threads=None, **tiny))
    assert a != checkpoint_key(Trainer("qwen2_vl", seed=0, threads=None, mrope_section=[4, 2, 2], **tiny))
    monkeypatch.setattr(world, "RELATIONS", dict(world.ALL_RELATIONS))
    assert a != checkpoint_key(Trainer("qwen2_vl", seed=0, threads=None, **tiny))


def test_bar_status_names_what_is_missed():
    import pandas as pd

    from fusion_utils.organisms.evaluate import bar_check, bar_status

    def table(accs, blank):
        rows = [{"family": f, "n": 100, "accuracy": a, "blank_accuracy": blank} for f, a in accs.items()]
        t = pd.DataFrame(rows).set_index("family")
        t.loc["overall"] = [500, t["accuracy"].mean(), blank]
        t["gap"] = t["accuracy"] - t["blank_accuracy"]
        return t

    good = table({"attribute": 0.95, "identity": 0.92, "existence": 0.97, "count": 0.9, "spatial": 0.85}, 0.3)
    assert all(bar_check(good).values()) and bar_status(good).startswith("Meets")
    weak = table({"attribute": 0.95, "identity": 0.92, "existence": 0.97, "count": 0.9, "spatial": 0.55}, 0.3)
    assert bar_check(weak) == {"overall": False, "per_family": False, "gap": True}
    assert "spatial 55.0%" in bar_status(weak) and "attribute" not in bar_status(weak)


@pytest.mark.parametrize("name", ORGANISMS)
def test_question_blocks_equal_single_prompts(name):
    """Stage (a)/(d) packing: every question block that shares a scene prefix gives the answer logits of its own
    single evaluation prompt (the 4D mask isolates the blocks; positions, M-RoPE included, restart after the image)."""
    from fusion_utils.organisms.train import Trainer, render_prompt, user_text

    tiny = dict(text_layers=2, width=32, heads=2, ffn=64, vision_layers=1, vision_width=32, vision_ffn=64)
    tr = Trainer(name, seed=0, threads=None, recipe={"blocks": 3}, **tiny)
    tr.model.eval()
    samples = tr._samples(3, with_image=False)
    tr._families_now = None
    enc = tr._encode_blocks(samples)
    qas = tr._block_questions(samples)
    assert all(len(qa) == 3 for qa in qas) and len({q for qa in qas for q, _ in qa}) > 3
    feats = tr._scene_embeds(tr._cell_targets(samples))
    with torch.no_grad():
        logits = tr._lm_forward(enc, feats)
        labels = tr._labels(enc["input_ids"])
        for b, qa in enumerate(qas):
            answer_pos = (labels[b] != -100).nonzero().flatten().tolist()[::2]  # answer, EOS, answer, EOS, ...
            assert len(answer_pos) == len(qa)
            for j, (q, a) in enumerate(qa):
                assert tr.tok.convert_ids_to_tokens(int(enc["input_ids"][b, answer_pos[j]])) == a
                one = tr._encode_text_only([render_prompt(tr.processor, user_text(q))])
                single = tr._lm_forward(one, feats[b:b + 1])[0, -1]
                torch.testing.assert_close(logits[b, answer_pos[j] - 1], single, atol=1e-5, rtol=1e-5)


def test_family_curriculum_restricts_early_samples():
    from fusion_utils.data import world
    from fusion_utils.organisms.train import Trainer

    tiny = dict(text_layers=2, width=32, heads=2, ffn=64, vision_layers=1, vision_width=32, vision_ffn=64)
    tr = Trainer("llava", seed=0, threads=None, recipe={"family_stages": [[0.5, ["attribute", "count"]]]}, **tiny)
    assert {s.family for s in tr._samples(20, with_image=False, progress=0.1)} == {"attribute", "count"}
    assert {s.family for s in tr._samples(20, with_image=False, progress=0.6)} == set(world.FAMILIES)
