"""Contrastive attention (paper Sec. 5): where the final layer looks *beyond* what an early layer already looked at.

For one sample, ``A_i`` is the head-mean, renormalised attention of the last prompt token to the image tokens at
layer ``i``. The post map is the final layer's, ``A_post = A_k``; the pre layer is the candidate layer whose map is
furthest from it in Hellinger distance, ``i* = argmax_{i in C} H(A_i, A_k)``, ``H(P, Q) = (1/√2)·‖√P − √Q‖₂``; the
contrast ``I_A = A_k − A_i*`` cancels the attention every layer gives regardless of the question (sinks, the
"persistent noise") and keeps what the deep layers added.

Two ways to use ``I_A``:

- ``soft`` (arXiv v1): softly mask the image tokens whose ``I_A`` lies below its ρ-quantile at one late layer
  (``apply_layer``, the review layer where a model has one) and answer again. By default the mask acts on attention
  (`ScaleAttention`: the text queries' weights on those keys scaled by λ); ``soft_mask="hidden_state"`` scales their
  hidden states at the layer's input instead, which on pre-RMSNorm decoders reaches only the layers after it.
- ``crop`` (CVPR version): crop the high-``I_A`` region of the image and answer with ``[original, crop]`` as a
  two-image prompt.

Cost of the soft variant (``method="reuse"``, the default): the first pass (prefill with attention capture) already
computed everything below ``apply_layer``, and nothing there depends on the mask. The second pass keeps the
first pass's KV cache of layers ``< apply_layer`` and the recorded input of ``apply_layer``, recomputes only layers
``>= apply_layer``, and there only the text after the image (the mask changes what text reads from the image, so
the positions before that text keep the first pass's keys and values at every layer), and hands the combined cache
to ``generate``, which continues decoding from it (mask still applied). ``method="naive"`` runs two full passes;
both give the same answers (tested on all six architectures).
"""
from __future__ import annotations

from dataclasses import dataclass

import time
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..engine import CaptureAttention, ScaleAttention, ScaleImage, check_layer, intervene
from ..engine.replay import (continue_generate, fork_cache, head, language_model_cache, last_logits_only,
                             record_inputs, reusable, rope_state, run_layers, text_after_image_start)
from ..methods import (CANDIDATE_SETS, candidate_layers, contrastive_map, crop_images, default_apply_layer,
                       peak_crop_box, soft_mask_tokens)
from ..prompts import POST_PROMPT
from .common import Decoding, accuracy_by, decode_new, generate, gold_logprobs, gold_token_ids, scorer_of
from .harness import Context, Spec, register, run

VARIANTS = ("soft", "crop")


def crop_box(values, grid, image_size, frac: float = 0.1, min_side: float = 0.25, pad: int = 1) -> tuple:
    """The paper-variant crop box (`methods.peak_crop_box`) of per-token ``values`` (``I_A``) on the primary view of
    the image ``grid`` describes, mapped to pixels through the view's extent. ``image_size``: ``(width, height)``."""
    if not grid.spatial:
        raise ValueError("This image's tokens have no spatial grid (InstructBLIP's Q-Former queries); cropping needs "
                         "a spatial layout -- use the soft-mask variant.")
    view = grid.primary
    return peak_crop_box(view.to_map(values), image_size, extent=view.extent, frac=frac, min_side=min_side, pad=pad)


# --- the first pass -------------------------------------------------------------------------------------------------

SOFT_MASKS = ("attention", "hidden_state")


class FirstPass:
    """Prefill with attention capture: the maps, the plain last-position logits, and optionally the KV cache and
    what each layer from one on received (for the soft variant's second pass)."""

    def __init__(self, maps, logits, cache, layer_input, rope):
        self.maps, self.logits, self.cache, self.layer_input, self.rope = maps, logits, cache, layer_input, rope


@torch.no_grad()
def capture_first_pass(lm, batch, record_layer: int | None = None, keep_cache: bool = False) -> FirstPass:
    """Prefill with attention capture; with ``record_layer``, also what layers ``record_layer``.. received."""
    layers = range(record_layer, lm.num_layers) if record_layer is not None else ()
    with record_inputs(lm, layers) as rec, intervene(lm, batch, CaptureAttention()) as run:
        out = lm.model(**batch.inputs, use_cache=keep_cache, **last_logits_only(lm))
    cache = language_model_cache(out) if keep_cache else None
    return FirstPass(run.attention, out.logits[:, -1].float(), cache, rec if record_layer is not None else None,
                     rope_state(lm))


