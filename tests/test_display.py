"""The reader's side of the book (issue 30), without a browser: the classes of contradiction a reader noticed, each
caught by a test -- a number stated twice is one number, fingerprints come from one function, a map's colours mean
what its caption says, the paper's unreported values read "not reported" -- and the verdict rendering, Holm's
correction, the verdict index and the download files."""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import nbformat  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from fusion_utils import interactive as I  # noqa: E402
from fusion_utils import paper, plots, report  # noqa: E402
from fusion_utils.book import verdict_index  # noqa: E402
from fusion_utils.figure_html import DIVERGING, MAGMA  # noqa: E402
from fusion_utils.report import display as D  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CHAPTERS = ["fusion", "review", "attention", "contrastive", "models"]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _rgb(hex_color: str) -> np.ndarray:
    h = hex_color.lstrip("#")
    return np.array([int(h[i:i + 2], 16) for i in (0, 2, 4)], float)


# --- Holm ---------------------------------------------------------------------------------------------------------

def _holm_brute(p):
    """Holm by its definition: reject H_(i) while p_(j) <= alpha / (m - j + 1) for all j <= i; the adjusted p is the
    smallest alpha at which H_i is rejected (searched on a fine grid of candidate values)."""
    m = len(p)
    order = np.argsort(p, kind="stable")
    out = np.empty(m)
    for rank, i in enumerate(order):
        out[i] = min(1.0, max((m - r) * p[order[r]] for r in range(rank + 1)))
    return out


def test_holm_matches_its_definition_and_ignores_missing_p():
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = rng.uniform(0, 0.2, size=rng.integers(1, 9))
        assert np.allclose(D.holm(p.tolist()), _holm_brute(p))
    got = D.holm([0.01, None, float("nan"), 0.02])
    assert got[0] == pytest.approx(0.02) and got[3] == pytest.approx(0.02) and np.isnan(got[1]) and np.isnan(got[2])
    # a null build: uniform p-values; Holm rejects (adjusted p < 0.05) in at most ~5% of builds
    rejects = sum(min(D.holm(rng.uniform(size=10).tolist())) < 0.05 for _ in range(400))
    assert rejects / 400 < 0.08


# --- the paper's values -------------------------------------------------------------------------------------------

def test_paper_values_never_read_none_found():
    for arch, r in paper.LAYERS.items():
        row = D.paper_layer_row(arch, ["layers", "fusion_layers", "plateau_from", "review_layer", "early_exit"])
        text = I.table([row]).text().iloc[0].tolist()
        assert "none found" not in text, (arch, text)
        if r["fusion_layers"] is None:
            assert row["fusion_layers"] == D.NOT_REPORTED
        assert row["early_exit"] == D.NOT_REPORTED
    assert D.paper_layer_row("qwen2_vl", ["review_layer"])["review_layer"] == "none (reported)"
    assert list(D.paper_layer_row("llava", ["fusion_layers"])["fusion_layers"]) == list(paper.FUSION_LAYERS)  # 0-based


def test_chapters_build_the_papers_rows_through_paper_value():
    """The chapters' tables beside the paper read the paper's rows through display.paper_layer_row / paper_value,
    so an unreported value cannot fall through to the table's "none found"."""
    for name in ("fusion", "review", "models"):
        src = "\n".join(c.source for c in nbformat.read(REPO / "notebooks" / f"{name}.ipynb", 4).cells
                        if c.cell_type == "code")
        assert "paper_layer_row" in src or "paper_value" in src, name
        assert not re.search(r"paper\.LAYERS\[key\]\s*\n\s*rows\.append", src), name


# --- numbers stated twice -----------------------------------------------------------------------------------------

def _attention_records(per_sample):
    """Last-layer rows of an attention run: (persistent tokens, how many of them irrelevant, relevant area)."""
    rows = []
    for i, (toks, irr, area) in enumerate(per_sample):
        rows.append(dict(id=f"s{i}", layer=3, n_tokens=36, persistent=list(toks), persistent_irrelevant=irr,
                         relevant_area=area))
    return pd.DataFrame(rows)


class _Run:
    def __init__(self, records):
        self.records = records


def test_persistent_tokens_per_question_is_one_number_in_verdict_and_table():
    recs = _attention_records([([1, 2], 2, 0.1), ([1], 1, 0.1), ([], 0, 0.1), ([], 0, 0.2), ([5, 1, 7], 1, 0.1)])
    row = next(r for r in report.attention_verdicts("m", recs, 4) if r["key"] == "noise")
    said = float(re.search(r"([\d.]+) persistent tokens per sample", row["effect"]).group(1))
    t = D.noise_table({"m": _Run(recs)}).iloc[0]
    assert t["persistent tokens per such question"] == said == 2.0
    assert t["with a persistent token"] == 3 and t["per question (all)"] == pytest.approx(6 / 5)
    assert t["most persistent"].startswith("token 1 (3×)")
    c = D.persistent_counts(recs).set_index("token")
    assert c.loc[1].tolist() == [2, 0, 1, 3] and c.loc[2, "irrelevant"] == 1 and c.loc[5, "mixed"] == 1


