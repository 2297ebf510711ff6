"""`fusion-utils`: the experiments from the shell."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

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


BAD_INPUTS = [
    (["--samples", "0"], "--samples must be at least 1"),
    (["--samples", "-3"], "--samples must be at least 1"),
    (["--model", "llava-hf/llava-1.5-7b-hf"], "HF_HUB_OFFLINE"),
    (["--dataset", "gqa"], "source="),
    (["--param", "rho=abc"], "its parameters are modes"),
    (["--param", "window=two"], "parameter window must be an integer"),
    (["--model", "organism:nope"], "No model organism named"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
]


@pytest.mark.parametrize("extra, says", BAD_INPUTS, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_bad_input_is_one_sentence_and_a_nonzero_exit(extra, says, tmp_path):
    """What a new user mistypes: one line naming the fix, no traceback, a non-zero exit (offline hub: no retries)."""
    args = ["run", "masking", "--model", "organism:llava", "--samples", "2", "--out", str(tmp_path)]
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in args and flag != "--param":
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-m", "fusion_utils", *args], capture_output=True, text=True, env=env,
                         timeout=300)
    lines = [line for line in out.stderr.splitlines() if line.startswith("fusion-utils:")]
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(lines) == 1 and says in lines[0], out.stderr[-2000:]
    assert not list(tmp_path.glob("masking/*/records.jsonl"))  # nothing half-written


USER_SPEC = '''
from dataclasses import dataclass
from fusion_utils.experiments import Spec, register
import pandas as pd


@dataclass(frozen=True)
class CountParams:
    scale: float = 1.0


def count_batch(lm, samples, ctx, *, scale):
    return [{"id": s.id, "words": scale * len(s.question.split())} for s in samples]


register(Spec("question_words", count_batch, lambda records: records.agg({"words": "mean"}).to_frame().T,
              params=CountParams, decodes=False))
'''


def test_a_spec_a_user_registers_runs_from_the_command_line(tmp_path):
    (tmp_path / "my_probe.py").write_text(USER_SPEC)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    base = [sys.executable, "-m", "fusion_utils", "run", "question_words", "--import", "my_probe", "--model",
            str(tiny_model_dir("llava")), "--samples", "3", "--out", str(tmp_path / "runs")]
    ok = subprocess.run(base + ["--param", "scale=2"], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "question_words" in ok.stdout and len(list((tmp_path / "runs" / "question_words").glob("*/records.jsonl"))) == 1
    bad = subprocess.run(base + ["--param", "scal=2"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode != 0 and "its parameters are scale (a number, default 1.0)" in bad.stderr


def test_register_refuses_a_taken_name():
    from fusion_utils.experiments import Spec, get_spec, register

    get_spec("masking")
    with pytest.raises(ValueError, match="already registered|package's experiments"):
        register(Spec("masking", lambda lm, samples, ctx: [], lambda records: records))
    get_spec("hellinger")  # registered by its module, imported here whatever ran before this test
    with pytest.raises(ValueError, match="already registered"):
        register(Spec("hellinger", lambda lm, samples, ctx: [], lambda records: records))
