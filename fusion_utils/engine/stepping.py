"""Token-by-token decoding with a KV cache, for decoders that choose each token themselves (CD's expert/amateur
pair, OPERA's beam search with candidate look-ahead).

A `Stepper` prefills one prepared batch, then feeds one token per row per call. Rows can be regrouped at each call
(``rows``: which cached row each new token continues), so a beam search can reorder its beams and fork a beam into
several candidates without touching the cache the others continue from (dynamic cache layers grow by
concatenation, never in place, and `fork_cache` copies the layer list).
"""
from __future__ import annotations

import torch

from .replay import fork_cache, generator_model, language_model_cache, last_logits_only, rope_state


class Stepper:
    """Decode ``batch`` (prepared by ``lm.prepare``) step by step.

    >>> st = Stepper(lm, batch)
    >>> logits = st.prefill()                       # [B, V] float32, the last prompt position
    >>> tokens = torch.tensor([3, 4, 5])
    >>> tuple(st.step(tokens, rows=[0, 0, 1]).shape)  # three continuations: two of row 0, one of row 1
    (3, 115)
    """

    def __init__(self, lm, batch):
        self.lm, self.batch = lm, batch
        self.cache = self.deltas = None
        self.length = batch.inputs["input_ids"].shape[1]  # cached positions
        self.mask = batch.inputs.get("attention_mask")

    @torch.no_grad()
    def prefill(self) -> torch.Tensor:
        out = self.lm.model(**self.batch.inputs, use_cache=True, **last_logits_only(self.lm))
        self.cache = language_model_cache(out)
        deltas = [v for _, v in rope_state(self.lm) if v is not None]
        self.deltas = deltas[0] if deltas else None  # M-RoPE's per-row offset, follows the rows as they regroup
        if self.mask is None:
            self.mask = torch.ones(self.batch.inputs["input_ids"].shape, dtype=torch.long,
                                   device=self.batch.inputs["input_ids"].device)
        return out.logits[:, -1].float()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, rows=None, *, keep: bool = True) -> torch.Tensor:
        """float32 [N, V]: next-token logits after appending ``tokens`` [N] to cached rows ``rows`` (default: row i
        for token i). ``keep=False`` leaves the stepper's cache as it was (a look-ahead, e.g. OPERA's candidates)."""
        if self.cache is None:
            raise RuntimeError("Stepper.step before prefill().")
        tokens = torch.as_tensor(tokens, device=self.mask.device).view(-1)
        rows = torch.arange(len(tokens), device=self.mask.device) if rows is None else torch.as_tensor(
            rows, dtype=torch.long, device=self.mask.device)
        cache = fork_cache(self.cache, len(self.cache.layers))
        cache.reorder_cache(rows)
        mask = torch.cat([self.mask.index_select(0, rows), self.mask.new_ones(len(tokens), 1)], dim=1)
        position = torch.tensor([self.length], device=tokens.device)
        kw = {}
        deltas = None
        if self.deltas is not None:  # M-RoPE (Qwen2-VL): the prefill's per-row offset, as generate() continues
            deltas = self.deltas.to(rows.device).index_select(0, rows)
            kw["position_ids"] = (self.length + deltas).view(1, -1, 1).expand(3, -1, -1)
        out = generator_model(self.lm)(input_ids=tokens[:, None], attention_mask=mask, past_key_values=cache,
                                       cache_position=position, use_cache=True, **kw)
        if keep:
            self.cache, self.mask, self.length = language_model_cache(out) or cache, mask, self.length + 1
            self.deltas = deltas
        return out.logits[:, -1].float()


__all__ = ["Stepper"]
