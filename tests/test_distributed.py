"""Data-parallel runs (torch.distributed, gloo on CPU): the records of 2 ranks equal one process's, a run killed on
one rank resumes with another number of ranks without recomputing, and a failing rank stops the job with its message.

The multi-process tests start `tests/dist_worker.py` under torchrun (``--standalone``: a free local port), one torch
thread per process; the references run the same script without a launcher, i.e. the single-process path.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusion_utils import distributed
from fusion_utils.runs import open_run

HERE = Path(__file__).resolve().parent
WORKER = HERE / "dist_worker.py"
ROOT = HERE.parent
CLOCKS = ("seconds", "plain_seconds")  # wall-clock fields: measured, not computed
N, BATCH = 8, 2
CONTRASTIVE = ["--param", "contrastive:fusion_layers=[0,1]", "--param", "contrastive:apply_layer=2"]


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", FUSION_UTILS_DIST_TIMEOUT="120")
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)  # the test process itself is never one rank of a job
    return e


def launch(args: list[str], nproc: int, timeout: float = 300) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(WORKER), *args]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def rows(out: Path, experiment: str) -> list[str]:
    """Every record of the one run of ``experiment`` under ``out``, clocks removed, as sorted canonical JSON."""
    (run_dir,) = (out / experiment).iterdir()
    assert not list(run_dir.glob("records.rank*.jsonl")), "shards left unmerged"
    lines = (run_dir / "records.jsonl").read_text().splitlines()
    recs = [{k: v for k, v in json.loads(x).items() if k not in CLOCKS} for x in lines]
    return sorted(json.dumps(r, sort_keys=True) for r in recs)


def computed(log: Path) -> list[str]:
    return [line.split()[1] for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from fusion_utils.testing import tiny_model_dir

    return str(tiny_model_dir("llava", root=tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny):
    """One process, no launcher: masking and contrastive on a tiny model and on the LLaVA organism."""
    out = tmp_path_factory.mktemp("single")
    res = launch(["--out", str(out), "--model", tiny, "--model", "organism:llava-8l", "--experiment", "masking",
                  "--experiment", "contrastive", *CONTRASTIVE, "--samples", str(N), "--batch-size", str(BATCH),
                  "--in-memory", str(out / "in_memory.json")], 1)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_two_gloo_ranks_record_what_one_process_records(reference, tiny, tmp_path):
    res = launch(["--out", str(tmp_path), "--model", tiny, "--model", "organism:llava-8l", "--experiment", "masking",
                  "--experiment", "contrastive", *CONTRASTIVE, "--samples", str(N), "--batch-size", str(BATCH),
                  "--in-memory", str(tmp_path / "in_memory.json")], 2)
    assert res.returncode == 0, res.stderr[-3000:]
    # without a run directory the ranks' records are gathered, in the single process's order
    in_memory = (tmp_path / "in_memory.json").read_text()
    assert in_memory == (reference / "in_memory.json").read_text() and len(json.loads(in_memory)) >= N
    for exp in ("masking", "contrastive"):
        dirs = sorted(p.name for p in (tmp_path / exp).iterdir())
        assert dirs == sorted(p.name for p in (reference / exp).iterdir())  # same configurations, same keys
        for d in dirs:
            one, two = reference / exp / d, tmp_path / exp / d
            ref_rows = sorted(json.dumps({k: v for k, v in json.loads(x).items() if k not in CLOCKS}, sort_keys=True)
                              for x in (one / "records.jsonl").read_text().splitlines())
            got = (two / "records.jsonl").read_text().splitlines()
            assert not list(two.glob("records.rank*.jsonl"))
            assert sorted(json.dumps({k: v for k, v in json.loads(x).items() if k not in CLOCKS}, sort_keys=True)
                          for x in got) == ref_rows
            assert (two / "summary.csv").read_text() == (one / "summary.csv").read_text()
    # one bar on rank 0 counting both ranks' samples: it reaches N/N
    assert f"{N}/{N}" in res.stderr and "x2 ranks" in res.stderr


def test_a_rank_killed_midway_resumes_with_one_process_without_recomputing(reference, tiny, tmp_path):
    from fusion_utils.data import load_dataset

    ids = load_dataset("world", n=N).ids
    log = tmp_path / "computed.log"
    base = ["--out", str(tmp_path / "runs"), "--model", tiny, "--experiment", "masking", "--samples", str(N),
            "--batch-size", str(BATCH), "--computed-log", str(log)]
    # batches [0,1] [2,3] [4,5] [6,7]: rank 0 takes the 1st and 3rd, rank 1 the 2nd and dies before the 4th
    killed = launch([*base, "--die-on", ids[6], "--die-rank", "1"], 2)
    assert killed.returncode != 0
    first = computed(log)
    (run_dir,) = (tmp_path / "runs" / "masking").iterdir()
    assert (run_dir / "records.rank1.jsonl").exists()  # rank 1's shard, not merged: the job never finished
    done = {json.loads(x)["id"] for f in run_dir.glob("records*.jsonl") for x in f.read_text().splitlines()}
    assert set(ids[:4]) <= done and ids[6] not in done  # the first step of both ranks, never rank 1's last batch
    resumed = launch(base, 1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = computed(log)[len(first):]
    assert sorted(again) == sorted(set(ids) - done)  # only what nobody had recorded
    ref_dir = next(d for d in (reference / "masking").iterdir() if d.name == run_dir.name)
    assert rows(tmp_path / "runs", "masking") == sorted(
        json.dumps({k: v for k, v in json.loads(x).items() if k not in CLOCKS}, sort_keys=True)
        for x in (ref_dir / "records.jsonl").read_text().splitlines())


def test_a_failing_rank_stops_the_job_with_its_message_and_sample(tiny, tmp_path):
    from fusion_utils.data import load_dataset

    ids = load_dataset("world", n=N).ids
    res = launch(["--out", str(tmp_path), "--model", tiny, "--experiment", "masking", "--samples", str(N),
                  "--batch-size", str(BATCH), "--raise-on", ids[3]], 2, timeout=240)
    assert res.returncode != 0
    assert f"rank 1 failed on sample '{ids[3]}' of masking: ValueError: injected failure on {ids[3]}" in res.stderr
    assert "RankFailed" in res.stderr


# -- in one process: the split, the shards and their merge --------------------------------------------------------

def test_batches_go_round_robin_and_cover_everything_once():
    for world in (1, 2, 3, 8):
        parts = [distributed.shard(11, r, world) for r in range(world)]
        assert sorted(i for p in parts for i in p) == list(range(11))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert distributed.shard(5, 1, 2) == [1, 3]
    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1


def test_shards_merge_into_records_and_an_interrupted_merge_counts_nothing_twice(tmp_path):
    cfg = {"x": 1}
    main = open_run(tmp_path, "exp", cfg)
    one = open_run(tmp_path, "exp", cfg, shard=1)
    main.append([{"id": "a", "v": 1}, {"id": "a", "v": 2}])
    one.append([{"id": "b", "v": 3}])
    one.append([{"id": "a", "v": 99}])  # the same sample in a later file: the first file's rows win
    assert one.write_path.name == "records.rank1.jsonl" and main.write_path == main.records_path
    assert open_run(tmp_path, "exp", cfg).done_ids() == {"a", "b"}
    # a merge killed after its append, before deleting the shard: the shard's rows are already in records.jsonl
    with open(main.records_path, "ab") as f:
        f.write(b'{"id": "b", "v": 3}\n')
    df = main.records()
    assert sorted(zip(df["id"], df["v"])) == [("a", 1), ("a", 2), ("b", 3)]
    assert main.merge_shards() == 0 and not main.shard_paths()
    assert sorted(zip(*(main.records()[c] for c in ("id", "v")))) == [("a", 1), ("a", 2), ("b", 3)]
    one.append([{"id": "c", "v": 4}])
    assert main.merge_shards() == 1
    assert [json.loads(x)["id"] for x in main.records_path.read_text().splitlines()] == ["a", "a", "b", "c"]


def test_bad_timeout_setting_names_the_fix(monkeypatch):
    monkeypatch.setenv("FUSION_UTILS_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="FUSION_UTILS_DIST_TIMEOUT"):
        distributed.timeout()


# -- the book: precompute under 2 ranks, then the chapters find their records complete ----------------------------

def test_book_precompute_on_two_ranks_leaves_nothing_for_the_chapters_to_compute(tmp_path):
    import shutil

    from fusion_utils.book.precompute import compute_cells, precompute

    root = tmp_path / "book"
    shutil.copytree(ROOT / "notebooks", root / "notebooks")
    for f in ("_config.yml", "_toc.yml"):
        shutil.copy(ROOT / f, root / f)
    params = root / "params.yml"
    params.write_text("common: {models: ['organism:llava-8l'], dataset: world, samples: 6, device: cpu, "
                      "dtype: float32, seed: 0}\nchapters: {fusion: {}, contrastive: {}}\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fusion_utils",
           "book", "precompute", "--params", str(params), "--root", str(root)]
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "contrastive: records complete" in res.stderr and "2 rank(s)" in res.stderr
    files = sorted((root / "runs").rglob("records*.jsonl"))
    assert {p.parent.parent.name for p in files} >= {"masking", "contrastive", "baselines"}
    assert all(p.name == "records.jsonl" for p in files)  # every shard merged
    before = {p: p.read_bytes() for p in files}
    # what `make book` then executes: the same computing cells, in one process; they find every record there
    precompute(params, root=root)
    assert sorted((root / "runs").rglob("records*.jsonl")) == files
    assert all(p.read_bytes() == before[p] for p in files)
    assert "runs_dir" in compute_cells(root / "notebooks" / "fusion.ipynb")[-1]
