"""Training-free baselines the paper compares with, on the same prompts and harness as every other experiment.

Each follows its official code; the math lives in `fusion_utils.methods`, whose docstrings name the function
followed.

- ``plain``: greedy answers (`common.answer`).
- ``vicrop`` ("MLLMs know where to look", ICLR 2025, saccharomycetes/mllms_know, relative attention,
  ``rel_attention_llava`` / ``rel_attention_qwen2_5``): the last prompt token's attention to the image at the
  official layer of the architecture (`methods.VICROP_LAYERS`: 14 of 32 for LLaVA-1.5, 22 of 28 for Qwen2.5-VL;
  scaled by relative depth on models of another depth, e.g. 7 of 16 and 13 of 16 on the organisms) under the task
  prompt,
  divided by the same under the generic prompt ``"Write a general description of the image."`` followed by the
  same post-prompt; ViCrop's adaptive window over that map (`methods.vicrop_box`, ``bbox_from_att_image_adaptive``:
  a square of the model's input resolution times 1, 1.2, ..., 2, `vicrop_resolution`), and the answer from
  ``[original, crop]``. Images with a side above 1024 px are tiled as its ``high_res`` does.
- ``vcd`` (visual contrastive decoding, DAMO-NLP-SG/VCD): ``v′`` is the processor's normalised pixel tensor after
  ``add_diffusion_noise`` (sigmoid β schedule, T = 500, √ᾱ ≈ 0.86; seeded per sample), the scores
  ``(1+α)·l(v) − α·l(v′)`` under the cutoff ``l(v) ≥ log β + max l(v)`` (`methods.vcd_logits`, α = 1, β = 0.2
  as the official run script).
  Runs as one ``generate`` over 2B rows (original rows then noised rows) with a logits processor that combines
  rows b and B+b and forces the same token into both.
- ``dola`` (voidism/DoLa ``dola_greedy_decode``): at every step, ``log_softmax(final) − log_softmax(premature)`` after
  the relative-top filter (0.1), the premature layer chosen per sample as the candidate with the largest
  divergence from the final distribution as that code computes it
  (`methods.dola.official_js`) (`methods.dola_contrast`). Candidates are hidden-state
  indices, 0 = the embedding output (`methods.dola_layers`: ``"low"`` = 0, 2, ... below N/2, ``"high"`` = N/2, ...,
  N−2); their logits are ``lm_head(h)`` without the final norm, as in the official code. Greedy.
  ``repetition_penalty`` (default 1.0) is applied to the contrasted scores as in transformers; DoLa recommends 1.2
  for open-ended generation.

- ``cd`` (contrastive decoding, Li et al. 2023; XiangLi1999/ContrastiveDecoding): greedy on
  ``log p_expert − log p_amateur`` over the plausible tokens (``p_expert ≥ 0.1·max``; `methods.cd_scores`). The
  amateur (``cd_amateur``: a model id, directory or ``organism:`` name with the same vocabulary) steps beside the
  expert with its own KV cache (`engine.stepping.Stepper`). On an organism it defaults to the 8-layer organism of the
  same architecture (the 16-layer ones are the book's models; their tokenizers are identical). Departure: greedy,
  where the paper runs beam search (short VQA answers; every other row here is greedy too).
- ``opera`` (shikiw/OPERA ``opera_beam_search``, `experiments.opera`): its defaults (5 beams, 5 candidates, scale
  50, threshold 15, penalty 1). With answers of at most ``max_new_tokens`` = 16 tokens the window never exceeds 16
  columns, so the over-trust rollback (which needs more than 15 identical locations at position ≥ 10) cannot fire
  on VQA answers: the penalty acts through the image-attention term of the first ten tokens.
- VCD samples as its official evaluation does (``vcd_sample``: temperature 1, top-p 1, and transformers' default
  top-k 50, which the official run inherits; seeded per run); set ``vcd_sample=False`` for the greedy variant.

- ``ours``: the paper's contrastive attention (`contrastive.contrastive_answer`; the crop variant of the CVPR
  version where the image has a grid, else the soft mask), with ``ours_fusion_layers`` / ``ours_apply_layer`` as
  the contrastive chapter picks them (the shallow half when no fusion layers are given): in the same run, so the
  "beats the baselines" verdict (`report.baselines`) pairs it with the baselines and one clock times them all.

- ``oracle_crop`` / ``random_crop`` (`experiments.bounds`): not baselines but the bounds the contrastive chapter
  places every method between, read from the question's ground-truth relevant cells (only the world marks them): the
  crop of the relevant cells (upper) and a crop of the same size at a seeded random position (lower). They never
  count as "the best baseline" (`report.baselines.beats_baselines`).

On MMBench (the ``option`` scorer) the summary's ``accuracy`` is CircularEval (lmms-eval's default), with the
per-row accuracy beside it as ``row_accuracy``.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

import pandas as pd
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..engine import CaptureAttention, check_layer, intervene
from ..engine.replay import head, last_logits_only, record_stream
from ..methods import (add_diffusion_noise, attention_ratio, crop_images, dola_contrast, dola_layers, high_res_tiles,
                       merge_tiles, needs_tiling, vcd_logits, vicrop_box, vicrop_layer)
from ..methods.cd import CD_ALPHA, cd_scores
from ..methods.opera import OPERA_DEFAULTS
from ..metrics import benchmark_accuracy
from ..prompts import GENERIC_PROMPT, POST_PROMPT
from .common import Decoding, answer, decode_new, generate
from .harness import Context, Spec, register, run
from .bounds import BOUNDS, oracle_crop, random_crop, require_relevance
from .opera import opera
from ..engine.stepping import Stepper

METHODS = ("plain", "cd", "dola", "opera", "vcd", "vicrop", "ours", *BOUNDS)
DEFAULT_METHODS = ("plain", "vicrop", "vcd", "dola")  # the cheap ones; cd needs an amateur, opera costs 5 beams


def _chunks(samples, n):
    for i in range(0, len(samples), n):
        yield samples[i:i + n]


# --- plain ----------------------------------------------------------------------------------------------------------

def plain(lm, samples, *, post_prompt: str | None = POST_PROMPT, decoding: Decoding | None = None,
          batch_size: int = 8) -> list[str]:
    return answer(lm, list(samples), post_prompt=post_prompt, decoding=decoding, batch_size=batch_size)


# --- ViCrop ---------------------------------------------------------------------------------------------------------

# ViCrop's window for models without a fixed input resolution (its choice for Qwen2.5-VL)
DYNAMIC_RESOLUTION_WINDOW = 224


def vicrop_resolution(lm) -> int:
    """ViCrop's base window side in pixels: the model's input resolution (336 for LLaVA-1.5, ViCrop's
    ``bbox_size``), read from its image processor; `DYNAMIC_RESOLUTION_WINDOW` for processors of dynamic resolution
    (Qwen2-VL), as ViCrop does for Qwen2.5-VL."""
    ip = getattr(lm.processor, "image_processor", None)
    for name in ("crop_size", "size"):
        size = getattr(ip, name, None)
        height = size.get("height") if hasattr(size, "get") else None
        if height:
            return int(height)
    return DYNAMIC_RESOLUTION_WINDOW


@torch.no_grad()
def _last_token_map(lm, batch, layer: int) -> list[torch.Tensor]:
    with intervene(lm, batch, CaptureAttention(layers=[layer])) as run:
        lm.model(**batch.inputs, use_cache=False, **last_logits_only(lm))
    maps = run.attention
    return [maps.sample(b)[0] for b in range(batch.size)]


@torch.no_grad()
def relative_attention(lm, samples, *, layer: int | None = None, post_prompt: str | None = POST_PROMPT,
                       eps: float = 1e-6) -> list[torch.Tensor]:
    """Per sample, float32 [image tokens]: task-prompt attention / generic-prompt attention at ``layer``; both
    prompts end with ``post_prompt``, as in ViCrop's ``rel_attention_llava`` and its run script."""
    samples = list(samples)
    layer = check_layer(vicrop_layer(lm.num_layers, lm.spec.model_type) if layer is None else layer, lm.num_layers)
    task = _last_token_map(lm, lm.prepare(samples, post_prompt=post_prompt), layer)
    generic = _last_token_map(lm, lm.prepare(samples, post_prompt=post_prompt,
                                             questions=[GENERIC_PROMPT] * len(samples)), layer)
    return [attention_ratio(t, g, eps) for t, g in zip(task, generic)]


