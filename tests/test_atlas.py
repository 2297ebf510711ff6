"""The atlas (issue 31, item 5): `fusion-utils atlas` writes one table and one figure on relative depth, resumes per
model without recomputing, reports what the underlying experiments' verdict inputs say, and refuses a bad
parameters file with one sentence."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from fusion_utils import atlas as driver
from fusion_utils import atlas_plots, distributed, report
from fusion_utils.cli import main
from fusion_utils.data import load_dataset
from fusion_utils.experiments.attention import persistent_noise
from fusion_utils.experiments.masking import find_layers, masking, masking_summary
from fusion_utils.experiments.atlas import atlas
from fusion_utils.experiments.harness import run
from fusion_utils.models import load_model
from fusion_utils.runs import open_run
from fusion_utils.testing import PAPER_ARCHS, tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
N = 6


def write_params(tmp: Path, models, **over) -> Path:
    params = dict(models=[str(m) for m in models], dataset="world", samples=N, seed=0, device="cpu",
                  dtype="float32", batch_size=4, decode="first_token", runs_dir=str(tmp / "runs"),
                  out=str(tmp / "atlas"), **over)
    path = tmp / "atlas.yml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_dirs(runs: Path) -> list[Path]:
    return sorted(p.parent for p in runs.glob("*/*/config.json"))


def state(runs: Path) -> dict:
    """Every run directory's records (bytes) and number of sessions (one per open_run)."""
    return {d: ((d / "records.jsonl").read_bytes(), len((d / "sessions.jsonl").read_text().splitlines()))
            for d in run_dirs(runs)}


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """The atlas of two tiny models (LLaVA and Qwen2-VL), built once."""
    tmp = tmp_path_factory.mktemp("atlas-two")
    models = [tiny_model_dir("llava"), tiny_model_dir("qwen2_vl")]
    params = write_params(tmp, models)
    res = driver.build_atlas(params, progress=False)
    return tmp, params, models, res


