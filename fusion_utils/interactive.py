"""Figures a reader drives in the rendered book, with no kernel: Plotly traces for every combination of the
controls, computed once, and a few lines of JavaScript that swap them when a select or a slider moves.

Each explorer has a *data* function that runs the package's experiments on a few samples (it computes nothing of
its own) and a *figure* function that turns that data into an `InteractiveFigure`:

==========================  =====================================  ====================================================
data                        figure                                 controls -> what changes
==========================  =====================================  ====================================================
`masking_data`              `masking_figure`                       question, mode, window, layer -> p(answer), answers
`attention_data`            `attention_figure`                     question, layer -> heatmap, marker on mass curves
`contrastive_data`          `contrastive_figure`                   question, candidates, ρ, λ -> I_A, masked tokens,
                                                                   answer
(chapter records)           `layers_figure`                        layer -> Hellinger and early-exit distributions
(chapter summaries)         `threshold_figure`                     threshold, x axis -> drop curves, fusion layers
==========================  =====================================  ====================================================

`fusion_utils.widgets.explore` calls a data function once and builds from it both this figure and, in a live
kernel, the ipywidgets explorer.

A chapter's explorer offers every question of its build (`every_question`: the picked examples first, then the
rest by family; a search box narrows a long list by words or family). `InteractiveFigure.beside_page` keeps the
first three questions' states in the page and writes the others to a script file beside the chapter's downloads,
which the figure loads from the same folder the first time a reader picks one of them; repeated settings, layout
fragments and text are stored once (`InteractiveFigure.spec`), and pictures are JPEG.

The figure's HTML loads nothing from elsewhere: it expects ``window.Plotly``, which the book serves from its own ``_static``
folder (see ``fusion_utils/_sphinx_mathjax.py``); `InteractiveFigure.to_html` with ``plotly_js=True`` inlines
plotly.js for a stand-alone page or a live notebook.
"""
from __future__ import annotations

import base64
import html as _html
import io
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["Control", "InteractiveFigure", "plotly_js_path", "table", "masking_runs", "default_windows",
           "every_question", "question_maps", "masking_data", "masking_figure", "attention_data",
           "attention_figure", "contrastive_data", "contrastive_figure", "layers_figure", "threshold_figure",
           "MARKER_CLASS"]

from .figure_html import DIVERGING, MAGMA, MARKER_CLASS, Control, InteractiveFigure, colorbar, plotly_js_path
from .metrics import benchmark_accuracy
from .report.display import masking_runs, table

HEATMAP = MAGMA
RELEVANT_COLOR = "#17becf"
MASK_COLOR = "#2ca02c"
LINE_COLORS = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9")


# --- small helpers ------------------------------------------------------------------------------------------------

def _r(x, nd: int = 4):
    """Rounded floats (NaN -> None): the page's JSON stays small and valid."""
    a = np.asarray(x, dtype=float)
    out = np.round(a, nd).astype(object)
    out[~np.isfinite(a)] = None
    return out.tolist()


def _esc(x) -> str:
    return _html.escape("".join(ch if ch.isprintable() else "\ufffd" for ch in str(x)))


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _image_uri(image, size: int = 256) -> str | None:
    """The picture under a heatmap as a JPEG data URI: a sixth of a PNG's bytes (a page holds one per question),
    and the heatmap over it hides the compression."""
    if image is None:
        return None
    im = image.convert("RGB")
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _axes(n: int, gap: float = 0.1, widths: Sequence[float] | None = None) -> list[tuple[float, float]]:
    w = np.asarray(widths if widths is not None else [1.0] * n, float)
    w = w / w.sum() * (1 - gap * (n - 1))
    out, x = [], 0.0
    for wi in w:
        out.append((round(x, 4), round(x + wi, 4)))
        x += wi + gap
    return out


def _ax(i: int) -> str:
    return "" if i == 0 else str(i + 1)


def _base_layout(n_panels: int, *, widths=None, titles=(), height: int = 380, image_axes=()) -> dict:
    """Side-by-side panels; panel titles are annotations above each panel (never over another's title)."""
    lay: dict = {"margin": {"l": 50, "r": 20, "t": 40, "b": 90}, "height": height, "showlegend": True,
                 # below the axis titles: a legend never covers a curve or a label
                 "legend": {"orientation": "h", "x": 0, "y": -0.3, "yanchor": "top"},
                 "annotations": [], "font": {"size": 12}, "hovermode": "closest"}
    for i, (a, b) in enumerate(_axes(n_panels, widths=widths)):
        xa, ya = f"xaxis{_ax(i)}", f"yaxis{_ax(i)}"
        lay[xa] = {"domain": [a, b], "anchor": f"y{_ax(i)}"}
        lay[ya] = {"anchor": f"x{_ax(i)}"}
        if i in image_axes:
            lay[xa].update(showticklabels=False, showgrid=False, zeroline=False, ticks="")
            lay[ya].update(showticklabels=False, showgrid=False, zeroline=False, ticks="", autorange="reversed",
                           scaleanchor=f"x{_ax(i)}")
        if i < len(titles) and titles[i]:
            lay["annotations"].append(_panel_title(titles[i], a, b))
    return lay


def _panel_title(text: str, a: float, b: float) -> dict:
    return {"text": f"<b>{_esc(text)}</b>", "xref": "paper", "yref": "paper", "x": (a + b) / 2, "y": 1.0,
            "xanchor": "center", "yanchor": "bottom", "showarrow": False, "font": {"size": 12}}


