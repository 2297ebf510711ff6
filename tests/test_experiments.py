"""The paper's experiments as library functions: end to end, resumable, and faithful to the core's invariants."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fusion_utils import MaskImage, load_model
from fusion_utils.data import load_dataset
from fusion_utils.data.world import blank_image
from fusion_utils.experiments import EXPERIMENTS, get_experiment
from fusion_utils.experiments.common import answer, generate, run_experiment
from fusion_utils.experiments.masking import find_layers, masking
from fusion_utils.organisms import FAST
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

@pytest.fixture(scope="module", params=[f"organism:{n}" for n in FAST])  # the 8-layer pair: machinery, not depth
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


# --- the accuracy experiment: the chapters' protocol under an image condition (the organisms' bar) ---------------

def _image_spans(row, token_id):
    """Maximal runs of ``token_id`` in a 1-D id tensor (one per image placeholder where images are delimited)."""
    hit = (row == token_id).int().tolist()
    return sum(1 for i, h in enumerate(hit) if h and (i == 0 or not hit[i - 1]))


def test_accuracy_original_is_the_plain_answer_scored_by_the_chapters_scorer(world6):
    from fusion_utils.experiments.accuracy import accuracy
    from fusion_utils.experiments.common import Decoding, post_prompt_for, score

    lm = load_model(tiny_model_dir("llava"))
    res = accuracy(lm, world6, "original", batch_size=4, progress=False)
    plain = answer(lm, world6, post_prompt=post_prompt_for(world6), decoding=Decoding(), batch_size=4)
    assert list(res.records["pred"]) == plain
    assert list(res.records["score"]) == [score(world6, p, s) for p, s in zip(plain, world6)]
    assert res.config["decoding"] == vars(Decoding()) and res.run_dir is None  # the harness's defaults, in memory
    assert set(res.records.columns) >= {"id", "family", "images", "pred", "score"}


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_accuracy_conditions_feed_the_images_they_claim(arch, world6, monkeypatch):
    """blank: a uniform grey image of the sample's size (another input); the two-image conditions: prompts with two
    image placeholders, both images' tokens found by token id, the second image the original or a crop."""
    from fusion_utils.experiments.accuracy import accuracy_batch
    from fusion_utils.experiments.harness import Context

    lm = load_model(tiny_model_dir(arch))
    ctx = Context.of(world6)
    seen = {}
    real = lm.prepare

    def spy(samples, **kw):
        seen["images"], seen["batch"] = kw.get("images"), real(samples, **kw)
        return seen["batch"]

    monkeypatch.setattr(lm, "prepare", spy)
    samples = list(world6)[:3]
    accuracy_batch(lm, samples, ctx, images="original")
    assert seen["images"] is None
    plain_pixels = seen["batch"].inputs["pixel_values"]
    accuracy_batch(lm, samples, ctx, images="blank")
    assert all(im.size == s.image.size and im.getextrema() == ((120, 120),) * 3 for im, s in zip(seen["images"], samples))
    assert not torch.equal(seen["batch"].inputs["pixel_values"], plain_pixels)
    for cond in ("same_twice", "relevant_crop", "irrelevant_crop"):
        accuracy_batch(lm, samples, ctx, images=cond)
        b = seen["batch"]
        for i, (ims, s) in enumerate(zip(seen["images"], samples)):
            assert len(ims) == 2 and ims[0].tobytes() == s.image.convert("RGB").tobytes()
            assert (ims[1].size == s.image.size) == (cond == "same_twice")
            assert b.prompts[i].count(str(lm.processor.image_token)) == 2 and len(b.grids[i]) == 2
            ids = b.inputs["input_ids"][i].cpu()
            assert int((ids == lm.image_token_id).sum()) == sum(g.n_tokens for g in b.grids[i])
            if arch == "qwen2_vl":  # <|vision_start|> ... <|vision_end|> around each image: two runs of image tokens
                assert _image_spans(ids, lm.image_token_id) == 2


def test_irrelevant_crop_is_seeded_by_dataset_position_not_batch(world6):
    """The irrelevant crop of sample i is drawn from default_rng([seed, 23, i]) with i its position in the dataset:
    the same whatever the batch size or the batch it lands in, and the same as `two_image_sets`."""
    from fusion_utils.data.second_images import images_for
    from fusion_utils.experiments.accuracy import accuracy, condition_images, dataset_position
    from fusion_utils.organisms.evaluate import two_image_sets

    lm = load_model(tiny_model_dir("llava"))
    a = accuracy(lm, world6, "irrelevant_crop", batch_size=1, progress=False).records
    b = accuracy(lm, world6, "irrelevant_crop", batch_size=4, progress=False).records
    pd.testing.assert_frame_equal(a, b)
    sets = two_image_sets(world6)["irrelevant_crop"]
    for i, s in enumerate(world6):
        assert dataset_position(world6, s) == i
        want = images_for(s, "irrelevant", np.random.default_rng([0, 23, i]))[1]
        assert condition_images(s, "irrelevant_crop", i)[1].tobytes() == want.tobytes() == sets[i][1].tobytes()


