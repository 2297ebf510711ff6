"""Two more lines of evidence for the layer story (paper Sec. 3-4).

- `hellinger`: for each layer, the Hellinger distance between its last-token -> image attention (head mean,
  renormalised over the image tokens) and the final layer's. A rise late in depth marks a layer that looks at the
  image differently again (the review layer in LLaVA-style models).
- `early_exit`: the answer read off each layer (final norm + LM head on that layer's hidden state). For a sample
  with a gold answer longer than one token, each layer's full greedy answer is generated from that layer (`ExitAt`)
  and scored; otherwise its first token is (decided per sample, so a sample's score never depends on its batch).
  Both record the first token's agreement with the final layer's.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from ..engine import CaptureAttention, ExitAt, early_exit_logits, intervene
from ..metrics import hellinger as hellinger_distance
from .common import Decoding, ExperimentResult, accuracy_by, generate, gold_logprobs, gold_token_ids, scorer_of
from .harness import Context, Spec, register, run


@torch.no_grad()
def hellinger_batch(lm, samples, ctx: Context, *, reference: int) -> list[dict]:
    """Per sample and layer: H(A_layer, A_reference) and the attention mass on the image before renormalisation."""
    L = lm.num_layers
    ref = reference % L
    b = lm.prepare(samples, post_prompt=ctx.post_prompt)
    with intervene(lm, b, CaptureAttention()) as run_:
        lm.model(**b.inputs)
    maps = run_.attention
    rows = []
    for i, s in enumerate(samples):
        m = maps.sample(i)  # [L, n]
        h = hellinger_distance(m, m[ref][None].expand_as(m))
        mass = maps.image_mass()[i].mean(-1)  # [L]
        for j in range(L):
            rows.append(dict(id=s.id, family=s.family, layer=j, hellinger=float(h[j]), image_mass=float(mass[j])))
    return rows


def hellinger_summary(records: pd.DataFrame, ctx=None) -> pd.DataFrame:
    return records.groupby("layer").agg(hellinger=("hellinger", "mean"), hellinger_sd=("hellinger", "std"),
                                        image_mass=("image_mass", "mean")).reset_index()


@dataclass(frozen=True)
class HellingerParams:
    """``reference``: the layer every layer's map is compared with (negative counts from the end; -1: the final)."""

    reference: int = -1


HELLINGER = register(Spec("hellinger", hellinger_batch, hellinger_summary,
                          resolve=lambda lm, dataset, reference: {"reference": reference % lm.num_layers},
                          extras=lambda records, summary, reference: {"reference": reference}, decodes=False,
                          params=HellingerParams, per_question=True))


def hellinger(lm, dataset, *, out: str | None = None, batch_size: int = 8, seed: int = 0, progress: bool = True,
              **params) -> ExperimentResult:
    """Per-layer Hellinger distance of last-token -> image attention to the ``reference`` layer's (default final);
    parameters: `HellingerParams`."""
    return run(HELLINGER, lm, dataset, out=out, batch_size=batch_size, seed=seed, progress=progress, **params)


def multi_token(lm, samples) -> bool:
    """Whether any gold answer of ``samples`` is longer than one token for this model's tokenizer."""
    tok = lm.processor.tokenizer
    return any(len(tok(a, add_special_tokens=False)["input_ids"]) > 1 for s in samples for a in s.answers)


def generates(lm, sample, decode: str) -> bool:
    """Whether ``sample``'s early-exit answers are generated in full (else read off the first token): always for
    ``decode="generate"``, never for ``"first_token"``; for ``"auto"``, when one of *this sample's* gold answers is
    longer than one token. The choice depends on the sample alone, never on the rest of its batch."""
    return decode == "generate" or (decode == "auto" and multi_token(lm, [sample]))


