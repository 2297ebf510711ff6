"""The package's layers (../shared/design.md): every module imports only from its own layer or the ones below, never
a `_private` name of another module, and only the engine registers hooks or edits a KV cache."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fusion_utils"

# module or package of fusion_utils -> layer (bottom 0 .. top 5); the longest listed prefix decides
LAYERS = {
    "archs": 0, "models": 0, "adapters": 0, "prompts": 0, "data": 0, "metrics": 0, "runs": 0, "paper": 0,
    "testing": 0, "distributed": 0,
    "engine": 1, "interventions": 1, "sweeps": 1, "": 1,  # "": the package facade (fusion_utils/__init__.py)
    "methods": 2,
    "experiments": 3,
    "report": 4, "plots": 4, "widgets": 4, "interactive": 4,
    "book": 5, "cli": 5, "organisms": 5, "_sphinx_mathjax": 5, "__main__": 5,
    "precompute": 5,
    # the organisms' registry (names, weights, loading) is what `models` needs; the organisms' package (model
    # definition, training, evaluation) sits on top of everything
    "organism_registry": 0,
}


def modules():
    for p in sorted(PKG.rglob("*.py")):
        if "__pycache__" not in p.parts:
            yield p


def dotted(path: Path) -> list[str]:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imports(path: Path):
    """(line, target module parts inside fusion_utils, imported names) for every import of the package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = dotted(path)
    pkg = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                target = base + (node.module.split(".") if node.module else [])
            elif (node.module or "").split(".")[0] == "fusion_utils":
                target = node.module.split(".")[1:]
            else:
                continue
            names = [a.name for a in node.names]
            if node.module is None:  # from . import x: x is a module, or a name of the package itself
                for n in names:
                    sub = PKG.joinpath(*target, n)
                    is_module = sub.with_suffix(".py").is_file() or sub.is_dir()
                    yield node.lineno, (target + [n]) if is_module else target, [] if is_module else [n]
            else:
                yield node.lineno, target, names
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "fusion_utils":
                    yield node.lineno, a.name.split(".")[1:], []


def layer_of(parts: list[str]) -> int:
    """The layer of the longest listed prefix of a module path (``organisms.build`` before ``organisms``)."""
    for k in range(len(parts), 1, -1):
        if ".".join(parts[:k]) in LAYERS:
            return LAYERS[".".join(parts[:k])]
    if len(parts) == 1 and f"{parts[0]}.__init__" in LAYERS:
        return LAYERS[f"{parts[0]}.__init__"]
    key = parts[0] if parts else ""
    if key not in LAYERS:
        raise AssertionError(f"fusion_utils.{'.'.join(parts)} has no layer: add it to LAYERS in tests/test_layering.py")
    return LAYERS[key]


def test_every_import_points_down_or_sideways():
    bad = []
    for p in modules():
        own = layer_of(dotted(p))
        for line, target, names in imports(p):
            if target and target[0] == "__version__":
                continue
            if layer_of(target) > own:
                bad.append(f"{p.relative_to(PKG.parent)}:{line} (layer {own}) imports fusion_utils."
                           f"{'.'.join(target)} (layer {layer_of(target)})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_private_name_crosses_a_module():
    bad = [f"{p.relative_to(PKG.parent)}:{line} imports {n}" for p in modules() for line, _, names in imports(p)
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "private names imported from another module:\n" + "\n".join(bad)


def test_only_the_engine_touches_hooks_and_caches():
    pattern = re.compile(r"register_forward(_pre)?_hook|\.keys\s*=|\.values\s*=\s*[^=]|past_key_values\s*=\s*cache|"
                         r"\bcache\w*\.(crop|reset)\(|batch_repeat_interleave")
    bad = []
    for p in modules():
        if dotted(p)[:1] == ["engine"]:
            continue
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line) and not line.lstrip().startswith("#"):
                bad.append(f"{p.relative_to(PKG.parent)}:{i}: {line.strip()}")
    assert not bad, "hook or cache code outside fusion_utils/engine:\n" + "\n".join(bad)


@pytest.mark.parametrize("source, ok", [
    ("from ..report import verdict\n", False),  # engine -> report: upward
    ("from ..archs import ArchSpec\n", True),
])
def test_the_rule_can_fail(source, ok):
    """The checker itself: an upward import from the engine is caught, a downward one is not."""
    fake = PKG / "engine" / "zz_layering_probe.py"
    calls = [(line, t) for line, t, _ in imports_of_source(fake, source)]
    worst = max(layer_of(t) for _, t in calls)
    assert (worst <= LAYERS["engine"]) == ok


def imports_of_source(path: Path, source: str):
    """`imports` on source text standing at ``path`` (nothing is written)."""
    original = Path.read_text
    try:
        Path.read_text = lambda self, *a, **k: source if self == path else original(self, *a, **k)
        return list(imports(path))
    finally:
        Path.read_text = original
