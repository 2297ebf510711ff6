"""Chapter support: parameter checks, one model at a time, and a verdict per claim of the paper.

A verdict compares what a run measured with what the paper reports, with a rule stated next to it, and says
"reproduces", "partly", "does not reproduce here" or "not measurable here". The rules are deliberately simple and
written in relative depth (layer / number of layers) so that they apply to models of any depth.
"""
from __future__ import annotations

import gc
import math
from typing import Iterable, Iterator

import numpy as np
import pandas as pd

from .paper import CLAIMS, LAYERS

REPRODUCES, PARTLY, NO, NA = "reproduces", "partly", "does not reproduce here", "not measurable here"
LLAVA_FAMILY = ("llava", "llava_next", "vipllava", "instructblip")
_DTYPES = ("float32", "bfloat16", "float16", None)


def check_params(*, models, dataset, samples, device, dtype, seed, source=None, **knobs) -> None:
    """Validate a chapter's papermill parameters; raise ValueError with one sentence naming the fix."""
    if isinstance(models, str) or not isinstance(models, (list, tuple)) or not models:
        raise ValueError(f"models must be a non-empty list of model names, e.g. ['organism:llava'], got {models!r}.")
    from .data import BENCHMARKS

    if not isinstance(dataset, str) or not (dataset.lower().startswith("world") or dataset.lower() in BENCHMARKS):
        raise ValueError(f"dataset must be 'world' or one of {', '.join(BENCHMARKS)}, got {dataset!r}.")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}.")
    if not isinstance(device, str) or not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}.")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of float32, bfloat16, float16 (or None for the checkpoint's), got {dtype!r}.")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}.")
    for k, v in knobs.items():
        if k in ("rho", "lam", "threshold") and not (isinstance(v, (int, float)) and 0 <= v <= 1):
            raise ValueError(f"{k} must be a number between 0 and 1, got {v!r}.")
        if k in ("rhos", "lams") and not (isinstance(v, (list, tuple)) and all(0 <= x <= 1 for x in v)):
            raise ValueError(f"{k} must be a list of numbers between 0 and 1, got {v!r}.")
    if dataset.lower() not in ("world",) and not dataset.lower().startswith("world") and source is None:
        pass  # the lmms-eval hub dataset is used (needs network + `datasets`)


def load_data(dataset: str, samples: int, seed: int, source=None):
    from .data import load_dataset

    return load_dataset(dataset, n=samples, source=source, seed=seed if dataset.startswith("world") else None)


def iter_models(models: Iterable[str], device: str = "cpu", dtype=None) -> Iterator:
    """Load each model in turn, yield it, and free it before the next (two 7B models need not fit at once)."""
    from .models import load_model

    for name in models:
        lm = load_model(name, device=device, dtype=dtype)
        try:
            yield lm
        finally:
            del lm
            gc.collect()
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:  # pragma: no cover
                pass


def label(lm) -> str:
    name = lm.name.split("/")[-1]
    return f"{name} [{lm.spec.label}]" if not name.startswith("organism:") else f"{lm.spec.label} organism"


def _row(claim, model, ours, reported, verdict, rule):
    return dict(claim=CLAIMS[claim], model=model, ours=ours, reported=reported, verdict=verdict, rule=rule)


def _family(arch: str) -> str:
    return "llava" if arch in LLAVA_FAMILY else "qwen"


def pick_layers(found: dict, n_layers: int) -> tuple[list[int], int, str]:
    """Fusion layers and the layer the soft mask acts on, from a masking run's findings, with a note saying how
    they were chosen (no fusion layer found -> the shallow half; no review layer -> 28/32 of depth)."""
    from .experiments.contrastive import candidate_layers, default_apply_layer

    fusion = list(found.get("fusion_layers") or [])
    notes = []
    if not fusion:
        fusion = candidate_layers("shallow", n_layers)
        notes.append("no layer passed the fusion threshold, so the shallow half stands in for the fusion set")
    review = found.get("review_layer")
    apply_layer = review if review is not None else default_apply_layer(n_layers)
    notes.append(f"soft mask applied at the review layer {review}" if review is not None else
                 f"no review layer found, so the soft mask acts at layer {apply_layer} (28/32 of depth)")
    return fusion, apply_layer, "; ".join(notes)


def usable_candidates(kinds, n_layers: int, fusion_layers) -> tuple[list[str], str]:
    """The candidate sets that are non-empty for this depth, and a note naming any dropped."""
    from .experiments.contrastive import candidate_layers

    keep, dropped = [], []
    for k in kinds:
        try:
            candidate_layers(k, n_layers, fusion_layers)
            keep.append(k)
        except ValueError:
            dropped.append(k)
    note = f"candidate sets {dropped} are empty at {n_layers} layers and were skipped" if dropped else ""
    return keep, note


# --- layer claims ---------------------------------------------------------------------------------------------

