"""Golden cases for the benchmark scorers (hand-computed) and the distribution metrics."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fusion_utils.data.sample import Sample
from fusion_utils.metrics import (anls, exact_match, hellinger, infer_option, jensen_shannon, levenshtein,
                                  normalize_answer, option_accuracy, score, topk_overlap, vqa_accuracy)


# ---------------------------------------------------------------- EvalAI normalisation
@pytest.mark.parametrize("raw, norm", [
    ("Two", "2"),                      # number words -> digits
    ("none", "0"),
    ("The cat.", "cat"),               # article and final period removed
    ("an apple", "apple"),
    ("1,000", "1000"),                 # comma between digits
    ("3.5", "3.5"),                    # a period before a digit is kept
    ("a.m.", "am"),                    # other periods removed
    ("dont", "don't"),                 # contractions table
    ("Black-and-white", "black and white"),  # punctuation without surrounding space -> space
    ("yes, it is", "yes it is"),
    ("fire hydrant?", "fire hydrant"),
    ("Hello!", "hello"),
    ("x - y", "x y"),                  # punctuation next to a space is deleted
    ("man's", "man 's"),               # word_tokenize quirk, kept on purpose
    ("  red\n", "red"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


# ---------------------------------------------------------------- VQA accuracy
@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_leave_one_out_10_answers(k, expected):
    # k matching answers: the k matching subsets see k-1 matches, the 10-k others see k
    answers = ["cat"] * k + [f"other{i}" for i in range(10 - k)]
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)
    assert vqa_accuracy("cat", answers, variant="vqav2") == pytest.approx(expected)


def test_vqa_two_matches_is_point_six_by_hand():
    # 2 subsets (leaving out a match): 1 match among 9 -> 1/3; 8 subsets: 2 matches -> 2/3; mean = (2/3+16/3)/10
    assert vqa_accuracy("two", ["2", "2"] + ["3"] * 8) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10) == 0.6


def test_vqa_normalises_prediction_and_answers():
    assert vqa_accuracy("Two.", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("The Dog", ["dog"] * 10) == 1.0
    assert vqa_accuracy("1,000", ["1000"] * 10) == 1.0


def test_vqa_variants_differ_like_lmms_eval():
    # lmms-eval's VQAv2 task only strips identical gold answers; OK-VQA/VizWiz/TextVQA normalise them all
    assert vqa_accuracy("red", ["Red"] * 10, variant="full") == 1.0
    assert vqa_accuracy("red", ["Red"] * 10, variant="vqav2") == 0.0
    # diverse answers get punctuation/digit processing in both: gold -> 2, 2, 2, three ; pred -> 2
    # three subsets see 2 matches (2/3), the one leaving out "three" sees 3 (1) -> (3 * 2/3 + 1) / 4
    assert vqa_accuracy("two", ["Two", "2", "2", "three"], variant="vqav2") == pytest.approx(0.75)


def test_vqa_other_lengths():
    # 4 answers, 2 match: each matching subset sees 1 -> 1/3, each other sees 2 -> 2/3 ; mean 0.5
    assert vqa_accuracy("a1", ["a1", "a1", "b", "c"]) == pytest.approx(0.5)
    assert vqa_accuracy("x", []) == 0.0
    assert vqa_accuracy("cat", ["cat"]) == 1.0 and vqa_accuracy("dog", ["cat"]) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("x", ["x"], variant="nope")


# ---------------------------------------------------------------- exact match (GQA)
@pytest.mark.parametrize("pred, answers, expected", [
    ("Yes.", ["yes"], 1.0),
    (" Left ", ["left"], 1.0),
    ("black-white", ["blackwhite"], 1.0),   # punctuation deleted, not spaced
    ("the dog", ["dog"], 0.0),              # no article removal in GQA's exact match
    ("two", ["2"], 0.0),                    # no number mapping either
    ("no", "no", 1.0),
    ("no", [], 0.0),
])
def test_exact_match(pred, answers, expected):
    assert exact_match(pred, answers) == expected


# ---------------------------------------------------------------- ANLS (DocVQA)
def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0


def test_anls_golden():
    assert anls("hello wrld", ["hello world"]) == pytest.approx(1 - 1 / 11)
    assert anls("  University  of California ", ["university of california"]) == 1.0
    assert anls("abcd", ["abxy"]) == pytest.approx(0.5)       # exactly at the threshold: kept
    assert anls("abcde", ["abxyz"]) == 0.0                   # 0.4 < 0.5 -> 0
    assert anls("abcde", ["abxyz"], threshold=0.3) == pytest.approx(0.4)
    assert anls("0.28", ["0.29", "0.28"]) == 1.0              # max over answers
    # lmms-eval divides by the *raw* lengths: "A  B" (4 chars) vs "a c" -> 1 - 1/4
    assert anls("A  B", ["a c"]) == pytest.approx(0.75)
    assert anls("x", []) == 0.0


# ---------------------------------------------------------------- MMBench option extraction
CH = ["cat", "dog", "a red bird", "fish"]


@pytest.mark.parametrize("pred, letter", [
    ("B", "B"), ("B.", "B"), ("(B) dog", "B"), ("B: dog", "B"), ("The answer is C", "C"),
    ("dog", "B"), ("a red bird.", "C"),          # option text
    ("A red bird.", "A"),                        # VLMEvalKit: a capital "A" token in <= 3 tokens is the letter
    ("A", "A"), ("A cat", "A"),                  # short answers: "A" is the letter
    ("B or C", None), ("I do not know", None),   # ambiguous / nothing
    ("Cannot determine the answer", "Z"),        # VLMEvalKit refusal
])
def test_infer_option(pred, letter):
    assert infer_option(pred, CH) == letter


def test_infer_option_quantifier_guard():
    # "A" with more than 3 tokens is taken as the article; the option text then decides
    assert infer_option("A dog is sitting", ["a cat sitting on a mat", "dog", "fish in water", "bird in sky"]) == "B"
    assert infer_option("B", {"A": "x", "B": "y"}) == "B"


def test_option_accuracy():
    assert option_accuracy("(B) dog", "B", CH) == 1.0
    assert option_accuracy("dog", "A", CH) == 0.0
    assert option_accuracy("B or C", "B", CH) == 0.0


# ---------------------------------------------------------------- dispatch
def _s(answers, choices=None, benchmark=None):
    return Sample(id="q", image=Image.new("RGB", (2, 2)), question="?", answers=answers, choices=choices,
                  meta={"benchmark": benchmark} if benchmark else {})


def test_score_dispatch():
    assert score("vqa", "two", _s(["2", "2"] + ["3"] * 8)) == pytest.approx(0.6)
    assert score("vqa", "red", _s(["Red"] * 10, benchmark="vqav2")) == 0.0
    assert score("vqa", "red", _s(["Red"] * 10, benchmark="textvqa")) == 1.0
    assert score("exact", "Yes", _s(["yes"])) == 1.0
    assert score("anls", "hello wrld", _s(["hello world"])) == pytest.approx(1 - 1 / 11)
    assert score("option", "B.", _s(["B"], choices=CH)) == 1.0
    with pytest.raises(ValueError, match="scorer"):
        score("bleu", "x", _s(["x"]))
    with pytest.raises(ValueError, match="choices"):
        score("option", "B", _s(["B"]))


# ---------------------------------------------------------------- distributions
def test_hellinger_golden():
    assert hellinger([1, 0], [0, 1]) == pytest.approx(1.0)
    assert hellinger(np.ones(5), np.ones(5)) == pytest.approx(0.0)
    # H = sqrt(1 - sum sqrt(p q)) = sqrt(1 - sqrt(0.5))
    assert hellinger([0.5, 0.5], [1, 0]) == pytest.approx(math.sqrt(1 - math.sqrt(0.5)))
    # renormalised and clipped
    assert hellinger([2, 2], [5, 0]) == pytest.approx(math.sqrt(1 - math.sqrt(0.5)))
    assert hellinger([1, -3], [1, 0]) == pytest.approx(0.0)
    assert isinstance(hellinger([1, 0], [0, 1]), float)


def test_hellinger_batched_and_torch():
    p = np.array([[1.0, 0, 0], [1, 1, 1]])
    q = np.array([[0.0, 1, 0], [1, 1, 1]])
    np.testing.assert_allclose(hellinger(p, q), [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(hellinger(p.T, q.T, axis=0), [1.0, 0.0], atol=1e-12)
    t = hellinger(torch.tensor(p), torch.tensor(q))
    assert isinstance(t, torch.Tensor) and torch.allclose(t, torch.tensor([1.0, 0.0], dtype=t.dtype))
    t16 = hellinger(torch.tensor(p, dtype=torch.float16), torch.tensor(q, dtype=torch.float16))
    assert t16.dtype == torch.float32


def test_jensen_shannon():
    assert jensen_shannon([1, 0], [0, 1]) == pytest.approx(math.log(2))
    assert jensen_shannon([1, 0], [0, 1], base=2) == pytest.approx(1.0)
    assert jensen_shannon([0.2, 0.8], [0.2, 0.8]) == pytest.approx(0.0)
    p, q = np.array([0.1, 0.9]), np.array([0.6, 0.4])
    m = (p + q) / 2
    kl = lambda a, b: float(np.sum(a * np.log(a / b)))
    assert jensen_shannon(p, q) == pytest.approx(0.5 * kl(p, m) + 0.5 * kl(q, m))
    t = jensen_shannon(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), base=2)
    assert torch.allclose(t, torch.tensor([1.0]))


def test_topk_overlap():
    assert topk_overlap([3, 2, 1, 0], [0, 2, 3, 1], 2) == 0.5
    assert topk_overlap([3, 2, 1, 0], [3, 2, 1, 0], 3) == 1.0
    np.testing.assert_allclose(topk_overlap(np.array([[1, 2, 3], [3, 2, 1]]), np.array([[1, 2, 3], [1, 2, 3]]), 1),
                               [1.0, 0.0])
    assert topk_overlap(torch.tensor([0.1, 0.9]), torch.tensor([0.2, 0.8]), 1) == 1.0
    with pytest.raises(ValueError):
        topk_overlap([1, 2], [1, 2], 3)


def test_circular_accuracy_groups_rotations():
    from fusion_utils.metrics import circular_accuracy

    ids = [7, 1_000_007, 2_000_007, 8, 1_000_008, "9"]
    # question 7: all three rotations right; 8: one rotation wrong; 9: a single row, right
    assert circular_accuracy(ids, [1, 1, 1, 1, 0, 1]) == pytest.approx(2 / 3)
    assert circular_accuracy(ids, [1, 1, 0, 1, 1, 1]) == pytest.approx(2 / 3)
    assert circular_accuracy(ids, [1] * 6) == 1.0
    with pytest.raises(ValueError, match="one score per row"):
        circular_accuracy(ids, [1])
    with pytest.raises(ValueError, match="index"):
        circular_accuracy(["q1"], [1])


def test_benchmark_accuracy_is_circular_eval_for_mmbench():
    from fusion_utils.metrics import benchmark_accuracy

    ids, scores = [7, 1_000_007, 8, 1_000_008], [1, 1, 1, 0]
    assert benchmark_accuracy(ids, scores, "option") == pytest.approx(0.5)  # question 8 fails one rotation
    assert benchmark_accuracy(ids, scores, "exact") == pytest.approx(0.75)  # other scorers: the row mean
    assert benchmark_accuracy(ids, scores) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="no rows"):
        benchmark_accuracy([], [], "vqa")
