"""Scorers for the paper's benchmarks and the distribution metrics its analyses use.

Answer scorers reproduce what lmms-eval (and, for MMBench letter extraction, VLMEvalKit) compute, so numbers are
comparable with published tables:

``vqa_accuracy``  VQAv2 / OK-VQA / VizWiz / TextVQA. The EvalAI answer processor (``normalize_answer``) is applied,
    then for each of the N gold answers the accuracy against the *other* N-1 answers is min(1, #matches / 3), and
    the score is the mean of those N numbers (the official leave-one-out average). With 10 answers of which k equal
    the prediction: k=0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >=4 -> 1.
    Two preprocessing variants exist in lmms-eval and both are reproduced (``variant=``):

      - ``"vqav2"`` (lmms-eval ``vqav2_process_results``, like the official ``vqaEval.py``): the prediction goes
        through the full processor; gold answers are only stripped, and both sides get the punctuation and
        digit/article steps only when the gold answers are not all identical.
      - ``"full"`` (lmms-eval OK-VQA / VizWiz / TextVQA): prediction and every gold answer go through the full
        processor.

    Other list lengths: the same leave-one-out formula is applied with N-1 "others" (so with 4 answers one match
    among the others already gives 1/3, three give 1). Deviations from lmms-eval, which never sees such lists:
    an empty list scores 0.0 and a single answer scores 1.0 on a normalised exact match (the leave-one-out formula
    would give 0 for every prediction).
``exact_match``   GQA: lmms-eval's ``exact_match`` with ``ignore_case`` and ``ignore_punctuation`` (lower-case, delete
    every ``string.punctuation`` character, compare). Leading/trailing whitespace is stripped (lmms-eval's model
    wrappers strip generations). Several gold answers: 1 if any matches.
``anls``          DocVQA: lmms-eval's ANLS (from Qwen-VL): whitespace-collapsed, lower-cased strings, Levenshtein
    distance divided by the longer *raw* length, similarity = 1 - min distance over gold answers, set to 0 when below
    the threshold (0.5).
``option_accuracy`` MMBench: the chosen letter is inferred with VLMEvalKit's ``can_infer`` (a lone option letter
    after punctuation is turned into spaces, else exactly one option text contained in the answer); 1.0 if it
    equals the gold letter. Not reproduced: the GPT judge VLMEvalKit/lmms-eval call when nothing can be inferred
    (we score 0). This is per-row accuracy, what the paper reports; ``circular_accuracy`` gives MMBench's
    CircularEval from the same rows (the dev set already holds each question's rotated copies, index + k·10^6).
    CircularEval is lmms-eval's default, so summaries report it as the accuracy of an ``option``-scored run
    (``benchmark_accuracy``), with the per-row accuracy beside it.

Distribution metrics (numpy or torch inputs, renormalised along ``axis``): ``hellinger`` (the paper's H(P, Q) =
(1/sqrt 2)·||sqrt P - sqrt Q||_2), ``jensen_shannon`` (DoLa's layer-selection divergence) and ``topk_overlap``.
"""
from __future__ import annotations

import math
import re
import string
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "normalize_answer", "EvalAIAnswerProcessor", "vqa_accuracy", "exact_match", "anls", "levenshtein",
    "infer_option", "option_accuracy", "circular_accuracy", "benchmark_accuracy", "score", "hellinger",
    "jensen_shannon", "topk_overlap",
]


