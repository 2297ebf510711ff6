"""The book's layer analyses on organisms of different depth, side by side (issue 16, item 4).

For each model: the one-layer masking curves (zero and knockout), the Hellinger distance of each layer's image
attention to the final layer's, early-exit accuracy and the relevant-attention ratio, on the same world questions,
through the same harness and verdict rules as the chapters. The layer axis is relative depth (layer / (L - 1)), so an
8-layer and a 16- or 32-layer decoder share one plot. Writes a figure, the verdict table (markdown) and the curves
(CSV), and prints the verdict table.

    python scripts/depth_comparison.py                                   # organism:llava-8l vs the deep organisms
    python scripts/depth_comparison.py organism:llava-8l /path/to/llava-16l --n 120 --out book/figures

Records go to ``--runs`` (resumable); the same seed gives the same numbers.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from fusion_utils import report
from fusion_utils.data import load_dataset
from fusion_utils.experiments.attention import attention
from fusion_utils.experiments.layers import early_exit, hellinger
from fusion_utils.experiments.masking import masking
from fusion_utils.models import load_model, model_fingerprint
from fusion_utils.runs import provenance

DEFAULT_MODELS = ["organism:llava-8l", "organism:qwen2_vl-8l", "organism:llava-16l", "organism:qwen2_vl-16l"]
# the claims of the fusion, review and attention chapters, in the order the table lists them
CLAIMS = ["fusion_shallow", "plateau", "review", "early_exit", "hellinger", "noise", "relevant_rises"]


def model_label(lm, name: str) -> str:
    base = Path(name).name if Path(name).is_dir() else name.removeprefix("organism:")
    return f"{base} ({lm.num_layers} layers)"


def analyse(lm, data, *, runs: str, batch_size: int, seed: int, threshold: float) -> tuple[dict, list[dict]]:
    """The per-layer curves (relative depth) and the chapters' verdict rows for one model."""
    kw = dict(out=runs, batch_size=batch_size, seed=seed, progress=True)
    m = masking(lm, data, modes=["zero", "knockout"], threshold=threshold, **kw)
    h = hellinger(lm, data, **kw)
    e = early_exit(lm, data, **kw)
    a = attention(lm, data, **kw)
    L, arch, name = lm.num_layers, lm.spec.model_type, lm.name
    rows = report.fusion_verdicts(name, arch, m.records, L, threshold=threshold, mode="zero", seed=seed)
    rows += report.review_verdicts(name, arch, m.records, h.records, e.records, L, threshold=threshold, mode="zero",
                                   seed=seed)
    rows += report.attention_verdicts(name, a.records, L, seed=seed)
    ms = m.summary
    curves = {
        "zero drop": ms[ms["mode"] == "zero"].set_index("layer")["drop"],
        "knockout drop": ms[ms["mode"] == "knockout"].set_index("layer")["drop"],
        "Hellinger to final": h.summary.set_index("layer")["hellinger"],
        "early-exit accuracy": e.summary.set_index("layer")["accuracy"],
        "relevant attention ratio": a.summary.set_index("layer")["rel_ratio"],
    }
    curves = {k: pd.Series(v.values, index=v.index / max(1, L - 1)) for k, v in curves.items()}
    return curves, rows


def verdict_cell(row: dict) -> str:
    """The verdict's head word(s) and its effect; the rule and the reason for an inconclusive verdict are in the
    chapters' tables."""
    v = str(row.get("verdict", ""))
    eff = str(row.get("effect", ""))
    if v.startswith(report.NA):
        return v
    return f"{v.split(' (')[0]}: {eff}" if eff else v.split(" (")[0]


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(next(iter(curves.values())))
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), sharex=True, squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(panels):]:
        ax.axis("off")
    for ax, panel in zip(axes, panels):
        for label, c in curves.items():
            s = c[panel]
            ax.plot(s.index, s.values, marker="o", ms=2.5, lw=1.2, label=label)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("relative depth (layer / (L - 1))", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", default=DEFAULT_MODELS,
                    help="model names, hub ids or weight directories (default: the 8-layer and 16-layer organisms)")
    ap.add_argument("--n", type=int, default=120, help="world questions (the book's default build uses 120)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threshold", type=float, default=0.05)
    ap.add_argument("--runs", default="runs/depth", help="run records (resumable)")
    ap.add_argument("--out", default="book/figures", help="where the figure, table and curves are written")
    args = ap.parse_args(argv)
    data = load_dataset("world", n=args.n, seed=args.seed)
    print(json.dumps({"params": vars(args), "provenance": provenance()}, default=str))
    curves, table, fingerprints = {}, {}, {}
    for name in args.models:
        lm = load_model(name)
        label = model_label(lm, name)
        fingerprints[label] = model_fingerprint(lm.model)
        curves[label], rows = analyse(lm, data, runs=args.runs, batch_size=args.batch_size, seed=args.seed,
                                      threshold=args.threshold)
        by_key = {r["key"]: r for r in rows}
        table[label] = {report.CLAIM_TEXT[k]: verdict_cell(by_key[k]) if k in by_key else "" for k in CLAIMS}
        del lm
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = pd.DataFrame(table)
    t.index.name = "claim"
    (out / "depth_comparison.md").write_text(t.to_markdown() + "\n")
    long = pd.concat({(m, p): s for m, c in curves.items() for p, s in c.items()}, names=["model", "panel",
                                                                                           "depth"])
    long.rename("value").reset_index().to_csv(out / "depth_comparison.csv", index=False)
    (out / "depth_comparison.json").write_text(json.dumps({"params": vars(args), "fingerprints": fingerprints,
                                                           "provenance": provenance()}, indent=1, default=str))
    plot(curves, out / "depth_comparison.png")
    print(t.to_markdown())
    print(json.dumps(fingerprints))
    return t


if __name__ == "__main__":
    main()
