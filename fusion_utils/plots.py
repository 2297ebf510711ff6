"""Figures from the experiments' tables and from attention maps (matplotlib + seaborn).

Every function returns a `matplotlib.figure.Figure` (created with pyplot, so a notebook's inline backend shows it
once at the end of the cell: assign it, ``fig = plots.masking_curves(...)``, rather than ending the cell with
both the call and ``fig``). Nothing here loads a model, calls ``plt.show()`` or closes a figure it did not create.

Conventions shared by all figures:

- width `BOOK_WIDTH` (8 in, the book's text width); heights scale with the number of panel rows;
- one colour per model, stable across figures (`model_color`), whatever the order models are passed in;
- fusion layers are red triangles (the paper's convention), the review layer a dotted vertical line;
- layer axes show integer layers; ``relative=True`` switches to relative depth (layer / number of layers) so models
  of different depth, and the paper's reported layers, can share one axis;
- layers are 0-based everywhere (axes say "decoder layer (0-based)"); reported numbers are passed in, never looked
  up, and 0-based too (``paper.reported_layers(arch)``: ``{"fusion_layers": [...], "review_layer": 28, "n_layers":
  32, "label": "LLaVA-1.5 (reported; 0-based)"}``, the paper's 1-based 29 converted in `fusion_utils.paper`),
  drawn hollow;
- nothing to draw (no table, an empty table, an all-NaN measurement, no relevance, no persistent token) is not an
  error: the function returns an *empty panel*, a figure whose text says why (`empty_panel`; `empty_reason(fig)`
  reads it back), so a chapter keeps going on a model or dataset where an analysis finds nothing or does not apply.
  Bad arguments (an unknown metric or mode, a missing column, a wrong type or shape) still raise ``ValueError`` /
  ``TypeError`` saying what to fix.

The styling is applied inside each function (``figure_style()``), so importing this module changes no global state;
call `use_style()` once in a notebook to give other figures the same look.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.collections import LineCollection
from matplotlib.colors import TwoSlopeNorm
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, PercentFormatter

# the shared look, and the accuracy-table figures, live in their own modules; importing them here keeps
# `plots.figure_style`, `plots.accuracy_bars` and the rest where chapters and widgets look for them
from .plots_style import (BOOK_WIDTH, DIVERGING_CMAP, EMPTY_GID, FUSION_COLOR, HEATMAP_CMAP,  # noqa: F401
                          LAYER_AXIS, RELEVANT_COLOR, as_dict, empty_panel, empty_reason, figure_style, finish,
                          integer_layers, model_color, new_axes, nothing_in, say_empty, use_style)
from .plots_tables import ablation_lines, accuracy_bars

__all__ = [
    "BOOK_WIDTH", "use_style", "model_color", "masking_curves", "review_evidence", "attention_heatmaps",
    "relevance_curves", "noise_tokens", "noise_frequency", "contrastive_panels", "accuracy_bars",
    "ablation_lines", "draw_heatmap", "empty_panel", "empty_reason", "LAYER_AXIS",
]


def _layer_found(found, mode: str | None) -> dict:
    """Accept `find_layers` output for one mode, or ``extra["layers"]`` (mode -> that dict), or None."""
    if not found:
        return {}
    if "fusion_layers" in found or "review_layer" in found:
        return dict(found)
    if mode is not None and mode in found:
        return dict(found[mode] or {})
    if len(found) == 1:
        return dict(next(iter(found.values())) or {})
    return {}


def _reported_list(reported) -> list[dict]:
    if reported is None:
        return []
    if isinstance(reported, Mapping):
        if any(k in reported for k in ("fusion_layers", "review_layer", "n_layers")):
            return [dict(reported)]
        return [dict(v, label=v.get("label", k)) for k, v in reported.items()]  # label -> reported dict
    return [dict(r) for r in reported]


# --- masking curves ---------------------------------------------------------------------------------------------

_METRIC_LABEL = {"accuracy": "accuracy with the image masked", "drop": "accuracy drop (unmasked − masked)",
                 "delta_p": "Δ p(unmasked answer's first token)"}


def _drawable_masking(data: Mapping, mode: str, metric: str) -> tuple[dict, list[str]]:
    """The summaries of ``data`` with something to draw for ``mode`` (label -> rows of that mode), and why each of
    the others is left out."""
    drawable, skipped = {}, []
    for label, s in data.items():
        why = nothing_in(s, ["layer", metric], f"masking summary of {label}")
        if why is None and "mode" in s.columns:
            if mode not in set(s["mode"]):
                raise ValueError(f"masking summary of {label} has no mode {mode!r}; it has "
                                 f"{', '.join(map(repr, sorted(set(s['mode']))))}.")
            s = s[s["mode"] == mode]
            if s[metric].notna().sum() == 0:
                why = f"masking summary of {label}: {metric!r} is all NaN for mode {mode!r}"
        if why is None:
            drawable[label] = s
        else:
            skipped.append(why)
    return drawable, skipped


def _draw_found_layers(ax, s, found: Mapping, metric: str, color, scale) -> None:
    """One model's fusion layers (red triangles on its curve), review layer and, for "drop", fusion threshold."""
    fusion = [j for j in found.get("fusion_layers") or [] if j in set(s["layer"])]
    if fusion:
        fy = s.set_index("layer").loc[fusion, metric].to_numpy(float)
        ax.plot(np.asarray(fusion, float) / scale, fy, ls="none", marker="^",
                ms=9, color=FUSION_COLOR, mec="white", mew=0.6, zorder=5, gid="fusion")
    review = found.get("review_layer")
    if review is not None:
        rx = review / scale
        ax.axvline(rx, color=color, ls=":", lw=1.5, gid="review")
        ax.annotate(f"review L{review}", xy=(rx, 0.02), xycoords=("data", "axes fraction"),
                    xytext=(3, 0), textcoords="offset points", color=color, fontsize=8, rotation=90,
                    va="bottom", gid="review")
    if metric == "drop" and found.get("threshold") is not None:
        ax.axhline(float(found["threshold"]), color="grey", ls=":", lw=1)