def vicrop_boxes(lm, samples, *, layer: int | None = None, post_prompt: str | None = POST_PROMPT,
                 eps: float = 1e-6, bbox_size: int | None = None, high_res: bool = True) -> list[tuple]:
    """ViCrop's crop box per sample (pixels): its adaptive window (`methods.vicrop_box`) on the relative attention
    over the image's primary token grid, windows of ``bbox_size`` (default `vicrop_resolution`) times its ratios.
    ``high_res``: an image with a side above 1024 px is tiled as ViCrop's ``high_res`` does
    (`methods.high_res_tiles`), each tile's relative attention computed alone, and the tiles' maps joined
    (`methods.merge_tiles`) over the whole image."""
    samples = list(samples)
    b = lm.prepare(samples, post_prompt=post_prompt)
    for i in range(len(samples)):
        if not b.grids[i][0].spatial:
            raise ValueError(f"{lm.spec.label}'s image tokens have no spatial grid; ViCrop needs one to crop.")
    side = vicrop_resolution(lm) if bbox_size is None else int(bbox_size)
    tiled = [i for i, s in enumerate(samples) if high_res and needs_tiling(s.image.size)]
    small = [i for i in range(len(samples)) if i not in tiled]
    boxes: dict[int, tuple] = {}
    if small:
        rel = relative_attention(lm, [samples[i] for i in small], layer=layer, post_prompt=post_prompt, eps=eps)
        for i, r in zip(small, rel):
            v = b.grids[i][0].primary
            boxes[i] = vicrop_box(v.to_map(r), samples[i].image.size, side, extent=v.extent)
    for i in tiled:
        boxes[i] = vicrop_box(tiled_map(lm, samples[i], layer, post_prompt, eps), samples[i].image.size, side)
    return [boxes[i] for i in range(len(samples))]


