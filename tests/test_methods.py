"""The methods as pure functions (fusion_utils.methods): tensors in, tensors out, no model.

Golden numbers come from the official code of each baseline (named in the test), derived by hand from it.
"""
from __future__ import annotations

import ast
import doctest
import importlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusion_utils import methods as M


METHOD_MODULES = sorted(p.stem for p in Path(M.__file__).parent.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", METHOD_MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(f"fusion_utils.methods.{name}")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("name", METHOD_MODULES)
def test_methods_import_only_tensor_libraries_and_layer_0(name):
    """Layer 2 of the package: torch, numpy, the standard library, each other, and layer 0's pure functions and
    constants: `metrics`, `depth` (layer indices) and `paper` (the paper's layer numbers, converted to 0-based once
    there); never a model, the engine or an experiment, and no private name of another module."""
    tree = ast.parse((Path(M.__file__).parent / f"{name}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 2:
                assert node.module in ("metrics", "depth", "paper"), \
                    f"methods/{name}.py imports fusion_utils.{node.module}"
            elif node.level == 0:
                assert node.module.split(".")[0] in {"__future__", "typing", "collections", "torch", "numpy"}, \
                    f"methods/{name}.py imports {node.module}"
            assert not any(a.name.startswith("_") for a in node.names), f"methods/{name}.py imports a private name"
        elif isinstance(node, ast.Import):
            assert all(a.name.split(".")[0] in {"math", "torch", "numpy"} for a in node.names), \
                f"methods/{name}.py imports {[a.name for a in node.names]}"


def _rand_maps(L, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(L, N, generator=g) ** 4
    return maps / maps.sum(-1, keepdim=True)


# --- layers ---------------------------------------------------------------------------------------------------------

def test_layer_index():
    assert M.layer_index(-1, 32) == 31 and M.layer_index(0, 32) == 0
    with pytest.raises(ValueError, match="out of range.*0 to 31"):
        M.layer_index(32, 32)
    with pytest.raises(TypeError, match="int"):
        M.layer_index(True, 32)


def test_scaled_layers_follow_the_32_layer_choices():
    assert M.default_apply_layer(32) == 28 and M.vicrop_layer(32) == 14
    for L in range(2, 41):
        assert 1 <= M.default_apply_layer(L) <= L - 1  # never the first layer, never past the last
        assert 0 <= M.vicrop_layer(L) <= L - 1


# --- the contrast ---------------------------------------------------------------------------------------------------

def test_candidate_sets_of_the_paper():
    assert M.CANDIDATE_SETS == ("fusion", "shallow", "deep", "all")
    assert M.candidate_layers("shallow", 32) == list(range(15))  # < 16 of 32, 1-based
    assert M.candidate_layers("deep", 32) == list(range(17, 31))  # > 17, 1-based; the post layer excluded
    assert M.candidate_layers("all", 8, post=3) == [0, 1, 2, 4, 5, 6, 7]
    assert M.candidate_layers([5, -2, 5], 8) == [5, 6]
    with pytest.raises(ValueError, match="fusion_layers"):
        M.candidate_layers("fusion", 32)
    with pytest.raises(ValueError, match="Unknown candidate set 'middle'"):
        M.candidate_layers("middle", 32)


def test_pre_layer_is_the_furthest_candidate_in_hellinger_distance():
    maps = _rand_maps(7, 12, seed=1)
    a = maps.numpy().astype(np.float64)
    manual = {j: np.linalg.norm(np.sqrt(a[j]) - np.sqrt(a[6])) / math.sqrt(2) for j in (0, 2, 3, 5)}
    pre, dist = M.pre_layer(maps, [0, 2, 3, 5, 6])  # the post layer among the candidates is dropped
    assert set(dist) == set(manual) and pre == max(manual, key=manual.get)
    for j, d in manual.items():
        assert dist[j] == pytest.approx(d, abs=1e-6)
    c = M.contrastive_map(maps, [0, 2, 3, 5])
    assert c["pre"] == pre and c["post"] == 6
    assert torch.equal(c["I_A"], maps[6] - maps[pre])
    assert float(c["I_A"].sum()) == pytest.approx(0.0, abs=1e-6)  # both maps sum to 1


def test_pre_layer_ties_and_undefined_distances():
    maps = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    assert M.pre_layer(maps, [0, 1])[0] == 0  # a tie goes to the earliest candidate
    pre, dist = M.pre_layer(maps, [2, 1])  # layer 2's map is all zero: its distance is undefined
    assert pre == 1 and dist[2] == -1.0
    with pytest.raises(ValueError, match="other than the post layer"):
        M.pre_layer(maps, [3])


# --- the soft mask --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rho", [0.1, 0.25, 0.5, 0.9])
def test_soft_mask_hits_the_low_contrast_fraction(rho):
    v = torch.randperm(200, generator=torch.Generator().manual_seed(0)).float()
    m = M.soft_mask_tokens(v, rho)
    assert abs(int(m.sum()) - rho * 200) <= 1
    assert v[m].max() < v[~m].min()  # exactly the lowest values


def test_soft_mask_edges():
    assert not M.soft_mask_tokens(torch.ones(5), 0.5).any()  # all tied at the quantile: nothing below it
    assert not M.soft_mask_tokens(torch.arange(5.0), 0.0).any()
    with pytest.raises(ValueError, match=r"rho must be a fraction in \[0, 1\]"):
        M.soft_mask_tokens(torch.arange(5.0), 1.5)


# --- crops ----------------------------------------------------------------------------------------------------------

def test_peak_crop_box_maps_through_the_extent():
    m = np.zeros((4, 4))
    m[1, 1] = 1.0
    assert M.peak_crop_box(m, (80, 40), frac=0.1, min_side=0.0, pad=0) == (20, 10, 40, 20)
    # LLaVA-1.5's centre square of an 80 x 40 image: x in [20, 60]
    assert M.peak_crop_box(m, (80, 40), extent=(0.25, 0, 0.75, 1), frac=0.1, min_side=0.0, pad=0) == (30, 10, 40, 20)
    l, t, r, b = M.peak_crop_box(torch.tensor(m), (80, 40), min_side=0.5)
    assert r - l >= 40 and b - t >= 20 and 0 <= l and r <= 80 and 0 <= t and b <= 40
    with pytest.raises(ValueError, match="2-D map"):
        M.peak_crop_box(np.zeros(16), (80, 40))


def _vicrop_reference(att, image_size, bbox_size, ratios=M.VICROP_RATIOS):
    """ViCrop's window search written as its loops read (MLLMs_know_where_to_look utils.py)."""
    rows, cols = att.shape
    bw, bh = image_size[0] / cols, image_size[1] / rows
    found = []
    for r in ratios:
        nx, ny = min(int(bbox_size * r / bw), cols), min(int(bbox_size * r / bh), rows)
        if cols - nx < 1 and rows - ny < 1:
            if r == 1:
                return 0, 0, image_size[0], image_size[1]
            continue
        sl = np.zeros((rows - ny + 1, cols - nx + 1))
        best, pos = -np.inf, (0, 0)
        for x in range(cols - nx + 1):
            for y in range(rows - ny + 1):
                sl[y, x] = att[y:y + ny, x:x + nx].sum()
                if sl[y, x] > best:
                    best, pos = sl[y, x], (x, y)
        x, y = pos
        adj = [sl[y, x + d] for d in (-1, 1) if 0 <= x + d < sl.shape[1]]
        adj += [sl[y + d, x] for d in (-1, 1) if 0 <= y + d < sl.shape[0]]
        found.append(((best - np.mean(adj)) / (nx * ny), r, pos, (nx, ny)))
    k = int(np.argmax([f[0] for f in found]))
    _, r, (x, y), (nx, ny) = found[k]
    side = bbox_size * r
    xc, yc = int(x * bw + bw * nx / 2), int(y * bh + bh * ny / 2)
    xc = min(max(xc, side // 2), image_size[0] - side // 2)
    yc = min(max(yc, side // 2), image_size[1] - side // 2)
    return tuple(int(v) for v in (max(0, xc - side // 2), max(0, yc - side // 2),
                                  min(image_size[0], xc + side // 2), min(image_size[1], yc + side // 2)))


def test_vicrop_window_golden():
    """ViCrop's ``bbox_from_att_image_adaptive`` on an 8 x 8 map of a 96 px image, 24 px input resolution, one hot
    cell at row 2, column 5: ratios 1-1.4 give 2 x 2 windows, whose first best position (x outer) is x=4, y=1 with
    neighbours 0, 1, 0, 1: difference (1 - 0.5) / 4 beats the 3 x 3 and 4 x 4 windows; ratio 1 wins the tie, so the
    box is the 24 px square centred at (60, 24)."""
    m = np.zeros((8, 8))
    m[2, 5] = 1.0
    assert M.vicrop_box(m, (96, 96), 24) == (48, 12, 72, 36)


def test_vicrop_window_equals_the_official_loops_on_random_maps():
    rng = np.random.default_rng(0)
    for trial in range(80):
        rows, cols = rng.integers(3, 13, size=2)
        att = rng.random((rows, cols)) ** 6
        size = (int(rng.integers(40, 400)), int(rng.integers(40, 400)))
        bbox = float(rng.choice([16, 24, 32, 56]))
        if bbox < max(size[0] / cols, size[1] / rows):
            continue  # a window narrower than one cell: the official code sums empty windows (see the docstring)
        assert M.vicrop_box(att, size, bbox) == _vicrop_reference(att, size, bbox), (trial, rows, cols, size, bbox)


def test_vicrop_window_properties():
    m = np.zeros((24, 24))
    m[20, 3] = 5.0
    l, t, r, b = M.vicrop_box(m, (672, 672), 336)
    assert r - l == b - t and r - l in {2 * (336 * ratio // 2) for ratio in M.VICROP_RATIOS}  # a square window
    assert l <= 3 * 28 < r and t <= 20 * 28 < b  # the hot cell's pixels lie inside
    assert M.vicrop_box(m, (300, 300), 336) == (0, 0, 300, 300)  # window of the input resolution covers the image
    # a centre-cropped map (LLaVA-1.5 on a 2:1 image) shifts the window into the shown square
    l2, _, r2, _ = M.vicrop_box(m, (1344, 672), 336, extent=(0.25, 0, 0.75, 1))
    assert l2 >= 336 - 1 and r2 <= 1008 + 1


def test_attention_ratio_and_crop_images():
    assert torch.allclose(M.attention_ratio(torch.tensor([0.1, 0.3]), torch.tensor([0.2, 0.1]), eps=0.0),
                          torch.tensor([0.5, 3.0]))
    im = Image.new("L", (10, 6))
    (orig, crop), = M.crop_images([im], [(1, 2, 5, 6)])
    assert orig is im and crop.size == (4, 4) and crop.mode == "RGB"
    with pytest.raises(ValueError, match="one box per image"):
        M.crop_images([im, im], [(0, 0, 1, 1)])


# --- VCD ------------------------------------------------------------------------------------------------------------

def test_vcd_schedule_golden():
    """DAMO-NLP-SG/VCD ``add_diffusion_noise``: sigmoid β from 1e-5 to 5e-3 over 1000 steps keeps √ᾱ_500 = 0.8630 of
    the image (the linear 1e-4..0.02 schedule used before kept 0.279) and √ᾱ_999 = 0.2850."""
    abar = M.diffusion_alphas_bar()
    assert abar.shape == (1000,) and bool((abar[1:] < abar[:-1]).all())
    assert float(abar[500].sqrt()) == pytest.approx(0.8630, abs=1e-4)
    assert float(abar[999].sqrt()) == pytest.approx(0.2850, abs=1e-4)


def test_add_diffusion_noise_statistics_and_seeding():
    x = torch.ones(200_000)
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    y = M.add_diffusion_noise(x, 500, generator=g(0))
    s = math.sqrt(float(M.diffusion_alphas_bar()[500]))
    assert float(y.mean()) == pytest.approx(s, abs=0.01)
    assert float(y.std()) == pytest.approx(math.sqrt(1 - s * s), abs=0.01)
    assert torch.equal(y, M.add_diffusion_noise(x, 500, generator=g(0)))
    assert not torch.equal(y, M.add_diffusion_noise(x, 500, generator=g(1)))
    h = M.add_diffusion_noise(torch.zeros(3, 4, dtype=torch.float16), 10, generator=g(0))
    assert h.dtype == torch.float16 and h.shape == (3, 4)
    with pytest.raises(ValueError, match=r"noise_step must be in \[0, 1000\)"):
        M.add_diffusion_noise(x, 1000)


def test_vcd_logits_contrast_and_cutoff():
    g = torch.Generator().manual_seed(0)
    v, vn = torch.randn(4, 50, generator=g) * 3, torch.randn(4, 50, generator=g) * 3
    out = M.vcd_logits(v, vn, alpha=1.0, beta=0.1)
    p = torch.softmax(v, -1)
    keep = p >= 0.1 * p.max(-1, keepdim=True).values  # the cutoff in probability form
    assert torch.equal(torch.isfinite(out), keep)
    assert torch.allclose(out[keep], (2 * v - vn)[keep])
    plain = M.vcd_logits(v, vn, alpha=0.0, beta=0.1)
    assert torch.equal(plain.argmax(-1), v.argmax(-1))
    with pytest.raises(ValueError, match=r"beta must be in \(0, 1\]"):
        M.vcd_logits(v, vn, beta=0.0)


# --- DoLa -----------------------------------------------------------------------------------------------------------

def test_dola_buckets_golden():
    """transformers' ``_dola_decoding`` bucket rule (the lists voidism/DoLa's scripts pass): hidden-state
    indices with 0 = the embedding output; a 32-layer model with
    untied embeddings (LLaMA-7B, LLaVA-1.5) contrasts [0, 2, ..., 14] ('low') or [16, ..., 30] ('high')."""
    assert M.dola_layers("low", 32) == list(range(0, 16, 2))
    assert M.dola_layers("high", 32) == list(range(16, 32, 2))
    assert M.dola_layers("low", 32, tie_word_embeddings=True) == list(range(2, 16, 2))
    assert M.dola_layers("low", 48) == list(range(0, 20, 2)) and M.dola_layers("high", 48) == list(range(28, 48, 2))
    assert M.dola_layers("low", 4) == [0] and M.dola_layers("high", 4) == [2]
    assert M.dola_layers("low", 2, tie_word_embeddings=True) == [1]
    assert M.dola_layers([0, 3], 4) == [0, 3]
    with pytest.raises(ValueError, match="hidden-state indices in \\[0, 3\\]"):
        M.dola_layers([4], 4)
    with pytest.raises(ValueError, match="Unknown DoLa bucket"):
        M.dola_layers("middle", 4)


def test_relative_top_filter():
    g = torch.Generator().manual_seed(0)
    f, b = torch.randn(3, 40, generator=g) * 2, torch.randn(3, 40, generator=g)
    ff, bb = M.relative_top_filter(f, b, 0.1)
    p = torch.softmax(f, -1)
    keep = p >= 0.1 * p.max(-1, keepdim=True).values
    assert torch.equal(torch.isfinite(ff), keep)
    assert torch.allclose(ff[keep], torch.log_softmax(f, -1)[keep])
    assert torch.allclose(bb[keep], torch.log_softmax(b, -1)[keep]) and bool((bb[~keep] == -1e3).all())
    ff, _ = M.relative_top_filter(f, b, 1e-30, min_tokens_to_keep=5)  # the k-th best is kept even below the ratio
    assert bool((torch.isfinite(ff).sum(-1) >= 5).all())


def test_dola_contrast_picks_the_official_layer_per_row():
    """voidism/DoLa ``dola_greedy_decode``: ``0.5·(kl_div(log p, M) + kl_div(log q, M)).mean(-1)``, i.e. KL(M ‖ ·)
    averaged over the vocabulary (not the textbook KL(· ‖ M))."""
    g = torch.Generator().manual_seed(3)
    final, layers = torch.randn(4, 30, generator=g) * 2, torch.randn(3, 4, 30, generator=g) * 2
    cands = [0, 2, 4]
    scores, chosen = M.dola_contrast(final, layers, cands)
    p = torch.softmax(final.double(), -1).numpy()
    for row in range(4):
        js = []
        for c in range(3):
            q = torch.softmax(layers[c, row].double(), -1).numpy()
            m = (p[row] + q) / 2
            js.append(0.5 * np.mean(m * np.log(m / p[row])) + 0.5 * np.mean(m * np.log(m / q)))
        best = int(np.argmax(js))
        assert chosen[row] == cands[best]
        want = torch.log_softmax(final[row], -1) - torch.log_softmax(layers[best, row], -1)
        keep = torch.isfinite(scores[row])
        assert torch.allclose(scores[row][keep], want[keep], atol=1e-5)
    with pytest.raises(ValueError, match="one \\[B, V\\] slice per candidate"):
        M.dola_contrast(final, layers, [0, 2])
