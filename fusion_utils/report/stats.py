"""Small, dependency-free statistics for the verdict rules: a stable dev/test split, paired tests, CIs, power.

Everything here is seeded: the same input gives the same numbers on every run. Only numpy and the standard library
are used (no scipy), so the rules run wherever the package does.

>>> from fusion_utils.report import stats
>>> r = stats.paired_test([1, 1, 1, 1, 1, 1, 1, 0])
>>> round(r["mean"], 3), r["p"] < 0.05
(0.875, True)
"""
from __future__ import annotations

import hashlib
import itertools
import math
from statistics import NormalDist
from typing import Callable, Iterable, Sequence

import numpy as np

ALPHA = 0.05
POWER = 0.8
N_BOOT = 2000
N_FLIPS = 10000
N_PERMS = 2000
SPLIT_SALT = "fusion_utils/verdicts/v1"

_Z = NormalDist()


def z(q: float) -> float:
    """The standard normal quantile.

    >>> round(z(0.975), 2)
    1.96
    """
    return _Z.inv_cdf(q)


# --- the dev/test split ---------------------------------------------------------------------------------------------

def split_of(sample_id, dev_fraction: float = 0.5, salt: str = SPLIT_SALT) -> str:
    """``"dev"`` or ``"test"`` for one sample id, from a hash of the id alone.

    A hash (not the sample's position or the run's seed) keeps a sample on the same side whatever else is in the
    build, so a setting chosen on dev is never judged on a question it was chosen on, in this build or a bigger one.

    >>> split_of("world-000001") in ("dev", "test")
    True
    """
    h = hashlib.sha256(f"{salt}:{sample_id}".encode()).digest()
    return "dev" if int.from_bytes(h[:8], "big") / 2 ** 64 < dev_fraction else "test"


def split_group(sample) -> str:
    """The key a sample is split by: its image where images repeat, its question where a benchmark copies one.

    GQA asks many questions of one image (``imageId``/``image_id``), a world-fine scene can carry several questions
    (``scene``), and MMBench's rotated copies of one question share an index (``circular_group``); hashing the question
    id would put one image, or one question's copies, on both sides of the split. Otherwise the sample id.

    >>> from types import SimpleNamespace as S
    >>> split_group(S(id="q1", meta={"imageId": "n123"})), split_group(S(id="q2", meta={}))
    ('image:n123', 'q2')
    """
    key = getattr(sample, "group_key", None)
    if isinstance(key, str) and key != str(sample.id):
        return key  # the loader's own group (`Sample.group`): the one source where a loader sets it
    meta = getattr(sample, "meta", None) or {}
    if meta.get("circular_group") is not None:
        return f"mmbench:{meta['circular_group']}"
    for key in ("imageId", "image_id", "scene_id", "scene"):
        if meta.get(key) is not None:
            return f"image:{meta[key]}"
    return str(sample.id)


def split_ids(ids: Iterable, dev_fraction: float = 0.5, groups=None) -> tuple[list, list]:
    """The distinct ids, in first-seen order, as ``(dev, test)``. ``groups``: a mapping id -> split key
    (`split_group`), so that ids sharing an image or a question's copies fall on one side; default each id alone.

    >>> dev, test = split_ids(range(100))
    >>> len(dev) + len(test), set(dev) & set(test)
    (100, set())
    >>> dev, test = split_ids(["a", "b", "c"], groups={"a": "img1", "b": "img1", "c": "img2"})
    >>> ("a" in dev) == ("b" in dev)
    True
    """
    seen = list(dict.fromkeys(ids))
    groups = groups or {}
    side = {i: split_of(groups.get(i, groups.get(str(i), i)), dev_fraction) for i in seen}
    return [i for i in seen if side[i] == "dev"], [i for i in seen if side[i] == "test"]


def describe_split(n_dev: int, n_test: int) -> str:
    """One sentence naming the split, for a verdict row.

    >>> describe_split(60, 58).startswith("dev 60 / test 58")
    True
    """
    return f"dev {n_dev} / test {n_test} (sha256 of the sample id, salt {SPLIT_SALT!r})"


# --- tests on paired per-sample differences ---------------------------------------------------------------------

def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(seed)))