def tiled_map(lm, sample, layer, post_prompt, eps) -> np.ndarray:
    """ViCrop's ``high_res``: the relative-attention maps of the image's tiles, joined in place."""
    tile_boxes, rows, cols = high_res_tiles(sample.image.size)
    tiles = [replace(sample, image=sample.image.convert("RGB").crop(bx)) for bx in tile_boxes]
    rel = relative_attention(lm, tiles, layer=layer, post_prompt=post_prompt, eps=eps)
    grids = lm.prepare(tiles, post_prompt=post_prompt).grids
    return merge_tiles([g[0].primary.to_map(r) for g, r in zip(grids, rel)], rows, cols)


def vicrop(lm, samples, *, layer: int | None = None, post_prompt: str | None = POST_PROMPT,
           decoding: Decoding | None = None, eps: float = 1e-6, bbox_size: int | None = None,
           batch_size: int = 8, return_boxes: bool = False, high_res: bool = True):
    """ViCrop's answers (its ``vicrop_qa`` with relative attention): the answer to ``[original, crop]``, the crop
    from `vicrop_boxes`. ``return_boxes``: also the boxes."""
    samples = list(samples)
    preds, boxes = [], []
    for chunk in _chunks(samples, batch_size):
        bx = vicrop_boxes(lm, chunk, layer=layer, post_prompt=post_prompt, eps=eps, bbox_size=bbox_size,
                          high_res=high_res)
        b = lm.prepare(chunk, post_prompt=post_prompt, images=crop_images([s.image for s in chunk], bx))
        preds += generate(lm, b, (), decoding)
        boxes += bx
    return (preds, boxes) if return_boxes else preds


# --- VCD ------------------------------------------------------------------------------------------------------------

def _sample_seed(seed: int, sample) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(str(sample.id).encode())) % (2 ** 32)


