"""The organisms' trainer, its shared parts: the model and recipe, the data stream, prompt encoding, the losses,
each stage's set-up (optimiser, schedule, mid-stage checkpoints), quick validation and saving. The stages are mixed
in from `train_text`, `train_vision`, `train_two` and `train_fine` (`fusion_utils.organisms.train.Trainer`)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import world
from ..organism_registry import arch_of, resolve_name
from ..prompts import render_prompt, user_text
from .build import N_IMAGE_TOKENS, build
from .recipe import ORGANISM_RECIPE, RECIPE, world_settings


def image_token(arch: str) -> str:
    """The image placeholder of an architecture's prompts."""
    return "<image>" if arch == "llava" else "<|image_pad|>"


class TrainerBase:
    """The trainer's shared parts: data, encoding, model pieces, optimiser and checkpoints, evaluation, saving."""

    def __init__(self, name: str, seed: int = 0, threads: int | None = 1, recipe: dict | None = None, **overrides):
        if threads:
            torch.set_num_threads(threads)
        name = resolve_name(name)
        self.name, self.arch, self.seed, self.threads = name, arch_of(name), seed, threads
        self.recipe = {**RECIPE, **ORGANISM_RECIPE[name], **(recipe or {})}
        self.model, self.processor = build(name, seed=seed, **overrides)
        if self.recipe.get("qk_init_std"):
            # without this the answer position's attention stays spread over ~60 tokens (35 of them empty cells) and
            # the decoder sits on the answer prior for thousands of steps
            g = torch.Generator().manual_seed(seed + 1)
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    if n.startswith("model.language_model") and n.endswith(("q_proj.weight", "k_proj.weight")):
                        p.copy_(torch.randn(p.shape, generator=g) * self.recipe["qk_init_std"])
        self.tok = self.processor.tokenizer
        self.scene_ids = torch.tensor(self.tok.convert_tokens_to_ids(list(world.SCENE_TOKENS)))
        self.scene_index = {t: i for i, t in enumerate(world.SCENE_TOKENS)}
        parts = []
        for t in world.SCENE_TOKENS:
            if t == world.EMPTY_TOKEN:
                parts.append([t, t, t])
            else:
                parts.append(t.strip("<>").split("_"))
        self.scene_parts = torch.tensor([self.tok.convert_tokens_to_ids(p) for p in parts])  # [41, 3]
        self.composed = False
        self.counter = 0  # index into the train split's sample stream
        self.gen = torch.Generator().manual_seed(seed)
        self.log: list[dict] = []
        self.timings: dict[str, float] = {}
        # mid-stage checkpoints (set by `train`): where, how often, and the one to resume from
        self.ckpt_file, self.ckpt_every, self.partial = None, 0, None
        self.base, self.base_log = None, []  # the weights stage (f) started from (`load_base`), and their log

    def _samples(self, n: int, with_image: bool, progress: float = 1.0, families=None):
        fams = families or self.recipe.get("train_families") or self.recipe.get("families")
        for until, early in self.recipe.get("family_stages") or ():
            if progress < until:  # stage (a) family curriculum: the early part of the stage sees only these families
                fams = early
                break
        self._families_now = fams
        out = [world.make_sample("train", self.counter + i, seed=self.seed, families=fams, with_image=with_image)
               for i in range(n)]
        self.counter += n
        return out

    def _texts(self, samples, with_answer=True):
        eos = self.tok.eos_token
        sep = " " if self.arch == "llava" else ""
        texts = []
        for s in samples:
            p = render_prompt(self.processor, user_text(s.question))
            texts.append(p + sep + s.answers[0] + eos if with_answer else p)
        return texts

    def _with_mrope_inputs(self, enc):
        """Qwen2-VL's extra inputs for text with image placeholders: mm_token_type_ids and one [1, 12, 12] grid per
        row (a 96 px world image always gives that grid). LLaVA: unchanged."""
        if self.arch == "qwen2_vl":
            ids = enc["input_ids"]
            enc["mm_token_type_ids"] = (ids == self.model.config.image_token_id).long()
            enc["image_grid_thw"] = torch.tensor([[1, 2 * world.GRID, 2 * world.GRID]] * ids.shape[0])
        return enc

    def _encode_text_only(self, texts):
        it = image_token(self.arch)
        texts = [t.replace(it, it * N_IMAGE_TOKENS) for t in texts]
        return self._with_mrope_inputs(dict(self.tok(texts, padding=True, return_tensors="pt")))

    def _encode(self, samples, with_answer=True, images=None, packed=False):
        texts = self._texts_packed(samples) if packed else self._texts(samples, with_answer)
        imgs = images if images is not None else [s.image for s in samples]
        return dict(self.processor(images=imgs, text=texts, padding=True, return_tensors="pt"))

    def _labels(self, ids):
        """Answer word + EOS after every assistant cue (`assistant :` for LLaVA, `<|im_start|> assistant` for Qwen)."""
        if not hasattr(self, "_cue"):
            a = self.tok.convert_tokens_to_ids("assistant")
            self._cue = (a, self.tok.convert_tokens_to_ids(":")) if self.arch == "llava" else \
                (self.tok.convert_tokens_to_ids("<|im_start|>"), a)
        c0, c1 = self._cue
        hit = torch.zeros_like(ids, dtype=torch.bool)
        hit[:, 2:] = (ids[:, :-2] == c0) & (ids[:, 1:-1] == c1)
        labels = torch.full_like(ids, -100)
        labels[hit] = ids[hit]
        eos_pos = torch.zeros_like(hit)
        eos_pos[:, 1:] = hit[:, :-1]
        labels[eos_pos] = ids[eos_pos]
        return labels

    def cell_targets(self, samples):
        return torch.tensor([[self.scene_index[t] for t in s.meta["scene_cells"]] for s in samples])

    @property
    def embed(self):
        return self.model.get_input_embeddings()

    def _scene_embeds(self, targets):
        """Text-scene embeddings for cell targets [B, 36] (indices into SCENE_TOKENS)."""
        if not self.recipe.get("compose_scene") or self.composed:
            return self.embed(self.scene_ids[targets])
        W = self.embed.weight
        comp = W[self.scene_parts]  # [41, 3, D]
        comp = torch.where((self.scene_parts[:, :1] == self.scene_parts[:, 1:2]).unsqueeze(-1),
                           comp[:, 0:1].expand_as(comp) / 3, comp)  # <empty>: its own row (3 x 1/3)
        return comp.sum(1)[targets]

    def freeze_composition(self):
        """Write the composed scene embeddings into the scene tokens' rows (end of stage a)."""
        if self.recipe.get("compose_scene") and not self.composed:
            with torch.no_grad():
                rows = self._scene_embeds(torch.arange(len(world.SCENE_TOKENS)))
                self.embed.weight[self.scene_ids] = rows
        self.composed = True

    def _image_features(self, enc):
        return torch.stack(self.image_tokens(enc))  # [B, 36, D]: world images, 36 tokens each

    def _lm_forward(self, enc, feats):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        kw = {k: v for k, v in enc.items()
              if k in ("input_ids", "attention_mask", "position_ids", "mm_token_type_ids", "image_grid_thw")}
        mm = {"image": BaseModelOutputWithPooling(pooler_output=tuple(feats))}
        return self.model(**kw, mm_encoder_outputs=mm).logits

    def _answer_loss(self, logits, ids):
        labels = self._labels(ids)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)

    def _align_loss(self, feats, targets):
        """Image tokens -> their cells' scene-token embeddings: squared error relative to the embedding scale (the
        decoder must receive the inputs it was trained on, not merely the nearest ones: a cross-entropy over -d^2
        alone is met by features 12x longer than the embeddings, which the decoder cannot read), plus a small
        cross-entropy over scale-free -d^2 that separates the 41 classes."""
        E = self.embed.weight[self.scene_ids]  # [41, D]
        scale = E.pow(2).sum(-1).mean().detach()
        d2 = (feats.unsqueeze(-2) - E).pow(2).sum(-1) / scale  # [B, 36, 41]
        ce = F.cross_entropy(-d2.reshape(-1, d2.shape[-1]), targets.reshape(-1))
        nmse = d2.gather(-1, targets.unsqueeze(-1)).mean()
        acc = (d2.argmin(-1) == targets).float().mean().item()
        return nmse + self.recipe.get("align_ce", 0.1) * ce, acc

    def _opt(self, params, lr, steps):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
        steps = max(1, steps)  # a stage of 0 steps (e.g. joint_steps 0) builds its schedule and runs no step
        warm = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
        return opt, sched

    def _set_trainable(self, part: str):
        for n, p in self.model.named_parameters():
            is_lm = n.startswith("model.language_model") or n.startswith("lm_head")
            is_proj = "merger" in n or "multi_modal_projector" in n
            p.requires_grad = {"lm": is_lm, "vision": not is_lm, "projector": is_proj, "all": True}[part]
        return [p for p in self.model.parameters() if p.requires_grad]

    def _begin(self, part: str, lr: float, steps: int, desc: str, stage: str | None = None):
        """One stage's set-up: which parameters train, AdamW + warmup/cosine, train mode, a tqdm bar, the start time.
        A mid-stage checkpoint of this stage (`self.partial`, see `train`) restores the optimiser and schedule and
        starts the bar at its step; the start time is moved back by the minutes the stage had already run."""
        params = self._set_trainable(part)
        opt, sched = self._opt(params, lr, steps)
        self.model.train()
        start, elapsed = 0, 0.0
        if stage and self.partial and self.partial["stage"] == stage:
            opt.load_state_dict(self.partial["opt"])
            sched.load_state_dict(self.partial["sched"])
            start, elapsed = int(self.partial["step"]), float(self.partial["elapsed"])
            self.partial = None
        self._running = (stage, opt, sched, time.time() - elapsed)
        bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"{self.name} {desc}", mininterval=5)
        return params, opt, sched, bar, time.time() - elapsed

    def _step_done(self, step: int):
        """Every `ckpt_every` steps, write a mid-stage checkpoint (model, optimiser, schedule, data position, noise
        generator, log) to `ckpt_file`, so a killed run resumes where it was instead of at the stage's start. Written
        to a temporary file and renamed, so a kill during the write leaves the previous checkpoint intact."""
        if not self.ckpt_file or not self.ckpt_every or (step + 1) % self.ckpt_every:
            return
        stage, opt, sched, t0 = self._running
        f = Path(self.ckpt_file)
        tmp = f.with_suffix(".tmp")
        torch.save({**self.state(), "stage": stage, "step": step + 1, "elapsed": time.time() - t0,
                    "opt": opt.state_dict(), "sched": sched.state_dict()}, tmp)
        tmp.replace(f)

    def state(self) -> dict:
        """What a checkpoint holds besides the optimiser: weights, data position, noise generator, log, timings."""
        return {"model": self.model.state_dict(), "counter": self.counter, "composed": self.composed, "log": self.log,
                "timings": self.timings, "gen": self.gen.get_state()}

    def load_state(self, st: dict):
        self.model.load_state_dict(st["model"])
        self.counter, self.composed, self.log, self.timings = st["counter"], st["composed"], st["log"], st["timings"]
        self.gen.set_state(st["gen"])

    @staticmethod
    def _update(loss, params, opt, sched):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); sched.step()

    def image_tokens(self, ip) -> list:
        """Each image's tokens after the projector / merger, [n_i, D] (crops of other shapes have other n_i)."""
        m = self.model.model
        if self.arch == "llava":
            out = m.get_image_features(pixel_values=ip["pixel_values"], vision_feature_layer=-1,
                                       vision_feature_select_strategy="default")
        else:
            out = m.get_image_features(ip["pixel_values"], ip["image_grid_thw"])
        return list(out.pooler_output)

    def _part(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        """A recipe entry ``key`` (what a stage trains, or how it targets), checked against its allowed values."""
        part = self.recipe.get(key, default)
        if part not in allowed:
            raise ValueError(f"recipe {key}={part!r}: use {' or '.join(repr(a) for a in allowed)}.")
        return part

    def _record(self, stage, step, bar=None, **vals):
        self.log.append({"stage": stage, "step": step, **vals})
        if bar is not None and step % 10 == 0:
            recent = [r for r in self.log[-50:] if r["stage"] == stage]
            bar.set_postfix({k: f"{np.mean([r[k] for r in recent]):.3f}" for k in vals})

    @torch.no_grad()
    def quick_accuracy(self, n=200, mode="image", split="val", second: str | None = None):
        """First-token argmax accuracy on `split` (mode 'image' or 'text' scenes). `second` (text mode, LLaVA): a
        second text board of that kind after each scene (`second_board`), so the decoder's reading of two images is
        measured without the tower: `quick_accuracy(400, "text", second="same")`."""
        if second is not None and (mode != "text" or self.arch != "llava"):
            raise ValueError(f"second={second!r} is for mode='text' on a LLaVA organism; drop it for mode={mode!r}.")
        self.model.eval()
        ds = world.world_dataset(split, n, seed=self.seed, families=self.recipe.get("families"))
        rng = np.random.default_rng([self.seed, 29])
        correct = []
        for i in range(0, len(ds), 50):
            batch = list(ds[i:i + 50])
            if mode == "text":
                logits = self._lm_forward(*self.board_prompts(batch, lambda _: second, rng, with_answer=False))
            else:
                enc = self._encode(batch, with_answer=False)
                logits = self._lm_forward(enc, self._image_features(enc))
            pred = self.tok.convert_ids_to_tokens(logits[:, -1].argmax(-1).tolist())
            correct += [p == s.answers[0] for p, s in zip(pred, batch)]
        self.model.train()
        fams = {}
        for s, c in zip(ds, correct):
            fams.setdefault(s.family, []).append(c)
        return {"overall": float(np.mean(correct)), **{f: float(np.mean(v)) for f, v in fams.items()}}

    def save(self, out_dir):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad = True
        self.model.save_pretrained(out, safe_serialization=True)
        self.processor.save_pretrained(out)
        (out / "training_log.json").write_text(json.dumps(
            {"seed": self.seed, "threads": self.threads, "recipe": self.recipe, "timings_s": self.timings,
             "world": world_settings(), **({"base": self.base} if self.base else {}),
             "samples_seen": self.counter, "log": self.base_log + self.log[::10]}, indent=1))
        return out