class EvalAIAnswerProcessor:
    """The EvalAI / official VQA answer normalisation, as lmms-eval's ``EvalAIAnswerProcessor`` implements it.

    Quirks kept on purpose (they change scores): the period regex ``(?!<=\\d)(\\.)(?!\\d)`` is the official one (a
    look-*ahead* typo, so "3.5" keeps its dot but "a.m." loses them), ``re.sub`` is given ``re.UNICODE`` as its
    *count* (at most 32 periods removed), and ``word_tokenize`` turns "'s" into " 's".
    """

    CONTRACTIONS = {
        "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
        "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
        "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
        "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
        "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
        "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
        "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
        "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
        "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
        "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
        "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
        "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
        "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
        "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
        "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
        "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
        "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
        "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
        "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
        "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
        "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
        "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
        "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
        "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
        "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
        "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
        "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
        "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
        "youve": "you've",
    }
    NUMBER_MAP = {
        "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
        "seven": "7", "eight": "8", "nine": "9", "ten": "10",
    }
    ARTICLES = ["a", "an", "the"]
    PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
    COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
    PUNCTUATIONS = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                    ",", "?", "!"]

    def word_tokenize(self, word: str) -> str:
        word = word.lower()
        word = word.replace(",", "").replace("?", "").replace("'s", " 's")
        return word.strip()

    def process_punctuation(self, in_text: str) -> str:
        out_text = in_text
        for p in self.PUNCTUATIONS:
            # a punctuation mark next to a space (or any digit,digit pattern in the text) is deleted, else -> space
            if (p + " " in in_text or " " + p in in_text) or (re.search(self.COMMA_STRIP, in_text) is not None):
                out_text = out_text.replace(p, "")
            else:
                out_text = out_text.replace(p, " ")
        out_text = self.PERIOD_STRIP.sub("", out_text, re.UNICODE)  # sic: re.UNICODE (=32) is the count
        return out_text

    def process_digit_article(self, in_text: str) -> str:
        out_text = []
        for word in in_text.lower().split():
            word = self.NUMBER_MAP.get(word, word)
            if word not in self.ARTICLES:
                out_text.append(word)
        for i, word in enumerate(out_text):
            if word in self.CONTRACTIONS:
                out_text[i] = self.CONTRACTIONS[word]
        return " ".join(out_text)

    def __call__(self, item: str) -> str:
        item = self.word_tokenize(item)
        item = item.replace("\n", " ").replace("\t", " ").strip()
        item = self.process_punctuation(item)
        item = self.process_digit_article(item)
        return item


_EVALAI = EvalAIAnswerProcessor()


def normalize_answer(text: Any) -> str:
    """EvalAI normalisation of one answer: lower-case, punctuation, number words -> digits, articles, contractions."""
    return _EVALAI(_as_text(text))


def _as_text(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, float) and math.isnan(x):
        return ""
    return x if isinstance(x, str) else str(x)


def vqa_accuracy(pred: Any, answers: Sequence[Any], *, variant: str = "full") -> float:
    """VQA soft accuracy: mean over the N leave-one-out subsets of min(1, #matches / 3).

    ``variant="full"`` processes gold answers like lmms-eval's OK-VQA/VizWiz/TextVQA tasks, ``"vqav2"`` like its
    VQAv2 task (see the module docstring). An empty answer list scores 0.0; a single answer scores 1.0 on a
    normalised match (lmms-eval's formula would always give 0 there).
    """
    if variant not in ("full", "vqav2"):
        raise ValueError(f"Unknown vqa_accuracy variant {variant!r}; use 'full' or 'vqav2'.")
    gts = [_as_text(a) for a in (answers or [])]
    if not gts:
        return 0.0
    res = _EVALAI(_as_text(pred))
    if variant == "full":
        gts = [_EVALAI(a) for a in gts]
    else:
        gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in gts]
        if len(set(gts)) > 1:
            gts = [_EVALAI.process_digit_article(_EVALAI.process_punctuation(a)) for a in gts]
            res = _EVALAI.process_digit_article(_EVALAI.process_punctuation(res))
    if len(gts) == 1:
        return 1.0 if gts[0] == res else 0.0
    n_match = sum(a == res for a in gts)
    accs = []
    for a in gts:
        others = n_match - (a == res)  # matches among the other N-1 answers
        accs.append(min(1.0, others / 3.0))
    return float(sum(accs) / len(accs))


_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def _em_norm(s: Any) -> str:
    return _as_text(s).strip().lower().translate(_PUNCT_TABLE)


def exact_match(pred: Any, answers: Sequence[Any] | str) -> float:
    """GQA exact match (lmms-eval ``exact_match`` with ignore_case and ignore_punctuation); 1 if any answer matches."""
    if isinstance(answers, str):
        answers = [answers]
    p = _em_norm(pred)
    return 1.0 if any(p == _em_norm(a) for a in (answers or [])) else 0.0


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(pred: Any, answers: Sequence[Any] | str, threshold: float = 0.5) -> float:
    """DocVQA ANLS of one prediction, exactly as lmms-eval computes it (0 below ``threshold``)."""
    if isinstance(answers, str):
        answers = [answers]
    answers = [_as_text(a) for a in (answers or [])]
    if not answers:
        return 0.0
    raw_pred = _as_text(pred)
    det = " ".join(raw_pred.strip().lower().split())
    values = []
    for ans in answers:
        gt = " ".join(ans.strip().lower().split())
        dist = levenshtein(gt, det)
        length = max(len(ans.upper()), len(raw_pred.upper()))  # raw lengths, as lmms-eval
        values.append(0.0 if length == 0 else float(dist) / float(length))
    result = 1.0 - min(values)
    return 0.0 if result < threshold else float(result)