def _pixel_rows(inputs, n_images: int) -> list[slice]:
    """Each image's rows of ``pixel_values``: one row (or tile stack) per image, or Qwen2-VL's t·h·w patch rows."""
    pv = inputs["pixel_values"]
    thw = inputs.get("image_grid_thw")
    if thw is not None:
        counts = [int(t) * int(h) * int(w) for t, h, w in thw.tolist()]
    elif pv.shape[0] == n_images:
        counts = [1] * n_images
    else:
        raise ValueError(f"VCD cannot tell which pixel rows belong to which image: pixel_values has {pv.shape[0]} "
                         f"rows for {n_images} images and no image_grid_thw; extend _pixel_rows for this processor.")
    ends = torch.tensor(counts).cumsum(0).tolist()
    return [slice(e - c, e) for c, e in zip(counts, ends)]


def vcd_batch(lm, samples, *, noise_step: int = 500, seed: int = 0, post_prompt: str | None = POST_PROMPT):
    """The 2B-row batch VCD decodes from: rows [0, B) see each sample's image, rows [B, 2B) the same pixel tensor
    after `methods.add_diffusion_noise` at ``noise_step``, seeded per sample (so a sample's noise does not depend
    on its batch)."""
    samples = list(samples)
    B = len(samples)
    batch = lm.prepare(samples + samples, post_prompt=post_prompt)
    pv = batch.inputs["pixel_values"]
    rows = _pixel_rows(batch.inputs, 2 * B)
    for b, s in enumerate(samples):
        clean, noisy = rows[b], rows[B + b]
        if not torch.equal(pv[clean], pv[noisy]):
            raise RuntimeError("VCD: the second copy of a sample's image was processed differently from the first; "
                               "its pixel rows cannot be noised in place.")
        gen = torch.Generator().manual_seed(_sample_seed(seed, s))
        x = pv[noisy]
        # tile by tile ([3, H, W] each), so the noise of a sample's real tiles does not depend on how many padding
        # tiles its batch adds (LLaVA-NeXT)
        tiles = x.reshape(-1, *x.shape[-3:]) if x.dim() >= 4 else x[None]
        pv[noisy] = torch.stack([add_diffusion_noise(t, noise_step, generator=gen) for t in tiles]).reshape(x.shape)
    return batch


# the official run passes --top_k None, so its sampling keeps transformers' generation-config default of 50
VCD_TOP_K = 50


class _VCDProcessor(LogitsProcessor):
    """Rows [0, B) see v, rows [B, 2B) see v′: choose one token per pair from the contrast, force it into both."""

    def __init__(self, B: int, alpha: float, beta: float, do_sample: bool, generator: torch.Generator | None,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = VCD_TOP_K):
        self.B, self.alpha, self.beta = B, float(alpha), float(beta)
        self.do_sample, self.generator = do_sample, generator
        self.temperature, self.top_p, self.top_k = float(temperature), float(top_p), int(top_k)
        self.steps: list[torch.Tensor] = []  # chosen tokens per step (for inspection)

    def __call__(self, input_ids, scores):
        B = self.B
        cd = vcd_logits(scores[:B], scores[B:2 * B], self.alpha, self.beta)
        if self.do_sample:  # transformers' warpers in their order: temperature, top-k, top-p
            cd = cd / self.temperature
            if 0 < self.top_k < cd.shape[-1]:
                cd = cd.masked_fill(cd < torch.topk(cd, self.top_k, dim=-1).values[..., -1:], float("-inf"))
            probs = torch.softmax(cd, dim=-1)
            if self.top_p < 1.0:
                sp, si = probs.sort(dim=-1, descending=True)
                drop = sp.cumsum(-1) - sp > self.top_p
                probs = probs.scatter(-1, si, sp.masked_fill(drop, 0.0))
            tok = torch.multinomial(probs.cpu(), 1, generator=self.generator).to(scores.device).squeeze(-1)
        else:
            tok = cd.argmax(dim=-1)
        self.steps.append(tok)
        out = torch.full_like(scores, float("-inf"))
        rows = torch.arange(B, device=scores.device)
        out[rows, tok] = 0.0
        out[rows + B, tok] = 0.0
        return out