def fusion_verdicts(model: str, arch: str, summary: pd.DataFrame, found: dict, n_layers: int) -> list[dict]:
    """Fusion at shallow layers; plateau after ~60% of depth."""
    rep = LAYERS.get(arch, {})
    fl = found.get("fusion_layers") or []
    rows = []
    if not fl:
        v = NO
    else:
        v = REPRODUCES if max(fl) < n_layers / 2 else PARTLY
    rows.append(_row("fusion_shallow", model, f"{fl} of {n_layers}", f"{rep.get('fusion_layers')} of 32", v,
                     "fusion layers (drop > threshold) all in the first half of depth"))
    late = summary[summary["layer"] >= math.ceil(0.625 * n_layers)]
    review = found.get("review_layer")
    late_wo = late[late["layer"] != review] if review is not None else late
    worst = float(late_wo["drop"].max()) if len(late_wo) else float("nan")
    thr = found.get("threshold", 0.05)
    v = NA if math.isnan(worst) else (REPRODUCES if worst <= thr else NO)
    rows.append(_row("plateau", model, f"largest drop after layer {math.ceil(0.625 * n_layers)}: {worst:+.3f}",
                     "masking barely matters after layer 18-20 of 32", v,
                     f"every layer from 62.5% of depth on (review layer aside) drops accuracy by <= {thr:.2f}"))
    return rows


def review_verdicts(model: str, arch: str, found: dict, hellinger: pd.DataFrame | None,
                    early: pd.DataFrame | None, n_layers: int) -> list[dict]:
    fam = _family(arch)
    review = found.get("review_layer")
    expect = fam == "llava"
    if review is None:
        v = NO if expect else REPRODUCES
    else:
        deep = review >= 0.75 * n_layers
        v = (REPRODUCES if deep else PARTLY) if expect else NO
    rows = [_row("review", model, f"review layer: {review} of {n_layers}",
                 "~29 of 32" if expect else "none", v,
                 "a layer after the plateau whose masking drops accuracy again (>= 75% of depth for a full match)")]
    if early is not None and len(early):
        acc = early.sort_values("layer")["accuracy"].to_numpy()
        lo, hi = acc[0], acc[-1]
        if hi - lo < 0.05:
            rows.append(_row("early_exit", model, "no jump (flat)", "jump after ~18 of 32", NA,
                             "early-exit accuracy must change by >= 5 points to locate a jump"))
        else:
            jump = int(np.argmax(acc >= lo + 0.5 * (hi - lo)))
            rel = jump / n_layers
            v = REPRODUCES if rel >= 0.45 else NO
            rows.append(_row("early_exit", model, f"half-way jump at layer {jump} of {n_layers} ({rel:.0%})",
                             "after ~18 of 32 (56%)", v, "the jump (half-way point) happens at >= 45% of depth"))
    if hellinger is not None and len(hellinger):
        h = hellinger.sort_values("layer")["hellinger"].to_numpy()
        a, b = int(0.5 * n_layers), int(0.75 * n_layers)
        mid_min = float(h[a:b].min()) if b > a else float("nan")
        late_max = float(h[b:n_layers - 1].max()) if n_layers - 1 > b else float("nan")
        rise = late_max - mid_min
        if math.isnan(rise):
            v, ours = NA, "too few layers"
        elif expect:
            v, ours = (REPRODUCES if rise > 0.02 else NO), f"late rise {rise:+.3f}"
        else:
            v, ours = (REPRODUCES if rise <= 0.02 else NO), f"late rise {rise:+.3f}"
        rows.append(_row("hellinger", model, ours, "rises again at ~29 (LLaVA); flat after ~24 (Qwen)", v,
                         "max Hellinger in the last quarter (final layer excluded) minus the minimum over 50-75% "
                         "of depth: > 0.02 is a rise"))
    return rows


# --- attention claims -----------------------------------------------------------------------------------------

