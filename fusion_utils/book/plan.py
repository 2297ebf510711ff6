"""Step 2: per chapter, the cache key of its inputs and whether it must run."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..layering import CHAPTER_LAYERS
from ..runs import config_hash, package_source_hash, provenance
from .layout import BookError, Layout

#: Bump when the cache-key recipe changes, so that old cache records never match.
CACHE_SCHEMA = 2


@dataclasses.dataclass
class ChapterResult:
    """One chapter of a :func:`build`: what :func:`plan` decided and what :func:`execute` did."""

    name: str
    #: ``"execute"`` (planned), ``"executed"``, ``"cached"``, ``"skipped"`` (not selected by ``only``) or ``"failed"``.
    status: str
    #: Wall time of the execution that produced the notebook now in the book
    #: (for a cached chapter: the time of the run that filled the cache).
    seconds: float | None
    parameters: dict
    key: str
    notebook: Path
    output: Path
    fingerprints: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class BuildReport:
    """What :func:`build` did; ``ok`` is ``False`` only when ``raise_on_error=False``."""

    params_file: Path
    chapters: list[ChapterResult]
    html_dir: Path | None
    build_info: Path | None
    execute_seconds: float = 0.0
    jupyter_book_seconds: float = 0.0
    total_seconds: float = 0.0
    ok: bool = True
    error: str | None = None
    index: Path | None = None

    @property
    def executed(self) -> list[str]:
        return [c.name for c in self.chapters if c.status == "executed"]

    @property
    def cached(self) -> list[str]:
        return [c.name for c in self.chapters if c.status == "cached"]


def notebook_source_hash(notebook: Path) -> str:
    """Hash of a notebook's cells: type, source and tags (outputs and other metadata ignored)."""
    nb = json.loads(Path(notebook).read_text(encoding="utf-8"))
    cells = []
    for c in nb.get("cells", []):
        src = c.get("source", "")
        if isinstance(src, list):
            src = "".join(src)
        tags = sorted((c.get("metadata") or {}).get("tags", []) or [])
        cells.append([c.get("cell_type"), src, tags])
    return config_hash({"cells": cells})


def package_version(prov: Mapping[str, Any] | None = None) -> str:
    """The installed fusion_utils version, from `fusion_utils.runs.provenance` (``prov``: one already taken)."""
    return str((prov if prov is not None else provenance()).get("fusion_utils") or "0+unknown")


def models_in(parameters: Mapping[str, Any]) -> list[str]:
    names: list[str] = []
    models = parameters.get("models")
    if isinstance(models, str):
        names.append(models)
    elif isinstance(models, list):
        names.extend(m for m in models if isinstance(m, str))
    model = parameters.get("model")
    if isinstance(model, str):
        names.append(model)
    return list(dict.fromkeys(names))


def fingerprint_function():
    """``fusion_utils.models.checkpoint_fingerprint`` if it exists, else None."""
    try:
        from fusion_utils import models as _models
    except ModuleNotFoundError as exc:
        if exc.name in ("fusion_utils.models", "fusion_utils"):
            return None
        raise
    except ImportError:
        return None
    return getattr(_models, "checkpoint_fingerprint", None)


def model_fingerprints(names: Iterable[str], _memo: dict | None = None) -> dict[str, str]:
    """``{name: fingerprint}`` using ``fusion_utils.models.checkpoint_fingerprint`` when it
    exists; otherwise (or for a model it cannot find) the name itself."""
    fp = fingerprint_function()
    out = {}
    for name in names:
        if _memo is not None and name in _memo:
            out[name] = _memo[name]
            continue
        if fp is None:
            value = f"id:{name}"
        else:
            try:
                value = str(fp(name))
            except Exception as exc:  # noqa: BLE001 - reported with the model name
                raise BookError(
                    f"Could not fingerprint model {name!r} ({type(exc).__name__}: {exc}); check the model name in the parameters file."
                ) from exc
        out[name] = value
        if _memo is not None:
            _memo[name] = value
    return out


def cache_key(notebook: Path, parameters: Mapping[str, Any], fingerprints: Mapping[str, str],
              *, version: str | None = None, source_hash: str | None = None) -> str:
    """The cache key of one chapter execution (`fusion_utils.runs.config_hash` of everything it depends on)."""
    return config_hash({
        "schema": CACHE_SCHEMA,
        "notebook": notebook_source_hash(notebook),
        "parameters": dict(parameters),
        "fusion_utils": version if version is not None else package_version(),
        "package_source": source_hash if source_hash is not None else package_source_hash(CHAPTER_LAYERS),
        "models": dict(fingerprints),
    })


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def plan(params: dict, layout: Layout, *, force: bool = False, only: Sequence[str] | None = None,
         prov: Mapping[str, Any] | None = None) -> list[ChapterResult]:
    """Step 2: per chapter, its parameters, model fingerprints and cache key, and its status: ``"execute"``,
    ``"cached"`` (the cache record's key matches and the executed notebook exists) or ``"skipped"`` (``only``).
    ``prov``: the build's `fusion_utils.runs.provenance` (taken here when not given)."""
    version, source_hash, memo = package_version(prov), package_source_hash(CHAPTER_LAYERS), {}
    out = []
    for name, over in params["chapters"].items():
        nb = layout.notebooks / f"{name}.ipynb"
        parameters = {**params["common"], **over}
        fps = model_fingerprints(models_in(parameters), memo)
        key = cache_key(nb, parameters, fps, version=version, source_hash=source_hash)
        output = layout.chapters / f"{name}.ipynb"
        record = _read_record(layout.cache / f"{name}.json")
        result = ChapterResult(name=name, status="execute", seconds=None, parameters=parameters, key=key, notebook=nb,
                               output=output, fingerprints=fps)
        if only and name not in only:
            result.status = "skipped"
            if record and output.is_file():
                result.seconds = record.get("seconds")
        elif not force and record and record.get("key") == key and output.is_file():
            result.status, result.seconds = "cached", record.get("seconds")
        out.append(result)
    return out
