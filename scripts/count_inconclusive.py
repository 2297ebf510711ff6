"""How many of the layer, review, attention and contrastive verdicts are inconclusive on a default organism.

Runs the harness's experiments once (records are cached under ``--out``), then applies the report's rules and prints
one row per verdict and the count of each outcome. Cheap by design: first-token decoding for the masking and
early-exit runs, one contrastive setting per candidate set.

    PYTHONPATH=$PWD python scripts/count_inconclusive.py --organism llava --n 120 --seed 0
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from fusion_utils import report
from fusion_utils.data import load_dataset
from fusion_utils.experiments import get_experiment
from fusion_utils.models import load_model


KINDS = ("masking", "early", "hellinger", "attention", "contrastive")


def records_for(lm, ds, out: str) -> dict:
    run = {name: get_experiment(name) for name in ("masking", "early_exit", "hellinger", "attention", "contrastive")}
    masking = run["masking"](lm, ds, out=out, decode="first_token")
    dev, _ = report.dev_split(masking.records)
    found = dev_findings(dev)
    fusion, apply_layer, _ = report.pick_layers(found, lm.num_layers)
    kinds, _ = report.usable_candidates(["fusion", "shallow", "deep", "all"], lm.num_layers, fusion)
    contrastive = run["contrastive"](lm, ds, out=out, fusion_layers=fusion, apply_layer=apply_layer,
                                     variants=("soft",), candidates=tuple(kinds))
    return dict(masking=masking.records, early=run["early_exit"](lm, ds, out=out, decode="first_token").records,
                hellinger=run["hellinger"](lm, ds, out=out).records, attention=run["attention"](lm, ds, out=out).records,
                contrastive=contrastive.records)


def dev_findings(dev_records: pd.DataFrame) -> dict:
    from fusion_utils.experiments.masking import find_layers, masking_summary

    s = masking_summary(dev_records)
    return find_layers(s[s["mode"] == "zero"])


def verdicts(model: str, arch: str, recs: dict, n_layers: int) -> pd.DataFrame:
    rows = report.fusion_verdicts(model, arch, recs["masking"], n_layers)
    rows += report.review_verdicts(model, arch, recs["masking"], recs["hellinger"], recs["early"], n_layers)
    rows += report.attention_verdicts(model, recs["attention"], n_layers)
    rows += report.contrastive_verdicts(model, recs["contrastive"], fusion_from="dev")
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--organism", default="llava")
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/")
    ap.add_argument("--records", default=None,
                    help="folder of the records as parquet: written after the runs, or read instead of running when "
                         "--from-records is given (to apply another version's rules to the same records)")
    ap.add_argument("--from-records", action="store_true")
    ap.add_argument("--accuracy-only", action="store_true",
                    help="drop the gold log-prob columns, so the layer rules fall back to accuracy")
    a = ap.parse_args()
    if a.from_records:
        recs = {k: pd.read_parquet(Path(a.records) / f"{k}.parquet") for k in KINDS}
        n_layers = int(recs["masking"]["layer"].max()) + 1
    else:
        lm = load_model(f"organism:{a.organism}")
        recs = records_for(lm, load_dataset("world", n=a.n, seed=a.seed), a.out)
        n_layers = lm.num_layers
        if a.records:
            Path(a.records).mkdir(parents=True, exist_ok=True)
            for k, r in recs.items():
                r.to_parquet(Path(a.records) / f"{k}.parquet")
    if a.accuracy_only:
        recs = {k: r.drop(columns=["gold_logprob", "plain_gold_logprob"], errors="ignore") for k, r in recs.items()}
    t = verdicts(a.organism, a.organism, recs, n_layers)
    outcome = t["verdict"].str.split(" ").str[0].replace({"does": "does not reproduce"})
    with pd.option_context("display.width", 200, "display.max_colwidth", 90):
        print(t[["key", "verdict", "n", "needed n"]].to_string(index=False))
    print(outcome.str.rstrip(":").value_counts().to_string())


if __name__ == "__main__":
    main()
