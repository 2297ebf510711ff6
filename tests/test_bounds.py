"""The contrastive chapter's bounds: the oracle crop (ground-truth relevant cells) and the random crop of the same size,
and each method's share of the oracle gain with a paired bootstrap CI."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fusion_utils.data import load_dataset
from fusion_utils.data.sample import Sample
from fusion_utils.data.second_images import relevant_box
from fusion_utils.experiments import baselines as BL
from fusion_utils.experiments import bounds as B
from fusion_utils.experiments.common import Decoding
from fusion_utils.methods import cells_crop_box, random_crop_box
from fusion_utils.report import baselines as RB

DEC = Decoding(max_new_tokens=2)


# --- the boxes ------------------------------------------------------------------------------------------------------

def test_oracle_box_is_the_organisms_relevant_crop_and_holds_every_relevant_cell():
    """On the world's 6 x 6 grid the paper-variant rule (pad one cell, a quarter of the image at least) gives the same
    box as the organisms' relevant crop (`second_images.relevant_box`), so the chapter's upper bound is the crop
    `organisms eval --dataset world-fine` measures."""
    ds = load_dataset("world-fine", n=40, seed=0)
    for s in ds:
        box = B.oracle_boxes([s])[0]
        assert box == relevant_box(s)
        cell = s.image.size[0] // 6
        for r, c in zip(*np.nonzero(s.relevant)):
            assert box[0] <= c * cell and (c + 1) * cell <= box[2] and box[1] <= r * cell and (r + 1) * cell <= box[3]


def test_cells_crop_box_widens_and_refuses_no_cells():
    m = np.zeros((8, 8), bool)
    m[0, 0] = True
    assert cells_crop_box(m, (160, 160), pad=0, min_side=0.5) == (0, 0, 80, 80)  # widened inside the image
    with pytest.raises(ValueError, match="at least one True cell"):
        cells_crop_box(np.zeros((6, 6), bool), (96, 96))


def test_random_box_keeps_the_size_moves_on_cells_and_is_seeded():
    like = (64, 32, 160, 128)
    boxes = [random_crop_box(like, (192, 192), (6, 6), np.random.default_rng(k)) for k in range(60)]
    assert all((b[2] - b[0], b[3] - b[1]) == (96, 96) for b in boxes)
    assert all(0 <= b[0] and b[2] <= 192 and 0 <= b[1] and b[3] <= 192 for b in boxes)
    assert all(v % 32 == 0 for b in boxes for v in b)
    assert len(set(boxes)) >= 8  # 4 x 4 positions, drawn uniformly
    ds = list(load_dataset("world-fine", n=6, seed=0))
    alone = B.random_boxes(ds[3:4], seed=5)[0]
    assert B.random_boxes(ds, seed=5)[3] == alone  # a sample's crop does not depend on its batch
    assert [B.random_boxes(ds, seed=k)[3] for k in range(20)].count(alone) < 20  # the run's seed moves it
    assert [(b[2] - b[0], b[3] - b[1]) for b in B.random_boxes(ds, seed=5)] == \
        [(b[2] - b[0], b[3] - b[1]) for b in B.oracle_boxes(ds)]


def test_bounds_refuse_a_dataset_without_relevant_cells(samples):
    """Benchmark samples carry no relevance: one sentence naming the fix, before any model runs."""
    with pytest.raises(ValueError, match="ground-truth relevant cells.*drop 'oracle_crop' and 'random_crop'"):
        B.oracle_boxes(samples)
    with pytest.raises(ValueError, match="ground-truth relevant cells"):
        B.random_crop(None, samples)
    empty = Sample("e", samples[0].image, "q", ["a"], relevant=np.zeros((6, 6), bool))
    with pytest.raises(ValueError, match="ground-truth relevant cells"):
        B.require_relevance([empty])


def test_baselines_refuse_the_bounds_on_a_benchmark():
    from fusion_utils import load_model
    from fusion_utils.testing import tiny_model_dir

    lm = load_model(tiny_model_dir("llava"))
    gqa = load_dataset("gqa", n=2, source="tests/fixtures/benchmarks/gqa")
    for m in B.BOUNDS:
        with pytest.raises(ValueError, match="which dataset 'gqa' does not mark"):
            BL.baselines(lm, gqa, methods=("plain", m), progress=False)


# --- a tiny-model run of the new rows, on every architecture ---------------------------------------------------------

def test_bound_rows_run_on_every_architecture(lm):
    ds = load_dataset("world-fine", n=2, seed=0)
    methods = ("plain", "oracle_crop", "random_crop")
    if not lm.spec.spatial:
        with pytest.raises(ValueError, match="no spatial grid"):
            BL.baselines(lm, ds, methods=methods, progress=False)
        return
    res = BL.baselines(lm, ds, methods=methods, decoding=DEC, batch_size=2, progress=False, seed=3)
    r = res.records
    assert len(r) == 6 and set(r["method"]) == set(methods) and (r["seconds"] > 0).all()
    want, boxes = B.oracle_crop(lm, list(ds), decoding=DEC, return_boxes=True)
    assert boxes == [relevant_box(s) for s in ds]
    assert r[r["method"] == "oracle_crop"]["pred"].tolist() == want
    rand = B.random_crop(lm, list(ds), seed=3, decoding=DEC)
    assert r[r["method"] == "random_crop"]["pred"].tolist() == rand
    shares = RB.oracle_shares(r)
    assert list(shares["method"]) == list(methods) and (shares["n"] == 2).all()


# --- the share of the oracle gain -------------------------------------------------------------------------------------

def synthetic(n: int, p_plain: float, p_oracle: float, share: float, seed: int = 0) -> pd.DataFrame:
    """Per question: plain right with p_plain; the oracle fixes a share of plain's misses to reach p_oracle; "half"
    keeps ``share`` of the oracle's fixes (each fix kept at random), "copy" equals the oracle, "null" equals plain."""
    rng = np.random.default_rng(seed)
    plain = (rng.random(n) < p_plain).astype(float)
    fix = (plain == 0) & (rng.random(n) < (p_oracle - p_plain) / (1 - p_plain))
    oracle = np.where(fix, 1.0, plain)
    half = np.where(fix & (rng.random(n) < share), 1.0, plain)
    ids = [f"q{i}" for i in range(n)]
    return pd.concat([pd.DataFrame({"id": ids, "method": m, "score": s})
                      for m, s in (("plain", plain), ("oracle_crop", oracle), ("half", half), ("copy", oracle),
                                   ("null", plain))])


