"""Training-free baselines the paper compares with, on the same prompts and harness as every other experiment.

- ``plain``: greedy answers (`common.answer`).
- ``vicrop`` ("MLLMs know where to look", ICLR 2025, relative attention): the last prompt token's attention to the
  image at a middle layer (round(14/32·L); LLaVA-1.5 uses 14) under the task prompt, divided by the same under the
  generic prompt ``"Write a general description of the image."`` (head mean, renormalised, + ε); crop around its
  peak (`contrastive.crop_box`) and answer with ``[original, crop]``.
- ``vcd`` (visual contrastive decoding): ``(1+α)·l(v) − α·l(v′)`` with ``v′`` the image after forward diffusion
  ``q(x_T | x_0)`` (linear β schedule over 1000 steps, T=500, on pixel values in [0, 1], seeded per sample, then
  re-processed), restricted to tokens with ``p(v) ≥ β·max p(v)``. Runs as one ``generate`` over 2B rows (original
  rows then noised rows) with a logits processor that combines rows b and B+b and forces the same token into both.
- ``dola`` (Decoding by Contrasting Layers): ``log_softmax(final) − log_softmax(premature)`` at every step, the
  premature layer chosen per step and per sample as the candidate with the largest Jensen–Shannon divergence from
  the final layer's distribution, tokens with ``p_final < α·max p_final`` excluded (α=0.1). Early-exit logits are
  ``lm_head(final_norm(h_j))`` of decoder layer j's output at the last position (as `sweeps.early_exit_logits`).
  Candidate buckets: ``"low"`` = even layers in [0, L/2), ``"high"`` = even layers in [L/2, L−1) (decoder-layer
  outputs, 0-based; the final layer is never a candidate). Greedy. ``repetition_penalty`` (default 1.0) is applied to
  the contrasted scores as in the DoLa paper's code; DoLa recommends 1.2 for open-ended generation.
"""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from ..interventions import CaptureAttention, check_layer, intervene
from ..methods import crop_images
from ..metrics import jensen_shannon
from ..prompts import GENERIC_PROMPT, POST_PROMPT
from .common import (Decoding, answer, base_config, decode_new, finish, generate, post_prompt_for, run_experiment,
                     score)
from .contrastive import _forward_kwargs, crop_box

METHODS = ("plain", "vicrop", "vcd", "dola")


def _chunks(samples, n):
    for i in range(0, len(samples), n):
        yield samples[i:i + n]


# --- plain ----------------------------------------------------------------------------------------------------------

def plain(lm, samples, *, post_prompt: str | None = POST_PROMPT, decoding: Decoding | None = None,
          batch_size: int = 8) -> list[str]:
    return answer(lm, list(samples), post_prompt=post_prompt, decoding=decoding, batch_size=batch_size)


# --- ViCrop ---------------------------------------------------------------------------------------------------------

def vicrop_layer(n_layers: int) -> int:
    """ViCrop's attention layer: 14 of 32 (LLaVA-1.5), scaled to the model's depth."""
    return int(min(n_layers - 1, round(14 / 32 * n_layers)))


@torch.no_grad()
def _last_token_map(lm, batch, layer: int) -> list[torch.Tensor]:
    with intervene(lm, batch, CaptureAttention(layers=[layer])) as run:
        lm.model(**batch.inputs, use_cache=False, **_forward_kwargs(lm))
    maps = run.attention
    return [maps.sample(b)[0] for b in range(batch.size)]


@torch.no_grad()
def relative_attention(lm, samples, *, layer: int | None = None, post_prompt: str | None = POST_PROMPT,
                       eps: float = 1e-6) -> list[torch.Tensor]:
    """Per sample, float32 [image tokens]: task-prompt attention / generic-prompt attention at ``layer``."""
    samples = list(samples)
    layer = check_layer(vicrop_layer(lm.num_layers) if layer is None else layer, lm.num_layers)
    task = _last_token_map(lm, lm.prepare(samples, post_prompt=post_prompt), layer)
    generic = _last_token_map(lm, lm.prepare(samples, post_prompt=None, questions=[GENERIC_PROMPT] * len(samples)),
                              layer)
    return [t / (g + eps) for t, g in zip(task, generic)]