def _resolve_candidates(candidates, lm, fusion_layers, post) -> list[int]:
    return candidate_layers(candidates, lm.num_layers, fusion_layers, post)


# --- the soft variant's second pass ---------------------------------------------------------------------------------

def soft_mask_plan(apply_layer: int, factor: float, masks, soft_mask: str = "attention"):
    """The plan that softly masks the chosen image tokens at ``apply_layer``.

    ``"attention"`` (default): `ScaleAttention` -- the text queries' attention to those image keys is scaled by λ
    at that layer (renormalised), so the layer itself reads less of them; it acts at any layer, the last included.
    ``"hidden_state"``: `ScaleImage` -- their hidden states are scaled by λ at the layer's input. On pre-RMSNorm
    decoders (Llama, Qwen) that layer's keys and values do not change (RMSNorm(λh) = RMSNorm(h)); only later layers
    see the edit, so at the last layer it changes nothing."""
    if soft_mask == "attention":
        return ScaleAttention(apply_layer, factor, masks)
    if soft_mask == "hidden_state":
        return ScaleImage(apply_layer, factor, masks)
    raise ValueError(f"Unknown soft mask {soft_mask!r}; use one of {', '.join(SOFT_MASKS)}.")


@torch.no_grad()
def soft_generate_reuse(lm, batch, p1: FirstPass, apply_layer: int, factor: float, masks, decoding: Decoding,
                        return_logits: bool = False, soft_mask: str = "attention"):
    # layers below apply_layer are the first pass's; the plan acts from there on, and in every generated step.
    # The attention mask changes only what text after the image reads: the positions before that text keep the first
    # pass's keys and values at every layer, so only the question rows are recomputed. The hidden-state mask changes
    # the image positions themselves, so it reruns the whole prompt.
    P = text_after_image_start(batch.image_mask, batch.inputs.get("attention_mask")) if soft_mask == "attention" else 0
    cache = fork_cache(p1.cache, apply_layer, prefix=P)
    rec = p1.layer_input
    with intervene(lm, batch, soft_mask_plan(apply_layer, factor, masks, soft_mask)):
        hidden = run_layers(lm, rec, apply_layer, rec.hidden(apply_layer)[:, P:], cache, first=P)
        logits = head(lm, hidden[:, -1:, :]).to(lm.dtype)  # as the model's own forward with logits_to_keep=1
        out = continue_generate(lm, batch, cache, logits, decoding.kwargs(lm.processor.tokenizer), p1.rope)
    texts = decode_new(lm, batch, out)
    return (texts, logits[:, -1].float()) if return_logits else texts


@torch.no_grad()
def soft_generate(lm, batch, apply_layer: int, factor: float, masks, decoding: Decoding | None = None, *,
                  method: str = "reuse", first_pass: FirstPass | None = None, soft_mask: str = "attention",
                  return_logits: bool = False):
    """Answers with the image tokens chosen by ``masks`` (per sample, bool over its image tokens) softly masked by
    ``factor`` at ``apply_layer`` (`soft_mask_plan`). ``method="reuse"`` continues from a first pass's cache (run
    here if not given); ``"naive"`` is one full generate with the plan installed. ``return_logits``: also the
    last-position logits under the mask (float32 [batch, vocab])."""
    decoding = decoding or Decoding()
    apply_layer = check_layer(apply_layer, lm.num_layers)
    plan = soft_mask_plan(apply_layer, factor, masks, soft_mask)
    if method not in ("reuse", "naive"):
        raise ValueError("method must be 'reuse' or 'naive'.")
    if method == "reuse":
        p1 = first_pass
        if p1 is None or p1.cache is None or p1.layer_input is None:
            p1 = capture_first_pass(lm, batch, record_layer=apply_layer, keep_cache=True)
        if reusable(p1.cache):
            return soft_generate_reuse(lm, batch, p1, apply_layer, factor, masks, decoding, return_logits,
                                       soft_mask)
        # other cache types (sliding-window, static, quantised) fall back to the naive path explicitly
    texts = generate(lm, batch, [plan], decoding)
    if not return_logits:
        return texts
    with intervene(lm, batch, plan):
        logits = lm.model(**batch.inputs, **last_logits_only(lm)).logits[:, -1].float()
    return texts, logits


