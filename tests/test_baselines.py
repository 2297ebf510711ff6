"""Baselines (ViCrop, VCD, DoLa) on tiny random instances of the architectures."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from fusion_utils import load_model
from fusion_utils.data import load_dataset
from fusion_utils.experiments import baselines as BL
from fusion_utils.experiments.common import Decoding, answer
from fusion_utils.methods import diffusion_alphas_bar, vicrop_box
from fusion_utils.prompts import GENERIC_PROMPT
from fusion_utils.testing import tiny_model_dir

DEC = Decoding(max_new_tokens=4)


def test_vcd_alpha_zero_is_plain_greedy(lm, samples):
    plain = answer(lm, samples, decoding=DEC)
    assert BL.vcd(lm, samples, alpha=0.0, decoding=DEC) == plain
    a = BL.vcd(lm, samples, alpha=1.0, decoding=Decoding(max_new_tokens=3, do_sample=True), seed=3)
    b = BL.vcd(lm, samples, alpha=1.0, decoding=Decoding(max_new_tokens=3, do_sample=True), seed=3)
    assert a == b  # seeded sampling


def _noise_std(clean: torch.Tensor, noised: torch.Tensor) -> float:
    abar = float(diffusion_alphas_bar()[500])
    return float((noised.float() - math.sqrt(abar) * clean.float()).std())


def test_vcd_noises_the_normalised_pixel_tensor(lm, samples):
    """VCD's ``add_diffusion_noise`` acts on the processor's output: the first half of the rows is the plain batch,
    the second half √ᾱ·x + √(1 − ᾱ)·ε with √(1 − ᾱ_500) = 0.505 (the PIL-space linear schedule left 0.96)."""
    plain = lm.prepare(samples).inputs["pixel_values"]
    batch = BL.vcd_batch(lm, samples, noise_step=500, seed=1)
    pv = batch.inputs["pixel_values"]
    n = plain.shape[0]
    assert pv.shape[0] == 2 * n and torch.equal(pv[:n], plain)
    assert not torch.equal(pv[n:], plain)
    assert _noise_std(plain, pv[n:]) == pytest.approx(math.sqrt(1 - float(diffusion_alphas_bar()[500])), rel=0.1)
    assert torch.equal(BL.vcd_batch(lm, samples, noise_step=500, seed=1).inputs["pixel_values"], pv)
    assert not torch.equal(BL.vcd_batch(lm, samples, noise_step=500, seed=2).inputs["pixel_values"][n:], pv[n:])
    if n == len(samples):  # one row per image: a sample's noise does not depend on the rest of its batch
        alone = BL.vcd_batch(lm, samples[1:2], noise_step=500, seed=1).inputs["pixel_values"]
        real = alone.shape[1] if alone.dim() == 5 else None  # LLaVA-NeXT: the batch pads its tile stacks
        assert torch.equal(alone[1][:real], pv[len(samples) + 1][:real])


def _hidden_states_and_logits(lm, batch):
    out = lm.model(**batch.inputs, output_hidden_states=True, use_cache=False)
    inner = getattr(out, "language_model_outputs", None) or out  # InstructBLIP nests its LM's outputs
    return inner.hidden_states, out.logits[:, -1].float()


@torch.no_grad()
def test_dola_follows_the_official_dola_greedy_decode(lm, samples):
    """First step of DoLa against voidism/DoLa's ``dola_greedy_decode``: premature logits ``lm_head(hidden_states[j])``
    (index 0 = the embedding output, no final norm), the model's logits as the mature ones, the layer with the
    largest ``0.5·(kl_div(log p, M) + kl_div(log q, M)).mean(-1)``, relative-top filter."""
    L = lm.num_layers
    cands = list(range(L))  # every index, the embedding output included
    _, details = BL.dola(lm, samples, layers=cands, decoding=DEC, return_details=True)
    got = details[0].first_scores
    batch = lm.prepare(samples)
    hs, final = _hidden_states_and_logits(lm, batch)
    prem = torch.stack([lm.lm_head(hs[j][:, -1]).float() for j in cands])
    p = torch.softmax(final, -1)
    for b in range(batch.size):
        js = []
        for c in range(len(cands)):
            q = torch.softmax(prem[c, b], -1)
            M = 0.5 * (p[b] + q)
            kl1 = torch.nn.functional.kl_div(torch.log_softmax(final[b], -1), M, reduction="none").mean(-1)
            kl2 = torch.nn.functional.kl_div(torch.log_softmax(prem[c, b], -1), M, reduction="none").mean(-1)
            js.append(float(0.5 * (kl1 + kl2)))
        j = cands[int(np.argmax(js))]
        assert details[0].premature[0][b] == j
        want = torch.log_softmax(final[b], -1) - torch.log_softmax(prem[j, b], -1)
        keep = p[b] >= 0.1 * p[b].max()
        assert torch.equal(torch.isfinite(got[b]), keep)
        # InstructBLIP's generate() builds its embeddings on another path than forward(): ~1e-4 apart
        torch.testing.assert_close(got[b][keep], want[keep], rtol=1e-3, atol=1e-3)
    assert BL.dola_layers("low", L, BL.tied_embeddings(lm)) == [0]  # the tiny models: 4 layers, untied


def test_vicrop_boxes(lm, samples, monkeypatch):
    if lm.spec.grid == "none":
        with pytest.raises(ValueError, match="no spatial grid"):
            BL.vicrop_boxes(lm, samples)
        return
    boxes = BL.vicrop_boxes(lm, samples)
    assert boxes == BL.vicrop_boxes(lm, samples)
    rel = BL.relative_attention(lm, samples)
    grids = lm.prepare(samples).grids
    side = BL.vicrop_resolution(lm)
    for box, r, g, s in zip(boxes, rel, grids, samples):
        l, t, rr, b = box
        assert 0 <= l < rr <= s.image.size[0] and 0 <= t < b <= s.image.size[1]
        view = g[0].primary
        assert box == vicrop_box(view.to_map(r), s.image.size, side, extent=view.extent)
    preds = BL.vicrop(lm, samples, decoding=DEC)
    assert len(preds) == len(samples) and all(isinstance(p, str) for p in preds)

    calls = []
    prepare = lm.prepare
    monkeypatch.setattr(lm, "prepare", lambda *a, **k: calls.append(k) or prepare(*a, **k))
    BL.relative_attention(lm, samples, post_prompt="Answer briefly.")
    generic = [k for k in calls if k.get("questions")]
    assert generic and generic[0]["questions"] == [GENERIC_PROMPT] * len(samples)
    assert generic[0]["post_prompt"] == "Answer briefly."  # ViCrop's generic prompt carries the post-prompt too


def test_vicrop_resolution_is_the_processors_input_size(lm):
    ip = lm.processor.image_processor
    size = getattr(ip, "crop_size", None) or getattr(ip, "size", None)
    want = size.get("height") if size is not None and size.get("height") else BL.DYNAMIC_RESOLUTION_WINDOW
    assert BL.vicrop_resolution(lm) == want


def test_summary_uses_circular_eval_on_mmbench():
    """Question 1 is right in both rotations, question 2 in one of two: CircularEval 1/2, per row 3/4."""
    df = pd.DataFrame({"id": ["1", "1000001", "2", "1000002"] * 2, "method": ["plain"] * 4 + ["vcd"] * 4,
                       "score": [1, 1, 1, 0, 1, 1, 1, 1]})
    s = BL.baselines_summary(df, "option").set_index("method")
    assert s.loc["plain", "accuracy"] == pytest.approx(0.5) and s.loc["plain", "row_accuracy"] == pytest.approx(0.75)
    assert s.loc["vcd", "accuracy"] == 1.0 and s.loc["vcd", "gain"] == pytest.approx(0.5)
    rows = BL.baselines_summary(df, "exact").set_index("method")
    assert rows.loc["plain", "accuracy"] == pytest.approx(0.75)  # other benchmarks: the row mean


def test_baselines_experiment_every_method(lm):
    """Every baseline row, recorded on each architecture (ViCrop and the crop bounds where the image tokens have a
    grid); CD's amateur is a 2-layer tiny model of the same architecture (same tokenizer)."""
    ds = load_dataset("world", n=2)
    methods = [m for m in BL.METHODS if lm.spec.spatial or m not in ("vicrop", "oracle_crop", "random_crop")]
    amateur = str(tiny_model_dir(lm.spec.model_type, num_layers=2))
    res = BL.baselines(lm, ds, methods=methods, cd_amateur=amateur, decoding=Decoding(max_new_tokens=3),
                       batch_size=2, progress=False)
    r = res.records
    assert len(r) == 2 * len(methods) and set(r["method"]) == set(methods)
    assert {"id", "method", "pred", "score", "seconds"} <= set(r.columns) and (r["seconds"] > 0).all()
    assert list(res.summary["method"]) == methods and res.summary["accuracy"].between(0, 1).all()


