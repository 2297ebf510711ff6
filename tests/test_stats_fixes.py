"""Issue 28's statistics fixes outside the report: MMBench's copies kept together and scored with CircularEval in
every summary, split groups, early exit independent of the batch, and the paper's layers converted in one place."""
from pathlib import Path

import pandas as pd
import pytest

from fusion_utils.data import load_dataset
from fusion_utils.data.benchmarks import load_benchmark, whole_questions
from fusion_utils.experiments.accuracy import accuracy_summary
from fusion_utils.experiments.baselines import baselines_summary
from fusion_utils.experiments.contrastive import contrastive_summary
from fusion_utils.experiments.harness import Context
from fusion_utils.experiments.layers import early_exit_batch, early_exit_summary
from fusion_utils.experiments.masking import masking_summary

FIX = Path(__file__).parent / "fixtures" / "benchmarks"


# --- MMBench: whole questions in the loader ---------------------------------------------------------------------

def test_mmbench_n_counts_whole_questions():
    ds = load_benchmark("mmbench", source=FIX / "mmbench", n=2)
    # the fixture's rows: 0, 1, 2, 1000001 (question 1's rotated copy last): n=2 reaches past row 2 for it
    assert ds.ids == ["0", "1", "1000001"] and ds.meta["n_questions"] == 2
    assert [s.group for s in ds] == ["0", "1", "1"]
    assert load_benchmark("mmbench", source=FIX / "mmbench", n=1).ids == ["0"]
    assert load_benchmark("mmbench", source=FIX / "mmbench").meta["n_questions"] == 3


def test_whole_questions_reads_on_for_copies_and_stops_when_complete():
    # two-option questions 0..4 first, then their rotated copies (the layout of VLMEvalKit's dev file)
    rows = [{"index": q + k * 1_000_000, "A": "x", "B": "y"} for k in range(2) for q in range(5)]
    read = []

    def stream():
        for r in rows:
            read.append(r["index"])
            yield r

    got = [r["index"] for r in whole_questions(stream(), 2)]
    assert got == [0, 1, 1_000_000, 1_000_001]
    assert read[-1] == 1_000_001  # stopped once both questions had both copies
    assert [r["index"] for r in whole_questions(iter(rows), 0)] == []


def test_groups_for_split():
    gqa = load_benchmark("gqa", source=FIX / "gqa")
    by_image = {}
    for s in gqa:
        by_image.setdefault(s.meta["imageId"], set()).add(s.group)
    assert all(len(g) == 1 for g in by_image.values()) and len({s.group for s in gqa}) == len(by_image) < len(gqa)
    world = load_dataset("world", n=4)
    assert [s.group for s in world] == world.ids and [s.group_key for s in world] == world.ids
    ok = load_benchmark("okvqa", source=FIX / "okvqa" / "val2014.jsonl")
    assert ok[0].group is None and ok[0].group_key == ok[0].id  # no image id: each sample its own group


def test_the_harness_splits_records_by_image_where_images_repeat():
    from fusion_utils.experiments.harness import with_split_groups
    from fusion_utils.report import verdicts

    from fusion_utils.data import Sample, SampleSet

    gqa = load_benchmark("gqa", source=FIX / "gqa")
    grouped = with_split_groups(pd.DataFrame({"id": gqa.ids, "score": 1.0}), gqa)
    assert list(grouped["split_group"]) == [s.group_key for s in gqa]
    # 60 questions on 6 images, as GQA asks them: hashing the question id alone puts images on both sides
    qs = SampleSet("gqa-like", [Sample(id=f"q{i}", image=None, question="?", answers=["a"], group=f"img{i % 6}")
                                for i in range(60)], scorer="vqa")
    records = pd.DataFrame({"id": qs.ids, "score": 1.0})

    def straddling(recs):
        dev, test = verdicts.dev_split(recs)
        assert len(dev) + len(test) == len(qs)
        return {f"img{int(i[1:]) % 6}" for i in dev["id"]} & {f"img{int(i[1:]) % 6}" for i in test["id"]}

    assert straddling(records), "the check below could not fail: use more questions per image"
    assert not straddling(with_split_groups(records, qs))
    # the world: every sample its own group, so its records (and every pinned split) are left as they were
    world = load_dataset("world", n=6)
    plain = pd.DataFrame({"id": world.ids, "score": 0.0})
    assert "split_group" not in with_split_groups(plain, world).columns