def test_share_is_one_for_the_oracle_zero_for_plain_and_recovers_a_known_share():
    t = RB.oracle_shares(synthetic(800, 0.4, 0.8, 0.5)).set_index("method")
    assert t.loc["oracle_crop", "share"] == 1.0 and t.loc["plain", "share"] == 0.0
    assert t.loc["null", "share"] == 0.0
    assert 0.4 < t.loc["half", "share"] < 0.6 and t.loc["half", "share_hi"] - t.loc["half", "share_lo"] < 0.2
    assert bool(t["defined"].all()) and t.loc["oracle_crop", "oracle_gain_lo"] > 0.3
    # the 95% CI covers the true share about 95% of the time
    covered = 0
    for seed in range(20):
        h = RB.oracle_shares(synthetic(400, 0.4, 0.8, 0.5, seed), seed=seed).set_index("method").loc["half"]
        covered += h["share_lo"] <= 0.5 <= h["share_hi"]
    assert covered >= 16


def test_share_ci_comes_from_paired_resamples():
    """One resample of questions serves every method: a method that equals the oracle on every question has the CI
    [1, 1] and one that equals plain [0, 0]; resampling each method alone would spread both."""
    t = RB.oracle_shares(synthetic(200, 0.5, 0.7, 0.5, seed=1)).set_index("method")
    assert (t.loc["copy", "share_lo"], t.loc["copy", "share_hi"]) == (1.0, 1.0)
    assert (t.loc["null", "share_lo"], t.loc["null", "share_hi"]) == (0.0, 0.0)
    assert (t.loc["oracle_crop", "share_lo"], t.loc["oracle_crop", "share_hi"]) == (1.0, 1.0)
    # same seed, same numbers; only the questions all methods answered are used
    r = synthetic(200, 0.5, 0.7, 0.5, seed=1)
    again = RB.oracle_shares(r).set_index("method")
    pd.testing.assert_frame_equal(t, again)
    dropped = r[~((r["method"] == "half") & (r["id"] == "q0"))]
    assert int(RB.oracle_shares(dropped)["n"].iloc[0]) == 199


