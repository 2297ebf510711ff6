"""Explorers for a live Jupyter session (ipywidgets), and the kernel-free figures of the rendered book.

Three explorers, each an `Explorer` (an ``ipywidgets.VBox``: controls, a text line, a figure):

- `attention_explorer(lm, samples)` -- sample picker + layer slider: the last token's attention over the image at
  that layer, and the relevant-vs-irrelevant mass curve of the sample with a marker at the layer;
- `masking_explorer(lm, samples)` -- sample, masking mode (zero / knockout), layer and window: the answer under the
  mask and the probability of the unmasked answer's first token, masked vs unmasked, over all layers;
- `contrastive_explorer(lm, samples, fusion_layers, apply_layer)` -- candidate set, ρ and λ: A_pre / A_post / I_A and
  the soft-masked answer vs the plain one.

The explorers compute nothing of their own: they call the data functions of `fusion_utils.interactive`
(`masking_data`, `attention_data`, `contrastive_data`), which run the experiments' own per-batch functions, and
cache the results per sample and setting, so moving a slider back is instant. The latest choices and results are in
``explorer.state`` (``state["error"]`` holds the last error message, shown in red in the widget).

A rendered book has no kernel. `explore` computes the data once and builds from it both the kernel-free figure
(`fusion_utils.interactive.InteractiveFigure`, Plotly: it moves in the static HTML) and, in a live kernel, the
explorer seeded with the same data. Chapters use::

    from fusion_utils import widgets as W
    W.explore("attention", lm, samples)      # the figure is the cell's output; live: the explorer is shown too

See `in_live_kernel` for the rule that decides "live".
"""
from __future__ import annotations

import html
import io
import os
import re
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from . import interactive, plots
from .methods.contrastive import CANDIDATE_SETS, candidate_layers
from .methods.softmask import soft_mask_tokens

LIVE_ENV = "FUSION_UTILS_LIVE"
STATIC_ENV = "FUSION_UTILS_STATIC"
_EXECUTORS = re.compile(r"papermill|nbconvert|nbclient|jupyter[-_]book|fusion_utils[./]book|fusion[-_]utils\S*\s+book"
                        r"|pytest")
_TRUE = {"1", "true", "yes", "on"}

__all__ = ["in_live_kernel", "Explorer", "attention_explorer", "masking_explorer", "contrastive_explorer", "figure",
           "explore", "CANDIDATE_SETS"]


# --- live or static ---------------------------------------------------------------------------------------------

def _env_flag(name: str) -> bool | None:
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return None
    return v.strip().lower() in _TRUE


def _parent_cmdline() -> str:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").lower()
    except OSError:  # not Linux, or no permission: rely on the other rules
        return ""


def in_live_kernel() -> bool:
    """Whether interactive widgets can be shown: True in a Jupyter kernel with a frontend, False otherwise.

    The rule, first match wins:

    1. ``FUSION_UTILS_STATIC`` set to 1/true/yes/on -> False (the book driver sets it in its chapter kernels); ``FUSION_UTILS_LIVE`` set to 1/true -> True (force widgets, e.g. in a frontend not recognised below);
       either set to 0/false is ignored.
    2. Not inside an IPython *kernel* (plain Python, pytest, terminal IPython) -> False.
    3. Any ``PAPERMILL_*`` / ``NBCONVERT_*`` environment variable, or a kernel launched by a batch executor (its
       parent process's command line names papermill, nbconvert, nbclient, jupyter-book, the ``fusion-utils book``
       driver or pytest; read from /proc on Linux) -> False.
    4. Otherwise (a kernel started by JupyterLab / Notebook / VS Code) -> True.
    """
    if _env_flag(STATIC_ENV):
        return False
    if _env_flag(LIVE_ENV):
        return True
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return False
    ip = get_ipython()
    if ip is None or getattr(ip, "kernel", None) is None:
        return False
    if any(k.startswith(("PAPERMILL_", "NBCONVERT_")) for k in os.environ):
        return False
    return not _EXECUTORS.search(_parent_cmdline())


