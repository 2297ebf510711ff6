"""Stage (a) of the organisms' recipe: the decoder on TEXT scenes (each image slot holds its cell's scene-token
embedding), with its optional curriculum, packed turns, question blocks and two-board prompts."""
from __future__ import annotations

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import world
from ..prompts import POST_PROMPT, render_prompt, user_text
from .build import N_IMAGE_TOKENS
from .trainer_base import image_token


class TextStage:
    """Stage (a), mixed into `fusion_utils.organisms.train.Trainer`."""

    def _curriculum_samples(self, samples, progress):
        """Stage (a) curriculum: early on, keep only a random subset of k objects of each scene (k grows from 1 to the
        full scene over the first `curriculum` fraction of the stage) and ask a question that is well posed for the
        reduced scene (family-balanced, from world.scene_questions)."""
        frac = float(self.recipe.get("curriculum") or 0)
        if frac <= 0 or progress >= frac:
            return samples
        import copy

        rng = np.random.default_rng([self.seed, 11, self.counter])
        out = []
        for s in samples:
            objs = s.meta["objects"]
            k = max(1, int(round(1 + (progress / frac) * (len(objs) - 1) * rng.uniform(0.5, 1.0))))
            keep = [objs[j] for j in sorted(rng.choice(len(objs), size=min(k, len(objs)), replace=False))]
            qs = world.scene_questions(keep)
            if not qs:
                out.append(s)
                continue
            fams = sorted({f for f, _, _ in qs})
            fam = fams[int(rng.integers(len(fams)))]
            opts = [q for q in qs if q[0] == fam]
            f, q, a = opts[int(rng.integers(len(opts)))]
            t = copy.copy(s)
            t.question, t.answers, t.family = q, [a], f
            t.meta = {**s.meta, "objects": keep, "scene_cells": world.scene_cells(keep)}
            out.append(t)
        return out

    def _texts_packed(self, samples):
        """Multi-turn conversations: turn 1 is exactly the evaluation prompt + answer, then pack-1 more questions
        about the same scene (family-balanced, from world.scene_questions), each answered + EOS."""
        K = int(self.recipe.get("pack") or 1)
        if K <= 1:
            return self._texts(samples)
        eos = self.tok.eos_token
        rng = np.random.default_rng([self.seed, 7, self.counter])
        texts = []
        for s, first in zip(samples, self._texts(samples)):
            pool = [q for q in world.scene_questions(s.meta["objects"]) if q[1] != s.question]
            fams = sorted({f for f, _, _ in pool})
            turns = []
            for _ in range(K - 1):
                if not pool:
                    break
                fam = fams[int(rng.integers(len(fams)))]
                opts = [q for q in pool if q[0] == fam] or pool
                q = opts[int(rng.integers(len(opts)))]
                pool.remove(q)
                fams = sorted({f for f, _, _ in pool})
                ut = user_text(q[1], None if self.recipe.get("pack_short") else POST_PROMPT)
                if self.arch == "llava":
                    turns.append(f"USER: {ut} ASSISTANT: {q[2]}{eos}")
                else:
                    turns.append(f"\n<|im_start|>user\n{ut}<|im_end|>\n<|im_start|>assistant\n{q[2]}{eos}")
            texts.append(first + "".join(turns))
        return texts

    def _block_questions(self, samples):
        """For each scene, `blocks` (question, answer) pairs: the sample's own, then blocks-1 more about the same
        scene from world.scene_questions, their families drawn with the training family weights."""
        K = int(self.recipe.get("blocks") or 1)
        weights = list(getattr(self, "_families_now", None) or world.FAMILIES)
        rng = np.random.default_rng([self.seed, 13, self.counter])
        out = []
        for s in samples:
            qa = [(s.question, s.answers[0])]
            pool = [q for q in world.scene_questions(s.meta["objects"]) if q[1] != s.question]
            while len(qa) < K and pool:
                fams = [f for f in weights if any(q[0] == f for q in pool)]
                if not fams:
                    break
                fam = fams[int(rng.integers(len(fams)))]
                opts = [q for q in pool if q[0] == fam]
                q = opts[int(rng.integers(len(opts)))]
                pool.remove(q)
                qa.append((q[1], q[2]))
            out.append(qa)
        return out

    def _encode_blocks(self, samples):
        """Several questions about one scene in ONE sequence that shares the scene prefix: each question block is
        exactly an evaluation prompt + answer + EOS, sees the prefix and itself only (4D mask), and takes the
        positions it would have right after the image (for Qwen2-VL the M-RoPE positions of the single prompt), so
        every block is trained as an independent sample while the image prefix is computed once."""
        it = image_token(self.arch)
        img_id = self.tok.convert_tokens_to_ids(it)
        eos, sep = self.tok.eos_token, (" " if self.arch == "llava" else "")
        seqs, poss, blks = [], [], []
        for s, qa in zip(samples, self._block_questions(samples)):
            texts = [render_prompt(self.processor, user_text(q)).replace(it, it * N_IMAGE_TOKENS) + sep + a + eos
                     for q, a in qa]
            ids = [self.tok(t)["input_ids"] for t in texts]
            cut = max(i for i, t in enumerate(ids[0]) if t == img_id) + 1 + (self.arch == "qwen2_vl")
            seq, pos, blk = list(ids[0][:cut]), None, [-1] * cut
            for j, one in enumerate(ids):
                assert one[:cut] == seq[:cut], "the question blocks must share the scene prefix"
                t = torch.tensor([one])
                if self.arch == "qwen2_vl":
                    p, _ = self.model.model.get_rope_index(**self._with_mrope_inputs({"input_ids": t}))
                    p = p[:, 0]  # [3, L]
                else:
                    p = torch.arange(len(one))[None]  # [1, L]
                pos = p[:, :cut] if pos is None else pos
                pos = torch.cat([pos, p[:, cut:]], 1)
                seq += one[cut:]
                blk += [j] * (len(one) - cut)
            seqs.append(seq); poss.append(pos); blks.append(blk)
        L = max(len(x) for x in seqs)
        B = len(seqs)
        pad = self.tok.pad_token_id
        ids = torch.full((B, L), pad, dtype=torch.long)
        pos = torch.zeros((poss[0].shape[0], B, L), dtype=torch.long)
        blk = torch.full((B, L), -2, dtype=torch.long)
        for b in range(B):
            n = len(seqs[b])
            ids[b, :n] = torch.tensor(seqs[b]); pos[:, b, :n] = poss[b]; blk[b, :n] = torch.tensor(blks[b])
        q, k = blk[:, :, None], blk[:, None, :]
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        allowed = causal & (k != -2) & ((k == -1) | (k == q))
        allowed |= torch.eye(L, dtype=torch.bool)  # padding rows attend to themselves (no all-masked softmax rows)
        mask = torch.zeros(B, 1, L, L).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        enc = {"input_ids": ids, "attention_mask": mask, "position_ids": pos if self.arch == "qwen2_vl" else pos[0]}
        return self._with_mrope_inputs(enc)

    def stage_text(self, steps=None, lr=None):
        R = self.recipe
        steps = R["text_steps"] if steps is None else steps
        params, opt, sched, bar, t0 = self._begin("lm", lr or R["text_lr"], steps, "(a) text scenes", "text")
        step = bar.n - 1  # a resumed stage whose checkpoint was its last step runs no step
        for step in bar:
            samples = self._curriculum_samples(self._samples(R["batch"], with_image=False, progress=step / steps),
                                               step / steps)
            if R.get("text_two"):
                enc, feats = self._two_board_batch(samples)
            else:
                enc = self._encode_blocks(samples) if (R.get("blocks") or 1) > 1 else \
                    self._encode_text_only(self._texts_packed(samples))
                feats = self._scene_embeds(self.cell_targets(samples))
            if R["scene_noise"]:
                feats = feats + R["scene_noise"] * feats.detach().pow(2).mean().sqrt() * torch.randn(
                    feats.shape, generator=self.gen)
            logits = self._lm_forward(enc, feats)
            loss = self._answer_loss(logits, enc["input_ids"])
            self._update(loss, params, opt, sched)
            self._record("text", step, loss=loss.item(), bar=bar)
            if R.get("text_max_minutes") and time.time() - t0 > 60 * R["text_max_minutes"]:
                tqdm.write(f"[{self.name}] stage (a) stopped by the {R['text_max_minutes']} min guard at step {step + 1}")
                break
            every = R.get("text_check_every")
            if every and (step + 1) % every == 0 and step + 1 < steps:
                acc = self.quick_accuracy(200, "text")
                self.log.append({"stage": "text_check", "step": step, **acc})
                tqdm.write(f"[{self.name}] step {step + 1} ({(time.time() - t0) / 60:.1f} min): text-scene val "
                           f"accuracy {acc}")
                fam = min(v for k, v in acc.items() if k != "overall")
                if acc["overall"] >= R["text_target"] and fam >= R["text_family_target"]:
                    break
            self._step_done(step)
        self.freeze_composition()
        self.timings["text"] = time.time() - t0
        self.timings["text_steps_run"] = step + 1
        return self

    def second_board(self, sample, kind: str, rng) -> torch.Tensor:
        """The scene-token index of each token of a second image of `kind` (`second_images.KINDS` but 'one'), as the
        tower should read it: the board itself ('same'), or a crop's cells magnified as the processor shows them
        (`zoom_targets`) for 'relevant' / 'irrelevant' / 'random'."""
        from ..data.second_images import irrelevant_cells, random_cells, relevant_cells

        if kind == "same":
            return self.cell_targets([sample])[0]
        box = {"relevant": lambda: relevant_cells(sample), "irrelevant": lambda: irrelevant_cells(sample, rng),
               "random": lambda: random_cells(rng)}[kind]()
        return self.zoom_targets([sample], [box], None, 0)[0]

    def _two_board_batch(self, samples):
        """Stage (a) with a `text_two` share of two-board prompts: the scene as text, then a second board of a kind
        drawn from `two_kinds` (seeded by the data position), answer unchanged. The decoder learns to answer from the
        first image while its counting and lookup circuits form, instead of unlearning the second image in stage (e)
        (LLaVA only: a magnified crop fills the same 6 x 6 tokens as the image, so every row keeps 36 per image)."""
        if self.arch != "llava":
            raise ValueError("recipe text_two > 0 is for LLaVA organisms (a Qwen2-VL crop has its own token grid); "
                             "set text_two to 0 for this organism.")
        rng = np.random.default_rng([self.seed, 23, self.counter])
        kinds = [k for k in self.recipe["two_kinds"] if k != "one"]

        def second_of(_):
            return kinds[int(rng.integers(len(kinds)))] if rng.random() < self.recipe["text_two"] else None
        return self.board_prompts(samples, second_of, rng, with_answer=True)

    def board_prompts(self, samples, second_of, rng, with_answer: bool):
        """Text-board prompts: each sample's board, then a second board of kind `second_of(sample)` when that is not
        None (`second_board`, drawing from `rng`; LLaVA only); returns the encoded prompts and their scene embeddings.
        `second_of` is called once per sample, in order, before that sample's second board, so a caller's rng draws
        keep their order. ``second_of=lambda s: None`` gives the one-board prompts of stage (a)."""
        sep = " " if self.arch == "llava" else ""
        boards, texts = [], []
        for s in samples:
            boards.append(self.cell_targets([s])[0])
            kind = second_of(s)
            if kind:
                boards.append(self.second_board(s, kind, rng))
            p = render_prompt(self.processor, user_text(s.question), n_images=1 + bool(kind))
            texts.append(p + sep + s.answers[0] + self.tok.eos_token if with_answer else p)
        return self._encode_text_only(texts), self._scene_embeds(torch.stack(boards))
