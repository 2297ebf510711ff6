"""Figures of the accuracy tables: accuracy by method, and ablation lines over ρ and λ (re-exported by
`fusion_utils.plots`, whose conventions they follow)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from .plots_style import BOOK_WIDTH, PALETTE, empty_panel, figure_style, finish, model_color, new_axes, nothing_in

__all__ = ["accuracy_bars", "ablation_lines"]


def accuracy_bars(table, *, x: str = "method", y: str = "accuracy", hue: str | None = "model", order=None,
                  plain: str | None = "plain", ax=None, title: str | None = None, fmt: str | None = None,
                  figsize=(BOOK_WIDTH, 3.6)):
    """Accuracy per method (plain vs contrastive variants vs baselines), bars grouped by ``hue`` (model) when the
    table has that column. The bar of method ``plain`` is hatched and each bar is labelled with its value."""
    why = nothing_in(table, [x, y], "accuracy table")
    if why is not None:
        return empty_panel(why, ax=ax, title=title)
    df = table.dropna(subset=[y])
    # shares in [0, 1] read as percentages with a decimal: "{:.1f}" labelled 0.91 and 0.94 both "0.9"
    fmt = fmt or ("{:.1%}" if df[y].between(0, 1).all() else "{:.1f}")
    if hue is not None and hue not in df.columns:
        hue = None
    order = list(order) if order is not None else list(dict.fromkeys(df[x]))
    if plain is not None and plain in order:
        order = [plain] + [o for o in order if o != plain]
    with figure_style():
        fig, ax = new_axes(ax, figsize)
        if hue is not None:
            hues = list(dict.fromkeys(df[hue]))
            palette = {h: model_color(h) for h in hues}
            sns.barplot(data=df, x=x, y=y, hue=hue, order=order, hue_order=hues, palette=palette, ax=ax,
                        errorbar=None)
            ax.legend(fontsize=9, title=hue, title_fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.22),
                      ncol=min(len(hues), 3), frameon=False)  # below the axes: it never covers a bar
        else:
            sns.barplot(data=df, x=x, y=y, order=order, color=PALETTE[0], ax=ax, errorbar=None)
        for cont in ax.containers:
            ax.bar_label(cont, fmt=lambda v: fmt.format(v) if np.isfinite(v) else "", fontsize=8, padding=1)
        if plain is not None and plain in order:
            i = order.index(plain)
            for cont in ax.containers:
                if i < len(cont.patches):
                    cont.patches[i].set_hatch("//")
        ax.set_xlabel("")
        ax.set_ylabel(y)
        ax.set_title(title or "Accuracy by method")
        plt.setp(ax.get_xticklabels(), rotation=20 if len(order) > 5 else 0, ha="right" if len(order) > 5 else "center")
        fig.tight_layout()
    return fig


def ablation_lines(table, *, x: str = "rho", y: str = "accuracy", hue: str | None = "lam", col: str | None = None,
                   baseline=None, title: str | None = None, figsize=None):
    """``y`` vs ``x`` (e.g. ρ or λ), one line per value of ``hue``, one panel per value of ``col`` (e.g. candidate
    set). ``baseline``: a number, or a column of the table (e.g. "plain_accuracy"), drawn as a dashed line."""
    need = [x, y] + [c for c in (hue, col) if c is not None]
    why = nothing_in(table, need, "ablation table")
    if why is not None:
        return empty_panel(why, title=title)
    df = table.dropna(subset=[y])
    cols = list(dict.fromkeys(df[col])) if col is not None else [None]
    with figure_style():
        fig, axes = plt.subplots(1, len(cols), figsize=figsize or (BOOK_WIDTH, 3.2), squeeze=False, sharey=True)
        for ax, cv in zip(axes[0], cols):
            sub = df if cv is None else df[df[col] == cv]
            groups = [(None, sub)] if hue is None else list(sub.groupby(hue, sort=True))
            pal = sns.color_palette("viridis", max(len(groups), 1))
            for (hv, g), c in zip(groups, pal):
                g = g.groupby(x, as_index=False)[y].mean().sort_values(x)
                ax.plot(g[x], g[y], "-o", color=c, ms=4, label=None if hv is None else f"{hue} = {hv}")
            b = baseline
            if isinstance(baseline, str):
                b = float(sub[baseline].mean()) if baseline in sub.columns else None
            if b is not None and np.isfinite(b):
                ax.axhline(float(b), color="black", ls="--", lw=1.2, label="plain")
            ax.set_xlabel({"rho": "ρ (share of tokens soft-masked)", "lam": "λ (scale of masked tokens)"}.get(x, x))
            ax.set_title(f"{col} = {cv}" if cv is not None else (title or f"{y} vs {x}"), fontsize=10)
            ax.legend(fontsize=9, loc="best")
        axes[0][0].set_ylabel(y)
        return finish(fig, title if col is not None else None)
