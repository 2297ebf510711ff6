"""Contrastive attention (paper Sec. 5): where the final layer looks *beyond* what an early layer already looked at.

For one sample, ``A_i`` is the head-mean, renormalised attention of the last prompt token to the image tokens at
layer ``i``. The post map is the final layer's, ``A_post = A_k``; the pre layer is the candidate layer whose map is
furthest from it in Hellinger distance, ``i* = argmax_{i in C} H(A_i, A_k)``, ``H(P, Q) = (1/√2)·‖√P − √Q‖₂``; the
contrast ``I_A = A_k − A_i*`` cancels the attention every layer gives regardless of the question (sinks, the
"persistent noise") and keeps what the deep layers added.

Two ways to use ``I_A``:

- ``soft`` (arXiv v1): scale the hidden states of the image tokens whose ``I_A`` lies below its ρ-quantile by λ at
  the input of one late layer (``apply_layer``, the review layer where a model has one) and answer again.
- ``crop`` (CVPR version): crop the high-``I_A`` region of the image and answer with ``[original, crop]`` as a
  two-image prompt.

Cost of the soft variant (``method="reuse"``, the default): the first pass (prefill with attention capture) already
computed everything below ``apply_layer``, and nothing there depends on the scaling. The second pass keeps the
first pass's KV cache of layers ``< apply_layer`` and the recorded input of ``apply_layer``, recomputes only layers
``>= apply_layer`` over the prompt (scaling applied), and hands the combined cache to ``generate``, which continues
decoding from it. ``method="naive"`` runs two full passes; both give the same answers (tested on all six
architectures).
"""
from __future__ import annotations

import copy
import math
from collections import deque
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..engine import CaptureAttention, ScaleImage, check_layer, intervene
from ..engine.replay import (continue_generate, fork_cache, language_model_cache, last_logits_only, record_inputs,
                             reusable, rope_state, run_layers, head)
from ..metrics import hellinger as _hellinger
from ..prompts import POST_PROMPT
from .common import (Decoding, base_config, decode_new, finish, generate, post_prompt_for, run_experiment,
                     score)

CANDIDATE_KINDS = ("fusion", "shallow", "deep", "all")
VARIANTS = ("soft", "crop")


# --- the contrast ---------------------------------------------------------------------------------------------------

def candidate_layers(kind, n_layers: int, fusion_layers: Sequence[int] | None = None, post: int = -1) -> list[int]:
    """Candidate pre layers (0-based decoder layer indices), never including the post layer.

    ``"fusion"``: the given ``fusion_layers`` (required); ``"shallow"``: layers < L/2 (paper: < 16 of 32);
    ``"deep"``: layers > L/2 + 1 (paper: > 17 of 32); ``"all"``: every layer but the post layer. An explicit list of
    layers is returned validated.
    """
    L = int(n_layers)
    post = check_layer(post, L)
    if not isinstance(kind, str):
        layers = [check_layer(int(j), L) for j in kind]
    elif kind == "fusion":
        if fusion_layers is None or len(fusion_layers) == 0:
            raise ValueError("candidates='fusion' needs fusion_layers (e.g. from the masking sweep: the layers whose "
                             "masking costs the most accuracy).")
        layers = [check_layer(int(j), L) for j in fusion_layers]
    elif kind == "shallow":
        layers = [j for j in range(L) if j < L / 2]
    elif kind == "deep":
        layers = [j for j in range(L) if j > L / 2 + 1]
    elif kind == "all":
        layers = list(range(L))
    else:
        raise ValueError(f"Unknown candidate set {kind!r}; use one of {', '.join(CANDIDATE_KINDS)} or a list of layers.")
    layers = sorted({j for j in layers if j != post})
    if not layers:
        raise ValueError(f"Candidate set {kind!r} is empty for a {L}-layer model once the post layer {post} is "
                         "excluded.")
    return layers


