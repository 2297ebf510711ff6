"""Can an organism's vision tower read a crop? Cell accuracy of its image tokens on whole images and on crops.

A crop method feeds [original, crop]; the processor resizes the crop as it resizes any image (LLaVA's CLIP processor
magnifies it to 96 px; the deep Qwen2-VL organisms keep it at its own size). Each image token is scored against the
target stage (b+c)'s zoom share gives it (`Trainer.zoom_targets`: the scene token of the cell under its centre, or,
with the recipe's `vision_zoom_target` "first", that cell's object on the first token showing it and `<empty>` on
the others): nearest scene-token embedding == the target. Occupied cells are the ones that matter; most are empty.

    python scripts/tower_reads_crops.py llava-16l qwen2_vl-16l            # shipped weights, 200 val questions
    python scripts/tower_reads_crops.py llava-16l=/tmp/ckpt/vision.pt     # a trainer checkpoint (train.py's state)

Prints, per model: accuracy on whole images and on relevant crops (padded by one cell), all cells and occupied ones.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from tqdm.auto import tqdm

from fusion_utils.data import world
from fusion_utils.data.second_images import cells_to_px, relevant_cells
from fusion_utils.organisms import load
from fusion_utils.organisms.train import Trainer


def trainer_for(spec: str) -> Trainer:
    """A trainer holding an organism's shipped weights (``name``) or a trainer checkpoint (``name=path``)."""
    name, _, path = spec.partition("=")
    tr = Trainer(name, threads=None)
    if path:
        tr.load_state(torch.load(path, weights_only=True))
    else:
        tr.model.load_state_dict(load(name)[0].state_dict())
        tr.composed = True
    tr.model.eval()
    return tr


@torch.no_grad()
def cell_accuracy(tr: Trainer, n: int = 200, split: str = "val") -> dict[str, float]:
    samples = list(world.world_dataset(split, n))
    E = tr.embed.weight[tr.scene_ids]
    hits = {k: [] for k in ("whole", "whole_occupied", "crop", "crop_occupied")}
    for s in tqdm(samples, desc=f"{tr.name} cells", mininterval=5):
        box = relevant_cells(s)
        crop = s.image.convert("RGB").crop(cells_to_px(*box))
        for key, img in (("whole", s.image), ("crop", crop)):
            ip = dict(tr.processor.image_processor(images=[img], return_tensors="pt"))
            feats = tr.image_tokens(ip)[0]
            target = (tr.cell_targets([s])[0] if key == "whole" else tr.zoom_targets([s], [box], ip, 0)[0])
            ok = ((feats.unsqueeze(-2) - E).pow(2).sum(-1).argmin(-1) == target).float()
            hits[key].append(ok.mean().item())
            if (target != 0).any():
                hits[key + "_occupied"].append(ok[target != 0].mean().item())
    return {k: round(float(np.mean(v)), 3) for k, v in hits.items()}


def model_args(argv, doc: str, n: int) -> argparse.Namespace:
    """The command line both probe scripts take: organism names (or name=checkpoint) and a question count."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="organism names, or name=path/to/trainer-checkpoint.pt")
    ap.add_argument("--n", type=int, default=n)
    return ap.parse_args(argv)


def main(argv=None):
    args = model_args(argv, __doc__, 200)
    out = {}
    for spec in args.models:
        out[spec] = cell_accuracy(trainer_for(spec), args.n)
        print(spec, out[spec], flush=True)
    return out


if __name__ == "__main__":
    main()
