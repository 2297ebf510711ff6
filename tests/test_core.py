"""Invariants of the intervention core, on tiny random instances of all six architectures."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fusion_utils import CaptureAttention, Knockout, MaskImage, ScaleImage, intervene, load_model
from fusion_utils.engine.sweeps import early_exit_logits, masking_sweep
from fusion_utils.testing import TINY_ARCHS, sample_images, tiny_model_dir

QUESTIONS = ["what is the color of the object ?", "what shape is it ?"]


@pytest.fixture(scope="module", params=TINY_ARCHS)
def lm(request):
    torch.manual_seed(0)
    return load_model(tiny_model_dir(request.param))


def _batch(lm, images, questions=QUESTIONS):
    return lm.prepare(list(zip(images, questions)))


@pytest.fixture(scope="module")
def images():
    return sample_images(2, seed=0)  # different sizes / aspect ratios


@pytest.fixture(scope="module")
def other_images():
    return sample_images(2, seed=1)


def _logits(lm, batch):
    with torch.no_grad():
        return lm.model(**batch.inputs).logits.float()


def test_positions_found_by_id(lm, images):
    b = _batch(lm, images)
    ids = b.inputs["input_ids"]
    for i in range(b.size):
        assert torch.equal(b.image_positions[i], torch.nonzero(ids[i] == lm.image_token_id).flatten())
        assert sum(g.n_tokens for g in b.grids[i]) == len(b.image_positions[i])
    if lm.spec.grid in ("merged_thw", "anyres"):
        assert b.n_image_tokens[0] != b.n_image_tokens[1]  # dynamic resolution: per-sample positions
    for g in (g for per in b.grids for g in per):
        assert g.spatial == (lm.spec.grid != "none")
        idx = np.concatenate([v.indices().ravel() for v in g.views])
        assert len(np.unique(idx)) == len(idx) and idx.max() < g.n_tokens


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("size", [(96, 48), (40, 88), (50, 50)])
def test_processed_extent_matches_the_processor(size, pad):
    """`processed_extent` (what part of the image a CLIP-style square grid shows) agrees with the processor's own
    pixels: a probe image whose red / green channels ramp with x / y, read back at output pixel centres."""
    from transformers import LlavaImageProcessor

    from fusion_utils.adapters import processed_extent

    W, H = size
    ip = LlavaImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_pad=pad,
                             do_normalize=False, do_rescale=False)
    x = (np.arange(W) + 0.5) / W  # pixel centres as fractions
    y = (np.arange(H) + 0.5) / H
    probe = np.zeros((H, W, 3), np.float64)
    probe[..., 0], probe[..., 1] = 255 * x[None, :], 255 * y[:, None]
    out = ip(images=Image.fromarray(probe.round().astype(np.uint8)), return_tensors="pt")["pixel_values"][0].numpy()
    left, top, right, bottom = processed_extent(ip, W, H)
    S = out.shape[-1]
    centres = (np.arange(S) + 0.5) / S
    xs, ys = left + (right - left) * centres, top + (bottom - top) * centres  # predicted image fractions
    cols = (xs > 0.1) & (xs < 0.9)
    rows = (ys > 0.1) & (ys < 0.9)
    assert cols.sum() > 8 and rows.sum() > 8
    mid_r, mid_c = int(np.flatnonzero(rows).mean()), int(np.flatnonzero(cols).mean())
    np.testing.assert_allclose(out[0, mid_r, cols] / 255, xs[cols], atol=0.03)
    np.testing.assert_allclose(out[1, rows, mid_c] / 255, ys[rows], atol=0.03)
    if W != H and not pad:  # centre crop: the long side is cut to the short one
        assert (right - left) * W == pytest.approx((bottom - top) * H, rel=0.05) and min(left, top) >= 0
    if W != H and pad:  # padding: the short side extends beyond the image
        assert min(left, top) < 0 and max(right, bottom) > 1


def test_grid_extent_relevance_and_crop(lm):
    """On every architecture, a 2:1 image: the primary view's extent is the part of the picture its tokens show
    (LLaVA / VipLLaVA's centre crop: the middle half; the others: the whole image). A relevant region the view cannot
    see has zero relevance, one it fully sees has relevance 1, and a crop from a corner token lands in its extent."""
    image = sample_images(1, seed=3)[0].resize((96, 48))
    b = lm.prepare([(image, QUESTIONS[0])])
    g = b.grids[0][0]
    if not g.spatial:
        assert g.relevance(np.ones((4, 4), bool)) is None
        return
    v = g.primary
    centre_crop = lm.spec.grid == "square" and bool(getattr(lm.processor.image_processor, "do_center_crop", False))
    expect = (0.25, 0.0, 0.75, 1.0) if centre_crop else (0.0, 0.0, 1.0, 1.0)
    np.testing.assert_allclose(v.extent, expect, atol=0.02)
    outside = np.zeros((8, 8), bool)
    outside[:, :1] = True  # the image's left eighth
    inside = np.zeros((8, 8), bool)
    inside[:, 2:6] = True  # its middle half
    rel_out = g.relevance(outside)[v.indices().ravel()]
    rel_in = g.relevance(inside)[v.indices().ravel()]
    if centre_crop:
        assert np.all(rel_out == 0) and np.allclose(rel_in, 1.0)
    else:
        assert rel_out.max() > 0 and 0 < rel_in.mean() < 1
    from fusion_utils.experiments.contrastive import crop_box

    values = np.zeros(g.n_tokens)
    values[v.indices()[0, 0]] = 1.0  # top-left token of the primary view
    l, t, r, _ = crop_box(values, g, image.size, frac=0.01, min_side=0.0, pad=0)
    assert l == pytest.approx(v.extent[0] * 96, abs=1) and t == 0 and r <= (v.extent[0] + 0.5) * 96


def test_noop_intervention_equals_plain(lm, images):
    b = _batch(lm, images)
    plain = _logits(lm, b)
    with intervene(lm, b):
        same = _logits(lm, b)
    with intervene(lm, b, ScaleImage(1, 1.0), Knockout(2, "question", "last")) as _:
        pass  # installed and removed without a forward
    torch.testing.assert_close(same, plain, rtol=0, atol=0)
    with intervene(lm, b, ScaleImage(1, 1.0)):
        scaled = _logits(lm, b)
    torch.testing.assert_close(scaled, plain)
    assert _logits(lm, b).equal(plain)  # removed after the block


def test_removed_after_exception(lm, images):
    b = _batch(lm, images)
    plain = _logits(lm, b)
    impl = lm.decoder.config._attn_implementation
    with pytest.raises(KeyError):
        with intervene(lm, b, MaskImage(0, "knockout"), MaskImage(1, "zero"), CaptureAttention()):
            raise KeyError("boom")
    assert lm.decoder.config._attn_implementation == impl
    assert all(not layer._forward_pre_hooks for layer in lm.layers)
    assert _logits(lm, b).equal(plain)


@pytest.mark.parametrize("mode", ["knockout", "zero"])
def test_full_mask_makes_answer_independent_of_pixels(lm, images, other_images, mode):
    if lm.spec.grid in ("merged_thw", "anyres"):
        other_images = [im.resize(images[i].size) for i, im in enumerate(other_images)]  # same token count
    b1, b2 = _batch(lm, images), _batch(lm, other_images)
    plans = [MaskImage(j, "knockout") for j in range(lm.num_layers)] if mode == "knockout" else [MaskImage(0, "zero", onward=True)]
    with intervene(lm, b1, *plans):
        l1 = _logits(lm, b1)[:, -1]
    with intervene(lm, b2, *plans):
        l2 = _logits(lm, b2)[:, -1]
    assert not torch.allclose(_logits(lm, b1)[:, -1], _logits(lm, b2)[:, -1])  # the image matters unmasked
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)


def test_capture_equals_eager_attention_rows(lm, images):
    b = _batch(lm, images)
    with intervene(lm, b, CaptureAttention()) as run:
        _logits(lm, b)
    maps = run.attention
    assert maps.values.dtype == torch.float32
    assert maps.values.shape[:3] == (2, lm.num_layers, lm.text_config.num_attention_heads)
    lm.set_attention("eager")
    try:
        with torch.no_grad():
            out = lm.model(**b.inputs, output_attentions=True)
    finally:
        lm.set_attention("sdpa")
    attentions = out.attentions if hasattr(out, "attentions") else out.language_model_outputs.attentions
    att = torch.stack([a.float() for a in attentions[-lm.num_layers:]], dim=1)  # decoder layers: [B, L, H, S, S]
    for i in range(2):
        ref = att[i, :, :, -1, b.image_positions[i]]
        got = maps.values[i, :, :, : b.n_image_tokens[i]]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
        assert torch.isnan(maps.values[i, :, :, b.n_image_tokens[i]:]).all()
    hm = maps.head_mean()
    torch.testing.assert_close(hm.nansum(-1), torch.ones(2, lm.num_layers))


@pytest.mark.parametrize("mode,window", [("zero", 1), ("knockout", 1), ("zero", 3), ("knockout", 3)])
def test_fast_sweep_equals_naive(lm, images, mode, window):
    b = _batch(lm, images)
    fast = masking_sweep(lm, b, mode=mode, window=window)
    naive = masking_sweep(lm, b, mode=mode, window=window, method="naive")
    assert fast["layers"] == list(range(lm.num_layers))
    torch.testing.assert_close(fast["plain"], naive["plain"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast["logits"], naive["logits"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(naive["logits"][0], naive["plain"])  # masking does something


def test_sweep_chunks_and_onward(lm, images):
    b = _batch(lm, images)
    full = masking_sweep(lm, b, mode="knockout", onward=True, method="naive")
    for mode in ("zero", "knockout"):
        ref = masking_sweep(lm, b, mode=mode, method="naive", layers=[0, 2, 3])
        got = masking_sweep(lm, b, mode=mode, layers=[0, 2, 3], chunk=2)
        torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-4, atol=1e-4)
    got = masking_sweep(lm, b, mode="knockout", onward=True)
    torch.testing.assert_close(got["logits"], full["logits"], rtol=1e-4, atol=1e-4)


def test_early_exit_last_layer_is_the_model(lm, images):
    b = _batch(lm, images)
    ee = early_exit_logits(lm, b)
    assert ee.shape[0] == lm.num_layers
    torch.testing.assert_close(ee[-1], _logits(lm, b)[:, -1], rtol=1e-5, atol=1e-5)


def test_interventions_act_during_generate(lm, images):
    b = _batch(lm, images)
    n_new = 3
    gen = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    with intervene(lm, b, *[MaskImage(j, "knockout") for j in range(lm.num_layers)], CaptureAttention(steps="all")) as run:
        with torch.no_grad():
            out = lm.model.generate(**b.inputs, **gen)
    maps = run.attention
    assert len(maps.steps) == n_new - 1  # one row per generated token after the first
    # generated tokens are text queries: knocked out, they give zero attention to the image at every layer
    assert torch.nan_to_num(torch.stack(maps.steps)).abs().max() == 0
    assert torch.nan_to_num(maps.values).abs().max() == 0
    # the same greedy tokens as decoding step by step under the same knockout
    ids, mask = b.inputs["input_ids"], b.inputs["attention_mask"]
    extra = {k: v for k, v in b.inputs.items() if k not in ("input_ids", "attention_mask")}
    new = out[:, ids.shape[1]:]
    with intervene(lm, b, *[MaskImage(j, "knockout") for j in range(lm.num_layers)]):
        with torch.no_grad():
            first = lm.model(**b.inputs).logits[:, -1].argmax(-1)
    assert torch.equal(first, new[:, 0])
    # zero-masking inside generate changes what is generated relative to capture-only runs when the image matters
    with intervene(lm, b, CaptureAttention()) as run2:
        with torch.no_grad():
            lm.model.generate(**b.inputs, **gen)
    assert run2.attention.values.shape[1] == lm.num_layers
    assert torch.isfinite(run2.attention.values[0, :, :, : b.n_image_tokens[0]]).all()
    del mask, extra


def _logits_masked(lm, b, plan):
    with intervene(lm, b, plan):
        return _logits(lm, b)


def test_scale_zero_equals_zero_mask(lm, images):
    b = _batch(lm, images)
    last = lm.num_layers - 1  # at the last layer the one-layer probe has nothing after it to restore
    torch.testing.assert_close(_logits_masked(lm, b, ScaleImage(last, 0.0))[:, -1],
                               _logits_masked(lm, b, MaskImage(last, "zero"))[:, -1])
    with intervene(lm, b, ScaleImage(1, 0.0)):
        scaled = _logits(lm, b)
    tokens = [torch.arange(n) < n // 2 for n in b.n_image_tokens]
    with intervene(lm, b, ScaleImage(1, 0.1, tokens)):
        half = _logits(lm, b)
    assert not torch.allclose(half, scaled) and not torch.allclose(half, _logits(lm, b))


def test_bad_inputs_raise_one_clear_error(lm, images, tmp_path):
    b = _batch(lm, images)
    with pytest.raises(ValueError, match="out of range: this model has"):
        with intervene(lm, b, MaskImage(lm.num_layers)):
            pass
    with pytest.raises(ValueError, match="out of range"):
        masking_sweep(lm, b, layers=[-lm.num_layers - 1])
    with pytest.raises(ValueError, match="Unknown masking mode"):
        MaskImage(0, "blur")
    with pytest.raises(RuntimeError, match="already inside"):
        with intervene(lm, b, CaptureAttention()):
            with intervene(lm, b, CaptureAttention()):
                pass


def test_prompt_without_image_token(images):
    lm = load_model(tiny_model_dir("llava"))
    tok = lm.processor.tokenizer
    with pytest.raises(ValueError, match="no image token"):
        from fusion_utils.adapters import prepare

        lm.processor.chat_template, saved = "{{ messages[0]['content'][-1]['text'] }}", lm.processor.chat_template
        try:
            prepare(lm, [(images[0], "what is it ?")])
        finally:
            lm.processor.chat_template = saved
    del tok


def test_unsupported_architecture_and_remote_code(tmp_path):
    src = tiny_model_dir("llava")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "blip_2"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not supported; supported architectures are: llava"):
        load_model(bad)
    remote = tmp_path / "remote"
    shutil.copytree(src, remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_x.XConfig"}
    (remote / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load_model(remote)
    pickled = tmp_path / "pickled"
    shutil.copytree(src, pickled)
    (pickled / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no .safetensors weights"):
        load_model(pickled)
    with pytest.raises(ValueError, match="No model organism named"):
        load_model("organism:nope")


def test_fingerprint_tracks_weights(tmp_path):
    a = load_model(tiny_model_dir("llava", seed=0))
    b = load_model(tiny_model_dir("llava", seed=0))
    c = load_model(tiny_model_dir("llava", seed=1))
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_blank_image_input_types():
    lm = load_model(tiny_model_dir("llava"))
    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    b = lm.prepare([(arr, "what is it ?"), (Image.new("L", (20, 30)), "what ?")])
    assert b.size == 2
    with pytest.raises(TypeError, match="PIL image"):
        lm.prepare([("not an image", "what ?")])


def test_batched_knockout_fallback_equals_naive(lm, images):
    """The fallback used when a layer kwarg's batch dimension is ambiguous (e.g. M-RoPE tables with batch 3)."""
    from fusion_utils.engine.sweeps import knockout_sweep_batched

    b = _batch(lm, images)
    if lm.spec.injections or lm.spec.bidirectional_prefix:  # a replay would miss part of the model: it says so
        with pytest.raises(ValueError, match="method='naive'"):
            knockout_sweep_batched(lm, b, list(range(lm.num_layers)), 3, False, None)
        return
    if "sliding_attention" in (getattr(lm.text_config, "layer_types", None) or ()):
        from fusion_utils.engine.replay import Ambiguous

        with pytest.raises(Ambiguous):  # a sliding-window cache cannot be cropped and extended: masking_sweep
            knockout_sweep_batched(lm, b, list(range(lm.num_layers)), 3, False, None)  # then runs naive
        return
    with torch.no_grad():
        got = knockout_sweep_batched(lm, b, list(range(lm.num_layers)), 3, False, None)
    ref = masking_sweep(lm, b, mode="knockout", window=3, method="naive")
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-4, atol=1e-4)