# --- shared helpers ---------------------------------------------------------------------------------------------

def _widgets():
    try:
        import ipywidgets
    except ImportError as e:  # pragma: no cover
        raise ImportError("The explorers need ipywidgets (pip install ipywidgets); the *_static functions do not.") from e
    return ipywidgets


def _samples(samples) -> list:
    out = list(samples)
    if not out:
        raise ValueError("The explorer needs at least one sample.")
    return out


def _png(fig, dpi: int = 90) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)  # our own figure: rendered to bytes, never shown by the inline backend
    return buf.getvalue()


def _label(i: int, s) -> str:
    q = s.question if len(s.question) <= 70 else s.question[:67] + "..."
    return f"{i}: {q}"


def _esc(x) -> str:
    return html.escape(_printable(x))


def _printable(x) -> str:
    """Model output made safe to show: control characters replaced by U+FFFD."""
    return "".join(ch if ch.isprintable() else "\ufffd" for ch in str(x))


try:
    import ipywidgets as _ipw
except ImportError:  # pragma: no cover - the static functions still work
    _ipw = None


def _question_html(s) -> str:
    return f"<b>{_esc(s.question)}</b> (gold: {_esc(', '.join(s.answers))})"


def _answer_html(ans, reference) -> str:
    """An answer in code style, flagged when it differs from the reference (unmasked / plain) answer."""
    changed = "" if ans == reference else " <b style='color:#b00'>(changed)</b>"
    return f"<code>{_esc(ans)}</code>{changed}"


def _sample_picker(w, samples):
    return w.Dropdown(options=[(_label(i, s), i) for i, s in enumerate(samples)], value=0, description="sample",
                      layout=w.Layout(width="420px"))


def _explorer_inputs(lm, samples):
    """What every explorer starts from: the ipywidgets module, ``samples`` as given (the data functions read the
    dataset's post-prompt from it), the samples as a non-empty list, the model's depth, and the sample picker."""
    w = _widgets()
    listed = _samples(samples)
    return w, samples, listed, lm.num_layers, _sample_picker(w, listed)


def _explorer_class():
    if Explorer is None:  # pragma: no cover
        _widgets()
    return Explorer


if _ipw is not None:
    class Explorer(_ipw.VBox):
        """An explorer: ``controls`` (name -> widget), ``text`` (HTML), ``figure`` (Image, PNG), ``state`` (the
        latest choices and results; ``state["computed"]`` counts model recomputations, ``state["error"]`` the last
        error), ``n_updates`` (renders so far). ``refresh()`` recomputes what is not cached and redraws."""

        def __init__(self, controls: dict, update, **kw):
            self.controls = controls
            self.text = _ipw.HTML()
            self.figure = _ipw.Image(format="png", layout=_ipw.Layout(max_width="100%"))
            self.state: dict = {"error": None, "computed": 0}
            self.cache: dict = {}
            self.n_updates = 0
            self._update = update
            box = _ipw.HBox(list(controls.values()), layout=_ipw.Layout(flex_flow="row wrap"))
            super().__init__(children=[box, self.text, self.figure], **kw)
            for c in controls.values():
                c.observe(self.refresh, names="value")
            self.refresh()

        def refresh(self, *_):
            try:
                values = {k: c.value for k, c in self.controls.items()}
                text, fig = self._update(self, **values)
                self.state.update(values, error=None)
                self.text.value = text
                if fig is not None:
                    self.figure.value = _png(fig)
            except Exception as e:  # shown in the widget: a callback's exception would only reach the kernel log
                self.state["error"] = f"{type(e).__name__}: {e}"
                self.text.value = f"<span style='color:#b00'>{_esc(self.state['error'])}</span>"
            self.n_updates += 1
else:  # pragma: no cover
    Explorer = None


# --- attention ----------------------------------------------------------------------------------------------------