_OPTION_PUNCT = ".()[],:;!*#{}"
_REJECTIONS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)


def _can_infer_option(answer: str, letters: Sequence[str]) -> str | None:
    if "Failed to obtain answer via API" in answer:
        return None
    if any(r in answer for r in _REJECTIONS):
        return "Z"
    mod = answer
    for c in _OPTION_PUNCT:
        mod = mod.replace(c, " ")
    splits = [x.strip() for x in mod.split()]
    found = [ch for ch in letters if ch in splits]
    if len(found) == 1:
        if "A" in splits and len(splits) > 3:
            return None  # "A" is probably the article ("A cat sits ..."): leave it to text matching
        return found[0]
    if not found and "Z" in splits:
        return "Z"
    return None


def _can_infer_text(answer: str, options: Mapping[str, str]) -> str | None:
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    cands = [k for k, v in options.items() if str(v).lower() in answer]
    return cands[0] if len(cands) == 1 else None


def infer_option(pred: Any, choices: Sequence[str] | Mapping[str, str]) -> str | None:
    """The option letter a free answer picks (VLMEvalKit ``can_infer``), or None if it cannot be told.

    ``choices`` are the option texts in letter order (A, B, ...) or a {letter: text} mapping. Returns "Z" for
    VLMEvalKit's refusal patterns.
    """
    options = dict(choices) if isinstance(choices, Mapping) else {chr(65 + i): str(c) for i, c in enumerate(choices)}
    text = _as_text(pred)
    return _can_infer_option(text, list(options)) or _can_infer_text(text, options)


def option_accuracy(pred: Any, answer_letter: str, choices: Sequence[str] | Mapping[str, str]) -> float:
    """MMBench single-row accuracy: 1.0 if the inferred option letter equals ``answer_letter``."""
    got = infer_option(pred, choices)
    return 1.0 if got is not None and got == _as_text(answer_letter).strip().upper() else 0.0


def circular_accuracy(ids: Sequence[Any], scores: Sequence[float]) -> float:
    """MMBench CircularEval (VLMEvalKit): rows whose ``index`` agree modulo 10^6 are one question asked with its
    options rotated; the question counts only if every copy scores 1. ``ids``: the rows' MMBench ``index`` (the
    ``Sample.id`` the loader gives); ``scores``: their `option_accuracy`. Returns the mean over questions."""
    if len(ids) != len(scores):
        raise ValueError(f"circular_accuracy: {len(ids)} ids but {len(scores)} scores; pass one score per row.")
    if not len(ids):
        raise ValueError("circular_accuracy: no rows given.")
    groups: dict[int, bool] = {}
    for i, sc in zip(ids, scores):
        try:
            key = int(float(str(i).strip())) % 1_000_000  # the loader's meta["circular_group"]
        except ValueError:
            raise ValueError(f"circular_accuracy: id {i!r} is not an MMBench index (an integer); pass the rows' "
                             "'index' column.") from None
        groups[key] = groups.get(key, True) and float(sc) >= 1.0
    return float(np.mean(list(groups.values())))


def benchmark_accuracy(ids: Sequence[Any], scores: Sequence[float], scorer: str | None = None) -> float:
    """The accuracy a benchmark reports for the rows of one condition: MMBench's CircularEval for the ``option``
    scorer (lmms-eval's default), else the mean row score. ``ids``: the rows' sample ids; ``scores``: their scores."""
    ids, scores = list(ids), [float(x) for x in scores]
    if scorer == "option":
        return circular_accuracy(ids, scores)
    if not scores:
        raise ValueError("benchmark_accuracy: no rows given.")
    return float(np.mean(scores))


def score(scorer: str, pred: Any, sample) -> float:
    """Score one prediction for one ``Sample`` with the named scorer ("vqa", "exact", "anls" or "option").

    For "vqa" the variant follows ``sample.meta["benchmark"]`` ("vqav2" -> lmms-eval's VQAv2 preprocessing).
    """
    if scorer == "vqa":
        variant = "vqav2" if (getattr(sample, "meta", None) or {}).get("benchmark") == "vqav2" else "full"
        return vqa_accuracy(pred, sample.answers, variant=variant)
    if scorer == "exact":
        return exact_match(pred, sample.answers)
    if scorer == "anls":
        return anls(pred, sample.answers)
    if scorer == "option":
        if not sample.choices:
            raise ValueError(f"Sample {sample.id!r} has no choices; the 'option' scorer needs Sample.choices.")
        if not sample.answers:
            return 0.0
        return option_accuracy(pred, sample.answers[0], sample.choices)
    raise ValueError(f"Unknown scorer {scorer!r}; use one of vqa, exact, anls, option.")


