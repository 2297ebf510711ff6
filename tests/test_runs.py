"""Run directories: config hashing, no overwrites, durable appends, resume after a kill, atomic summaries."""
import json
import os

import numpy as np
import pandas as pd
import pytest

from fusion_utils import runs
from fusion_utils.runs import canonical_json, config_hash, open_run, provenance

CFG = {"model": "llava-1.5-7b", "layers": (0, 4, 8), "lr": 0.1, "data": {"name": "gqa", "n": 100}}


def test_config_hash_is_canonical():
    same = {"data": {"n": 100, "name": "gqa"}, "lr": 0.1, "layers": [0, 4, 8], "model": "llava-1.5-7b"}
    assert config_hash(CFG) == config_hash(same)  # key order and tuple/list do not matter
    assert canonical_json(CFG) == ('{"data":{"n":100,"name":"gqa"},"layers":[0,4,8],"lr":0.1,'
                                   '"model":"llava-1.5-7b"}')
    assert config_hash({**CFG, "lr": 0.1000001}) != config_hash(CFG)
    assert config_hash({"a": 1}) != config_hash({"a": 1.0}) != config_hash({"a": "1"})
    assert config_hash({"x": np.float64(0.5), "y": np.arange(2)}) == config_hash({"x": 0.5, "y": [0, 1]})
    assert len(config_hash(CFG)) == 64
    with pytest.raises(TypeError, match="JSON-like"):
        config_hash({"f": object()})


def test_open_run_layout_and_reopen(tmp_path):
    run = open_run(tmp_path, "masking", CFG)
    assert run.dir == tmp_path / "masking" / config_hash(CFG)[:12] and run.key == config_hash(CFG)[:12]
    doc = json.loads((run.dir / "config.json").read_text())
    assert doc["config"] == json.loads(canonical_json(CFG)) and doc["hash"] == config_hash(CFG)
    assert {"python", "torch", "transformers", "fusion_utils", "platform", "git_commit", "time"} <= set(
        doc["provenance"])
    again = open_run(tmp_path, "masking", dict(reversed(list(CFG.items()))))
    assert again.dir == run.dir
    assert len((run.dir / "sessions.jsonl").read_text().splitlines()) == 2
    other = open_run(tmp_path, "masking", {**CFG, "lr": 0.2})
    assert other.dir != run.dir and (other.dir / "config.json").exists()
    assert json.loads((run.dir / "config.json").read_text())["config"]["lr"] == 0.1  # untouched


def test_different_config_in_same_dir_raises(tmp_path):
    run = open_run(tmp_path, "exp", CFG)
    doc = json.loads((run.dir / "config.json").read_text())
    doc["config"]["lr"] = 99  # manual edit (or a hash collision)
    (run.dir / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="different configuration"):
        open_run(tmp_path, "exp", CFG)


def test_bad_names(tmp_path):
    with pytest.raises(ValueError, match="plain folder name"):
        open_run(tmp_path, "../escape", CFG)
    with pytest.raises(ValueError, match="plain folder name"):
        open_run(tmp_path, "", CFG)


