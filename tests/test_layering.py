"""The package's layers (../shared/design.md): every module imports only from its own layer or the ones below, never
a `_private` name of another module, and only the engine registers hooks or edits a KV cache."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from fusion_utils import layering
from fusion_utils.layering import dotted, layer_of

PKG = Path(__file__).resolve().parents[1] / "fusion_utils"
LAYERS = layering.LAYERS


def modules():
    for p in sorted(PKG.rglob("*.py")):
        if "__pycache__" not in p.parts:
            yield p


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


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (a package import points at its ``__init__``)."""
    graph: dict[str, set[str]] = {}
    for p in modules():
        here = ".".join(dotted(p))
        graph[here] = {".".join(t) for _, t, _ in imports(p) if t and t[0] != "__version__"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle found by a depth-first search (each reported once, from its first module found)."""
    found, state = [], {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or nxt not in graph:
                continue
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    return found


def package_parents(name: str) -> set[str]:
    """A submodule import runs its packages' ``__init__`` first; those are not cycles of their own making."""
    parts = name.split(".")
    return {".".join(parts[:k]) for k in range(0, len(parts))}


def test_no_import_cycles():
    graph = {m: {t for t in ts if t not in package_parents(m)} for m, ts in import_graph().items()}
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_cycle_check_can_fail():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("shim", ["interventions", "sweeps"])
def test_the_legacy_shims_warn_and_nothing_of_ours_imports_them(shim):
    import subprocess
    import sys

    code = f"import warnings; warnings.simplefilter('error'); import fusion_utils.{shim}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0 and "DeprecationWarning" in out.stderr and "fusion_utils.engine" in out.stderr
    root = PKG.parent
    users = [p for d in ("fusion_utils", "tests", "benchmarks", "scripts") for p in (root / d).rglob("*.py")
             if p.name not in ("test_layering.py", f"{shim}.py")
             and (re.search(rf"fusion_utils(\.|\s+import\s+){shim}\b", p.read_text(encoding="utf-8"))
                  or (p.parent == PKG and re.search(rf"from \.{shim} import", p.read_text(encoding="utf-8"))))]
    assert not users, users


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 800, 80


def too_long(source: str, name: str) -> list[str]:
    """The module itself if over `MAX_MODULE_LINES`, and every function over `MAX_FUNCTION_LINES` (data tables are
    module-level assignments, not functions, so they never count)."""
    found = [f"{name} ({source.count(chr(10))} lines)"] if source.count("\n") > MAX_MODULE_LINES else []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                found.append(f"{name}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_modules_and_functions_are_short():
    bad = [x for p in modules() for x in too_long(p.read_text(encoding="utf-8"), str(p.relative_to(PKG.parent)))]
    assert not bad, "split by concern:\n" + "\n".join(bad)


def test_the_length_check_can_fail():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert too_long(f"def f():\n{body}\n", "m") == ["m:1 f (81 lines)"]
    assert too_long("X = [\n" + "1,\n" * 900 + "]\n", "t") == ["t (902 lines)"]
