"""fusion_utils.widgets with a tiny LLaVA and two world samples: explorers build, recompute on a control change,
use their caches; `explore` builds the kernel-free figure and the live explorer from the same data; `in_live_kernel`
follows its documented rule."""
from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("ipywidgets")
import ipywidgets  # noqa: E402

from fusion_utils import load_model, widgets  # noqa: E402
from fusion_utils.data import load_dataset  # noqa: E402
from fusion_utils.interactive import Control, InteractiveFigure, table  # noqa: E402
from fusion_utils.testing import tiny_model_dir  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lm():
    return load_model(str(tiny_model_dir("llava")))


@pytest.fixture(scope="module")
def ds():
    return load_dataset("world", n=2)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_attention_explorer_recomputes_and_caches(lm, ds):
    plt.close("all")  # what earlier test modules left open is not the explorer's
    ex = widgets.attention_explorer(lm, ds)
    assert isinstance(ex, ipywidgets.VBox) and ex.state["error"] is None
    assert ex.controls["layer"].max == lm.num_layers - 1
    assert ex.state["computed"] == 1 and ex.n_updates == 1
    png0 = ex.figure.value
    assert png0[:4] == b"\x89PNG"
    ex.controls["layer"].value = 0
    assert ex.n_updates == 2 and ex.state["layer"] == 0 and "layer 0 of" in ex.text.value
    assert ex.figure.value != png0 and ex.state["computed"] == 1  # same sample: maps reused
    ex.controls["sample"].value = 1
    assert ex.state["computed"] == 2 and ds[1].question in ex.text.value
    ex.controls["sample"].value = 0
    assert ex.state["computed"] == 2  # cached
    assert ex.state["error"] is None
    assert len(plt.get_fignums()) == 0  # rendered to PNG and closed, nothing left for the inline backend


def test_masking_explorer(lm, ds):
    ex = widgets.masking_explorer(lm, ds)
    assert ex.state["error"] is None and ex.state["computed"] == 1
    assert set(ex.controls) == {"sample", "mode", "layer", "window"}
    p_before = ex.state["p_mask"]
    ex.controls["layer"].value = lm.num_layers - 1  # every layer of a (sample, mode, window) is computed at once
    assert ex.state["computed"] == 1 and f"masked at layer {lm.num_layers - 1}" in ex.text.value
    ex.controls["mode"].value = "knockout"
    assert ex.state["mode"] == "knockout" and ex.state["computed"] == 2 and "knockout" in ex.text.value
    assert 0.0 <= ex.state["p_plain"] <= 1.0 and 0.0 <= ex.state["p_mask"] <= 1.0
    ex.controls["window"].value = lm.num_layers  # a window over every layer
    assert ex.state["error"] is None and ex.state["window"] == lm.num_layers
    assert isinstance(p_before, float)


def test_contrastive_explorer(lm, ds):
    pytest.importorskip("fusion_utils.experiments.contrastive")
    L = lm.num_layers
    ex = widgets.contrastive_explorer(lm, ds, fusion_layers=[0, 1], apply_layer=L - 2)
    assert ex.state["error"] is None, ex.state["error"]
    assert ex.state["pre"] in (0, 1) and ex.state["candidates"] == [0, 1]
    ex.controls["rho"].value = 0.0
    assert ex.state["n_masked"] == 0 and ex.state["answer"] == ex.state["plain"]
    ex.controls["rho"].value = 0.5
    assert ex.state["n_masked"] > 0
    ex.controls["lam"].value = 1.0  # λ = 1 changes nothing
    assert ex.state["answer"] == ex.state["plain"]
    ex.controls["kind"].value = "all"
    assert ex.state["candidates"] == list(range(L - 1)) and ex.state["error"] is None
    assert "i* =" in ex.text.value


def test_contrastive_explorer_shows_errors(lm, ds):
    pytest.importorskip("fusion_utils.experiments.contrastive")
    ex = widgets.contrastive_explorer(lm, ds, fusion_layers=[], apply_layer=1)
    assert "fusion_layers" in ex.state["error"] and "color:#b00" in ex.text.value
    ex.controls["kind"].value = "shallow"  # recovers once the choice is valid
    assert ex.state["error"] is None


