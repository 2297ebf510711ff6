"""Chapter notebooks: stored without outputs, parameterized, and a bad parameter stops them with its clear error."""
from __future__ import annotations

import json
from pathlib import Path

import papermill as pm
import pytest

from fusion_utils.book import chapter

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
COMMON = ("models", "dataset", "source", "samples", "device", "dtype", "seed")


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped_and_parameterized(nb):
    cells = json.loads(nb.read_text())["cells"]
    assert all(not c.get("outputs") for c in cells if c["cell_type"] == "code")
    params = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1
    src = "".join(params[0]["source"])
    assert all(f"{name} =" in src for name in COMMON)
    body = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert "chapter.check_params(" in body  # validated at the top, before any model is loaded


@pytest.mark.parametrize("bad,message", [
    (dict(samples=-3), "samples must be a positive integer"),
    (dict(models="organism:llava"), "models must be a non-empty list"),
    (dict(device="gpu"), "device must be 'cpu', 'cuda'"),
    (dict(dataset="imagenet"), "dataset must be 'world' or one of"),
])
def test_bad_parameter_gives_its_clear_error(bad, message, tmp_path):
    with pytest.raises(pm.PapermillExecutionError) as err:
        pm.execute_notebook(str(NOTEBOOKS[0]), str(tmp_path / "out.ipynb"), parameters=bad, kernel_name="python3",
                            cwd=str(NOTEBOOKS[0].parent), progress_bar=False)
    assert err.value.ename == "ValueError" and message in err.value.evalue


def test_check_params_accepts_the_book_defaults():
    import yaml

    for f in (Path(__file__).resolve().parents[1] / "book" / "params").glob("*.yml"):
        if f.stem.startswith("atlas-"):  # `fusion-utils atlas` parameters files, checked by tests/test_atlas.py
            continue
        common = yaml.safe_load(f.read_text())["common"]
        chapter.check_params(**{k: common.get(k) for k in COMMON if k in common} | {"source": common.get("source")})
