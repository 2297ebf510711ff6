"""Stage (f) ``fine`` of the organisms' recipe: teach small details (issue 28's ``world-fine`` headroom split).

The world-fine image is rendered at twice the resolution with small objects, so the model's 96 px input sees the
whole image downsampled and a crop of the relevant cells at its native pixels -- ViCrop's setting. Stage (f)
fine-tunes the parameters ``fine_part`` names (every one by default; "vision": the tower and projector only, the
decoder frozen, so the world answers it learned stay as they were; "projector": the merger / projector only) on a mix
of world and world-fine prompts (``fine_share`` of them world-fine), each with one image or [original, second image]
(``fine_kinds``), answer + EOS loss, plus the alignment loss of stage (b+c) on every image token (a crop's tokens
target the cells they show, `Trainer.zoom_targets`, or with ``fine_crop_aux`` "centres" the objects whose drawn
centres they hold), so the tower learns to read small objects magnified while the decoder learns to answer from the
crop.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..data import world
from ..data.second_images import cells_to_px, irrelevant_cells, random_cells, relevant_cells


class FineStage:
    """Stage (f), mixed into `fusion_utils.organisms.train.Trainer`."""

    def _fine_samples(self, n: int):
        """`n` samples of the train stream, each world-fine with probability ``fine_share`` (seeded by the data
        position, so the same seed gives the same batches)."""
        R = self.recipe
        rng = np.random.default_rng([self.seed, 31, self.counter])
        fine = rng.random(n) < float(R.get("fine_share", 0.5))
        fams = R.get("fine_families") or R.get("train_families")
        out = [world.make_sample("train", self.counter + i, seed=self.seed, families=fams, fine=bool(f))
               for i, f in enumerate(fine)]
        self.counter += n
        return out

    def _fine_images(self, samples):
        """Per sample: its images ([original] or [original, second]) and the second image's cell box (None for
        'one' and 'same'), the kind drawn from ``fine_kinds``."""
        kinds = list(self.recipe["fine_kinds"])
        rng = np.random.default_rng([self.seed, 37, self.counter])
        images, boxes = [], []
        for s in samples:
            kind = kinds[int(rng.integers(len(kinds)))]
            img = s.image.convert("RGB")
            box = {"relevant": lambda: relevant_cells(s), "irrelevant": lambda: irrelevant_cells(s, rng),
                   "random": lambda: random_cells(rng)}.get(kind, lambda: None)()
            if kind == "one":
                images.append([img])
            elif kind == "same":
                images.append([img, img])
            elif box is not None:
                images.append([img, img.crop(cells_to_px(*box, size=img.size))])
            else:
                raise ValueError(f"recipe fine_kinds has {kind!r}; use one, same, relevant, irrelevant or random.")
            boxes.append(box)
        return images, boxes

    def _fine_targets(self, samples, images, boxes, enc) -> torch.Tensor:
        """The scene-token index every image token should read, in the processor's image order: a whole image's
        tokens their cells, a crop's the cells they show (`zoom_targets`)."""
        out, k = [], 0
        for s, ims, box in zip(samples, images, boxes):
            cells = self.cell_targets([s])[0]
            out.append(cells)
            if len(ims) > 1:
                out.append(cells if box is None else self._crop_targets(s, box, enc, k + 1))
            k += len(ims)
        return torch.cat(out)

    def _crop_targets(self, s, box, enc, index: int) -> torch.Tensor:
        """A crop's token targets by ``fine_crop_aux``: "cells" (`zoom_targets`: the cells under the tokens, or the
        first token of each with `vision_zoom_target` "first"), "centres" (the token under each object's drawn centre
        reads it, the others `<empty>`; a world-fine object off its cell's centre sits in one token of a crop at native
        pixels), or "none" (-1: no target, the crop's tokens left to the answer loss)."""
        mode = self._part("fine_crop_aux", "cells", ("cells", "centres", "none"))
        t = self.zoom_targets([s], [box], enc, index)[0]
        if mode == "none":
            return torch.full_like(t, -1)
        if mode == "cells" or "centres" not in s.meta:
            return t
        from ..adapters import processed_extent

        l, tp, r, b = cells_to_px(*box, size=s.image.size)
        if self.arch == "llava":  # the part of the crop CLIP's centre square keeps, and its 6 x 6 patches
            fl, ft, fr, fb = processed_extent(self.processor.image_processor, r - l, b - tp)
            l, tp, r, b = l + fl * (r - l), tp + ft * (b - tp), l + fr * (r - l), tp + fb * (b - tp)
            gh, gw = world.GRID, world.GRID
        else:
            gh, gw = (int(v) for v in enc["image_grid_thw"][index, 1:] // 2)
        out = torch.zeros(gh * gw, dtype=t.dtype)
        for o, (x, y) in zip(s.meta["objects"], s.meta["centres"]):
            i, j = int((y - tp) * gh // (b - tp)), int((x - l) * gw // (r - l))
            if 0 <= i < gh and 0 <= j < gw:
                out[i * gw + j] = self.scene_index[world.scene_token(o)]
        return out

    def stage_fine(self, steps=None, lr=None):
        """(f) small details: world and world-fine prompts with one or two images, every parameter trained."""
        R = self.recipe
        steps = R.get("fine_steps", 0) if steps is None else steps
        part = self._part("fine_part", "all", ("lm", "vision", "projector", "all"))
        params, opt, sched, bar, t0 = self._begin(part, lr or R["fine_lr"], steps, "(f) small details", "fine")
        for step in bar:
            samples = self._fine_samples(R.get("fine_batch") or R["batch"])
            images, boxes = self._fine_images(samples)
            enc = self.encode_two(samples, images)
            feats = self.image_tokens(enc)
            loss = self._answer_loss(self._lm_forward(enc, feats), enc["input_ids"])
            targets = self._fine_targets(samples, images, boxes, enc)
            keep = targets >= 0
            aux, acc = self._align_loss(torch.cat(feats)[keep], targets[keep])
            self._update(loss + R.get("fine_aux", 0.3) * aux, params, opt, sched)
            self._record("fine", step, loss=loss.item(), cell_acc=acc, bar=bar)
            self._step_done(step)
        self.timings["fine"] = time.time() - t0
        return self
