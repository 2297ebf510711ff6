"""DoLa (Decoding by Contrasting Layers, Chuang et al., ICLR 2024) as transformers' ``_dola_decoding`` does it
(merged from voidism/DoLa; now the hub's ``transformers-community/dola``).

Layers are counted as in ``outputs.hidden_states``: index 0 is the embedding output (the input of decoder layer 0),
index j ≥ 1 the output of decoder layer j − 1 (0-based), N = the number of decoder layers is the final layer. The
premature logits of index j are ``lm_head(hidden_states[j])`` *without* the final norm (as in both official codes;
voidism/DoLa issue #9), the mature logits the model's own.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..metrics import jensen_shannon

DOLA_BUCKETS = ("low", "high")


def dola_layers(kind, n_layers: int, tie_word_embeddings: bool = False) -> list[int]:
    """DoLa's premature-layer candidates, as hidden-state indices (0 = embedding output), from
    ``_dola_decoding``'s ``dola_layers``:

    - ``"low"``: ``range(start, N // 2, 2)`` (N ≤ 40) or ``range(start, 20, 2)``; ``start`` = 0, or with tied word
      embeddings (whose early exit from the embedding is the identity) 2 (N > 2) / 1 (N = 2); just ``[start]`` when
      ``start == N // 2``;
    - ``"high"``: ``range(N // 2, N, 2)`` (N ≤ 40) or ``range(N − 20, N, 2)``;
    - or an explicit list of indices in [0, N − 1].

    >>> dola_layers("low", 32), dola_layers("high", 32)
    ([0, 2, 4, 6, 8, 10, 12, 14], [16, 18, 20, 22, 24, 26, 28, 30])
    """
    N = int(n_layers)
    if N < 1:
        raise ValueError(f"n_layers must be positive, got {n_layers}.")
    if not isinstance(kind, str):
        layers = [int(j) for j in kind]
        bad = [j for j in layers if not 0 <= j < N]
        if bad or not layers:
            raise ValueError(f"DoLa candidate layers are hidden-state indices in [0, {N - 1}] (0 = the embedding "
                             f"output, {N} = the final layer, never a candidate); got {list(kind)}.")
        return layers
    if kind == "low":
        start = 0 if not tie_word_embeddings else (2 if N > 2 else 1 if N == 2 else 0)
        if start == N // 2:
            return [start]
        return list(range(start, N // 2, 2)) if N <= 40 else list(range(start, 20, 2))
    if kind == "high":
        return list(range(N // 2, N, 2)) if N <= 40 else list(range(N - 20, N, 2))
    raise ValueError(f"Unknown DoLa bucket {kind!r}; use 'low', 'high' or a list of hidden-state indices.")


def relative_top_filter(final_logits: torch.Tensor, base_logits: torch.Tensor, relative_top: float = 0.1,
                        min_tokens_to_keep: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``_relative_top_filter``: log-softmax both; where the final log-probability lies below
    ``min(max + log relative_top, the min_tokens_to_keep-th largest)``, the final one becomes −inf and the base one
    −1e-3. Returns ``(final, base)`` float32.

    >>> f, b = relative_top_filter(torch.tensor([[0.0, -5.0]]), torch.tensor([[0.0, 0.0]]))
    >>> f.isinf().tolist(), round(b[0, 1].item(), 6)
    ([[False, True]], -0.001)
    """
    if not 0.0 < relative_top <= 1.0:
        raise ValueError(f"relative_top must be in (0, 1], got {relative_top}.")
    final = torch.log_softmax(final_logits.float(), dim=-1)
    base = torch.log_softmax(base_logits.float(), dim=-1)
    kth = torch.sort(final, dim=-1, descending=True).values[..., min_tokens_to_keep - 1]
    thresh = torch.minimum(kth, final.max(dim=-1).values + math.log(relative_top)).unsqueeze(-1)
    drop = final < thresh
    return final.masked_fill(drop, float("-inf")), base.masked_fill(drop, -1e-3)


def premature_choice(final_logits: torch.Tensor, layer_logits: torch.Tensor) -> torch.Tensor:
    """long [B]: per row, the index (into ``layer_logits`` [C, B, V]) of the candidate whose next-token distribution
    is furthest from the final one's (``final_logits`` [B, V]) in Jensen–Shannon divergence; first on ties.

    ``_dola_select_contrast`` averages the divergences over the batch and picks one layer for all rows; per row is
    what it does at batch size 1 (DoLa's own evaluation), and keeps a row's answer independent of its batch.

    >>> final = torch.tensor([[5.0, 0.0]]); layers = torch.tensor([[[4.0, 0.0]], [[0.0, 5.0]]])
    >>> premature_choice(final, layers).tolist()
    [1]
    """
    p = torch.softmax(final_logits.float(), dim=-1)
    q = torch.softmax(layer_logits.float(), dim=-1)
    return jensen_shannon(p[None].expand_as(q), q, axis=-1).argmax(dim=0)


def dola_contrast(final_logits: torch.Tensor, layer_logits: torch.Tensor, candidates: Sequence[int],
                  relative_top: float = 0.1) -> tuple[torch.Tensor, list[int]]:
    """One step of DoLa: ``final − premature`` log-probabilities after the relative-top filter, with the premature
    layer chosen per row by `premature_choice`. ``layer_logits`` [C, B, V] are the early-exit logits of
    ``candidates`` (same order). Returns (scores [B, V] float32, −inf outside the filter; the chosen layer per row).

    >>> s, chosen = dola_contrast(torch.tensor([[5.0, 0.0]]), torch.tensor([[[4.0, 0.0]], [[0.0, 5.0]]]), [2, 4])
    >>> chosen, s.isinf().tolist()
    ([4], [[False, True]])
    """
    if len(candidates) != layer_logits.shape[0]:
        raise ValueError(f"dola_contrast got {layer_logits.shape[0]} layers of logits for {len(candidates)} "
                         "candidates; pass one [B, V] slice per candidate.")
    idx = premature_choice(final_logits, layer_logits)
    rows = torch.arange(final_logits.shape[0], device=final_logits.device)
    final, base = relative_top_filter(final_logits, layer_logits.float()[idx, rows], relative_top)
    return final - base, [int(candidates[int(i)]) for i in idx.tolist()]


__all__ = ["DOLA_BUCKETS", "dola_layers", "relative_top_filter", "premature_choice", "dola_contrast"]
