"""The organisms: offline loading through the public transformers API, the accuracy bar, the recipe, and the
two-image stage and controls (issue 16)."""
import os

import numpy as np
import pytest
import torch

from conftest import load_script
from fusion_utils.organisms import DEEP, FAST, ORGANISMS, arch_of, shipped, weights_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BAR_N = 500  # the model cards' held-out sample: the first 500 `test` questions, 100 per family


def _have(name):
    return (weights_dir(name) / "model.safetensors").exists()


@pytest.fixture(scope="module", params=ORGANISMS + FAST)  # the default (deep) pair and the 8-layer one: both ship
def organism(request):
    name = request.param
    if not _have(name):
        pytest.fail(f"organism weights missing: {weights_dir(name)} (run `fusion-utils organisms train {name}`)")
    import transformers
    from transformers import AutoProcessor

    from fusion_utils.archs import get_spec

    d = weights_dir(name)
    spec = get_spec(arch_of(name))
    model = getattr(transformers, spec.model_class).from_pretrained(d, use_safetensors=True, trust_remote_code=False)
    processor = AutoProcessor.from_pretrained(d, trust_remote_code=False)
    model.eval()
    return name, model, processor


def test_weights_small_and_documented():
    for name in sorted(set(ORGANISMS) | set(shipped())):
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

    spec = get_spec(arch_of(name))
    assert model.config.model_type == arch_of(name)
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
    if arch_of(name) == "qwen2_vl":
        assert enc["image_grid_thw"].tolist() == [[1, 12, 12]] * 3
    else:
        assert texts[0].startswith("USER: <image>\n") and texts[0].endswith("ASSISTANT:")
    assert processor.tokenizer.unk_token_id not in enc["input_ids"]


@pytest.fixture(scope="module")
def held_out_table(organism):
    """The bar's table, measured as every chapter measures accuracy: the harness's `accuracy` experiment once per
    image condition (`organisms.evaluate` on the in-memory model)."""
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
    from fusion_utils.organisms.train import Trainer
    from fusion_utils.prompts import render_prompt, user_text

    tiny = dict(text_layers=2, width=32, heads=2, ffn=64, vision_layers=1, vision_width=32, vision_ffn=64)
    tr = Trainer(name, seed=0, threads=None, recipe={"blocks": 3}, **tiny)
    tr.model.eval()
    samples = tr._samples(3, with_image=False)
    tr._families_now = None
    enc = tr._encode_blocks(samples)
    qas = tr._block_questions(samples)
    assert all(len(qa) == 3 for qa in qas) and len({q for qa in qas for q, _ in qa}) > 3
    feats = tr._scene_embeds(tr.cell_targets(samples))
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


TINY = dict(text_layers=2, width=32, heads=2, ffn=64, vision_layers=1, vision_width=32, vision_ffn=64)


def _spans(row, token_id):
    """Maximal runs of `token_id` in a 1-D id tensor, as (start, length)."""
    hit = (row == token_id).tolist()
    out, start = [], None
    for i, h in enumerate(hit + [False]):
        if h and start is None:
            start = i
        elif not h and start is not None:
            out.append((start, i - start))
            start = None
    return out


@pytest.mark.parametrize("name", DEEP)
def test_two_image_stage_tiny(name):
    """Stage (e) on a tiny config: a prompt with two images has two image spans (found by token id; 36 tokens for the
    original, the crop's own count), its loss is finite, the labels are the answer + EOS only, and a few steps run."""
    from fusion_utils.organisms.train import Trainer

    tr = Trainer(name, seed=0, threads=None, recipe={"two_batch": 5, "two_kinds": ["same", "relevant"]}, **TINY)
    samples = tr._samples(5, with_image=True)
    kinds, images = zip(*tr._two_image_batch(samples))
    assert set(kinds) <= {"same", "relevant"} and all(len(im) == 2 for im in images)
    enc = tr.encode_two(samples, images)
    img_id = tr.model.config.image_token_id
    for b, (kind, im) in enumerate(zip(kinds, images)):
        spans = _spans(enc["input_ids"][b], img_id)
        if tr.arch == "llava":
            # `<image>\n<image>\n`: the word-level tokenizer has no newline token, so the two images' tokens are
            # adjacent; CLIP's centre crop gives every image (crops too) 36 tokens, the first 36 are the original's
            assert spans == [(spans[0][0], 72)], (kind, spans)
        else:  # <|vision_start|> ... <|vision_end|> around each image
            assert len(spans) == 2 and spans[0][1] == 36, (kind, spans)
            assert kind != "same" or spans[1][1] == 36, (kind, spans)
    labels = tr._labels(enc["input_ids"])
    assert ((labels != -100).sum(-1) == 2).all()
    with torch.no_grad():
        loss = tr._answer_loss(tr.model(**enc).logits, enc["input_ids"])
    assert torch.isfinite(loss)
    tr.stage_two(steps=2)
    two = [r["loss"] for r in tr.log if r["stage"] == "two"]
    assert len(two) == 2 and np.isfinite(two).all()
    with pytest.raises(ValueError, match="two_part"):
        Trainer(name, seed=0, threads=None, recipe={"two_part": "decoder"}, **TINY).stage_two(steps=1)