MEASURED = re.compile(r"\b\d{1,3}(?:\.\d+)?\s?%")


def test_chapter_prose_retypes_no_measured_percentage():
    """A percentage in a chapter's markdown cell is a number retyped from a run: it goes stale when the run changes
    ("Reading the crop rows" said 86% beside a table showing 93.3%). Prose reads numbers from the computed objects
    (f-strings in code cells); the paper's reported values come from fusion_utils.paper."""
    for name in CHAPTERS:
        nb = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", 4)
        for c in nb.cells:
            if c.cell_type == "markdown":
                assert not MEASURED.findall(c.source), f"{name}: {MEASURED.findall(c.source)} in {c.source[:80]!r}"


# --- fingerprints from one source ---------------------------------------------------------------------------------

def test_fingerprints_come_from_one_function():
    from fusion_utils import book, models

    name = "organism:llava"
    assert book.plan.model_fingerprints([name])[name] == models.checkpoint_fingerprint(name)
    src = "\n".join(c.source for c in nbformat.read(REPO / "notebooks" / "models.ipynb", 4).cells)
    assert 'row["fingerprint"] = checkpoint_fingerprint(lm.name)' in src


# --- colour semantics ---------------------------------------------------------------------------------------------

def _contrastive_data(ia):
    ia = np.asarray(ia, float)
    rec = pd.DataFrame([dict(id="s0", candidates="fusion", variant="soft", rho=0.2, lam=0.1, pred="red",
                             plain_pred="red", n_masked=1)])
    view = dict(I_A=ia, A_pre=np.full(ia.shape, 0.1), A_post=np.full(ia.shape, 0.1) + ia, pre=1, post=3,
                image=None, spatial=True, extent=None)
    return dict(candidate_sets=["fusion"], rhos=[0.2], lams=[0.1], apply_layer=2, fusion_layers=[1],
                samples=[dict(id="s0", question="what colour?", answers=["red"], relevant=None)],
                records=rec, views={"fusion": [view]})


def test_ia_map_red_means_gained_as_the_caption_says():
    pytest.importorskip("torch")
    fig = I.contrastive_figure(_contrastive_data([[0.3, -0.1], [0.0, -0.3]]))
    assert "Red on I_A: attention gained" in fig.caption
    ia = next(t for t in fig.state()["data"] if t.get("name") == "I_A")
    assert not ia.get("reversescale"), "a reversed scale turns 'gained' blue"
    scale = ia["colorscale"]
    assert isinstance(scale, list), "a named scale may silently fall back to another in plotly.js"
    low, high = _rgb(scale[0][1]), _rgb(scale[-1][1])
    assert low[2] > low[0] and high[0] > high[2], "low I_A (lost) must be blue, high I_A (gained) red"
    assert ia["zmin"] == -ia["zmax"] and ia["showscale"] and ia["colorbar"]["title"]["text"].startswith("I_A")
    # the static figure's map agrees: positive I_A is red there too
    cmap = plt.get_cmap(plots.DIVERGING_CMAP)
    assert cmap(1.0)[0] > cmap(1.0)[2] and cmap(0.0)[2] > cmap(0.0)[0]


def test_every_heatmap_has_an_explicit_scale_and_a_colour_bar():
    pytest.importorskip("torch")
    fig = I.contrastive_figure(_contrastive_data([[0.3, -0.1], [0.0, -0.3]]))
    heat = [t for t in fig.traces.values() if t["type"] == "heatmap"]
    assert heat and all(isinstance(t["colorscale"], list) and t["showscale"] and "colorbar" in t for t in heat)
    for scale in (MAGMA, DIVERGING):
        stops = [s for s, _ in scale]
        assert stops[0] == 0.0 and stops[-1] == 1.0 and stops == sorted(stops)
        assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for _, c in scale)
    assert I.HEATMAP is MAGMA


# --- verdicts at a glance -----------------------------------------------------------------------------------------

def _rows():
    return [
        dict(claim="c1", key="fusion_shallow", model="llava organism", rule="r1", chance="ch", effect="drop 0.2; more",
             uncertainty="95% CI [+0.1, +0.3]; sign-flip p < 0.001", n=60, **{"needed n": "≈ 10"},
             verdict="reproduces", reported="rep", split="dev/test", p=0.0005, value=0.2, ci=(0.1, 0.3)),
        dict(claim="c2", key="plateau", model="qwen organism", rule="r2", chance="", effect="late drop +0.000",
             uncertainty="late drop 95% CI [+0, +0], below 0.05", n=60, **{"needed n": "—"},
             verdict="inconclusive", reported="", split="", p=0.3, value=0.0, ci=(0, 0)),
        dict(claim="c3", key="noise", model="qwen organism", rule="r3", verdict="n/a: no relevance labels", p=None),
    ]