def _titles(layout: dict, titles: Sequence[str]) -> list:
    doms = [layout[f"xaxis{_ax(i)}"]["domain"] for i in range(len(titles))]
    return [_panel_title(t, a, b) for t, (a, b) in zip(titles, doms)]


def _question_label(i: int, question: str, family=None) -> str:
    """``"3: [colour] What colour is ..."``: numbered, with the question's family where the dataset has one, so
    the figure's search box finds a question by its words or its family."""
    return f"{i + 1}: " + (f"[{family}] " if family else "") + _short(str(question), 56)


def every_question(dataset, first: Sequence = ()) -> list:
    """Every sample of ``dataset`` for an explorer: ``first`` (the chapter's picked examples, shown on load) and
    then the rest, grouped by family in the dataset's order within each family."""
    picked = {str(s.id) for s in first}
    rest = [s for s in dataset if str(s.id) not in picked]
    order = {f: i for i, f in enumerate(dict.fromkeys(s.family or "" for s in rest))}
    return [*first, *sorted(rest, key=lambda s: order[s.family or ""])]


def _as_set(samples, like=None):
    """A `SampleSet` for the experiments: a SampleSet as it is; a list with the scorer of ``like`` (default vqa)."""
    from .data.sample import SampleSet

    if isinstance(samples, SampleSet):
        return samples
    samples = list(samples)
    if not samples:
        raise ValueError("An interactive figure needs at least one sample; pass a non-empty list or SampleSet.")
    scorer = getattr(like, "scorer", None) or "vqa"
    name = getattr(like, "name", None) or "picked"
    return SampleSet(name, samples, scorer, getattr(like, "meta", None))


def _per_batch(name: str, lm, ds, **params) -> pd.DataFrame:
    """The records of experiment ``name`` on ``ds`` through the harness itself (parameters resolved, seeded, its
    batch loop; in memory, one batch): the figures show exactly what the chapters compute."""
    from .experiments.harness import run

    rec = run(name, lm, ds, out=None, batch_size=max(1, len(ds)), progress=False, **params).records
    return rec.assign(id=rec["id"].astype(str)) if len(rec) else pd.DataFrame(columns=["id"])


def _image_layer(image, extent_xy, xref="x", yref="y") -> dict:
    """A layout image filling the data rectangle (x0, y0, x1, y1) of one panel (y down)."""
    x0, y0, x1, y1 = extent_xy
    return {"source": _image_uri(image), "xref": xref, "yref": yref, "x": x0, "y": y0, "sizex": x1 - x0,
            "sizey": y1 - y0, "xanchor": "left", "yanchor": "top", "sizing": "stretch", "layer": "below"}


def _grid_geometry(values: np.ndarray, image, extent) -> dict:
    """Where a [rows, cols] map lies on its image, in pixels (the matplotlib figures' convention)."""
    R, C = values.shape
    if image is not None:
        W, H = image.size
    else:
        W, H = C, R
    ex0, ey0, ex1, ey1 = extent if (extent is not None and image is not None) else (0.0, 0.0, 1.0, 1.0)
    x0, y0, x1, y1 = ex0 * W, ey0 * H, ex1 * W, ey1 * H
    return dict(W=W, H=H, x0=x0 + (x1 - x0) / C / 2, dx=(x1 - x0) / C, y0=y0 + (y1 - y0) / R / 2, dy=(y1 - y0) / R)


def _heatmap(values, geo, i: int, *, colorscale=HEATMAP, zmid=None, opacity=0.6, showscale=False, name="") -> dict:
    t = {"type": "heatmap", "z": _r(values), "x0": geo["x0"], "dx": geo["dx"], "y0": geo["y0"], "dy": geo["dy"],
         "colorscale": colorscale, "opacity": opacity, "showscale": showscale, "xaxis": f"x{_ax(i)}",
         "yaxis": f"y{_ax(i)}", "zsmooth": "best", "name": name, "hovertemplate": "%{z:.3f}<extra></extra>"}
    if zmid is not None:
        t["zmid"] = zmid
    return t


def _outline_path(relevant, W, H) -> str | None:
    """SVG path outlining the True cells of a bool grid laid over a W x H image (as plots.py outlines them)."""
    if relevant is None:
        return None
    rel = np.asarray(relevant, bool)
    if rel.ndim != 2 or not rel.any():
        return None
    R, C = rel.shape
    cw, ch = W / C, H / R
    segs = []
    for r, c in zip(*np.nonzero(rel)):
        X, Y = c * cw, r * ch
        if r == 0 or not rel[r - 1, c]:
            segs.append(f"M{X:.1f},{Y:.1f}H{X + cw:.1f}")
        if r == R - 1 or not rel[r + 1, c]:
            segs.append(f"M{X:.1f},{Y + ch:.1f}H{X + cw:.1f}")
        if c == 0 or not rel[r, c - 1]:
            segs.append(f"M{X:.1f},{Y:.1f}V{Y + ch:.1f}")
        if c == C - 1 or not rel[r, c + 1]:
            segs.append(f"M{X + cw:.1f},{Y:.1f}V{Y + ch:.1f}")
    return "".join(segs)


def _outline_shape(relevant, W, H, i: int) -> list[dict]:
    path = _outline_path(relevant, W, H)
    if path is None:
        return []
    return [{"type": "path", "path": path, "xref": f"x{_ax(i)}", "yref": f"y{_ax(i)}",
             "line": {"color": RELEVANT_COLOR, "width": 2}}]