# --- MMBench: CircularEval in every summary ---------------------------------------------------------------------

def _mmbench_scores():
    ds = load_benchmark("mmbench", source=FIX / "mmbench")
    scores = [0.0 if i == "1000001" else 1.0 for i in ds.ids]  # question 1 fails on its rotated copy
    return ds, scores


def test_identical_row_scores_give_identical_accuracy_in_every_summary():
    ds, scores = _mmbench_scores()
    ctx = Context.of(ds)
    circular, row_mean = 2 / 3, 0.75
    ids = ds.ids
    con = pd.DataFrame({"id": ids, "family": None, "variant": "soft", "candidates": "fusion", "rho": 0.2, "lam": 0.1,
                        "score": scores, "plain_score": scores})
    s = contrastive_summary(con, ctx=ctx)
    assert s["accuracy"].iloc[0] == pytest.approx(circular) and s["plain_accuracy"].iloc[0] == pytest.approx(circular)
    assert s["gain"].iloc[0] == 0 and s["n"].iloc[0] == 4
    base = pd.DataFrame({"id": ids * 2, "method": ["plain"] * 4 + ["ours"] * 4, "score": scores * 2})
    b = baselines_summary(base, ctx=ctx).set_index("method")
    assert b.loc["plain", "accuracy"] == b.loc["ours", "accuracy"] == pytest.approx(circular)
    assert b.loc["ours", "gain"] == 0
    acc = accuracy_summary(pd.DataFrame({"id": ids, "family": None, "score": scores}), ctx=ctx)
    assert acc.set_index("family").loc["overall", "accuracy"] == pytest.approx(circular)
    mask = pd.DataFrame({"id": ids * 2, "mode": "zero", "layer": [0] * 4 + [1] * 4, "score": scores * 2,
                         "plain_score": scores * 2, "p_answer": 0.5, "plain_p": 0.5})
    m = masking_summary(mask, ctx=ctx)
    assert list(m["layer"]) == [0, 1] and (m["drop"] == 0).all()
    assert m["accuracy"].tolist() == m["plain_accuracy"].tolist() == pytest.approx([circular] * 2)
    ee = pd.DataFrame({"id": ids * 2, "layer": [0] * 4 + [1] * 4, "score": scores * 2, "agrees_final": True,
                       "p_final_token": 1.0})
    assert early_exit_summary(ee, ctx=ctx)["accuracy"].tolist() == pytest.approx([circular] * 2)
    # the same rows of a per-row-scored dataset give the row mean everywhere (so the test above could fail)
    assert contrastive_summary(con)["plain_accuracy"].iloc[0] == pytest.approx(row_mean)
    assert masking_summary(mask)["accuracy"].tolist() == pytest.approx([row_mean] * 2)
    assert early_exit_summary(ee, scorer="exact")["accuracy"].tolist() == pytest.approx([row_mean] * 2)


def test_contrastive_summary_keeps_its_columns_and_ablation_order():
    ds, scores = _mmbench_scores()
    rows = []
    for rho in (0.2, 0.5):
        for i, sc in zip(ds.ids, scores):
            rows.append({"id": i, "variant": "soft", "candidates": "fusion", "rho": rho, "lam": 0.1,
                         "score": 1.0 if rho == 0.5 else sc, "plain_score": sc, "ia_relevant_mass": 0.5})
    for i, sc in zip(ds.ids, scores):
        rows.append({"id": i, "variant": "crop", "candidates": "fusion", "rho": None, "lam": None, "score": sc,
                     "plain_score": sc})
    s = contrastive_summary(pd.DataFrame(rows), ctx=Context.of(ds))
    assert list(s.columns[:8]) == ["variant", "candidates", "rho", "lam", "n", "accuracy", "plain_accuracy",
                                   "ia_relevant_mass"] and s.columns[-1] == "gain"
    assert s["rho"].tolist()[:2] == [0.2, 0.5] and s["rho"].iloc[2] is None
    assert s["gain"].tolist() == pytest.approx([0.0, 1 / 3, 0.0])


# --- early exit: a sample's record does not depend on its batch ---------------------------------------------------

def _one_token_answer(lm) -> str:
    tok = lm.processor.tokenizer
    for a in ("red", "a", "1", "yes", "e"):
        if len(tok(a, add_special_tokens=False)["input_ids"]) == 1:
            return a
    pytest.fail("no one-token answer among the candidates for this tokenizer")