def contrastive_map(maps: torch.Tensor, candidates: Sequence[int], post: int = -1) -> dict:
    """Contrast of one sample's maps ``[L, N]`` (head mean, renormalised over its N image tokens).

    Returns ``{"pre": i*, "post": k, "I_A": float32 [N] = A_post − A_pre, "hellinger": {layer: H(A_layer, A_post)}}``.
    """
    maps = torch.as_tensor(maps).float()
    L = maps.shape[0]
    post = check_layer(post, L)
    cands = [check_layer(int(j), L) for j in candidates if check_layer(int(j), L) != post]
    if not cands:
        raise ValueError("contrastive_map needs at least one candidate layer other than the post layer.")
    a_post = maps[post]
    d = _hellinger(maps[cands], a_post[None].expand(len(cands), -1), axis=-1)
    d = torch.nan_to_num(d, nan=-1.0)
    hell = {j: float(v) for j, v in zip(cands, d.tolist())}
    pre = cands[int(torch.argmax(d))]  # first maximum: ties go to the earliest candidate
    return {"pre": pre, "post": post, "I_A": (a_post - maps[pre]).float(), "hellinger": hell}


def soft_mask_tokens(I_A: torch.Tensor, rho: float) -> torch.Tensor:
    """bool [N]: image tokens whose ``I_A`` lies strictly below its ρ-quantile (those are scaled by λ)."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError("rho must be a fraction in [0, 1].")
    v = torch.as_tensor(I_A).float()
    if rho == 0.0:
        return torch.zeros(v.shape, dtype=torch.bool, device=v.device)
    q = torch.quantile(v, float(rho))
    return v < q


def crop_box(values, grid, image_size, frac: float = 0.1, min_side: float = 0.25, pad: int = 1) -> tuple:
    """Pixel box ``(left, top, right, bottom)`` around the high-value region of per-token ``values``.

    ``values``: one value per image token of the image ``grid`` describes (``I_A``, or ViCrop's relative attention).
    On the grid's primary view: take the top ``frac`` of the cells with positive value, keep the 4-connected
    component that holds the peak, take its bounding box, pad it by ``pad`` cells, widen each side to at least
    ``min_side`` of the image's, and map cells to pixels through the view's ``extent`` (the part of the image the grid
    shows: all of it, or LLaVA-1.5's centre square of a non-square image), clipped to the image.
    ``image_size``: ``(width, height)`` as PIL's ``Image.size``. Deterministic; always inside the image.
    """
    if not grid.spatial:
        raise ValueError("This image's tokens have no spatial grid (InstructBLIP's Q-Former queries); cropping needs "
                         "a spatial layout -- use the soft-mask variant.")
    W, H = int(image_size[0]), int(image_size[1])
    view = grid.primary
    v = np.asarray(values.detach().float().cpu() if torch.is_tensor(values) else values, dtype=np.float64)
    m = view.to_map(v)
    m = np.where(np.isfinite(m), m, -np.inf)
    rows, cols = m.shape
    peak = np.unravel_index(int(np.argmax(m)), m.shape)  # first maximum in row-major order
    pos = m[m > 0]
    if pos.size:
        k = max(1, int(math.ceil(frac * m.size)))
        thr = np.sort(pos)[::-1][min(k, pos.size) - 1]
        high = m >= thr
    else:
        high = np.zeros_like(m, dtype=bool)
    high[peak] = True
    comp = _component(high, peak)
    rr, cc = np.nonzero(comp)
    r0, r1 = max(0, rr.min() - pad), min(rows, rr.max() + 1 + pad)
    c0, c1 = max(0, cc.min() - pad), min(cols, cc.max() + 1 + pad)
    ex0, ey0, ex1, ey1 = view.extent

    def px(k, n, lo, hi, size):  # grid line k of n -> pixel, clipped to the image
        return min(size, max(0.0, (lo + (hi - lo) * k / n) * size))

    left, right = _widen(px(c0, cols, ex0, ex1, W), px(c1, cols, ex0, ex1, W), min_side * W, W)
    top, bottom = _widen(px(r0, rows, ey0, ey1, H), px(r1, rows, ey0, ey1, H), min_side * H, H)
    box = (int(math.floor(left)), int(math.floor(top)), int(math.ceil(right)), int(math.ceil(bottom)))
    box = (max(0, box[0]), max(0, box[1]), min(W, max(box[2], box[0] + 1)), min(H, max(box[3], box[1] + 1)))
    return box


def _component(mask: np.ndarray, seed) -> np.ndarray:
    out = np.zeros_like(mask, dtype=bool)
    q = deque([tuple(int(x) for x in seed)])
    out[q[0]] = True
    R, C = mask.shape
    while q:
        r, c = q.popleft()
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            a, b = r + dr, c + dc
            if 0 <= a < R and 0 <= b < C and mask[a, b] and not out[a, b]:
                out[a, b] = True
                q.append((a, b))
    return out


def _widen(lo: float, hi: float, min_len: float, size: float) -> tuple[float, float]:
    if hi - lo < min_len:
        mid = 0.5 * (lo + hi)
        lo, hi = mid - min_len / 2, mid + min_len / 2
        if lo < 0:
            lo, hi = 0.0, min_len
        if hi > size:
            lo, hi = size - min_len, size
    return max(0.0, lo), min(float(size), hi)


def default_apply_layer(n_layers: int) -> int:
    """Layer 28 of 32 (0-based; the paper's review dip is "near layer 29"), scaled to the model's depth."""
    return int(min(n_layers - 1, max(1, round(28 / 32 * n_layers))))


# --- the first pass -------------------------------------------------------------------------------------------------

class FirstPass:
    """Prefill with attention capture; optionally keeps the KV cache and the recorded input of one layer."""

    def __init__(self, maps, cache, layer_input, rope):
        self.maps, self.cache, self.layer_input, self.rope = maps, cache, layer_input, rope


@torch.no_grad()
def first_pass(lm, batch, record_layer: int | None = None, keep_cache: bool = False) -> FirstPass:
    """Prefill with attention capture; with ``record_layer``, also what layers ``record_layer``.. received."""
    layers = range(record_layer, lm.num_layers) if record_layer is not None else ()
    with record_inputs(lm, layers) as rec, intervene(lm, batch, CaptureAttention()) as run:
        out = lm.model(**batch.inputs, use_cache=keep_cache, **last_logits_only(lm))
    cache = language_model_cache(out) if keep_cache else None
    return FirstPass(run.attention, cache, rec if record_layer is not None else None, rope_state(lm))


def _resolve_candidates(candidates, lm, fusion_layers, post) -> list[int]:
    return candidate_layers(candidates, lm.num_layers, fusion_layers, post)


# --- the soft variant's second pass ---------------------------------------------------------------------------------

@torch.no_grad()
def soft_generate_reuse(lm, batch, p1: FirstPass, apply_layer: int, factor: float, masks, decoding: Decoding,
                         return_logits: bool = False):
    cache = fork_cache(p1.cache, apply_layer)
    rec = p1.layer_input
    with intervene(lm, batch, ScaleImage(apply_layer, factor, masks)):  # layers below apply_layer: the first pass's
        hidden = run_layers(lm, rec, apply_layer, rec.hidden(apply_layer), cache)
    logits = head(lm, hidden[:, -1:, :]).to(lm.dtype)  # as the model's own forward with logits_to_keep=1
    out = continue_generate(lm, batch, cache, logits, decoding.kwargs(lm.processor.tokenizer), p1.rope)
    texts = decode_new(lm, batch, out)
    return (texts, logits[:, -1].float()) if return_logits else texts


@torch.no_grad()
def soft_generate(lm, batch, apply_layer: int, factor: float, masks, decoding: Decoding | None = None, *,
                  method: str = "reuse", first_pass: FirstPass | None = None) -> list[str]:
    """Answers with the image tokens chosen by ``masks`` (per sample, bool over its image tokens) scaled by
    ``factor`` at the input of ``apply_layer``. ``method="reuse"`` continues from a first pass's cache (run here if
    not given); ``"naive"`` is one full generate with the `ScaleImage` plan installed."""
    decoding = decoding or Decoding()
    apply_layer = check_layer(apply_layer, lm.num_layers)
    if method not in ("reuse", "naive"):
        raise ValueError("method must be 'reuse' or 'naive'.")
    if method == "reuse":
        if first_pass is None or first_pass.cache is None or first_pass.layer_input is None:
            first_pass = first_pass(lm, batch, record_layer=apply_layer, keep_cache=True)
        if reusable(first_pass.cache):
            return soft_generate_reuse(lm, batch, first_pass, apply_layer, factor, masks, decoding)
        # other cache types (sliding-window, static, quantised) fall back to the naive path explicitly
    return generate(lm, batch, [ScaleImage(apply_layer, factor, masks)], decoding)


# --- answering ------------------------------------------------------------------------------------------------------

def crop_images(samples, boxes):
    """Per sample, ``[original, its crop to box]``: the two images of a crop method's second pass."""
    return [[s.image, s.image.convert("RGB").crop(tuple(box))] for s, box in zip(samples, boxes)]


@torch.no_grad()
def contrastive_answer(lm, samples, *, variant: str = "soft", candidates="fusion",
                       fusion_layers: Sequence[int] | None = None, rho: float = 0.2, lam: float = 0.1,
                       apply_layer: int | None = None, decoding: Decoding | None = None,
                       post_prompt: str | None = POST_PROMPT, post: int = -1, method: str = "reuse",
                       frac: float = 0.1, min_side: float = 0.25) -> list[dict]:
    """Contrastive-attention answers for ``samples`` (one batch).

    Per sample: ``answer``, ``pre_layer``, ``I_A`` (list over the image tokens), ``hellinger`` ({layer: distance})
    and the ``mask`` (soft: tokens scaled) or ``crop_box`` (crop). ``apply_layer`` defaults to
    `default_apply_layer` (layer 28 of 32); ``method="naive"`` runs the soft variant's second pass as a full pass.
    """
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}; use 'soft' or 'crop'.")
    samples = list(samples)
    decoding = decoding or Decoding()
    L = lm.num_layers
    cands = _resolve_candidates(candidates, lm, fusion_layers, post)
    apply_layer = check_layer(default_apply_layer(L) if apply_layer is None else apply_layer, L)
    batch = lm.prepare(samples, post_prompt=post_prompt)
    if variant == "crop":
        for b, s in enumerate(samples):
            if not batch.grids[b][0].spatial:
                raise ValueError(f"{lm.spec.label}'s image tokens have no spatial grid; use the soft-mask variant.")
    soft = variant == "soft"
    p1 = first_pass(lm, batch, record_layer=apply_layer if soft and method == "reuse" else None,
                     keep_cache=soft and method == "reuse")
    contrasts = [contrastive_map(p1.maps.sample(b), cands, post) for b in range(batch.size)]
    out = [{"pre_layer": c["pre"], "I_A": c["I_A"].cpu().tolist(), "hellinger": c["hellinger"]} for c in contrasts]
    if soft:
        masks = [soft_mask_tokens(c["I_A"], rho) for c in contrasts]
        answers = soft_generate(lm, batch, apply_layer, lam, masks, decoding, method=method, first_pass=p1)
        for o, m in zip(out, masks):
            o["mask"] = m.cpu().tolist()
    else:
        boxes = [crop_box(c["I_A"], batch.grids[b][0], s.image.size, frac=frac, min_side=min_side)
                 for b, (c, s) in enumerate(zip(contrasts, samples))]
        crop_batch = lm.prepare(samples, post_prompt=post_prompt, images=crop_images(samples, boxes))
        answers = generate(lm, crop_batch, (), decoding)
        for o, box in zip(out, boxes):
            o["crop_box"] = list(box)
    for o, a in zip(out, answers):
        o["answer"] = a
    return out


@torch.no_grad()
def contrastive_views(lm, samples, candidates="fusion", fusion_layers: Sequence[int] | None = None, post: int = -1,
                      post_prompt: str | None = POST_PROMPT) -> list[dict]:
    """For figures: per sample, ``A_pre``, ``A_post`` and ``I_A`` as 2-D arrays on the primary view of its image
    (rows x cols), with the pre / post layer indices, the Hellinger distances and the image."""
    samples = list(samples)
    cands = _resolve_candidates(candidates, lm, fusion_layers, post)
    batch = lm.prepare(samples, post_prompt=post_prompt)
    p1 = first_pass(lm, batch)
    out = []
    for b, s in enumerate(samples):
        maps = p1.maps.sample(b).cpu()
        c = contrastive_map(maps, cands, post)
        view = batch.grids[b][0].primary
        out.append({"pre": c["pre"], "post": c["post"], "A_pre": view.to_map(maps[c["pre"]].numpy()),
                    "A_post": view.to_map(maps[c["post"]].numpy()), "I_A": view.to_map(c["I_A"].numpy()),
                    "hellinger": c["hellinger"], "image": s.image, "spatial": view.spatial,
                    "extent": view.extent})
    return out


# --- the experiment -------------------------------------------------------------------------------------------------

def _relevance_masses(grid, relevant, I_A: torch.Tensor, a_post: torch.Tensor) -> dict:
    rel = grid.relevance(relevant)
    if rel is None:
        return {}
    on = np.isfinite(rel)
    r = np.where(on, rel, 0.0)
    ia = np.clip(I_A.cpu().numpy().astype(np.float64), 0.0, None) * on
    ap = np.clip(a_post.cpu().numpy().astype(np.float64), 0.0, None) * on
    return {"ia_relevant_mass": float((ia * r).sum() / ia.sum()) if ia.sum() > 0 else float("nan"),
            "post_relevant_mass": float((ap * r).sum() / ap.sum()) if ap.sum() > 0 else float("nan"),
            "relevant_area": float(r[on].mean()) if on.any() else float("nan")}


def contrastive(lm, dataset, *, fusion_layers: Sequence[int] | None, apply_layer: int | None,
                variants: Sequence[str] = VARIANTS, candidates: Sequence = ("fusion",), rhos: Sequence[float] = (0.2,),
                lams: Sequence[float] = (0.1,), out: str | None = None, batch_size: int = 8, seed: int = 0,
                decoding: Decoding | None = None, post: int = -1, method: str = "reuse", frac: float = 0.1,
                min_side: float = 0.25, progress: bool = True):
    """Accuracy with and without contrastive attention, per variant and ablation setting.

    Settings: soft = candidates x ρ x λ; crop = candidates (ρ and λ do not apply; recorded as None). Records (one
    per sample per setting): id, family, variant, candidates, rho, lam, pre_layer, pred, score, plain_pred,
    plain_score, plus, where the sample has a ``relevant`` mask, the share of I_A's positive mass and of A_post's
    mass on relevant tokens (``ia_relevant_mass``, ``post_relevant_mass``; ``relevant_area`` is the chance level).
    Summary: accuracy per setting, the plain accuracy on the same samples and the gain.
    """
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"Unknown variant {v!r}; use 'soft' and/or 'crop'.")
    decoding = decoding or Decoding()
    post_prompt = post_prompt_for(dataset)
    L = lm.num_layers
    apply_layer = check_layer(default_apply_layer(L) if apply_layer is None else apply_layer, L)
    cand_sets = {(c if isinstance(c, str) else ",".join(map(str, c))): candidate_layers(c, L, fusion_layers, post)
                 for c in candidates}
    if "crop" in variants and lm.spec.grid == "none":
        raise ValueError(f"{lm.spec.label}'s image tokens have no spatial grid; the crop variant needs one -- use "
                         "variants=('soft',).")
    params = {"fusion_layers": None if fusion_layers is None else [int(j) for j in fusion_layers],
              "apply_layer": apply_layer, "variants": list(variants), "candidates": cand_sets,
              "rhos": [float(r) for r in rhos], "lams": [float(x) for x in lams], "post": post,
              "frac": frac, "min_side": min_side}
    config = base_config(lm, dataset, experiment="contrastive", seed=seed, decoding=decoding,
                         post_prompt=post_prompt, params=params)

    def per_batch(lm, samples):
        batch = lm.prepare(samples, post_prompt=post_prompt)
        plain = generate(lm, batch, (), decoding)
        soft = "soft" in variants
        p1 = first_pass(lm, batch, record_layer=apply_layer if soft and method == "reuse" else None,
                         keep_cache=soft and method == "reuse")
        records = []
        for cname, cands in cand_sets.items():
            cons = [contrastive_map(p1.maps.sample(b), cands, post) for b in range(batch.size)]
            extra = []
            for b, (s, c) in enumerate(zip(samples, cons)):
                a_post = p1.maps.sample(b)[c["post"]]
                extra.append(_relevance_masses(batch.grids[b][0], s.relevant, c["I_A"], a_post))
            settings = []
            if soft:
                for rho in rhos:
                    masks = [soft_mask_tokens(c["I_A"], rho) for c in cons]
                    for lam in lams:
                        preds = soft_generate(lm, batch, apply_layer, lam, masks, decoding, method=method,
                                              first_pass=p1)
                        settings.append(("soft", float(rho), float(lam), preds))
            if "crop" in variants:
                boxes = [crop_box(c["I_A"], batch.grids[b][0], s.image.size, frac=frac, min_side=min_side)
                         for b, (c, s) in enumerate(zip(cons, samples))]
                cb = lm.prepare(samples, post_prompt=post_prompt, images=crop_images(samples, boxes))
                settings.append(("crop", None, None, generate(lm, cb, (), decoding)))
            for variant, rho, lam, preds in settings:
                for b, s in enumerate(samples):
                    records.append({"id": s.id, "family": s.family, "variant": variant, "candidates": cname,
                                    "rho": rho, "lam": lam, "pre_layer": cons[b]["pre"], "pred": preds[b],
                                    "score": score(dataset, preds[b], s), "plain_pred": plain[b],
                                    "plain_score": score(dataset, plain[b], s), **extra[b]})
        return records

    df = run_experiment("contrastive", lm, dataset, per_batch, config=config, out=out, batch_size=batch_size,
                        seed=seed, progress=progress)
    return finish("contrastive", df, summarize(df), config)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per (variant, candidates, ρ, λ), with the plain accuracy on the same samples and the gain."""
    if df.empty:
        return pd.DataFrame(columns=["variant", "candidates", "rho", "lam", "n", "accuracy", "plain_accuracy", "gain"])
    keys = ["variant", "candidates", "rho", "lam"]
    d = df.copy()
    for k in ("rho", "lam"):
        d[k] = d[k].astype(object).where(d[k].notna(), "-")
    agg = {"n": ("score", "size"), "accuracy": ("score", "mean"), "plain_accuracy": ("plain_score", "mean")}
    for col in ("ia_relevant_mass", "post_relevant_mass", "relevant_area"):
        if col in d.columns:
            agg[col] = (col, "mean")
    s = d.groupby(keys, sort=False, dropna=False).agg(**agg).reset_index()
    s["gain"] = s["accuracy"] - s["plain_accuracy"]
    for k in ("rho", "lam"):
        s[k] = s[k].where(s[k] != "-", None)
    return s


__all__ = ["candidate_layers", "contrastive_map", "soft_mask_tokens", "crop_box", "default_apply_layer",
           "contrastive_answer", "soft_generate", "contrastive_views", "contrastive", "summarize"]
