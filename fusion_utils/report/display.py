"""How a chapter shows what it measured: reader tables, the verdicts at a glance with their rules folded under
them, the family-wise (Holm) correction across a build's claims, captioned static figures, the paper's unreported
values, and the files a chapter leaves for the verdict page and for download.

Nothing here computes a verdict (the rules live in `fusion_utils.report`); it renders the rows they return, whose
columns are `fusion_utils.report.VERDICT_COLUMNS` plus the numbers behind them (``key``, ``p``, ``value``, ``ci``).

>>> holm([0.01, 0.04, 0.03])
[0.03, 0.06, 0.06]
"""
from __future__ import annotations

import base64
import html as _html
import io
import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["Table", "table", "masking_runs", "NOT_REPORTED", "paper_value", "paper_layer_row", "holm",
           "verdict_rows", "verdicts_html", "verdicts", "figure", "save_verdicts", "save_records", "downloads_dir",
           "downloads_html", "OUT_ENV", "FILES_BASE", "noise_table", "persistent_counts", "noise_frequency_figure",
           "SHORT_CLAIMS", "ci_text", "effect_text", "anchor"]

#: what a cell says where the paper gives no value (never "none found": nothing was looked for)
NOT_REPORTED = "not reported"

#: a few words per claim key, for the verdict table's first column (the full claim is in the folded block)
SHORT_CLAIMS = {"fusion_shallow": "Fusion layers are shallow", "plateau": "Plateau after ~60% depth",
                "review": "Late review layer", "early_exit": "Early exit jumps late",
                "hellinger": "Hellinger rises at review", "noise": "Persistent irrelevant tokens",
                "relevant_rises": "Relevant attention rises", "contrastive_gain": "Contrastive attention helps",
                "fusion_candidates": "Fusion-layer candidates best", "ia_relevant": "I_A on relevant regions",
                "beats_baselines": "Ahead of the baselines"}

# --- reader tables -------------------------------------------------------------------------------------------------------

class Table:
    """A table as a reader reads it: no pandas index, "none found" for a missing value or an empty list, floats to
    ``digits`` places, lists as comma-separated text."""

    def __init__(self, df: pd.DataFrame, *, none: str = "none found", digits: int = 3):
        self.df, self.none, self.digits = df, none, digits

    def cell(self, v) -> str:
        if v is None or (isinstance(v, float) and not np.isfinite(v)) or (isinstance(v, (list, tuple)) and not v):
            return self.none
        if isinstance(v, (list, tuple)):
            return ", ".join(self.cell(x) for x in v) if not _all_ints(v) else int_ranges(v)
        if isinstance(v, (float, np.floating)):  # 56.34, not 56.340; 0.875; 1
            return f"{float(v):.{self.digits}f}".rstrip("0").rstrip(".")
        try:
            if pd.isna(v):
                return self.none
        except (TypeError, ValueError):
            pass
        return str(v)

    def text(self) -> pd.DataFrame:
        cols = {}
        for c in self.df.columns:
            col = self.df[c]
            vals = pd.to_numeric(col, errors="coerce") if col.dtype.kind == "f" else None
            # a column of layer indices with a gap turns float in pandas (29.0): shown as the integers they are
            whole = vals is not None and vals.notna().any() and bool((vals.dropna() % 1 == 0).all())
            cols[c] = [self.none if whole and pd.isna(v) else str(int(v)) if whole else self.cell(v) for v in col]
        return pd.DataFrame(cols, columns=self.df.columns)

    def _repr_html_(self) -> str:
        return self.text().to_html(index=False, escape=True, classes="fu-table")

    def __repr__(self) -> str:
        return self.text().to_string(index=False)


def _all_ints(v) -> bool:
    return all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in v)


def int_ranges(values) -> str:
    """Layer lists as a reader scans them: runs of consecutive integers as ranges.

    >>> int_ranges([0, 1, 2, 3, 5, 7, 8])
    '0–3, 5, 7–8'
    """
    vals = sorted(int(x) for x in values)
    parts, i = [], 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        parts.append(str(vals[i]) if j == i else f"{vals[i]}–{vals[j]}")
        i = j + 1
    return ", ".join(parts)


def table(df: pd.DataFrame | Sequence[Mapping], *, none: str = "none found", digits: int = 3) -> Table:
    """``df`` (or a list of row dicts) shown without the index, with ``none`` where a value is missing."""
    return Table(df if isinstance(df, pd.DataFrame) else pd.DataFrame(list(df)), none=none, digits=digits)