def test_verdict_table_fits_a_column_and_folds_the_rules():
    html = D.verdicts_html(D.verdict_rows(_rows(), "fusion"), "fusion")
    head = re.search(r"<thead>(.*?)</thead>", html).group(1)
    assert re.findall(r"<th>(.*?)</th>", head) == ["Claim", "Model", "Verdict", "Effect (95% CI)"]
    assert "table-layout:fixed" in html and "@media (max-width:640px)" in html
    details = re.search(r"<details.*?</details>", html, re.S).group(0)
    for word in ("Rule:", "Chance level:", "Split:", "Test, p-value and CI:", "n that would decide"):
        assert word in details
    assert "[+0, +0]" not in html and "every resample gives zero" in html
    assert html.count('class="fu-badge') == 3 and 'fu-badge yes' in html and 'fu-badge na' in html
    assert 'id="v-fusion-fusion-shallow-llava-organism"' in html


def test_verdict_index_collects_every_chapter_with_holm_and_links(tmp_path):
    files = tmp_path / "files"
    for ch, rows in (("fusion", _rows()[:2]), ("attention", _rows()[2:])):
        (files / ch).mkdir(parents=True)
        (files / ch / "verdicts.json").write_text(json.dumps(D.verdict_rows(rows, ch)))
    page = verdict_index.write_page(files, tmp_path / "gen", ["fusion", "review", "attention"]).read_text()
    assert "**3 verdicts** over 2 chapters" in page and "```{raw} html" in page
    assert page.count("<tr id=") == 3 and "chapters/fusion.html#v-fusion-plateau-qwen-organism" in page
    assert "Holm p" in page and "0.001" in page and ">0.3<" in page  # 0.0005 x 2 = 0.001; 0.3 x 1
    (files / "review").mkdir()
    (files / "review" / "verdicts.json").write_text("{")
    with pytest.raises(ValueError, match="rebuild the review chapter"):
        verdict_index.collect(files, ["review"])


def test_chapter_files_are_published_beside_the_html(tmp_path, monkeypatch):
    monkeypatch.setenv(D.OUT_ENV, str(tmp_path / "files"))
    paths = D.save_records({"llava organism masking": pd.DataFrame({"id": [1], "acc": [0.5]})}, "fusion")
    assert paths[0].name == "llava_organism_masking.csv"
    links = D.downloads_html("fusion", paths)._repr_html_()
    executed = tmp_path / "chapters"
    executed.mkdir()
    (executed / "fusion.ipynb").write_text("{}")
    out = verdict_index.publish(tmp_path / "files", executed, tmp_path / "html", ["fusion"])
    for href in re.findall(r'href="\.\./\.\./([^"]+)"', links):
        assert (tmp_path / "html" / href).is_file(), href
    assert out == tmp_path / "html" / "_chapter_files"


def test_static_figure_has_its_caption_and_closes():
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    html = D.figure(fig, "A line. Look for its slope.")._repr_html_()
    assert "<figcaption><b>Figure.</b> A line. Look for its slope.</figcaption>" in html
    assert 'alt="A line"' in html and not plt.get_fignums()
    with pytest.raises(ValueError, match="caption"):
        D.figure(plt.figure(), " ")


def test_static_figure_is_a_jpeg_only_when_a_picture_makes_its_png_large():
    import numpy as np

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    assert "data:image/png" in D.figure(fig, "A line. Look for its slope.")._repr_html_()  # text stays sharp
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.imshow(np.random.default_rng(0).random((300, 500, 3)))  # a photograph's worth of detail
    html = D.figure(fig, "Noise. Look at nothing.")._repr_html_()
    assert "data:image/jpeg" in html


def test_accuracy_labels_tell_close_values_apart():
    t = pd.DataFrame({"method": ["plain", "crop"], "accuracy": [0.912, 0.934], "model": ["a", "a"]})
    fig = plots.accuracy_bars(t)
    labels = [x.get_text() for x in fig.axes[0].texts]
    assert labels == ["91.2%", "93.4%"]
    leg = fig.axes[0].get_legend()
    assert leg is not None and leg.get_bbox_to_anchor().y0 < fig.axes[0].get_window_extent().y0 + 1