def test_figure_returns_an_interactive_figure(lm, ds):
    L = lm.num_layers
    fig = widgets.figure("masking", lm, ds, windows=(1, 2))
    assert isinstance(fig, InteractiveFigure) and [c.name for c in fig.controls] == ["question", "mask", "window",
                                                                                    "layer"]
    assert len(fig.states) == 2 * 2 * 2 * L
    fig = widgets.figure("contrastive", lm, ds, fusion_layers=[0, 1], apply_layer=L - 2, candidate_sets=("fusion",),
                         rhos=(0.0, 0.5), lams=(0.1,))
    none, half = fig.state(ρ=0.0), fig.state(ρ=0.5)
    assert len(none["data"][-1]["x"]) == 0 and len(half["data"][-1]["x"]) > 0  # the masked tokens follow ρ
    with pytest.raises(ValueError, match="Unknown explorer"):
        widgets.figure("nope", lm, ds)


def test_explore_builds_figure_and_live_explorer_from_the_same_data(lm, ds, monkeypatch):
    """One computation: the live explorer shown in a live kernel is seeded with the figure's data (computes 0)."""
    shown = []
    monkeypatch.setattr(widgets, "in_live_kernel", lambda: True)
    import IPython.display

    monkeypatch.setattr(IPython.display, "display", shown.append)
    fig = widgets.explore("attention", lm, ds)
    assert isinstance(fig, InteractiveFigure) and len(shown) == 1
    ex = shown[0]
    assert ex.state["computed"] == 0, "the explorer must reuse the figure's data"
    ex.controls["sample"].value = 1
    assert ex.state["computed"] == 0 and ex.state["error"] is None
    # the figure and the explorer report the same number at the same layer
    ex.controls["layer"].value = 1
    value = ex.state["rel_mass"] if ex.state["rel_mass"] is not None else ex.state["max_share"]
    assert f"{value:.2f}" in fig.state(question=1, layer=1)["text"]


def test_explore_is_figure_only_when_not_live(lm, ds, monkeypatch):
    monkeypatch.setattr(widgets, "in_live_kernel", lambda: False)
    shown = []
    import IPython.display

    monkeypatch.setattr(IPython.display, "display", shown.append)
    fig = widgets.explore("masking", lm, ds[:1])
    assert isinstance(fig, InteractiveFigure) and shown == []


class _FakeKernelShell:
    kernel = object()


def test_in_live_kernel_rule(monkeypatch):
    import IPython

    for k in (widgets.STATIC_ENV, widgets.LIVE_ENV):
        monkeypatch.delenv(k, raising=False)
    assert widgets.in_live_kernel() is False  # pytest: no kernel
    monkeypatch.setattr(IPython, "get_ipython", lambda: _FakeKernelShell())
    monkeypatch.setattr(widgets, "_parent_cmdline", lambda: "/usr/bin/python /usr/bin/jupyter-lab")
    assert widgets.in_live_kernel() is True
    monkeypatch.setattr(widgets, "_parent_cmdline", lambda: "python -m papermill in.ipynb out.ipynb")
    assert widgets.in_live_kernel() is False
    monkeypatch.setattr(widgets, "_parent_cmdline", lambda: "python /venv/bin/fusion-utils book build")
    assert widgets.in_live_kernel() is False
    monkeypatch.setattr(widgets, "_parent_cmdline", lambda: "jupyter-lab")
    monkeypatch.setenv("PAPERMILL_INPUT_PATH", "x.ipynb")
    assert widgets.in_live_kernel() is False
    monkeypatch.delenv("PAPERMILL_INPUT_PATH")
    monkeypatch.setenv(widgets.STATIC_ENV, "1")
    assert widgets.in_live_kernel() is False
    monkeypatch.setenv(widgets.LIVE_ENV, "1")
    assert widgets.in_live_kernel() is False  # STATIC wins
    monkeypatch.setenv(widgets.STATIC_ENV, "0")
    monkeypatch.setattr(IPython, "get_ipython", lambda: None)
    assert widgets.in_live_kernel() is True  # LIVE forces


# --- the figure object and the table, without a model -----------------------------------------------------------

def _tiny_figure():
    fig = InteractiveFigure("t", [Control("k", [1, 2], kind="slider"), Control("s", ["a", "b"])], {"height": 200})
    for i in range(2):
        for j in range(2):
            fig.traces[f"{i}{j}"] = {"type": "scatter", "y": [i, j]}
            fig.states[f"{i}|{j}"] = {"data": [f"{i}{j}"], "text": "</script><b>x</b>"}
    return fig