def masking_runs(runs_dir, *, threshold: float = 0.05, mode: str = "zero") -> pd.DataFrame:
    """One row per masking run recorded under ``runs_dir`` -- every build that shares the run records (each
    parameters file's book writes there), whatever model and data it ran: model, data, questions, depth, fusion
    layers, plateau and review layer at ``threshold``, and the unmasked accuracy, all from the one-layer probe (as
    the fusion chapter reads them). Runs without a summary yet, persistent (``onward``) runs and wider windows are
    left out."""
    from ..experiments.masking import find_layers

    rows = []
    for cfg_path in sorted(Path(runs_dir).glob("masking/*/config.json")):
        summary = cfg_path.parent / "summary.csv"
        if not summary.is_file():
            continue
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))["config"]
            s = pd.read_csv(summary)
        except (OSError, ValueError, KeyError):
            continue  # a run being written: listed once it is complete
        params = cfg.get("params") or {}
        if params.get("onward") or int(params.get("window", 1)) != 1:
            # the persistent probe (zero from ℓ on) or a wider window finds other layers: only the one-layer
            # probe is what the fusion chapter's table and the verdicts read
            continue
        s = s[s["mode"] == mode] if "mode" in s.columns else s
        if s.empty:
            continue
        found = find_layers(s, threshold=threshold)
        rows.append({"model": cfg["model"]["name"], "data": cfg["dataset"]["name"], "questions": cfg["dataset"]["n"],
                     "layers": int(s["layer"].max()) + 1, "fusion_layers": found["fusion_layers"],
                     "plateau_from": found["plateau_start"], "review_layer": found["review_layer"],
                     "plain_accuracy": float(s["plain_accuracy"].mean())})
    cols = ["model", "data", "questions", "layers", "fusion_layers", "plateau_from", "review_layer", "plain_accuracy"]
    # chapters that mask in one mode or in two record two runs of the same model and data: one row each
    return pd.DataFrame(rows, columns=cols).drop_duplicates(["model", "data", "questions"]).reset_index(drop=True)


# --- the paper's values -------------------------------------------------------------------------------------------

# (family, column) pairs the paper states as *absent* rather than leaves out: no review dip in the Qwen models
_REPORTED_ABSENT = {("qwen2_vl", "review_layer"), ("qwen2_5_vl", "review_layer")}


def paper_value(arch: str, column: str, value):
    """A value of the paper's for a reader's table: ``"not reported"`` where the paper gives none, ``"none"`` where
    it reports an absence (Qwen's review layer), else the value.

    >>> paper_value("llava", "fusion_layers", None), paper_value("qwen2_vl", "review_layer", None)
    ('not reported', 'none (reported)')
    """
    empty = value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, (list, tuple)) and not value)
    if not empty:
        return value
    return "none (reported)" if (arch, column) in _REPORTED_ABSENT else NOT_REPORTED


def paper_layer_row(arch: str, columns: Sequence[str], **extra) -> dict:
    """One row of `fusion_utils.paper.LAYERS` for a table beside ours: ``model`` is the paper's label, every
    column in ``columns`` read through `paper_value` (``plateau_from`` and friends; a column the paper has no key
    for reads "not reported"), ``extra`` set as given."""
    from ..paper import LAYERS

    r = LAYERS[arch]
    row = {"model": r["label"]}
    for c in columns:
        key = {"layers": "n_layers"}.get(c, c)
        row[c] = paper_value(arch, c, r.get(key))
    row.update(extra)
    return row


# --- Holm across a build's claims ---------------------------------------------------------------------------------

