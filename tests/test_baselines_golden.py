"""Golden tests: CD, OPERA and DoLa against their official formulas computed by hand on fixed fixtures, and the
new rows (cd, opera) on every tiny architecture."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusion_utils.data.sample import Sample
from fusion_utils.experiments import baselines as BL
from fusion_utils.experiments.common import Decoding, answer
from fusion_utils.experiments.opera import opera
from fusion_utils.methods.cd import cd_scores
from fusion_utils.methods.dola import premature_choice
from fusion_utils.methods.opera import candidate_penalty, local_scores, rollback_location, rollback_position
from fusion_utils.metrics import jensen_shannon


def test_cd_golden():
    """log p_e − log p_a on V_head = {p_e ≥ 0.1·max p_e}, by hand."""
    e = torch.tensor([[3.0, 2.5, 0.5, -2.0]])
    a = torch.tensor([[4.0, 0.0, 1.0, 0.0]])
    pe, pa = torch.softmax(e, -1)[0], torch.softmax(a, -1)[0]
    keep = pe >= 0.1 * pe.max()
    assert keep.tolist() == [True, True, False, False]
    want = torch.where(keep, pe.log() - pa.log(), torch.tensor(float("-inf")))
    got = cd_scores(e, a)[0]
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[keep], want[keep])
    assert int(got.argmax()) == 1 and int(e.argmax()) == 0  # the amateur's favourite loses to the expert's second


def test_opera_golden():
    """The over-trust score, the penalty and the rollback decision of ``opera_beam_search`` by hand."""
    W = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.4, 0.0], [0.5, 0.3, 0.2]])
    # column j: 1e-7 · ∏_{i ≥ j} 50·W[i, j]; stored in float16
    want = [1e-7 * 50 * 50 * 0.6 * 50 * 0.5, 1e-7 * 50 * 0.4 * 50 * 0.3, 1e-7 * 50 * 0.2]
    want16 = torch.tensor(want).to(torch.float16).float()
    torch.testing.assert_close(local_scores(W, 50.0), want16)
    windows = torch.stack([W, W.flip(-1).flip(-2).tril()])[None]  # [beams=1, K=2, 3, 3]
    img = torch.tensor([[0.3, 0.1]])
    penalty, locs = candidate_penalty(windows, img, 50.0)
    assert torch.equal(penalty, -img)  # a window of at most 10 columns: minus the image attention
    assert int(locs[0, 0]) == 0
    big = torch.eye(12)[None, None].expand(1, 2, 12, 12).clone()
    big[..., 11, 11] = 0.0
    big[..., 11, 4] = 1.0  # the last row piles on column 4, so column 4 wins... unless the diagonal wins first
    penalty, locs = candidate_penalty(big, img, 50.0)
    scores = local_scores(big, 50.0)
    assert torch.equal(penalty, scores.max(-1).values)  # beyond 10 columns: the rollback score
    # the rollback decision: every beam's history holds the location more than `threshold` times, and it is >= 10
    per_beam, loc = rollback_location(torch.tensor([[12, 12, 3], [12, 5, 12]]))
    assert per_beam.tolist() == [12, 12] and loc == 12
    retries = torch.zeros(512)
    hist = torch.full((2, 16), 12)
    assert rollback_position(hist, 12, retries, threshold=15, response_len=20) == 13 and retries[13] == 1
    assert rollback_position(hist[:, :15], 12, retries, threshold=15, response_len=20) is None  # 15 is not > 15
    assert rollback_position(torch.full((2, 16), 9), 9, retries, threshold=15, response_len=20) is None  # < 10
    retries[13] = 5
    assert rollback_position(hist, 12, retries, threshold=15, response_len=20) == 12  # retried out: one earlier
    retries[12] = 5
    assert rollback_position(hist, 12, retries, threshold=15, response_len=20) is None


def official_dola_layer(final: torch.Tensor, layers: torch.Tensor) -> int:
    """voidism/DoLa ``dola_greedy_decode`` steps 2-6, verbatim in substance, for one row (batch mean of one)."""
    softmax_mature_layer = F.softmax(final, dim=-1)
    softmax_premature_layers = F.softmax(layers, dim=-1)
    M = 0.5 * (softmax_mature_layer[None, :, :] + softmax_premature_layers)
    log_softmax_mature_layer = F.log_softmax(final, dim=-1)
    log_softmax_premature_layers = F.log_softmax(layers, dim=-1)
    kl1 = F.kl_div(log_softmax_mature_layer[None, :, :], M, reduction="none").mean(-1)
    kl2 = F.kl_div(log_softmax_premature_layers, M, reduction="none").mean(-1)
    js_divs = (0.5 * (kl1 + kl2)).mean(-1)
    return int(js_divs.argmax())


def test_dola_reproduces_the_official_choice():
    g = torch.Generator().manual_seed(0)
    C, B, V = 4, 400, 50
    final = torch.randn(B, V, generator=g) * 3
    layers = torch.randn(C, B, V, generator=g) * 3
    ours = premature_choice(final, layers)
    official = torch.tensor([official_dola_layer(final[b:b + 1], layers[:, b:b + 1]) for b in range(B)])
    assert torch.equal(ours, official)
    textbook = jensen_shannon(torch.softmax(final, -1)[None].expand(C, -1, -1), torch.softmax(layers, -1),
                              axis=-1).argmax(0)
    assert (textbook != official).any()  # the reference matters: the textbook JS picks other layers


def test_opera_one_beam_without_penalty_is_greedy(lm, samples):
    """One beam, no penalty: OPERA's loop picks greedy's first token (the engine, stepper and beam bookkeeping).
    Later tokens may differ: a beam search sets an end-of-sequence hypothesis aside and continues, greedy stops."""
    dec = Decoding(max_new_tokens=1)
    got = opera(lm, samples[:2], decoding=dec, num_beams=1, penalty_weights=0.0)
    assert got == answer(lm, samples[:2], decoding=dec, batch_size=1)  # one sample per call, as OPERA
    full = opera(lm, samples[:1], decoding=Decoding(max_new_tokens=3))  # the defaults run on every architecture
    assert isinstance(full[0], str)


def test_cd_with_itself_as_amateur_at_tiny_temperature(lm, samples):
    """An amateur equal to the expert gives log p − log p = 0 on V_head: the first plausible token (the argmax
    among zeros) -- a degenerate but exact check that both step in lock-step; and a real run answers."""
    dec = Decoding(max_new_tokens=3)
    got = BL.cd(lm, samples[:2], amateur=lm, decoding=dec)
    assert len(got) == 2 and all(isinstance(x, str) for x in got)
    e = torch.randn(2, 7)
    assert torch.count_nonzero(torch.nan_to_num(cd_scores(e, e), neginf=0.0)) == 0


def test_cd_rejects_another_vocabulary(lm, monkeypatch):
    """An amateur whose tokenizer has one token more is refused (the same architecture, so only the vocabulary
    differs), and one with the expert's own vocabulary is taken."""
    from fusion_utils import load_model
    from fusion_utils.testing import tiny_model_dir

    same = load_model(tiny_model_dir(lm.spec.model_type))
    monkeypatch.setitem(BL.AMATEURS, ("same", str(lm.device), str(lm.dtype)), same)
    assert BL.load_amateur(lm, "same") is same
    am = load_model(tiny_model_dir(lm.spec.model_type))
    am.processor.tokenizer.add_tokens(["<cd_probe_token>"])
    assert am.processor.tokenizer.get_vocab() != lm.processor.tokenizer.get_vocab()
    monkeypatch.setitem(BL.AMATEURS, ("x", str(lm.device), str(lm.dtype)), am)
    with pytest.raises(ValueError, match="another vocabulary"):
        BL.load_amateur(lm, "x")


