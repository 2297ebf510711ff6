"""Visual contrastive decoding (VCD, Leng et al., CVPR 2024) as its official code (DAMO-NLP-SG/VCD) does it.

- The distorted image ``v′``: ``vcd_utils/vcd_add_noise.py`` ``add_diffusion_noise``: forward diffusion
  ``q(x_T | x_0) = N(√ᾱ_T·x_0, (1 − ᾱ_T)·I)`` of the *processor-normalised* pixel tensor, with
  ``β = sigmoid(linspace(−6, 6, 1000))·(5e-3 − 1e-5) + 1e-5`` and T = 500, which leaves √ᾱ_500 ≈ 0.863 of the image.
- The contrast and the cutoff: ``vcd_utils/vcd_sample.py`` ``sample``: ``(1 + α)·l(v) − α·l(v′)`` on the tokens
  whose logit under ``v`` reaches ``log β + max l(v)`` (the adaptive plausibility constraint). The shipped run
  script ``experiments/cd_scripts/llava1.5_pope.bash`` uses α = 1, β = 0.2 (``cd_beta=${6:-0.2}``), and that is
  our default; the Python entry points' argparse defaults say ``--cd_beta 0.1``, which the script overrides. The
  official evaluation samples (``do_sample=True``, temperature 1, top-p 1).
"""
from __future__ import annotations

import math

import torch

N_STEPS = 1000
BETA_START, BETA_END = 1e-5, 5e-3


def diffusion_alphas_bar(n_steps: int = N_STEPS, beta_start: float = BETA_START,
                         beta_end: float = BETA_END) -> torch.Tensor:
    """float64 [n_steps]: ``ᾱ_t = ∏_{s ≤ t} (1 − β_s)`` on VCD's sigmoid β schedule.

    >>> round(float(diffusion_alphas_bar()[500].sqrt()), 3)
    0.863
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be a positive number of diffusion steps, got {n_steps}.")
    ramp = torch.sigmoid(torch.linspace(-6.0, 6.0, n_steps, dtype=torch.float64))
    betas = ramp * (beta_end - beta_start) + beta_start
    return torch.cumprod(1.0 - betas, dim=0)


def add_diffusion_noise(x: torch.Tensor, noise_step: int = 500, *, generator: torch.Generator | None = None,
                        n_steps: int = N_STEPS, beta_start: float = BETA_START,
                        beta_end: float = BETA_END) -> torch.Tensor:
    """``√ᾱ_T·x + √(1 − ᾱ_T)·ε`` with ε ~ N(0, I) drawn on the CPU from ``generator`` (float32, then cast to
    ``x``'s dtype and device). ``x``: the normalised pixel tensor the model reads, any shape; no clipping, as in
    the official code.

    >>> x = torch.ones(2, 3)
    >>> torch.equal(add_diffusion_noise(x, 0, beta_start=0.0, beta_end=0.0), x)
    True
    """
    if not 0 <= int(noise_step) < n_steps:
        raise ValueError(f"noise_step must be in [0, {n_steps}), got {noise_step}.")
    abar = float(diffusion_alphas_bar(n_steps, beta_start, beta_end)[int(noise_step)])
    eps = torch.randn(tuple(x.shape), generator=generator, dtype=torch.float32)
    noised = math.sqrt(abar) * x.detach().float().cpu() + math.sqrt(1.0 - abar) * eps
    return noised.to(dtype=x.dtype, device=x.device)


def vcd_logits(logits: torch.Tensor, logits_noised: torch.Tensor, alpha: float = 1.0,
               beta: float = 0.2) -> torch.Tensor:
    """float32 [..., V]: ``(1 + α)·l(v) − α·l(v′)``, −inf where ``l(v) < log β + max l(v)`` (VCD's cutoff, which
    keeps the tokens with ``p(v) ≥ β·max p(v)``). α = 0 leaves the plain logits on the kept tokens.

    >>> vcd_logits(torch.tensor([2.0, 1.0, -5.0]), torch.tensor([2.0, 0.0, 0.0]), 1.0, 0.1).tolist()
    [2.0, 2.0, -inf]
    """
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"VCD's cutoff beta must be in (0, 1], got {beta}.")
    v, vn = logits.float(), logits_noised.float()
    cd = v if alpha == 0 else (1.0 + alpha) * v - alpha * vn
    cutoff = math.log(beta) + v.max(dim=-1, keepdim=True).values
    return cd.masked_fill(v < cutoff, float("-inf"))


__all__ = ["N_STEPS", "BETA_START", "BETA_END", "diffusion_alphas_bar", "add_diffusion_noise", "vcd_logits"]