@torch.no_grad()
def early_exit_batch(lm, samples, ctx: Context, *, decode: str) -> list[dict]:
    """Per sample and layer: the layer's answer (``pred``, scored), its first token and whether that agrees with
    the final layer's, the probability the layer gives the final layer's first token, and the log-probability it
    gives the GOLD answer's first token (``gold_logprob``; ``plain_gold_logprob`` is the final layer's), the verdict's
    primary measure: it does not depend on the batch or on how the answer is decoded.

    ``decode``: ``"first_token"`` scores the first token; ``"generate"`` each layer's full greedy answer (`ExitAt`);
    ``"auto"`` decides per sample (`generates`): the full answer for a sample with a gold answer longer than one
    token, the first token otherwise, so a sample's record does not depend on which samples share its batch. Each
    record's ``decode`` says which was used."""
    L = lm.num_layers
    tok = lm.processor.tokenizer
    b = lm.prepare(samples, post_prompt=ctx.post_prompt)
    logits = early_exit_logits(lm, b)  # [L, B, V]
    ids = logits.argmax(-1)
    probs = torch.softmax(logits, -1)
    gold_lp = gold_logprobs(logits, gold_token_ids(lm, samples))  # [L, B]
    final = ids[-1]
    full = [generates(lm, s, decode) for s in samples]
    picked = [s for s, f in zip(samples, full) if f]
    gb = None if not picked else b if all(full) else lm.prepare(picked, post_prompt=ctx.post_prompt)
    rows = []
    for j in range(L):
        first = [t.strip() for t in tok.batch_decode(ids[j][:, None], skip_special_tokens=True)]
        generated = iter(generate(lm, gb, [ExitAt(j)], ctx.decoding or Decoding()) if gb is not None else ())
        preds = [next(generated) if f else t for f, t in zip(full, first)]
        for i, s in enumerate(samples):
            rows.append(dict(id=s.id, family=s.family, layer=j, pred=preds[i], first_token=first[i],
                             decode="generate" if full[i] else "first_token", score=ctx.score(preds[i], s),
                             agrees_final=bool(ids[j, i] == final[i]), p_final_token=float(probs[j, i, final[i]]),
                             gold_logprob=float(gold_lp[j, i]), plain_gold_logprob=float(gold_lp[-1, i])))
    return rows


def early_exit_summary(records: pd.DataFrame, ctx=None, scorer: str | None = None) -> pd.DataFrame:
    """Per layer: accuracy (as the benchmark reports it: `common.accuracy_by`, CircularEval on MMBench), the first
    token's agreement with the final layer's, and the probability of the final layer's first token."""
    out = records.groupby("layer").agg(agreement=("agrees_final", "mean"),
                                       p_final_token=("p_final_token", "mean")).reset_index()
    acc = accuracy_by(records, ["layer"], scorer_of(ctx, scorer))
    return out.merge(acc, on="layer", how="left")[["layer", "accuracy", "agreement", "p_final_token"]]


@dataclass(frozen=True)
class EarlyExitParams:
    """``decode``: ``"first_token"``, ``"generate"`` (each layer's full greedy answer) or ``"auto"`` (per sample: the
    full answer where that sample's gold answer is longer than one token, `generates`)."""

    decode: str = "auto"


def resolve_early_exit(lm, dataset, decode: str) -> dict:
    if decode not in ("auto", "first_token", "generate"):
        raise ValueError("decode must be 'auto', 'first_token' or 'generate'.")
    return {"decode": decode}


EARLY_EXIT = register(Spec("early_exit", early_exit_batch, early_exit_summary, resolve=resolve_early_exit,
                           params=EarlyExitParams, per_question=True))


def early_exit(lm, dataset, *, decoding: Decoding | None = None, out: str | None = None, batch_size: int = 8,
               seed: int = 0, progress: bool = True, **params) -> ExperimentResult:
    """Accuracy of each layer's early-exit answer, and its first token's agreement with the final layer's;
    parameters: `EarlyExitParams`."""
    return run(EARLY_EXIT, lm, dataset, out=out, batch_size=batch_size, seed=seed, decoding=decoding,
               progress=progress, **params)


__all__ = ["hellinger", "early_exit", "hellinger_batch", "early_exit_batch", "hellinger_summary",
           "early_exit_summary", "multi_token", "generates"]
