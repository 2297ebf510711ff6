"""Contrastive decoding (CD; Li et al., ACL 2023, "Contrastive Decoding: Open-ended Text Generation as
Optimization"; official code XiangLi1999/ContrastiveDecoding).

The score of token x is ``log p_expert(x) − log p_amateur(x)`` on the tokens that pass the adaptive plausibility
constraint ``V_head = {x : p_expert(x) ≥ α · max_w p_expert(w)}`` and −inf elsewhere, α = 0.1 (the paper's Eq. 3-4,
and ``EntrPLogitsWarper(relative_top=0.1)`` in the official ``generation_logits_process.py``). The amateur is a
smaller model of the same family and vocabulary. ``amateur_temperature`` divides the amateur's logits before its
log-softmax (the official ``student_temperature``; the paper's formula is τ = 1, its README's examples run 0.5).
"""
from __future__ import annotations

import math

import torch

CD_ALPHA = 0.1


def plausible(expert_logits: torch.Tensor, alpha: float = CD_ALPHA) -> torch.Tensor:
    """bool [..., V]: ``V_head``, the tokens with ``p_expert ≥ α · max p_expert`` (in log space, as the official
    warper: ``log_softmax ≥ max + log α``; the top token is always kept).

    >>> plausible(torch.tensor([0.0, -1.0, -5.0])).tolist()
    [True, True, False]
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"CD's plausibility alpha must be in (0, 1], got {alpha}.")
    logp = torch.log_softmax(expert_logits.float(), dim=-1)
    return logp >= logp.max(dim=-1, keepdim=True).values + math.log(alpha)


def cd_scores(expert_logits: torch.Tensor, amateur_logits: torch.Tensor, alpha: float = CD_ALPHA,
              amateur_temperature: float = 1.0) -> torch.Tensor:
    """float32 [..., V]: ``log p_expert − log p_amateur`` on `plausible` tokens, −inf elsewhere.

    >>> s = cd_scores(torch.tensor([2.0, 1.9, -9.0]), torch.tensor([3.0, 0.0, 0.0]))
    >>> int(s.argmax()), bool(torch.isinf(s[2]))
    (1, True)
    """
    if expert_logits.shape[-1] != amateur_logits.shape[-1]:
        raise ValueError(f"CD needs the expert and the amateur to share a vocabulary; their logits have "
                         f"{expert_logits.shape[-1]} and {amateur_logits.shape[-1]} entries.")
    if amateur_temperature <= 0:
        raise ValueError(f"amateur_temperature must be positive, got {amateur_temperature}.")
    e = torch.log_softmax(expert_logits.float(), dim=-1)
    a = torch.log_softmax(amateur_logits.float().to(e.device) / amateur_temperature, dim=-1)
    return (e - a).masked_fill(~plausible(expert_logits, alpha), float("-inf"))


__all__ = ["CD_ALPHA", "plausible", "cd_scores"]