def _attention_draw(axes, v: dict, layer: int):
    """Heatmap of ``layer`` on axes[0]; the sample's relevant/irrelevant mass curves (or largest share) on axes[1]."""
    ax_h, ax_c = axes
    spatial = bool(v["spatial"])
    plots.draw_heatmap(ax_h, v["maps2d"][layer], v["image"] if spatial else None, v["relevant"] if spatial else None,
                       spatial=spatial, title=f"layer {layer}", extent=v["extent"])
    t = v["records"]
    cols = [c for c in ("rel_mass", "irr_mass") if c in t.columns and t[c].notna().any()]
    for col, label in zip(cols, ("relevant", "irrelevant")):
        ax_c.plot(t["layer"], t[col], "-o", ms=3, label=label)
    if not cols:
        ax_c.plot(t["layer"], t["max_share"], "-o", ms=3, label="largest token share")
    y = float(t.loc[t["layer"] == layer, cols[0] if cols else "max_share"].iloc[0])
    ax_c.plot([layer], [y], "o", ms=10, mfc="none", mec="black", mew=1.5, gid="marker")
    ax_c.set_xlabel("layer")
    ax_c.set_title("attention mass by layer", fontsize=9)
    plots.integer_layers(ax_c)
    ax_c.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the curves, never over them


def attention_explorer(lm, samples, *, layer: int | None = None, data: Sequence[dict] | None = None):
    """Sample picker + layer slider over the last token's attention to the image (computed per sample by
    `interactive.attention_data`, cached; ``data`` seeds the cache with that function's result for ``samples``)."""
    w, ds, samples, L, picker = _explorer_inputs(lm, samples)
    controls = {
        "sample": picker,
        "layer": w.IntSlider(value=L // 2 if layer is None else layer, min=0, max=L - 1, step=1,
                             description="layer", continuous_update=False),
    }
    seed = dict(enumerate(data)) if data is not None else {}

    def update(ex, sample, layer):
        s = samples[sample]
        if sample in seed:
            ex.cache[sample] = seed.pop(sample)
        if sample not in ex.cache:
            ex.cache[sample] = interactive.attention_data(lm, [s], dataset=ds)[0]
            ex.state["computed"] += 1
        v = ex.cache[sample]
        with plots.figure_style():
            fig, axes = plt.subplots(1, 2, figsize=(plots.BOOK_WIDTH, 3.4), gridspec_kw={"width_ratios": [1, 1.4]})
            _attention_draw(axes, v, layer)
            fig.tight_layout()
        t = v["records"].set_index("layer")
        ex.state["max_share"] = float(t.loc[layer, "max_share"])
        has_rel = "rel_mass" in t.columns and t["rel_mass"].notna().any()
        ex.state["rel_mass"] = float(t.loc[layer, "rel_mass"]) if has_rel else None
        extra = "" if ex.state["rel_mass"] is None else f" · mass on relevant tokens {ex.state['rel_mass']:.2f}"
        grid = "" if v["spatial"] else " · <i>no spatial grid (query tokens)</i>"
        return f"{_question_html(s)} · layer {layer} of {L}{extra}{grid}", fig

    return _explorer_class()(controls, update)


# --- masking ------------------------------------------------------------------------------------------------------

