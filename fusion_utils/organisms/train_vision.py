"""Stages (b+c) and (d) of the organisms' recipe: the vision tower and projector mapped onto the scene tokens
(with magnified crops, `vision_zoom`), then joint VQA on rendered images."""
from __future__ import annotations

import time

import numpy as np
import torch

from ..data import world
from .build import N_IMAGE_TOKENS


class VisionStage:
    """Stages (b+c) and (d), mixed into `fusion_utils.organisms.train.Trainer`."""

    def _blank_batch(self, n):
        imgs = []
        for _ in range(n):
            g = int(torch.randint(60, 200, (1,), generator=self.gen))
            imgs.append(world.blank_image((g, g, g)))
        return imgs

    def _zoom_crops(self, samples):
        """Stage (b+c)'s zoom share: each sample's image cropped to its relevant cells (padded by one cell) or to a
        random box of 2-5 cells a side, half and half (seeded by the data position), with the cell box of each crop."""
        from ..data.second_images import cells_to_px, random_cells, relevant_cells

        rng = np.random.default_rng([self.seed, 19, self.counter])
        boxes = [relevant_cells(s) if rng.random() < 0.5 else random_cells(rng) for s in samples]
        return [s.image.convert("RGB").crop(cells_to_px(*b)) for s, b in zip(samples, boxes)], boxes

    def zoom_targets(self, samples, boxes, ip, first: int):
        """The scene-token index each token of each crop shows (`second_images.zoomed_cells` over the part of the crop
        the processor keeps), one flat tensor per crop; `first` is the crops' index in the processor batch `ip`, which
        gives Qwen2-VL's token grids (LLaVA's crops are all 6 x 6: `ip` may be None)."""
        from ..adapters import processed_extent
        from ..data.second_images import first_token_of_each_cell, zoomed_cells

        one = self._part("vision_zoom_target", "every", ("every", "first")) == "first"
        out = []
        for k, (s, box) in enumerate(zip(samples, boxes)):
            r0, c0, r1, c1 = box
            if self.arch == "llava":  # CLIP: shortest edge to 96 px, then the centre square
                grid = (world.GRID, world.GRID)
                left, top, right, bottom = processed_extent(self.processor.image_processor, world.CELL * (c1 - c0),
                                                            world.CELL * (r1 - r0))
                shown = (r0 + top * (r1 - r0), c0 + left * (c1 - c0), r0 + bottom * (r1 - r0), c0 + right * (c1 - c0))
            else:  # Qwen2-VL: the whole crop, on its own merged token grid
                grid, shown = tuple((ip["image_grid_thw"][first + k, 1:] // 2).tolist()), box
            rows, cols = zoomed_cells(shown, grid)
            cells = self.cell_targets([s])[0].view(world.GRID, world.GRID)
            t = cells[torch.as_tensor(rows), torch.as_tensor(cols)]
            if one:  # "first": a magnified object on one token, `<empty>` on the others it covers
                t = torch.where(torch.as_tensor(first_token_of_each_cell(rows, cols)), t, torch.zeros_like(t))
            out.append(t.reshape(-1))
        return out

    def stage_vision(self, steps=None, lr=None):
        R = self.recipe
        steps = R["vision_steps"] if steps is None else steps
        params, opt, sched, bar, t0 = self._begin("vision", lr or R["vision_lr"], steps, "(b+c) vision->scene tokens",
                                                    "vision")
        B = R.get("vision_batch") or R["batch"]
        n_blank = int(round(R["blank_frac"] * B))
        n_zoom = int(round(R.get("vision_zoom", 0) * B))
        for step in bar:
            samples = self._samples(B - n_blank - n_zoom, with_image=True)
            imgs = [s.image for s in samples] + self._blank_batch(n_blank)
            targets = list(torch.cat([self.cell_targets(samples),
                                      torch.zeros(n_blank, N_IMAGE_TOKENS, dtype=torch.long)]))
            zsamples = self._samples(n_zoom, with_image=True) if n_zoom else []
            crops, boxes = self._zoom_crops(zsamples) if n_zoom else ([], [])
            ip = dict(self.processor.image_processor(images=imgs + crops, return_tensors="pt"))
            targets += self.zoom_targets(zsamples, boxes, ip, len(imgs))
            feats = torch.cat(self.image_tokens(ip))
            loss, acc = self._align_loss(feats, torch.cat(targets).detach())
            self._update(loss, params, opt, sched)
            self._record("vision", step, loss=loss.item(), cell_acc=acc, bar=bar)
            self._step_done(step)
        self.timings["vision"] = time.time() - t0
        return self

    def stage_joint(self, steps=None, lr=None):
        R = self.recipe
        steps = R["joint_steps"] if steps is None else steps
        part = self._part("joint_part", "all", ("all", "vision"))
        params, opt, sched, bar, t0 = self._begin(part, lr or R["joint_lr"], steps, "(d) joint VQA", "joint")
        for step in bar:
            samples = self._samples(R.get("joint_batch") or R["batch"], with_image=True)
            if (R.get("blocks") or 1) > 1:
                enc = self._encode_blocks(samples)
                feats = self._image_features(dict(self.processor.image_processor(
                    images=[s.image for s in samples], return_tensors="pt")))
            else:
                enc = self._encode(samples, packed=True)
                feats = self._image_features(enc)
            logits = self._lm_forward(enc, feats)
            vqa = self._answer_loss(logits, enc["input_ids"])
            aux, acc = self._align_loss(feats, self.cell_targets(samples))
            loss = vqa + R["joint_aux"] * aux
            self._update(loss, params, opt, sched)
            self._record("joint", step, loss=vqa.item(), cell_acc=acc, bar=bar)
            self._step_done(step)
        self.timings["joint"] = time.time() - t0
        return self
