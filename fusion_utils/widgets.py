"""Interactive explorers that recompute with a loaded model (ipywidgets), and their static counterparts.

Three explorers, each an `Explorer` (an ``ipywidgets.VBox``: controls, a text line, a figure):

- `attention_explorer(lm, samples)` -- sample picker + layer slider: the last token's attention over the image at
  that layer, and the relevant-vs-irrelevant mass curve of the sample with a marker at the layer;
- `masking_explorer(lm, samples)` -- sample, masking mode (zero / knockout), layer and window: the answer under the
  mask and the probability of the unmasked answer's first token, masked vs unmasked, over all layers;
- `contrastive_explorer(lm, samples, fusion_layers, apply_layer)` -- candidate set, ρ and λ: A_pre / A_post / I_A and
  the soft-masked answer vs the plain one.

Work is cached per sample (and per setting), so moving a slider back is instant. The figure is a PNG in an
``ipywidgets.Image`` and the text an ``ipywidgets.HTML``, so both update without an output area; the latest
choices and results are in ``explorer.state`` (``state["error"]`` holds the last error message, shown in red in
the widget instead of being lost in the kernel log).

A rendered book has no kernel, so every explorer has a static twin returning a matplotlib Figure over a small grid
of choices (`attention_static`, `masking_static`, `contrastive_static`, or `static_grid(name, ...)`). Chapters use::

    from fusion_utils import widgets as W
    if W.in_live_kernel():
        display(W.attention_explorer(lm, samples))
    fig = W.attention_static(lm, samples)      # always rendered

or the one-liner ``fig = W.explore("attention", lm, samples)`` that does both. See `in_live_kernel` for the rule
that decides "live".
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

from . import plots

LIVE_ENV = "FUSION_UTILS_LIVE"
STATIC_ENV = "FUSION_UTILS_STATIC"
_EXECUTORS = re.compile(r"papermill|nbconvert|nbclient|jupyter[-_]book|fusion_utils[./]book|fusion[-_]utils\S*\s+book"
                        r"|pytest")
_TRUE = {"1", "true", "yes", "on"}

__all__ = ["in_live_kernel", "Explorer", "attention_explorer", "masking_explorer", "contrastive_explorer",
           "attention_static", "masking_static", "contrastive_static", "static_grid", "explore", "CANDIDATE_SETS"]

CANDIDATE_SETS = ("fusion", "shallow", "deep", "all")


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

    1. ``FUSION_UTILS_STATIC`` set to 1/true/yes/on -> False (the book driver should set it for its papermill
       runs); ``FUSION_UTILS_LIVE`` set to 1/true -> True (force widgets, e.g. in a frontend not recognised below);
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


def _post_prompt(samples, post_prompt):
    if post_prompt != "auto":
        return post_prompt
    from .experiments.common import post_prompt_for
    from .prompts import POST_PROMPT

    return post_prompt_for(samples) if hasattr(samples, "scorer") else POST_PROMPT


def _samples(samples) -> list:
    out = list(samples)
    if not out:
        raise ValueError("The explorer needs at least one sample.")
    return out


def _np(x) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().float().cpu().numpy() if x.dtype != torch.bool else x.detach().cpu().numpy()
    return np.asarray(x)


def _png(fig, dpi: int = 90) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)  # our own figure: rendered to bytes, never shown by the inline backend
    return buf.getvalue()


def _label(i: int, s) -> str:
    q = s.question if len(s.question) <= 70 else s.question[:67] + "..."
    return f"{i}: {q}"


def _layers_grid(L: int) -> list[int]:
    return sorted({0, L // 4, L // 2, (3 * L) // 4, L - 1})


def _esc(x) -> str:
    return html.escape(_printable(x))


def _printable(x) -> str:
    """Model output made safe to show: control characters replaced by U+FFFD."""
    return "".join(ch if ch.isprintable() else "\ufffd" for ch in str(x))


def _txt(x, n: int | None = None) -> str:
    """Model output for matplotlib text: printable, '$' escaped (no mathtext), optionally cut to n chars."""
    t = _printable(x)
    t = t if n is None or len(t) <= n else t[: n - 1] + "…"
    return t.replace("$", r"\$")


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

def _attention_of(lm, sample, post_prompt) -> dict:
    """One sample's last-token -> image maps [L, N], the primary view, token relevance, and its layer table."""
    from .experiments.attention import RELEVANT_AT, capture_maps, token_relevance

    maps, b = capture_maps(lm, [sample], post_prompt=post_prompt)
    m = _np(maps.sample(0))
    view = b.grids[0][0].primary
    n0 = b.grids[0][0].n_tokens
    rel = token_relevance(b.grids[0], sample)
    relevant, rule = None, None
    if rel is not None:
        frac = np.nan_to_num(rel)
        relevant, rule = frac >= RELEVANT_AT, f"≥{RELEVANT_AT:.0%} covered"
        if not relevant.any() and (frac > 0).any():  # a coarse grid: no token is half covered by a small object
            relevant, rule = frac > 0, "any overlap (no token is half covered)"
    table = pd.DataFrame({"layer": np.arange(m.shape[0]), "max_share": m.max(1)})
    if relevant is not None and relevant.any() and (~relevant).any():
        table["rel_mass"] = m[:, relevant].sum(1)
        table["irr_mass"] = m[:, ~relevant].sum(1)
        table["rel_ratio"] = table["rel_mass"] / relevant.mean()
    else:
        relevant, rule = None, None
    grid = view.to_map(m[:, :n0]) if view.spatial else m[:, view.indices().ravel()][:, None, :]
    return dict(maps=m, grid=grid, view=view, relevant_tokens=relevant, relevant_rule=rule, table=table, batch=b)