# --- answering ------------------------------------------------------------------------------------------------------

@torch.no_grad()
def contrastive_answer(lm, samples, *, variant: str = "soft", candidates="fusion",
                       fusion_layers: Sequence[int] | None = None, rho: float = 0.2, lam: float = 0.1,
                       apply_layer: int | None = None, decoding: Decoding | None = None,
                       post_prompt: str | None = POST_PROMPT, post: int = -1, method: str = "reuse",
                       frac: float = 0.1, min_side: float = 0.25, soft_mask: str = "attention") -> list[dict]:
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
    p1 = capture_first_pass(lm, batch, record_layer=apply_layer if soft and method == "reuse" else None,
                             keep_cache=soft and method == "reuse")
    contrasts = [contrastive_map(p1.maps.sample(b), cands, post) for b in range(batch.size)]
    out = [{"pre_layer": c["pre"], "I_A": c["I_A"].cpu().tolist(), "hellinger": c["hellinger"]} for c in contrasts]
    if soft:
        masks = [soft_mask_tokens(c["I_A"], rho) for c in contrasts]
        answers = soft_generate(lm, batch, apply_layer, lam, masks, decoding, method=method, first_pass=p1,
                                soft_mask=soft_mask)
        for o, m in zip(out, masks):
            o["mask"] = m.cpu().tolist()
    else:
        boxes = [crop_box(c["I_A"], batch.grids[b][0], s.image.size, frac=frac, min_side=min_side)
                 for b, (c, s) in enumerate(zip(contrasts, samples))]
        crop_batch = lm.prepare(samples, post_prompt=post_prompt, images=crop_images([s.image for s in samples], boxes))
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
    (views,) = contrastive_views_by_set(lm, samples, [candidates], fusion_layers, post, post_prompt=post_prompt).values()
    return views