def test_two_board_text_stage():
    """Stage (a)'s `text_two` share: rows with two boards carry 72 image tokens and a second board of the drawn kind
    ('same' is the board itself; a crop's board is its cells as the tower should read them magnified); the share
    draws the same batches for the same seed; Qwen2-VL is refused in one sentence."""
    from fusion_utils.organisms.train import Trainer

    tr = Trainer("llava-32l", seed=0, threads=None, recipe={"text_two": 0.5, "batch": 6}, **TINY)
    samples = tr._samples(6, with_image=False)
    enc, feats = tr._two_board_batch(samples)
    n_img = (enc["input_ids"] == tr.tok.convert_tokens_to_ids("<image>")).sum(-1)
    assert set(n_img.tolist()) == {36, 72} and feats.shape[0] == int(n_img.sum()) // 36
    again = Trainer("llava-32l", seed=0, threads=None, recipe={"text_two": 0.5, "batch": 6}, **TINY)
    enc2, feats2 = again._two_board_batch(again._samples(6, with_image=False))
    assert torch.equal(enc["input_ids"], enc2["input_ids"]) and torch.equal(feats, feats2)
    s, rng = samples[0], np.random.default_rng(0)
    assert torch.equal(tr.second_board(s, "same", rng), tr.cell_targets([s])[0])
    rel = tr.second_board(s, "relevant", rng).view(6, 6)
    board = tr.cell_targets([s])[0].view(6, 6)
    r = np.asarray(s.relevant, bool)
    assert set(board[torch.as_tensor(r)].tolist()) <= set(rel.reshape(-1).tolist())  # the crop shows the relevant cells
    tr.stage_text(steps=1)
    assert np.isfinite(tr.log[-1]["loss"])
    with pytest.raises(ValueError, match="text_two"):
        Trainer("qwen2_vl-16l", seed=0, threads=None, recipe={"text_two": 0.5}, **TINY)._two_board_batch(samples)


@pytest.mark.parametrize("name", ["llava-16l", "qwen2_vl-16l"])
def test_one_board_prompts_are_the_training_prompts(name):
    """`board_prompts` without a second board (what `quick_accuracy(mode="text")` scores) encodes exactly the prompts
    and boards stage (a) trains on, with and without the answer, on both architectures."""
    from fusion_utils.data import world
    from fusion_utils.organisms.train import Trainer

    tr = Trainer(name, seed=0, threads=None, **TINY)
    batch = list(world.world_dataset("val", 6, seed=0))
    for with_answer in (False, True):
        enc, boards = tr.board_prompts(batch, lambda _: None, None, with_answer=with_answer)
        ref = tr._encode_text_only(tr._texts(batch, with_answer=with_answer))
        assert enc.keys() == ref.keys() and all(torch.equal(enc[k], ref[k]) for k in ref)
        assert torch.equal(boards, tr._scene_embeds(tr.cell_targets(batch)))


def test_two_board_accuracy_and_script(monkeypatch, tmp_path):
    """`quick_accuracy(second=kind)` scores a decoder on [board, second board] text prompts (LLaVA only, text mode
    only: anything else is one sentence naming the fix), and scripts/decoder_reads_two_boards.py prints one row per
    kind for a trainer checkpoint."""
    from conftest import SCRIPTS

    from fusion_utils.organisms.train import Trainer

    tr = Trainer("llava-32l", seed=0, threads=None, **TINY)
    acc = tr.quick_accuracy(8, "text", second="relevant")
    assert "overall" in acc and 0 <= acc["overall"] <= 1
    with pytest.raises(ValueError, match="mode='text'"):
        tr.quick_accuracy(4, "image", second="same")
    with pytest.raises(ValueError, match="LLaVA"):
        Trainer("qwen2_vl-16l", seed=0, threads=None, **TINY).quick_accuracy(4, "text", second="same")
    torch.save(tr.state(), tmp_path / "text.pt")
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import tower_reads_crops

    monkeypatch.setattr(tower_reads_crops, "Trainer", lambda name, threads=None: Trainer(name, threads=threads, **TINY))
    out = load_script("decoder_reads_two_boards").main([f"llava-32l={tmp_path / 'text.pt'}", "--n", "4"])
    assert [k for _, k in out] == ["one", "same", "relevant", "irrelevant", "random"]
    assert all(0 <= v["overall"] <= 1 for v in out.values())


