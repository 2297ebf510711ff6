"""The soft-mask variant (arXiv v1): which image tokens it damps, and at which layer by default.

The tokens whose contrast ``I_A`` lies below its ρ-quantile (attended early but not added to by the deep layers) are
scaled by λ at one late layer, the review layer where a model has one.
"""
from __future__ import annotations

import torch

from ..depth import scaled_layer
from ..paper import REVIEW_LAYER

# the paper's review dip, "near layer 29" (1-based) of LLaVA-1.5's 32 layers, 0-based (converted in paper.py)
REVIEW_LAYER_OF_32 = REVIEW_LAYER


def soft_mask_tokens(I_A: torch.Tensor, rho: float) -> torch.Tensor:
    """bool [N]: the image tokens whose ``I_A`` lies strictly below its ρ-quantile (the fraction ρ with the lowest
    contrast; ties at the quantile are kept unscaled).

    >>> soft_mask_tokens(torch.arange(10.0), 0.2).nonzero().ravel().tolist()
    [0, 1]
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be a fraction in [0, 1], got {rho}.")
    v = torch.as_tensor(I_A).float()
    if rho == 0.0:
        return torch.zeros(v.shape, dtype=torch.bool, device=v.device)
    return v < torch.quantile(v, float(rho))


def default_apply_layer(n_layers: int) -> int:
    """Layer 28 of 32 (0-based), scaled to the model's depth and never the first layer.

    >>> default_apply_layer(32), default_apply_layer(8)
    (28, 7)
    """
    return scaled_layer(REVIEW_LAYER_OF_32, n_layers, lowest=1)


__all__ = ["REVIEW_LAYER_OF_32", "soft_mask_tokens", "default_apply_layer"]