def masking_explorer(lm, samples, *, layer: int = 0, data: pd.DataFrame | None = None):
    """Masking mode, layer and window: the answer under the mask, and p(unmasked answer's first token) masked vs
    unmasked (curve over all layers, marker at the chosen one). Computed per (sample, mode, window) by
    `interactive.masking_data`; ``data`` seeds the cache with that function's result."""
    w, ds, samples, L, picker = _explorer_inputs(lm, samples)
    controls = {
        "sample": picker,
        "mode": w.ToggleButtons(options=["zero", "knockout"], value="zero", description="mask"),
        "layer": w.IntSlider(value=layer, min=0, max=L - 1, description="layer", continuous_update=False),
        "window": w.IntSlider(value=1, min=1, max=L, description="window", continuous_update=False),
    }

    def records(ex, sample, mode, window):
        key = (sample, mode, window)
        if key not in ex.cache:
            sid = str(samples[sample].id)
            have = None
            if data is not None:
                have = data[(data["id"].astype(str) == sid) & (data["mode"] == mode) & (data["window"] == window)]
            if have is None or have.empty:
                have = interactive.masking_data(lm, [samples[sample]], modes=(mode,), windows=(window,), dataset=ds)
                ex.state["computed"] += 1
            ex.cache[key] = have.sort_values("layer").set_index("layer")
        return ex.cache[key]

    def update(ex, sample, mode, layer, window):
        s = samples[sample]
        r = records(ex, sample, mode, window)
        p, p0 = r["p_answer"].to_numpy(), float(r["plain_p"].iloc[0])
        ans, plain = str(r.loc[layer, "pred"]), str(r["plain_pred"].iloc[0])
        ex.state.update(answer=ans, plain=plain, p_mask=float(r.loc[layer, "p_answer"]), p_plain=p0)
        with plots.figure_style():
            fig, ax = plt.subplots(figsize=(plots.BOOK_WIDTH, 2.8))
            ax.plot(r.index, p, "-o", ms=3, color=plots.model_color(getattr(lm, "name", "model")),
                    label=f"image masked ({mode}, window {window})")
            ax.axhline(p0, color="grey", ls="--", label="unmasked")
            ax.plot([layer], [r.loc[layer, "p_answer"]], "o", ms=10, mfc="none", mec="black", mew=1.5, gid="marker")
            ax.set_xlabel("masked layer")
            ax.set_ylabel("p(first answer token)")
            plots.integer_layers(ax)
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside the axes: no curve hidden
            fig.tight_layout()
        pl = ex.state["p_mask"]
        text = (f"{_question_html(s)}<br>"
                f"unmasked: <code>{_esc(plain)}</code> · p = {p0:.3f} &nbsp;|&nbsp; "
                f"masked at layer {layer} ({mode}, window {window}): {_answer_html(ans, plain)} · "
                f"p = {pl:.3f} (Δ {pl - p0:+.3f})")
        return text, fig

    return _explorer_class()(controls, update)


# --- contrastive ----------------------------------------------------------------------------------------------------