def vicrop_boxes(lm, samples, *, layer: int | None = None, post_prompt: str | None = POST_PROMPT,
                 eps: float = 1e-6, frac: float = 0.1, min_side: float = 0.25) -> list[tuple]:
    """ViCrop's crop box per sample (pixels), from the relative attention map."""
    samples = list(samples)
    b = lm.prepare(samples, post_prompt=post_prompt)
    for i in range(len(samples)):
        if not b.grids[i][0].spatial:
            raise ValueError(f"{lm.spec.label}'s image tokens have no spatial grid; ViCrop needs one to crop.")
    rel = relative_attention(lm, samples, layer=layer, post_prompt=post_prompt, eps=eps)
    return [crop_box(r, b.grids[i][0], s.image.size, frac=frac, min_side=min_side)
            for i, (r, s) in enumerate(zip(rel, samples))]


def vicrop(lm, samples, *, layer: int | None = None, post_prompt: str | None = POST_PROMPT,
           decoding: Decoding | None = None, eps: float = 1e-6, frac: float = 0.1, min_side: float = 0.25,
           batch_size: int = 8, return_boxes: bool = False):
    samples = list(samples)
    preds, boxes = [], []
    for chunk in _chunks(samples, batch_size):
        bx = vicrop_boxes(lm, chunk, layer=layer, post_prompt=post_prompt, eps=eps, frac=frac, min_side=min_side)
        b = lm.prepare(chunk, post_prompt=post_prompt, images=crop_images([s.image for s in chunk], bx))
        preds += generate(lm, b, (), decoding)
        boxes += bx
    return (preds, boxes) if return_boxes else preds


# --- VCD ------------------------------------------------------------------------------------------------------------

def diffusion_noise(image: Image.Image, step: int = 500, n_steps: int = 1000, seed: int = 0,
                    beta_start: float = 1e-4, beta_end: float = 0.02) -> Image.Image:
    """``x_T ~ q(x_T | x_0) = N(√ᾱ_T·x_0, (1−ᾱ_T)·I)`` on the pixels in [0, 1] (linear β schedule), clipped."""
    if not 0 <= step < n_steps:
        raise ValueError(f"noise step must be in [0, {n_steps}).")
    betas = np.linspace(beta_start, beta_end, n_steps, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)[step]
    x0 = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    eps = np.random.default_rng(seed).standard_normal(x0.shape)
    xt = np.sqrt(abar) * x0 + np.sqrt(1.0 - abar) * eps
    return Image.fromarray(np.clip(np.round(xt * 255.0), 0, 255).astype(np.uint8))


def _sample_seed(seed: int, sample) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(str(sample.id).encode())) % (2 ** 32)


class _VCDProcessor(LogitsProcessor):
    """Rows [0, B) see v, rows [B, 2B) see v′: choose one token per pair from the contrast, force it into both."""

    def __init__(self, B: int, alpha: float, beta: float, do_sample: bool, generator: torch.Generator | None,
                 temperature: float = 1.0, top_p: float = 1.0):
        self.B, self.alpha, self.beta = B, float(alpha), float(beta)
        self.do_sample, self.generator = do_sample, generator
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.steps: list[torch.Tensor] = []  # chosen tokens per step (for inspection)

    def __call__(self, input_ids, scores):
        B = self.B
        s = scores.float()
        v, vn = s[:B], s[B:2 * B]
        cd = v if self.alpha == 0 else (1.0 + self.alpha) * v - self.alpha * vn
        p = torch.softmax(v, dim=-1)
        keep = p >= self.beta * p.max(dim=-1, keepdim=True).values
        cd = cd.masked_fill(~keep, float("-inf"))
        if self.do_sample:
            probs = torch.softmax(cd / self.temperature, dim=-1)
            if self.top_p < 1.0:
                sp, si = probs.sort(dim=-1, descending=True)
                drop = sp.cumsum(-1) - sp > self.top_p
                probs = probs.scatter(-1, si, sp.masked_fill(drop, 0.0))
            tok = torch.multinomial(probs.cpu(), 1, generator=self.generator).to(s.device).squeeze(-1)
        else:
            tok = cd.argmax(dim=-1)
        self.steps.append(tok)
        out = torch.full_like(scores, float("-inf"))
        rows = torch.arange(B, device=scores.device)
        out[rows, tok] = 0.0
        out[rows + B, tok] = 0.0
        return out


