"""Two more lines of evidence for the layer story (paper Sec. 3-4).

- `hellinger`: for each layer, the Hellinger distance between its last-token -> image attention (head mean,
  renormalised over the image tokens) and the final layer's. A rise late in depth marks a layer that looks at the
  image differently again (the review layer in LLaVA-style models).
- `early_exit`: the answer read off each layer (final norm + LM head on that layer's last-position hidden state).
  Its first token is scored against the gold answers, and compared with the final layer's first token.
"""
from __future__ import annotations

import torch

from ..engine import CaptureAttention, early_exit_logits, intervene
from ..metrics import hellinger as hellinger_distance
from .common import base_config, finish, post_prompt_for, run_experiment, score


@torch.no_grad()
def hellinger(lm, dataset, *, reference: int = -1, out: str | None = None, batch_size: int = 8, seed: int = 0,
              progress: bool = True):
    """Per-layer Hellinger distance of last-token -> image attention to the ``reference`` layer's (default final)."""
    L = lm.num_layers
    ref = reference % L
    pp = post_prompt_for(dataset)
    config = base_config(lm, dataset, experiment="hellinger", seed=seed, decoding=None, post_prompt=pp,
                         params=dict(reference=ref))

    def per_batch(lm, samples):
        b = lm.prepare(samples, post_prompt=pp)
        with intervene(lm, b, CaptureAttention()) as run:
            lm.model(**b.inputs)
        maps = run.attention
        rows = []
        for i, s in enumerate(samples):
            m = maps.sample(i)  # [L, n]
            h = hellinger_distance(m, m[ref][None].expand_as(m))
            mass = maps.image_mass()[i].mean(-1)  # [L] attention to the image before renormalisation
            for j in range(L):
                rows.append(dict(id=s.id, family=s.family, layer=j, hellinger=float(h[j]), image_mass=float(mass[j])))
        return rows

    records = run_experiment("hellinger", lm, dataset, per_batch, config=config, out=out, batch_size=batch_size,
                             seed=seed, progress=progress)
    summary = records.groupby("layer").agg(hellinger=("hellinger", "mean"), hellinger_sd=("hellinger", "std"),
                                           image_mass=("image_mass", "mean")).reset_index()
    return finish("hellinger", records, summary, config, reference=ref)


@torch.no_grad()
def early_exit(lm, dataset, *, out: str | None = None, batch_size: int = 8, seed: int = 0, progress: bool = True):
    """Accuracy of each layer's early-exit first token, and its agreement with the final layer's."""
    L = lm.num_layers
    pp = post_prompt_for(dataset)
    config = base_config(lm, dataset, experiment="early_exit", seed=seed, decoding=None, post_prompt=pp, params={})
    tok = lm.processor.tokenizer

    def per_batch(lm, samples):
        b = lm.prepare(samples, post_prompt=pp)
        logits = early_exit_logits(lm, b)  # [L, B, V]
        ids = logits.argmax(-1)
        probs = torch.softmax(logits, -1)
        final = ids[-1]
        rows = []
        for j in range(L):
            words = [t.strip() for t in tok.batch_decode(ids[j][:, None], skip_special_tokens=True)]
            for i, s in enumerate(samples):
                rows.append(dict(id=s.id, family=s.family, layer=j, pred=words[i], score=score(dataset, words[i], s),
                                 agrees_final=bool(ids[j, i] == final[i]),
                                 p_final_token=float(probs[j, i, final[i]])))
        return rows

    records = run_experiment("early_exit", lm, dataset, per_batch, config=config, out=out, batch_size=batch_size,
                             seed=seed, progress=progress)
    summary = records.groupby("layer").agg(accuracy=("score", "mean"), agreement=("agrees_final", "mean"),
                                           p_final_token=("p_final_token", "mean")).reset_index()
    return finish("early_exit", records, summary, config)


__all__ = ["hellinger", "early_exit"]
