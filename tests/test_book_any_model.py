"""The whole book on any supported model (issue 15).

Two builds of the real chapters, each checked page by page in headless Chromium:

(a) book/params/tiny-archs.yml: all six architectures as tiny random models from `fusion_utils.testing`, saved with
    `save_pretrained` as a user's own checkpoint would be, two world questions each, in one build (one kernel start
    per chapter for all six, which keeps the test to a few minutes). Random weights answer nothing, so the masking
    curves are flat and the chapters must say "Nothing found"; InstructBLIP has no spatial grid, so the attention
    and contrastive chapters must say "Does not apply" for it.
(b) book/params/tiny-benchmark.yml: the GQA fixture (tests/fixtures/benchmarks/gqa, no relevance labels) on a model
    with a grid and one without.

Every chapter page must show a figure, no error output, every model of its build, and its expected sentences. A
genuine error (a bad parameter, a model that does not load) must still stop the build with one clear sentence.
Chromium is required as in tests/test_book.py (FUSION_UTILS_SKIP_BROWSER=1 skips the browser checks explicitly).
"""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
from conftest import book_out_dir
import yaml

from fusion_utils import book
from fusion_utils.testing import PAPER_ARCHS, save_tiny_models
from test_book import Site, check_page, require_chromium, toc_chapters

REPO = Path(__file__).resolve().parent.parent
CHAPTERS = toc_chapters(REPO / "_toc.yml")
NOTHING, DOES_NOT_APPLY = "Nothing found.", "Does not apply."


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    return save_tiny_models(book_out_dir(tmp_path_factory, "tiny-models"), PAPER_ARCHS)


def with_models(params_name: str, models: dict[str, Path], out: Path) -> Path:
    """The committed parameters file with its /tmp/fusion-utils-tiny/<arch> entries pointed at this test's models,
    and the run records kept inside the test's output directory instead of the repository's runs/."""
    params = yaml.safe_load((REPO / "book" / "params" / params_name).read_text())
    listed = params["common"]["models"]
    params["common"]["models"] = [str(models[Path(m).name]) for m in listed]
    params["common"]["runs_dir"] = str(out / "runs")
    path = out / params_name
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def build(params: Path, out: Path):
    t0 = time.perf_counter()
    report = book.build(params, root=REPO, out=out, strict=True, all_pages=True)
    report.wall = time.perf_counter() - t0
    print(f"\n{params.name}: {report.wall:.0f} s (chapters {report.execute_seconds:.0f} s, "
          f"jupyter-book {report.jupyter_book_seconds:.0f} s); executed {report.executed}, cached {report.cached}")
    return report


@pytest.fixture(scope="module")
def six_book(tiny_models, tmp_path_factory):
    out = book_out_dir(tmp_path_factory, "any-model")
    report = build(with_models("tiny-archs.yml", tiny_models, out), out)
    return out, report


@pytest.fixture(scope="module")
def benchmark_book(tiny_models, tmp_path_factory):
    out = book_out_dir(tmp_path_factory, "any-model-benchmark")
    report = build(with_models("tiny-benchmark.yml", tiny_models, out), out)
    return out, report