def test_timing_script_options(capsys):
    """scripts/organism_timing.py times a stage (a) step, in fp32 or under bf16 autocast, on one thread or N, naming how
    in its line; an unknown option or a bad thread count is one sentence naming the fix."""
    mod = load_script("organism_timing")
    tiny = [f"{k}={v}" for k, v in TINY.items()]
    threads = torch.get_num_threads()
    try:
        for flag, how, n in (([], "(fp32)", 1), (["--bf16"], "(--bf16)", 1), (["--threads=2"], "(fp32)", 2)):
            mod.main(["llava-16l", "3", *tiny, *flag])
            line = capsys.readouterr().out.strip().splitlines()[-1]
            assert line.startswith("llava-16l 2 layers x 32") and how in line
            assert ("one thread" if n == 1 else f"{n} threads") in line and torch.get_num_threads() == n
            assert float(line.split(": ")[1].split()[0]) > 0
    finally:
        torch.set_num_threads(threads)  # the script sets its own thread count; the rest of the suite keeps its own
    with pytest.raises(SystemExit, match="--bf16, --compile or --threads=N"):
        mod.main(["llava-16l", "3", "--fp16"])
    with pytest.raises(SystemExit, match="use --threads=N with N a whole number"):
        mod.main(["llava-16l", "3", "--threads=0"])


