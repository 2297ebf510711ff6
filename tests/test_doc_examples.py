"""Every docstring example of the package runs and prints what it shows (`tests/doc_examples.py`)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def run_examples(*modules: str, cwd=None, extra_path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, str(HERE / "doc_examples.py"), *modules], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=900)


def test_every_docstring_example_runs():
    """The package's examples, with ``lm``, ``batch``, ``ds`` ... bound to the shipped llava-8l organism and world
    questions: none fails, and there are many of them (an import that found none would pass silently)."""
    r = run_examples()
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    tried = int(r.stdout.strip().splitlines()[-1].split()[0])
    assert tried >= 150 and r.stdout.strip().endswith("0 failed"), r.stdout[-500:]


def test_the_example_runner_can_fail(tmp_path):
    """A module whose example shows the wrong output, or uses a name nobody defined, fails the run."""
    (tmp_path / "bad_example_mod.py").write_text(
        'def f():\n    """\n    >>> 1 + 1\n    3\n    >>> undefined_name\n    """\n')
    r = run_examples("bad_example_mod", extra_path=str(tmp_path))
    assert r.returncode == 1 and "2 failed" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
