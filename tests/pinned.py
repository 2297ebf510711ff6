"""The run records every experiment gives on tiny models, pinned so a refactor can prove it changed no number.

``python tests/pinned.py`` rewrites the pins (only do that when a change of numbers is intended, and say why in the
commit); `tests/test_pinned_records.py` compares a fresh run with them.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

PIN_DIR = Path(__file__).parent / "fixtures" / "pinned_records"
PINNED_ARCHS = ("llava", "qwen2_vl")
N_SAMPLES = 3


def experiment_params(lm) -> dict:
    """Per experiment, the parameters of the pinned run (small, but reaching every code path of the experiment)."""
    from fusion_utils.testing import tiny_model_dir

    L = lm.num_layers
    return {
        "masking": dict(modes=("zero", "knockout"), decode="generate"),
        "hellinger": {},
        "early_exit": {},
        "attention": {},
        "contrastive": dict(fusion_layers=[0, 1], apply_layer=L - 2, candidates=("fusion", "all"),
                            rhos=(0.2, 0.5), lams=(0.0, 0.1)),
        # every row; CD's amateur: a 2-layer tiny model of the same architecture (same tokenizer)
        "baselines": dict(methods=("plain", "cd", "dola", "opera", "vcd", "vicrop", "ours"),
                          cd_amateur=str(tiny_model_dir(lm.spec.model_type, num_layers=2)),
                          ours_fusion_layers=[0, 1], ours_apply_layer=L - 2),
    }


def run_all(arch: str) -> dict:
    from fusion_utils import load_model
    from fusion_utils.data import load_dataset
    from fusion_utils.experiments import get_experiment
    from fusion_utils.testing import tiny_model_dir

    lm = load_model(tiny_model_dir(arch))
    data = load_dataset("world", n=N_SAMPLES)
    out = {}
    for name, params in experiment_params(lm).items():
        res = get_experiment(name)(lm, data, batch_size=N_SAMPLES, progress=False, **params)
        out[name] = canonical(res.records)
    return out


# wall-clock fields: measured, not computed, so they are left out of the comparison
CLOCKS = ("seconds", "plain_seconds")


def canonical(records) -> list[dict]:
    rows = json.loads(records.drop(columns=[c for c in CLOCKS if c in records.columns]).to_json(
        orient="records", double_precision=15))
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))


def assert_same(a, b, path="", rtol=1e-4, atol=1e-5):
    """Equal structure and strings; floats within a tolerance that absorbs other CPUs' reduction order."""
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            assert a is None and b is None, f"{path}: {a!r} != {b!r}"
            return
        if math.isnan(a) and math.isnan(b):
            return
        assert math.isclose(a, b, rel_tol=rtol, abs_tol=atol), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b) if isinstance(b, dict) else b}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}", rtol, atol)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: length {len(a)} != {len(b) if isinstance(b, list) else b}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]", rtol, atol)
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


if __name__ == "__main__":
    PIN_DIR.mkdir(parents=True, exist_ok=True)
    for arch in sys.argv[1:] or PINNED_ARCHS:
        for name, rows in run_all(arch).items():
            (PIN_DIR / f"{arch}_{name}.json").write_text(json.dumps(rows, indent=0, sort_keys=True) + "\n")
            print(arch, name, len(rows), "rows")
