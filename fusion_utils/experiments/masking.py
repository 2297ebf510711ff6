"""Layer-wise masking (paper Sec. 3): where does the answer still need the raw image?

For every decoder layer ℓ and masking mode, the image is masked at ℓ and each sample is answered again. Per layer
the table gives the accuracy, its drop from the unmasked accuracy, and the change in probability of the model's
own unmasked first answer token; per sample, the gold answer's first-token log-probability under the mask and without. Fusion layers are those whose masking drops accuracy by more than a threshold;
the review layer is a deep layer, after the plateau where masking stops mattering, whose masking hurts again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..engine import MaskImage, masking_sweep
from .common import Decoding, accuracy_by, first_token_ids, generate, gold_logprobs, gold_token_ids, scorer_of
from .harness import Context, Spec, register, run


@dataclass(frozen=True)
class MaskingParams:
    """``modes``: ``"zero"`` (one layer reads zeros at the image positions) and/or ``"knockout"``; ``layers``: the
    layers to mask (default every layer); ``window``: layers masked at once; ``onward``: mask every layer from ℓ on;
    ``decode``: ``"generate"`` (full greedy answer) or ``"first_token"`` (read off the fast sweep); ``threshold``:
    the accuracy drop (0-1) that makes a layer a fusion layer."""

    modes: Sequence[str] = ("zero",)
    layers: Sequence[int] | None = None
    window: int = 1
    onward: bool = False
    decode: str = "generate"
    threshold: float = 0.05


@torch.no_grad()
def masking_batch(lm, samples, ctx: Context, *, modes: Sequence[str], layers: Sequence[int] | None, window: int,
                  onward: bool, decode: str) -> list[dict]:
    """Per sample, masking mode and masked layer: the answer under the mask, its score, the probability of the
    model's own unmasked first answer token (``p_answer``; ``plain_p`` unmasked) and the log-probability of the GOLD
    answer's first token (``gold_logprob``; ``plain_gold_logprob`` unmasked).

    The gold log-probability is the verdicts' primary measure for the layer claims: a paired per-sample change that
    is far less noisy than a 0/1 score. It is the first token's only (read off the sweep's last-position logits, no
    extra pass), which for one-word answers is the whole answer."""
    decoding = ctx.decoding or Decoding()
    layers = list(range(lm.num_layers)) if layers is None else list(layers)
    b = lm.prepare(samples, post_prompt=ctx.post_prompt)
    plain = generate(lm, b, (), decoding)
    target = torch.tensor(first_token_ids(lm, plain), device=lm.device)
    gold = gold_token_ids(lm, samples)
    tok = lm.processor.tokenizer
    rows = []
    for mode in modes:
        sweep = masking_sweep(lm, b, layers, mode=mode, window=window, onward=onward)
        p_plain = torch.softmax(sweep["plain"], -1).gather(-1, target[:, None])[:, 0]
        probs = torch.softmax(sweep["logits"], -1)  # [V, B, vocab]
        p_mask = probs.gather(-1, target[None, :, None].expand(len(layers), -1, 1))[..., 0]
        g_plain, g_mask = gold_logprobs(sweep["plain"], gold), gold_logprobs(sweep["logits"], gold)
        if decode == "generate":
            preds = [generate(lm, b, [MaskImage(j, mode, window, onward)], decoding) for j in layers]
        else:
            ids = sweep["logits"].argmax(-1)
            preds = [[t.strip() for t in tok.batch_decode(ids[v][:, None], skip_special_tokens=True)]
                     for v in range(len(layers))]
        for i, s in enumerate(samples):
            plain_score = ctx.score(plain[i], s)
            for v, j in enumerate(layers):
                rows.append(dict(id=s.id, family=s.family, mode=mode, onward=onward, layer=j, pred=preds[v][i],
                                 score=ctx.score(preds[v][i], s), p_answer=float(p_mask[v, i]),
                                 plain_pred=plain[i], plain_score=plain_score, plain_p=float(p_plain[i]),
                                 gold_logprob=float(g_mask[v, i]), plain_gold_logprob=float(g_plain[i])))
    return rows


def resolve(lm, dataset, *, modes: Sequence[str], layers: Sequence[int] | None, window: int, onward: bool,
            decode: str, threshold: float) -> dict:
    if decode not in ("generate", "first_token"):
        raise ValueError("decode must be 'generate' or 'first_token'.")
    for m in modes:
        MaskImage(0, m, window)  # validates the mode and window before any work
    L = lm.num_layers
    layers = list(range(L)) if layers is None else [int(j) % L if j < 0 else int(j) for j in layers]
    return dict(modes=list(modes), layers=layers, window=window, onward=onward, decode=decode, threshold=threshold)


def extras(records, summary, *, modes, threshold: float) -> dict:
    return {"layers": {m: find_layers(summary[summary["mode"] == m], threshold=threshold) for m in modes},
            "threshold": threshold}


def masking(lm, dataset, *, decoding: Decoding | None = None, out: str | None = None, batch_size: int = 8,
            seed: int = 0, progress: bool = True, **params):
    """Accuracy and answer-probability change vs masked layer, for each masking mode (parameters: `MaskingParams`).

    ``modes``: ``"zero"`` (one-layer: only the masked layer reads zeros at the image positions) and/or
    ``"knockout"``; ``onward=True`` masks every layer from ℓ on (persistent; a curve that can only fall).
    ``decode="generate"`` answers under the mask with the full greedy decoding (exact accuracy);
    ``decode="first_token"`` reads the answer's first token off the fast sweep (cheaper; exact for one-token answers).
    ``threshold``: accuracy drop (absolute, 0-1) that makes a layer a fusion layer.
    """
    return run(SPEC, lm, dataset, out=out, batch_size=batch_size, seed=seed, decoding=decoding, progress=progress,
               **params)


def masking_summary(records: pd.DataFrame, ctx=None, scorer: str | None = None) -> pd.DataFrame:
    """Per (mode, layer): accuracy, plain accuracy (both as the benchmark reports them: `common.accuracy_by`,
    CircularEval on MMBench), drop, mean answer-probability change, n."""
    keys = ["mode", "layer"]
    g = records.groupby(keys, sort=True)
    out = g.agg(p_answer=("p_answer", "mean"), plain_p=("plain_p", "mean"), n=("id", "nunique")).reset_index()
    acc = accuracy_by(records, keys, scorer_of(ctx, scorer), {"accuracy": "score", "plain_accuracy": "plain_score"})
    out = out.merge(acc, on=keys, how="left")[[*keys, "accuracy", "plain_accuracy", "p_answer", "plain_p", "n"]]
    out["drop"] = out["plain_accuracy"] - out["accuracy"]
    out["delta_p"] = out["p_answer"] - out["plain_p"]
    return out


def find_layers(summary: pd.DataFrame, *, threshold: float = 0.05, plateau_len: int | None = None) -> dict:
    """Fusion layers, plateau start and review layer from one mode's per-layer summary.

    - fusion layers: drop > ``threshold``;
    - plateau: the first layer from which ``plateau_len`` consecutive layers (default max(2, L // 8)) all drop less
      than ``threshold``;
    - review layer: after the plateau, the layer with the largest drop if that drop exceeds ``threshold``; else None.
    """
    s = summary.sort_values("layer")
    layers = s["layer"].tolist()
    drop = s["drop"].to_numpy()
    L = len(layers)
    k = plateau_len or max(2, L // 8)
    fusion = [int(j) for j, d in zip(layers, drop) if d > threshold]
    plateau = None
    for i in range(L - k + 1):
        if np.all(drop[i:i + k] <= threshold):
            plateau = i
            break
    review = None
    if plateau is not None:
        tail = [(drop[i], layers[i]) for i in range(plateau + k, L) if drop[i] > threshold]
        if tail:
            review = int(max(tail)[1])
    return {"fusion_layers": [j for j in fusion if plateau is None or j < layers[plateau]] if plateau is not None else fusion,
            "plateau_start": None if plateau is None else int(layers[plateau]), "review_layer": review,
            "threshold": threshold}


SPEC = register(Spec("masking", masking_batch, masking_summary, resolve, extras, summary_params=("threshold",),
                     params=MaskingParams, per_question=True))
