"""Contrastive attention (Sec. 5): the contrast, the soft mask, the crop, and the cache-reusing second pass."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import load_script
from fusion_utils.engine.replay import reusable

from fusion_utils import ScaleImage, intervene, load_model
from fusion_utils.adapters import ImageGrid, View
from fusion_utils.data import load_dataset
from fusion_utils.experiments import contrastive as C
from fusion_utils.experiments.common import Decoding, generate, gold_logprobs, gold_token_ids
from fusion_utils.metrics import hellinger
from fusion_utils.testing import tiny_model_dir

DEC = Decoding(max_new_tokens=5)


def _masks(batch, seed=0, p=0.5):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=g) < p for n in batch.n_image_tokens]


# --- pure functions --------------------------------------------------------------------------------------------------

def test_candidate_layers():
    assert C.candidate_layers("shallow", 32) == list(range(15))  # the paper's "< 16", 1-based
    assert C.candidate_layers("deep", 32) == list(range(17, 31))  # its "> 17" (1-based), post layer 31 excluded
    assert C.candidate_layers("shallow", 16) == list(range(8)) and C.candidate_layers("deep", 16) == list(range(9, 15))
    assert C.candidate_layers("all", 32) == list(range(31))
    assert C.candidate_layers("fusion", 32, [13, 2, 4, 31]) == [2, 4, 13]
    with pytest.raises(ValueError, match="fusion_layers"):
        C.candidate_layers("fusion", 32)
    with pytest.raises(ValueError, match="Unknown candidate set"):
        C.candidate_layers("middle", 32)
    with pytest.raises(ValueError, match="empty"):
        C.candidate_layers("deep", 4)


def test_contrastive_map_picks_max_hellinger():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(6, 10, generator=g) ** 4
    maps = maps / maps.sum(-1, keepdim=True)
    c = C.contrastive_map(maps, [0, 1, 2, 5], post=-1)
    d = {j: float(hellinger(maps[j], maps[5])) for j in [0, 1, 2]}
    assert set(c["hellinger"]) == {0, 1, 2}
    assert c["pre"] == max(d, key=d.get)
    for j in d:
        assert c["hellinger"][j] == pytest.approx(d[j], abs=1e-6)
    manual = (np.sqrt(maps[c["pre"]].numpy()) - np.sqrt(maps[5].numpy()))
    assert c["hellinger"][c["pre"]] == pytest.approx(np.linalg.norm(manual) / np.sqrt(2), abs=1e-6)
    assert torch.equal(c["I_A"], maps[5] - maps[c["pre"]])


def test_soft_mask_tokens():
    v = torch.arange(10.0)
    m = C.soft_mask_tokens(v, 0.2)
    assert m.dtype == torch.bool and m.tolist() == [True, True] + [False] * 8
    assert not C.soft_mask_tokens(v, 0.0).any()


def test_crop_box_inside_and_deterministic():
    grid = ImageGrid(16, (View("base", 0, 4, 4, 4),))
    vals = np.zeros(16)
    vals[5] = 1.0  # cell (1, 1)
    box = C.crop_box(vals, grid, (80, 40), frac=0.1, min_side=0.0, pad=0)
    assert box == (20, 10, 40, 20)
    box = C.crop_box(vals, grid, (80, 40))
    assert box == C.crop_box(vals, grid, (80, 40))
    l, t, r, b = box
    assert 0 <= l < r <= 80 and 0 <= t < b <= 40 and l <= 20 and r >= 40 and t <= 10 and b >= 20
    assert r - l >= 20 and b - t >= 10  # min_side 0.25
    corner = np.zeros(16)
    corner[15] = 1.0
    l, t, r, b = C.crop_box(corner, grid, (80, 40), min_side=0.5)
    assert (r, b) == (80, 40) and r - l >= 40 and b - t >= 20
    with pytest.raises(ValueError, match="no spatial grid"):
        C.crop_box(vals[:4], ImageGrid(4, (View("queries", 0, 1, 4, 4, spatial=False),)), (80, 40))


def test_crop_box_maps_cells_through_the_view_extent():
    """A centre-cropped grid (LLaVA-1.5 on an 80 x 40 image shows x in [20, 60]): its cells map into that square."""
    grid = ImageGrid(16, (View("base", 0, 4, 4, 4, extent=(0.25, 0.0, 0.75, 1.0)),))
    vals = np.zeros(16)
    vals[5] = 1.0  # cell (1, 1) -> x in [30, 40], y in [10, 20]
    assert C.crop_box(vals, grid, (80, 40), frac=0.1, min_side=0.0, pad=0) == (30, 10, 40, 20)
    padded = ImageGrid(16, (View("base", 0, 4, 4, 4, extent=(0.0, -0.5, 1.0, 1.5)),))  # 80 x 40 padded to 80 x 80
    vals = np.zeros(16)
    vals[0] = 1.0  # cell (0, 0) lies in the padding above the image: the box is clipped to the image
    l, t, r, b = C.crop_box(vals, padded, (80, 40), frac=0.1, min_side=0.0, pad=0)
    assert 0 <= l < r <= 80 and 0 <= t < b <= 40 and (l, t) == (0, 0)


# --- on the six architectures ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("soft_mask", C.SOFT_MASKS)
def test_reuse_equals_naive(lm, samples, soft_mask):
    batch = lm.prepare(samples)
    a = 2
    masks = _masks(batch)
    p1 = C.capture_first_pass(lm, batch, record_layer=a, keep_cache=True)
    assert reusable(p1.cache)  # every architecture takes the reuse path
    reuse, logits = C.soft_generate_reuse(lm, batch, p1, a, 0.1, masks, DEC, return_logits=True, soft_mask=soft_mask)
    naive, naive_logits = C.soft_generate(lm, batch, a, 0.1, masks, DEC, method="naive", soft_mask=soft_mask,
                                          return_logits=True)
    assert reuse == naive
    with torch.no_grad(), intervene(lm, batch, C.soft_mask_plan(a, 0.1, masks, soft_mask)):
        ref = lm.model(**batch.inputs).logits[:, -1].float()
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(naive_logits, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref, p1.logits)  # the mask acts
    # the first pass is reusable: a second setting from the same cache gives the naive answers too
    masks2 = _masks(batch, seed=1)
    assert C.soft_generate(lm, batch, a, 0.0, masks2, DEC, first_pass=p1, soft_mask=soft_mask) == \
        C.soft_generate(lm, batch, a, 0.0, masks2, DEC, method="naive", soft_mask=soft_mask)


def test_attention_soft_mask_acts_at_the_last_layer(lm, samples):
    """At the last layer the attention mask changes the answer logits; the hidden-state mask cannot there on a
    pre-RMSNorm decoder, since the layer's norm undoes the scale (checked on the layer's own norm at a real model's
    activation scale: tiny random models' image states are so small that the norm's ε lets some of it through)."""
    batch = lm.prepare(samples)
    last = lm.num_layers - 1
    masks = _masks(batch)
    p1 = C.capture_first_pass(lm, batch, record_layer=last, keep_cache=True)
    _, att = C.soft_generate(lm, batch, last, 0.1, masks, DEC, first_pass=p1, return_logits=True)
    assert (att - p1.logits).abs().max() > 1e-4
    norm = lm.layers[last].input_layernorm
    if type(norm).__name__.endswith("RMSNorm"):
        h = torch.randn(2, 5, lm.text_config.hidden_size, generator=torch.Generator().manual_seed(0)) * 5
        with torch.no_grad():
            torch.testing.assert_close(norm(0.1 * h), norm(h), rtol=1e-3, atol=1e-3)


def test_lambda_one_is_plain(lm, samples):
    batch = lm.prepare(samples)
    plain = generate(lm, batch, (), DEC)
    for method in ("reuse", "naive"):
        out = C.contrastive_answer(lm, samples, variant="soft", candidates="fusion", fusion_layers=[0, 1], lam=1.0,
                                   rho=0.5, apply_layer=2, decoding=DEC, method=method)
        assert [o["answer"] for o in out] == plain
        assert all(any(o["mask"]) for o in out)


def test_reuse_falls_back_to_naive_where_the_cache_cannot_be_forked(any_lm, samples):
    """Every architecture answers through `soft_generate(method="reuse")`: from the first pass's cache where it can be
    forked, else (sliding-window layers, Gemma 3) by the naive path, with the same answers."""
    lm = any_lm
    batch = lm.prepare(samples)
    masks = _masks(batch)
    p1 = C.capture_first_pass(lm, batch, record_layer=2, keep_cache=True)
    got = C.soft_generate(lm, batch, 2, 0.1, masks, DEC, first_pass=p1, return_logits=True)
    naive = C.soft_generate(lm, batch, 2, 0.1, masks, DEC, method="naive", return_logits=True)
    torch.testing.assert_close(got[1], naive[1], rtol=1e-4, atol=1e-4)
    if not reusable(p1.cache):
        assert got[0] == naive[0]


def test_contrastive_answer_runs_on_every_architecture(any_lm, samples):
    out = C.contrastive_answer(any_lm, samples, variant="soft", candidates="all", rho=0.2, lam=0.1, apply_layer=-1,
                               decoding=DEC)
    assert all(isinstance(o["answer"], str) and o["pre_layer"] in range(any_lm.num_layers - 1) for o in out)


def test_contrastive_answer_outputs(lm, samples):
    out = C.contrastive_answer(lm, samples, variant="soft", candidates="all", rho=0.2, lam=0.1, apply_layer=-1,
                               decoding=DEC)
    batch = lm.prepare(samples)
    for o, n in zip(out, batch.n_image_tokens):
        assert o["pre_layer"] in range(lm.num_layers - 1)
        assert len(o["I_A"]) == n and len(o["mask"]) == n and abs(sum(o["I_A"])) < 1e-4
        assert isinstance(o["answer"], str)
    if lm.spec.grid == "none":
        with pytest.raises(ValueError, match="soft-mask variant"):
            C.contrastive_answer(lm, samples, variant="crop", candidates="all", decoding=DEC)
        return
    crop = C.contrastive_answer(lm, samples, variant="crop", candidates="all", decoding=DEC)
    for o, s in zip(crop, samples):
        l, t, r, b = o["crop_box"]
        assert 0 <= l < r <= s.image.size[0] and 0 <= t < b <= s.image.size[1]
        assert isinstance(o["answer"], str)
    views = C.contrastive_views(lm, samples[:2], "all")
    for v, g in zip(views, [batch.grids[0][0], batch.grids[1][0]]):
        shape = (g.primary.rows, g.primary.cols)
        assert v["A_pre"].shape == v["A_post"].shape == v["I_A"].shape == shape
        np.testing.assert_allclose(v["I_A"], v["A_post"] - v["A_pre"], atol=1e-7)


# --- the experiment --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_contrastive_experiment(arch, tmp_path):
    lm = load_model(tiny_model_dir(arch))
    ds = load_dataset("world", n=3)
    res = C.contrastive(lm, ds, fusion_layers=[0, 1], apply_layer=2, candidates=("fusion", "all"), rhos=(0.2,),
                        lams=(0.1, 1.0), decoding=Decoding(max_new_tokens=3), batch_size=2, out=str(tmp_path),
                        progress=False)
    r = res.records
    assert len(r) == 3 * 2 * (2 + 1)  # samples x candidate sets x (2 soft settings + crop)
    assert {"id", "family", "variant", "candidates", "rho", "lam", "pre_layer", "pred", "score", "plain_pred",
            "plain_score", "ia_relevant_mass", "post_relevant_mass"} <= set(r.columns)
    lam1 = r[(r["variant"] == "soft") & (r["lam"] == 1.0)]
    assert (lam1["pred"] == lam1["plain_pred"]).all()
    # the gold answer's first-token log-prob: unchanged by a factor-1 mask, changed by a crop, and the plain one
    # equal to a plain forward's
    np.testing.assert_allclose(lam1["gold_logprob"], lam1["plain_gold_logprob"], atol=1e-4)
    crop = r[r["variant"] == "crop"]
    assert (crop["gold_logprob"] - crop["plain_gold_logprob"]).abs().max() > 1e-4
    batch = lm.prepare(list(ds), post_prompt=res.config["prompt"]["post_prompt"])
    with torch.no_grad():
        logits = lm.model(**batch.inputs).logits[:, -1].float()
    want = dict(zip([s.id for s in ds], gold_logprobs(logits, gold_token_ids(lm, list(ds))).tolist()))
    got = r.drop_duplicates("id").set_index("id")["plain_gold_logprob"]
    np.testing.assert_allclose([got[i] for i in want], list(want.values()), atol=1e-4)
    assert r["post_relevant_mass"].between(0, 1).all()
    s = res.summary
    assert len(s) == 2 * 3 and {"accuracy", "plain_accuracy", "gain"} <= set(s.columns)
    assert (s["gain"] == s["accuracy"] - s["plain_accuracy"]).all()
    again = C.contrastive(lm, ds, fusion_layers=[0, 1], apply_layer=2, candidates=("fusion", "all"), rhos=(0.2,),
                          lams=(0.1, 1.0), decoding=Decoding(max_new_tokens=3), batch_size=2, out=str(tmp_path),
                          progress=False)  # resumes: nothing recomputed
    assert len(again.records) == len(r)


def test_two_image_control_script_feeds_the_second_image():
    """scripts/two_image_control.py (the crop methods' control): the duplicated image reaches the model (answers
    change on the organism, which was trained with one image) and the table records the model's fingerprint."""
    # llava-8l: trained with one image per prompt
    table = load_script("two_image_control").main(["organism:llava-8l", "--n", "24"])
    row = table.iloc[0]
    assert 0 <= row["same image twice"] < row["one image"] <= 1
    assert row["cost (points)"] == round(100 * (row["one image"] - row["same image twice"]), 1)
    assert len(row["fingerprint"]) == 16 and row["n"] == 24
