"""Attention evolution (paper Sec. 4): where the answer position looks in the image, layer by layer.

Per sample and layer, from the last prompt token's attention to the image tokens (head mean, renormalised):

- mass on ground-truth relevant tokens vs irrelevant ones, and the relevant mass relative to the relevant area
  (``rel_ratio`` = 1 means no preference), where the dataset gives relevance (the procedural world);
- overlap of the layer's top-k tokens with the final layer's top-k;
- persistent high-attention tokens: tokens in the top-k at a large share of layers. When they are irrelevant they
  are the "noise" the paper says survives at every depth (the visual attention sinks of VAR).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..engine import CaptureAttention, intervene
from ..metrics import topk_overlap
from .harness import Context, Spec, register, run

RELEVANT_AT = 0.5  # a token is relevant when at least half its cell is covered by relevant regions


@torch.no_grad()
def capture_maps(lm, samples, *, post_prompt=None, questions=None, images=None):
    """The `AttentionMaps` of a list of samples (last prompt token -> image tokens, every layer and head)."""
    b = lm.prepare(samples, post_prompt=post_prompt, questions=questions, images=images)
    with intervene(lm, b, CaptureAttention()) as run:
        lm.model(**b.inputs)
    return run.attention, b


def sample_maps(lm, samples, *, post_prompt=None) -> list[dict]:
    """Per sample, everything a figure needs: per-layer 2-D maps on the primary view ([L, rows, cols]) and the
    view's ``extent`` on the image, the token maps ([L, N]), per-token relevance ([N] or None), the image, its relevant grid, question and gold answer."""
    maps, b = capture_maps(lm, samples, post_prompt=post_prompt)
    out = []
    for i, s in enumerate(samples):
        tokens = maps.sample(i).cpu().numpy()
        grid = b.grids[i][0]
        view = grid.primary
        out.append(dict(maps2d=view.to_map(tokens), tokens=tokens, spatial=view.spatial, extent=view.extent,
                        relevance=token_relevance(b.grids[i], s), image=s.image, relevant=s.relevant,
                        question=s.question, answer=s.answers[0] if s.answers else None, id=s.id))
    return out


def token_relevance(grid_list, sample) -> np.ndarray | None:
    """Per image token (all images of the sample), the fraction of its cell covered by relevant regions."""
    parts = [g.relevance(sample.relevant) for g in grid_list]
    if any(p is None for p in parts):
        return None
    return np.concatenate(parts)


@torch.no_grad()
def attention_batch(lm, samples, ctx: Context, *, k: int, persist: float) -> list[dict]:
    """Per sample and layer: relevant / irrelevant mass (where the sample has relevance), top-k overlap with the
    final layer, entropy, the largest share; on the last layer's row the sample's persistent top-k tokens."""
    L = lm.num_layers
    maps, b = capture_maps(lm, samples, post_prompt=ctx.post_prompt)
    rows = []
    for i, s in enumerate(samples):
        m = maps.sample(i).cpu().numpy()  # [L, n]
        n = m.shape[1]
        kk = min(k, n)
        rel = token_relevance(b.grids[i], s)
        relevant = None if rel is None else np.nan_to_num(rel) >= RELEVANT_AT
        top = np.argsort(-m, axis=1)[:, :kk]
        counts = np.bincount(top.ravel(), minlength=n)
        persistent = np.flatnonzero(counts >= persist * L)
        for j in range(L):
            row = dict(id=s.id, family=s.family, layer=j, topk_overlap=float(topk_overlap(m[j], m[-1], kk)),
                       entropy=float(-(m[j] * np.log(np.clip(m[j], 1e-12, None))).sum() / np.log(n)),
                       max_share=float(m[j].max()))
            if relevant is not None and relevant.any() and (~relevant).any():
                area = relevant.mean()
                row.update(rel_mass=float(m[j][relevant].sum()), irr_mass=float(m[j][~relevant].sum()),
                           rel_ratio=float(m[j][relevant].sum() / area),
                           irr_top_share=float((~relevant[top[j]]).mean()))
            if j == L - 1:  # per-sample facts, stored once on the last layer's row
                row.update(persistent=persistent.tolist(), n_tokens=n,
                           relevant_area=None if relevant is None else float(relevant.mean()),
                           persistent_irrelevant=None if relevant is None else
                           int((~relevant[persistent]).sum()) if len(persistent) else 0)
            rows.append(row)
    return rows


def attention_summary(records: pd.DataFrame, ctx=None) -> pd.DataFrame:
    agg = dict(topk_overlap=("topk_overlap", "mean"), entropy=("entropy", "mean"), max_share=("max_share", "mean"))
    for c in ("rel_mass", "irr_mass", "rel_ratio", "irr_top_share"):
        if c in records.columns:
            agg[c] = (c, "mean")
    return records.groupby("layer").agg(**agg).reset_index()


@dataclass(frozen=True)
class AttentionParams:
    """``k``: size of the top-k sets; ``persist``: share of layers a token must be in the top-k to count as
    persistent."""

    k: int = 5
    persist: float = 0.75


SPEC = register(Spec("attention", attention_batch, attention_summary,
                     resolve=lambda lm, dataset, k, persist: dict(k=k, persist=persist, relevant_at=RELEVANT_AT),
                     extras=lambda records, summary: {"noise": persistent_noise(records)}, decodes=False,
                     params=AttentionParams, per_question=True))


def attention(lm, dataset, *, out: str | None = None, batch_size: int = 8, seed: int = 0, progress: bool = True,
              **params):
    """Relevant vs irrelevant attention mass by layer, top-k overlap with the final layer, persistent tokens
    (parameters: `AttentionParams`)."""
    return run(SPEC, lm, dataset, out=out, batch_size=batch_size, seed=seed, progress=progress, **params)


def persistent_noise(records: pd.DataFrame) -> dict:
    """How often the persistent top-k tokens are irrelevant, and which token indices persist across samples."""
    last = records.dropna(subset=["n_tokens"]) if "n_tokens" in records.columns else records.iloc[0:0]
    if last.empty:
        return {}
    n_persist = last["persistent"].apply(len)
    out = {"samples": int(len(last)), "mean_persistent_tokens": float(n_persist.mean())}
    if "persistent_irrelevant" in last.columns and last["persistent_irrelevant"].notna().any():
        has = n_persist > 0
        frac = (last.loc[has, "persistent_irrelevant"] / n_persist[has]).astype(float)
        out["irrelevant_share_of_persistent"] = float(frac.mean()) if len(frac) else float("nan")
    counts: dict[int, int] = {}
    for lst in last["persistent"]:
        for t in lst:
            counts[int(t)] = counts.get(int(t), 0) + 1
    out["most_common_tokens"] = sorted(counts.items(), key=lambda kv: -kv[1])[:10]
    return out


__all__ = ["attention", "attention_batch", "attention_summary", "capture_maps", "sample_maps", "token_relevance", "persistent_noise"]
