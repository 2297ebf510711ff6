"""Step 1: the parameters file, read and checked against the notebooks and ``_toc.yml``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from .layout import BookError, Layout

_SCALARS = (str, int, float, bool, type(None))


def _check_value(value: Any, where: str) -> None:
    if isinstance(value, _SCALARS):
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_value(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise BookError(f"{where} has a non-string key {k!r}; quote it in the parameters file.")
            _check_value(v, f"{where}.{k}")
        return
    raise BookError(
        f"{where} is a {type(value).__name__} ({value!r}), which cannot be passed to a notebook; "
        "use a string, number, boolean, null, list or mapping instead."
    )


def load_params(params_file: str | os.PathLike, root: str | os.PathLike | None = None) -> dict:
    """Read and validate a parameters file.

    Returns ``{"common": {...}, "chapters": {name: overrides, ...}}`` (ordered).
    Raises :class:`BookError` with one sentence naming the fix on any problem.
    """
    import yaml

    path = Path(params_file)
    if not path.is_file() and root is not None and (Path(root) / path).is_file():
        path = Path(root) / path
    if not path.is_file():
        raise BookError(f"Parameters file {params_file} does not exist; pass an existing file such as book/params/default.yml.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise BookError(f"Parameters file {path} is not valid YAML{at} ({problem}); fix the syntax there.") from None
    if not isinstance(data, dict):
        raise BookError(f"Parameters file {path} must be a mapping with the keys 'common' and 'chapters'.")
    unknown = sorted(set(data) - {"common", "chapters"})
    if unknown:
        raise BookError(
            f"Parameters file {path} has unknown top-level key(s) {', '.join(map(repr, unknown))}; "
            "only 'common' and 'chapters' are allowed (put chapter knobs under chapters.<name>)."
        )
    common = data.get("common") or {}
    if not isinstance(common, dict):
        raise BookError(f"In {path}, 'common' must be a mapping of parameter names to values.")
    chapters = data.get("chapters")
    if not isinstance(chapters, dict) or not chapters:
        raise BookError(f"In {path}, 'chapters' must be a non-empty mapping of chapter names (notebooks/<name>.ipynb) to overrides.")
    _check_value(common, f"{path.name}: common")
    out: dict[str, dict] = {}
    for name, over in chapters.items():
        if not isinstance(name, str):
            raise BookError(f"In {path}, chapter name {name!r} must be a string (the notebook's file name without .ipynb).")
        over = over or {}
        if not isinstance(over, dict):
            raise BookError(f"In {path}, chapters.{name} must be a mapping of parameter overrides (use {{}} for none).")
        _check_value(over, f"{path.name}: chapters.{name}")
        out[name] = over
    return {"common": common, "chapters": out, "path": path}


def toc_chapters(toc_file: Path) -> list[str]:
    """Names of the chapters the toc expects under ``book/chapters/``."""
    import yaml

    toc = yaml.safe_load(toc_file.read_text(encoding="utf-8")) or {}
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            f = node.get("file")
            if isinstance(f, str):
                p = f.replace("\\", "/")
                for suffix in (".ipynb", ".md"):
                    p = p[: -len(suffix)] if p.endswith(suffix) else p
                if p.startswith("book/chapters/"):
                    found.append(p[len("book/chapters/"):])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(toc)
    return found


def _declared_parameters(notebook: Path) -> set[str] | None:
    """Names assigned in the notebook's ``parameters`` cell (None if unknown)."""
    try:
        import papermill

        return set(papermill.inspect_notebook(str(notebook)).keys())
    except Exception:  # a cell papermill cannot parse: skip the check
        return None


def _validate(params: dict, layout: Layout, toc_file: Path) -> None:
    path = params["path"]
    for name in params["chapters"]:
        nb = layout.notebooks / f"{name}.ipynb"
        if not nb.is_file():
            have = sorted(p.stem for p in layout.notebooks.glob("*.ipynb"))
            raise BookError(
                f"Chapter '{name}' in {path} has no notebook {nb}; rename it to one of {have or 'the notebooks in notebooks/'} "
                "or add the notebook."
            )
    toc = toc_chapters(toc_file)
    missing = [c for c in toc if c not in params["chapters"]]
    if missing:
        raise BookError(
            f"_toc.yml lists chapter(s) {', '.join(missing)} that {path} does not run; add them under 'chapters:' in {path}."
        )
    extra = [c for c in params["chapters"] if c not in toc]
    if extra:
        raise BookError(
            f"Chapter(s) {', '.join(extra)} in {path} are not in _toc.yml; add '- file: book/chapters/<name>' entries to _toc.yml "
            "or remove them from the parameters file."
        )
    # Unknown parameter names are almost always typos: check them against the
    # notebooks' parameters cells (papermill would silently inject them).
    declared_any: set[str] = set()
    all_known = True
    for name, over in params["chapters"].items():
        declared = _declared_parameters(layout.notebooks / f"{name}.ipynb")
        if declared is None:
            all_known = False
            continue
        declared_any |= declared
        bad = sorted(set(over) - declared)
        if bad:
            raise BookError(
                f"In {path}, chapters.{name} sets {', '.join(bad)}, which notebooks/{name}.ipynb does not declare in its "
                f"parameters cell (it declares: {', '.join(sorted(declared)) or 'nothing'}); fix the spelling or add it to the notebook."
            )
    if all_known:
        bad = sorted(set(params["common"]) - declared_any)
        if bad:
            raise BookError(
                f"In {path}, common sets {', '.join(bad)}, which no chapter notebook declares in its parameters cell; "
                "fix the spelling or remove it."
            )


def validate(params_file: str | os.PathLike, layout: Layout, only: Sequence[str] | None = None) -> dict:
    """Step 1: the parameters file read and checked against the notebooks and ``_toc.yml`` (see `load_params`)."""
    params = load_params(params_file, layout.root)
    for f in ("_config.yml", "_toc.yml"):
        if not (layout.root / f).is_file():
            raise BookError(f"{layout.root / f} is missing; run the build from the repository root or pass root=.")
    _validate(params, layout, layout.root / "_toc.yml")
    if only:
        unknown = [n for n in only if n not in params["chapters"]]
        if unknown:
            raise BookError(f"--only names unknown chapter(s) {', '.join(unknown)}; choose from "
                            f"{', '.join(params['chapters'])}.")
    return params
