"""Captured attention: the last prompt token's (and generated tokens') attention to the image tokens, in float32."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMaps:
    """Last-token -> image-token attention. ``values``: float32 [batch, layers, heads, image tokens] (NaN pads
    samples with fewer image tokens). ``steps`` holds generated tokens' rows when captured with steps='all'."""

    values: torch.Tensor
    layers: list[int]
    n_tokens: list[int]
    grids: list
    steps: list[torch.Tensor] = field(default_factory=list)  # each [batch, layers, heads, image tokens]

    def head_mean(self, renormalize: bool = True) -> torch.Tensor:
        """[batch, layers, image tokens]: mean over heads, renormalised to sum to 1 over the image tokens."""
        m = self.values.mean(dim=2)
        if renormalize:
            m = m / m.nansum(dim=-1, keepdim=True).clamp_min(1e-30)
        return m

    def sample(self, b: int, renormalize: bool = True) -> torch.Tensor:
        """[layers, n_tokens of sample b] head-mean map of one sample, padding removed."""
        return self.head_mean(renormalize)[b, :, : self.n_tokens[b]]

    def image_mass(self) -> torch.Tensor:
        """[batch, layers, heads]: total attention the query gives to the image (before renormalisation)."""
        return self.values.nansum(dim=-1)


class Collector:
    """Collects the rows `CaptureAttention` asks for, from the `AttentionRead` edits it compiled into."""

    def __init__(self, site, steps: str):
        self.steps = steps
        self.seq_len = site.seq_len
        self.image_positions = site.image_positions
        self.grids = site.grids
        self.captured: dict[int, list[torch.Tensor]] = {}
        n_max = max(len(p) for p in site.image_positions)
        B = site.batch_size
        self.index = torch.zeros(B, n_max, dtype=torch.long, device=site.device)
        self.pad = torch.ones(B, n_max, dtype=torch.bool, device=site.device)
        for b, p in enumerate(site.image_positions):
            self.index[b, : len(p)] = p
            self.pad[b, : len(p)] = False

    def read(self, call) -> None:
        """Softmax of the captured rows, recomputed in float32 from the layer's own queries, keys and mask."""
        step, S = call.step, self.seq_len
        start = step.offset
        if start <= S - 1 < start + step.q_len:
            rows = [S - 1 - start]
        elif start >= S and self.steps == "all":
            rows = list(range(step.q_len))
        else:
            return
        query, key = call.query, call.key
        B, H, _, D = query.shape
        Hkv = key.shape[1]
        g, r, k_len = H // Hkv, len(rows), key.shape[2]
        q = query[:, :, rows, :].float().reshape(B, Hkv, g * r, D)
        scores = torch.matmul(q, key.float().transpose(-1, -2)).reshape(B, H, r, k_len)
        scores = scores * (call.scaling if call.scaling is not None else D ** -0.5)
        scores = scores + call.mask_rows(rows).float()
        probs = torch.softmax(scores, dim=-1)  # [B, H, r, K]
        idx, pad = self.index.to(probs.device), self.pad.to(probs.device)
        n_max = idx.shape[1]
        img = probs.gather(-1, idx[:, None, None, :].expand(B, H, r, n_max))
        img = img.masked_fill(pad[:, None, None, :], float("nan"))
        # gathered on the batch's device: layers on other devices (device_map) stack into one tensor
        self.captured.setdefault(step.layer, []).append(img.permute(2, 0, 1, 3).detach().to(self.index.device))

    def maps(self) -> AttentionMaps:
        if not self.captured:
            raise RuntimeError("CaptureAttention was installed but no forward pass ran inside the with-block.")
        layers = sorted(self.captured)
        per_layer = [torch.cat(self.captured[j], dim=0) for j in layers]  # each [rows total, B, H, N]
        stacked = torch.stack(per_layer, dim=2)  # [rows, B, L, H, N]
        return AttentionMaps(stacked[0], layers, [len(p) for p in self.image_positions], self.grids,
                             steps=list(stacked[1:]))


__all__ = ["AttentionMaps", "Collector"]