def bootstrap_ci(x, seed: int = 0, n_boot: int = N_BOOT, level: float = 0.95, stat: Callable = np.mean):
    """Percentile bootstrap CI of ``stat`` over the rows of ``x`` (seeded).

    >>> lo, hi = bootstrap_ci([0.0, 1.0] * 20)
    >>> lo < 0.5 < hi
    True
    """
    x = np.asarray(x, dtype=float)
    if len(x) == 0:
        return float("nan"), float("nan")
    idx = _rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    vals = np.array([stat(x[i]) for i in idx]) if stat is not np.mean else x[idx].mean(axis=1)
    a = (1 - level) / 2
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))


def sign_flip_p(x, seed: int = 0, alternative: str = "two-sided", n_flips: int = N_FLIPS) -> float:
    """p-value of the paired sign-flip (randomisation) test that the mean of ``x`` is 0.

    Exact for up to 16 values, Monte Carlo (seeded) beyond. Unlike a bootstrap p-value it stays honest at tiny n:
    three positive differences give p = 0.25, never 0. ``alternative``: ``"two-sided"``, ``"greater"`` or ``"less"``.

    >>> sign_flip_p([1, 1, 1])
    0.25
    """
    x = np.asarray(x, dtype=float)
    n = len(x)
    if n == 0:
        return float("nan")
    obs = x.mean()
    if n <= 16:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        exact = True
    else:
        signs = _rng(seed).choice((1.0, -1.0), size=(n_flips, n))
        exact = False
    means = signs @ x / n
    tol = 1e-12 * max(1.0, abs(obs))
    if alternative == "two-sided":
        hits = np.sum(np.abs(means) >= abs(obs) - tol)
    elif alternative == "greater":
        hits = np.sum(means >= obs - tol)
    elif alternative == "less":
        hits = np.sum(means <= obs + tol)
    else:
        raise ValueError(f"alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}.")
    if exact:
        return float(min(1.0, hits / len(means)))
    return float(min(1.0, (hits + 1) / (len(means) + 1)))


def paired_test(diff, seed: int = 0) -> dict:
    """Mean, bootstrap 95% CI, two-sided sign-flip p and SD of paired per-sample differences.

    >>> paired_test([0.0] * 10)["p"]
    1.0
    """
    d = np.asarray(diff, dtype=float)
    d = d[np.isfinite(d)]
    lo, hi = bootstrap_ci(d, seed)
    return dict(mean=float(d.mean()) if len(d) else float("nan"), lo=lo, hi=hi,
                p=sign_flip_p(d, seed) if len(d) else float("nan"),
                sd=float(d.std(ddof=1)) if len(d) > 1 else float("nan"), n=int(len(d)))


def below_margin_p(diff, margin: float, seed: int = 0) -> float:
    """One-sided p that the mean of ``diff`` is below ``margin`` (H0: mean ≥ margin), for claims of absence.

    >>> below_margin_p([0.0] * 8, 0.05) < 0.05
    True
    """
    d = np.asarray(diff, dtype=float)
    d = d[np.isfinite(d)]
    return sign_flip_p(d - margin, seed, alternative="less")


def mcnemar(a, b) -> dict:
    """Exact McNemar test for two paired binary outcomes (``a`` vs ``b``: 1 right, 0 wrong).

    Returns ``b10`` (a right, b wrong), ``b01`` and the exact two-sided binomial p-value on the discordant pairs.

    >>> mcnemar([1] * 8 + [0] * 2, [0] * 8 + [0] * 2)["p"] < 0.01
    True
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    b10 = int(np.sum((a == 1) & (b == 0)))
    b01 = int(np.sum((a == 0) & (b == 1)))
    k, m = min(b10, b01), b10 + b01
    if m == 0:
        return dict(b10=0, b01=0, p=1.0)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m
    return dict(b10=b10, b01=b01, p=float(min(1.0, 2 * tail)))


def is_binary(*xs) -> bool:
    """True when every value is 0 or 1 (exact-match scores), so McNemar applies.

    >>> is_binary([0, 1, 1], [1.0, 0.0, 1.0]), is_binary([0.3, 1.0])
    (True, False)
    """
    return all(np.isin(np.asarray(x, dtype=float), (0.0, 1.0)).all() for x in xs)


def compare_paired(a, b, seed: int = 0) -> dict:
    """``a`` vs ``b`` per sample (scores of two methods on the same questions): McNemar for 0/1 scores, the
    sign-flip test otherwise; always a bootstrap CI of the mean difference.

    >>> r = compare_paired([1] * 9 + [0], [0] * 9 + [0])
    >>> r["test"], round(r["mean"], 2)
    ('McNemar (exact)', 0.9)
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    out = paired_test(a - b, seed)
    if is_binary(a, b):
        m = mcnemar(a, b)
        out.update(p=m["p"], b10=m["b10"], b01=m["b01"], test="McNemar (exact)")
        # a bootstrap cannot resample a discordant pair that never occurred, so with none on one side its CI ends at
        # 0 there; the exact one-sided 97.5% bound for a zero count (1 − 0.025^(1/n), "rule of three") replaces it
        zero_bound = 1 - 0.025 ** (1 / max(1, len(a)))
        if m["b10"] == 0:
            out["hi"] = max(out["hi"], zero_bound - m["b01"] / max(1, len(a)))
        if m["b01"] == 0:
            out["lo"] = min(out["lo"], m["b10"] / max(1, len(a)) - zero_bound)
        n = max(1, len(a))
        out["needed"] = mcnemar_n(m["b10"] / n, m["b01"] / n)
    else:
        out.update(test="sign-flip")
        out["needed"] = n_for_mean(out["sd"], out["mean"])
    return out