def test_append_and_records(tmp_path):
    run = open_run(tmp_path, "exp", CFG)
    assert run.done_ids() == set() and list(run.records().columns) == ["id"]
    run.append({"id": 1, "acc": np.float32(0.5), "layer": np.int64(3), "vec": np.array([1.0, 2.0])})
    run.append([{"id": "b", "acc": 1.0, "layer": 3}, {"id": "b", "acc": 0.0, "layer": 4}])
    assert run.done_ids() == {"1", "b"}
    df = run.records()
    assert list(df["id"]) == ["1", "b", "b"] and df["acc"].tolist() == [0.5, 1.0, 0.0]
    assert df["vec"][0] == [1.0, 2.0]
    lines = (run.dir / "records.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(x)["id"] for x in lines)
    with pytest.raises(ValueError, match="'id'"):
        run.append({"acc": 1.0})
    with pytest.raises(TypeError):
        run.append(["not a dict"])
    assert len(run.records()) == 3  # failed appends wrote nothing


def test_resume_after_kill_with_truncated_line(tmp_path):
    run = open_run(tmp_path, "exp", CFG)
    run.append([{"id": f"s{i}", "acc": i / 10} for i in range(3)])
    with open(run.records_path, "ab") as f:  # simulate a kill in the middle of writing a record
        f.write(b'{"id": "s3", "acc": 0.')
    assert run.records()["id"].tolist() == ["s0", "s1", "s2"]  # truncated last line ignored
    # a new process reopens the run:
    with pytest.warns(UserWarning, match="truncated"):
        resumed = open_run(tmp_path, "exp", CFG)
    assert resumed.dir == run.dir and resumed.done_ids() == {"s0", "s1", "s2"}
    todo = [f"s{i}" for i in range(5) if f"s{i}" not in resumed.done_ids()]
    assert todo == ["s3", "s4"]
    resumed.append([{"id": s, "acc": 1.0} for s in todo])
    df = resumed.records()
    assert df["id"].tolist() == ["s0", "s1", "s2", "s3", "s4"] and df["acc"].tolist()[-2:] == [1.0, 1.0]
    assert all(json.loads(x) for x in resumed.records_path.read_text().splitlines())


def test_complete_last_record_without_newline_is_kept(tmp_path):
    run = open_run(tmp_path, "exp", CFG)
    run.append({"id": "a"})
    with open(run.records_path, "ab") as f:
        f.write(b'{"id": "b"}')
    assert run.done_ids() == {"a", "b"}
    resumed = open_run(tmp_path, "exp", CFG)
    resumed.append({"id": "c"})
    assert resumed.records()["id"].tolist() == ["a", "b", "c"]


def test_corrupt_middle_line_raises(tmp_path):
    run = open_run(tmp_path, "exp", CFG)
    run.records_path.write_text('{"id": "a"}\n{broken\n{"id": "c"}\n')
    with pytest.raises(ValueError, match="line 2"):
        run.records()


def test_write_summary_atomic(tmp_path, monkeypatch):
    run = open_run(tmp_path, "exp", CFG)
    p = run.write_summary({"acc": np.float64(0.75), "n": 4, "layers": (1, 2)})
    assert p == run.dir / "summary.json" and json.loads(p.read_text()) == {"acc": 0.75, "n": 4, "layers": [1, 2]}
    df = pd.DataFrame({"layer": [0, 1], "acc": [0.5, 0.25]})
    c = run.write_summary(df)
    assert c == run.dir / "summary.csv" and pd.read_csv(c).equals(df)
    run.write_summary(df.set_index("layer"), name="by_layer")
    assert pd.read_csv(run.dir / "by_layer.csv").columns.tolist() == ["layer", "acc"]

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(runs.os, "replace", boom)
    with pytest.raises(OSError):
        run.write_summary({"acc": 0.0})
    monkeypatch.undo()
    assert json.loads(p.read_text())["acc"] == 0.75  # old summary intact
    assert not [f for f in os.listdir(run.dir) if f.endswith(".tmp")]  # no temp file left behind
    with pytest.raises(TypeError):
        run.write_summary([1, 2])
    with pytest.raises(ValueError):
        run.write_summary({}, name="../x")


def test_provenance():
    p = provenance()
    assert p["python"].count(".") == 2 and p["torch"] and p["transformers"] and p["time"].endswith("+00:00")
    json.dumps(p)


def test_atomic_writes_are_readable_like_any_file_the_user_writes(tmp_path):
    import stat

    from fusion_utils.runs import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "record.json", "{}")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "record.json").stat().st_mode)
    assert mode == 0o644, oct(mode)  # mkstemp alone gives 0600: a served site or a shared runs/ could not read it


def _world_config(ids, **params):
    return {"experiment": "masking", "model": {"fingerprint": "abc"}, "params": params,
            "dataset": {"name": "world", "ids": list(ids), "n": len(ids), "fingerprint": "f" + "".join(ids),
                        "meta": {"test": len(ids), "image_size": 96}}}


def test_adopt_copies_only_a_siblings_records_of_the_asked_questions(tmp_path):
    small = open_run(tmp_path, "masking", _world_config(["q1", "q2"], layer=3))
    small.append([{"id": "q1", "v": 1}, {"id": "q1", "v": 2}])
    small.append({"id": "q2", "v": 3})
    other = open_run(tmp_path, "masking", _world_config(["q1", "q3"], layer=4))  # another parameter: not a sibling
    other.append({"id": "q3", "v": 9})
    big = open_run(tmp_path, "masking", _world_config(["q1", "q2", "q3"], layer=3))
    assert runs.adopt(big, ["q1", "q2", "q3"]) == 2
    got = big.records()
    assert got.groupby("id")["v"].apply(list).to_dict() == {"q1": [1, 2], "q2": [3]}  # q3 is not adopted from `other`
    assert runs.adopt(big, ["q1", "q2", "q3"]) == 0  # nothing twice
    assert len(big.records()) == 3


def test_a_run_adopts_its_siblings_records_and_computes_only_the_rest(tmp_path):
    from fusion_utils.data import load_dataset
    from fusion_utils.experiments.common import run_experiment

    ds = load_dataset("world", n=5)
    seen = []

    def per_batch(lm, samples):
        seen.extend(s.id for s in samples)
        return [{"id": s.id, "x": len(s.question)} for s in samples]

    class LM:  # run_experiment reads the spec's model type for its bar only
        spec = type("S", (), {"model_type": "tiny"})

    run_experiment("probe", LM, ds[:3], per_batch, config=_world_config(ds[:3].ids), out=str(tmp_path), adopt=True)
    assert seen == ds[:3].ids
    seen.clear()
    recs = run_experiment("probe", LM, ds, per_batch, config=_world_config(ds.ids), out=str(tmp_path), adopt=True)
    assert seen == ds.ids[3:] and list(recs["id"]) == ds.ids
    seen.clear()
    run_experiment("probe", LM, ds, per_batch, config=_world_config(ds.ids, other=1), out=str(tmp_path), adopt=True)
    assert seen == ds.ids  # another configuration adopts nothing