def test_cd_without_amateur_is_one_clear_error():
    lm = load_model(tiny_model_dir("llava"))
    with pytest.raises(ValueError, match="CD needs an amateur"):
        BL.baselines(lm, load_dataset("world", n=1), methods=("plain", "cd"), progress=False)


def test_vicrop_layers_follow_the_official_table():
    from fusion_utils.methods import VICROP_LAYERS, vicrop_layer

    assert vicrop_layer(32, "llava") == 14 and vicrop_layer(28, "qwen2_5_vl") == 22
    assert vicrop_layer(16, "llava") == 7 and vicrop_layer(16, "qwen2_vl") == 13  # the organisms: relative depth
    assert all("ATT_LAYER" in src or "as " in src for _, _, src in VICROP_LAYERS.values())


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_vicrop_tiles_high_resolution_images(arch, monkeypatch):
    """An image above 1024 px is tiled (ViCrop's ``high_res``): one relative-attention map per tile, joined."""
    from PIL import Image

    from fusion_utils.data.sample import Sample

    lm = load_model(tiny_model_dir(arch))
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (1100, 2100, 3), dtype=np.uint8))
    s = [Sample("big", big, "what is the color of the object ?", ["red"])]
    seen = []
    rel = BL.relative_attention
    monkeypatch.setattr(BL, "relative_attention", lambda lm_, ss, **k: seen.append(len(ss)) or rel(lm_, ss, **k))
    box = BL.vicrop_boxes(lm, s)[0]
    assert seen == [6]  # rows = ceil(1100 / 1024) = 2, cols = int(2 · 2100 / 1100) = 3
    l, t, r, b = box
    assert 0 <= l < r <= 2100 and 0 <= t < b <= 1100
    seen.clear()
    BL.vicrop_boxes(lm, s, high_res=False)
    assert seen == [1]


def test_baselines_rejects_vicrop_without_grid():
    lm = load_model(tiny_model_dir("instructblip"))
    with pytest.raises(ValueError, match="no spatial grid"):
        BL.baselines(lm, load_dataset("world", n=1), methods=("plain", "vicrop"), progress=False)
