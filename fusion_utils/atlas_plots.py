"""The atlas's table and figure (issue 31): one row and one curve per model, on relative depth (layer / n_layers).

An *entry* is everything the atlas shows of one model, as plain JSON-able data (so the command line can keep it
on disk and redraw without the model): its name, family label, probe note, the numbers of
`fusion_utils.experiments.atlas.atlas_row`, the verdicts of the review test and the noise test
(`fusion_utils.report`), and the per-layer fusion profile. `entry` makes one from an atlas result; `atlas_table`,
`table_markdown`, `table_html`, `atlas_figure` and `atlas_plotly` draw any list of entries.
"""
from __future__ import annotations

import html as html_lib
import math
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from . import report
from .experiments.atlas import PROFILE_MODE, split
from .plots import BOOK_WIDTH, FUSION_COLOR, figure_style

PROFILE_COLUMNS = ("layer", "rel_depth", "accuracy", "plain_accuracy", "drop", "delta_p", "n")
REVIEW_COLOR = "#9467bd"


def model_label(name: str, spec) -> str:
    """``<last part of the name> [<family>]``, e.g. ``organism:llava-8l [LLaVA-1.5]``: unique per model (two depths of
    one family stay apart) and naming the family."""
    return f"{str(name).rstrip('/').split('/')[-1]} [{spec.label}]"


def entry(lm, result, *, seed: int = 0) -> dict:
    """One model's atlas entry from its loaded model and its `atlas` result (verdicts from the per-sample records)."""
    row = result.extra["row"]
    label = model_label(lm.name, lm.spec)
    masking, attention = split(result.records)
    review = report.review_verdicts(label, lm.spec.model_type, masking, None, None, row["n_layers"],
                                    threshold=row["threshold"], mode=PROFILE_MODE, seed=seed)[0]
    noise = report.attention_verdicts(label, attention, row["n_layers"], seed=seed)[0]
    profile = result.summary[[c for c in PROFILE_COLUMNS if c in result.summary.columns]]
    return {"model": str(lm.name), "label": label, "arch": lm.spec.model_type, "family": lm.spec.label,
            "probe_note": getattr(lm.spec, "probe_note", "") or "", "fingerprint": lm.fingerprint, **row,
            "review_test": review["verdict"], "noise_test": noise["verdict"],
            "profile": json_safe(profile.to_dict("records")), "runs": result.extra.get("runs", {})}


def json_safe(obj):
    """``obj`` with NaN as None and numpy scalars as Python numbers (entries are stored as JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    return obj


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def atlas_table(entries: Sequence[Mapping]) -> pd.DataFrame:
    """One row per model: family, depth, fusion layers, plateau start, review layer (0-based and relative), the
    review test's verdict, the persistent-noise share beside its chance level and the noise test's verdict, the
    unmasked accuracy, the sample count and the architecture's probe note."""
    rows = []
    for e in entries:
        rows.append({
            "model": e["label"], "family": e["family"], "layers": e["n_layers"],
            "fusion_layers": list(e["fusion_layers"]),
            "fusion_depths": [round(d, 3) for d in e["fusion_depths"]],
            "plateau_start": e["plateau_start"], "plateau_depth": _num(e["plateau_depth"]),
            "review_layer": e["review_layer"], "review_depth": _num(e["review_depth"]),
            "review_test": e["review_test"], "noise_share": _num(e["noise_share"]),
            "noise_chance": _num(e["noise_chance"]), "noise_test": e["noise_test"],
            "plain_accuracy": _num(e["plain_accuracy"]), "samples": e["samples"], "probe_note": e["probe_note"],
        })
    return pd.DataFrame(rows, columns=["model", "family", "layers", "fusion_layers", "fusion_depths", "plateau_start",
                                       "plateau_depth", "review_layer", "review_depth", "review_test", "noise_share",
                                       "noise_chance", "noise_test", "plain_accuracy", "samples", "probe_note"])


def table_csv(table: pd.DataFrame) -> str:
    """The table as CSV; lists of layers as ``2;4;8`` (one cell each)."""
    out = table.copy()
    for c in ("fusion_layers", "fusion_depths"):
        out[c] = out[c].apply(lambda v: ";".join(str(x) for x in v))
    return out.to_csv(index=False)


def _cell(v, column: str) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v) if v else "none"
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "none" if column in ("plateau_start", "review_layer", "plateau_depth", "review_depth") else "–"
    if isinstance(v, float):
        return f"{v:.2f}".rstrip("0").rstrip(".") if column != "plain_accuracy" else f"{v:.0%}"
    if isinstance(v, (int, np.integer)) and column in ("plateau_start", "review_layer"):
        return str(int(v))
    return str(v)


def table_text(table: pd.DataFrame) -> pd.DataFrame:
    """The table as the reader reads it: layers with their relative depth in one cell, "none" where nothing was
    found, the probe note last (empty where the probe means what it means for the paper's models)."""
    rows = []
    for _, r in table.iterrows():
        rows.append({
            "model": r["model"], "layers": str(r["layers"]),
            "fusion layers": _cell(r["fusion_layers"], "fusion_layers"),
            "plateau from": _with_depth(r["plateau_start"], r["plateau_depth"]),
            "review layer": _with_depth(r["review_layer"], r["review_depth"]),
            "review test": r["review_test"],
            "noise share (chance)": f"{_cell(r['noise_share'], 'noise_share')} ({_cell(r['noise_chance'], 'x')})",
            "noise test": r["noise_test"], "accuracy": _cell(r["plain_accuracy"], "plain_accuracy"),
            "n": str(r["samples"]), "probe note": r["probe_note"] or "",
        })
    return pd.DataFrame(rows)


