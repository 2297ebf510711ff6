"""OPERA's decoding loop on the engine: ``opera_beam_search`` (shikiw/OPERA) with the math of `methods.opera`.

One sample at a time (the official evaluation's batch size), ``num_beams`` beams. The last decoder layer's attention
rows come from an `AttentionRead` (`LastRows`): float32 softmax of the layer's own queries and keys, max over heads,
renormalised. Each decode call is one unpadded sample's continuation, whose single query sees every key, so no mask
is needed. The beam bookkeeping is transformers 4.29's ``BeamSearchScorer`` (the version OPERA patches): length
penalty 1 over the whole sequence (prompt included), no early stopping, one hypothesis kept.
"""
from __future__ import annotations

import copy

import torch

from ..engine import AttentionRead, intervene
from ..methods.opera import (OPERA_DEFAULTS, candidate_logits, candidate_penalty, rejecting_logits,
                             rollback_location, rollback_position)
from ..prompts import POST_PROMPT
from ..engine.stepping import Stepper


class LastRows:
    """A plan: the last layer's attention row of each decode call's (single) query, kept as ``rows`` [N, K]."""

    def __init__(self):
        self.rows = None

    def compile(self, site):
        def read(call):
            if call.step.q_len != 1 or call.step.offset == 0:
                return  # the prefill: OPERA's window starts at the response
            q, k = call.query.float(), call.key.float()
            H, Hkv = q.shape[1], k.shape[1]
            k = k.repeat_interleave(H // Hkv, dim=1)
            scale = call.scaling if call.scaling is not None else q.shape[-1] ** -0.5
            p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)[:, :, 0]  # [N, H, K]
            row = p.max(dim=1).values
            self.rows = row / row.sum(-1, keepdim=True)

        return [AttentionRead(site.n_layers - 1, read)]


class Hypotheses:
    """transformers 4.29 ``BeamHypotheses`` for one sample (length_penalty 1, early_stopping False)."""

    def __init__(self, num_beams: int):
        self.num_beams, self.beams, self.worst = num_beams, [], 1e9

    def add(self, tokens: list[int], sum_logprobs: float, length: int) -> None:
        score = sum_logprobs / length
        if len(self.beams) < self.num_beams or score > self.worst:
            self.beams.append((score, tokens))
            if len(self.beams) > self.num_beams:
                self.beams.remove(min(self.beams, key=lambda b: b[0]))
                self.worst = min(b[0] for b in self.beams)
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_logprobs: float, length: int) -> bool:
        return len(self.beams) >= self.num_beams and self.worst >= best_sum_logprobs / length


def beam_step(scores, beam_scores, gen, hyps, eos, num_beams, prompt_len):
    """``BeamSearchScorer.process``: the next beams (scores, tokens, source beams) from log-probs [beams, V]."""
    V = scores.shape[-1]
    total = (scores + beam_scores[:, None]).view(-1)
    top, flat = torch.topk(total, 2 * num_beams)
    nb_scores, nb_tokens, nb_idx = [], [], []
    for rank, (s, f) in enumerate(zip(top.tolist(), flat.tolist())):
        b, tok = divmod(f, V)
        if tok in eos:
            if rank < num_beams:
                hyps.add(gen[b], s, prompt_len + len(gen[b]))
            continue
        nb_scores.append(s), nb_tokens.append(tok), nb_idx.append(b)
        if len(nb_scores) == num_beams:
            break
    done = hyps.is_done(float(top.max()), prompt_len + len(gen[0]) + 1)
    return torch.tensor(nb_scores), torch.tensor(nb_tokens), torch.tensor(nb_idx), done


def opera_window(history: torch.Tensor, cand_rows: torch.Tensor, start: int) -> torch.Tensor:
    """[beams, K, W, W]: each beam's response rows (``history`` [beams, t, W − 1], columns from ``start``) with
    each candidate's row (``cand_rows`` [beams, K, keys]) last, zero-padded to W columns."""
    beams, K = cand_rows.shape[:2]
    local = cand_rows[..., start:]
    W = local.shape[-1]
    prev = torch.nn.functional.pad(history, (0, W - history.shape[-1]))[:, None].expand(beams, K, -1, -1)
    return torch.cat([prev, local[:, :, None]], dim=2)


def roll_back(states: list, loc_history: list, rejected_at: dict, pos: int) -> dict | None:
    """The state to decode again after a rollback to response position ``pos``, as the official code finds it:
    it drops the ``cur_response_lens − pos − 2`` latest states and takes the second-to-last (so step ``pos``, or
    the step before the current one when ``pos`` is that recent); the tokens chosen at that step join the
    step's rejected tokens, and rejections recorded for later steps are forgotten. ``states``: one per step (the
    current one last), each with the flat indices it ``chosen``."""
    step = min(pos, len(states) - 2)
    if step < 0 or "chosen" not in states[step]:
        return None  # the official code's ``except``: no state to return to, decode on
    del states[step + 1:], loc_history[step + 1:]
    for later in [k for k in rejected_at if k > step]:
        del rejected_at[later]
    rejected_at.setdefault(step, []).append(states[step]["chosen"])
    return states[step]


