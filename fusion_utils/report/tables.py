"""The chapters' tables: methods, candidate sets, models, the paper's reported values, verdicts and latency. Nothing
here loads a model or decides a verdict."""
from __future__ import annotations

import pandas as pd

from ..paper import LATENCY_S, LAYERS
from .contrastive_rules import gain_row, settings
from .verdicts import with_holm


def label(lm) -> str:
    """A model's name in tables and figures: its hub name and family, or the organism's family."""
    name = lm.name.split("/")[-1]
    return f"{name} [{lm.spec.label}]" if not name.startswith("organism:") else f"{lm.spec.label} organism"


def pick_examples(dataset, n: int) -> list:
    """Up to ``n`` samples, one per question family first (so figures show different kinds of question)."""
    chosen, seen = [], set()
    for s in dataset:
        if s.family not in seen:
            chosen.append(s)
            seen.add(s.family)
        if len(chosen) == n:
            return chosen
    rest = [s for s in dataset if s not in chosen]
    return (chosen + rest)[:n]


def _setting(row) -> str:
    if row["variant"] == "crop":
        return f"ours: crop ({row['candidates']})"
    return f"ours: soft ({row['candidates']})"


def method_table(runs: dict) -> pd.DataFrame:
    """model, method, accuracy: plain, each contrastive variant (fusion candidates), and each baseline."""
    rows = []
    for name, r in runs.items():
        base = r["base"].summary
        for _, b in base.iterrows():
            rows.append(dict(model=name, method=str(b["method"]), accuracy=float(b["accuracy"])))
        main = r["main"].summary
        for _, c in main[main["candidates"] == "fusion"].iterrows():
            rows.append(dict(model=name, method=_setting(c), accuracy=float(c["accuracy"])))
    return pd.DataFrame(rows)


def candidate_table(runs: dict) -> pd.DataFrame:
    """Per model, variant and candidate set of each chapter run's ``"main"`` result: accuracy, plain accuracy, the
    gain, and the mean change of the gold answer's first-token log-prob (nats; NaN for records without it)."""
    rows = []
    for name, r in runs.items():
        s, rec = r["main"].summary, r["main"].records
        lp = {}
        if {"gold_logprob", "plain_gold_logprob"} <= set(rec.columns):
            d = rec.assign(d=rec["gold_logprob"] - rec["plain_gold_logprob"])
            lp = d.groupby(["variant", "candidates"])["d"].mean().to_dict()
        for _, c in s.iterrows():
            rows.append(dict(model=name, variant=c["variant"], candidates=c["candidates"],
                             accuracy=float(c["accuracy"]), plain=float(c["plain_accuracy"]), gain=float(c["gain"]),
                             logprob_gain=float(lp.get((c["variant"], c["candidates"]), float("nan")))))
    return pd.DataFrame(rows)


def model_row(lm, found: dict, masking_summary: pd.DataFrame, contrastive: pd.DataFrame) -> dict:
    """One row of the across-models table.

    ``contrastive``: the contrastive run's per-sample records, so the gain shown is the dev-chosen setting's on the
    test split (as in the verdict); a summary table is still accepted and then gives the best setting's gain on all
    questions, which overstates it.
    """
    plain = float(masking_summary["plain_accuracy"].mean())
    setting, gain = None, None
    if len(contrastive) and "id" in contrastive.columns:
        row = gain_row(label(lm), settings(contrastive), 0)
        if row.get("setting") is not None:
            setting, gain = row["setting"], 100 * row["value"]
    elif len(contrastive):
        best = contrastive.sort_values("gain", ascending=False).iloc[0]
        setting, gain = f"{best['variant']} ({best['candidates']})", 100 * float(best["gain"])
    return dict(model=label(lm), arch=lm.spec.label, layers=lm.num_layers, fusion_layers=found.get("fusion_layers"),
                plateau_from=found.get("plateau_start"), review_layer=found.get("review_layer"),
                plain_accuracy=round(plain, 3), best_variant=setting,
                gain_points=None if gain is None else round(gain, 2), fingerprint=lm.fingerprint)


def reported_model_table() -> pd.DataFrame:
    """The paper's layer findings and gains per model family."""
    gains = {"llava": "LLaVA-1.5", "llava_next": "LLaVA-NeXT", "qwen2_5_vl": "Qwen2.5-VL"}
    from ..paper import MAIN_TABLE

    t = MAIN_TABLE.set_index("backbone")
    rows = []
    for arch, r in LAYERS.items():
        g = gains.get(arch)
        rows.append(dict(model=r["label"], layers=r["n_layers"], fusion_layers=r["fusion_layers"],
                         plateau_from=r["plateau_from"], review_layer=r["review_layer"],
                         base_accuracy=None if g is None else t.loc[g, "base"],
                         gain_points=None if g is None else round(t.loc[g, "ours"] - t.loc[g, "base"], 2)))
    return pd.DataFrame(rows)