def test_share_is_undefined_when_the_oracle_gain_ci_holds_zero():
    """A model that a perfect crop does not help (like both organisms on `world` itself): the oracle adds about
    nothing, so no share is a ratio over noise; the table says why."""
    r = synthetic(150, 0.3, 0.3, 0.5, seed=2)
    t = RB.oracle_shares(r).set_index("method")
    assert not t["defined"].any() and t["share"].isna().all()
    assert t.loc["oracle_crop", "oracle_gain_lo"] <= 0 <= t.loc["oracle_crop", "oracle_gain_hi"]
    r["method"] = r["method"].replace({"half": "vicrop"})
    summary = BL.baselines_summary(r, "exact")
    table = RB.method_table({"m": summary}, {"m": RB.beats_baselines(r)}, {"m": RB.oracle_shares(r)}).set_index("method")
    assert table.loc["ViCrop", "m: share of the oracle gain"] == RB.SHARE_NA
    assert table.loc["ours", "m: share of the oracle gain"] == "not run"
    assert "random crop (lower bound)" not in table.index  # no model ran it
    cell = table.loc["oracle crop (upper bound)", "m: share of the oracle gain"]
    assert cell.startswith(RB.SHARE_NA) and "95% CI" in cell
    assert RB.oracle_shares(r[r["method"] != "oracle_crop"]).empty
    worse = r.copy()  # an oracle that loses: its CI lies below zero, and the cell says so
    worse.loc[worse["method"] == "oracle_crop", "score"] = 0.0
    below = RB.oracle_shares(worse).set_index("method")
    assert below.loc["oracle_crop", "oracle_gain_hi"] < 0
    assert RB.share_text(below.loc["vicrop"].to_dict() | {"method": "vicrop"}) == RB.SHARE_NA_BELOW


def test_method_table_has_the_bounds_the_share_and_the_papers_gain():
    r = synthetic(400, 0.4, 0.8, 0.5)
    r["method"] = r["method"].replace({"half": "ours", "null": "random_crop", "copy": "vicrop"})
    summary = BL.baselines_summary(r, "exact")
    v = RB.beats_baselines(r)
    assert v["best_baseline"] == "vicrop"  # the bounds are never "the best baseline"
    t = RB.method_table({"m": summary}, {"m": v}, {"m": RB.oracle_shares(r)}).set_index("method")
    assert {"oracle crop (upper bound)", "random crop (lower bound)"} <= set(t.index)
    assert t.loc["plain", "m: share of the oracle gain"] == "0 (the reference)"
    assert t.loc["oracle crop (upper bound)", "m: share of the oracle gain"].startswith("1 (the bound")
    assert t.loc["ours", "m: share of the oracle gain"].startswith("0.")
    assert t.loc["ours", "paper: gain over base (points)"] == "+2.43 to +2.82"
    assert t.loc["oracle crop (upper bound)", "paper: gain over base (points)"].startswith("none")
    assert not t.isna().any().any()
    # without the bounds in any run, the table has no bound rows and no share column
    plain_only = RB.method_table({"m": summary[~summary["method"].isin(B.BOUNDS)]}, {"m": v})
    assert not plain_only["method"].str.contains("bound").any()
    assert not any("share" in c for c in plain_only.columns)