def attention_verdicts(model: str, summary: pd.DataFrame, noise: dict, n_layers: int) -> list[dict]:
    rows = []
    share = noise.get("irrelevant_share_of_persistent")
    mean_p = noise.get("mean_persistent_tokens", 0)
    if share is None or (isinstance(share, float) and math.isnan(share)):
        rows.append(_row("noise", model, "no relevance labels", "present at every layer", NA,
                         "needs a dataset with relevant regions (the procedural world)"))
    else:
        v = REPRODUCES if share >= 0.5 and mean_p >= 1 else (PARTLY if share > 0 else NO)
        rows.append(_row("noise", model, f"{share:.0%} of persistent top-k tokens irrelevant "
                                         f"({mean_p:.1f} persistent tokens per sample)",
                         "irrelevant patches stay highlighted at every layer", v,
                         "persistent = in the top-k at >= 75% of layers; >= half of them irrelevant"))
    if "rel_ratio" in summary.columns:
        r = summary.sort_values("layer")["rel_ratio"].to_numpy()
        q = max(1, n_layers // 4)
        early, late = float(np.nanmean(r[:q])), float(np.nanmean(r[-q:]))
        peak = int(np.nanargmax(r))
        v = REPRODUCES if late > early and late > 1 else (PARTLY if peak > q else NO)
        rows.append(_row("relevant_rises", model, f"relevant/area ratio {early:.2f} (first quarter) -> {late:.2f} "
                                                  f"(last quarter), peak at layer {peak}",
                         "rises with depth (peak near layer 20 of 32 in the example)", v,
                         "mean ratio in the last quarter of layers above the first quarter's and above 1"))
    else:
        rows.append(_row("relevant_rises", model, "no relevance labels", "rises with depth", NA,
                         "needs a dataset with relevant regions"))
    return rows


# --- the method -----------------------------------------------------------------------------------------------

def contrastive_verdicts(model: str, summary: pd.DataFrame) -> list[dict]:
    rows = []
    if summary is None or summary.empty:
        return [_row("contrastive_gain", model, "not run", "+2.4 to +2.8 points", NA, "")]
    best = summary.sort_values("gain", ascending=False).iloc[0]
    gain = 100 * float(best["gain"])
    v = REPRODUCES if gain >= 1.0 else (PARTLY if gain > 0 else NO)
    setting = f"{best['variant']}, {best['candidates']}" + (
        "" if pd.isna(best.get("rho")) else f", rho={best['rho']}, lam={best['lam']}")
    rows.append(_row("contrastive_gain", model, f"best {gain:+.1f} points ({setting})", "+2.4 to +2.8 points", v,
                     "best setting's gain over plain decoding: >= +1 point reproduces, > 0 partly"))
    soft = summary[summary["variant"] == "soft"] if "variant" in summary.columns else summary.iloc[0:0]
    if soft["candidates"].nunique() > 1:
        by = soft.groupby("candidates")["accuracy"].max()
        fusion, others = by.get("fusion", float("nan")), by.drop(index="fusion", errors="ignore")
        if math.isnan(fusion) or others.empty:
            v = NA
        elif fusion > others.max():
            v = REPRODUCES
        elif fusion == others.max() and by.nunique() > 1:
            v = PARTLY  # tied for best
        else:
            v = NO  # another set is better, or the candidate set makes no difference at all
        rows.append(_row("fusion_candidates", model, ", ".join(f"{k}: {100 * a:.1f}" for k, a in by.items()),
                         "fusion set best (69.4 GQA vs 68.3 shallow, 65.4 all, 60.3 deep)", v,
                         "the fusion set is strictly best (tied for best: partly; all sets equal: no effect)"))
    return rows


# --- tables for the chapters ------------------------------------------------------------------------------------

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
    rows = []
    for name, r in runs.items():
        s = r["main"].summary
        for _, c in s[s["variant"] == "soft"].iterrows():
            rows.append(dict(model=name, candidates=c["candidates"], accuracy=float(c["accuracy"]),
                             plain=float(c["plain_accuracy"]), gain=float(c["gain"])))
    return pd.DataFrame(rows)


def model_row(lm, found: dict, masking_summary: pd.DataFrame, contrastive_summary: pd.DataFrame) -> dict:
    """One row of the across-models table."""
    plain = float(masking_summary["plain_accuracy"].mean())
    best = contrastive_summary.sort_values("gain", ascending=False).iloc[0] if len(contrastive_summary) else None
    return dict(model=label(lm), arch=lm.spec.label, layers=lm.num_layers, fusion_layers=found.get("fusion_layers"),
                plateau_from=found.get("plateau_start"), review_layer=found.get("review_layer"),
                plain_accuracy=round(plain, 3),
                best_variant=None if best is None else f"{best['variant']} ({best['candidates']})",
                gain_points=None if best is None else round(100 * float(best["gain"]), 2),
                fingerprint=lm.fingerprint)


def reported_model_table() -> pd.DataFrame:
    """The paper's layer findings and gains per model family."""
    gains = {"llava": "LLaVA-1.5", "llava_next": "LLaVA-NeXT", "qwen2_5_vl": "Qwen2.5-VL"}
    from .paper import MAIN_TABLE

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
    from .paper import main_gains

    ours = [dict(model=r["model"], gain=r["gain_points"]) for _, r in table.iterrows() if r["gain_points"] is not None]
    rep = [dict(model=f"{r['backbone']} (reported)", gain=r["ours"]) for _, r in main_gains().iterrows()]
    return pd.DataFrame(ours + rep)


def verdict_table(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["claim", "model", "ours", "reported", "verdict", "rule"])


__all__ = ["pick_examples", "method_table", "candidate_table", "model_row", "reported_model_table",
           "gain_table", "usable_candidates", "check_params", "load_data", "iter_models", "label", "pick_layers", "fusion_verdicts", "review_verdicts",
           "attention_verdicts", "contrastive_verdicts", "verdict_table", "REPRODUCES", "PARTLY", "NO", "NA"]