def contrastive_views_by_set(lm, samples, candidate_sets: Sequence, fusion_layers: Sequence[int] | None = None,
                             post: int = -1, *, post_prompt: str | None = None) -> dict:
    """`contrastive_views` for several candidate sets from one captured pass (the sets differ only in which layer
    is A_pre): {set: views}, keyed by the set's name, or by its position when it is a list of layers."""
    samples = list(samples)
    cands = {k if isinstance(k, str) else i: _resolve_candidates(k, lm, fusion_layers, post)
             for i, k in enumerate(candidate_sets)}
    batch = lm.prepare(samples, post_prompt=post_prompt)
    p1 = capture_first_pass(lm, batch)
    out: dict = {k: [] for k in cands}
    for b, s in enumerate(samples):
        maps = p1.maps.sample(b).cpu()
        view = batch.grids[b][0].primary
        for k, layers in cands.items():
            c = contrastive_map(maps, layers, post)
            out[k].append({"pre": c["pre"], "post": c["post"], "A_pre": view.to_map(maps[c["pre"]].numpy()),
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


@dataclass(frozen=True)
class ContrastiveParams:
    """``fusion_layers``: the model's fusion layers (the "fusion" candidate set; None: the paper's, scaled);
    ``apply_layer``: the review layer where the soft mask acts (None: the paper's 29 of 32, scaled);
    ``variants``: "soft" and/or "crop"; ``candidates``: candidate sets for A_pre (names of `CANDIDATE_SETS` or
    lists of layers); ``rhos``: shares of image tokens with the lowest I_A to mask; ``lams``: the mask's factor;
    ``post``: the A_post layer; ``method``: "reuse" (continue from the first pass's cache) or "naive";
    ``frac``/``min_side``: the crop box's share of I_A mass and least side; ``soft_mask``: where the mask acts
    (`SOFT_MASKS`)."""

    fusion_layers: Sequence[int] | None = None
    apply_layer: int | None = None
    variants: Sequence[str] = VARIANTS
    candidates: Sequence = ("fusion",)
    rhos: Sequence[float] = (0.2,)
    lams: Sequence[float] = (0.1,)
    post: int = -1
    method: str = "reuse"
    frac: float = 0.1
    min_side: float = 0.25
    soft_mask: str = "attention"


def resolve(lm, dataset, *, fusion_layers: Sequence[int] | None, apply_layer: int | None, variants: Sequence[str],
            candidates: Sequence, rhos: Sequence[float], lams: Sequence[float], post: int, method: str, frac: float,
            min_side: float, soft_mask: str) -> dict:
    """The run's parameters with the model's defaults filled in (apply layer, candidate layers), validated."""
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"Unknown variant {v!r}; use 'soft' and/or 'crop'.")
    if method not in ("reuse", "naive"):
        raise ValueError("method must be 'reuse' or 'naive'.")
    L = lm.num_layers
    apply_layer = check_layer(default_apply_layer(L) if apply_layer is None else apply_layer, L)
    cand_sets = {(c if isinstance(c, str) else ",".join(map(str, c))): candidate_layers(c, L, fusion_layers, post)
                 for c in candidates}
    if "crop" in variants and not lm.spec.spatial:
        raise ValueError(f"{lm.spec.label}'s image tokens have no spatial grid; the crop variant needs one -- use "
                         "variants=('soft',).")
    soft_mask_plan(apply_layer, 1.0, None, soft_mask)  # validates soft_mask before any work
    return {"fusion_layers": None if fusion_layers is None else [int(j) for j in fusion_layers],
            "apply_layer": apply_layer, "variants": list(variants), "candidates": cand_sets,
            "rhos": [float(r) for r in rhos], "lams": [float(x) for x in lams], "post": post,
            "frac": frac, "min_side": min_side, "soft_mask": soft_mask, "method": method}


@torch.no_grad()
def contrastive_batch(lm, samples, ctx: Context, *, apply_layer: int, candidates: dict, variants, rhos, lams,
                      post: int, method: str, frac: float, min_side: float, soft_mask: str) -> list[dict]:
    """Records of one batch: per sample and setting (candidate set x ρ x λ for soft; candidate set for crop), the
    answer with contrastive attention and without. ``candidates``: ``{name: candidate layers}``."""
    decoding = ctx.decoding or Decoding()
    batch = lm.prepare(samples, post_prompt=ctx.post_prompt)
    clock = time.perf_counter()
    plain = generate(lm, batch, (), decoding)
    plain_seconds = (time.perf_counter() - clock) / len(samples)
    soft = "soft" in variants
    clock = time.perf_counter()
    p1 = capture_first_pass(lm, batch, record_layer=apply_layer if soft and method == "reuse" else None,
                            keep_cache=soft and method == "reuse")
    first_seconds = (time.perf_counter() - clock) / len(samples)  # shared by every setting of this batch
    gold = gold_token_ids(lm, samples)  # once per batch: every setting reads the same gold tokens
    plain_gold = gold_logprobs(p1.logits, gold).tolist()
    records = []
    for cname, cands in candidates.items():
        cons = [contrastive_map(p1.maps.sample(b), cands, post) for b in range(batch.size)]
        extra = []
        for b, (s, c) in enumerate(zip(samples, cons)):
            a_post = p1.maps.sample(b)[c["post"]]
            extra.append(_relevance_masses(batch.grids[b][0], s.relevant, c["I_A"], a_post))
        settings = []
        if soft:
            for rho in rhos:
                masks = [soft_mask_tokens(c["I_A"], rho) for c in cons]
                n_masked = [int(m.sum()) for m in masks]
                for lam in lams:
                    clock = time.perf_counter()
                    preds, logits = soft_generate(lm, batch, apply_layer, lam, masks, decoding, method=method,
                                                  first_pass=p1, soft_mask=soft_mask, return_logits=True)
                    seconds = first_seconds + (time.perf_counter() - clock) / len(samples)
                    dlogit = (logits - p1.logits).abs().amax(-1).tolist()
                    settings.append(("soft", float(rho), float(lam), preds,
                                     [{"dlogit": d, "n_masked": k, "seconds": seconds, "gold_logprob": g}
                                      for d, k, g in zip(dlogit, n_masked, gold_logprobs(logits, gold).tolist())]))
        if "crop" in variants:
            clock = time.perf_counter()
            boxes = [crop_box(c["I_A"], batch.grids[b][0], s.image.size, frac=frac, min_side=min_side)
                     for b, (c, s) in enumerate(zip(cons, samples))]
            cb = lm.prepare(samples, post_prompt=ctx.post_prompt,
                            images=crop_images([s.image for s in samples], boxes))
            preds, logits = generate(lm, cb, (), decoding, first_logits=True)
            seconds = first_seconds + (time.perf_counter() - clock) / len(samples)
            settings.append(("crop", None, None, preds, [{"seconds": seconds, "gold_logprob": g}
                                                         for g in gold_logprobs(logits, gold).tolist()]))
        for variant, rho, lam, preds, acted in settings:
            for b, s in enumerate(samples):
                records.append({"id": s.id, "family": s.family, "variant": variant, "candidates": cname,
                                "rho": rho, "lam": lam, "pre_layer": cons[b]["pre"], "pred": preds[b],
                                "score": ctx.score(preds[b], s), "plain_pred": plain[b],
                                "plain_score": ctx.score(plain[b], s), "plain_gold_logprob": plain_gold[b],
                                "plain_seconds": plain_seconds, **acted[b],
                                **extra[b]})
    return records


def contrastive(lm, dataset, *, out: str | None = None, batch_size: int = 8, seed: int = 0,
                decoding: Decoding | None = None, progress: bool = True, **params):
    """Accuracy with and without contrastive attention, per variant and ablation setting (parameters:
    `ContrastiveParams`).

    Settings: soft = candidates x ρ x λ; crop = candidates (ρ and λ do not apply; recorded as None). Records (one
    per sample per setting): id, family, variant, candidates, rho, lam, pre_layer, pred, score, plain_pred,
    plain_score, ``gold_logprob`` and ``plain_gold_logprob`` (the gold answer's first-token log-probability with
    the setting and without it); for soft, ``dlogit`` (largest change of a last-position logit the mask caused: 0
    means the mask did nothing) and ``n_masked`` (image tokens masked); plus, where the sample has a ``relevant`` mask, the share of
    I_A's positive mass and of A_post's mass on relevant tokens (``ia_relevant_mass``, ``post_relevant_mass``;
    ``relevant_area`` is the chance level).
    Summary: accuracy per setting, the plain accuracy on the same samples and the gain.
    """
    return run(SPEC, lm, dataset, out=out, batch_size=batch_size, seed=seed, decoding=decoding, progress=progress,
               **params)


def contrastive_summary(df: pd.DataFrame, ctx=None, scorer: str | None = None) -> pd.DataFrame:
    """Accuracy per (variant, candidates, ρ, λ), with the plain accuracy on the same samples and the gain; both
    accuracies as the benchmark reports them (`common.accuracy_by`: CircularEval on MMBench). ``scorer``: defaults
    to the run's dataset's."""
    if df.empty:
        return pd.DataFrame(columns=["variant", "candidates", "rho", "lam", "n", "accuracy", "plain_accuracy", "gain"])
    keys = ["variant", "candidates", "rho", "lam"]
    d = df.copy()
    for k in ("rho", "lam"):
        d[k] = d[k].astype(object).where(d[k].notna(), "-")
    agg = {"n": ("score", "size")}
    for col in ("ia_relevant_mass", "post_relevant_mass", "relevant_area"):
        if col in d.columns:
            agg[col] = (col, "mean")
    s = d.groupby(keys, sort=False, dropna=False).agg(**agg).reset_index()
    acc = accuracy_by(d, keys, scorer_of(ctx, scorer), {"accuracy": "score", "plain_accuracy": "plain_score"})
    s = s.merge(acc, on=keys, how="left")
    s = s[[*keys, "n", "accuracy", "plain_accuracy", *[c for c in agg if c != "n"]]]
    s["gain"] = s["accuracy"] - s["plain_accuracy"]
    for k in ("rho", "lam"):
        s[k] = s[k].where(s[k] != "-", None)
    return s


__all__ = ["CANDIDATE_SETS", "SOFT_MASKS", "candidate_layers", "contrastive_map", "soft_mask_tokens", "crop_box",
           "default_apply_layer", "soft_mask_plan", "capture_first_pass", "FirstPass", "soft_generate_reuse",
           "contrastive_answer", "soft_generate", "contrastive_views", "contrastive_views_by_set", "contrastive", "contrastive_batch", "contrastive_summary"]


SPEC = register(Spec("contrastive", contrastive_batch, contrastive_summary, resolve, params=ContrastiveParams,
                    per_question=True))
