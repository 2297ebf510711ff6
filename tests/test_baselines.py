"""Baselines (ViCrop, VCD, DoLa) on tiny random instances of the architectures."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion_utils import load_model
from fusion_utils.data import load_dataset
from fusion_utils.experiments import baselines as BL
from fusion_utils.experiments.common import Decoding, answer
from fusion_utils.metrics import jensen_shannon
from fusion_utils.sweeps import early_exit_logits
from fusion_utils.testing import sample_images, tiny_model_dir

DEC = Decoding(max_new_tokens=4)


def test_vcd_alpha_zero_is_plain_greedy(lm, samples):
    plain = answer(lm, samples, decoding=DEC)
    assert BL.vcd(lm, samples, alpha=0.0, decoding=DEC) == plain
    a = BL.vcd(lm, samples, alpha=1.0, decoding=Decoding(max_new_tokens=3, do_sample=True), seed=3)
    b = BL.vcd(lm, samples, alpha=1.0, decoding=Decoding(max_new_tokens=3, do_sample=True), seed=3)
    assert a == b  # seeded sampling


def test_diffusion_noise_deterministic():
    img = sample_images(1)[0]
    a, b = BL.diffusion_noise(img, 500, seed=1), BL.diffusion_noise(img, 500, seed=1)
    assert a.size == img.size and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(BL.diffusion_noise(img, 500, seed=2)))
    assert np.array_equal(np.asarray(BL.diffusion_noise(img, 0, seed=1, beta_start=0.0, beta_end=0.0)),
                          np.asarray(img))


def test_dola_contrast_matches_hand_computation(lm, samples):
    L = lm.num_layers
    cands = BL.dola_layers("low", L) + BL.dola_layers("high", L)
    _, details = BL.dola(lm, samples, layers=cands, decoding=DEC, return_details=True)
    got = details[0].first_scores
    batch = lm.prepare(samples)
    ee = early_exit_logits(lm, batch)  # [L, B, V]
    final = ee[-1]
    p = torch.softmax(final, -1)
    for b in range(batch.size):
        js = [float(jensen_shannon(p[b], torch.softmax(ee[j, b], -1))) for j in cands]
        j = cands[int(np.argmax(js))]
        assert details[0].premature[0][b] == j
        want = torch.log_softmax(final[b], -1) - torch.log_softmax(ee[j, b], -1)
        keep = p[b] >= 0.1 * p[b].max()
        assert torch.equal(torch.isfinite(got[b]), keep)
        # InstructBLIP's generate() builds its embeddings on another path than forward(): ~1e-4 apart
        torch.testing.assert_close(got[b][keep], want[keep], rtol=1e-3, atol=1e-3)


def test_vicrop_boxes(lm, samples):
    if lm.spec.grid == "none":
        with pytest.raises(ValueError, match="no spatial grid"):
            BL.vicrop_boxes(lm, samples)
        return
    boxes = BL.vicrop_boxes(lm, samples)
    assert boxes == BL.vicrop_boxes(lm, samples)
    for (l, t, r, b), s in zip(boxes, samples):
        assert 0 <= l < r <= s.image.size[0] and 0 <= t < b <= s.image.size[1]
    preds = BL.vicrop(lm, samples, decoding=DEC)
    assert len(preds) == len(samples) and all(isinstance(p, str) for p in preds)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_baselines_experiment(arch):
    lm = load_model(tiny_model_dir(arch))
    ds = load_dataset("world", n=3)
    res = BL.baselines(lm, ds, decoding=Decoding(max_new_tokens=3), batch_size=2, progress=False)
    r = res.records
    assert len(r) == 3 * 4 and set(r["method"]) == set(BL.METHODS)
    assert {"id", "method", "pred", "score"} <= set(r.columns)
    assert list(res.summary["method"]) == list(BL.METHODS) and res.summary["accuracy"].between(0, 1).all()


def test_baselines_rejects_vicrop_without_grid():
    lm = load_model(tiny_model_dir("instructblip"))
    with pytest.raises(ValueError, match="no spatial grid"):
        BL.baselines(lm, load_dataset("world", n=1), methods=("plain", "vicrop"), progress=False)
