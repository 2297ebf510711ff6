"""Every experiment's run records on tiny models equal the pinned ones (same rows, same values).

The pins (tests/fixtures/pinned_records) were written by `tests/pinned.py` before the engine refactor; a change that
moves code without meaning to change a number must leave them equal. Rewrite them only for an intended change.
"""
from __future__ import annotations

import json

import pytest

from pinned import PINNED_ARCHS, PIN_DIR, assert_same, run_all


@pytest.mark.parametrize("arch", PINNED_ARCHS)
def test_records_equal_the_pinned_ones(arch):
    fresh = run_all(arch)
    for name, rows in fresh.items():
        pinned = json.loads((PIN_DIR / f"{arch}_{name}.json").read_text())
        assert len(rows) == len(pinned), f"{arch}/{name}: {len(rows)} records, pinned {len(pinned)}"
        assert_same(rows, pinned, f"{arch}/{name}")