def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order (NaN stays NaN and is not counted).

    Holm controls the family-wise error rate for any dependence between the tests, which the claims of one build
    have (the same questions and models feed several claims).

    >>> holm([0.04, float("nan"), 0.01])
    [0.04, nan, 0.02]
    """
    p = np.asarray([float(x) if x is not None else float("nan") for x in pvalues], float)
    ok = np.flatnonzero(np.isfinite(p))
    out = np.full(p.shape, np.nan)
    m = len(ok)
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return [float(round(x, 12)) if np.isfinite(x) else float("nan") for x in out]


# --- verdicts at a glance -----------------------------------------------------------------------------------------

_CI = re.compile(r"95% CI \[([^\]]*)\]([^;,]*)")


def _plain_number(text: str) -> str:
    """``+0`` and ``-0`` read as ``0``: a CI of [+0, +0] says every resample gave exactly zero."""
    return re.sub(r"(?<![\w.])[+-]0(?![\d.])", "0", text.strip())


def ci_text(row: Mapping) -> str:
    """The row's 95% CI as ``[lo, hi] unit``, from its uncertainty text; a CI of exactly zero says what it means."""
    m = _CI.search(str(row.get("uncertainty") or ""))
    if not m:
        return ""
    lo_hi = [_plain_number(x) for x in m.group(1).split(",")]
    unit = m.group(2).strip()
    if all(x == "0" for x in lo_hi):
        return "95% CI [0, 0]: every resample gives zero (no question changed)"
    return f"95% CI [{', '.join(lo_hi)}]" + (f" {unit}" if unit else "")


def effect_text(row: Mapping, limit: int = 90) -> str:
    """The effect's first clause (the full text is in the folded block)."""
    e = str(row.get("effect") or "").split(";")[0].strip()
    return e if len(e) <= limit else e[: limit - 1].rstrip() + "…"


def anchor(chapter: str, row: Mapping) -> str:
    """The id of a verdict's row on its chapter page (the verdicts page links here)."""
    raw = f"v-{chapter}-{row.get('key') or row.get('claim')}-{row.get('model')}"
    return re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")


def _verdict_class(verdict: str) -> str:
    v = str(verdict)
    return ("yes" if v.startswith("reproduces") else "no" if v.startswith("does not") else
            "na" if v.startswith("n/a") else "open")


def _num(x):
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def verdict_rows(rows: Iterable[Mapping], chapter: str = "") -> list[dict]:
    """JSON-safe verdict rows: the `VERDICT_COLUMNS` as text, plus ``key``, ``p``, ``chapter`` and ``anchor``."""
    from . import VERDICT_COLUMNS

    out, seen = [], Counter()
    for r in rows:
        d = {c: ("" if r.get(c) is None else str(r.get(c))) for c in VERDICT_COLUMNS}
        n = _num(r.get("n"))
        a = anchor(chapter, r)
        seen[a] += 1  # two rows of one claim and model (e.g. two variants) keep distinct ids
        d.update(n="" if n is None else str(int(n)), key=str(r.get("key") or ""), p=_num(r.get("p")),
                 chapter=chapter, anchor=a if seen[a] == 1 else f"{a}-{seen[a]}")
        if r.get("power"):  # the sample size chosen by power (`report.power.with_power`)
            need = r.get("needed_test_n")
            d.update(power=str(r["power"]), pilot_n=_num(r.get("pilot_n")), drawn_test_n=_num(r.get("drawn_test_n")),
                     needed_test_n=None if need is None else (_num(need) if math.isfinite(need) else "inf"))
        out.append(d)
    return out


VERDICT_CSS = """<style>
.fu-verdicts{margin:.4em 0 1.2em}
.fu-vtable{width:100%;max-width:100%;table-layout:fixed;border-collapse:collapse;font-size:.88em;line-height:1.35}
.fu-vtable th,.fu-vtable td{padding:.3em .45em;border-bottom:1px solid rgba(128,128,128,.35);vertical-align:top;
  text-align:left;overflow-wrap:break-word;word-break:normal;hyphens:auto}
.fu-vtable th:nth-child(1){width:30%}.fu-vtable th:nth-child(2){width:20%}.fu-vtable th:nth-child(3){width:18%}
.fu-vtable.fu-holm th:nth-child(4){width:20%}.fu-vtable.fu-holm th:nth-child(5){width:12%}
.fu-badge{display:inline-block;padding:0 .4em;border-radius:3px;font-weight:600;color:#111}
.fu-badge.yes{background:#b7e4c7}.fu-badge.no{background:#f4b6b6}.fu-badge.open{background:#ffe8a3}
.fu-badge.na{background:#ddd}
.fu-vdetails{margin-top:.4em;font-size:.88em}.fu-vdetails summary{cursor:pointer;font-weight:600}
.fu-vdetails dl{margin:.4em 0}.fu-vdetails dt{font-weight:600;margin-top:.5em}
.fu-vdetails dd{margin-left:1em;overflow-wrap:break-word}
@media (max-width:640px){.fu-vtable thead{display:none}.fu-vtable,.fu-vtable tbody,.fu-vtable tr,.fu-vtable td{
  display:block;width:100%!important}.fu-vtable tr{border-bottom:2px solid rgba(128,128,128,.5);padding:.3em 0}
  .fu-vtable td{border:0;padding:.1em .2em}.fu-vtable td::before{content:attr(data-label) ": ";font-weight:600}}
</style>"""


