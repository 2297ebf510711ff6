"""Control for the crop-based methods (the contrastive crop variant, ViCrop): what does a second image cost by itself?

Both methods answer from two images, the original and a crop. This script answers the same questions from one image,
from the *same* image given twice and, where the data set marks each question's relevant cells (the world), from
[original, crop of the relevant cells] and [original, crop of an irrelevant region], so a drop in the crop rows can be
told apart from the crop's own effect, and a crop method's ceiling is known.

    python scripts/two_image_control.py                                  # both organisms, 120 world questions
    python scripts/two_image_control.py llava-hf/llava-1.5-7b-hf --dataset gqa --source PATH --n 500 --device cuda

Prints provenance (versions, git commit), each model's fingerprint and the accuracy table.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd

from fusion_utils.data import load_dataset
from fusion_utils.experiments.common import answer, post_prompt_for, score
from fusion_utils.models import load_model, model_fingerprint
from fusion_utils.organisms.evaluate import two_image_sets
from fusion_utils.runs import provenance


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", default=["organism:llava", "organism:qwen2_vl"])
    ap.add_argument("--dataset", default="world")
    ap.add_argument("--source", default=None)
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    args = ap.parse_args(argv)
    ds = load_dataset(args.dataset, n=args.n, source=args.source)
    samples, pp = list(ds), post_prompt_for(ds)
    print(json.dumps({"params": vars(args), "provenance": provenance()}, default=str))
    rows = []
    for name in args.models:
        lm = load_model(name, device=args.device, dtype=args.dtype)
        row = {"model": name, "fingerprint": model_fingerprint(lm.model), "n": len(samples)}
        controls = [("one image", None), ("same image twice", [[s.image, s.image] for s in samples])]
        if args.dataset == "world":
            # the crop controls need each question's relevant cells on the world's 6 x 6 grid
            sets = two_image_sets(samples)
            controls += [("relevant crop", sets["relevant_crop"]), ("irrelevant crop", sets["irrelevant_crop"])]
        for label, images in controls:
            preds = answer(lm, samples, post_prompt=pp, images=images, batch_size=args.batch_size, progress=True)
            row[label] = float(np.mean([score(ds, p, s) for p, s in zip(preds, samples)]))
        row["cost (points)"] = round(100 * (row["one image"] - row["same image twice"]), 1)
        rows.append(row)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    return table


if __name__ == "__main__":
    main()
