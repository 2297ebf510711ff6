"""The package's layers (../shared/design.md), declared once: the import test checks them and run keys read them.

A module's layer is that of the longest listed prefix of its dotted path inside ``fusion_utils``
(``organisms.build`` before ``organisms``). Run records are keyed on the source of layers 0-3 only, so restyling a
figure, a verdict table or the book driver (layers 4-5) keeps every run a user computed; chapter caches are keyed
on layers 0-4, since a chapter's page shows what layer 4 draws.
"""
from __future__ import annotations

from pathlib import Path

LAYERS = {
    "archs": 0, "models": 0, "adapters": 0, "prompts": 0, "data": 0, "metrics": 0, "runs": 0, "paper": 0,
    "testing": 0, "distributed": 0, "layering": 0, "depth": 0,
    "engine": 1, "interventions": 1, "sweeps": 1, "": 1,  # "": the package facade (fusion_utils/__init__.py)
    "methods": 2,
    "experiments": 3,
    "report": 4, "plots": 4, "plots_style": 4, "plots_tables": 4, "widgets": 4, "interactive": 4, "atlas_plots": 4,
    "figure_html": 4,
    "book": 5, "cli": 5, "atlas": 5, "organisms": 5, "_sphinx_mathjax": 5, "_sphinx_launch": 5,
    "_sphinx_reader": 5, "__main__": 5,
    # the organisms' registry (names, weights, loading) is what `models` needs; the organisms' package (model
    # definition, training, evaluation) sits on top of everything
    "organism_registry": 0,
}
#: the highest layer whose source decides a run's numbers (the experiments and everything they call)
RUN_LAYERS = 3
#: the highest layer whose source decides what a chapter shows (its figures and tables too)
CHAPTER_LAYERS = 4

PACKAGE = Path(__file__).resolve().parent


def dotted(path: Path) -> list[str]:
    """``fusion_utils/report/stats.py`` -> ``["report", "stats"]``; a package's ``__init__`` is the package."""
    parts = list(Path(path).resolve().relative_to(PACKAGE).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def layer_of(parts: list[str]) -> int:
    """The layer of a module path inside the package; raises ValueError naming the fix for an unlisted module."""
    for k in range(len(parts), 1, -1):
        if ".".join(parts[:k]) in LAYERS:
            return LAYERS[".".join(parts[:k])]
    if len(parts) == 1 and f"{parts[0]}.__init__" in LAYERS:
        return LAYERS[f"{parts[0]}.__init__"]
    key = parts[0] if parts else ""
    if key not in LAYERS:
        raise ValueError(f"fusion_utils.{'.'.join(parts)} has no layer: add it to LAYERS in fusion_utils/layering.py.")
    return LAYERS[key]


def sources(max_layer: int) -> list[Path]:
    """The package's Python files of layers ``0..max_layer``, sorted."""
    return [p for p in sorted(PACKAGE.rglob("*.py"))
            if "__pycache__" not in p.parts and layer_of(dotted(p)) <= max_layer]