def contrastive_explorer(lm, samples, fusion_layers: Sequence[int], apply_layer: int, *, rho: float = 0.2,
                         lam: float = 0.1, data: dict | None = None):
    """Candidate set, ρ and λ: A_pre (layer i*) / A_post / I_A (softly masked tokens hatched) and the answer with
    the ρ share of lowest-I_A tokens scaled by λ at ``apply_layer``, against the plain answer. Computed per setting by
    `interactive.contrastive_data`; ``data`` seeds the cache with that function's result."""
    w, ds, samples, L, picker = _explorer_inputs(lm, samples)
    controls = {
        "sample": picker,
        "kind": w.Dropdown(options=list(CANDIDATE_SETS), value="fusion", description="candidates"),
        "rho": w.FloatSlider(value=rho, min=0.0, max=0.9, step=0.05, description="ρ", continuous_update=False),
        "lam": w.FloatSlider(value=lam, min=0.0, max=1.0, step=0.05, description="λ", continuous_update=False),
    }

    def setting(ex, sample, kind, rho, lam):
        key = (sample, kind, round(rho, 4), round(lam, 4))
        if key in ex.cache:
            return ex.cache[key]
        s = samples[sample]

        def row_of(d):
            rec = d["records"]
            return rec[(rec["id"] == str(s.id)) & (rec["candidates"] == kind) & np.isclose(rec["rho"].astype(float), rho)
                       & np.isclose(rec["lam"].astype(float), lam)]

        # the figure's data, where it has this setting (a chapter's records may hold only part of the grid)
        d = data if data is not None and kind in data["candidate_sets"] and len(row_of(data)) else None
        if d is None:
            d = interactive.contrastive_data(lm, [s], fusion_layers=fusion_layers, apply_layer=apply_layer,
                                             candidate_sets=(kind,), rhos=(rho,), lams=(lam,), dataset=ds)
            ex.state["computed"] += 1
        row = row_of(d).iloc[0]
        qi = [x["id"] for x in d["samples"]].index(str(s.id))
        ex.cache[key] = (row, d["views"][kind][qi])
        return ex.cache[key]

    def update(ex, sample, kind, rho, lam):
        s = samples[sample]
        row, v = setting(ex, sample, kind, rho, lam)
        ia = np.asarray(v["I_A"], float)
        mask = np.asarray(soft_mask_tokens(torch.as_tensor(ia.ravel()), rho)).astype(bool).reshape(ia.shape)
        ans, plain = str(row["pred"]), str(row["plain_pred"])
        n_masked = int(row["n_masked"])
        cands = [int(j) for j in np.asarray(candidate_layers(kind, L, list(fusion_layers))).ravel()]
        ex.state.update(answer=ans, plain=plain, pre=int(row["pre_layer"]), candidates=cands, n_masked=n_masked)
        view = dict(v, relevant=s.relevant if v.get("spatial", True) else None,
                    mask=mask if v.get("spatial", True) else None)
        with plots.figure_style():
            fig, axes = plt.subplots(1, 4, figsize=(plots.BOOK_WIDTH, 2.4))
            im = plots.panel_row(axes, view)
            fig.colorbar(im, ax=axes[3], fraction=0.046, pad=0.03)
            fig.tight_layout()
        text = (f"{_question_html(s)} · candidates {kind} {cands} → i* = {int(row['pre_layer'])}<br>plain: "
                f"<code>{_esc(plain)}</code> &nbsp;|&nbsp; soft mask (ρ={rho:.2f}: {n_masked} tokens × λ={lam:.2f} "
                f"at layer {apply_layer}): {_answer_html(ans, plain)}")
        return text, fig

    return _explorer_class()(controls, update)


# --- one function for both ------------------------------------------------------------------------------------------

_DATA = {"attention": interactive.attention_data, "masking": interactive.masking_data,
         "contrastive": interactive.contrastive_data}
_FIGURE = {"attention": interactive.attention_figure, "masking": interactive.masking_figure,
           "contrastive": interactive.contrastive_figure}
_LIVE = {"attention": attention_explorer, "masking": masking_explorer, "contrastive": contrastive_explorer}
_LIVE_ARGS = {"contrastive": ("fusion_layers", "apply_layer")}


def _check_name(explorer_name: str) -> None:
    if explorer_name not in _DATA:
        raise ValueError(f"Unknown explorer {explorer_name!r}; use one of {', '.join(_DATA)}.")


def figure(explorer_name: str, lm, samples, *, model: str = "", **params):
    """The kernel-free figure of an explorer ("attention", "masking", "contrastive"): its data function's result
    (``params`` go there, e.g. ``windows``, ``fusion_layers``, ``apply_layer``) turned into an `InteractiveFigure`."""
    _check_name(explorer_name)
    data = _DATA[explorer_name](lm, samples, **params)
    return _FIGURE[explorer_name](data, model=model)


def explore(explorer_name: str, lm, samples, *, model: str = "", **params):
    """Compute the explorer's data once and return its kernel-free figure; in a live kernel (`in_live_kernel`) also
    display the ipywidgets explorer, seeded with the same data (it computes only the settings the figure lacks)."""
    _check_name(explorer_name)
    data = _DATA[explorer_name](lm, samples, **params)
    fig = _FIGURE[explorer_name](data, model=model)
    if in_live_kernel():
        from IPython.display import display

        live = {k: params[k] for k in _LIVE_ARGS.get(explorer_name, ()) if k in params}
        display(_LIVE[explorer_name](lm, samples, data=data, **live))
    return fig