def _cell(label: str, html: str) -> str:
    return f'<td data-label="{label}">{html}</td>'


def _badge(verdict: str) -> str:
    v = str(verdict)
    short = v.split(":")[0] if v.startswith("n/a") else v
    return f'<span class="fu-badge {_verdict_class(v)}" title="{_html.escape(v)}">{_html.escape(short)}</span>'


def _details(rows: Sequence[Mapping], chapter: str) -> str:
    from . import CLAIM_TEXT

    items = []
    for r in rows:
        key = r.get("key") or ""
        facts = [("Claim", CLAIM_TEXT.get(key, r.get("claim", ""))), ("Verdict", r.get("verdict")),
                 ("Rule", r.get("rule")), ("Chance level", r.get("chance")), ("Split", r.get("split")),
                 ("Effect", r.get("effect")), ("Test, p-value and CI", _plain_number(str(r.get("uncertainty") or ""))),
                 ("n", r.get("n")), ("n that would decide (80% power)", r.get("needed n")),
                 ("Sample size chosen by power", r.get("power")),
                 ("The paper", r.get("reported"))]
        lis = "".join(f"<li><b>{k}:</b> {_html.escape(str(v))}</li>" for k, v in facts
                      if v is not None and str(v) not in ("", "nan", "<NA>"))
        items.append(f"<dt>{_html.escape(SHORT_CLAIMS.get(key, str(r.get('claim', ''))))} — "
                     f"{_html.escape(str(r.get('model', '')))}</dt><dd><ul>{lis}</ul></dd>")
    return ('<details class="fu-vdetails"><summary>How each verdict was decided: rule, chance level, split, test, '
            f'p-value and the n that would decide</summary><dl>{"".join(items)}</dl></details>')


def verdicts_html(rows: Sequence[Mapping], chapter: str = "", *, holm_p: Sequence[float] | None = None,
                  links: Mapping[str, str] | None = None, details: bool = True) -> str:
    """The compact verdict table (claim, model, verdict, effect with its CI) that fits the text column and turns
    into one card per verdict on a phone, then the folded block with the rule, chance level, split, test, p-value
    and needed n. ``holm_p`` adds a column of Holm-adjusted p-values; ``links`` maps a row's anchor to a URL."""
    rows = list(rows)
    head = ["Claim", "Model", "Verdict", "Effect (95% CI)"] + (["Holm p"] if holm_p is not None else [])
    body = []
    for i, r in enumerate(rows):
        a = r.get("anchor") or anchor(chapter, r)
        claim = _html.escape(SHORT_CLAIMS.get(r.get("key") or "", str(r.get("claim", ""))))
        if links and a in links:
            claim = f'<a href="{_html.escape(links[a])}">{claim}</a>'
        eff, ci = effect_text(r), ci_text(r)
        if not eff and str(r.get("verdict", "")).startswith("n/a:"):  # why it does not apply, where the effect would be
            eff = str(r["verdict"])[4:].strip()
        cells = [_cell("Claim", claim), _cell("Model", _html.escape(str(r.get("model", "")))),
                 _cell("Verdict", _badge(r.get("verdict", ""))),
                 _cell("Effect", _html.escape(eff) + (f"<br><small>{_html.escape(ci)}</small>" if ci else ""))]
        if holm_p is not None:
            hp = holm_p[i]
            cells.append(_cell("Holm p", "—" if hp is None or not math.isfinite(hp) else
                               ("&lt; 0.001" if hp < 0.001 else f"{hp:.2g}")))
        body.append(f'<tr id="{a}">{"".join(cells)}</tr>')
    if not body:
        body.append(f'<tr><td colspan="{len(head)}">No verdict in this build.</td></tr>')
    cls = "fu-vtable fu-holm" if holm_p is not None else "fu-vtable"
    table_html = (f'<table class="{cls}"><thead><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr></thead>'
                  f'<tbody>{"".join(body)}</tbody></table>')
    return (VERDICT_CSS + '<div class="fu-verdicts">' + table_html + (_details(rows, chapter) if details and rows
                                                                        else "") + "</div>")


