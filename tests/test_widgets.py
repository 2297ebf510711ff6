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