def _attention_draw(axes, a: dict, sample, layer: int):
    """Heatmap of ``layer`` on axes[0], the sample's relevance curve (or max share) with a marker on axes[1]."""
    ax_h, ax_c = axes
    spatial = a["view"].spatial
    plots.draw_heatmap(ax_h, a["grid"][layer], sample.image if spatial else None,
                       sample.relevant if spatial else None, spatial=spatial, title=f"layer {layer}",
                       extent=a["view"].extent)
    t = a["table"]
    if "rel_mass" in t.columns:
        plots.relevance_curves(t, ratio=False, marker_layer=layer, axes=[ax_c])
        ax_c.set_title("relevant vs irrelevant mass", fontsize=9)
        ax_c.legend(["relevant", "irrelevant"], fontsize=7, loc="best")
    else:
        ax_c.plot(t["layer"], t["max_share"], "-", color=plots.model_color("model"))
        ax_c.plot([layer], [t.loc[layer, "max_share"]], "o", ms=8, color="black")
        ax_c.axvline(layer, color="grey", lw=0.8)
        ax_c.set_title("largest token share (no ground-truth regions)", fontsize=9)
        ax_c.set_xlabel("layer")
        plots.integer_layers(ax_c)


def attention_explorer(lm, samples, *, post_prompt="auto", layer: int | None = None):
    """Sample picker + layer slider over the last token's attention to the image (recomputed per sample, cached)."""
    w = _widgets()
    samples = _samples(samples)
    pp = _post_prompt(samples, post_prompt)
    L = lm.num_layers
    controls = {
        "sample": _sample_picker(w, samples),
        "layer": w.IntSlider(value=L // 2 if layer is None else layer, min=0, max=L - 1, step=1,
                             description="layer", continuous_update=False),
    }

    def update(ex, sample, layer):
        s = samples[sample]
        if sample not in ex.cache:
            ex.cache[sample] = _attention_of(lm, s, pp)
            ex.state["computed"] += 1
        a = ex.cache[sample]
        with plots.figure_style():
            fig, axes = plt.subplots(1, 2, figsize=(plots.BOOK_WIDTH, 3.4), gridspec_kw={"width_ratios": [1, 1.4]})
            _attention_draw(axes, a, s, layer)
            fig.tight_layout()
        t = a["table"].set_index("layer")
        ex.state["max_share"] = float(t.loc[layer, "max_share"])
        ex.state["rel_mass"] = float(t.loc[layer, "rel_mass"]) if "rel_mass" in t.columns else None
        extra = ("" if ex.state["rel_mass"] is None else
                 f" · mass on relevant tokens {ex.state['rel_mass']:.2f} (relevant = {a['relevant_rule']})")
        grid = "" if a["view"].spatial else " · <i>no spatial grid (query tokens)</i>"
        text = (f"<b>{_esc(s.question)}</b> (gold: {_esc(', '.join(s.answers))}) · layer {layer} of {L}"
                f"{extra}{grid}")
        return text, fig

    return _explorer_class()(controls, update)