def test_interactive_figure_html_is_self_contained_and_safe():
    fig = _tiny_figure()
    html = fig.to_html()
    assert html.count("<script") == 2 and 'type="range"' in html and "<select" in html
    assert "</script><b>" not in html, "a state's text must not end the JSON <script> early"
    assert not re.search(r"(src|href)=\"(https?:)?//", html), "the figure loads nothing remote"
    assert fig.state(k=2, s="b")["data"] == [{"type": "scatter", "y": [1, 1]}]


def test_interactive_figure_names_what_is_missing():
    fig = _tiny_figure()
    del fig.states["1|0"]
    with pytest.raises(ValueError, match="no state for"):
        fig.check()
    with pytest.raises(ValueError, match="is not a choice of 's'"):
        _tiny_figure().state(s="c")
    with pytest.raises(ValueError, match="has no values; give it at least one choice"):
        Control("empty", [])


def test_table_has_no_index_and_says_none_found():
    t = table([{"model": "a", "fusion_layers": [], "review_layer": None, "acc": 0.51234},
               {"model": "b", "fusion_layers": [2, 4], "review_layer": 29.0, "acc": float("nan")}])
    html = t._repr_html_()
    assert "none found" in html and "NaN" not in html and "2, 4" in html and "0.512" in html
    assert "<td>29</td>" in html, "a layer index stays an integer"
    assert "<th></th>" not in html and ">0</th>" not in html, "no pandas index column"


def test_masking_runs_lists_every_recorded_run(lm, ds, tmp_path):
    from fusion_utils.experiments.masking import masking
    from fusion_utils.interactive import masking_runs

    masking(lm, ds, out=str(tmp_path), progress=False)
    masking(lm, ds, modes=("zero", "knockout"), out=str(tmp_path), progress=False)  # same model and data: one row
    masking(lm, ds[:1], out=str(tmp_path), progress=False)  # another build's data: its own run
    (tmp_path / "masking" / "half-written").mkdir()
    (tmp_path / "masking" / "half-written" / "config.json").write_text("{")
    t = masking_runs(tmp_path)
    assert sorted(t["questions"]) == [1, 2] and set(t["layers"]) == {lm.num_layers}
    assert list(t.columns)[:2] == ["model", "data"]


# --- every question of the build: compact spec, states beside the page -------------------------------------------

def _expand(spec: dict, key: str) -> dict:
    """What the page's script draws for state ``key`` (bases merged, fragments applied, snippets joined)."""
    st = spec["states"][key]
    data = []
    for t in st["data"]:
        t = dict(spec["traces"][t])
        base = t.pop("@", None)
        data.append({**spec["bases"][base], **t} if base is not None else t)
    layout = dict(spec["layout"])
    for part in st.get("layout", []):
        layout.update(spec["layouts"][part])
    if "images" in layout:  # a picture under several panels is stored once: "=i" names image i's source
        layout["images"] = [dict(im, source=layout["images"][int(im["source"][1:])]["source"])
                            if str(im.get("source", "")).startswith("=") else im for im in layout["images"]]
    text = st.get("text", "")
    text = "".join(spec["snippets"][t] if isinstance(t, int) else t for t in text) if isinstance(text, list) else text
    return {"data": data, "layout": layout, "text": text}


def test_compact_spec_draws_what_the_figure_holds(lm, ds):
    import json

    for fig in (widgets.figure("attention", lm, ds),
                widgets.figure("contrastive", lm, ds, fusion_layers=[0, 1], apply_layer=lm.num_layers - 2,
                               candidate_sets=("fusion",), rhos=(0.2,), lams=(0.1,))):
        _check_compact(fig)
    spec = json.dumps(fig.spec())
    assert spec.count("data:image/jpeg") == len(ds), "one picture per question, however many panels draw it"


def _check_compact(fig):
    import json

    spec = json.loads(json.dumps(fig.spec()))  # as the page reads it (string keys)
    spec["snippets"] = {int(k): v for k, v in spec["snippets"].items()}
    assert spec["bases"], "the heatmaps' repeated settings are factored out"
    for key in fig.states:
        assert _expand(spec, key) == json.loads(json.dumps(fig.state(**dict(zip(
            [c.name for c in fig.controls], [c.choices[int(i)] for c, i in zip(fig.controls, key.split("|"))])))))
    plain = len(json.dumps({"traces": fig.traces, "states": fig.states, "layouts": fig.layouts}))
    assert len(json.dumps(spec)) < plain