def _image_panel(layout_update: dict, i: int, image, geo, relevant=None) -> None:
    """Axes ranges, the picture and the relevant outline of image panel ``i`` (added to a state's layout)."""
    W, H = geo["W"], geo["H"]
    layout_update.setdefault("images", [])
    layout_update.setdefault("shapes", [])
    if image is not None:
        layout_update["images"].append(_image_layer(image, (0, 0, W, H), f"x{_ax(i)}", f"y{_ax(i)}"))
        layout_update["shapes"] += _outline_shape(relevant, W, H, i)


def _with_axis_ranges(base: dict, update: dict, panels: Sequence[int], W, H) -> None:
    for i in panels:
        xa, ya = f"xaxis{_ax(i)}", f"yaxis{_ax(i)}"
        update[xa] = {**base[xa], "range": [0, W]}
        update[ya] = {**{k: v for k, v in base[ya].items() if k != "autorange"}, "range": [H, 0]}


# --- masking ------------------------------------------------------------------------------------------------------

def default_windows(n_layers: int) -> list[int]:
    """Masking windows for the explorer: one layer, an eighth and a quarter of the depth (1, 2, 4 of 8; 1, 4, 8
    of 32)."""
    return sorted({1, max(1, n_layers // 8), max(1, n_layers // 4)})


def masking_data(lm, samples, *, modes: Sequence[str] = ("zero", "knockout"), windows: Sequence[int] | None = None,
                 dataset=None) -> pd.DataFrame:
    """The masking experiment's per-batch records for ``samples`` at each window: one row per (sample, mode, window,
    layer) with the answer under the mask (``pred``), p of the unmasked answer's first token (``p_answer``,
    ``plain_p``) and the unmasked answer (``plain_pred``). ``dataset`` lends its scorer when ``samples`` is a list."""
    ds = _as_set(samples, dataset)
    L = lm.num_layers
    parts = []
    for w in default_windows(L) if windows is None else windows:
        if not 1 <= int(w) <= L:
            raise ValueError(f"Masking window {w} is outside 1..{L} for this {L}-layer model; choose windows in that "
                             "range.")
        parts.append(_per_batch("masking", lm, ds, modes=list(modes), window=int(w)).assign(window=int(w)))
    df = pd.concat(parts, ignore_index=True)
    df.attrs["questions"] = {str(s.id): (s.question, list(s.answers)) for s in ds}
    df.attrs["num_layers"] = L
    return df


def masking_figure(records: pd.DataFrame, *, title: str = "Masking the image at one layer",
                   model: str = "") -> InteractiveFigure:
    """Question, mode, window and layer -> p(first token of the unmasked answer) over the masked layer, a marker at
    the chosen layer, and the answer under the mask beside the unmasked one."""
    need = {"id", "mode", "layer", "window", "pred", "p_answer", "plain_pred", "plain_p"}
    missing = need - set(records.columns)
    if missing:
        raise ValueError(f"masking_figure needs the masking records' columns {sorted(missing)}; pass masking_data's "
                         "result.")
    ids = list(dict.fromkeys(records["id"].astype(str)))
    qs = records.attrs.get("questions", {})
    modes = list(dict.fromkeys(records["mode"]))
    windows = sorted(records["window"].unique().tolist())
    layers = sorted(records["layer"].unique().tolist())
    labels = [_question_label(i, qs.get(q, (q,))[0]) for i, q in enumerate(ids)]
    controls = [Control("question", ids, labels), Control("mask", modes), Control("window", windows,
                                                                                   kind="slider"),
                Control("layer", layers, kind="slider")]
    if len(windows) == 1:
        controls.pop(2)
    lay = _base_layout(1, height=380)
    lay["xaxis"].update(title={"text": "masked layer"}, dtick=max(1, len(layers) // 16))
    lay["yaxis"].update(title={"text": "p(first token of the unmasked answer)"}, range=[0, 1.05])
    fig = InteractiveFigure(title + (f" — {model}" if model else ""), controls, lay, height=400,
                            caption="The probability of the unmasked answer's first token when the image is "
                                    "masked at each layer (solid) and unmasked (dashed); the ring marks the chosen "
                                    "layer, whose answer is printed below. Look for the layers where the solid "
                                    "curve falls: there the answer still reads the image.")
    rec = records.assign(id=records["id"].astype(str))
    for qi, q in enumerate(ids):
        rq = rec[rec["id"] == q]
        plain_p = float(rq["plain_p"].iloc[0])
        plain = str(rq["plain_pred"].iloc[0])
        fig.traces[f"plain|{qi}"] = {"type": "scatter", "mode": "lines", "x": layers, "y": [round(plain_p, 4)] * len(layers),
                                     "line": {"dash": "dash", "color": "grey"}, "name": "unmasked"}
        for mi, mode in enumerate(modes):
            for wi, w in enumerate(windows):
                r = rq[(rq["mode"] == mode) & (rq["window"] == w)].sort_values("layer")
                cid = f"curve|{qi}|{mi}|{wi}"
                fig.traces[cid] = {"type": "scatter", "mode": "lines+markers", "x": r["layer"].tolist(),
                                   "y": _r(r["p_answer"]), "name": f"masked ({mode}, window {w})",
                                   "line": {"color": LINE_COLORS[mi % len(LINE_COLORS)]}, "marker": {"size": 5}}
                by_layer = r.set_index("layer")
                for li, j in enumerate(layers):
                    mid = f"mk|{qi}|{mi}|{wi}|{li}"
                    p = float(by_layer.loc[j, "p_answer"])
                    fig.traces[mid] = {"type": "scatter", "mode": "markers", "x": [j], "y": [round(p, 4)],
                                       "marker": {"size": 14, "color": "rgba(0,0,0,0)",
                                                  "line": {"color": "black", "width": 2}},
                                       "name": f"layer {j}", "showlegend": False}
                    ans = str(by_layer.loc[j, "pred"])
                    changed = "" if ans == plain else " <b style='color:#b00'>(changed)</b>"
                    question, gold = qs.get(q, (q, []))
                    text = [f"<b>{_esc(question)}</b> (gold: {_esc(', '.join(gold))})<br>unmasked: "
                            f"<code>{_esc(plain)}</code> · p = {plain_p:.3f}", f" &nbsp;|&nbsp; masked at layer {j} "
                            f"({_esc(mode)}, window {w}): <code>{_esc(ans)}</code>{changed} · p = {p:.3f} "
                            f"(Δ {p - plain_p:+.3f})"]
                    combo = [qi, mi, wi, li] if len(windows) > 1 else [qi, mi, li]
                    fig.states["|".join(map(str, combo))] = {"data": [cid, f"plain|{qi}", mid], "text": text}
    return fig


# --- attention ----------------------------------------------------------------------------------------------------

def attention_data(lm, samples, *, dataset=None) -> list[dict]:
    """Per sample: `sample_maps`'s maps (2-D per layer on the image, per token) and the attention experiment's
    per-batch records (mass on relevant and irrelevant tokens where the dataset knows relevance)."""
    from .experiments.attention import sample_maps
    from .experiments.common import post_prompt_for

    ds = _as_set(samples, dataset)
    views = sample_maps(lm, list(ds), post_prompt=post_prompt_for(ds))
    rec = _per_batch("attention", lm, ds)
    for v, s in zip(views, ds):
        v["records"] = rec[rec["id"] == str(s.id)].sort_values("layer").reset_index(drop=True)
        v["answers"] = list(s.answers)
        v["family"] = s.family
    return views


def question_maps(lm, samples, *, batch_size: int = 16, post_prompt=None) -> list[dict]:
    """`sample_maps` over many samples, ``batch_size`` at a time (a real model's attention maps for a whole
    benchmark would not fit in one batch), each view with its question's family."""
    from .experiments.attention import sample_maps

    samples = list(samples)
    views = []
    for i in range(0, len(samples), max(1, int(batch_size))):
        chunk = samples[i:i + max(1, int(batch_size))]
        views += [dict(v, family=s.family) for v, s in zip(sample_maps(lm, chunk, post_prompt=post_prompt), chunk)]
    return views


def _mass_curves(fig: InteractiveFigure, qi: int, view: Mapping, layers: list[int]) -> tuple[list[str], str | None]:
    """Add question ``qi``'s attention-mass curves by layer to ``fig``: mass on relevant and irrelevant tokens when
    its records have them, else the largest token share. Returns the trace ids and the column the marker follows
    (None: the largest token share)."""
    rec = view.get("records")
    curves = []
    if rec is not None and "rel_mass" in rec.columns and rec["rel_mass"].notna().any():
        for col, name, color in (("rel_mass", "relevant tokens", "#d55e00"), ("irr_mass", "irrelevant tokens",
                                                                               "#0072b2")):
            fig.traces[f"{col}|{qi}"] = {"type": "scatter", "mode": "lines+markers", "x": rec["layer"].tolist(),
                                         "y": _r(rec[col]), "name": name, "xaxis": "x2", "yaxis": "y2",
                                         "line": {"color": color}, "marker": {"size": 4}}
            curves.append(f"{col}|{qi}")
        return curves, "rel_mass"
    tokens = np.asarray(view["tokens"], float)
    fig.traces[f"max|{qi}"] = {"type": "scatter", "mode": "lines+markers", "x": layers,
                               "y": _r(tokens.max(1)), "name": "largest token share", "xaxis": "x2",
                               "yaxis": "y2"}
    curves.append(f"max|{qi}")
    return curves, None


def attention_figure(views: Sequence[Mapping], *, records: pd.DataFrame | None = None,
                     title: str = "Last-token attention over the image", model: str = "",
                     layer: int | None = None, dataset=None) -> InteractiveFigure:
    """Question and layer -> the heatmap of that layer over the image (relevant cells outlined), beside the mass on
    relevant and irrelevant tokens by layer with a marker at the chosen layer.

    ``views``: `attention_data`'s result, or `sample_maps`'s with ``records`` the attention experiment's records
    (a chapter's run holds the shown questions already: nothing is computed again); ``dataset`` names the
    questions' families where the views do not."""
    if not views:
        raise ValueError("attention_figure needs at least one view; pass attention_data's result.")
    if records is not None:
        rec = records.assign(id=records["id"].astype(str))
        views = [dict(v, records=rec[rec["id"] == str(v["id"])].sort_values("layer").reset_index(drop=True))
                 for v in views]
    L = int(np.asarray(views[0]["tokens"]).shape[0])
    layers = list(range(L))
    family = {str(s.id): s.family for s in dataset} if dataset is not None else {}
    labels = [_question_label(i, v["question"], v.get("family") or family.get(str(v.get("id"))))
              for i, v in enumerate(views)]
    controls = [Control("question", list(range(len(views))), labels),
                Control("layer", layers, kind="slider", value=L // 2 if layer is None else int(layer) % L)]
    lay = _base_layout(2, widths=[1, 1.3], image_axes=(0,), height=400)
    lay["xaxis2"].update(title={"text": "layer"}, dtick=max(1, L // 16))
    lay["yaxis2"].update(title={"text": "attention mass"}, rangemode="tozero")
    fig = InteractiveFigure(title + (f" — {model}" if model else ""), controls, lay, height=420,
                            caption="Left: the answer position's attention over the image at the chosen layer "
                                    "(renormalised over the image; brighter = more, see the colour bar); outlined "
                                    "cells hold the answer. Right: the attention mass on relevant and irrelevant "
                                    "tokens at every layer, the chosen layer ringed. Look for the bright cells "
                                    "moving onto the outline with depth.")
    lay["margin"]["b"] = 110
    lay["legend"].update(y=-0.22)  # below the colour bar
    for qi, v in enumerate(views):
        maps = np.asarray(v["maps2d"], float)
        spatial = bool(v.get("spatial", True)) and maps.ndim == 3 and maps.shape[1] > 1
        image = v.get("image") if spatial else None
        m0 = maps[0] if maps.ndim == 3 else np.asarray(maps[0])[None, :]
        geo = _grid_geometry(m0, image, v.get("extent"))
        rec = v.get("records")
        curves, ycol = _mass_curves(fig, qi, v, layers)
        upd: dict = {}
        if spatial:
            _image_panel(upd, 0, image, geo, v.get("relevant"))
            _with_axis_ranges(lay, upd, [0], geo["W"], geo["H"])
        else:
            upd["annotations"] = [{"text": "no spatial grid (query tokens)", "xref": "paper", "yref": "paper",
                                   "x": 0.2, "y": -0.1, "showarrow": False}]
        for j in layers:
            mj = maps[j] if maps.ndim == 3 else np.asarray(maps[j])[None, :]
            hid = f"hm|{qi}|{j}"
            fig.traces[hid] = _heatmap(mj, geo, 0, opacity=0.6 if image is not None else 1.0, name=f"layer {j}",
                                       showscale=True)
            fig.traces[hid].update(showlegend=False, colorbar=colorbar(lay["xaxis"]["domain"], "attention"))
            if ycol is not None:
                yv = float(rec.loc[rec["layer"] == j, ycol].iloc[0])
                extra = (f" · mass on relevant tokens {yv:.2f}, on irrelevant "
                         f"{float(rec.loc[rec['layer'] == j, 'irr_mass'].iloc[0]):.2f}")
            else:
                yv = float(np.asarray(v["tokens"], float)[j].max())
                extra = f" · largest token share {yv:.2f}"
            mid = f"mk|{qi}|{j}"
            fig.traces[mid] = {"type": "scatter", "mode": "markers", "x": [j], "y": [round(yv, 4)], "xaxis": "x2",
                               "yaxis": "y2", "marker": {"size": 13, "color": "rgba(0,0,0,0)",
                                                         "line": {"color": "black", "width": 2}},
                               "showlegend": False, "name": f"layer {j}"}
            # a list: the question's part, the same in all its states, is stored once by the page's spec
            text = [f"<b>{_esc(v['question'])}</b> (answer: {_esc(v.get('answer') or ', '.join(v.get('answers', [])))})",
                    f" · layer {j} of {L}{extra}"]
            titles = _titles(lay, [f"layer {j}", "attention mass by layer"])
            fig.layouts.setdefault(f"img|{qi}", upd)
            fig.states[f"{qi}|{j}"] = {"data": [hid, *curves, mid], "text": text,
                                       "layout": [f"img|{qi}", {"annotations": titles + upd.get("annotations", [])}]}
    return fig


# --- contrastive --------------------------------------------------------------------------------------------------

def contrastive_data(lm, samples, *, fusion_layers: Sequence[int], apply_layer: int,
                     candidate_sets: Sequence[str] = ("fusion", "shallow", "deep", "all"),
                     rhos: Sequence[float] = (0.1, 0.2, 0.4), lams: Sequence[float] = (0.0, 0.1, 0.5),
                     dataset=None, records: pd.DataFrame | None = None, complete: int | None = None,
                     batch_size: int = 16) -> dict:
    """The contrastive experiment's per-batch records on ``samples`` over candidate sets x ρ x λ (soft mask), and per
    candidate set `contrastive_views` (A_pre, A_post, I_A on the image): everything `contrastive_figure` shows.

    ``records``: a chapter's own contrastive records for these samples (any grid); then the experiment runs the
    whole grid only on the first ``complete`` samples (default: none), and the figure says which settings the
    chapter did not run for the others. ``batch_size`` bounds the samples per forward pass of the views."""
    from .experiments.common import post_prompt_for
    from .experiments.contrastive import contrastive_views_by_set

    ds = _as_set(samples, dataset)
    grid = dict(fusion_layers=list(fusion_layers), apply_layer=apply_layer, variants=("soft",),
                candidates=tuple(candidate_sets), rhos=tuple(rhos), lams=tuple(lams))
    if records is None:
        records = _per_batch("contrastive", lm, ds, **grid)
    else:
        records = records.assign(id=records["id"].astype(str))
        records = records[records["variant"] == "soft"] if "variant" in records.columns else records
        n = min(len(ds), int(complete or 0))
        if n:
            full = _per_batch("contrastive", lm, _as_set(list(ds)[:n], ds), **grid)
            records = pd.concat([full, records[~records["id"].isin(set(full["id"]))]], ignore_index=True)
    items, step = list(ds), max(1, int(batch_size))
    views: dict = {k: [] for k in candidate_sets}
    for i in range(0, len(items), step):
        for k, vs in contrastive_views_by_set(lm, items[i:i + step], candidate_sets, fusion_layers,
                                              post_prompt=post_prompt_for(ds)).items():
            views[k] += vs
    return {"records": records, "views": views,
            "samples": [dict(id=str(s.id), question=s.question, answers=list(s.answers), relevant=s.relevant,
                             family=s.family) for s in ds],
            "candidate_sets": list(candidate_sets), "rhos": [float(r) for r in rhos], "lams": [float(x) for x in lams],
            "apply_layer": int(apply_layer), "fusion_layers": [int(j) for j in fusion_layers]}


def _softmask_text(rec: pd.DataFrame, s: Mapping, kind: str, v: Mapping, rho: float, lam: float,
                   n_mask: int, apply_layer: int) -> str:
    """The line under the contrastive figure for one state: the plain answer beside the soft-masked one, read from
    the record of that question, candidate set, ρ and λ (``n_mask``: the marked tokens, when the record has no
    count)."""
    sel = rec[(rec["id"] == s["id"]) & (rec["candidates"] == kind) & (rec["variant"] == "soft")
              & np.isclose(rec["rho"].astype(float), rho) & np.isclose(rec["lam"].astype(float), lam)]
    # a list: the head is the same in all nine (ρ, λ) states of a question and candidate set, stored once
    head = (f"<b>{_esc(s['question'])}</b> (gold: {_esc(', '.join(s['answers']))}) · candidates "
            f"{_esc(kind)} → i* = {v['pre']}<br>")
    if sel.empty:  # a chapter's records: it runs a part of the grid on every question
        ran = rec[rec["id"] == s["id"]]
        settings = ", ".join(sorted({f"{c} at ρ = {float(r):g}, λ = {float(x):g}"
                                     for c, r, x in zip(ran["candidates"], ran["rho"], ran["lam"])}))
        plain = (f"plain: <code>{_esc(ran['plain_pred'].iloc[0])}</code> &nbsp;|&nbsp; " if len(ran) else "")
        return [head, plain, f"soft mask (ρ = {rho:g}: {n_mask} tokens × λ = {lam:g}): <i>the chapter did not run "
                             "this setting on this question</i>", f" (it ran {_short(settings, 160) or 'none'}; run "
                             "the notebook live to compute it)"]
    row = sel.iloc[0]
    ans, plain = str(row["pred"]), str(row["plain_pred"])
    changed = "" if ans == plain else " <b style='color:#b00'>(changed)</b>"
    n_masked = int(row["n_masked"]) if "n_masked" in row and pd.notna(row["n_masked"]) else n_mask
    return [head, f"plain: <code>{_esc(plain)}</code> &nbsp;|&nbsp; "
            f"soft mask (ρ = {rho:g}: {n_masked} tokens × λ = {lam:g} at layer "
            f"{apply_layer}): <code>{_esc(ans)}</code>{changed}"]


def contrastive_figure(data: Mapping, *, title: str = "Contrastive attention and the soft mask",
                       model: str = "") -> InteractiveFigure:
    """Question, candidate set, ρ and λ -> A_pre (layer i*), A_post and I_A over the image, the tokens the soft mask
    scales marked on I_A, and the soft-masked answer beside the plain one."""
    from .methods.softmask import soft_mask_tokens

    import torch

    sets, rhos, lams = data["candidate_sets"], data["rhos"], data["lams"]
    samples = data["samples"]
    rec = data["records"]
    labels = [_question_label(i, s["question"], s.get("family")) for i, s in enumerate(samples)]
    controls = [Control("question", list(range(len(samples))), labels), Control("candidates", sets),
                Control("ρ", rhos, [f"{r:g}" for r in rhos], kind="slider",
                        value=0.2 if 0.2 in rhos else rhos[0]),
                Control("λ", lams, [f"{x:g}" for x in lams], kind="slider", value=0.1 if 0.1 in lams else lams[0])]
    lay = _base_layout(3, image_axes=(0, 1, 2), height=330)
    lay["margin"]["b"] = 110
    lay["legend"].update(y=-0.22)  # below the colour bars
    fig = InteractiveFigure(title + (f" — {model}" if model else ""), controls, lay, height=380,
                            caption="Left to right: the attention of the pre layer i* and of the final layer over "
                                    "the image (L: the layer, 0-based), and their difference I_A. Red on I_A: "
                                    "attention gained with depth "
                                    "(I_A > 0); blue: lost (I_A < 0), as the colour bar under it reads. Green "
                                    "crosses: the image tokens the soft mask scales by λ at the apply layer "
                                    "(fainter as λ nears 1, which leaves them as they are). Look for red on the "
                                    "outlined answer cells and crosses off them.")
    for qi, s in enumerate(samples):
        for ki, kind in enumerate(sets):
            v = data["views"][kind][qi]
            spatial = bool(v.get("spatial", True))
            ia = np.asarray(v["I_A"], float)
            ia2 = ia if ia.ndim == 2 else ia[None, :]
            image = v.get("image") if spatial else None
            geo = _grid_geometry(ia2, image, v.get("extent"))
            lim = float(np.nanmax(np.abs(ia2))) if np.isfinite(ia2).any() and np.nanmax(np.abs(ia2)) > 0 else 1.0
            ids = []
            for i, (key, cs, zmid) in enumerate((("A_pre", HEATMAP, None), ("A_post", HEATMAP, None),
                                                   ("I_A", DIVERGING, 0.0))):
                vals = np.asarray(v[key], float)
                vals = vals if vals.ndim == 2 else vals[None, :]
                tid = f"{key}|{qi}|{ki}"
                t = _heatmap(vals, geo, i, colorscale=cs, zmid=zmid, opacity=0.7 if image is not None else 1.0,
                             name=key)
                if key == "I_A":  # symmetric, so white is exactly zero and red is exactly "gained"
                    t.update(zmin=-lim, zmax=lim)
                t.update(showscale=True, colorbar=colorbar(lay[f"xaxis{_ax(i)}"]["domain"],
                                                           "I_A (red: gained)" if key == "I_A" else "attention"))
                t["showlegend"] = False
                fig.traces[tid] = t
                ids.append(tid)
            upd: dict = {}
            if spatial:
                for i in range(3):
                    _image_panel(upd, i, image, geo, s.get("relevant"))
                _with_axis_ranges(lay, upd, [0, 1, 2], geo["W"], geo["H"])
            # short enough for three panels side by side on a phone (390 px); the text under the figure says i*
            upd["annotations"] = _titles(lay, [f"A_pre · L{v['pre']}", f"A_post · L{v['post']}", "I_A"])
            # the pictures are the same for every candidate set: stored once per question; the axes and the
            # titles repeat across questions and are stored once by the page's spec
            fig.layouts.setdefault(f"pic|{qi}", {k: upd.pop(k) for k in ("images", "shapes") if k in upd})
            axes = {k: upd.pop(k) for k in list(upd) if k.startswith(("xaxis", "yaxis"))}
            for ri, rho in enumerate(rhos):
                mask = np.asarray(soft_mask_tokens(torch.as_tensor(ia2.ravel()), rho)).astype(bool).reshape(ia2.shape)
                rr, cc = np.nonzero(mask)
                for li, lam in enumerate(lams):
                    # the crosses fade as λ -> 1: λ = 1 leaves the chosen tokens as they are
                    mid = f"mask|{qi}|{ki}|{ri}|{li}"
                    fig.traces[mid] = {"type": "scatter", "mode": "markers", "xaxis": "x3", "yaxis": "y3",
                                       "x": _r(geo["x0"] + cc * geo["dx"], 2), "y": _r(geo["y0"] + rr * geo["dy"], 2),
                                       "marker": {"symbol": "x-thin", "size": 7, "opacity": round(max(0.15, 1 - lam), 3),
                                                  "line": {"width": 2, "color": MASK_COLOR}},
                                       "name": f"tokens scaled by λ = {lam:g} (ρ = {rho:g})", "hoverinfo": "skip"}
                    text = _softmask_text(rec, s, kind, v, rho, lam, int(mask.sum()), data["apply_layer"])
                    fig.states[f"{qi}|{ki}|{ri}|{li}"] = {"data": [*ids, mid], "layout": [f"pic|{qi}", axes, upd],
                                                          "text": text}
    return fig


# --- the layer story: Hellinger and early exit --------------------------------------------------------------------

def layers_figure(hellinger_records: pd.DataFrame, early_exit_records: pd.DataFrame, *, model: str = "",
                  top: int = 8, title: str = "Each layer's attention and early-exit answer",
                  scorer: str | None = None) -> InteractiveFigure:
    """Layer -> the distribution over questions of that layer's Hellinger distance to the final layer's attention,
    and of the answer read off that layer (early exit), correct and wrong stacked. ``scorer``: the dataset's
    (``dataset.scorer``), so the accuracy shown is the benchmark's own (MMBench: CircularEval)."""
    for df, cols, what in ((hellinger_records, {"layer", "hellinger"}, "hellinger"),
                           (early_exit_records, {"layer", "pred", "score"}, "early_exit")):
        if not cols <= set(df.columns):
            raise ValueError(f"layers_figure needs the {what} records (columns {sorted(cols)}); pass "
                             f"{what}(...).records.")
    layers = sorted(set(hellinger_records["layer"]) | set(early_exit_records["layer"]))
    L = len(layers)
    controls = [Control("layer", layers, kind="slider", value=layers[(3 * L) // 4] if L else None)]
    lay = _base_layout(2, widths=[1, 1.2], height=400)
    lay["xaxis"].update(title={"text": "Hellinger distance to the final layer"}, range=[0, 1])
    lay["yaxis"].update(title={"text": "questions"}, rangemode="tozero")
    lay["xaxis2"].update(title={"text": "answer read off the layer"}, automargin=True, tickangle=-30)
    lay["yaxis2"].update(title={"text": "questions"}, rangemode="tozero")
    lay["barmode"] = "stack"
    lay["bargap"] = 0.1
    fig = InteractiveFigure(title + (f" — {model}" if model else ""), controls, lay, height=420,
                            caption="Left: how many questions have each Hellinger distance between the chosen "
                                    "layer's attention over the image and the final layer's (0 = the same map). "
                                    "Right: the most common answers read off the chosen layer (early exit), "
                                    "correct in green. A review layer shows as a late layer whose distances move "
                                    "right again; early exit shows when the green bars appear.")
    edges = np.linspace(0, 1, 21)
    hists = {j: np.histogram(np.clip(hellinger_records.loc[hellinger_records["layer"] == j, "hellinger"]
                                     .astype(float).to_numpy(), 0, 1), bins=edges)[0] for j in layers}
    for li, j in enumerate(layers):
        h = hellinger_records.loc[hellinger_records["layer"] == j, "hellinger"].astype(float).to_numpy()
        counts = hists[j]
        fig.traces[f"h|{li}"] = {"type": "bar", "x": _r((edges[:-1] + edges[1:]) / 2), "y": counts.tolist(),
                                 "width": 0.05, "name": "Hellinger", "marker": {"color": "#7f7f7f"},
                                 "showlegend": False}
        e = early_exit_records[early_exit_records["layer"] == j]
        words = e["pred"].astype(str).replace("", "(empty)")
        order = words.value_counts().index[:top].tolist()
        ok = [int(((words == w) & (e["score"] > 0)).sum()) for w in order]
        bad = [int(((words == w) & (e["score"] <= 0)).sum()) for w in order]
        fig.traces[f"ok|{li}"] = {"type": "bar", "x": order, "y": ok, "name": "correct", "xaxis": "x2",
                                  "yaxis": "y2", "marker": {"color": "#009e73"}}
        fig.traces[f"bad|{li}"] = {"type": "bar", "x": order, "y": bad, "name": "wrong", "xaxis": "x2",
                                   "yaxis": "y2", "marker": {"color": "#d55e00"}}
        acc = benchmark_accuracy(e["id"], e["score"], scorer) if len(e) else float("nan")
        agree = (f", agrees with the final layer on {float(e['agrees_final'].mean()):.0%}"
                 if "agrees_final" in e.columns and len(e) else "")
        text = (f"layer {j}: mean Hellinger distance {np.nanmean(h) if len(h) else float('nan'):.3f} over "
                f"{len(h)} questions · early-exit accuracy {acc:.0%}{agree}")
        # each layer's axes fit its own bars: one layer where every question gets the same word would otherwise
        # squash every other layer's bars to the bottom fifth
        tall = max([1, *(a + b for a, b in zip(ok, bad))])
        fig.states[str(li)] = {"data": [f"h|{li}", f"ok|{li}", f"bad|{li}"], "text": text,
                               "layout": {"annotations": _titles(lay, [f"attention distance at layer {j}",
                                                                       f"early-exit answers at layer {j}"]),
                                          "yaxis": {**lay["yaxis"], "range": [0, max(1, int(counts.max())) * 1.15]},
                                          "yaxis2": {**lay["yaxis2"], "range": [0, tall * 1.15]}}}
    return fig


# --- across models: the fusion threshold --------------------------------------------------------------------------

def threshold_figure(summaries: Mapping[str, pd.DataFrame], *, thresholds: Sequence[float] = (0.02, 0.05, 0.1, 0.2),
                     mode: str = "zero", title: str = "Accuracy drop by depth, and the fusion layers a threshold picks"
                     ) -> InteractiveFigure:
    """Threshold and x axis (layer or relative depth) -> each model's accuracy drop when the image is masked at a
    layer, with the fusion layers `find_layers` picks at that threshold marked."""
    from .experiments.masking import find_layers

    if not summaries:
        raise ValueError("threshold_figure needs at least one model's masking summary.")
    thresholds = [float(t) for t in thresholds]
    controls = [Control("threshold", thresholds, [f"{t:g}" for t in thresholds], kind="slider",
                        value=0.05 if 0.05 in thresholds else thresholds[0]),
                Control("x axis", ["relative", "layer"], ["relative depth", "layer"])]
    lay = _base_layout(1, height=380)
    lay["yaxis"].update(title={"text": "accuracy drop (unmasked − masked)"})
    fig = InteractiveFigure(title, controls, lay, height=400,
                            caption="Each model's accuracy drop (unmasked − masked) when the image is masked at "
                                    "one layer. Triangles: the fusion layers the chosen threshold picks (drop above "
                                    "it, before the plateau). Look for where the curves fall to zero: the plateau.")
    for xi, xkind in enumerate(("relative", "layer")):
        for ti, t in enumerate(thresholds):
            ids, lines = [], []
            ids.append(f"t|{xi}|{ti}")
            x_end = 1.0 if xkind == "relative" else max(
                (float(s["layer"].max()) for s in summaries.values() if len(s)), default=1.0)
            fig.traces[f"t|{xi}|{ti}"] = {"type": "scatter", "mode": "lines", "x": [0, x_end], "y": [t, t],
                                          "line": {"dash": "dot", "color": "grey"}, "name": f"threshold {t:g}"}
            for mi, (name, s) in enumerate(summaries.items()):
                s = s[s["mode"] == mode].sort_values("layer") if "mode" in s.columns else s.sort_values("layer")
                L = int(s["layer"].max()) + 1 if len(s) else 1
                x = (s["layer"] / max(L - 1, 1)) if xkind == "relative" else s["layer"]
                cid = f"c|{mi}|{xi}"
                color = LINE_COLORS[mi % len(LINE_COLORS)]
                fig.traces[cid] = {"type": "scatter", "mode": "lines", "x": _r(x), "y": _r(s["drop"]),
                                   "name": name, "line": {"color": color}}
                found = find_layers(s, threshold=t)
                fl = [j for j in found["fusion_layers"]]
                sel = s[s["layer"].isin(fl)]
                fid = f"f|{mi}|{xi}|{ti}"
                xs = (sel["layer"] / max(L - 1, 1)) if xkind == "relative" else sel["layer"]
                fig.traces[fid] = {"type": "scatter", "mode": "markers", "x": _r(xs), "y": _r(sel["drop"]),
                                   "marker": {"symbol": "triangle-down", "size": 11, "color": color,
                                              "line": {"color": "black", "width": 1}},
                                   "name": f"{name}: fusion layers", "showlegend": False}
                ids += [cid, fid]
                lines.append(f"{_esc(name)}: fusion layers {fl or 'none found'}, plateau from "
                             f"{found['plateau_start'] if found['plateau_start'] is not None else 'none found'}, "
                             f"review layer {found['review_layer'] if found['review_layer'] is not None else 'none found'}")
            xr = [-0.02, 1.02] if xkind == "relative" else None
            upd = {"xaxis": {**lay["xaxis"], "title": {"text": "relative depth (layer / (L − 1))" if xkind == "relative"
                                                               else "masked layer"},
                             **({"range": xr} if xr else {})}}
            fig.states[f"{ti}|{xi}"] = {"data": ids, "layout": upd,
                                        "text": f"threshold {t:g}<br>" + "<br>".join(lines)}
    return fig