@torch.no_grad()
def vcd(lm, samples, *, alpha: float = 1.0, beta: float = 0.2, noise_step: int = 500,
        post_prompt: str | None = POST_PROMPT, decoding: Decoding | None = None, seed: int = 0,
        batch_size: int = 8) -> list[str]:
    """Visual contrastive decoding as DAMO-NLP-SG/VCD's ``vcd_sample.sample`` with ``add_diffusion_noise``
    (`vcd_batch`, `methods.vcd_logits`); greedy, or sampled (``decoding.do_sample``; seeded by ``seed``, which also
    seeds each sample's noise)."""
    decoding = decoding or Decoding()
    samples = list(samples)
    gen = torch.Generator().manual_seed(int(seed))
    out: list[str] = []
    for chunk in _chunks(samples, batch_size):
        B = len(chunk)
        batch = vcd_batch(lm, chunk, noise_step=noise_step, seed=seed, post_prompt=post_prompt)
        proc = _VCDProcessor(B, alpha, beta, decoding.do_sample, gen, decoding.temperature, decoding.top_p)
        greedy = Decoding(max_new_tokens=decoding.max_new_tokens)  # the processor decides; generate takes argmax
        ids = lm.model.generate(**batch.inputs, **greedy.kwargs(lm.processor.tokenizer),
                                logits_processor=LogitsProcessorList([proc]))
        out += decode_new(lm, batch, ids)[:B]
    return out


# --- DoLa -----------------------------------------------------------------------------------------------------------

def tied_embeddings(lm) -> bool:
    """Whether the language model ties its LM head to its input embeddings (DoLa then skips the embedding output)."""
    return bool(getattr(lm.model.config.get_text_config(), "tie_word_embeddings", False))


class _DoLaProcessor(LogitsProcessor):
    """``captured[j]``: the last position's hidden state of index j (0 = embedding output); ``captured[L]`` the last
    decoder layer's output, whose normed head is the model's own logits."""

    def __init__(self, lm, captured: dict, candidates: list[int], alpha: float, repetition_penalty: float):
        self.lm, self.captured, self.candidates = lm, captured, candidates
        self.alpha, self.penalty = float(alpha), float(repetition_penalty)
        self.premature: list[list[int]] = []  # per step, per row
        self.first_scores: torch.Tensor | None = None

    def __call__(self, input_ids, scores):
        L = self.lm.num_layers
        final = head(self.lm, self.captured[L])
        prem = torch.stack([self.lm.lm_head(self.captured[j]).float() for j in self.candidates])
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
    """DoLa answers (greedy), as voidism/DoLa's ``dola_greedy_decode`` (`methods.dola_contrast`). ``layers``:
    ``"low"``, ``"high"`` or hidden-state indices (0 = the embedding output); ``alpha``: the relative-top filter.
    ``return_details``: also the per-batch processors (premature layers per step, the first step's scores)."""
    decoding = decoding or Decoding()
    if decoding.do_sample:
        raise ValueError("DoLa is implemented for greedy decoding (do_sample=False).")
    cands = dola_layers(layers, lm.num_layers, tied_embeddings(lm))
    L = lm.num_layers
    samples = list(samples)
    out, details = [], []
    for chunk in _chunks(samples, batch_size):
        batch = lm.prepare(chunk, post_prompt=post_prompt)
        # hidden-state index j >= 1 is decoder layer j-1's output; index 0 the embedding output (DoLa's layer 0)
        with record_stream(lm, set(cands) | {L}) as captured:
            proc = _DoLaProcessor(lm, captured, cands, alpha, repetition_penalty)
            ids = lm.model.generate(**batch.inputs, **decoding.kwargs(lm.processor.tokenizer),
                                    logits_processor=LogitsProcessorList([proc]))
        out += decode_new(lm, batch, ids)
        details.append(proc)
    return (out, details) if return_details else out


# --- CD -------------------------------------------------------------------------------------------------------------

AMATEURS: dict = {}  # loaded amateurs by (name, device, dtype): one load per session


def default_amateur(lm) -> str | None:
    """The 8-layer organism of ``lm``'s architecture when ``lm`` is a deeper organism, else None."""
    from ..organism_registry import VARIANTS, resolve_name

    if not str(lm.name).startswith("organism:"):
        return None
    arch = VARIANTS[resolve_name(lm.name)]
    small = f"{arch}-8l"
    return None if resolve_name(lm.name) == small else f"organism:{small}"


