"""The test n chosen by power: a pilot on the dev split says how many test questions each claim needs, and a chapter
draws that many (up to a cap set in the parameters file).

The pilot is a miniature build of dev questions only: `as_pilot` re-keys their split (a second hash of the same
split key), so every rule runs on the pilot unchanged, picks on half of it and judges on the other half, and states
the n that would decide. `needed_test_n` turns a pilot row into the number of *test* questions the claim needs;
`draw_size` takes the largest over a chapter's claims, between a floor and the cap; `with_power` records the pilot
n, the needed n and the drawn n in each final verdict row. The test questions themselves come from the other side
of the verdicts' own hash (`fusion_utils.book.chapter.load_split`), so no question the pilot saw is ever on the test
side. Rules that select nothing on dev (fusion shallow, early exit, the attention rules) judge every question of the
final build, the pilot's among them: their n was chosen after one look at those questions, a two-stage design whose
first stage only sets the n, never a setting.

>>> rows = [dict(key="a", model="m", verdict="inconclusive (…)", needed_n=400.0, n=30, value=0.1, ci=(-0.1, 0.3),
...              paper_effect=0.1, split="dev 30 / test 30")]
>>> power = choose(rows, n_pilot=60, cap=150, floor=20)
>>> power["drawn"], power["needed"]["a · m"]
(150, 200)
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from . import stats
from .verdicts import NA, n_to_decide

PILOT_SALT = "pilot/"


def as_pilot(records: pd.DataFrame | None, id_col: str = "id") -> pd.DataFrame | None:
    """Pilot records (dev questions only) with a ``split_group`` re-keyed by a second hash, so that a rule's own
    dev/test split halves the pilot instead of finding every question on the dev side. Questions that share an
    image or a question's copies still fall on one side together."""
    if records is None or len(records) == 0:
        return records
    base = (records["split_group"].astype(str) if "split_group" in records.columns
            else records[id_col].astype(str))
    return records.assign(split_group=PILOT_SALT + base)


def _judges_all(row: Mapping) -> bool:
    """Whether the rule judges on every sample (it selects nothing on dev), not on the test split alone."""
    return str(row.get("split") or "").startswith("all")


def _sd_from_ci(row: Mapping, n: int) -> float:
    lo, hi = (row.get("ci") or (float("nan"), float("nan")))[:2]
    if not (n and np.isfinite(lo) and np.isfinite(hi)):
        return float("nan")
    return (hi - lo) / (2 * stats.z(0.975)) * math.sqrt(n)


def needed_test_n(row: Mapping, n_pilot: int) -> float | None:
    """Test questions the claim of pilot ``row`` needs for an 80%-power decision, or None when the rule does not
    apply (n/a). Inconclusive rows state their needed build size (`verdicts.decide`), turned here into judged samples;
    a decided row's n is the one that would decide again at the observed effect (from its CI's width); a claim with
    no effect in the paper's direction needs ∞ (the cap). A rule that judges on every sample counts the dev questions
    of the final build, so it needs only the rest from the test side; one that judges a subset (questions with a
    persistent token) needs questions in proportion."""
    verdict = str(row.get("verdict") or "")
    if verdict.startswith(NA):
        return None
    n = int(row.get("n") or 0)
    build = row.get("needed_n")  # the pilot-sized build that would decide (`verdicts.decide`)
    if build is None or (isinstance(build, float) and math.isnan(build)):
        value, paper = float(row.get("value", float("nan"))), row.get("paper_effect")
        if not np.isfinite(value):
            return float("inf")
        judged = n_to_decide(_sd_from_ci(row, n), value, None if paper is None else float(paper))
        build = judged * n_pilot / max(1, n)  # judged samples -> questions, at the pilot's share judged
    build = float(build)
    if _judges_all(row):  # every question counts, the final build's dev questions (the pilot's) among them
        return max(0.0, build - n_pilot)
    return max(0.0, build * n / max(1, n_pilot))  # the test side is judged: the build's share of it


def draw_size(needs: Iterable[float | None], cap: int, floor: int = 0) -> int:
    """How many test questions to draw: the largest need (∞ for an undecidable claim), at least ``floor`` and at most
    ``cap``; with no claim that applies, the floor.

    >>> draw_size([12, 30], cap=500, floor=20), draw_size([12, float("inf")], cap=500), draw_size([9000], cap=500)
    (30, 500, 500)
    """
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
        raise ValueError(f"test_cap must be a positive integer (test questions per claim), got {cap!r}.")
    vals = [float(v) for v in needs if v is not None and not (isinstance(v, float) and math.isnan(v))]
    want = max(vals) if vals else 0.0
    return int(min(cap, max(floor, math.ceil(want) if math.isfinite(want) else cap)))


def choose(pilot_rows: Iterable[Mapping], *, n_pilot: int, cap: int, floor: int = 0) -> dict:
    """The power record of a chapter (or one model of it): ``pilot`` (dev questions run), ``needed`` (claim · model
    -> test questions needed, ∞ beyond any cap), ``drawn`` (test questions to draw) and ``cap``."""
    needed = {}
    for r in pilot_rows:
        need = needed_test_n(r, n_pilot)
        if need is not None:
            needed[f"{r.get('key')} · {r.get('model')}"] = need if not math.isfinite(need) else int(math.ceil(need))
    return dict(pilot=int(n_pilot), needed=needed, drawn=draw_size(needed.values(), cap, floor), cap=int(cap))


def describe(power: Mapping, key: str) -> str:
    """One sentence for a verdict row: the pilot, what this claim needed and what was drawn.

    >>> describe(dict(pilot=60, needed={"a · m": 125}, drawn=200, cap=200), "a · m")
    'pilot of 60 dev questions; this claim needed ≈ 125 test questions; 200 drawn'
    """
    need = power["needed"].get(key)
    need_s = ("the claim's rule did not apply on the pilot, so it asked for none" if need is None else
              "no test n decides this claim (no effect in the paper's direction on the pilot)" if not math.isfinite(need)
              else "this claim needed no test questions beyond the pilot's (its rule judges every question)"
              if need == 0 else f"this claim needed ≈ {need} test questions")
    capped = need is not None and (not math.isfinite(need) or need > power["drawn"]) and power["drawn"] >= power["cap"]
    return (f"pilot of {power['pilot']} dev questions; {need_s}; {power['drawn']} drawn"
            + (f" (the cap of {power['cap']} binds)" if capped else ""))


def with_power(rows: Iterable[Mapping], power: Mapping | None) -> list[dict]:
    """The final verdict rows with the sample size chosen by power: ``pilot_n``, ``needed_test_n`` (from the pilot)
    and ``drawn_test_n`` columns and the ``power`` sentence; unchanged rows when no pilot was run."""
    out = []
    for r in rows:
        r = dict(r)
        if power is not None:
            key = f"{r.get('key')} · {r.get('model')}"
            need = power["needed"].get(key)
            r.update(pilot_n=power["pilot"], needed_test_n=need, drawn_test_n=power["drawn"],
                     power=describe(power, key))
        out.append(r)
    return out


__all__ = ["PILOT_SALT", "as_pilot", "needed_test_n", "draw_size", "choose", "describe", "with_power"]
