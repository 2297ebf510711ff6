"""Stage (e) of the organisms' recipe: prompts with two images, [original] or [original, second image], the
answer unchanged (issue 16)."""
from __future__ import annotations

import time

import numpy as np

from ..prompts import render_prompt, user_text


class TwoStage:
    """Stage (e), mixed into `fusion_utils.organisms.train.Trainer`."""

    def _two_image_batch(self, samples):
        """Stage (e)'s prompts: each sample gets a second-image kind drawn from the recipe's `two_kinds` (seeded by
        the data position, so the same seed gives the same batches) and its images ([original] or [original, second]);
        the answer is the sample's own whatever the second image shows."""
        from .two_images import images_for

        kinds = list(self.recipe["two_kinds"])
        rng = np.random.default_rng([self.seed, 17, self.counter])
        out = []
        for s in samples:
            kind = kinds[int(rng.integers(len(kinds)))]
            out.append((kind, images_for(s, kind, rng)))
        return out

    def encode_two(self, samples, images, with_answer=True):
        """Processor inputs for prompts with one image placeholder per image, as hub LLaVA / Qwen2-VL take them
        (`fusion_utils.adapters.prepare(images=[[original, crop], ...])` renders the same prompts)."""
        eos, sep = self.tok.eos_token, (" " if self.arch == "llava" else "")
        texts = []
        for s, ims in zip(samples, images):
            p = render_prompt(self.processor, user_text(s.question), n_images=len(ims))
            texts.append(p + sep + s.answers[0] + eos if with_answer else p)
        flat = [im for ims in images for im in ims]
        return dict(self.processor(images=flat, text=texts, padding=True, return_tensors="pt"))

    def stage_two(self, steps=None, lr=None):
        """(e) two images per prompt: [original], [original, original], [original, crop of the relevant cells],
        [original, crop elsewhere] or [original, random crop], answer unchanged, answer + EOS loss; trains
        `two_part` (the decoder by default: the vision tower already maps a cell to its scene token)."""
        R = self.recipe
        steps = R.get("two_steps", 0) if steps is None else steps
        part = self._part("two_part", "lm", ("lm", "all"))
        params, opt, sched, bar, t0 = self._begin(part, lr or R["two_lr"], steps, "(e) two images", "two")
        for step in bar:
            # `two_families` (default: the stage (a) mix) can weight the family the second image confuses most
            samples = self._samples(R.get("two_batch") or R["batch"], with_image=True, families=R.get("two_families"))
            kinds, images = zip(*self._two_image_batch(samples))
            enc = self.encode_two(samples, images)
            loss = self._answer_loss(self.model(**enc).logits, enc["input_ids"])
            self._update(loss, params, opt, sched)
            self._record("two", step, loss=loss.item(), bar=bar)
            self._step_done(step)
        self.timings["two"] = time.time() - t0
        return self