def attention_static(lm, samples, *, layers: Sequence[int] | None = None, n_samples: int = 2, post_prompt="auto"):
    """Static twin of `attention_explorer`: per sample (first ``n_samples``), heatmaps at ``layers`` (default
    0, L/4, L/2, 3L/4, L-1) and the relevance curve."""
    samples = _samples(samples)[:n_samples]
    pp = _post_prompt(samples, post_prompt)
    L = lm.num_layers
    layers = _layers_grid(L) if layers is None else [int(j) % L for j in layers]
    n = len(layers)
    with plots.figure_style():
        fig = plt.figure(figsize=(plots.BOOK_WIDTH, 1.75 * len(samples) + 0.5))
        gs = fig.add_gridspec(len(samples), n + 1, width_ratios=[1] * n + [1.8])
        for r, s in enumerate(samples):
            a = _attention_of(lm, s, pp)
            spatial = a["view"].spatial
            for c, j in enumerate(layers):
                ax = fig.add_subplot(gs[r, c])
                plots.draw_heatmap(ax, a["grid"][j], s.image if spatial else None, s.relevant if spatial else None,
                                   spatial=spatial, title=f"layer {j}", extent=a["view"].extent)
                if c == 0:
                    ax.set_ylabel(_txt(_label(r, s), 28), fontsize=7)
            ax = fig.add_subplot(gs[r, n])
            t = a["table"]
            if "rel_mass" in t.columns:
                plots.relevance_curves(t, ratio=False, axes=[ax])
                ax.legend(["relevant", "irrelevant"], fontsize=6)
                ax.set_title("attention mass", fontsize=9)
            else:
                ax.plot(t["layer"], t["max_share"])
                ax.set_title("largest token share", fontsize=9)
            for j in layers:
                ax.axvline(j, color="grey", lw=0.5, alpha=0.5)
        fig.suptitle("Last-token attention over the image, by layer (relevant cells outlined)", fontsize=11)
        fig.tight_layout()
    return fig


# --- masking ------------------------------------------------------------------------------------------------------

def _masking_base(lm, sample, pp) -> dict:
    from .experiments.common import first_token_ids, generate

    b = lm.prepare([sample], post_prompt=pp)
    plain = generate(lm, b)[0]
    target = first_token_ids(lm, [plain])[0]
    return dict(batch=b, plain=plain, target=target)


def _masking_curve(lm, base, mode, window) -> tuple[np.ndarray, float]:
    """p(unmasked answer's first token) with the image masked at each layer [L], and unmasked."""
    from .sweeps import masking_sweep

    sw = masking_sweep(lm, base["batch"], None, mode=mode, window=window)
    t = base["target"]
    p = torch.softmax(sw["logits"][:, 0], -1)[:, t]
    p0 = torch.softmax(sw["plain"][0], -1)[t]
    return _np(p), float(p0)


def _masked_answer(lm, base, mode, window, layer) -> str:
    from .experiments.common import generate
    from .interventions import MaskImage

    return generate(lm, base["batch"], [MaskImage(int(layer), mode, int(window))])[0]