def test_two_tiny_models_give_one_table_and_one_figure(two):
    tmp, _, models, res = two
    out = tmp / "atlas"
    assert res["computed"] == [str(m) for m in models] and not res["missing"]
    for name in driver.OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    assert (out / "atlas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.read_csv(out / "atlas.csv")
    assert table["model"].tolist() == [f"{Path(m).name} [{f}]" for m, f in zip(models, ("LLaVA-1.5", "Qwen2-VL"))]
    assert table["family"].tolist() == ["LLaVA-1.5", "Qwen2-VL"]
    assert table["layers"].tolist() == [4, 4] and table["samples"].tolist() == [N, N]
    md = (out / "atlas.md").read_text()
    assert md.count("\n") == 2 + 2 and "[LLaVA-1.5]" in md and "[Qwen2-VL]" in md
    assert "<table>" in (out / "atlas.html").read_text()
    profile = pd.read_csv(out / "atlas_profile.csv")
    assert sorted(profile.groupby("model").size().tolist()) == [4, 4]


def test_a_rerun_recomputes_nothing(two):
    tmp, params, models, _ = two
    runs = tmp / "runs"
    before = state(runs)
    assert len(before) == 4  # masking and attention, for each model
    again = driver.build_atlas(params, progress=False)
    assert again["computed"] == [] and again["reused"] == [str(m) for m in models]
    assert state(runs) == before  # not even opened: no new session, no new record
    # without the stored entries the models are loaded again, and their runs resume with every sample done
    for p in (tmp / "atlas" / "models").glob("*.json"):
        p.unlink()
    third = driver.build_atlas(params, progress=False)
    assert third["computed"] == [str(m) for m in models]
    after = state(runs)
    assert {d: rec for d, (rec, _) in after.items()} == {d: rec for d, (rec, _) in before.items()}
    for d, (_, sessions) in after.items():
        assert sessions == before[d][1] + 1
        last = json.loads((d / "sessions.jsonl").read_text().splitlines()[-1])
        assert last["ids_done_before"] == N  # opened with every sample recorded: nothing left to compute


def test_a_changed_parameter_reruns_only_what_it_changes(two, tmp_path):
    tmp, params, models, _ = two
    data = yaml.safe_load(params.read_text())
    data["threshold"] = 0.2  # decides only the summary: the runs are reused, the entries recomputed
    data["out"] = str(tmp_path / "atlas")
    changed = tmp_path / "changed.yml"
    changed.write_text(yaml.safe_dump(data))
    before = state(tmp / "runs")
    res = driver.build_atlas(changed, progress=False)
    assert res["computed"] == [str(m) for m in models]
    assert {d: rec for d, (rec, _) in state(tmp / "runs").items()} == {d: rec for d, (rec, _) in before.items()}
    stored = [json.loads(p.read_text())["entry"] for p in sorted((tmp_path / "atlas" / "models").glob("*.json"))]
    assert [e["threshold"] for e in stored] == [0.2, 0.2]


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    """The atlas entries of all six tiny architectures (8 world questions each), with their loaded models."""
    tmp = tmp_path_factory.mktemp("atlas-six")
    data = load_dataset("world", n=8, seed=0)
    out = {}
    for arch in PAPER_ARCHS:
        lm = load_model(tiny_model_dir(arch))
        res = atlas(lm, data, decode="first_token", out=str(tmp), batch_size=4, progress=False)
        out[arch] = (lm, res, atlas_plots.entry(lm, res))
    return out


@pytest.mark.parametrize("arch", PAPER_ARCHS)
def test_relative_depth_is_layer_over_n_layers(six, arch):
    lm, res, e = six[arch]
    L = lm.num_layers
    prof = pd.DataFrame(e["profile"])
    assert prof["layer"].tolist() == list(range(L))
    np.testing.assert_allclose(prof["rel_depth"], np.arange(L) / L)
    assert e["fusion_depths"] == [j / L for j in e["fusion_layers"]]
    for key in ("plateau", "review"):
        layer = e[f"{key}_start" if key == "plateau" else f"{key}_layer"]
        assert e[f"{key}_depth"] == (None if layer is None else layer / L)
    fig = atlas_plots.atlas_figure([e])
    x = fig.axes[0].lines[0].get_xdata()
    np.testing.assert_allclose(x, np.arange(L) / L)


@pytest.mark.parametrize("arch", PAPER_ARCHS)
def test_columns_agree_with_the_experiments_verdict_inputs(six, arch):
    """The fusion, plateau and review columns are `find_layers` on the masking run's own records, the review test is
    `report.review_verdicts` on them, and the noise share is `persistent_noise` on the attention run's records."""
    lm, res, e = six[arch]
    mdir, adir = Path(res.extra["runs"]["masking"]), Path(res.extra["runs"]["attention"])
    m = open_run(mdir.parent.parent, "masking", json.loads((mdir / "config.json").read_text())["config"]).records()
    a = open_run(adir.parent.parent, "attention", json.loads((adir / "config.json").read_text())["config"]).records()
    s = masking_summary(m)
    found = find_layers(s[s["mode"] == "zero"], threshold=0.05)
    assert (e["fusion_layers"], e["plateau_start"], e["review_layer"]) == \
        (found["fusion_layers"], found["plateau_start"], found["review_layer"])
    label = atlas_plots.model_label(lm.name, lm.spec)
    review = report.review_verdicts(label, lm.spec.model_type, m, None, None, lm.num_layers, mode="zero")[0]
    assert e["review_test"] == review["verdict"]
    noise = persistent_noise(a)
    expected = noise.get("irrelevant_share_of_persistent", float("nan"))
    assert (e["noise_share"] == expected) or (np.isnan(e["noise_share"]) and np.isnan(expected))
    assert e["noise_test"] == report.attention_verdicts(label, a, lm.num_layers)[0]["verdict"]
    if lm.spec.grid == "none":  # InstructBLIP's query tokens carry no relevance: no noise share to give
        assert np.isnan(e["noise_share"]) and e["noise_test"].startswith("n/a")


def test_a_synthetic_profile_places_its_landmarks_on_relative_depth():
    """A drop curve with two fusion layers, a plateau and a late review dip: the row finds them where they are."""
    from fusion_utils.experiments.atlas import atlas_row

    L = 16
    drop = np.zeros(L)
    drop[[1, 3]] = 0.4
    drop[13] = 0.2
    summary = pd.DataFrame({"layer": range(L), "drop": drop, "plain_accuracy": 0.9, "n": 40})
    layers = find_layers(summary, threshold=0.05)
    row = atlas_row(summary, layers, {}, pd.DataFrame(), L)
    assert row["fusion_layers"] == [1, 3] and row["fusion_depths"] == [1 / 16, 3 / 16]
    assert row["review_layer"] == 13 and row["review_depth"] == 13 / 16
    flat = atlas_row(summary.assign(drop=0.0), find_layers(summary.assign(drop=0.0)), {}, pd.DataFrame(), L)
    assert flat["fusion_layers"] == [] and flat["review_layer"] is None


def test_the_registered_spec_gives_the_same_row_as_the_composed_runs(tmp_path):
    lm = load_model(tiny_model_dir("llava"))
    data = load_dataset("world", n=4, seed=0)
    composed = atlas(lm, data, decode="first_token", out=str(tmp_path), batch_size=4, progress=False)
    one_run = run("atlas", lm, data, decode="first_token", out=str(tmp_path), batch_size=4, progress=False)
    assert one_run.run_dir is not None and Path(one_run.run_dir).parent.name == "atlas"
    a, b = composed.extra["row"], one_run.extra["row"]
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k] or (isinstance(a[k], float) and np.isnan(a[k]) and np.isnan(b[k])), k


