"""The paper's contrast (Sec. 5): which early layer's attention to subtract from the final layer's, and the result.

For one sample, ``maps[i]`` is layer ``i``'s attention of the last prompt token to the N image tokens (head mean,
renormalised over the image). The post map is ``A_post = maps[post]`` (the final layer by default); the pre layer is
the candidate whose map is furthest from it in Hellinger distance, ``i* = argmax_{i in C} H(A_i, A_post)`` with
``H(P, Q) = ‖√P − √Q‖₂ / √2`` over the image tokens; the contrast is ``I_A = A_post − A_i*``: what the deep layers
added beyond the attention every layer gives regardless of the question.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..metrics import hellinger
from ..depth import layer_index
from ..paper import DEEP_FROM, PAPER_N_LAYERS, SHALLOW_END

# the candidate sets of the paper's ablation (Table 5); a list of layers is accepted wherever a set name is
CANDIDATE_SETS = ("fusion", "shallow", "deep", "all")


def candidate_layers(kind, n_layers: int, fusion_layers: Sequence[int] | None = None, post: int = -1) -> list[int]:
    """Candidate pre layers (0-based decoder layers, sorted), never including the post layer.

    ``"fusion"``: the given ``fusion_layers``; ``"shallow"``: the paper's "< 16" of 32 (1-based; 0-based layers
    0-14), ``"deep"``: its "> 17" (0-based 17-31), both scaled to the model's depth (`paper.SHALLOW_END`,
    `paper.DEEP_FROM`); ``"all"``: every layer; or an explicit list of layers.

    >>> candidate_layers("deep", 32)[:3], candidate_layers("shallow", 32)[-1], candidate_layers("fusion", 32, [13, 2])
    ([17, 18, 19], 14, [2, 13])
    """
    L = int(n_layers)
    post = layer_index(post, L)
    if not isinstance(kind, str):
        layers = [layer_index(int(j), L) for j in kind]
    elif kind == "fusion":
        if fusion_layers is None or len(fusion_layers) == 0:
            raise ValueError("candidates='fusion' needs fusion_layers (e.g. from the masking sweep: the layers whose "
                             "masking costs the most accuracy).")
        layers = [layer_index(int(j), L) for j in fusion_layers]
    elif kind == "shallow":
        layers = [j for j in range(L) if j < SHALLOW_END * L / PAPER_N_LAYERS]
    elif kind == "deep":
        layers = [j for j in range(L) if j >= DEEP_FROM * L / PAPER_N_LAYERS]
    elif kind == "all":
        layers = list(range(L))
    else:
        raise ValueError(f"Unknown candidate set {kind!r}; use one of {', '.join(CANDIDATE_SETS)} or a list of layers.")
    layers = sorted({j for j in layers if j != post})
    if not layers:
        raise ValueError(f"Candidate set {kind!r} is empty for a {L}-layer model once the post layer {post} is "
                         "excluded.")
    return layers


def pre_layer(maps: torch.Tensor, candidates: Sequence[int], post: int = -1) -> tuple[int, dict]:
    """``(i*, {layer: H(A_layer, A_post)})``: the candidate whose map ``maps[layer]`` ([L, N]) is furthest from the
    post map in Hellinger distance. Ties go to the earliest candidate; a candidate with an all-zero map (distance
    undefined) is never chosen over one with a defined distance.

    >>> maps = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    >>> pre_layer(maps, [0, 1])[0]
    0
    """
    maps = torch.as_tensor(maps).float()
    L = maps.shape[0]
    post = layer_index(post, L)
    cands = [j for j in (layer_index(int(j), L) for j in candidates) if j != post]
    if not cands:
        raise ValueError("pre_layer needs at least one candidate layer other than the post layer.")
    d = hellinger(maps[cands], maps[post][None].expand(len(cands), -1), axis=-1)
    d = torch.nan_to_num(d, nan=-1.0)  # an undefined distance loses to every defined one
    return cands[int(torch.argmax(d))], {j: float(v) for j, v in zip(cands, d.tolist())}


def contrastive_map(maps: torch.Tensor, candidates: Sequence[int], post: int = -1) -> dict:
    """The contrast of one sample's maps ``[L, N]``.

    Returns ``{"pre": i*, "post": k, "I_A": float32 [N] = A_post − A_pre, "hellinger": {layer: H(A_layer, A_post)}}``.

    >>> maps = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    >>> c = contrastive_map(maps, [0, 1])
    >>> c["pre"], [round(x, 2) for x in c["I_A"].tolist()]
    (1, [-0.7, 0.7])
    """
    maps = torch.as_tensor(maps).float()
    post = layer_index(post, maps.shape[0])
    pre, dist = pre_layer(maps, candidates, post)
    return {"pre": pre, "post": post, "I_A": (maps[post] - maps[pre]).float(), "hellinger": dist}


__all__ = ["CANDIDATE_SETS", "candidate_layers", "pre_layer", "contrastive_map"]