def masking_explorer(lm, samples, *, post_prompt="auto", layer: int = 0):
    """Masking mode, layer and window: the answer under the mask, and p(unmasked answer's first token) masked vs
    unmasked (curve over all layers, marker at the chosen one)."""
    w = _widgets()
    samples = _samples(samples)
    pp = _post_prompt(samples, post_prompt)
    L = lm.num_layers
    controls = {
        "sample": _sample_picker(w, samples),
        "mode": w.ToggleButtons(options=["zero", "knockout"], value="zero", description="mask"),
        "layer": w.IntSlider(value=layer, min=0, max=L - 1, description="layer", continuous_update=False),
        "window": w.IntSlider(value=1, min=1, max=L, description="window", continuous_update=False),
    }

    def update(ex, sample, mode, layer, window):
        s = samples[sample]
        c = ex.cache
        if ("base", sample) not in c:
            c[("base", sample)] = _masking_base(lm, s, pp)
        base = c[("base", sample)]
        if ("curve", sample, mode, window) not in c:
            c[("curve", sample, mode, window)] = _masking_curve(lm, base, mode, window)
        p, p0 = c[("curve", sample, mode, window)]
        key = ("answer", sample, mode, window, layer)
        if key not in c:
            c[key] = _masked_answer(lm, base, mode, window, layer)
            ex.state["computed"] += 1
        ans = c[key]
        ex.state.update(answer=ans, plain=base["plain"], p_mask=float(p[layer]), p_plain=p0)
        with plots.figure_style():
            fig, ax = plt.subplots(figsize=(plots.BOOK_WIDTH, 2.8))
            ax.plot(np.arange(L), p, "-o", ms=3, color=plots.model_color(getattr(lm, "name", "model")),
                    label=f"image masked ({mode}, window {window})")
            ax.axhline(p0, color="grey", ls="--", label="unmasked")
            ax.plot([layer], [p[layer]], "o", ms=10, mfc="none", mec="black", mew=1.5, gid="marker")
            ax.set_xlabel("masked layer")
            ax.set_ylabel("p(first answer token)")
            plots.integer_layers(ax)
            ax.legend(fontsize=8)
            fig.tight_layout()
        text = (f"{_question_html(s)}<br>"
                f"unmasked: <code>{_esc(base['plain'])}</code> · p = {p0:.3f} &nbsp;|&nbsp; "
                f"masked at layer {layer} ({mode}, window {window}): {_answer_html(ans, base['plain'])} · "
                f"p = {p[layer]:.3f} (Δ {p[layer] - p0:+.3f})")
        return text, fig

    return _explorer_class()(controls, update)


def masking_static(lm, samples, *, modes: Sequence[str] = ("zero", "knockout"), window: int = 1,
                   layers: Sequence[int] | None = None, n_samples: int = 2, post_prompt="auto"):
    """Static twin of `masking_explorer`: per sample, p(first answer token) vs masked layer for each mode, and a
    table of the answers under the mask at ``layers`` (default 0, L/4, L/2, 3L/4, L-1)."""
    samples = _samples(samples)[:n_samples]
    pp = _post_prompt(samples, post_prompt)
    L = lm.num_layers
    layers = _layers_grid(L) if layers is None else [int(j) % L for j in layers]
    styles = {"zero": "-o", "knockout": "-s"}
    with plots.figure_style():
        fig, axes = plt.subplots(len(samples), 2, figsize=(plots.BOOK_WIDTH, 2.6 * len(samples) + 0.4),
                                 squeeze=False, gridspec_kw={"width_ratios": [1.3, 1]})
        for (ax, axt), (r, s) in zip(axes, enumerate(samples)):
            base = _masking_base(lm, s, pp)
            cells = []
            for mode in modes:
                p, p0 = _masking_curve(lm, base, mode, window)
                ax.plot(np.arange(L), p, styles.get(mode, "-^"), ms=3, label=mode)
                cells.append([_txt(_masked_answer(lm, base, mode, window, j), 14) for j in layers])
            ax.axhline(p0, color="grey", ls="--", label="unmasked")
            ax.set_xlabel("masked layer")
            ax.set_ylabel("p(first answer token)")
            plots.integer_layers(ax)
            ax.legend(fontsize=7)
            ax.set_title(_txt(_label(r, s), 60), fontsize=9)
            axt.axis("off")
            tab = axt.table(cellText=cells, rowLabels=list(modes), colLabels=[f"L{j}" for j in layers],
                            loc="center", cellLoc="center")
            tab.auto_set_font_size(False)
            tab.set_fontsize(7)
            axt.set_title(f"answer under the mask (unmasked: “{_txt(base['plain'], 20)}”)", fontsize=8)
        fig.suptitle(f"Masking the image at one layer (window {window})", fontsize=11)
        fig.tight_layout()
    return fig


# --- contrastive ----------------------------------------------------------------------------------------------------

def _contrastive_module():
    try:
        from .experiments import contrastive
    except ImportError as e:
        raise ImportError("fusion_utils.experiments.contrastive is not available yet "
                          f"({e}); the contrastive explorer needs contrastive_map, candidate_layers and "
                          "soft_mask_tokens.") from e
    return contrastive