def test_accuracy_family_table_sums():
    from fusion_utils.experiments.accuracy import accuracy

    ds = load_dataset("world", n=10)
    lm = load_model(tiny_model_dir("qwen2_vl"))
    res = accuracy(lm, ds, "same_twice", batch_size=5, progress=False)
    s = res.summary.set_index("family")
    fams = s.drop(index="overall")
    assert list(fams.index) == ["attribute", "identity", "existence", "count", "spatial"]
    assert fams["n"].sum() == s.loc["overall", "n"] == len(ds)
    assert (fams["n"] * fams["accuracy"]).sum() / len(ds) == pytest.approx(s.loc["overall", "accuracy"])
    assert s.loc["overall", "accuracy"] == pytest.approx(res.records["score"].mean())


def test_accuracy_bad_condition_and_crops_without_relevant_cells(samples):
    """Non-world samples answer under `original`; the crop conditions need relevant cells and say so in one sentence."""
    from fusion_utils.data import SampleSet
    from fusion_utils.experiments.accuracy import accuracy

    lm = load_model(tiny_model_dir("llava"))
    plain_set = SampleSet("mine", samples, "vqa")
    res = accuracy(lm, plain_set, progress=False)
    assert list(res.summary["family"]) == ["overall"] and res.summary["n"].iloc[0] == len(samples)
    with pytest.raises(ValueError, match="dataset 'mine' marks none .*use 'original', 'blank' or 'same_twice'"):
        accuracy(lm, plain_set, "relevant_crop", progress=False)
    with pytest.raises(ValueError, match="Unknown image condition 'twice'"):
        accuracy(lm, plain_set, "twice", progress=False)


def test_organism_table_from_an_in_memory_model(world6):
    """`organisms.evaluate` on a (model, processor) pair: the harness's runs, one per condition, as the bar's table
    (rows per family + overall, the blank gap), and the wrapped model is the loaded one (same fingerprint)."""
    from fusion_utils.models import LoadedModel
    from fusion_utils.organisms.evaluate import evaluate

    lm = load_model(tiny_model_dir("llava"))
    assert LoadedModel.wrap(lm.model, lm.processor).fingerprint == lm.fingerprint
    lm.model.train()
    t = evaluate((lm.model, lm.processor), n=10, two_image=True, batch_size=5, progress=False)
    assert lm.model.training  # back in the mode it came in
    assert list(t.columns) == ["n", "accuracy", "blank_accuracy", "gap", "same_twice", "relevant_crop",
                               "irrelevant_crop"]
    assert list(t.index) == ["attribute", "identity", "existence", "count", "spatial", "overall"]
    assert t.loc["overall", "n"] == 10
    assert (t["gap"] == t["accuracy"] - t["blank_accuracy"]).all()


RESTYLE_PROBE = """
import sys
from fusion_utils.data import load_dataset
from fusion_utils.experiments import get_experiment
from fusion_utils.models import load_model
from fusion_utils.testing import tiny_model_dir
lm = load_model(tiny_model_dir("llava", root=sys.argv[2]))
res = get_experiment("hellinger")(lm, load_dataset("world", n=2, seed=0), out=sys.argv[1], progress=False)
import fusion_utils
print(fusion_utils.__file__)
print(res.run_dir)
"""


@pytest.mark.parametrize("edit, same", [("plots.py", True),
                                        ("engine/plans.py", False)])
def test_restyling_a_figure_keeps_the_run_directory(tmp_path, edit, same):
    """Run keys hash layers 0-3 only: an edit of a figure, a table or the driver finds the same run; an edit of the
    engine (it decides the numbers) does not."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import fusion_utils

    pkg = Path(fusion_utils.__file__).resolve().parent
    dirs = []
    for k in range(2):
        copy = tmp_path / f"copy{k}"
        shutil.copytree(pkg, copy / "fusion_utils", ignore=shutil.ignore_patterns("__pycache__", "weights"))
        if k == 1:
            target = copy / "fusion_utils" / edit
            target.write_text(target.read_text() + "\n# restyled: a figure's colours changed\n")
        env = {**__import__("os").environ, "PYTHONPATH": str(copy)}
        out = subprocess.run([sys.executable, "-c", RESTYLE_PROBE, str(tmp_path / "runs"), str(tmp_path / "models")], env=env, cwd=copy,
                             capture_output=True, text=True, check=True)
        *_, where, run_dir = out.stdout.strip().splitlines()
        assert where.startswith(str(copy))  # the copy is what ran
        dirs.append(run_dir)
    assert (dirs[0] == dirs[1]) == same, dirs


def test_run_keys_hash_layers_zero_to_three_only():
    from fusion_utils import layering

    names = {p.relative_to(layering.PACKAGE).as_posix() for p in layering.sources(layering.RUN_LAYERS)}
    assert {"engine/plans.py", "methods/contrastive.py", "experiments/harness.py", "archs.py"} <= names
    assert not names & {"plots.py", "widgets.py", "report/tables.py", "book/driver.py", "cli.py"}