# ----------------------------------------------------------------------------------------------------------------
# distribution metrics
# ----------------------------------------------------------------------------------------------------------------

def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _normalise(x, axis, xp):
    if xp == "torch":
        x = x.clamp_min(0)
        return x / x.sum(dim=axis, keepdim=True)
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, None)
    with np.errstate(invalid="ignore", divide="ignore"):
        return x / x.sum(axis=axis, keepdims=True)


def _prep(p, q):
    if _is_torch(p) or _is_torch(q):
        import torch

        p = torch.as_tensor(p)
        q = torch.as_tensor(q, device=p.device)
        dt = torch.promote_types(torch.promote_types(p.dtype, q.dtype), torch.float32)
        return p.to(dt), q.to(dt), "torch"
    return p, q, "numpy"


def _out(v):
    return float(v) if isinstance(v, np.ndarray) and v.ndim == 0 else v


def hellinger(p, q, axis: int = -1):
    """Hellinger distance (1/sqrt 2)·||sqrt p - sqrt q||_2 along ``axis``, in [0, 1].

    Negative entries are clipped to 0 and both inputs renormalised to sum 1 along ``axis`` (an all-zero slice gives
    nan). Accepts numpy arrays (returns a float or an array) or torch tensors (returns a tensor); broadcasts.
    """
    p, q, xp = _prep(p, q)
    p, q = _normalise(p, axis, xp), _normalise(q, axis, xp)
    if xp == "torch":
        d = (p.sqrt() - q.sqrt()).pow(2).sum(dim=axis).sqrt() / math.sqrt(2.0)
        return d.clamp(0.0, 1.0)
    d = np.sqrt(((np.sqrt(p) - np.sqrt(q)) ** 2).sum(axis=axis)) / math.sqrt(2.0)
    return _out(np.clip(d, 0.0, 1.0))


def jensen_shannon(p, q, axis: int = -1, base: float | None = None):
    """Jensen-Shannon divergence 0.5·KL(p||m) + 0.5·KL(q||m), m = (p+q)/2, along ``axis``.

    Natural log by default (DoLa's choice; max ln 2); ``base=2`` gives values in [0, 1]. Inputs are clipped and
    renormalised like ``hellinger``. This is the divergence, not its square root.
    """
    p, q, xp = _prep(p, q)
    p, q = _normalise(p, axis, xp), _normalise(q, axis, xp)
    scale = 1.0 / math.log(base) if base else 1.0
    if xp == "torch":
        import torch

        m = 0.5 * (p + q)

        def kl(a):
            return torch.where(a > 0, a * (torch.log(a.clamp_min(1e-38)) - torch.log(m.clamp_min(1e-38))),
                               torch.zeros_like(a)).sum(dim=axis)

        return (0.5 * kl(p) + 0.5 * kl(q)).clamp_min(0) * scale
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        def kl(a):
            return np.where(a > 0, a * (np.log(np.where(a > 0, a, 1.0)) - np.log(np.where(a > 0, m, 1.0))),
                            0.0).sum(axis=axis)

        js = 0.5 * kl(p) + 0.5 * kl(q)
    return _out(np.clip(js, 0.0, None) * scale)


def topk_overlap(a, b, k: int):
    """Fraction of the top-``k`` indices (along the last axis) that ``a`` and ``b`` share, in [0, 1].

    Ties are broken by index (stable sort). 1-D inputs give a float, batched inputs an array over leading dims.
    """
    a = a.detach().float().cpu().numpy() if _is_torch(a) else np.asarray(a, dtype=np.float64)
    b = b.detach().float().cpu().numpy() if _is_torch(b) else np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"topk_overlap needs equal shapes, got {a.shape} and {b.shape}.")
    n = a.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and {n}, got {k}.")
    ta = np.argsort(-a, axis=-1, kind="stable")[..., :k]
    tb = np.argsort(-b, axis=-1, kind="stable")[..., :k]
    ma = np.zeros(a.shape, dtype=bool)
    mb = np.zeros(b.shape, dtype=bool)
    np.put_along_axis(ma, ta, True, axis=-1)
    np.put_along_axis(mb, tb, True, axis=-1)
    out = (ma & mb).sum(axis=-1) / float(k)
    return float(out) if np.ndim(out) == 0 else out