def _contrastive_of(lm, a: dict, kind: str, fusion_layers) -> dict:
    C = _contrastive_module()
    L = lm.num_layers
    cand = C.candidate_layers(kind, L, list(fusion_layers))
    res = C.contrastive_map(torch.as_tensor(a["maps"]), cand, post=-1)
    return dict(candidates=[int(j) for j in _np(cand).ravel()] if cand is not None else None,
                pre=int(_np(res["pre"])), I_A=res["I_A"], hellinger=res.get("hellinger"))


def _soft_answer(lm, a: dict, cm: dict, rho: float, lam: float, apply_layer: int):
    from .experiments.common import generate
    from .interventions import ScaleImage

    C = _contrastive_module()
    mask = _np(C.soft_mask_tokens(cm["I_A"], rho)).astype(bool).ravel()
    ans = generate(lm, a["batch"], [ScaleImage(int(apply_layer), float(lam), tokens=[mask])])[0]
    return ans, mask


def _contrastive_view(a: dict, cm: dict, sample, L: int, mask=None) -> dict:
    view = a["view"]
    ia = _np(cm["I_A"]).ravel()

    def grid(v):
        return view.to_map(v) if view.spatial else np.asarray(v)[view.indices().ravel()][None, :]

    return dict(pre=cm["pre"], post=L - 1, A_pre=grid(a["maps"][cm["pre"]]), A_post=grid(a["maps"][-1]),
                I_A=grid(ia), image=sample.image, relevant=sample.relevant if view.spatial else None,
                mask=None if mask is None or not view.spatial else grid(mask))


def contrastive_explorer(lm, samples, fusion_layers: Sequence[int], apply_layer: int, *, post_prompt="auto",
                         rho: float = 0.2, lam: float = 0.1):
    """Candidate set, ρ and λ: A_pre (layer i*) / A_post / I_A (softly masked tokens hatched) and the answer with
    the ρ share of lowest-I_A tokens scaled by λ at ``apply_layer``, against the plain answer."""
    w = _widgets()
    samples = _samples(samples)
    pp = _post_prompt(samples, post_prompt)
    L = lm.num_layers
    controls = {
        "sample": _sample_picker(w, samples),
        "kind": w.Dropdown(options=list(CANDIDATE_SETS), value="fusion", description="candidates"),
        "rho": w.FloatSlider(value=rho, min=0.0, max=0.9, step=0.05, description="ρ", continuous_update=False),
        "lam": w.FloatSlider(value=lam, min=0.0, max=1.0, step=0.05, description="λ", continuous_update=False),
    }

    def update(ex, sample, kind, rho, lam):
        from .experiments.common import generate

        s = samples[sample]
        c = ex.cache
        if ("maps", sample) not in c:
            c[("maps", sample)] = _attention_of(lm, s, pp)
            c[("plain", sample)] = generate(lm, c[("maps", sample)]["batch"])[0]
        a = c[("maps", sample)]
        if ("cm", sample, kind) not in c:
            c[("cm", sample, kind)] = _contrastive_of(lm, a, kind, fusion_layers)
        cm = c[("cm", sample, kind)]
        key = ("soft", sample, kind, round(rho, 4), round(lam, 4))
        if key not in c:
            c[key] = _soft_answer(lm, a, cm, rho, lam, apply_layer)
            ex.state["computed"] += 1
        ans, mask = c[key]
        plain = c[("plain", sample)]
        ex.state.update(answer=ans, plain=plain, pre=cm["pre"], candidates=cm["candidates"],
                        n_masked=int(mask.sum()))
        v = _contrastive_view(a, cm, s, L, mask)
        with plots.figure_style():
            fig, axes = plt.subplots(1, 4, figsize=(plots.BOOK_WIDTH, 2.4))
            im = plots.panel_row(axes, v)
            fig.colorbar(im, ax=axes[3], fraction=0.046, pad=0.03)
            fig.tight_layout()
        text = (f"{_question_html(s)} · candidates {kind} "
                f"{cm['candidates']} → i* = {cm['pre']}<br>plain: <code>{_esc(plain)}</code> &nbsp;|&nbsp; "
                f"soft mask (ρ={rho:.2f}: {int(mask.sum())} tokens × λ={lam:.2f} at layer {apply_layer}): "
                f"{_answer_html(ans, plain)}")
        return text, fig

    return _explorer_class()(controls, update)