def gain_table(table: pd.DataFrame) -> pd.DataFrame:
    """Our best gains and the paper's, as one table for a bar chart (gain in points)."""
    from ..paper import main_gains

    ours = [dict(model=r["model"], gain=r["gain_points"]) for _, r in table.iterrows() if r["gain_points"] is not None]
    rep = [dict(model=f"{r['backbone']} (reported)", gain=r["ours"]) for _, r in main_gains().iterrows()]
    return pd.DataFrame(ours + rep)


VERDICT_COLUMNS = ["claim", "model", "rule", "chance", "effect", "uncertainty", "n", "needed n", "verdict",
                   "p (Holm)", "reported", "split"]


def verdict_table(rows: list[dict], *, holm: bool = True) -> pd.DataFrame:
    """The verdict rows as the chapters show them: claim, rule, chance level, effect, p-value or CI, n, the n the
    test would need (80% power, whole build), verdict, the p-value adjusted by Holm's method across these rows (the
    family-wise correction; pass every claim's rows to correct across the book), the paper's value and the split.

    >>> verdict_table([]).columns[:4].tolist()
    ['claim', 'model', 'rule', 'chance']
    """
    rows = with_holm(rows) if holm else rows
    t = pd.DataFrame([{c: r.get(c, "") for c in VERDICT_COLUMNS} for r in rows], columns=VERDICT_COLUMNS)
    t["n"] = pd.to_numeric(t["n"], errors="coerce").astype("Int64")
    return t


# our method names for each row of the paper's latency table; the first match in a measurement dict is used
# the paper's CD is contrastive decoding (an amateur model), not VCD: only our "cd" stands beside it
LATENCY_ALIASES = {"SAM": ("sam",), "CLIP": ("clip",), "CD": ("cd",), "ViCrop": ("vicrop",),
                   "OPERA": ("opera",), "ours": ("ours", "contrastive", "crop", "soft")}


def latency_table(ours: dict | None = None, *, reference: str = "ours") -> pd.DataFrame:
    """The paper's per-sample latency (GQA, one RTX A6000) beside ours, each also relative to its own ``reference``
    row so that numbers from different hardware can be compared.

    ``ours``: seconds per sample by method name (``plain``, ``cd``, ``vicrop``, ``dola``, ``crop``/``soft``/``ours``,
    ...). Methods the paper does not time get a row with the paper's columns empty.

    >>> t = latency_table({"plain": 0.5, "cd": 1.0, "vcd": 0.9, "crop": 0.8})
    >>> t = t.set_index("method")
    >>> float(t.loc["CD", "ours_s"]), float(t.loc["ours", "paper_s"]), float(t.loc["CD", "ours_rel"])
    (1.0, 1.392, 1.25)
    """
    ours = {str(k).lower(): float(v) for k, v in (ours or {}).items()}
    used, rows = set(), []
    for name, paper_s in LATENCY_S.items():
        key = next((a for a in LATENCY_ALIASES.get(name, (name.lower(),)) if a in ours), None)
        if key is not None:
            used.add(key)
        rows.append(dict(method=name, ours_as=key, paper_s=paper_s, ours_s=ours.get(key, float("nan"))))
    for key, v in ours.items():
        if key not in used:
            rows.append(dict(method=key, ours_as=key, paper_s=float("nan"), ours_s=v))
    t = pd.DataFrame(rows, columns=["method", "ours_as", "paper_s", "ours_s"])
    ref = t.set_index("method").loc[reference] if reference in set(t["method"]) else None
    t["paper_rel"] = t["paper_s"] / (ref["paper_s"] if ref is not None else float("nan"))
    t["ours_rel"] = t["ours_s"] / (ref["ours_s"] if ref is not None else float("nan"))
    return t


def latency_from_records(records: pd.DataFrame, *, method: str = "method", seconds: str = "seconds") -> dict:
    """Mean seconds per sample by method, from per-sample records that time each answer (``n/a`` -> empty dict).

    >>> latency_from_records(pd.DataFrame({"method": ["plain", "plain"], "seconds": [1.0, 3.0]}))
    {'plain': 2.0}
    """
    if records is None or len(records) == 0 or seconds not in records.columns or method not in records.columns:
        return {}
    return {str(k): float(v) for k, v in records.groupby(method)[seconds].mean().items()}