def _draw_reported(ax, reported, relative: bool) -> list:
    """The paper's layers, hollow triangles along the top and its review layer dashed; returns their legend
    handles."""
    handles = []
    for i, rep in enumerate(_reported_list(reported)):
        n_rep = rep.get("n_layers")
        if relative and not n_rep:
            raise ValueError("reported values need 'n_layers' to be placed on a relative depth axis.")
        scale = n_rep if relative else 1
        fl = list(rep.get("fusion_layers") or [])
        trans = ax.get_xaxis_transform()
        if fl:
            ax.plot(np.asarray(fl, float) / scale, np.full(len(fl), 0.97 - 0.05 * i), transform=trans,
                    ls="none", marker="^", ms=9, mfc="none", mec=FUSION_COLOR, mew=1.4, clip_on=False,
                    gid="reported")
        if rep.get("review_layer") is not None:
            ax.axvline(rep["review_layer"] / scale, color="grey", ls="--", lw=1.2, gid="reported_review")
        lab = rep.get("label", "reported (paper)")
        handles.append(Line2D([], [], ls="none", marker="^", mfc="none", mec=FUSION_COLOR, mew=1.4, ms=8,
                              label=f"{lab}: fusion layers"))
        if rep.get("review_layer") is not None:
            handles.append(Line2D([], [], color="grey", ls="--", label=f"{lab}: review layer"))
    return handles