def test_masking_runs_skip_the_persistent_probe(tmp_path):
    for key, onward, fusion in (("a", False, [0, 1]), ("b", True, list(range(11)))):
        d = tmp_path / "masking" / key
        d.mkdir(parents=True)
        cfg = {"model": {"name": "m"}, "dataset": {"name": "world", "n": 4}, "params": {"onward": onward, "window": 1}}
        (d / "config.json").write_text(json.dumps({"config": cfg}))
        drop = [0.5 if i in fusion else 0.0 for i in range(16)]
        pd.DataFrame({"layer": range(16), "mode": "zero", "accuracy": [0.9 - x for x in drop],
                      "plain_accuracy": 0.9, "drop": drop}).to_csv(d / "summary.csv", index=False)
    t = D.masking_runs(tmp_path)
    assert len(t) == 1 and list(t.iloc[0]["fusion_layers"]) == [0, 1]


def test_interactive_stays_under_800_lines():
    for mod in ("interactive.py", "figure_html.py", "plots.py", "report/display.py", "book/verdict_index.py"):
        n = len((REPO / "fusion_utils" / mod).read_text().splitlines())
        assert n < 800, (mod, n)


def test_every_interactive_figure_and_chapter_figure_has_a_caption():
    """Chapter cells that draw a static figure pass it through display.figure with a caption (or carry a myst-nb
    figure caption in their metadata)."""
    for name in CHAPTERS:
        for c in nbformat.read(REPO / "notebooks" / f"{name}.ipynb", 4).cells:
            if c.cell_type != "code" or "plots." not in c.source:
                continue
            captioned = "D.figure(" in c.source or c.metadata.get("mystnb", {}).get("figure", {}).get("caption")
            assert captioned, f"{name}: a figure without a caption: {c.source[:100]!r}"
    src = (REPO / "fusion_utils" / "interactive.py").read_text()
    for fn in ("masking_figure", "attention_figure", "contrastive_figure", "layers_figure", "threshold_figure"):
        body = src[src.index(f"def {fn}("):]
        body = body[:body.index("\ndef ", 10)] if "\ndef " in body[10:] else body
        assert "caption=" in body, fn


def test_make_site_assembles_every_build_with_the_drivers_index(tmp_path, capsys):
    from conftest import load_script

    site = load_script("assemble_site")
    builds = tmp_path / "_build"
    for name in ("default", "llava-1.5-7b"):
        (builds / name / "html" / "_static").mkdir(parents=True)
        (builds / name / "html" / "index.html").write_text("<html></html>")
        (builds / name / "src").mkdir()
        (builds / name / "build_info.json").write_text(json.dumps({"params_file": f"book/params/{name}.yml",
                                                                    "models": ["m"], "built_at": name}))
    (builds / "half" / "html").mkdir(parents=True)  # a build still running: no build_info.json yet
    assert site.main(["--builds", str(builds), "--out", str(tmp_path / "site")]) == 0
    index = (tmp_path / "site" / "index.html").read_text()
    for name in ("default", "llava-1.5-7b"):
        assert f'href="{name}/html/index.html"' in index
        assert (tmp_path / "site" / name / "html" / "index.html").is_file()
        assert not (tmp_path / "site" / name / "src").exists()
    assert "half" not in index and (tmp_path / "site" / ".nojekyll").is_file()
    assert site.main(["--builds", str(tmp_path / "none"), "--out", str(tmp_path / "s2")]) == 1
    assert "run `make book`" in capsys.readouterr().err


def test_chapter_parameters_for_the_appendix(tmp_path, monkeypatch):
    monkeypatch.setenv(D.OUT_ENV, str(tmp_path))
    D.downloads_html("contrastive", [], params=dict(threshold=0.05, rho=0.2, lam=0.1))
    assert verdict_index.chapter_parameters(tmp_path, ["fusion", "contrastive"]) == {
        "contrastive": {"threshold": 0.05, "rho": 0.2, "lam": 0.1}}
    md = verdict_index.parameters_markdown(tmp_path, ["contrastive"])
    assert "| contrastive | `threshold = 0.05`, `rho = 0.2`, `lam = 0.1` |" in md


def test_layers_figure_reports_the_benchmarks_own_accuracy():
    from fusion_utils import interactive as I

    # MMBench: question 7 asked twice (options rotated), right once: CircularEval counts it wrong; question 8 right
    early = pd.DataFrame({"id": ["7", "1000007", "8", "1000008"], "layer": 0, "pred": ["A", "B", "C", "C"],
                          "score": [1.0, 0.0, 1.0, 1.0]})
    hell = pd.DataFrame({"id": early["id"], "layer": 0, "hellinger": 0.1})
    circular = I.layers_figure(hell, early, scorer="option")
    per_row = I.layers_figure(hell, early)
    assert "early-exit accuracy 50%" in circular.states["0"]["text"]
    assert "early-exit accuracy 75%" in per_row.states["0"]["text"]