@torch.no_grad()
def vcd(lm, samples, *, alpha: float = 1.0, beta: float = 0.1, noise_step: int = 500,
        post_prompt: str | None = POST_PROMPT, decoding: Decoding | None = None, seed: int = 0,
        batch_size: int = 8) -> list[str]:
    """Visual contrastive decoding; greedy, or sampled (``decoding.do_sample``; seeded by ``seed``)."""
    decoding = decoding or Decoding()
    samples = list(samples)
    gen = torch.Generator().manual_seed(int(seed))
    out: list[str] = []
    for chunk in _chunks(samples, batch_size):
        B = len(chunk)
        noised = [diffusion_noise(s.image, noise_step, seed=_sample_seed(seed, s)) for s in chunk]
        batch = lm.prepare(list(chunk) + list(chunk), post_prompt=post_prompt,
                           images=[s.image for s in chunk] + noised)
        proc = _VCDProcessor(B, alpha, beta, decoding.do_sample, gen, decoding.temperature, decoding.top_p)
        greedy = Decoding(max_new_tokens=decoding.max_new_tokens)  # the processor decides; generate takes argmax
        ids = lm.model.generate(**batch.inputs, **greedy.kwargs(lm.processor.tokenizer),
                                logits_processor=LogitsProcessorList([proc]))
        out += decode_new(lm, batch, ids)[:B]
    return out


# --- DoLa -----------------------------------------------------------------------------------------------------------