@torch.no_grad()
def opera_one(lm, batch, *, max_new_tokens: int = 16, num_beams: int = 5, scale_factor: float = 50.0,
              threshold: int = 15, num_attn_candidates: int = 5, window_size: int = 512,
              penalty_weights: float = 1.0) -> dict:
    """OPERA's answer for a one-sample ``batch``: ``{"tokens": [...], "rollbacks": n}``."""
    tok = lm.processor.tokenizer
    eos = {int(tok.eos_token_id)} if tok.eos_token_id is not None else set()
    eos |= {int(e) for e in ([lm.model.generation_config.eos_token_id] if isinstance(
        lm.model.generation_config.eos_token_id, int) else (lm.model.generation_config.eos_token_id or []))}
    image = batch.image_positions[0]
    st, reader = Stepper(lm, batch), LastRows()
    S = batch.inputs["input_ids"].shape[1]
    K = num_attn_candidates
    with intervene(lm, batch, reader):
        logits = st.prefill().expand(num_beams, -1)
        rows = torch.zeros(num_beams, dtype=torch.long)
        beam_scores = torch.full((num_beams,), -1e9)
        beam_scores[0] = 0.0
        gen, history = [[] for _ in range(num_beams)], torch.zeros(num_beams, 0, 0)
        hyps, states, loc_history = Hypotheses(num_beams), [], []
        retries, rejected_at, rollbacks = torch.zeros(window_size), {}, 0
        while True:
            states.append(dict(gen=copy.deepcopy(gen), scores=beam_scores.clone(), hyps=copy.deepcopy(hyps),
                               history=history, rows=rows, logits=logits,
                               cache=(st.cache, st.mask, st.length, st.deltas)))
            cand_scores, cand_tokens = torch.topk(logits, K, dim=-1)
            # the look-ahead is kept: a chosen candidate's forward is the next step's beam forward
            ahead, ahead_rows = st.step(cand_tokens.reshape(-1), rows.repeat_interleave(K)), reader.rows
            cand_rows = ahead_rows.view(num_beams, K, -1)
            window = opera_window(history, cand_rows, S)
            penalty, locs = candidate_penalty(window, cand_rows[..., image].sum(-1), scale_factor)
            per_beam, loc = rollback_location(locs)
            loc_history.append(per_beam[:, None])
            pos = rollback_position(torch.cat(loc_history, -1), loc, retries, threshold=threshold,
                                    num_attn_candidates=K, response_len=window.shape[-1],
                                    history_length=window_size)
            redo = roll_back(states, loc_history, rejected_at, pos) if pos is not None else None
            if redo is not None:
                rollbacks += 1
                gen, beam_scores, hyps = copy.deepcopy(redo["gen"]), redo["scores"], copy.deepcopy(redo["hyps"])
                history, rows, logits = redo["history"], redo["rows"], redo["logits"]
                st.cache, st.mask, st.length, st.deltas = redo["cache"]
                next_logits = rejecting_logits(logits, torch.cat(rejected_at[len(states) - 1]))
            else:
                next_logits = candidate_logits(logits, cand_tokens, cand_scores - penalty_weights * penalty)
            scores = torch.log_softmax(next_logits, dim=-1)
            beam_scores, new_tokens, src, done = beam_step(scores, beam_scores, gen, hyps, eos, num_beams, S)
            states[-1]["chosen"] = src * scores.shape[-1] + new_tokens
            gen = [gen[b] + [t] for b, t in zip(src.tolist(), new_tokens.tolist())]
            if done or len(gen[0]) >= max_new_tokens:
                break
            hit = cand_tokens[src] == new_tokens[:, None]  # [beams, K]
            if redo is None and bool(hit.any(-1).all()):
                rows = src * K + hit.float().argmax(-1)
                logits, row = ahead[rows], ahead_rows[rows, S:]
            else:  # after a rollback, or a token outside the candidates: the official separate forward
                st.cache, st.mask, st.length, st.deltas = states[-1]["cache"]
                logits = st.step(new_tokens, states[-1]["rows"][src] if redo is None else rows[src])
                rows, row = torch.arange(num_beams), reader.rows[:, S:]
            prev = torch.nn.functional.pad(history[src], (0, row.shape[-1] - history.shape[-1]))
            history = torch.cat([prev, row[:, None]], dim=1)
    if not done:  # ``finalize``: running beams join the hypotheses unless the search was already done
        for b in range(num_beams):
            hyps.add(gen[b], float(beam_scores[b]), S + len(gen[b]))
    best = max(hyps.beams, key=lambda h: h[0])[1]
    return {"tokens": best, "rollbacks": rollbacks}


def opera(lm, samples, *, post_prompt: str | None = POST_PROMPT, decoding=None, **params) -> list[str]:
    """OPERA's answers, one sample at a time (`opera_one`; ``params``: `methods.opera.OPERA_DEFAULTS`)."""
    max_new = decoding.max_new_tokens if decoding is not None else 16
    kw = {**{k: v for k, v in OPERA_DEFAULTS.items()}, **params}
    out = []
    for s in samples:
        batch = lm.prepare([s], post_prompt=post_prompt)
        res = opera_one(lm, batch, max_new_tokens=max_new, **kw)
        out.append(lm.processor.tokenizer.decode(res["tokens"], skip_special_tokens=True).strip())
    return out


__all__ = ["LastRows", "Hypotheses", "beam_step", "roll_back", "opera_window", "opera_one", "opera"]