class _HTML:
    def __init__(self, html: str):
        self.html = html

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:  # a plain-text front end shows a hint, not the markup
        return "<verdicts: open the notebook in Jupyter or the book>"


def verdicts(rows: Sequence[Mapping], chapter: str = "") -> _HTML:
    """What a chapter shows under its title: `verdicts_html` as a notebook output."""
    return _HTML(verdicts_html(verdict_rows(rows, chapter), chapter))


# --- captioned static figures -------------------------------------------------------------------------------------

FIGURE_CSS = ("<style>.fu-figure{margin:.6em 0 1.2em}.fu-figure img{display:block;max-width:100%;height:auto;"
              "background:#fff;border-radius:3px}.fu-figure figcaption{font-size:.88em;margin-top:.3em}</style>")


#: a PNG larger than this is tried as a JPEG too (pictures under heatmaps: a PNG of 700 kB, a JPEG of 130 kB)
JPEG_FROM = 150_000


def _image_uri(png: bytes) -> str:
    """The figure as a data URI: its PNG, or a JPEG when the PNG is large and the JPEG under half of it (a picture
    under a heatmap; line and bar charts stay PNG, whose text stays sharp)."""
    if len(png) > JPEG_FROM:
        from PIL import Image

        out = io.BytesIO()
        Image.open(io.BytesIO(png)).convert("RGB").save(out, format="JPEG", quality=90)
        if out.tell() < len(png) / 2:
            return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure(fig, caption: str, *, alt: str | None = None, dpi: int = 150) -> _HTML:
    """A matplotlib figure as a captioned HTML figure (PNG on white, so it reads in dark mode too, and scaled to
    the column): ``caption`` says what is plotted and what to look for. The figure is closed, so the inline
    backend does not show it a second time."""
    import matplotlib.pyplot as plt

    if not caption or not caption.strip():
        raise ValueError("figure() needs a caption saying what is plotted and what to look for.")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    uri = _image_uri(buf.getvalue())
    text = alt or caption.split(". ")[0]
    return _HTML(f'{FIGURE_CSS}<figure class="fu-figure"><img src="{uri}" alt="{_html.escape(text)}">'
                 f"<figcaption><b>Figure.</b> {_html.escape(caption)}</figcaption></figure>")


# --- what a chapter leaves behind: verdicts for the verdict page, records for download ------------------------------

#: the environment variable naming the folder a build collects chapter files in (set by the book driver)
OUT_ENV = "FUSION_UTILS_BOOK_FILES"
#: where a chapter page (``book/chapters/<name>.html``) reaches its chapter's files in the built site
FILES_BASE = "../../_chapter_files"


def downloads_dir(chapter: str) -> Path:
    """Where a chapter writes its verdict rows and run records: ``$FUSION_UTILS_BOOK_FILES/<chapter>`` under the
    book driver, else ``./_book_files/<chapter>`` beside the notebook (a run by hand)."""
    base = Path(os.environ.get(OUT_ENV) or "_book_files")
    d = base / chapter
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_verdicts(rows: Sequence[Mapping], chapter: str) -> Path:
    """Write the chapter's verdict rows as ``verdicts.json`` (read by `fusion_utils.book.verdict_index`)."""
    path = downloads_dir(chapter) / "verdicts.json"
    path.write_text(json.dumps(verdict_rows(rows, chapter), indent=1, ensure_ascii=False), encoding="utf-8")
    return path


def save_records(tables: Mapping[str, pd.DataFrame], chapter: str) -> list[Path]:
    """Write each run's per-sample records as ``<name>.csv`` for download; returns the paths."""
    out = []
    for name, df in tables.items():
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "records"
        p = downloads_dir(chapter) / f"{safe}.csv"
        df.to_csv(p, index=False)
        out.append(p)
    return out