def test_second_image_boxes():
    """The relevant crop holds every relevant cell; the irrelevant crop has its size and, where there is room, none."""
    from fusion_utils.data import world
    from fusion_utils.organisms.two_images import CELL, images_for, irrelevant_box, relevant_box

    rng = np.random.default_rng(0)
    free = 0
    for s in world.world_dataset("test", 60):
        rel = np.asarray(s.relevant, bool)
        l, t, r, b = relevant_box(s)
        assert rel[t // CELL:b // CELL, l // CELL:r // CELL].sum() == rel.sum()
        il, it, ir, ib = irrelevant_box(s, rng)
        assert (ir - il, ib - it) == (r - l, b - t)
        inside = rel[it // CELL:ib // CELL, il // CELL:ir // CELL].sum()
        free += inside == 0
        assert [im.size for im in images_for(s, "relevant")] == [s.image.size, (r - l, b - t)]
    assert free > 30
    with pytest.raises(ValueError, match="kind"):
        images_for(s, "twice")


def test_zoomed_cells_map_tokens_to_the_cells_they_magnify():
    """A crop's token grid maps back onto the board: the whole board on 6 x 6 tokens is the identity, 3 cells on 6
    tokens show each cell twice, and a fractional box (the middle square a centre-cropping processor keeps of a
    wide crop) maps onto the cells it covers."""
    from fusion_utils.data.second_images import zoomed_cells

    rows, cols = zoomed_cells((0, 0, 6, 6), (6, 6))
    assert (rows == np.arange(6)[:, None]).all() and (cols == np.arange(6)[None]).all()
    rows, cols = zoomed_cells((2, 1, 5, 4), (6, 6))
    assert rows[:, 0].tolist() == [2, 2, 3, 3, 4, 4] and cols[0].tolist() == [1, 1, 2, 2, 3, 3]
    rows, cols = zoomed_cells((1.0, 1.0, 3.0, 3.0), (6, 6))
    assert set(cols.ravel()) == {1, 2} and set(rows.ravel()) == {1, 2}


def test_first_token_of_each_cell_keeps_one_token_per_magnified_cell():
    """The "first" zoom target keeps one token per cell, the first in reading order: a 2x magnified cell's top-left
    token, and every token when nothing is magnified; the trainer puts `<empty>` on the others."""
    from fusion_utils.data.second_images import cells_to_px, first_token_of_each_cell, zoomed_cells
    from fusion_utils.organisms.train import Trainer

    assert first_token_of_each_cell(*zoomed_cells((0, 0, 6, 6), (6, 6))).all()
    rows, cols = zoomed_cells((0, 0, 4, 4), (6, 6))  # 1.5 tokens a cell: cells alternate 2 and 1 tokens a side
    keep = first_token_of_each_cell(rows, cols)
    assert keep.sum() == 16 and len({(r, c) for r, c in zip(rows[keep], cols[keep])}) == 16
    for r, c in zip(*np.nonzero(keep)):  # nothing before it in reading order shows the same cell
        same = (rows == rows[r, c]) & (cols == cols[r, c])
        assert not same.reshape(-1)[:r * 6 + c].any()
    tr = Trainer("llava-16l", seed=0, threads=None, recipe={"vision_zoom_target": "first"}, **TINY)
    s = tr._samples(1, with_image=True)
    box = (0, 0, 3, 3)
    ip = dict(tr.processor.image_processor(images=[s[0].image.convert("RGB").crop(cells_to_px(*box))],
                                           return_tensors="pt"))
    t = tr.zoom_targets(s, [box], ip, 0)[0].view(6, 6)
    board = tr.cell_targets(s)[0].view(6, 6)
    assert torch.equal(t[::2, ::2], board[:3, :3]) and (t[1::2].eq(0).all() and t[:, 1::2].eq(0).all())
    tr.recipe["vision_zoom_target"] = "centre"
    with pytest.raises(ValueError, match="vision_zoom_target='centre': use 'every' or 'first'"):
        tr.zoom_targets(s, [box], ip, 0)


@pytest.mark.parametrize("name", DEEP)
def test_vision_stage_zoom_share(name):
    """Stage (b+c) with a zoom share: the crops' targets are the cells they magnify, one per token of each crop
    (Qwen2-VL's crops have their own token grids), so a crop of a one-object box puts that object's scene token on
    every token of its cell; without the share the stage draws exactly the samples it drew before."""
    from fusion_utils.data.second_images import cells_to_px
    from fusion_utils.organisms.train import Trainer

    tr = Trainer(name, seed=0, threads=None, recipe={"vision_batch": 6, "vision_zoom": 0.5}, **TINY)
    samples = tr._samples(4, with_image=True)
    crops, boxes = tr._zoom_crops(samples)
    assert [c.size for c in crops] == [(r - l, b - t) for l, t, r, b in (cells_to_px(*x) for x in boxes)]
    ip = dict(tr.processor.image_processor(images=crops, return_tensors="pt"))
    targets = tr.zoom_targets(samples, boxes, ip, 0)
    tokens = tr.image_tokens(ip)
    assert [t.numel() for t in targets] == [len(x) for x in tokens]
    for s, b, t in zip(samples, boxes, targets):
        board = tr.cell_targets([s])[0].view(6, 6)
        inside = board[b[0]:b[2], b[1]:b[3]]
        assert set(t.tolist()) <= set(inside.reshape(-1).tolist())  # only cells of the crop
        if tr.arch == "qwen2_vl":  # the whole crop is shown: every cell of the box appears
            assert set(t.tolist()) == set(inside.reshape(-1).tolist())
    n0 = tr.counter
    tr.stage_vision(steps=2)
    assert tr.counter - n0 == 12  # originals and crops both draw samples: 6 a step (no blank image at batch 6)
    plain = Trainer(name, seed=0, threads=None, recipe={"vision_batch": 6}, **TINY)
    plain.stage_vision(steps=1)
    assert plain.counter == 6 and all(np.isfinite(r["loss"]) for r in tr.log)


def test_deep_qwen_reads_a_crop_at_its_own_size():
    """The deep Qwen2-VL organism's processor keeps a crop at its own size, one token per cell as in the whole image
    (hub Qwen2-VL's dynamic resolution); the 8-layer one, as shipped, resizes every image to 96 x 96 px of area."""
    from fusion_utils.data import world
    from fusion_utils.data.second_images import cells_to_px, relevant_cells
    from fusion_utils.organisms.build import build_processor

    s = world.world_dataset("test", 4)[1]
    r0, c0, r1, c1 = relevant_cells(s)
    images = [s.image, s.image.crop(cells_to_px(r0, c0, r1, c1))]
    deep = build_processor("qwen2_vl-16l").image_processor(images=images, return_tensors="pt")
    assert deep["image_grid_thw"].tolist() == [[1, 12, 12], [1, 2 * (r1 - r0), 2 * (c1 - c0)]]
    fast = build_processor("qwen2_vl-8l").image_processor(images=images, return_tensors="pt")
    assert fast["image_grid_thw"][0].tolist() == [1, 12, 12]
    assert int(fast["image_grid_thw"][1, 1] * fast["image_grid_thw"][1, 2]) >= 12 * 12 - 24  # magnified to ~96 x 96


def test_deep_llava_keeps_the_newline_between_images():
    """A LLaVA organism in `build.NEWLINE_TOKEN` keeps the chat template's newline as a token, as hub LLaVA's
    tokenizer does: two images' token runs are apart, one newline after each; every other id is the 8-layer
    tokenizer's, and the built model has an embedding row for it."""
    from fusion_utils.data import world
    from fusion_utils.organisms.build import build_config, build_processor
    from fusion_utils.prompts import render_prompt, user_text

    s = world.world_dataset("test", 1)[0]
    deep, fast = build_processor("llava-32l"), build_processor("llava-8l")
    text = render_prompt(deep, user_text(s.question), n_images=2)
    ids = deep(images=[s.image, s.image], text=[text], return_tensors="pt")["input_ids"][0].tolist()
    nl, img = deep.tokenizer.convert_tokens_to_ids("\n"), deep.tokenizer.convert_tokens_to_ids("<image>")
    first = ids.index(img)
    assert ids[first + 36] == nl and ids[first + 37: first + 73] == [img] * 36 and ids[first + 73] == nl
    assert nl == len(fast.tokenizer) and "\n" not in fast.tokenizer.get_vocab()
    assert {k: v for k, v in deep.tokenizer.get_vocab().items() if k != "\n"} == fast.tokenizer.get_vocab()
    assert build_config("llava-32l", deep.tokenizer).text_config.vocab_size == len(fast.tokenizer) + 1
    assert fast.tokenizer.tokenize(text).count("<image>") == 2 and "\n" not in fast.tokenizer.tokenize(text)


@pytest.mark.parametrize("name", shipped())
def test_shipped_weights_are_what_the_build_makes(name):
    """`make organisms` retrains what ships: each shipped variant's saved tokenizer, image processor and model config
    are the ones `build` makes for it today (a build change without retrained weights fails here)."""
    import json

    from transformers import AutoConfig, AutoProcessor

    from fusion_utils.organisms.build import build_config, build_processor

    d = weights_dir(name)
    saved, built = AutoProcessor.from_pretrained(d), build_processor(name)
    assert saved.tokenizer.get_vocab() == built.tokenizer.get_vocab()
    assert saved.image_processor.to_dict() == built.image_processor.to_dict()
    want = json.loads(build_config(name, built.tokenizer).to_json_string(use_diff=False))
    have = json.loads(AutoConfig.from_pretrained(d).to_json_string(use_diff=False))
    for part in ("text_config", "vision_config"):
        keys = ("vocab_size", "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                "rope_parameters", "rope_scaling")
        assert {k: have[part].get(k) for k in keys} == {k: want[part].get(k) for k in keys}, (name, part)


def test_prepare_takes_two_images_on_an_organism():
    """The package's multi-image path runs on an organism as on a hub model: `lm.prepare(images=[[orig, crop]])`
    renders two placeholders, and the batch finds both images' tokens."""
    from fusion_utils.data import world
    from fusion_utils.models import load_model
    from fusion_utils.organisms.two_images import images_for

    lm = load_model("organism:qwen2_vl")
    samples = list(world.world_dataset("test", 2))
    batch = lm.prepare(samples, images=[images_for(s, "relevant") for s in samples])
    for b in range(2):
        assert len(batch.grids[b]) == 2 and len(_spans(batch.inputs["input_ids"][b].cpu(), lm.image_token_id)) == 2
        assert len(batch.image_tokens_of(b, 0)) == 36


def test_resumed_stage_equals_uninterrupted(tmp_path):
    """A run killed mid-stage and resumed from its mid-stage checkpoint ends with the weights and log of a run that
    was never interrupted (optimiser, schedule, data position and noise generator all restored)."""
    from fusion_utils.organisms.train import Trainer

    recipe = {"batch": 4, "text_check_every": 0}
    a = Trainer("llava-32l", seed=0, threads=None, recipe=recipe, **TINY).stage_text(steps=6)

    b = Trainer("llava-32l", seed=0, threads=None, recipe=recipe, **TINY)
    b.ckpt_file, b.ckpt_every = tmp_path / "partial.pt", 2
    real_update, calls = b._update, []

    def dying_update(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        real_update(*args)

    b._update = dying_update
    with pytest.raises(KeyboardInterrupt):
        b.stage_text(steps=6)
    st = torch.load(tmp_path / "partial.pt", weights_only=True)
    assert st["stage"] == "text" and st["step"] == 2
    c = Trainer("llava-32l", seed=0, threads=None, recipe=recipe, **TINY)
    c.load_state(st)
    c.partial = st
    c.stage_text(steps=6)
    sa, sc = a.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sc[k]) for k in sa)
    assert [r["loss"] for r in a.log] == [r["loss"] for r in c.log]


def test_bar_two_image_parts():
    import pandas as pd

    from fusion_utils.organisms.evaluate import bar_check, bar_status

    def table(one, twice, rel):
        t = pd.DataFrame([{"family": f, "n": 100, "accuracy": one, "blank_accuracy": 0.2, "gap": one - 0.2,
                           "same_twice": twice, "relevant_crop": rel, "irrelevant_crop": twice}
                          for f in ("attribute", "overall")]).set_index("family")
        return t

    assert all(bar_check(table(0.92, 0.90, 0.92)).values())
    bad = table(0.92, 0.88, 0.91)
    assert bar_check(bad) == {"overall": True, "per_family": True, "gap": True, "twice": False, "relevant_crop": False}
    assert "same image twice 88.0%" in bar_status(bad) and "relevant crop] 91.0%" in bar_status(bad)
    assert bar_check(bad, two_image=False) == {"overall": True, "per_family": True, "gap": True}


@pytest.fixture(scope="module", params=shipped(DEEP))
def deep_table(request):
    from fusion_utils.organisms.evaluate import evaluate

    table = evaluate(request.param, n=BAR_N, split="test", two_image=True)
    print(request.param, table, sep="\n")
    return request.param, table


# the parts of issue 16's bar each shipped deep organism misses (its model card has the numbers); empty once it meets it
DEEP_MISSES: dict[str, set[str]] = {}


def test_deep_organisms_meet_the_bar(deep_table):
    """Issue 16's bar for every deep organism whose weights ship, on the model cards' 500 held-out questions:
    >= 90% overall, >= 80% per family, blank >= 30 points lower, the same image twice within 3 points of one image,
    [original, relevant crop] no lower than one image. The parts it misses must be exactly those DEEP_MISSES lists:
    a retrain that meets more of the bar, or fewer, fails here until the list (and the model card) says so."""
    from fusion_utils.organisms.evaluate import bar_check

    name, table = deep_table
    missed = {k for k, ok in bar_check(table, two_image=True).items() if not ok}
    assert missed == DEEP_MISSES.get(name, set()), (name, table)


def test_names_resolve_to_variants():
    """`llava` / `qwen2_vl` name the default variant of each architecture; every variant builds at its own depth; an
    unknown name is one sentence listing the known ones."""
    from fusion_utils.models import organism_dir
    from fusion_utils.organisms import DEFAULT_VARIANT, VARIANTS, arch_of, resolve_name
    from fusion_utils.organisms.build import SIZES, build_config, build_tokenizer

    assert resolve_name("organism:llava") == DEFAULT_VARIANT["llava"] and arch_of("qwen2_vl-28l") == "qwen2_vl"
    assert organism_dir("organism:llava") == weights_dir(DEFAULT_VARIANT["llava"])
    for name, arch in VARIANTS.items():
        cfg = build_config(name, build_tokenizer(arch))
        assert cfg.model_type == arch
        assert cfg.text_config.num_hidden_layers == SIZES[name].get("text_layers", 8)
    with pytest.raises(ValueError, match="Unknown organism 'llava-7b'; use one of"):
        resolve_name("llava-7b")


def test_depth_comparison_script_runs_the_chapters_analyses(tmp_path):
    """scripts/depth_comparison.py (issue 16, item 4) on two tiny models of different depth: one table column and one
    curve per model, every curve on relative depth [0, 1] with one point per layer, and the run recorded."""
    import json

    import pandas as pd

    from fusion_utils.testing import tiny_model_dir

    mod = load_script("depth_comparison")
    models = [str(tiny_model_dir("llava", num_layers=4)), str(tiny_model_dir("llava", num_layers=6))]
    table = mod.main([*models, "--n", "6", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert table.shape == (len(mod.CLAIMS), 2)
    curves = pd.read_csv(tmp_path / "out" / "depth_comparison.csv")
    for (model, panel), g in curves.groupby(["model", "panel"]):
        n_layers = int(model.split("(")[1].split()[0])
        assert len(g) == n_layers and g["depth"].min() == 0 and g["depth"].max() == 1, (model, panel)
    assert (tmp_path / "out" / "depth_comparison.png").stat().st_size > 0
    rec = json.loads((tmp_path / "out" / "depth_comparison.json").read_text())
    assert len(rec["fingerprints"]) == 2 and rec["params"]["n"] == 6


# ------------------------------------------------------------------------- world-fine and stage (f) (issue 28)
def test_fine_bar_check_and_status():
    """World-fine's bar: one image in 55-75%, the relevant crop >= 10 points above it; the sentence names the
    numbers, and a table without the crop column is refused in one sentence."""
    import pandas as pd

    from fusion_utils.organisms.evaluate import fine_bar_check, fine_bar_status

    def table(one, crop):
        return pd.DataFrame({"n": [500], "accuracy": [one], "relevant_crop": [crop]}, index=["overall"])

    assert fine_bar_check(table(0.62, 0.75)) == {"one_image": True, "crop_gain": True}
    assert fine_bar_check(table(0.62, 0.70)) == {"one_image": True, "crop_gain": False}
    assert fine_bar_check(table(0.80, 0.95)) == {"one_image": False, "crop_gain": True}
    assert fine_bar_status(table(0.62, 0.75)).startswith("Meets the world-fine bar: one image 62.0%")
    assert "+8.0 points" in fine_bar_status(table(0.62, 0.70)) and "Below" in fine_bar_status(table(0.62, 0.70))
    with pytest.raises(ValueError, match="no relevant_crop column"):
        fine_bar_check(pd.DataFrame({"n": [5], "accuracy": [0.5]}, index=["overall"]))


def test_world_fine_eval_table_has_the_crop_column(capsys):
    """`fusion-utils organisms eval NAME --dataset world-fine` prints the table with the two-image columns (the
    relevant crop among them) and the world-fine bar's sentence; evaluate() refuses another dataset."""
    from fusion_utils.organisms.cli import main
    from fusion_utils.organisms.evaluate import evaluate

    assert main(["eval", "llava-8l", "--dataset", "world-fine", "--n", "10", "--no-blank"]) == 0
    out = capsys.readouterr().out
    assert "## llava-8l (world-fine, test, n=10)" in out and "relevant_crop" in out and "irrelevant_crop" in out
    assert "world-fine bar: one image" in out
    t = evaluate("llava-8l", n=10, dataset="world-fine", two_image=True, blank=False, progress=False)
    assert list(t.columns) == ["n", "accuracy", "same_twice", "relevant_crop", "irrelevant_crop"]
    with pytest.raises(ValueError, match="evaluated on world or world-fine"):
        evaluate("llava-8l", n=2, dataset="gqa")


@pytest.mark.parametrize("name", DEEP)
def test_fine_stage_tiny(name):
    """Stage (f) on a tiny config: about `fine_share` of the samples are world-fine (192 px), the second images are
    crops at the image's own pixels, one alignment target per image token in the processor's order, and a few steps
    run with finite losses; the same seed draws the same batches."""
    from fusion_utils.organisms.train import Trainer

    R = {"fine_steps": 2, "fine_batch": 8, "fine_share": 0.5, "fine_kinds": ("one", "same", "relevant", "irrelevant", "random")}
    tr = Trainer(name, seed=0, threads=None, recipe=R, **TINY)
    samples = tr._fine_samples(40)
    sizes = [s.image.size[0] for s in samples]
    assert set(sizes) == {96, 192} and 10 <= sizes.count(192) <= 30
    images, boxes = tr._fine_images(samples)
    for s, ims, box in zip(samples, images, boxes):
        if box is not None:  # a crop keeps its native pixels: 16 or 32 px a cell
            cell = s.image.size[0] // 6
            assert ims[1].size == ((box[3] - box[1]) * cell, (box[2] - box[0]) * cell)
    enc = tr.encode_two(samples[:8], images[:8])
    feats = tr.image_tokens(enc)
    targets = tr._fine_targets(samples[:8], images[:8], boxes[:8], enc)
    assert len(feats) == sum(len(i) for i in images[:8]) and targets.shape[0] == sum(f.shape[0] for f in feats)
    again = Trainer(name, seed=0, threads=None, recipe=R, **TINY)
    assert [s.id for s in again._fine_samples(40)] == [s.id for s in samples]
    tr.stage_fine(steps=2)
    fine = [r for r in tr.log if r["stage"] == "fine"]
    assert len(fine) == 2 and np.isfinite([r["loss"] for r in fine]).all() and 0 <= fine[0]["cell_acc"] <= 1


@pytest.mark.parametrize("name", DEEP)
def test_fine_stage_vision_part_keeps_the_decoder(name):
    """``fine_part`` "vision" (the 2026-12-06 evening runs, weights/RECIPE_NOTES.md): stage (f) moves the tower and
    projector only; the decoder's weights stay bit-identical. An unknown part is refused with the allowed values."""
    from fusion_utils.organisms.train import Trainer

    R = {"fine_steps": 2, "fine_batch": 4, "fine_part": "vision", "fine_lr": 1e-3}
    tr = Trainer(name, seed=0, threads=None, recipe=R, **TINY)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.stage_fine(steps=2)
    moved = {n for n, p in tr.model.named_parameters() if not torch.equal(p, before[n])}
    is_lm = [n for n in before if n.startswith("model.language_model") or n.startswith("lm_head")]
    assert is_lm and not moved & set(is_lm), sorted(moved & set(is_lm))[:3]
    assert moved and all(n not in is_lm for n in moved)
    bad = Trainer(name, seed=0, threads=None, recipe={**R, "fine_part": "tower"}, **TINY)
    with pytest.raises(ValueError, match="fine_part='tower': use 'lm' or 'vision' or 'projector' or 'all'"):
        bad.stage_fine(steps=1)


@pytest.mark.parametrize("name", DEEP)
def test_fine_stage_projector_part_moves_only_the_projector(name):
    """``fine_part`` "projector" (third session of stage (f)): only the merger (Qwen2-VL) or the projector (LLaVA)
    moves; the tower and the decoder stay bit-identical."""
    from fusion_utils.organisms.train import Trainer

    tr = Trainer(name, seed=0, threads=None, recipe={"fine_steps": 2, "fine_batch": 4, "fine_part": "projector",
                                                     "fine_lr": 1e-3}, **TINY)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.stage_fine(steps=2)
    moved = {n for n, p in tr.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("merger" in n or "multi_modal_projector" in n for n in moved), sorted(moved)[:3]


@pytest.mark.parametrize("name", DEEP)
def test_fine_crop_targets_follow_the_drawn_centres(name, monkeypatch):
    """``fine_crop_aux`` "centres": in a relevant crop of a world-fine image, the token under each object's drawn
    centre targets that object and every other token `<empty>`, so a crop's target holds each object it shows
    once; "none" leaves a crop's tokens without a target (-1), and an unknown mode is refused."""
    from fusion_utils.data import world
    from fusion_utils.data.second_images import cells_to_px, relevant_cells
    from fusion_utils.organisms.train import Trainer

    monkeypatch.setattr(world, "FINE_SUBCELL", 1.0)
    tr = Trainer(name, seed=0, threads=None, recipe={"fine_crop_aux": "centres"}, **TINY)
    for i in range(6):
        s = world.make_sample("test", i, fine=True)
        box = relevant_cells(s)
        img = s.image.convert("RGB")
        l, t, r, b = cells_to_px(*box, size=img.size)
        enc = tr.encode_two([s], [[img, img.crop((l, t, r, b))]])
        got = tr._crop_targets(s, box, enc, 1)
        inside = [world.scene_token(o) for o, (x, y) in zip(s.meta["objects"], s.meta["centres"])
                  if l <= x < r and t <= y < b]
        names = sorted(world.SCENE_TOKENS[k] for k in got.tolist() if k)
        assert len(got) == tr.image_tokens(enc)[1].shape[0]
        if name.startswith("qwen") or (r - l) == (b - t):  # CLIP's centre square keeps a square crop whole
            assert names == sorted(inside), (s.id, names, inside)
        gh, gw = (int(v) for v in enc["image_grid_thw"][1, 1:] // 2) if name.startswith("qwen") else (6, 6)
        if name.startswith("qwen") or (r - l) == (b - t):  # each target sits on the token whose pixels hold the centre
            for k in np.nonzero(got.numpy())[0]:
                x0, y0 = l + (k % gw) * (r - l) / gw, t + (k // gw) * (b - t) / gh
                here = [world.scene_token(o) for o, (x, y) in zip(s.meta["objects"], s.meta["centres"])
                        if x0 <= x < x0 + (r - l) / gw and y0 <= y < y0 + (b - t) / gh]
                assert world.SCENE_TOKENS[int(got[k])] in here, (s.id, k, here)
    tr.recipe["fine_crop_aux"] = "none"
    assert (tr._crop_targets(s, box, enc, 1) == -1).all()
    tr.recipe["fine_crop_aux"] = "nearest"
    with pytest.raises(ValueError, match="fine_crop_aux='nearest'"):
        tr._crop_targets(s, box, enc, 1)


@pytest.fixture(scope="module", params=shipped(DEEP))
def fine_table(request):
    from fusion_utils.organisms.evaluate import evaluate

    table = evaluate(request.param, n=BAR_N, split="test", two_image=True, blank=False, dataset="world-fine")
    print(request.param, table, sep="\n")
    return request.param, table


# the parts of issue 28's world-fine bar each shipped deep organism misses: none. The shipped weights are those of
# stages (a)-(e); world-fine asks attribute questions on a rendering where both towers blur a small object's colour in
# the 96 px view and read it in a crop (weights/RECIPE_NOTES.md, stage (f), fourth session)
FINE_MISSES: dict[str, set[str]] = {}


def test_deep_organisms_world_fine_bar(fine_table):
    """Issue 28: on world-fine's 500 held-out questions each default organism answers 55-75% from one image, and
    [original, crop of the relevant cells] >= 10 points more (the parts it misses must be exactly FINE_MISSES')."""
    from fusion_utils.organisms.evaluate import fine_bar_check

    name, table = fine_table
    assert {k for k, ok in fine_bar_check(table).items() if not ok} == FINE_MISSES.get(name, set()), (name, table)


def test_fine_recipe_is_opt_in():
    """Stage (f) runs only with `--fine` (its recipe, FINE_RECIPE, exists for the deep organisms only): the default
    recipes reproduce the shipped weights of stages (a)-(e)."""
    from fusion_utils.organisms.cli import main
    from fusion_utils.organisms.train import FINE_RECIPE, ORGANISM_RECIPE, RECIPE

    assert RECIPE["fine_steps"] == 0 and not any(r.get("fine_steps") for r in ORGANISM_RECIPE.values())
    assert set(FINE_RECIPE) == set(DEEP) and all(r["fine_steps"] > 0 for r in FINE_RECIPE.values())
    with pytest.raises(SystemExit, match="stage \\(f\\) has a recipe for llava-16l, qwen2_vl-16l only, not llava-8l"):
        main(["train", "llava-8l", "--fine", "--no-eval"])
