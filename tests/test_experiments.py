"""The paper's experiments as library functions: end to end, resumable, and faithful to the core's invariants."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from fusion_utils import MaskImage, load_model
from fusion_utils.data import load_dataset
from fusion_utils.data.world import blank_image
from fusion_utils.experiments import EXPERIMENTS, get_experiment
from fusion_utils.experiments.common import answer, generate, run_experiment
from fusion_utils.experiments.masking import find_layers, masking
from fusion_utils.testing import tiny_model_dir

ANALYSES = ("masking", "hellinger", "early_exit", "attention")


@pytest.fixture(scope="module")
def world6():
    return load_dataset("world", n=6)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "instructblip", "llava_next"])
@pytest.mark.parametrize("name", ANALYSES)
def test_analysis_runs_end_to_end_on_tiny_models(arch, name, world6, tmp_path):
    lm = load_model(tiny_model_dir(arch))
    res = get_experiment(name)(lm, world6, out=str(tmp_path), batch_size=4, progress=False)
    assert res.run_dir and (tmp_path / name).is_dir()
    assert set(res.records["id"]) == set(world6.ids)
    assert sorted(res.summary["layer"].unique()) == list(range(lm.num_layers))
    assert res.config["model"]["fingerprint"] == lm.fingerprint
    assert res.config["dataset"]["ids"] == world6.ids
    assert "torch" in res.config["versions"] and "transformers" in res.config["versions"]


def test_same_config_same_directory_and_numbers(world6, tmp_path):
    lm = load_model(tiny_model_dir("llava"))
    a = get_experiment("hellinger")(lm, world6, out=str(tmp_path), progress=False)
    b = get_experiment("hellinger")(lm, world6, out=str(tmp_path), progress=False)
    c = get_experiment("hellinger")(lm, world6, progress=False)  # in memory
    assert a.run_dir == b.run_dir
    pd.testing.assert_frame_equal(a.summary, b.summary)
    pd.testing.assert_frame_equal(a.summary, c.summary)
    d = get_experiment("hellinger")(lm, world6, out=str(tmp_path), reference=1, progress=False)
    assert d.run_dir != a.run_dir  # another configuration never overwrites


def test_edited_package_source_gets_a_new_run_directory(world6, tmp_path, monkeypatch):
    """Run records are keyed on the package's source, so code edited without a version bump never reuses them."""
    from fusion_utils import runs

    lm = load_model(tiny_model_dir("llava"))
    a = get_experiment("hellinger")(lm, world6, out=str(tmp_path), progress=False)
    assert a.config["versions"]["fusion_utils_source"] == runs.package_source_hash()[:16]
    monkeypatch.setattr(runs, "package_source_hash", lambda: "0" * 64)
    b = get_experiment("hellinger")(lm, world6, out=str(tmp_path), progress=False)
    assert b.run_dir != a.run_dir


def test_killed_run_resumes_without_recomputing(world6, tmp_path):
    lm = load_model(tiny_model_dir("llava"))
    calls: list[list[str]] = []

    def per_batch(lm, samples):
        calls.append([s.id for s in samples])
        if len(calls) == 2 and not getattr(per_batch, "resumed", False):
            raise KeyboardInterrupt  # killed after the first batch was recorded
        return [dict(id=s.id, value=len(s.question)) for s in samples]

    config = {"experiment": "toy", "model": lm.fingerprint}
    with pytest.raises(KeyboardInterrupt):
        run_experiment("toy", lm, world6, per_batch, config=config, out=str(tmp_path), batch_size=2, progress=False)
    assert calls == [world6.ids[:2], world6.ids[2:4]]
    per_batch.resumed = True
    calls.clear()
    df = run_experiment("toy", lm, world6, per_batch, config=config, out=str(tmp_path), batch_size=2, progress=False)
    assert calls == [world6.ids[2:4], world6.ids[4:6]]  # the finished batch is not recomputed
    assert sorted(df["id"]) == sorted(world6.ids)