def load_amateur(lm, amateur: str):
    """The amateur model, checked to share ``lm``'s vocabulary (CD contrasts the same token ids)."""
    from ..models import load_model

    key = (str(amateur), str(lm.device), str(lm.dtype))
    if key not in AMATEURS:
        AMATEURS[key] = load_model(amateur, device=lm.device, dtype=lm.dtype)
    am = AMATEURS[key]
    if am.processor.tokenizer.get_vocab() != lm.processor.tokenizer.get_vocab():
        raise ValueError(f"CD's amateur {amateur!r} has another vocabulary than {lm.name!r}; pass an amateur with "
                         "the same tokenizer (cd_amateur=...).")
    return am


class _CDProcessor(LogitsProcessor):
    """Steps the amateur beside the expert's ``generate`` and returns CD's scores for the expert to take argmax."""

    def __init__(self, stepper: Stepper, alpha: float, temperature: float):
        self.stepper, self.alpha, self.temperature = stepper, float(alpha), float(temperature)

    def __call__(self, input_ids, scores):
        st = self.stepper
        amateur = st.prefill() if st.cache is None else st.step(input_ids[:, -1].to(st.mask.device))
        return cd_scores(scores, amateur.to(scores.device), self.alpha, self.temperature).to(scores.dtype)


@torch.no_grad()
def cd(lm, samples, *, amateur, alpha: float = CD_ALPHA, amateur_temperature: float = 1.0,
       post_prompt: str | None = POST_PROMPT, decoding: Decoding | None = None, batch_size: int = 8) -> list[str]:
    """Contrastive decoding's answers (greedy on `methods.cd_scores`); ``amateur``: a loaded model or a name."""
    decoding = Decoding(max_new_tokens=(decoding or Decoding()).max_new_tokens)
    am = load_amateur(lm, amateur) if isinstance(amateur, str) else amateur
    out: list[str] = []
    for chunk in _chunks(list(samples), batch_size):
        batch = lm.prepare(chunk, post_prompt=post_prompt)
        proc = _CDProcessor(Stepper(am, am.prepare(chunk, post_prompt=post_prompt)), alpha, amateur_temperature)
        ids = lm.model.generate(**batch.inputs, **decoding.kwargs(lm.processor.tokenizer),
                                logits_processor=LogitsProcessorList([proc]))
        out += decode_new(lm, batch, ids)
    return out


# --- the experiment -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BaselinesParams:
    """``methods``: rows to run (`METHODS`); ``vicrop_*``: ViCrop's attention layer (None: the official one for the
    architecture, scaled by depth) and crop window; ``vcd_*``: VCD's contrast, plausibility cut-off, noise step and
    sampling (its official evaluation samples); ``dola_*``: DoLa's candidate layers, cut-off and repetition penalty;
    ``cd_*``: CD's amateur (a model id or directory with the same tokenizer; None: the 8-layer organism of the same
    architecture), plausibility α and amateur temperature; ``opera_*``: OPERA's beams and candidates; ``ours_*``:
    the paper's method as a row of the same run."""

    methods: Sequence[str] = DEFAULT_METHODS
    vicrop_attn_layer: int | None = None
    vicrop_window: int | None = None
    vcd_alpha: float = 1.0
    vcd_beta: float = 0.2
    vcd_noise_step: int = 500
    vcd_sample: bool = True
    dola_candidates: Any = "low"
    dola_alpha: float = 0.1
    dola_repetition_penalty: float = 1.0
    cd_amateur: str | None = None
    cd_alpha: float = CD_ALPHA
    cd_amateur_temperature: float = 1.0
    opera_beams: int = OPERA_DEFAULTS["num_beams"]
    opera_candidates: int = OPERA_DEFAULTS["num_attn_candidates"]
    ours_variant: str | None = None
    ours_fusion_layers: Sequence[int] | None = None
    ours_apply_layer: int | None = None
    ours_rho: float = 0.2
    ours_lam: float = 0.1


