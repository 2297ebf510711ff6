"""Verdict rules: each compares a measurement with the paper's claim by a stated rule."""
from __future__ import annotations

import pandas as pd

from fusion_utils import report


def _summary(accs, gain=0.0):
    return pd.DataFrame([dict(variant="soft", candidates=k, rho=0.2, lam=0.1, accuracy=a, plain_accuracy=0.5,
                              gain=gain) for k, a in accs.items()])


def _candidate_verdict(accs):
    rows = report.contrastive_verdicts("m", _summary(accs))
    return [r for r in rows if "fusion layers beats" in r["claim"]][0]["verdict"]


def test_candidate_set_verdicts():
    assert _candidate_verdict({"fusion": 0.6, "shallow": 0.5, "all": 0.4}) == report.REPRODUCES
    assert _candidate_verdict({"fusion": 0.6, "shallow": 0.6, "all": 0.4}) == report.PARTLY
    assert _candidate_verdict({"fusion": 0.5, "shallow": 0.5, "all": 0.5}) == report.NO  # no effect at all
    assert _candidate_verdict({"fusion": 0.4, "shallow": 0.5}) == report.NO


def test_gain_and_layer_verdicts():
    rows = report.contrastive_verdicts("m", _summary({"fusion": 0.6}, gain=0.03))
    assert rows[0]["verdict"] == report.REPRODUCES
    s = pd.DataFrame({"layer": range(8), "drop": [0.4, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]})
    v = report.fusion_verdicts("m", "llava", s, {"fusion_layers": [0, 1], "review_layer": None, "threshold": 0.05}, 8)
    assert [r["verdict"] for r in v] == [report.REPRODUCES, report.REPRODUCES]
    rv = report.review_verdicts("m", "qwen2_vl", {"review_layer": None}, None, None, 8)
    assert rv[0]["verdict"] == report.REPRODUCES  # Qwen: no review layer expected
    rv = report.review_verdicts("m", "llava", {"review_layer": None}, None, None, 8)
    assert rv[0]["verdict"] == report.NO