def _with_depth(layer, depth) -> str:
    if layer is None or (isinstance(layer, float) and not math.isfinite(layer)):
        return "none"
    return f"{int(layer)} ({float(depth):.2f})"


def table_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of `table_text`."""
    text = table_text(table)
    esc = [[str(v).replace("|", "\\|").replace("\n", " ") for v in row] for row in text.to_numpy().tolist()]
    lines = ["| " + " | ".join(text.columns) + " |", "|" + "---|" * len(text.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in esc]
    return "\n".join(lines) + "\n"


def table_html(table: pd.DataFrame, *, figure: str | None = None, title: str = "Atlas") -> str:
    """A standalone HTML page with `table_text` (and the figure's file name as an image, if given)."""
    text = table_text(table)
    head = "".join(f"<th>{html_lib.escape(c)}</th>" for c in text.columns)
    body = "".join("<tr>" + "".join(f"<td>{html_lib.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in text.to_numpy().tolist())
    img = f'<p><img src="{html_lib.escape(figure)}" style="max-width:100%"></p>' if figure else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html_lib.escape(title)}</title>"
            "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            f"padding:3px 6px;font-size:13px}}</style></head><body><h1>{html_lib.escape(title)}</h1>{img}"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></body></html>\n")


def _colors(n: int):
    return sns.color_palette("colorblind", max(n, 1)) if n <= 10 else sns.color_palette("husl", n)


def atlas_figure(entries: Sequence[Mapping], *, title: str | None = None, figsize=(BOOK_WIDTH, 5.6)):
    """Two panels on relative depth, one curve per model: the accuracy drop when the image is zeroed at one layer
    (the fusion profile; triangles: fusion layers, ring: plateau start, star: review layer; dashed: the threshold),
    and the change in probability of the unmasked answer's first token."""
    with figure_style():
        fig, (top, bottom) = plt.subplots(2, 1, figsize=figsize, sharex=True)
        for e, color in zip(entries, _colors(len(entries))):
            p = pd.DataFrame(e["profile"]).sort_values("layer")
            x, drop = p["rel_depth"].to_numpy(float), p["drop"].to_numpy(float)
            label = e["label"] + (" *" if e.get("probe_note") else "")
            top.plot(x, drop, "-o", ms=3, lw=1.5, color=color, label=label)
            bottom.plot(x, p["delta_p"].to_numpy(float), "-o", ms=3, lw=1.5, color=color)
            at = dict(zip(p["layer"].astype(int), drop))
            fl = [j for j in e["fusion_layers"] if j in at]
            top.scatter([j / e["n_layers"] for j in fl], [at[j] for j in fl], marker="v", s=40, color=FUSION_COLOR,
                        zorder=3)
            if e["plateau_start"] is not None and e["plateau_start"] in at:
                top.scatter([e["plateau_depth"]], [at[e["plateau_start"]]], marker="o", s=70, facecolors="none",
                            edgecolors=color, linewidths=1.5, zorder=3)
            if e["review_layer"] is not None and e["review_layer"] in at:
                top.scatter([e["review_depth"]], [at[e["review_layer"]]], marker="*", s=120, color=REVIEW_COLOR,
                            zorder=4)
        if entries:
            top.axhline(entries[0]["threshold"], ls="--", lw=1, color="grey")
        top.set_ylabel("accuracy drop\n(image zeroed at one layer)")
        bottom.set_ylabel("Δ p(unmasked answer)")
        bottom.set_xlabel("relative depth (layer / number of layers)")
        bottom.set_xlim(-0.02, 1.0)
        for ax in (top, bottom):
            ax.axhline(0, lw=0.8, color="black")
        marks = [plt.Line2D([], [], marker="v", ls="", color=FUSION_COLOR, label="fusion layer"),
                 plt.Line2D([], [], marker="o", ls="", mfc="none", color="grey", label="plateau start"),
                 plt.Line2D([], [], marker="*", ls="", ms=10, color=REVIEW_COLOR, label="review layer")]
        handles, _ = top.get_legend_handles_labels()
        top.legend(handles=handles + marks, fontsize=8, loc="upper right", ncol=2 if len(handles) > 4 else 1)
        notes = [f"* {e['label']}: {e['probe_note']}" for e in entries if e.get("probe_note")]
        if notes:
            fig.text(0.01, 0.0, "\n".join(notes), fontsize=8, va="top", wrap=True)
        if title:
            fig.suptitle(title, fontsize=12)
        fig.tight_layout()
    return fig


def atlas_plotly(entries: Sequence[Mapping], *, title: str = "Atlas: the fusion profile on relative depth"):
    """The figure's top panel as an interactive plotly figure (hover: layer, drop, family)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for e in entries:
        p = pd.DataFrame(e["profile"]).sort_values("layer")
        fig.add_trace(go.Scatter(x=p["rel_depth"], y=p["drop"], mode="lines+markers", name=e["label"],
                                 customdata=p["layer"], hovertemplate="layer %{customdata}<br>drop %{y:.3f}<extra>"
                                 + html_lib.escape(e["label"]) + "</extra>"))
    fig.update_layout(title=title, xaxis_title="relative depth (layer / number of layers)",
                      yaxis_title="accuracy drop (image zeroed at one layer)", template="plotly_white")
    return fig


__all__ = ["entry", "model_label", "atlas_table", "table_csv", "table_text", "table_markdown", "table_html",
           "atlas_figure", "atlas_plotly", "json_safe"]