def resolve(lm, dataset, *, methods: Sequence[str], vicrop_attn_layer: int | None, vicrop_window: int | None,
            vcd_alpha: float, vcd_beta: float, vcd_noise_step: int, vcd_sample: bool, dola_candidates,
            dola_alpha: float, dola_repetition_penalty: float, cd_amateur: str | None, cd_alpha: float,
            cd_amateur_temperature: float, opera_beams: int, opera_candidates: int, ours_variant: str | None,
            ours_fusion_layers: Sequence[int] | None, ours_apply_layer: int | None, ours_rho: float,
            ours_lam: float) -> dict:
    methods = list(methods)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"Unknown baseline {m!r}; use some of {', '.join(METHODS)}.")
    if "vicrop" in methods and not lm.spec.spatial:
        raise ValueError(f"{lm.spec.label}'s image tokens have no spatial grid; ViCrop needs one to crop -- drop "
                         "'vicrop' from methods.")
    if set(BOUNDS) & set(methods):
        if not lm.spec.spatial:
            raise ValueError(f"{lm.spec.label}'s image tokens have no spatial grid, so it is given no crops -- drop "
                             "'oracle_crop' and 'random_crop' from methods.")
        require_relevance(list(dataset), f"dataset {getattr(dataset, 'name', 'this dataset')!r}")
    amateur = cd_amateur if cd_amateur is not None else default_amateur(lm)
    if "cd" in methods:
        if amateur is None:
            raise ValueError(f"CD needs an amateur model for {lm.name}: pass --param 'cd_amateur=<model id or dir>' "
                             "(a smaller model with the same tokenizer).")
        load_amateur(lm, amateur)  # fail now, before any sample runs
    return {"methods": methods,
            "vicrop_attn_layer": (vicrop_attn_layer if vicrop_attn_layer is not None
                                  else vicrop_layer(lm.num_layers, lm.spec.model_type)),
            "vicrop_window": vicrop_resolution(lm) if vicrop_window is None else int(vicrop_window),
            "vcd_alpha": vcd_alpha, "vcd_beta": vcd_beta, "vcd_noise_step": vcd_noise_step, "vcd_sample": vcd_sample,
            "dola_candidates": dola_layers(dola_candidates, lm.num_layers, tied_embeddings(lm)),
            "dola_alpha": dola_alpha, "dola_repetition_penalty": dola_repetition_penalty,
            "cd_amateur": amateur if "cd" in methods else None, "cd_alpha": cd_alpha,
            "cd_amateur_temperature": cd_amateur_temperature, "opera_beams": int(opera_beams),
            "opera_candidates": int(opera_candidates),
            "ours_variant": ours_variant or ("crop" if lm.spec.spatial else "soft"),
            "ours_fusion_layers": None if ours_fusion_layers is None else [int(j) for j in ours_fusion_layers],
            "ours_apply_layer": ours_apply_layer, "ours_rho": ours_rho, "ours_lam": ours_lam}