@pytest.fixture(scope="module", params=("llava", "qwen2_vl"))
def small_lm(request):
    # the decision is the same code for every architecture; two (a Llama and an M-RoPE decoder) keep the test short
    import torch

    from fusion_utils import load_model
    from fusion_utils.testing import tiny_model_dir

    torch.manual_seed(0)
    return load_model(tiny_model_dir(request.param))


def test_early_exit_record_is_independent_of_the_batch(small_lm, samples):
    from fusion_utils.data import Sample, SampleSet
    from fusion_utils.experiments.common import Decoding
    from fusion_utils.experiments.common import post_prompt_for

    lm = small_lm
    short = Sample("short", samples[0].image, samples[0].question, [_one_token_answer(lm)])
    long = Sample("long", samples[1].image, samples[1].question, ["a red circle on the left of the blue square"])
    ds = SampleSet("picked", [short, long], "exact")
    ctx = Context(ds, post_prompt_for(ds), Decoding(max_new_tokens=4))
    alone = pd.DataFrame(early_exit_batch(lm, [short], ctx, decode="auto"))
    mixed = pd.DataFrame(early_exit_batch(lm, [long, short], ctx, decode="auto"))
    together = mixed[mixed["id"] == "short"].reset_index(drop=True)
    # before the fix the short sample was generated in full beside the long one, and read off its first token alone
    assert (alone["decode"] == "first_token").all() and (together["decode"] == "first_token").all()
    assert (mixed.loc[mixed["id"] == "long", "decode"] == "generate").all()
    for r in (alone, together):
        assert (r["pred"] == r["first_token"]).all()
    assert alone["layer"].tolist() == together["layer"].tolist() == list(range(lm.num_layers))
    # the same answers up to padding noise: random tiny models have near-tied logits, so compare where both agree
    same = alone["first_token"] == together["first_token"]
    assert same.mean() >= 0.5 and (alone.loc[same, "score"] == together.loc[same, "score"]).all()


# --- the paper's layers: converted once ---------------------------------------------------------------------------

def test_paper_layers_are_converted_once_to_0_based():
    from fusion_utils import paper
    from fusion_utils.methods import REVIEW_LAYER_OF_32, default_apply_layer

    assert paper.paper_layer(29) == 28 and paper.paper_layer(1) == 0 and paper.paper_layers([2, 4]) == [1, 3]
    for bad in (0, 33, 2.5, True):
        with pytest.raises(ValueError, match="numbers layers 1 to 32"):
            paper.paper_layer(bad)
    assert paper.REVIEW_LAYER == paper.REVIEW_LAYER_REPORTED - 1 == 28
    assert REVIEW_LAYER_OF_32 == paper.REVIEW_LAYER and default_apply_layer(32) == 28
    assert paper.depth_fraction(paper.LATE_FROM) == 0.625 and paper.PLATEAU_FROM == paper.EARLY_EXIT_FROM == 18
    llava = paper.LAYERS["llava"]
    assert llava["review_layer"] == 28 and llava["reported"]["review_layer"] == 29
    assert llava["fusion_layers"] == [1, 3, 7, 10, 11, 12]
    assert llava["reported"]["fusion_layers"] == (2, 4, 8, 11, 12, 13)
    assert paper.FUSION_LAYERS_IF_ZERO_BASED == [2, 4, 8, 11, 12, 13] and "1-based" in paper.FUSION_BASE_NOTE
    rep = paper.reported_layers("llava")
    assert rep["review_layer"] == 28 and "0-based" in rep["label"] and paper.reported_layers("qwen2_vl") is None


def test_masking_curves_draw_the_reported_review_layer_at_its_0_based_index():
    import matplotlib

    matplotlib.use("Agg")
    from fusion_utils import paper, plots

    s = pd.DataFrame({"mode": "zero", "layer": range(32), "accuracy": 0.5, "plain_accuracy": 0.6})
    fig = plots.masking_curves({"m": s}, reported=paper.reported_layers("llava"))
    ax = fig.axes[0]
    review = [ln for ln in ax.lines if ln.get_gid() == "reported_review"]
    assert review[0].get_xdata()[0] == 28 and ax.get_xlabel() == "masked decoder layer (0-based)"
    fusion = [ln for ln in ax.lines if ln.get_gid() == "reported"]
    assert sorted(fusion[0].get_xdata()) == [1, 3, 7, 10, 11, 12]
