"""Issue 31's image-text-to-text architectures: each tiny model places its image tokens as the released checkpoint
does (special tokens around them, tiles, rows, a global view), `prepare` maps every view to its part of the picture,
and the architectures the probe cannot apply to are refused with a reason. The invariants (no-op, knockout, capture,
sweeps, early exit, generate) run on them through the shared `lm` fixtures of test_core / test_engine."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from fusion_utils import archs
from fusion_utils.models import load_model
from fusion_utils.testing import NEW_ARCHS, sample_images, tiny_model_dir

QUESTIONS = ["What is the color of the car?", "How many people are in the picture?"]


@pytest.fixture(scope="module", params=NEW_ARCHS)
def new_lm(request):
    return load_model(tiny_model_dir(request.param))


def tokens(lm, b, row):
    return lm.processor.tokenizer.convert_ids_to_tokens(b.inputs["input_ids"][row])


def test_layout_and_special_tokens(new_lm):
    lm = new_lm
    b = lm.prepare(list(zip(sample_images(2, seed=1), QUESTIONS)))
    t = lm.spec.model_type
    for row in range(b.size):
        pos = b.image_positions[row].tolist()
        toks = tokens(lm, b, row)
        grid = b.grids[row][0]
        assert grid.n_tokens == len(pos)
        # every token of every view is an image token, and the views do not overlap
        idx = [int(k) for v in grid.views for k in v.indices().ravel()]
        assert len(set(idx)) == len(idx) and max(idx) < grid.n_tokens
        if t == "gemma3":
            assert toks[pos[0] - 1] == "<start_of_image>" and toks[pos[-1] + 1] == "<end_of_image>"
            assert pos == list(range(pos[0], pos[-1] + 1))
        elif t == "paligemma":
            first = int(b.inputs["attention_mask"][row].nonzero()[0])
            assert pos[0] == first  # the image comes first, then BOS
        elif t in ("idefics3", "smolvlm"):
            assert toks[pos[-1] - grid.primary.rows * grid.primary.cols] == "<global-img>"
            assert grid.primary.name == "global" and grid.primary.extent == (0.0, 0.0, 1.0, 1.0)
            assert sum(tok.startswith("<row_") for tok in toks) == len(grid.views) - 1
        elif t == "internvl":
            assert toks[pos[0] - 1] == "<img>" and toks[pos[-1] + 1] == "</img>"
            assert pos == list(range(pos[0], pos[-1] + 1))  # nothing between the tiles
        elif t == "mistral3":
            v = grid.primary
            assert toks.count("[IMG_BREAK]") == v.rows - 1 and toks[pos[-1] + 1] == "[IMG_END]"
            assert pos[v.cols] - pos[v.cols - 1] == 2  # a row ends in [IMG_BREAK]
        elif t == "llava_onevision":
            base, tiles = grid.views
            assert base.name == "base" and tiles.pitch == tiles.cols + 1  # each row ends in the newline
        elif t == "qwen3_vl":
            assert toks[pos[0] - 1] == "<|vision_start|>"
    with torch.no_grad():
        out = lm.model(**b.inputs)
        assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("arch", [a for a in NEW_ARCHS if archs.get_spec(a).grid.startswith("tiles")])
def test_tiles_cover_the_picture(arch):
    """Tiles of a split image each show their own part of the picture; together they cover it once."""
    lm = load_model(tiny_model_dir(arch))
    wide = sample_images(1, seed=2)[0].resize((96, 40))
    grid = lm.prepare([(wide, QUESTIONS[0])]).grids[0][0]
    tiles = [v for v in grid.views if v.name.startswith("tile")]
    assert len(tiles) > 1
    area = sum((v.extent[2] - v.extent[0]) * (v.extent[3] - v.extent[1]) for v in tiles)
    assert area == pytest.approx(1.0)
    cols = len({v.extent[0] for v in tiles})
    assert cols > len(tiles) // cols  # a wide image splits into more columns than rows


def test_spec_fields_and_families():
    for arch in NEW_ARCHS:
        spec = archs.get_spec(arch)
        assert spec.family and archs.family_of(arch) == spec.family
        assert spec.grid in ("square", "anyres", "merged_thw", "tiles_global", "tiles_thumbnail", "rows_break")
    assert archs.family_of("llava_onevision") == "llava" and archs.family_of("qwen3_vl") == "qwen"
    assert archs.family_of("nope") == ""
    assert archs.family_of("llava_next", paper=True) == "llava" and archs.family_of("qwen2_5_vl", paper=True) == "qwen"
    assert archs.family_of("llava_onevision", paper=True) == "" and archs.family_of("qwen3_vl", paper=True) == ""
    assert archs.get_spec("qwen3_vl").injections and archs.get_spec("qwen3_vl").probe_note
    assert archs.get_spec("gemma3").bidirectional_image and archs.get_spec("gemma3").probe_note
    assert "gemma3" in archs.families()["gemma"]


@pytest.mark.parametrize("model_type", ["mllama", "florence2"])
def test_refused_with_a_reason(model_type, tmp_path):
    with pytest.raises(ValueError, match="refused: .*(cross-attention|encoder-decoder)"):
        archs.get_spec(model_type)
    bad = tmp_path / model_type
    shutil.copytree(tiny_model_dir("llava"), bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = model_type
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="refused"):
        load_model(bad)


def test_cli_archs_lists_layouts_and_refusals(capsys):
    from fusion_utils.cli import main

    assert main(["archs"]) == 0
    out = capsys.readouterr().out
    for arch in NEW_ARCHS:
        assert arch in out
    assert "layout=rows_break" in out and "mllama" in out and "DeepStack" in out


@pytest.mark.parametrize("arch", sorted(archs.ARCHS))
def test_declared_paths_match_what_is_discovered(arch):
    """Every spec's decoder, LM head, attention path and image token id are what the loaded model shows."""
    lm = load_model(tiny_model_dir(arch))
    found = archs.discover(lm.model)
    spec = lm.spec
    assert found["decoder"] == spec.decoder
    assert found["lm_head"] == spec.lm_head
    assert found["attention"] == spec.attention
    assert found["image_token_id"] == lm.image_token_id