# --- power ------------------------------------------------------------------------------------------------------

def min_n_sign_test(alpha: float = ALPHA, two_sided: bool = True) -> int:
    """The fewest samples at which a sign-flip (or McNemar) test can reach ``alpha`` at all.

    >>> min_n_sign_test(), min_n_sign_test(two_sided=False)
    (6, 5)
    """
    n = 1
    while (2 if two_sided else 1) * 0.5 ** n >= alpha:
        n += 1
    return n


def n_for_mean(sd: float, delta: float, alpha: float = ALPHA, power: float = POWER, two_sided: bool = True) -> float:
    """Samples for a paired test of a mean difference ``delta`` with per-sample SD ``sd`` (normal approximation).

    >>> round(n_for_mean(1.0, 0.5))
    32
    """
    if delta is None or not np.isfinite(delta) or delta == 0:
        return float("inf")
    floor = min_n_sign_test(alpha, two_sided)
    if sd is None or not np.isfinite(sd) or sd == 0:
        return float(floor)
    za = z(1 - alpha / 2) if two_sided else z(1 - alpha)
    return float(max(floor, math.ceil(((za + z(power)) * sd / abs(delta)) ** 2)))


def mcnemar_n(p10: float, p01: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """Samples for McNemar's test to detect discordant rates ``p10`` vs ``p01`` (Connor 1987).

    >>> mcnemar_n(0.06, 0.02) > 100
    True
    """
    delta, pd_ = abs(p10 - p01), p10 + p01
    if delta == 0:
        return float("inf")
    za, zb = z(1 - alpha / 2), z(power)
    n = ((za * math.sqrt(pd_) + zb * math.sqrt(max(pd_ - delta ** 2, 0.0))) / delta) ** 2
    # a McNemar test needs a handful of discordant pairs before any p can fall below alpha
    return float(max(math.ceil(n), math.ceil(min_n_sign_test(alpha) / pd_)))


# --- multiple comparisons ---------------------------------------------------------------------------------------

def holm(pvalues) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error at ALPHA across the book's claims); NaN stays NaN.

    >>> [round(p, 3) for p in holm([0.01, 0.04, 0.03, float("nan")])]
    [0.03, 0.06, 0.06, nan]
    """
    p = np.asarray(list(pvalues), dtype=float)
    ok = np.flatnonzero(np.isfinite(p))
    out = np.full(len(p), np.nan)
    order = ok[np.argsort(p[ok], kind="stable")]
    m, running = len(order), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[i]))
        out[i] = running
    return out.tolist()


# --- the shuffled-layer null --------------------------------------------------------------------------------------

def layer_shuffle_p(X, statistic: Callable[[np.ndarray], float], *, fixed: Sequence[int] = (), seed: int = 0,
                    n_perms: int = N_PERMS, chunk: int = 50) -> float:
    """One-sided p that ``statistic`` of the mean curve of ``X`` (samples x layers) is as large as when each sample's
    layers are shuffled independently (a randomization test of "within a sample, layers are exchangeable").

    This is the shuffled-layer chance level of a claim about *where in depth* something happens, with the sample as
    the unit: its power grows with the number of samples. Shuffling the layers of the *mean* curve instead
    (`layer_permutation_p`) treats the layers as the only replicates, so its p cannot fall below
    C(L/2, k) / C(L, k) when k of L layers carry the effect, however many samples there are (0.23 for two shallow
    fusion layers of 16): it could never confirm "a few shallow layers" on a 16-layer model.
    ``fixed``: layer positions that stay put (e.g. the final layer, the reference of an early-exit curve).

    >>> X = np.zeros((60, 16)); X[:, :2] = 1.0 + np.random.default_rng(0).normal(0, 0.3, (60, 2))
    >>> layer_shuffle_p(X, lambda c: c[:8].mean() - c[8:].mean()) < 0.01
    True
    >>> layer_permutation_p(X.mean(axis=0), lambda c: c[:8].mean() - c[8:].mean()) > 0.2
    True
    """
    X = np.asarray(X, dtype=float)
    if X.ndim != 2 or len(X) == 0:
        return float("nan")
    obs = statistic(X.mean(axis=0))
    free = np.array([i for i in range(X.shape[1]) if i not in set(fixed)], dtype=int)
    rng = _rng(seed)
    tol = 1e-12 * max(1.0, abs(obs))
    hits, done = 0, 0
    while done < n_perms:
        b = min(chunk, n_perms - done)
        order = np.argsort(rng.random((b, X.shape[0], len(free))), axis=2)
        curves = np.broadcast_to(X.mean(axis=0), (b, X.shape[1])).copy()
        curves[:, free] = np.take_along_axis(np.broadcast_to(X[:, free], order.shape), order, axis=2).mean(axis=1)
        hits += int(sum(statistic(c) >= obs - tol for c in curves))
        done += b
    return float((hits + 1) / (n_perms + 1))


def layer_shuffle_quantile(X, statistic: Callable[[np.ndarray], float], *, q: float = 0.95, seed: int = 0,
                           n_perms: int = 200) -> float:
    """The ``q`` quantile of ``statistic`` over mean curves of ``X`` with each sample's layers shuffled (the chance
    level `layer_shuffle_p` compares with, for a verdict's "chance" column)."""
    X = np.asarray(X, dtype=float)
    rng = _rng(seed)
    order = np.argsort(rng.random((n_perms,) + X.shape), axis=2)
    curves = np.take_along_axis(np.broadcast_to(X, order.shape), order, axis=2).mean(axis=1)
    return float(np.quantile([statistic(c) for c in curves], q))


def layer_permutation_p(curve: Sequence[float], statistic: Callable[[np.ndarray], float], *, fixed: Sequence[int] = (),
                        seed: int = 0, n_perms: int = N_PERMS) -> float:
    """One-sided p that ``statistic(curve)`` is as large as on the same values with the layers shuffled.

    The layers of one curve are the only replicates here, so the p-value has a floor set by how many layers carry
    the effect, not by the evidence; the verdict rules use `layer_shuffle_p` (per-sample shuffles) instead.

    ``fixed``: layer positions that stay put (e.g. the final layer, which is the reference of an early-exit curve).
    This is the chance level of a claim about *where in depth* something happens: a curve whose layers were put in
    random order has the same values, so only their placement can make the statistic large.

    >>> layer_permutation_p([1, 1, 0, 0, 0, 0, 0, 0], lambda c: c[:4].mean() - c[4:].mean()) < 0.05
    False
    """
    c = np.asarray(curve, dtype=float)
    obs = statistic(c)
    free = [i for i in range(len(c)) if i not in set(fixed)]
    rng = _rng(seed)
    hits = 0
    tol = 1e-12 * max(1.0, abs(obs))
    for _ in range(n_perms):
        perm = c.copy()
        perm[free] = c[rng.permutation(free)]
        hits += statistic(perm) >= obs - tol
    return float((hits + 1) / (n_perms + 1))


__all__ = ["ALPHA", "POWER", "SPLIT_SALT", "z", "split_of", "split_group", "split_ids", "holm", "describe_split", "bootstrap_ci",
           "sign_flip_p", "paired_test", "below_margin_p", "mcnemar", "is_binary", "compare_paired",
           "min_n_sign_test", "n_for_mean", "mcnemar_n", "layer_permutation_p", "layer_shuffle_p",
           "layer_shuffle_quantile"]