def dola_layers(kind, n_layers: int) -> list[int]:
    """DoLa's premature-layer candidates (decoder-layer outputs, 0-based): ``"low"`` = even layers in [0, L/2),
    ``"high"`` = even layers in [L/2, L−1), or an explicit list; the final layer is never a candidate."""
    L = int(n_layers)
    if isinstance(kind, str):
        if kind == "low":
            layers = list(range(0, L // 2, 2))
        elif kind == "high":
            layers = list(range(L // 2 + (L // 2) % 2, L - 1, 2))
        else:
            raise ValueError("DoLa candidate layers: 'low', 'high' or a list of layer indices.")
    else:
        layers = [check_layer(int(j), L) for j in kind]
    layers = [j for j in layers if j != L - 1]
    if not layers:
        raise ValueError(f"No DoLa candidate layer for a {L}-layer model with {kind!r}.")
    return layers


def dola_contrast(final_logits: torch.Tensor, layer_logits: torch.Tensor, candidates: Sequence[int],
                  alpha: float = 0.1) -> tuple[torch.Tensor, list[int]]:
    """DoLa's scores for one step. ``final_logits`` [B, V]; ``layer_logits`` [C, B, V] early-exit logits of the
    ``candidates`` (same order). Returns (scores [B, V] float32 with −inf outside the plausible set, the premature
    layer chosen for each row)."""
    final = final_logits.float()
    prem = layer_logits.float()
    p = torch.softmax(final, dim=-1)
    q = torch.softmax(prem, dim=-1)  # [C, B, V]
    js = jensen_shannon(p[None].expand_as(q), q, axis=-1)  # [C, B]
    idx = js.argmax(dim=0)  # [B]
    rows = torch.arange(final.shape[0], device=final.device)
    chosen = prem[idx, rows]  # [B, V]
    scores = torch.log_softmax(final, dim=-1) - torch.log_softmax(chosen, dim=-1)
    plausible = p >= alpha * p.max(dim=-1, keepdim=True).values
    scores = scores.masked_fill(~plausible, float("-inf"))
    return scores, [int(candidates[int(i)]) for i in idx.tolist()]


class _DoLaProcessor(LogitsProcessor):
    def __init__(self, lm, captured: dict, candidates: list[int], alpha: float, repetition_penalty: float):
        self.lm, self.captured, self.candidates = lm, captured, candidates
        self.alpha, self.penalty = float(alpha), float(repetition_penalty)
        self.premature: list[list[int]] = []  # per step, per row
        self.first_scores: torch.Tensor | None = None

    def __call__(self, input_ids, scores):
        from ..sweeps import _head

        L = self.lm.num_layers
        final = _head(self.lm, self.captured[L - 1])
        prem = torch.stack([_head(self.lm, self.captured[j]) for j in self.candidates])
        out, chosen = dola_contrast(final, prem, self.candidates, self.alpha)
        if self.penalty != 1.0:
            prev = out.gather(1, input_ids)
            prev = torch.where(prev > 0, prev / self.penalty, prev * self.penalty)
            out = out.scatter(1, input_ids, prev)
        if self.first_scores is None:
            self.first_scores = out.detach().clone()
        self.premature.append(chosen)
        return out.to(scores.dtype)


@torch.no_grad()
def dola(lm, samples, *, layers="low", alpha: float = 0.1, repetition_penalty: float = 1.0,
         post_prompt: str | None = POST_PROMPT, decoding: Decoding | None = None, batch_size: int = 8,
         return_details: bool = False):
    """DoLa answers (greedy). ``return_details``: also the per-batch processors (premature layers per step, the
    first step's scores)."""
    decoding = decoding or Decoding()
    if decoding.do_sample:
        raise ValueError("DoLa is implemented for greedy decoding (do_sample=False).")
    cands = dola_layers(layers, lm.num_layers)
    L = lm.num_layers
    samples = list(samples)
    out, details = [], []
    for chunk in _chunks(samples, batch_size):
        batch = lm.prepare(chunk, post_prompt=post_prompt)
        captured: dict[int, torch.Tensor] = {}

        def hook(j):
            def h(module, args, output):
                hs = output[0] if isinstance(output, tuple) else output
                captured[j] = hs[:, -1]
            return h

        handles = [lm.layers[j].register_forward_hook(hook(j)) for j in sorted(set(cands) | {L - 1})]
        proc = _DoLaProcessor(lm, captured, cands, alpha, repetition_penalty)
        try:
            ids = lm.model.generate(**batch.inputs, **decoding.kwargs(lm.processor.tokenizer),
                                    logits_processor=LogitsProcessorList([proc]))
        finally:
            for h in handles:
                h.remove()
        out += decode_new(lm, batch, ids)
        details.append(proc)
    return (out, details) if return_details else out


# --- the experiment -------------------------------------------------------------------------------------------------

def baselines(lm, dataset, methods: Sequence[str] = METHODS, *, out: str | None = None, batch_size: int = 8,
              seed: int = 0, decoding: Decoding | None = None, vicrop_attn_layer: int | None = None,
              vcd_alpha: float = 1.0, vcd_beta: float = 0.1, vcd_noise_step: int = 500, dola_candidates="low",
              dola_alpha: float = 0.1, dola_repetition_penalty: float = 1.0, progress: bool = True):
    """Accuracy of each baseline on ``dataset``. Records: id, family, method, pred, score; summary: accuracy per
    method (n, accuracy, gain over plain when plain is among the methods)."""
    methods = list(methods)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"Unknown baseline {m!r}; use some of {', '.join(METHODS)}.")
    if "vicrop" in methods and lm.spec.grid == "none":
        raise ValueError(f"{lm.spec.label}'s image tokens have no spatial grid; ViCrop needs one to crop -- drop "
                         "'vicrop' from methods.")
    decoding = decoding or Decoding()
    post_prompt = post_prompt_for(dataset)
    params = {"methods": methods, "vicrop_layer": vicrop_attn_layer if vicrop_attn_layer is not None
              else vicrop_layer(lm.num_layers), "vcd": {"alpha": vcd_alpha, "beta": vcd_beta,
                                                         "noise_step": vcd_noise_step},
              "dola": {"layers": dola_layers(dola_candidates, lm.num_layers), "alpha": dola_alpha,
                       "repetition_penalty": dola_repetition_penalty}}
    config = base_config(lm, dataset, experiment="baselines", seed=seed, decoding=decoding, post_prompt=post_prompt,
                         params=params)

    def per_batch(lm, samples):
        n = len(samples)
        preds = {}
        for m in methods:
            if m == "plain":
                preds[m] = plain(lm, samples, post_prompt=post_prompt, decoding=decoding, batch_size=n)
            elif m == "vicrop":
                preds[m] = vicrop(lm, samples, layer=vicrop_attn_layer, post_prompt=post_prompt, decoding=decoding,
                                  batch_size=n)
            elif m == "vcd":
                preds[m] = vcd(lm, samples, alpha=vcd_alpha, beta=vcd_beta, noise_step=vcd_noise_step,
                               post_prompt=post_prompt, decoding=decoding, seed=seed, batch_size=n)
            else:
                preds[m] = dola(lm, samples, layers=dola_candidates, alpha=dola_alpha,
                                repetition_penalty=dola_repetition_penalty, post_prompt=post_prompt,
                                decoding=decoding, batch_size=n)
        return [{"id": s.id, "family": s.family, "method": m, "pred": preds[m][i], "score": score(dataset, preds[m][i], s)}
                for m in methods for i, s in enumerate(samples)]

    df = run_experiment("baselines", lm, dataset, per_batch, config=config, out=out, batch_size=batch_size,
                        seed=seed, progress=progress)
    return finish("baselines", df, summarize(df), config)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return pd.DataFrame(columns=["method", "n", "accuracy"])
    s = df.groupby("method", sort=False).agg(n=("score", "size"), accuracy=("score", "mean")).reset_index()
    if "plain" in set(s["method"]):
        s["gain"] = s["accuracy"] - float(s.loc[s["method"] == "plain", "accuracy"].iloc[0])
    return s


__all__ = ["plain", "vicrop", "vicrop_boxes", "vicrop_layer", "relative_attention", "diffusion_noise", "vcd",
           "dola", "dola_layers", "dola_contrast", "baselines", "summarize", "METHODS"]