def test_opera_roll_back_state():
    """``roll_back`` returns the state the official code revives and accumulates the rejected choices."""
    from fusion_utils.experiments.opera import roll_back

    states = [{"step": k, "chosen": torch.tensor([10 * k])} for k in range(6)]
    locs, rejected = [torch.zeros(1, 1)] * 6, {5: [torch.tensor([0])]}
    redo = roll_back(states, locs, rejected, 3)
    assert redo["step"] == 3 and len(states) == 4 and len(locs) == 4
    assert [int(x) for x in torch.cat(rejected[3])] == [30] and 5 not in rejected
    states[-1]["chosen"] = torch.tensor([31])  # the redo chose again at step 3
    states += [{"step": 4, "chosen": torch.tensor([40])}, {"step": 5}]
    redo = roll_back(states, locs, rejected, 3)
    assert redo["step"] == 3 and [int(x) for x in torch.cat(rejected[3])] == [30, 31]
    recent = [{"step": k, "chosen": torch.tensor([k])} for k in range(3)]
    assert roll_back(recent, [0] * 3, {}, 7)["step"] == 1  # a position this recent: the step before the current
    assert roll_back([{"step": 0}], [0], {}, 3) is None


def test_opera_rollback_fires_and_ends():
    """With threshold 0 the rollback fires on a tiny Qwen2-VL past ten tokens; decoding still ends, and the
    answer differs from the one without rollbacks."""
    from fusion_utils import load_model
    from fusion_utils.experiments.opera import opera_one
    from fusion_utils.testing import sample_images, tiny_model_dir

    lm = load_model(tiny_model_dir("qwen2_vl"))
    b = lm.prepare([Sample("s0", sample_images(1, seed=0)[0], "what is the color of the object ?", ["red"])])
    kw = dict(max_new_tokens=14, num_beams=2, num_attn_candidates=2)
    fired = opera_one(lm, b, threshold=0, **kw)
    plain = opera_one(lm, b, **kw)
    assert fired["rollbacks"] > 0 and plain["rollbacks"] == 0
    assert fired["tokens"] != plain["tokens"] and len(fired["tokens"]) <= 14