def masking_curves(summaries, layers_found: Mapping | None = None, *, mode: str = "zero", metric: str = "accuracy",
                   reported=None, relative: bool = False, ax=None, title: str | None = None,
                   figsize=(BOOK_WIDTH, 4.0)):
    """Masking metric vs masked layer, one line per model.

    ``summaries``: ``{label: masking summary}`` (or one summary / `ExperimentResult`); ``layers_found``:
    ``{label: result.extra["layers"]}`` (or ``{label: find_layers(...)}``). ``metric``: "accuracy" (with the
    unmasked accuracy as a dashed line), "drop" (with the fusion threshold dotted) or "delta_p".
    Fusion layers are red triangles (`gid="fusion"`), the review layer a dotted line + label (`gid="review"`).
    ``reported``: the paper's layers, drawn as hollow red triangles along the top (`gid="reported"`) and its review
    layer as a grey dashed line; with ``relative=True`` the x axis is layer / n_layers, where they line up with
    models of any depth.
    """
    if metric not in _METRIC_LABEL:
        raise ValueError(f"metric must be one of {', '.join(_METRIC_LABEL)}, got {metric!r}.")
    data = as_dict(summaries)
    title = title or f"Masking the image at one layer ({mode})"
    if not data:
        return empty_panel("no masking summaries given", ax=ax, title=title)
    layers_found = dict(layers_found or {})
    drawable, skipped = _drawable_masking(data, mode, metric)
    if not drawable:
        return empty_panel("; ".join(skipped), ax=ax, title=title)
    with figure_style():
        fig, ax = new_axes(ax, figsize)
        handles = []
        for label, s in drawable.items():
            s = s.sort_values("layer")
            n_layers = int(s["layer"].max()) + 1
            x = s["layer"].to_numpy(float) / (n_layers if relative else 1)
            y = s[metric].to_numpy(float)
            color = model_color(label)
            (line,) = ax.plot(x, y, "-o", color=color, ms=3.5, lw=1.8, label=label, gid=f"curve:{label}")
            handles.append(line)
            if metric == "accuracy" and "plain_accuracy" in s.columns and s["plain_accuracy"].notna().any():
                ax.axhline(float(s["plain_accuracy"].mean()), color=color, ls="--", lw=1.2, alpha=0.8,
                           gid=f"unmasked:{label}")
            found = _layer_found(layers_found.get(label), mode)
            _draw_found_layers(ax, s, found, metric, color, n_layers if relative else 1)
        if metric in ("drop", "delta_p"):
            ax.axhline(0.0, color="black", lw=0.8, alpha=0.6)
        handles += _draw_reported(ax, reported, relative)
        handles.append(Line2D([], [], ls="none", marker="^", color=FUSION_COLOR, ms=8, label="fusion layers (ours)"))
        if metric == "accuracy":
            handles.append(Line2D([], [], color="grey", ls="--", label="unmasked accuracy"))
        if relative:
            ax.set_xlabel("masked decoder layer (relative depth, 0-based layer / number of layers)")
            ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
            ax.set_xlim(-0.02, 1.0)
        else:
            ax.set_xlabel("masked " + LAYER_AXIS)
            integer_layers(ax)
        ax.set_ylabel(_METRIC_LABEL[metric])
        ax.set_title(title)
        if skipped:  # the other models still drawn; say which are missing and why
            say_empty(ax, "not drawn: " + "; ".join(skipped), y=0.04, fontsize=7)
        # beside the axes, not on them: "best" still covered the curves of several models
        ax.legend(handles=handles, fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        fig.tight_layout()
    return fig


# --- review evidence --------------------------------------------------------------------------------------------

def review_evidence(masking_summary=None, hellinger_summary=None, early_exit_summary=None, found=None,
                    label: str = "model", *, mode: str = "zero", figsize=None):
    """Three panels side by side for one model: single-layer masking drop, Hellinger distance of each layer's
    attention to the final layer's, early-exit accuracy (and agreement with the final layer). A dotted vertical line
    at the review layer (``found``: ``extra["layers"]`` or one mode's `find_layers` dict) when there is one.
    A summary passed as None leaves its panel out; at least one is needed.
    """
    panels = [(n, s) for n, s in (("masking", masking_summary), ("hellinger", hellinger_summary),
                                  ("early_exit", early_exit_summary)) if s is not None]
    if not panels:
        return empty_panel(f"{label}: no masking, Hellinger or early-exit summary given",
                           title=f"{label}: evidence for a review layer")
    found = _layer_found(found, mode)
    review = found.get("review_layer")
    color = model_color(label)
    with figure_style():
        fig, axes = plt.subplots(1, len(panels), figsize=figsize or (BOOK_WIDTH, 3.0), squeeze=False)
        for ax, (name, s) in zip(axes[0], panels):
            s = s.summary if hasattr(s, "summary") and not isinstance(s, pd.DataFrame) else s
            why = nothing_in(s, {"masking": ["layer", "drop"], "hellinger": ["layer", "hellinger"],
                                  "early_exit": ["layer", "accuracy"]}[name],
                              {"masking": "masking summary", "hellinger": "hellinger summary",
                               "early_exit": "early-exit summary"}[name])
            if why is None and name == "masking" and "mode" in s.columns:
                if mode not in set(s["mode"]):
                    raise ValueError(f"masking summary has no mode {mode!r}.")
                s = s[s["mode"] == mode]
            if why is not None:  # this line of evidence is missing; the other panels still show theirs
                ax.set_axis_off()
                say_empty(ax, why, fontsize=8, width=28)
                ax.set_title({"masking": f"masking ({mode})", "hellinger": "attention vs final layer",
                              "early_exit": "early exit"}[name])
                continue
            if name == "masking":
                s = s.sort_values("layer")
                ax.plot(s["layer"], s["drop"], "-o", color=color, ms=3)
                ax.axhline(0, color="black", lw=0.8, alpha=0.6)
                if found.get("threshold") is not None:
                    ax.axhline(found["threshold"], color="grey", ls=":", lw=1)
                fl = [j for j in found.get("fusion_layers") or [] if j in set(s["layer"])]
                if fl:
                    ax.plot(fl, s.set_index("layer").loc[fl, "drop"], ls="none", marker="^", ms=8,
                            color=FUSION_COLOR, zorder=5, gid="fusion")
                ax.set_ylabel("accuracy drop")
                ax.set_title(f"masking ({mode})")
            elif name == "hellinger":
                s = s.sort_values("layer")
                ax.plot(s["layer"], s["hellinger"], "-o", color=color, ms=3)
                if "hellinger_sd" in s.columns and s["hellinger_sd"].notna().any():
                    ax.fill_between(s["layer"], s["hellinger"] - s["hellinger_sd"].fillna(0),
                                    s["hellinger"] + s["hellinger_sd"].fillna(0), color=color, alpha=0.15, lw=0)
                ax.set_ylabel("Hellinger distance")
                ax.set_title("attention vs final layer")
            else:
                s = s.sort_values("layer")
                ax.plot(s["layer"], s["accuracy"], "-o", color=color, ms=3, label="accuracy")
                if "agreement" in s.columns and s["agreement"].notna().any():
                    ax.plot(s["layer"], s["agreement"], "--", color=color, alpha=0.7, label="agrees with final")
                    ax.legend(fontsize=9, loc="upper left")
                ax.set_ylabel("early-exit accuracy")
                ax.set_title("early exit")
            ax.set_xlabel(LAYER_AXIS)
            integer_layers(ax)
            if review is not None:
                ax.axvline(review, color=FUSION_COLOR, ls=":", lw=1.5, gid="review")
        if review is not None:
            axes[0][0].annotate(f"review L{review}", xy=(review, 0.97), xycoords=("data", "axes fraction"),
                                xytext=(3, 0), textcoords="offset points", fontsize=8, color=FUSION_COLOR, va="top")
        return finish(fig, f"{label}: evidence for a review layer")


# --- attention heatmaps -----------------------------------------------------------------------------------------

def _outline(ax, relevant, extent) -> None:
    """Outline the union of True cells of a bool grid laid over ``extent`` = (x0, x1, y0, y1) (y down)."""
    rel = np.asarray(relevant, bool)
    if rel.ndim != 2 or not rel.any():
        return
    R, C = rel.shape
    x0, x1, y0, y1 = extent
    cw, ch = (x1 - x0) / C, (y1 - y0) / R
    segs = []
    for r, c in zip(*np.nonzero(rel)):
        X, Y = x0 + c * cw, y0 + r * ch
        if r == 0 or not rel[r - 1, c]:
            segs.append([(X, Y), (X + cw, Y)])
        if r == R - 1 or not rel[r + 1, c]:
            segs.append([(X, Y + ch), (X + cw, Y + ch)])
        if c == 0 or not rel[r, c - 1]:
            segs.append([(X, Y), (X, Y + ch)])
        if c == C - 1 or not rel[r, c + 1]:
            segs.append([(X + cw, Y), (X + cw, Y + ch)])
    ax.add_collection(LineCollection(segs, colors=RELEVANT_COLOR, linewidths=2.0, gid="relevant"))


def _extent_px(extent, W, H) -> tuple[float, float, float, float]:
    """A view's ``extent`` (fractions left, top, right, bottom; None: the whole image) in pixels of a W x H image."""
    ex0, ey0, ex1, ey1 = extent if extent is not None else (0.0, 0.0, 1.0, 1.0)
    return ex0 * W, ey0 * H, ex1 * W, ey1 * H


def draw_heatmap(ax, values, image=None, relevant=None, *, alpha: float = 0.6, cmap: str = HEATMAP_CMAP,
                 vmin=None, vmax=None, norm=None, spatial: bool | None = None, title: str | None = None,
                 extent=None):
    """Draw one [rows, cols] map on ``ax``: bilinear-upsampled over ``image`` (PIL) with ``alpha``, relevant cells
    outlined. ``extent``: the part of the image the map shows, (left, top, right, bottom) as fractions (a view's
    ``extent``; default the whole image), so a centre-cropped grid lands on the centre of the picture. A one-row map
    (``spatial=False``, e.g. InstructBLIP's 32 query tokens) is drawn as a strip, without the image, and titled
    "no spatial grid". Returns the image artist (for a colorbar)."""
    v = np.asarray(values, dtype=float)
    if v.ndim == 1:
        v = v[None, :]
    if v.ndim != 2:
        raise ValueError(f"draw_heatmap: expected a 2-D [rows, cols] map, got shape {v.shape}.")
    if v.size == 0:
        ax.set_axis_off()
        say_empty(ax, "no image tokens", fontsize=8, width=20)
        return None
    if spatial is None:
        spatial = v.shape[0] > 1
    kw = dict(cmap=cmap, norm=norm) if norm is not None else dict(cmap=cmap, vmin=vmin, vmax=vmax)
    if not spatial:
        im = ax.imshow(v, aspect="auto", interpolation="nearest", **kw)
        ax.set_yticks([])
        ax.set_xlabel("query token")
        ax.set_title((title + "\n" if title else "") + "no spatial grid", fontsize=9)
        ax.grid(False)
        return im
    if image is not None:
        W, H = image.size
        ax.imshow(np.asarray(image.convert("RGB")), extent=(0, W, H, 0))
    else:
        W, H = v.shape[1], v.shape[0]
    x0, y0, x1, y1 = _extent_px(extent if image is not None else None, W, H)
    im = ax.imshow(v, extent=(x0, x1, y1, y0), interpolation="bilinear",
                   alpha=alpha if image is not None else 1.0, **kw)
    if relevant is not None:
        _outline(ax, relevant, (0, W, 0, H))
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    if title:
        ax.set_title(title, fontsize=9)
    return im


def attention_heatmaps(maps_layers, image=None, layers: Sequence[int] | None = None, relevant=None, *,
                       ncols: int | None = None, alpha: float = 0.6, cmap: str = HEATMAP_CMAP,
                       shared_scale: bool = False, spatial: bool | None = None, title: str | None = None,
                       panel_size: float | None = None, extent=None):
    """Per-layer attention heatmaps over the image, one panel per layer in ``layers``.

    ``maps_layers``: [L, rows, cols] array, a list of [rows, cols] maps (index = layer) or a dict layer -> map;
    ``layers``: which to show (default: up to 8 evenly spaced, including the first and last). Each map is coloured
    on its own scale (``shared_scale=True``: one scale for all). ``relevant``: the sample's bool grid over the
    image, outlined. One-row maps (no spatial grid) are drawn as strips. ``extent``: the view's part of the image
    (see `draw_heatmap`).
    """
    if maps_layers is None or len(maps_layers) == 0:
        return empty_panel("attention_heatmaps: no attention maps given", title=title)
    if isinstance(maps_layers, Mapping):
        maps = {int(k): np.asarray(v, float) for k, v in maps_layers.items()}
    else:
        maps = {j: np.asarray(m, float) for j, m in enumerate(maps_layers)}
    L = max(maps) + 1
    if layers is None:
        keys = sorted(maps)
        layers = keys if len(keys) <= 8 else [keys[int(round(i))] for i in np.linspace(0, len(keys) - 1, 8)]
    layers = [int(j) % L if j < 0 else int(j) for j in layers]
    missing = [j for j in layers if j not in maps]
    if missing:
        raise ValueError(f"attention_heatmaps: no map for layer(s) {missing}; maps cover layers {sorted(maps)}.")
    if not layers:
        raise ValueError("attention_heatmaps: no layers to show.")
    if all(not np.isfinite(maps[j]).any() for j in layers):
        return empty_panel("attention_heatmaps: the maps of the requested layers are all NaN", title=title)
    first = maps[layers[0]]
    strip = spatial is False or (spatial is None and (first.ndim == 1 or first.shape[0] == 1))
    n = len(layers)
    ncols = ncols or (1 if strip else min(n, 4))
    nrows = int(np.ceil(n / ncols))
    size = panel_size or (BOOK_WIDTH / ncols)
    fig_h = (0.9 * nrows + 0.5) if strip else (size * nrows + 0.5)
    vmin = vmax = None
    if shared_scale:
        vals = np.concatenate([maps[j].ravel() for j in layers])
        vmin, vmax = float(np.nanmin(vals)), float(np.nanmax(vals))
    with figure_style():
        fig, axes = plt.subplots(nrows, ncols, figsize=(BOOK_WIDTH, fig_h), squeeze=False)
        flat = axes.ravel()
        for ax, j in zip(flat, layers):
            m = maps[j]
            t = f"layer {j}" + ("" if shared_scale else f" (max {np.nanmax(m):.2f})")
            draw_heatmap(ax, m, image=None if strip else image, relevant=None if strip else relevant,
                         alpha=alpha, cmap=cmap, vmin=vmin, vmax=vmax, spatial=not strip, title=t, extent=extent)
        for ax in flat[n:]:
            fig.delaxes(ax)
        return finish(fig, title)


# --- relevance curves -------------------------------------------------------------------------------------------

def relevance_curves(summaries, *, ratio: bool = True, marker_layer: int | None = None, axes=None,
                     title: str | None = None, figsize=(BOOK_WIDTH, 3.2)):
    """Attention mass on relevant vs irrelevant image tokens by layer (solid vs dashed, one colour per model),
    and the relevant mass relative to the relevant area (``rel_ratio``; 1 = no preference) in a second panel.

    ``summaries``: an attention summary (or per-layer records of one sample), or ``{label: summary}``.
    ``marker_layer``: put a marker at that layer (used by the explorers).
    """
    data = as_dict(summaries)
    if not data:
        return empty_panel("relevance_curves: no attention summaries given", title=title)
    skipped = []
    for label, s in list(data.items()):
        if s is None or s.empty:
            skipped.append(f"the attention summary of {label} is empty")
        elif "rel_mass" not in s.columns or "irr_mass" not in s.columns or s["rel_mass"].notna().sum() == 0:
            skipped.append(f"{label} has no relevant/irrelevant attention mass")
        else:
            continue
        del data[label]
    if not data:  # relevance does not apply: say why once, for every model
        return empty_panel("; ".join(skipped) + ". Relevance needs a dataset with ground-truth regions (the "
                           "procedural world), a model with a spatial image grid, and tokens at least half covered "
                           "by a relevant region.", ax=None if axes is None else np.atleast_1d(axes)[0],
                           title=title, figsize=(figsize[0], 1.8))
    show_ratio = ratio and any("rel_ratio" in s.columns and s["rel_ratio"].notna().any() for s in data.values())
    with figure_style():
        if axes is None:
            fig, axs = plt.subplots(1, 2 if show_ratio else 1, figsize=figsize, squeeze=False)
            axs = list(axs[0])
        else:
            axs = list(np.atleast_1d(axes))
            fig = axs[0].figure
            show_ratio = show_ratio and len(axs) > 1
        for label, s in data.items():
            s = s.groupby("layer", as_index=False).mean(numeric_only=True).sort_values("layer")
            c = model_color(label)
            axs[0].plot(s["layer"], s["rel_mass"], "-", color=c, lw=1.8, label=f"{label}: relevant")
            axs[0].plot(s["layer"], s["irr_mass"], "--", color=c, lw=1.5, label=f"{label}: irrelevant")
            if show_ratio and "rel_ratio" in s.columns:
                axs[1].plot(s["layer"], s["rel_ratio"], "-", color=c, lw=1.8, label=label)
            if marker_layer is not None and marker_layer in set(s["layer"]):
                row = s.set_index("layer").loc[marker_layer]
                axs[0].plot([marker_layer], [row["rel_mass"]], "o", color=c, ms=8, gid="marker")
                axs[0].plot([marker_layer], [row["irr_mass"]], "o", mfc="white", mec=c, ms=8, gid="marker")
                if show_ratio and "rel_ratio" in s.columns:
                    axs[1].plot([marker_layer], [row["rel_ratio"]], "o", color=c, ms=8, gid="marker")
        axs[0].set_ylabel("attention mass")
        axs[0].set_title("relevant vs irrelevant image tokens")
        if skipped:
            say_empty(axs[0], "not drawn: " + "; ".join(skipped), y=0.04, fontsize=7, width=60)
        axs[0].legend(fontsize=9, loc="best")
        if show_ratio:
            axs[1].axhline(1.0, color="grey", ls="--", lw=1)
            axs[1].set_ylabel("relevant mass / relevant area")
            axs[1].set_title("preference for relevant tokens (1 = none)")
            if len(data) > 1:
                axs[1].legend(fontsize=9, loc="best")
        for ax in axs[: 2 if show_ratio else 1]:
            ax.set_xlabel(LAYER_AXIS)
            integer_layers(ax)
        if marker_layer is not None:
            for ax in axs[: 2 if show_ratio else 1]:
                ax.axvline(marker_layer, color="grey", lw=0.8, alpha=0.6)
        return finish(fig, title)


# --- persistent noise tokens ------------------------------------------------------------------------------------

def noise_tokens(maps, relevant, *, k: int = 5, persist: float = 0.75, max_tokens: int = 6, ax=None,
                 title: str | None = None, figsize=(BOOK_WIDTH, 3.4)):
    """For one sample: attention per layer of its *persistent* tokens (in the top-``k`` at ≥ ``persist`` of the
    layers, as in the attention experiment), irrelevant ones red, relevant ones green, against the mean relevant
    and mean irrelevant token and the uniform share 1/N.

    ``maps``: [L, N] per-token attention (``AttentionMaps.sample(b)``); ``relevant``: per token, bool or the
    covered fraction (≥ 0.5 counts as relevant; NaN = off-grid), e.g. `attention.token_relevance(...)`.
    """
    m = np.asarray(maps.detach().cpu() if hasattr(maps, "detach") else maps, dtype=float)
    if m.ndim != 2:
        raise ValueError(f"noise_tokens: expected a [layers, tokens] map, got shape {m.shape}.")
    if m.size == 0:
        return empty_panel("noise_tokens: the attention map has no image tokens", ax=ax, title=title)
    if relevant is None:
        return empty_panel("noise_tokens: no token relevance (it needs ground-truth regions and a spatial image "
                           "grid)", ax=ax, title=title)
    rel_raw = np.asarray(relevant, dtype=float)
    if rel_raw.shape != (m.shape[1],):
        raise ValueError(f"noise_tokens: relevance has shape {rel_raw.shape}, expected ({m.shape[1]},).")
    rel = np.nan_to_num(rel_raw) >= 0.5
    if not rel.any() or rel.all():
        return empty_panel(f"noise_tokens: {'every' if rel.all() else 'no'} image token is at least half covered by "
                           "a relevant region, so relevant and irrelevant tokens cannot be told apart",
                           ax=ax, title=title)
    L, N = m.shape
    kk = min(k, N)
    top = np.argsort(-m, axis=1)[:, :kk]
    counts = np.bincount(top.ravel(), minlength=N)
    persistent = np.flatnonzero(counts >= persist * L)
    persistent = persistent[np.argsort(-counts[persistent])][:max_tokens]
    layers = np.arange(L)
    with figure_style():
        fig, ax = new_axes(ax, figsize)
        ax.plot(layers, m[:, rel].mean(1), color="#2ca02c", lw=2.5, label="mean relevant token")
        ax.plot(layers, m[:, ~rel].mean(1), color="grey", lw=2.0, label="mean irrelevant token")
        ax.axhline(1.0 / N, color="black", ls=":", lw=1, label="uniform 1/N")
        for t in persistent:
            irr = not rel[t]
            ax.plot(layers, m[:, t], "-" if irr else "--", color="#d62728" if irr else "#98df8a", lw=1.2,
                    marker=".", gid="noise" if irr else "persistent_relevant",
                    label=f"persistent {'irrelevant' if irr else 'relevant'} token {t}")
        if not len(persistent):
            ax.text(0.5, 0.9, f"no token is in the top-{kk} at ≥{persist:.0%} of layers", transform=ax.transAxes,
                    ha="center", fontsize=8)
        ax.set_xlabel(LAYER_AXIS)
        ax.set_ylabel("attention share")
        integer_layers(ax)
        ax.set_title(title or "Persistent high-attention tokens")
        ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
    return fig


def noise_frequency(noise, *, n_tokens: int | None = None, ax=None, title: str | None = None,
                    figsize=(BOOK_WIDTH, 3.0)):
    """How often each image token is persistent across samples: ``attention(...).extra["noise"]``, a mapping
    token -> count, or a table with columns ``token``, ``irrelevant``, ``relevant``, ``mixed`` (samples where the
    token persisted off the relevant cells, on them, or beside tokens of both kinds), drawn as stacked bars."""
    if noise is None or len(noise) == 0:
        return empty_panel("noise_frequency: no persistent-noise statistics given (no sample was run)", ax=ax,
                           title=title)
    if isinstance(noise, pd.DataFrame):
        toks, parts = list(map(str, noise["token"])), {c: list(noise[c]) for c in ("irrelevant", "relevant", "mixed")}
    else:
        pairs = noise["most_common_tokens"] if "most_common_tokens" in noise else [(k, v) for k, v in noise.items()]
        toks, parts = [str(t) for t, _ in pairs], {"persistent": [c for _, c in pairs]}
    if not toks:
        return empty_panel("no token was persistent (in the top-k at most layers) in any sample", ax=ax, title=title)
    colors = {"irrelevant": FUSION_COLOR, "relevant": "#2ca02c", "mixed": "#bbbbbb", "persistent": "#7f7f7f"}
    with figure_style():  # stacked: a token's red part counts the questions where it was irrelevant
        fig, ax = new_axes(ax, figsize)
        bottom = np.zeros(len(toks))
        for kind, counts in parts.items():
            ax.bar(toks, counts, bottom=bottom, color=colors[kind], label=kind)
            bottom += np.asarray(counts, float)
        ax.set_xlabel("image token index" + (f" (of {n_tokens})" if n_tokens else ""))
        ax.set_ylabel("samples where it persists")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if len(parts) > 1:
            ax.legend(fontsize=9, loc="upper right", frameon=True)
        share = None if isinstance(noise, pd.DataFrame) else noise.get("irrelevant_share_of_persistent")
        ax.set_title((title or "Tokens that stay in the top-k at most layers") + (
            f" ({share:.0%} of them irrelevant)" if share is not None and np.isfinite(share) else ""))
        fig.tight_layout()
    return fig


# --- contrastive attention --------------------------------------------------------------------------------------

def panel_row(axes, view: Mapping, *, alpha: float = 0.6):
    for key in ("A_pre", "A_post", "I_A"):
        if view.get(key) is None:
            raise ValueError(f"contrastive_panels: the view has no {key!r} map.")
    image = view.get("image")
    a_pre, a_post, ia = (np.asarray(view[k], float) for k in ("A_pre", "A_post", "I_A"))
    if ia.ndim == 1:
        a_pre, a_post, ia = a_pre[None], a_post[None], ia[None]
    spatial = bool(view["spatial"]) if view.get("spatial") is not None else ia.shape[0] > 1
    rel = view.get("relevant")
    pre, post = view.get("pre"), view.get("post")
    ext = view.get("extent")
    ax0, ax1, ax2, ax3 = axes
    if image is not None:
        ax0.imshow(np.asarray(image.convert("RGB")))
        if rel is not None:
            W, H = image.size
            _outline(ax0, rel, (0, W, 0, H))
    else:
        ax0.text(0.5, 0.5, "no image", ha="center", va="center", transform=ax0.transAxes)
    ax0.set_xticks([]), ax0.set_yticks([]), ax0.grid(False)
    ax0.set_title(view.get("title") or "image", fontsize=9)
    draw_heatmap(ax1, a_pre, image if spatial else None, spatial=spatial, alpha=alpha, extent=ext,
                 title=f"A_pre (layer i*={pre})" if pre is not None else "A_pre")
    draw_heatmap(ax2, a_post, image if spatial else None, spatial=spatial, alpha=alpha, extent=ext,
                 title=f"A_post (layer {post})" if post is not None else "A_post")
    lim = float(np.nanmax(np.abs(ia))) if np.isfinite(ia).any() else 1.0
    lim = lim if lim > 0 else 1.0
    im = draw_heatmap(ax3, ia, image if spatial else None, spatial=spatial, alpha=0.75, cmap=DIVERGING_CMAP,
                      norm=TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim), title="I_A = A_post − A_pre", extent=ext)
    mask = view.get("mask")
    if mask is not None and spatial:
        mask = np.asarray(mask, bool)
        W, H = (image.size if image is not None else (ia.shape[1], ia.shape[0]))
        x0, y0, x1, y1 = _extent_px(ext if image is not None else None, W, H)
        R, C = mask.shape
        cw, ch = (x1 - x0) / C, (y1 - y0) / R
        for r, c in zip(*np.nonzero(mask)):
            ax3.add_patch(matplotlib.patches.Rectangle((x0 + c * cw, y0 + r * ch), cw, ch, fill=False,
                                                       hatch="///", ec="black", lw=0, alpha=0.5, gid="soft_mask"))
    return im


def contrastive_panels(view, *, title: str | None = None, colorbar: bool = True):
    """image | A_pre (layer i*) | A_post (final layer) | I_A (diverging, centred at 0), one row per view.

    ``view``: a dict from `contrastive_views` (``pre``, ``post``, ``A_pre``, ``A_post``, ``I_A`` as [rows, cols]
    arrays, ``image``; optional ``relevant`` bool grid, ``mask`` bool [rows, cols] of softly masked tokens
    (hatched), ``extent`` (the view's part of the image), ``title``), or a list of them.
    """
    views = [view] if isinstance(view, Mapping) else list(view or [])
    if not views:
        return empty_panel("contrastive_panels: no view given", title=title)
    n = len(views)
    with figure_style():
        fig, axes = plt.subplots(n, 4, figsize=(BOOK_WIDTH, 2.3 * n + 0.4), squeeze=False)
        for row, v in zip(axes, views):
            im = panel_row(row, v)
            if colorbar and im is not None:
                fig.colorbar(im, ax=row[3], fraction=0.046, pad=0.03)
        return finish(fig, title)
