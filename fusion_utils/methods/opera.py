"""OPERA (Huang et al., CVPR 2024): beam search with an over-trust penalty and retrospection-allocation rollback, as
its official code does it (shikiw/OPERA, ``transformers-4.29.2/src/transformers/generation/utils.py``,
``GenerationMixin.opera_beam_search``).

Every step, each beam's ``num_attn_candidates`` top-logit tokens are looked ahead one position; the last decoder
layer's attention (max over heads, each row renormalised) gives the local window ``W`` = the rows and columns of the
response positions (``key_position["response_start"]`` = the prompt length onward), the candidate's row last.

- Over-trust score of column j: ``1e-7 · ∏_{i ≥ j} (scale_factor · W[i, j])``, stored in float16 as the official
  code does; per candidate, its maximum over j (``rollback_scores``) and where (``rollback_locs``).
- Penalty: while the window has at most 10 columns, minus the candidate's attention to the image tokens; after, the
  rollback score. The candidate's score is its logit minus ``penalty_weights ×`` the penalty; all other tokens get
  −999 before the log-softmax of the beam step.
- Rollback: the location is the mode of ``rollback_locs`` over candidates, then over beams; when every beam's history
  of per-step locations holds it more than ``threshold`` times and it is ≥ 10, decoding returns to position
  ``loc + 1`` (one earlier once that position was retried ``num_attn_candidates`` times; give up after that) and
  chooses again without the tokens chosen there before.

Defaults (``opera_beam_search``'s signature, the README and ``chair_eval.py``): 5 beams, scale_factor 50,
threshold 15, num_attn_candidates 5, window_size 512, penalty_weights 1.
"""
from __future__ import annotations

import torch

OPERA_DEFAULTS = {"num_beams": 5, "scale_factor": 50.0, "threshold": 15, "num_attn_candidates": 5,
                  "window_size": 512, "penalty_weights": 1.0}
IMAGE_PHASE = 10  # response lengths up to this use the image-attention term (``cur_response_lens <= 10``)
REJECT = -999.0  # the official code's filler logit


def local_scores(window: torch.Tensor, scale_factor: float = 50.0) -> torch.Tensor:
    """float32 [..., W]: the over-trust score of each column of ``window`` [..., W, W] (rows: response queries,
    columns: response keys), ``1e-7 · ∏_{i ≥ j} scale_factor · window[i, j]``, rounded through float16 as
    ``attn_local_scores`` is in the official code.

    >>> local_scores(torch.tensor([[1.0, 0.0], [0.5, 0.5]]), 2.0).tolist()
    [1.7881393432617188e-07, 1.1920928955078125e-07]
    """
    a = scale_factor * window.float()
    W = a.shape[-1]
    out = torch.zeros(a.shape[:-2] + (W,), dtype=torch.float16, device=a.device)
    for j in range(W):
        out[..., j] = (1e-7 * a[..., j:, j].prod(-1)).to(torch.float16)
    return out.float()


def candidate_penalty(window: torch.Tensor, image_attention: torch.Tensor, scale_factor: float = 50.0):
    """``(penalty [..., K], rollback_locs [..., K])`` for candidates whose local windows are ``window``
    [..., K, W, W] and whose rows give ``image_attention`` [..., K] to the image tokens: ``−image_attention`` while
    W ≤ 10, else the largest `local_scores` (and, always, the column where it is largest)."""
    scores = local_scores(window, scale_factor)
    rollback_scores, rollback_locs = scores.max(-1)
    penalty = -image_attention.float() if window.shape[-1] <= IMAGE_PHASE else rollback_scores
    return penalty, rollback_locs


def rollback_location(rollback_locs: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(per-beam location [beams], the location)``: ``rollback_locs`` [beams, K] reduced by ``mode`` over the
    candidates, then over the beams (``torch.mode``: the smallest of the most frequent values)."""
    per_beam = rollback_locs.mode(-1).values
    return per_beam, int(per_beam.mode().values)


def rollback_position(history: torch.Tensor, loc: int, retries: torch.Tensor, *, threshold: int = 15,
                      num_attn_candidates: int = 5, response_len: int, history_length: int = 512) -> int | None:
    """The response position to decode again, or None (the official ``try`` block's decision).

    ``history`` [beams, steps]: each beam's per-step rollback location (this step's included); ``retries``: how
    often each position was rolled back to (updated in place, as ``max_rollback_time``); ``response_len``: the
    local window's width this step.

    >>> h = torch.full((2, 17), 12)
    >>> rollback_position(h, 12, torch.zeros(512), response_len=17)
    13
    """
    if not all(int((row == loc).sum()) > int(threshold) for row in history) or loc < IMAGE_PHASE:
        return None
    pos = loc + 1
    if retries[pos] >= num_attn_candidates:
        pos -= 1
        if retries[pos] >= num_attn_candidates:
            return None
    retries[pos] += 1
    if response_len - pos > history_length + 1:
        pos = max(1, response_len - history_length - 1)
    return pos


def candidate_logits(logits: torch.Tensor, tokens: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """float32 [beams, V]: −999 everywhere but the candidates ``tokens`` [beams, K], which get ``scores``."""
    out = torch.full(logits.shape, REJECT, dtype=torch.float32, device=logits.device)
    return out.scatter(-1, tokens, scores.float())


def rejecting_logits(logits: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """float32 [beams, V] after a rollback: the logits shifted so their minimum is −999, and the flat indices
    ``rejected`` (beam · V + token, over the flattened [beams · V]) set to −999."""
    shifted = logits.float() - (999.0 + logits.float().min(-1, keepdim=True).values)
    flat = shifted.reshape(1, -1).scatter(-1, rejected.view(1, -1), REJECT)
    return flat.view_as(logits)


__all__ = ["OPERA_DEFAULTS", "IMAGE_PHASE", "REJECT", "local_scores", "candidate_penalty", "rollback_location",
           "rollback_position", "candidate_logits", "rejecting_logits"]
