"""The look shared by every figure of `fusion_utils.plots` and `fusion_utils.plots_tables`: the book's width, one
colour per model, the seaborn style applied locally, and the *empty panel* a plot function returns when its input
holds nothing to draw (see the conventions in `fusion_utils.plots`)."""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator

BOOK_WIDTH = 8.0
#: the label of every layer axis: layers are counted from 0, the paper's from 1 (converted in `fusion_utils.paper`)
LAYER_AXIS = "decoder layer (0-based)"
FUSION_COLOR = "#d62728"  # red triangles, as in the paper's masking figure
RELEVANT_COLOR = "#17becf"  # outline of ground-truth relevant cells
HEATMAP_CMAP = "magma"
DIVERGING_CMAP = "RdBu_r"

# a fixed colour per architecture (colour-blind palette, in `archs.ARCHS` order); unknown labels get a stable hashed one
PALETTE = sns.color_palette("colorblind", 10)


def use_style() -> None:
    """Apply the book's seaborn theme globally (optional; every function here applies it locally anyway)."""
    sns.set_theme(context="notebook", style="whitegrid", font_scale=0.9)


@contextmanager
def figure_style():
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=1.0):
        yield


def norm(text: str) -> str:
    return str(text).lower().replace("-", "_").replace(" ", "_").replace(".", "_")


def model_color(label: str):
    """The colour of a model in every figure: its architecture's (the longest `ArchSpec` label or model type found
    in ``label``), else a stable hashed colour."""
    from .archs import ARCHS

    key = norm(label)
    found = [(len(name), i) for i, s in enumerate(ARCHS.values()) for name in (norm(s.label), s.model_type)
             if name in key]
    if found:
        return PALETTE[max(found)[1] % 7]
    h = int(hashlib.md5(str(label).encode()).hexdigest(), 16)
    return PALETTE[[7, 8, 9][h % 3]]


def as_dict(obj, default_label: str = "model") -> dict:
    if obj is None:
        return {}
    if isinstance(obj, pd.DataFrame):
        return {default_label: obj}
    if hasattr(obj, "summary") and isinstance(getattr(obj, "summary"), pd.DataFrame):  # an ExperimentResult
        return {getattr(obj, "name", default_label): obj.summary}
    if isinstance(obj, Mapping):
        return {str(k): (v.summary if hasattr(v, "summary") and not isinstance(v, pd.DataFrame) else v)
                for k, v in obj.items()}
    raise TypeError(f"Expected a DataFrame or a dict label -> DataFrame, got {type(obj).__name__}.")


def nothing_in(df, columns: Sequence[str], what: str) -> str | None:
    """Why ``df`` has nothing to draw (no table, no rows, a column of ``columns`` all NaN), or None when it has.
    A table of the wrong type or without one of ``columns`` is a bad argument, not an empty result: that raises."""
    if df is None:
        return f"{what}: no table given"
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{what}: expected a pandas DataFrame, got {type(df).__name__}.")
    if df.empty:
        return f"{what}: the table is empty (no sample was run)"
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {', '.join(map(repr, missing))}; "
                         f"it has {', '.join(map(repr, df.columns))}.")
    for c in columns:
        if pd.api.types.is_numeric_dtype(df[c]) and df[c].notna().sum() == 0:
            return f"{what}: column {c!r} is all NaN"
    return None


EMPTY_GID = "empty"


def say_empty(ax, reason: str, *, y: float = 0.5, fontsize: float = 10, width: int = 80) -> None:
    """Write ``reason`` across ``ax`` (gid ``"empty"``, which `empty_reason` reads back), wrapped at ``width``."""
    import textwrap

    ax.text(0.5, y, textwrap.fill(str(reason), width), ha="center", va="center", transform=ax.transAxes,
            fontsize=fontsize, color="dimgray", gid=EMPTY_GID)


def empty_panel(reason: str, *, ax=None, title: str | None = None, figsize=(BOOK_WIDTH, 1.6)):
    """A figure with no data and ``reason`` written across it: what a plot function returns when its input holds
    nothing to draw (an analysis that found nothing, or does not apply to this model or dataset)."""
    with figure_style():
        fig, ax = new_axes(ax, figsize)
        ax.set_axis_off()
        say_empty(ax, reason)
        if title:
            ax.set_title(title)
        fig.tight_layout()
    return fig


def empty_reason(fig) -> str | None:
    """The text of an empty panel in ``fig`` (joined when several panels are empty), or None if every panel has
    data."""
    texts = [t.get_text().replace("\n", " ") for ax in fig.axes for t in ax.texts if t.get_gid() == EMPTY_GID]
    return "; ".join(texts) if texts else None


def integer_layers(ax, axis: str = "x") -> None:
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))

def finish(fig, title: str | None = None):
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return fig


def new_axes(ax, figsize):
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize)
    return fig, ax