def run_method(lm, m: str, samples, ctx: Context, p: dict) -> list[str]:
    """One baseline's answers to ``samples`` with the resolved parameters ``p``."""
    decoding, n, pp = ctx.decoding or Decoding(), len(samples), ctx.post_prompt
    if m == "plain":
        return plain(lm, samples, post_prompt=pp, decoding=decoding, batch_size=n)
    if m == "vicrop":
        return vicrop(lm, samples, layer=p["vicrop_attn_layer"], post_prompt=pp, decoding=decoding,
                      bbox_size=p["vicrop_window"], batch_size=n)
    if m == "vcd":
        dec = Decoding(max_new_tokens=decoding.max_new_tokens, do_sample=bool(p["vcd_sample"]))
        return vcd(lm, samples, alpha=p["vcd_alpha"], beta=p["vcd_beta"], noise_step=p["vcd_noise_step"],
                   post_prompt=pp, decoding=dec, seed=ctx.seed, batch_size=n)
    if m == "dola":
        return dola(lm, samples, layers=p["dola_candidates"], alpha=p["dola_alpha"],
                    repetition_penalty=p["dola_repetition_penalty"], post_prompt=pp, decoding=decoding, batch_size=n)
    if m == "cd":
        return cd(lm, samples, amateur=p["cd_amateur"], alpha=p["cd_alpha"],
                  amateur_temperature=p["cd_amateur_temperature"], post_prompt=pp, decoding=decoding, batch_size=n)
    if m == "oracle_crop":
        return oracle_crop(lm, samples, post_prompt=pp, decoding=decoding)
    if m == "random_crop":
        return random_crop(lm, samples, seed=ctx.seed, post_prompt=pp, decoding=decoding)
    if m == "opera":
        return opera(lm, samples, post_prompt=pp, decoding=decoding, num_beams=p["opera_beams"],
                     num_attn_candidates=p["opera_candidates"])
    # the paper's method in the same run, so the verdict pairs it with the baselines and one clock times them all
    from .contrastive import contrastive_answer

    fusion = p["ours_fusion_layers"]
    res = contrastive_answer(lm, samples, variant=p["ours_variant"], candidates="fusion" if fusion else "shallow",
                             fusion_layers=fusion, rho=p["ours_rho"], lam=p["ours_lam"],
                             apply_layer=p["ours_apply_layer"], decoding=decoding, post_prompt=pp)
    return [r["answer"] for r in res]


def baselines_batch(lm, samples, ctx: Context, **params) -> list[dict]:
    """Per sample and baseline: the answer, its score and the seconds per sample of that baseline on this batch."""
    p = dict(params)
    preds, seconds = {}, {}
    for m in p.get("methods", DEFAULT_METHODS):
        clock = time.perf_counter()
        preds[m] = run_method(lm, m, samples, ctx, p)
        seconds[m] = (time.perf_counter() - clock) / len(samples)
    return [{"id": s.id, "family": s.family, "method": m, "pred": preds[m][i], "score": ctx.score(preds[m][i], s),
             "seconds": seconds[m]} for m in preds for i, s in enumerate(samples)]


def baselines(lm, dataset, methods: Sequence[str] | None = None, *, out: str | None = None, batch_size: int = 8,
              seed: int = 0, decoding: Decoding | None = None, progress: bool = True, **params):
    """Accuracy of each baseline on ``dataset``. Records: id, family, method, pred, score, seconds; summary:
    `baselines_summary` (CircularEval as the accuracy on MMBench). Parameters: `BaselinesParams` (``methods`` may be
    given by position)."""
    if methods is not None:
        params["methods"] = methods
    return run(SPEC, lm, dataset, out=out, batch_size=batch_size, seed=seed, decoding=decoding, progress=progress,
               **params)


def baselines_summary(df: pd.DataFrame, scorer: str | None = None, ctx=None) -> pd.DataFrame:
    """Per method: n (rows), accuracy (`metrics.benchmark_accuracy`: CircularEval for the ``option`` scorer, else
    the row mean), row_accuracy (the row mean), and the gain over plain when plain is among the methods."""
    if scorer is None and ctx is not None:
        scorer = ctx.dataset.scorer
    if df.empty:
        return pd.DataFrame(columns=["method", "n", "accuracy", "row_accuracy"])
    rows = []
    for method, g in df.groupby("method", sort=False):
        rows.append({"method": method, "n": len(g), "accuracy": benchmark_accuracy(g["id"], g["score"], scorer),
                     "row_accuracy": float(g["score"].mean())})
    s = pd.DataFrame(rows)
    if "plain" in set(s["method"]):
        s["gain"] = s["accuracy"] - float(s.loc[s["method"] == "plain", "accuracy"].iloc[0])
    return s


__all__ = ["cd", "opera", "load_amateur", "default_amateur", "run_method", "DEFAULT_METHODS", "plain", "vicrop",
           "vicrop_boxes", "vicrop_layer", "vicrop_resolution", "relative_attention", "vcd", "vcd_batch",
           "dola", "dola_layers", "dola_contrast", "tied_embeddings", "baselines", "baselines_batch",
           "baselines_summary", "METHODS"]


SPEC = register(Spec("baselines", baselines_batch, baselines_summary, resolve, params=BaselinesParams))