def test_find_layers_fusion_plateau_review():
    drops = [0.5, 0.3, 0.2, 0.0, 0.01, 0.0, 0.0, 0.02, 0.0, 0.0, 0.15, 0.0]
    s = pd.DataFrame({"layer": range(12), "drop": drops})
    f = find_layers(s, threshold=0.05, plateau_len=3)
    assert f["fusion_layers"] == [0, 1, 2] and f["plateau_start"] == 3 and f["review_layer"] == 10
    flat = pd.DataFrame({"layer": range(12), "drop": [0.4, 0.1] + [0.0] * 10})
    assert find_layers(flat, threshold=0.05)["review_layer"] is None


def test_unknown_experiment_and_bad_decode(world6):
    with pytest.raises(ValueError, match="Unknown experiment"):
        get_experiment("nope")
    lm = load_model(tiny_model_dir("llava"))
    with pytest.raises(ValueError, match="decode must be"):
        masking(lm, world6, decode="beam")
    assert set(EXPERIMENTS) >= set(ANALYSES) | {"contrastive", "baselines"}


def test_first_token_decode_matches_generate_for_one_token_answers(world6):
    lm = load_model(tiny_model_dir("llava"))
    from fusion_utils.experiments.common import Decoding

    one = Decoding(max_new_tokens=1)
    a = masking(lm, world6, decode="generate", decoding=one, progress=False).records
    b = masking(lm, world6, decode="first_token", decoding=one, progress=False).records
    assert list(a["pred"]) == list(b["pred"])


# --- on a trained organism -------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["organism:llava", "organism:qwen2_vl"])
def organism(request):
    return load_model(request.param)


@pytest.fixture(scope="module")
def held_out():
    return load_dataset("world", split="test", n=200, seed=7)


def _accuracy(preds, ds):
    return sum(p.strip().lower() == s.answers[0] for p, s in zip(preds, ds)) / len(ds)


def test_organism_no_mask_reproduces_plain_accuracy_exactly(organism, held_out):
    ds = held_out[:60]
    plain = answer(organism, ds, batch_size=20)
    res = masking(organism, ds, layers=[organism.num_layers - 1], progress=False, batch_size=20)
    assert list(res.records.sort_values("id")["plain_pred"]) == [p for _, p in sorted(zip(ds.ids, plain))]
    b = organism.prepare(list(ds)[:20])
    with torch.no_grad():
        out = organism.model.generate(**b.inputs, max_new_tokens=16, do_sample=False)
    from fusion_utils.experiments.common import decode_new

    assert generate(organism, b) == decode_new(organism, b, out)  # an empty intervention changes nothing
    assert res.summary["plain_accuracy"].iloc[0] == pytest.approx(_accuracy(plain, ds))


def test_organism_full_knockout_makes_answers_blind(organism, held_out):
    """Knocking the image out at every layer leaves the organism blind: its answers no longer depend on the pixels,
    and it loses the image's whole contribution. (A blank image is a different control: a trained organism reads it
    as an empty scene and answers confidently wrong, so the two accuracies need not agree.)"""
    full = [MaskImage(j, "knockout") for j in range(organism.num_layers)]
    blank_imgs = [blank_image()] * len(held_out)
    knocked = answer(organism, held_out, plans=full, batch_size=50)
    knocked_blank = answer(organism, held_out, images=blank_imgs, plans=full, batch_size=50)
    blank = answer(organism, held_out, images=blank_imgs, batch_size=50)
    plain = answer(organism, held_out, batch_size=50)
    acc_k, acc_b, acc_p = (_accuracy(x, held_out) for x in (knocked, blank, plain))
    assert knocked == knocked_blank
    assert acc_p - acc_b >= 0.25, (acc_p, acc_b)  # the image matters
    assert acc_p - acc_k >= 0.25, (acc_p, acc_k)  # and knockout removes it