def downloads_html(chapter: str, files: Sequence[Path], *, params: Mapping | None = None,
                   base: str = FILES_BASE) -> _HTML:
    """Links to the chapter's records and its executed notebook, as the built page reaches them; ``params``: the
    chapter's own knobs that decide its numbers (threshold, ρ, λ, ...), listed under the links and written to
    ``parameters.json`` beside the records."""
    links = [f'<a href="{base}/{chapter}/{_html.escape(Path(f).name)}" download>{_html.escape(Path(f).name)}</a>'
             for f in files]
    links.append(f'<a href="{base}/{chapter}/{chapter}.ipynb" download>{chapter}.ipynb (executed notebook)</a>')
    out = '<p class="fu-downloads"><b>Downloads:</b> ' + " · ".join(links) + "</p>"
    if params:
        (downloads_dir(chapter) / "parameters.json").write_text(json.dumps(dict(params), indent=1, default=str),
                                                                 encoding="utf-8")
        knobs = " · ".join(f"<code>{_html.escape(str(k))} = {_html.escape(repr(v))}</code>" for k, v in params.items())
        out += f'<p class="fu-params"><b>This chapter\'s parameters</b> (beside the build\'s): {knobs}</p>'
    return _HTML(out)


# --- persistent tokens, as the attention chapter states them --------------------------------------------------------

def _persistent_rows(records: pd.DataFrame) -> pd.DataFrame:
    """The per-sample rows the noise verdict reads: one per question, with relevance labels where it has them."""
    last = records.dropna(subset=["n_tokens"]) if "n_tokens" in records.columns else records.iloc[0:0]
    if "persistent_irrelevant" in last.columns and last["persistent_irrelevant"].notna().any():
        last = last.dropna(subset=["persistent_irrelevant"])
    return last


def noise_table(results: Mapping) -> pd.DataFrame:
    """One row per model: questions, how many have a persistent token, persistent tokens per such question (the
    number the noise verdict states), per question over all questions, the irrelevant share and the tokens that
    persist most often, as text ("token 12 in 5 questions, ...") rather than a list of pairs."""
    rows = []
    for name, r in results.items():
        last = _persistent_rows(r.records)
        n_persist = last["persistent"].apply(len).astype(float) if len(last) else pd.Series(dtype=float)
        has = n_persist > 0
        if "relevant_area" in last.columns:
            has &= last["relevant_area"].notna()
        share = None
        if has.any() and "persistent_irrelevant" in last.columns:
            share = float((last.loc[has, "persistent_irrelevant"].astype(float) / n_persist[has]).mean())
        counts = persistent_counts(r.records, top=5)
        rows.append({"model": name, "questions": int(len(last)), "with a persistent token": int(has.sum()),
                     "persistent tokens per such question": round(float(n_persist[has].mean()), 1) if has.any()
                     else None,
                     "per question (all)": round(float(n_persist.mean()), 3) if len(last) else None,
                     "irrelevant share": None if share is None else round(share, 3),
                     "most persistent": ", ".join(f"token {t} ({n}×)" for t, n in zip(counts["token"],
                                                                                         counts["total"])) or None})
    return pd.DataFrame(rows)


def persistent_counts(records: pd.DataFrame, top: int = 12) -> pd.DataFrame:
    """Per image token, in how many questions it is persistent: ``irrelevant`` (every persistent token of that
    question lies off its relevant cells), ``relevant`` (every one on them), ``mixed`` (both kinds: the records do
    not say which is which), ``total``; the ``top`` most frequent tokens."""
    counts: dict[int, dict[str, int]] = {}
    for _, row in _persistent_rows(records).iterrows():
        toks = list(row["persistent"])
        irr = row.get("persistent_irrelevant")
        kind = ("mixed" if irr is None or pd.isna(irr) else "irrelevant" if int(irr) == len(toks) else
                "relevant" if int(irr) == 0 else "mixed")
        for t in toks:
            c = counts.setdefault(int(t), {"irrelevant": 0, "relevant": 0, "mixed": 0})
            c[kind] += 1
    df = pd.DataFrame([{"token": t, **c} for t, c in counts.items()],
                      columns=["token", "irrelevant", "relevant", "mixed"])
    df["total"] = df[["irrelevant", "relevant", "mixed"]].sum(axis=1)
    return df.sort_values(["total", "token"], ascending=[False, True]).head(top).reset_index(drop=True)


def noise_frequency_figure(records: pd.DataFrame, *, k: int, title: str = ""):
    """`fusion_utils.plots.noise_frequency` of `persistent_counts`: irrelevant persistences in red."""
    from ..plots import noise_frequency

    return noise_frequency(persistent_counts(records),
                           title=f"{title}: tokens in the top-{k} at ≥ 75% of the layers".lstrip(": "))