def test_the_chapter_reuses_the_fusion_chapters_masking_run(tmp_path):
    """With the fusion chapter's modes, the atlas opens the fusion chapter's run and computes nothing new."""
    lm = load_model(tiny_model_dir("llava"))
    data = load_dataset("world", n=4, seed=0)
    kw = dict(modes=["zero", "knockout"], decode="first_token", out=str(tmp_path), batch_size=4, progress=False)
    first = masking(lm, data, **kw)
    before = (Path(first.run_dir) / "records.jsonl").read_bytes()
    res = atlas(lm, data, **kw)
    assert res.extra["runs"]["masking"] == first.run_dir
    assert (Path(first.run_dir) / "records.jsonl").read_bytes() == before


def test_one_model_per_rank_splits_the_models_and_the_last_rank_draws_them_all(tmp_path, monkeypatch):
    """`--ranks models`: rank r runs models r, r + W, ... alone (no data-parallel split), and each rank redraws the
    table from the entries on disk, so the one finishing last shows every model."""
    models = [tiny_model_dir("llava"), tiny_model_dir("qwen2_vl")]
    params = write_params(tmp_path, models)
    seen = []
    real = driver.compute_entry

    def spy(params, model, data, progress=True):
        with monkeypatch.context() as m:  # as under a launcher: without `alone` setup would join a process group
            m.setenv("WORLD_SIZE", "2")
            seen.append((model, distributed.launched(), distributed.setup()))
        return real(params, model, data, progress=progress)

    monkeypatch.setattr(driver, "compute_entry", spy)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    r1 = driver.build_atlas(params, progress=False)
    assert r1["computed"] == [str(models[1])] and r1["missing"] == [str(models[0])]
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    r0 = driver.build_atlas(params, progress=False)
    assert r0["computed"] == [str(models[0])] and r0["missing"] == []
    assert [s[0] for s in seen] == [str(models[1]), str(models[0])]
    assert all(launched and not joined for _, launched, joined in seen)  # each rank runs its model alone
    assert len(pd.read_csv(tmp_path / "atlas" / "atlas.csv")) == 2


def test_a_probe_note_shows_beside_its_row(six):
    _, _, e = six["llava"]
    noted = dict(e, probe_note="vision features are added into layers 1-2 (DeepStack)")
    text = atlas_plots.table_text(atlas_plots.atlas_table([e, noted]))
    assert text["probe note"].tolist() == ["", "vision features are added into layers 1-2 (DeepStack)"]
    fig = atlas_plots.atlas_figure([noted])
    assert any("DeepStack" in t.get_text() for t in fig.texts)


