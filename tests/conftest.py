"""Shared fixtures: a tiny random instance of every architecture, and three small samples."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from fusion_utils import load_model
from fusion_utils.data.sample import Sample
from fusion_utils.testing import PAPER_ARCHS, TINY_ARCHS, sample_images, tiny_model_dir

QUESTIONS = ["what is the color of the object ?", "what shape is it ?", "how many red objects are there ?"]

# `make test` runs two pytest-xdist workers, each its own process: one torch thread each, so they share the two cores
# instead of four threads contending for them
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # and one for the processes a test starts (book kernels, torchrun workers)


@pytest.fixture(scope="module", params=PAPER_ARCHS)
def lm(request):
    """Each of the paper's six architectures in turn (module scope: built and loaded once per test file). The
    invariants of tests/test_engine.py and tests/test_core.py run on every architecture (`any_lm` there)."""
    torch.manual_seed(0)
    return load_model(tiny_model_dir(request.param))


@pytest.fixture(scope="module", params=TINY_ARCHS)
def any_lm(request):
    """Every supported architecture in turn, the paper's six and the newer ones."""
    torch.manual_seed(0)
    return load_model(tiny_model_dir(request.param))


@pytest.fixture(scope="module")
def samples():
    return [Sample(f"s{i}", im, q, ["red"]) for i, (im, q) in enumerate(zip(sample_images(3, seed=0), QUESTIONS))]


def book_out_dir(tmp_path_factory, name: str) -> Path:
    """Where a test builds a book. Set FUSION_UTILS_BOOK_TEST_OUT to keep the builds (and their execution cache)
    between runs."""
    keep = os.environ.get("FUSION_UTILS_BOOK_TEST_OUT")
    if keep:
        d = Path(keep) / name
        d.mkdir(parents=True, exist_ok=True)
        return d
    return tmp_path_factory.mktemp(name)


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """The module of `scripts/NAME.py`, loaded from its file (the scripts directory is not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def real_book(tmp_path_factory):
    """The real book (book/params/tiny.yml) built once per session with Sphinx warnings as errors: test_book.py
    and test_book_reader.py both read it."""
    import time

    import yaml

    from fusion_utils import book

    out = book_out_dir(tmp_path_factory, "real")
    repo = Path(__file__).resolve().parents[1]
    # every pytest-xdist worker that runs a reader builds its own book: pytest 9 ignores the xdist_group marks
    # (pytest-xdist 3.8 renames `item._nodeid`, which pytest 9 no longer reads), so the readers land on both workers.
    # Its run records stay in its own folder: two builds writing the repository's runs/ at once record the same
    # questions twice
    params = yaml.safe_load((repo / "book" / "params" / "tiny.yml").read_text())
    params["common"]["runs_dir"] = str(out / "runs")
    tiny = out / "tiny.yml"
    tiny.write_text(yaml.safe_dump(params, sort_keys=False))
    t0 = time.perf_counter()
    report = book.build(tiny, root=repo, out=out, strict=True, all_pages=True)
    report.wall = time.perf_counter() - t0
    return out, report