def page_text(dom: str) -> str:
    """The page's words; Sphinx's typographer turns ' into ’, turned back so the sentences read as in the code."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)).replace("\u2019", "'")


# What each chapter must say on these builds, beyond a figure. Each sentence is checked with a model's name filled
# in (the save_pretrained directory's name and its architecture, e.g. "instructblip [InstructBLIP]"), because the
# chapters' code, shown on the page, holds the same sentences with "{name}" in place.
SIX_EXPECT = {
    "fusion": [f"{NOTHING} llava [LLaVA-1.5] answers 0% of the questions correctly whichever layer",
               "the curve is flat, so no fusion layer is marked"],
    "review": [f"{NOTHING} No layer of qwen2_vl [Qwen2-VL] after the plateau", "no review layer"],
    "attention": [f"{DOES_NOT_APPLY} instructblip [InstructBLIP]'s image tokens are query tokens without a spatial "
                  "grid, so there is no heatmap",
                  f"{DOES_NOT_APPLY} instructblip [InstructBLIP] has no relevance curve"],
    "contrastive": [f"{DOES_NOT_APPLY} instructblip [InstructBLIP]'s image tokens are query tokens without a "
                    "spatial grid, so there is nothing to crop",
                    f"{DOES_NOT_APPLY} instructblip [InstructBLIP] has no spatial grid: A_pre, A_post and I_A"],
    "models": [],
    "atlas": [f"{NOTHING} Masking the image at any one layer of llava [LLaVA-1.5] drops accuracy by at most",
              f"{DOES_NOT_APPLY} instructblip [InstructBLIP] has no persistent-noise share: its image tokens are "
              "query tokens without a spatial grid"],
}
BENCHMARK_EXPECT = {
    "fusion": [f"{NOTHING} qwen2_5_vl [Qwen2.5-VL] answers 0% of the questions correctly whichever layer"],
    "review": [f"{NOTHING} No layer of instructblip [InstructBLIP] after the plateau"],
    "attention": [f"{DOES_NOT_APPLY} gqa does not say which part of the image answers a question"],
    "contrastive": [f"{DOES_NOT_APPLY} instructblip [InstructBLIP]'s image tokens are query tokens",
                    f"{DOES_NOT_APPLY} gqa does not say which part of the image answers a question, so the oracle and "
                    "random crops (the bounds) are not run"],
    "models": [],
    "atlas": [f"{DOES_NOT_APPLY} qwen2_5_vl [Qwen2.5-VL] has no persistent-noise share: gqa does not say which "
              "part of the image answers a question"],
}


def check_chapters(out: Path, report, expect: dict, models: list[str], tmp_path: Path) -> None:
    assert report.ok and [c.name for c in report.chapters] == CHAPTERS
    assert set(expect) == set(CHAPTERS), "every chapter of _toc.yml has its expectations here"
    require_chromium()
    site = Site(report.html_dir)  # book/_build/<params name>/html
    try:
        for chapter in CHAPTERS:
            dom = check_page(site, f"book/chapters/{chapter}.html", tmp_path, need_figure=True)
            text = page_text(dom)
            missing = [m for m in models if m not in text]
            assert not missing, f"{chapter}: model(s) {missing} do not appear on the page"
            for sentence in expect[chapter]:
                assert sentence in text, f"{chapter}: expected the sentence {sentence!r} on the page"
    finally:
        site.close()


@pytest.mark.slow
def test_book_renders_on_all_six_architectures(six_book, tmp_path):
    out, report = six_book
    labels = [f"{a} [" for a in PAPER_ARCHS]  # "llava [LLaVA-1.5]", ...: every model is on every chapter page
    check_chapters(out, report, SIX_EXPECT, labels, tmp_path)


@pytest.mark.slow
def test_book_renders_on_a_benchmark_without_relevance_labels(benchmark_book, tmp_path):
    out, report = benchmark_book
    check_chapters(out, report, BENCHMARK_EXPECT, ["instructblip [", "qwen2_5_vl ["], tmp_path)


@pytest.mark.parametrize("change, expect", [
    (dict(samples=0), r"ValueError: samples must be a positive integer, got 0\."),
    ("no weights", r"ValueError: .*llava has no \.safetensors weights; convert them, or pass allow_pickle=True"),
])
def test_a_genuine_error_still_stops_the_build_with_one_sentence(tiny_models, tmp_path, change, expect):
    out = tmp_path / "out"
    out.mkdir()
    params = with_models("tiny-archs.yml", tiny_models, out)
    data = yaml.safe_load(params.read_text())
    if change == "no weights":  # a save_pretrained directory whose weights were not copied along
        broken = tmp_path / "llava"
        shutil.copytree(tiny_models["llava"], broken, ignore=shutil.ignore_patterns("*.safetensors"))
        data["common"]["models"] = [str(broken)]
    else:
        data["common"].update(change)
    params.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(book.BookError, match=expect) as err:
        book.build(params, root=REPO, out=out, only=["fusion"], html=False)
    msg = str(err.value)
    assert "\n" not in msg and "notebooks/fusion.ipynb" in msg
    assert not (out / "book" / "_build" / params.stem / "html").exists()


@pytest.mark.parametrize("arch", ["llava", "instructblip", "qwen2_5_vl"])
def test_masking_sweep_on_one_question_equals_the_naive_one(tiny_models, arch):
    """The fusion chapter's explorer sweeps one question at a time: a batch without padding, where the fast one-layer
    zero sweep must build its causal mask itself (it used to slice it twice and fail on every model)."""
    import torch

    from fusion_utils.data import load_dataset
    from fusion_utils.engine import masking_sweep
    from fusion_utils.models import load_model

    lm = load_model(tiny_models[arch])
    batch = lm.prepare(list(load_dataset("world", n=1, seed=0)))
    fast, naive = masking_sweep(lm, batch), masking_sweep(lm, batch, method="naive")
    assert fast["logits"].shape == (lm.num_layers, 1, naive["logits"].shape[-1])
    torch.testing.assert_close(fast["logits"], naive["logits"], rtol=1e-4, atol=1e-5)