def test_the_committed_parameters_files_are_valid():
    tiny = driver.load_atlas_params(REPO / "book" / "params" / "atlas-tiny.yml")
    assert tiny["models"] == ["organism:llava", "organism:qwen2_vl", "organism:llava-8l", "organism:qwen2_vl-8l"]
    gpu = driver.load_atlas_params(REPO / "book" / "params" / "atlas-gpu.yml")
    assert len(gpu["models"]) == 13 and gpu["device"] == "cuda" and gpu["dtype"] == "bfloat16"
    assert {"llava-hf/llava-1.5-7b-hf", "Qwen/Qwen2.5-VL-7B-Instruct", "google/gemma-3-4b-it",
            "google/paligemma2-3b-mix-448"} <= set(gpu["models"])


@pytest.mark.parametrize("text, says", [
    (None, "does not exist"),
    ("models: [organism:llava-8l\nsamples: 4\n", "is not valid YAML"),
    ("- organism:llava-8l\n", "must be a mapping"),
    ("models: [organism:llava-8l]\nsamples: 4\nsample: 8\n", "unknown key(s) 'sample'"),
    ("samples: 4\n", "lacks models"),
    ("models: [organism:llava-8l]\nsamples: -1\n", "samples must be a positive integer"),
    ("models: organism:llava-8l\nsamples: 4\n", "models must be a non-empty list"),
    ("models: [organism:llava-8l]\nsamples: 4\nmodes: [knockout]\n", "modes must be a list holding 'zero'"),
    ("models: [organism:llava-8l, organism:llava-8l]\nsamples: 4\n", "lists a model twice"),
])
def test_a_bad_parameters_file_gives_one_sentence(tmp_path, capsys, text, says):
    path = tmp_path / "bad.yml"
    if text is not None:
        path.write_text(text)
    code = main(["atlas", "--params", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and says in err
    assert err.startswith("fusion-utils: ") and "\n" not in err and "Traceback" not in err and err.endswith(".")


def test_two_ranks_under_torchrun_write_the_table_one_process_writes(two, tmp_path):
    """`torchrun --nproc_per_node 2 -m fusion_utils atlas` (gloo, one model per rank) gives one process's table."""
    import os
    import subprocess
    import sys

    tmp, _, models, _ = two
    params = write_params(tmp_path, models)
    env = dict(os.environ, OMP_NUM_THREADS="1", FUSION_UTILS_DIST_TIMEOUT="120",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fusion_utils",
           "atlas", "--params", str(params)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "atlas (rank 0): 1 model(s) computed" in res.stdout and "atlas (rank 1): 1 model(s) computed" in res.stdout
    assert (tmp_path / "atlas" / "atlas.csv").read_text() == (tmp / "atlas" / "atlas.csv").read_text()


def test_the_chapter_asks_for_the_runs_the_fusion_and_attention_chapters_make():
    """The Atlas chapter computes nothing of its own in the default build: its masking modes are the fusion
    chapter's and its top-k size the attention chapter's, so its runs have their configurations (reused records;
    `test_the_chapter_reuses_the_fusion_chapters_masking_run` shows the reuse), and it runs after both."""
    import papermill as pm

    nb = REPO / "notebooks"

    def defaults(name):
        return {k: v["default"] for k, v in pm.inspect_notebook(str(nb / f"{name}.ipynb")).items()}

    atlas_nb, fusion_nb, attention_nb = defaults("atlas"), defaults("fusion"), defaults("attention")
    assert atlas_nb["modes"] == fusion_nb["modes"] and atlas_nb["k"] == attention_nb["k"]
    assert atlas_nb["runs_dir"] == fusion_nb["runs_dir"] == attention_nb["runs_dir"]
    chapters = list(yaml.safe_load((REPO / "book" / "params" / "default.yml").read_text())["chapters"])
    assert chapters.index("atlas") > max(chapters.index("fusion"), chapters.index("attention"))
