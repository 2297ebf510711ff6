"""DoLa (Decoding by Contrasting Layers, Chuang et al., ICLR 2024) as its official code does it: voidism/DoLa,
``transformers-4.28.1/src/transformers/generation/utils.py``, ``GenerationMixin.dola_greedy_decode`` (the dynamic
premature layer, ``candidate_premature_layers``) with its ``relative_top_filter``.

The premature layer is the candidate with the largest "JS" score as that code computes it:
``0.5·(F.kl_div(log p_mature, M) + F.kl_div(log p_premature, M))`` with ``reduction='none'`` and ``.mean(-1)``,
``M = (p_mature + p_premature)/2``. ``F.kl_div(input, target)`` is KL(target ‖ input), so each term is KL(M ‖ p),
averaged over the vocabulary: not the textbook Jensen–Shannon divergence (KL(p ‖ M)), and the two can choose
different layers (tests/test_baselines.py measures how often on random logits). We follow the official code.

Layers are counted as in ``outputs.hidden_states``: index 0 is the embedding output (the input of decoder layer 0),
index j ≥ 1 the output of decoder layer j − 1 (0-based), N = the number of decoder layers is the final layer. The
premature logits of index j are ``lm_head(hidden_states[j])`` *without* the final norm (as in both official codes;
voidism/DoLa issue #9), the mature logits the model's own.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


DOLA_BUCKETS = ("low", "high")


def dola_layers(kind, n_layers: int, tie_word_embeddings: bool = False) -> list[int]:
    """DoLa's premature-layer candidates, as hidden-state indices (0 = embedding output). The official scripts pass
    explicit lists (e.g. ``--early-exit-layers 0,2,...,14,32`` for a 32-layer LLaMA); the buckets are transformers'
    ``_dola_decoding``'s ``dola_layers`` rule, which gives those lists:

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
                        min_tokens_to_keep: int = 1, base_value: float = -1e3) -> tuple[torch.Tensor, torch.Tensor]:
    """``relative_top_filter`` (and the masking of the base scores after it in ``dola_greedy_decode``): log-softmax
    both; where the final log-probability lies below
    ``min(max + log relative_top, the min_tokens_to_keep-th largest)``, the final one becomes −inf and the base one
    ``base_value`` (the official code writes −1e3; the value never matters, since final − base is −inf there).
    Returns ``(final, base)`` float32.

    >>> f, b = relative_top_filter(torch.tensor([[0.0, -5.0]]), torch.tensor([[0.0, 0.0]]))
    >>> f.isinf().tolist(), round(b[0, 1].item(), 6)
    ([[False, True]], -1000.0)
    """
    if not 0.0 < relative_top <= 1.0:
        raise ValueError(f"relative_top must be in (0, 1], got {relative_top}.")
    final = torch.log_softmax(final_logits.float(), dim=-1)
    base = torch.log_softmax(base_logits.float(), dim=-1)
    kth = torch.sort(final, dim=-1, descending=True).values[..., min_tokens_to_keep - 1]
    thresh = torch.minimum(kth, final.max(dim=-1).values + math.log(relative_top)).unsqueeze(-1)
    drop = final < thresh
    return final.masked_fill(drop, float("-inf")), base.masked_fill(drop, base_value)


def official_js(final_logits: torch.Tensor, layer_logits: torch.Tensor) -> torch.Tensor:
    """float32 [C, B]: ``dola_greedy_decode``'s divergence of each candidate (``layer_logits`` [C, B, V]) from the
    final layer (``final_logits`` [B, V]): ``0.5·(kl_div(log p_final, M) + kl_div(log p_layer, M))``, each
    ``F.kl_div(..., reduction='none').mean(-1)``, ``M = 0.5·(p_final + p_layer)`` (before the code's batch mean).

    >>> official_js(torch.tensor([[1.0, 0.0]]), torch.tensor([[[1.0, 0.0]]])).tolist()
    [[0.0]]
    """
    final = final_logits.float()
    layers = layer_logits.float()
    M = 0.5 * (torch.softmax(final, dim=-1)[None] + torch.softmax(layers, dim=-1))
    kl1 = F.kl_div(torch.log_softmax(final, dim=-1)[None].expand_as(M), M, reduction="none").mean(-1)
    kl2 = F.kl_div(torch.log_softmax(layers, dim=-1), M, reduction="none").mean(-1)
    return 0.5 * (kl1 + kl2)


def premature_choice(final_logits: torch.Tensor, layer_logits: torch.Tensor) -> torch.Tensor:
    """long [B]: per row, the index (into ``layer_logits`` [C, B, V]) of the candidate with the largest
    `official_js` from the final one's (``final_logits`` [B, V]); first on ties (``argmax``).

    ``dola_greedy_decode`` averages the scores over the batch (``js_divs.mean(-1)``) and picks one layer for all
    rows; per row is what it does at batch size 1 (DoLa's own evaluation), and keeps a row's answer independent of
    its batch.

    >>> final = torch.tensor([[5.0, 0.0]]); layers = torch.tensor([[[4.0, 0.0]], [[0.0, 5.0]]])
    >>> premature_choice(final, layers).tolist()
    [1]
    """
    return official_js(final_logits, layer_logits).argmax(dim=0)


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


__all__ = ["DOLA_BUCKETS", "dola_layers", "relative_top_filter", "official_js", "premature_choice", "dola_contrast"]
