"""`fusion-utils`: the experiments from the shell."""
from __future__ import annotations

from fusion_utils.cli import main
from fusion_utils.testing import tiny_model_dir


def test_run_experiment_from_the_shell(tmp_path, capsys):
    model = str(tiny_model_dir("llava"))
    assert main(["run", "hellinger", "--model", model, "--samples", "3", "--out", str(tmp_path),
                 "--param", "reference=2"]) == 0
    out = capsys.readouterr().out
    assert "hellinger" in out and "records:" in out
    assert len(list((tmp_path / "hellinger").glob("*/records.jsonl"))) == 1


def test_archs_and_bad_input(capsys):
    assert main(["archs"]) == 0
    assert "qwen2_5_vl" in capsys.readouterr().out
    assert main(["run", "masking", "--model", "organism:nope", "--samples", "2"]) == 2
    assert "No model organism named" in capsys.readouterr().err
