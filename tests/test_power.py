"""The test n chosen by power: a pilot on dev questions, the needed test n per claim, a capped draw of test questions
disjoint from dev by the verdicts' own hash, and nulls that never "reproduce" at the drawn n."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from fusion_utils import report
from fusion_utils.book import chapter
from fusion_utils.report import power, stats
from test_report import FUSION_CURVE, L, by_key, masking_records, passes


def pilot_rows(curve, n, seed=0, shuffle=False):
    recs = masking_records(curve, n=n, seed=seed, shuffle_per_sample=shuffle)
    return report.fusion_verdicts("m", "llava", power.as_pilot(recs), L)


def test_a_large_effect_needs_few_test_questions_and_no_effect_the_cap():
    big = power.choose(pilot_rows(FUSION_CURVE, 60), n_pilot=60, cap=2000)
    assert big["drawn"] < 100, big  # both claims decide at a small n
    assert all(math.isfinite(v) for v in big["needed"].values())
    # no depth structure (each sample's layers shuffled): the pilot cannot say that any n decides
    none = power.choose(pilot_rows(FUSION_CURVE, 60, shuffle=True), n_pilot=60, cap=2000)
    assert none["drawn"] > big["drawn"]
    flat = [dict(key="x", model="m", verdict="inconclusive (…; needs ∞)", needed_n=float("inf"), n=30,
                 split="dev 30 / test 30")]
    assert power.choose(flat, n_pilot=60, cap=2000)["drawn"] == 2000


def test_the_cap_binds_and_the_floor_holds():
    row = dict(key="a", model="m", verdict="inconclusive (…)", needed_n=10_000.0, n=30, split="dev 30 / test 30")
    assert power.choose([row], n_pilot=60, cap=300)["drawn"] == 300
    assert power.draw_size([3.0], cap=300, floor=40) == 40
    assert power.draw_size([None, float("nan")], cap=300, floor=40) == 40  # n/a rows ask for nothing
    with pytest.raises(ValueError, match="test_cap must be a positive integer"):
        power.draw_size([3.0], cap=0)


def test_needed_n_converts_a_pilot_build_size_into_test_questions():
    # a split rule judged 30 of 60 pilot questions and needs a 400-question build: 200 test questions
    split = dict(key="a", model="m", verdict="inconclusive", needed_n=400.0, n=30, split="dev 30 / test 30")
    assert power.needed_test_n(split, 60) == 200
    # a rule that judges every sample counts the final build's dev questions (the pilot's 60)
    every = dict(split, n=60, needed_n=400.0, split="all 60 samples (nothing is selected)")
    assert power.needed_test_n(every, 60) == 340
    # one that judges a subset (6 of 60 questions have a persistent token) needs questions, not judged samples
    subset = dict(every, n=6, needed_n=4000.0, split="all 6 samples with a persistent token (nothing is selected)")
    assert power.needed_test_n(subset, 60) == 3940
    assert power.needed_test_n(dict(split, verdict="n/a: no records"), 60) is None
    # a decided row: the n that would decide again at its effect (from the CI's width), smaller for a larger effect
    decided = dict(key="b", model="m", verdict=report.REPRODUCES, needed_n=float("nan"), n=60, value=0.3,
                   ci=(0.1, 0.5), paper_effect=0.1, split="all 60 samples (nothing is selected)")
    stronger = dict(decided, value=0.6, ci=(0.4, 0.8))
    assert 0 <= power.needed_test_n(stronger, 60) <= power.needed_test_n(decided, 60)


def test_with_power_records_pilot_needed_and_drawn_n_in_each_row():
    pw = power.choose(pilot_rows(FUSION_CURVE, 60), n_pilot=60, cap=500, floor=60)
    plain = report.fusion_verdicts("m", "llava", masking_records(FUSION_CURVE, n=120), L)
    rows = power.with_power(plain, pw)
    for r in rows:
        assert r["pilot_n"] == 60 and r["drawn_test_n"] == pw["drawn"] >= 60
        assert r["needed_test_n"] == pw["needed"][f"{r['key']} · m"]
        assert r["power"].startswith("pilot of 60 dev questions")
    from fusion_utils.report.display import verdict_rows

    saved = verdict_rows(rows, "fusion")
    assert saved[0]["drawn_test_n"] == pw["drawn"] and saved[0]["power"]
    assert power.with_power(plain[:1], None)[0].get("power") is None  # no pilot: rows unchanged


def test_dev_and_test_draws_are_disjoint_stable_and_grow_by_keeping_questions():
    a = chapter.load_split("world", 20, 30, seed=3)
    assert (a.meta["dev"], a.meta["test"]) == (20, 30) and len(a) == 50
    side = {s.id: stats.split_of(stats.split_group(s)) for s in a}
    assert sum(v == "dev" for v in side.values()) == 20
    # the rules' own split of these questions puts exactly the drawn test questions on the test side
    dev_ids, test_ids = stats.split_ids(a.ids)
    assert len(dev_ids) == 20 and len(test_ids) == 30 and not set(dev_ids) & set(test_ids)
    assert chapter.load_split("world", 20, 30, seed=3).ids == a.ids  # same seed, same questions
    assert chapter.load_split("world", 20, 30, seed=4).ids != a.ids
    b = chapter.load_split("world", 20, 80, seed=3)  # a larger cap keeps the smaller draw's questions, in order
    assert [i for i in b.ids if i in set(a.ids)] == a.ids
    pilot = chapter.load_pilot("world", 20, 3, test_cap=100)
    assert pilot.ids == [i for i in a.ids if side[i] == "dev"]  # the pilot is the dev side of every draw
    assert len(chapter.load_pilot("world", 20, 3)) == 20  # without a cap: the old build of `samples` questions


def test_check_params_names_the_fix_for_a_bad_cap():
    ok = dict(models=["organism:llava"], dataset="world", samples=8, device="cpu", dtype=None, seed=0)
    chapter.check_params(**ok, test_cap=100)
    with pytest.raises(ValueError, match="test_cap must be None or a positive integer"):
        chapter.check_params(**ok, test_cap=-3)


def test_nulls_never_reproduce_at_the_drawn_n():
    # the pilot of a null asks for the cap; at that n the null must still not reproduce
    cap = 1200
    pw = power.choose(pilot_rows(FUSION_CURVE, 60, shuffle=True), n_pilot=60, cap=cap)
    n = 60 + pw["drawn"]
    rows = report.fusion_verdicts("m", "llava", masking_records(FUSION_CURVE, n=n, seed=5, shuffle_per_sample=True),
                                  L)
    assert not passes(by_key(rows, "fusion_shallow")) and not passes(by_key(rows, "plateau"))
    # and a blind model stays n/a whatever the n
    blind = report.fusion_verdicts("m", "llava", masking_records(FUSION_CURVE, n=n, blind=True), L)
    assert all(r["verdict"].startswith(report.NA) for r in blind)
    assert np.isfinite(pw["drawn"])


@pytest.mark.parametrize("name", ["default", "evidence"])
def test_the_power_parameters_files_validate_and_build_into_their_own_folder(name):
    from pathlib import Path

    from fusion_utils.book.layout import Layout, build_name
    from fusion_utils.book.params import validate

    root = Path(__file__).resolve().parents[1]
    f = root / "book" / "params" / f"{name}.yml"
    params = validate(f, Layout(root, root, build_name(f)))  # every chapter override is a declared parameter
    caps = {c: o.get("test_cap") for c, o in params["chapters"].items() if o.get("test_cap")}
    # the default build keeps a fixed n within its time budget; the evidence build chooses n by power
    assert set(caps) == (set() if name == "default" else {"fusion", "review", "attention"})
    assert set(caps.values()) <= {2000}
    assert build_name(f) == name  # book/_build/<name>


def test_widen_draws_what_the_dev_pilot_needs_and_keeps_the_build_s_questions():
    data = chapter.load_data("world", 40, 3)
    dev = {s.id for s in data if stats.split_of(stats.split_group(s)) == "dev"}
    recs = pd.DataFrame({"id": data.ids, "x": range(40)})
    pilot = chapter.dev_pilot(recs, data)
    assert set(pilot["id"]) == dev and pilot["split_group"].str.startswith(power.PILOT_SALT).all()
    needs = [dict(key="hellinger", model="m", verdict="inconclusive (…)", needed_n=300.0, n=len(dev) // 2,
                  split="dev 10 / test 10")]
    pw, wide = chapter.widen(needs, data, 500, "world", 3)
    assert pw["drawn"] > 40 - len(dev) and pw["pilot"] == len(dev)
    assert set(data.ids) <= set(wide.ids)  # every question of the build is in the draw: its records are adopted
    side = [stats.split_of(stats.split_group(s)) for s in wide]
    assert side.count("dev") == len(dev) and side.count("test") == pw["drawn"]
    capped, small = chapter.widen(needs, data, 25, "world", 3)
    assert capped["drawn"] == 25 and len(small) == len(dev) + 25
    decided = [dict(needs[0], verdict="reproduces", needed_n=float("nan"), value=0.5, ci=(0.4, 0.6))]
    assert chapter.widen(decided, data, 500, "world", 3)[0]["drawn"] == 40 - len(dev)  # no fewer than the build's
    with pytest.raises(ValueError, match="layers_cap must be None or a positive integer"):
        chapter.check_params(models=["organism:llava"], dataset="world", samples=8, device="cpu", dtype=None, seed=0,
                             layers_cap=0)