def contrastive_static(lm, samples, fusion_layers: Sequence[int], apply_layer: int, *, kind: str = "fusion",
                       rhos: Sequence[float] = (0.1, 0.2, 0.4), lams: Sequence[float] = (0.0, 0.1, 0.5),
                       n_samples: int = 2, post_prompt="auto"):
    """Static twin of `contrastive_explorer`: per sample, the four panels for candidate set ``kind`` (tokens masked at
    the first ρ hatched) above a table of soft-masked answers over ``rhos`` x ``lams`` (* = differs from plain)."""
    from .experiments.common import generate

    samples = _samples(samples)[:n_samples]
    pp = _post_prompt(samples, post_prompt)
    L = lm.num_layers
    n = len(samples)
    with plots.figure_style():
        fig = plt.figure(figsize=(plots.BOOK_WIDTH, (2.3 + 0.25 * (len(rhos) + 1)) * n + 0.4))
        gs = fig.add_gridspec(2 * n, 4, height_ratios=[2.3, 0.25 * (len(rhos) + 1) + 0.2] * n)
        for r, s in enumerate(samples):
            a = _attention_of(lm, s, pp)
            plain = generate(lm, a["batch"])[0]
            cm = _contrastive_of(lm, a, kind, fusion_layers)
            cells, mask0 = [], None
            for rho in rhos:
                line = []
                for lam in lams:
                    ans, mask = _soft_answer(lm, a, cm, rho, lam, apply_layer)
                    mask0 = mask if mask0 is None else mask0
                    line.append(_txt(ans, 18) + (" *" if ans != plain else ""))
                cells.append(line)
            v = _contrastive_view(a, cm, s, L, mask0)
            v["title"] = _txt(_label(r, s), 34)
            row = [fig.add_subplot(gs[2 * r, c]) for c in range(4)]
            im = plots.panel_row(row, v)
            fig.colorbar(im, ax=row[3], fraction=0.046, pad=0.03)
            axt = fig.add_subplot(gs[2 * r + 1, :])
            axt.axis("off")
            tab = axt.table(cellText=cells, rowLabels=[f"ρ={x:g}" for x in rhos],
                            colLabels=[f"λ={x:g}" for x in lams], loc="center", cellLoc="center")
            tab.auto_set_font_size(False)
            tab.set_fontsize(7)
            axt.set_title(f"soft-masked answers at layer {apply_layer} (plain: “{_txt(plain, 24)}”; * = changed)",
                          fontsize=8)
        fig.suptitle(f"Contrastive attention ({kind} candidates; hatched = tokens masked at ρ={rhos[0]:g})",
                     fontsize=10)
        fig.tight_layout()
    return fig


# --- dispatch -------------------------------------------------------------------------------------------------------

_STATIC = {"attention": attention_static, "masking": masking_static, "contrastive": contrastive_static}
_LIVE = {"attention": attention_explorer, "masking": masking_explorer, "contrastive": contrastive_explorer}


def static_grid(explorer_name: str, lm, samples, **choices):
    """The static figure of an explorer by name ("attention", "masking", "contrastive"); ``choices`` go to its
    ``*_static`` function (contrastive needs ``fusion_layers`` and ``apply_layer``)."""
    try:
        fn = _STATIC[explorer_name]
    except KeyError:
        raise ValueError(f"Unknown explorer {explorer_name!r}; use one of {', '.join(_STATIC)}.") from None
    return fn(lm, samples, **choices)


def explore(explorer_name: str, lm, samples, *, static: dict | None = None, live: dict | None = None, **common):
    """Show the live explorer when `in_live_kernel()`, and always return the static figure.

    ``common`` goes to both (e.g. ``fusion_layers``, ``apply_layer``, ``post_prompt``); ``static`` / ``live`` hold
    keyword arguments for one side only (e.g. ``static={"layers": [0, 8, 16, 24, 31]}``).
    """
    if explorer_name not in _LIVE:
        raise ValueError(f"Unknown explorer {explorer_name!r}; use one of {', '.join(_LIVE)}.")
    if in_live_kernel():
        from IPython.display import display

        display(_LIVE[explorer_name](lm, samples, **common, **(live or {})))
    return static_grid(explorer_name, lm, samples, **common, **(static or {}))