def test_beside_page_keeps_three_questions_and_writes_the_rest(lm, tmp_path, monkeypatch):
    import json

    from fusion_utils.report.display import OUT_ENV

    ds6 = load_dataset("world", n=5)
    fig = widgets.figure("masking", lm, ds6, windows=(1,))
    assert fig.beside_page("ch").outside is None, "a notebook run by hand keeps every state in the page"
    whole = fig.to_html()
    monkeypatch.setenv(OUT_ENV, str(tmp_path))
    html = fig.beside_page("ch", keep=2).to_html()
    path, url, _ = fig.outside
    assert path.parent == tmp_path / "ch" and url == f"../../_chapter_files/ch/{path.name}"
    assert len(html) < len(whole)
    spec = json.loads(re.search(r'class="fu-spec">(.*?)</script>', html).group(1).replace("<\\/", "</"))
    text = path.read_text()
    away = json.loads(text[text.index("]=") + 2:].rstrip().rstrip(";"))
    assert spec["outside"]["url"] == url and spec["outside"]["name"] == path.name
    assert {k.split("|")[0] for k in spec["states"]} == {"0", "1"}
    assert {k.split("|")[0] for k in away["states"]} == {"2", "3", "4"}
    for part in ("traces", "layouts", "snippets", "states"):  # together, the page and the file hold everything
        spec[part].update(away[part])
    spec["snippets"] = {int(k): v for k, v in spec["snippets"].items()}
    key = f"4|0|{lm.num_layers - 1}"
    assert _expand(spec, key)["text"] == fig.state(question=fig.controls[0].choices[4], layer=lm.num_layers - 1,
                                                   mask=fig.controls[1].choices[0])["text"]
    assert 'type="search"' not in html, "five questions need no search box"


def test_contrastive_views_by_set_match_the_experiment(lm, ds):
    import numpy as np

    from fusion_utils.experiments.contrastive import contrastive_views, contrastive_views_by_set

    by = contrastive_views_by_set(lm, list(ds), ("fusion", "shallow", "all"), [0, 1])
    for kind in ("fusion", "shallow", "all"):
        ref = contrastive_views(lm, list(ds), kind, [0, 1], post_prompt=None)
        for a, b in zip(by[kind], ref):
            assert a["pre"] == b["pre"] and np.allclose(a["I_A"], b["I_A"], atol=1e-6)


def test_contrastive_figure_from_a_chapters_partial_records(lm, ds):
    """The chapter's records hold one (ρ, λ) per candidate set: the explorer runs the whole grid only on the first
    ``complete`` questions and names the settings it lacks for the others."""
    from fusion_utils.experiments.harness import run

    L = lm.num_layers
    kw = dict(fusion_layers=[0, 1], apply_layer=L - 2)
    chapter = run("contrastive", lm, ds, out=None, progress=False, variants=("soft",), candidates=("fusion",),
                  rhos=(0.2,), lams=(0.1,), **kw).records
    fig = widgets.figure("contrastive", lm, ds, candidate_sets=("fusion",), rhos=(0.2, 0.5), lams=(0.1,),
                         records=chapter, complete=1, **kw)
    q0, q1 = fig.controls[0].choices
    assert "did not run" not in fig.state(question=q0, ρ=0.5)["text"]  # complete: computed
    assert "did not run" in fig.state(question=q1, ρ=0.5)["text"]
    assert "did not run" not in fig.state(question=q1, ρ=0.2)["text"] and "plain:" in fig.state(question=q1)["text"]


def test_every_question_puts_the_picked_first_then_groups_families():
    from fusion_utils.interactive import every_question

    ds8 = load_dataset("world", n=8)
    picked = [ds8[5]]
    order = every_question(ds8, first=picked)
    assert order[0] is ds8[5] and len(order) == 8 and {s.id for s in order} == {s.id for s in ds8}
    fams = [s.family for s in order[1:]]
    assert all(fams.index(f) + fams.count(f) - 1 == len(fams) - 1 - fams[::-1].index(f) for f in set(fams)), \
        "each family's questions sit together"
