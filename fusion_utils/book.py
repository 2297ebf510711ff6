"""Build driver for the companion Jupyter Book.

The book has two kinds of pages: prose pages (``book/*.md``) and chapters, which
are the notebooks in ``notebooks/`` executed with `papermill`_ under the
parameters given in a *parameters file* such as ``book/params/default.yml``::

    common:                      # shared by every chapter
      models: ["organism:llava", "organism:qwen2_vl"]
      dataset: world
      samples: 120
    chapters:                    # ordered; name = notebooks/<name>.ipynb
      fusion: {}                 # chapter-specific overrides
      review: {samples: 60}

:func:`build` runs five small steps, each a function of this module:

1. :func:`validate` -- read the parameters file and check it against the notebooks and ``_toc.yml``;
2. :func:`plan` -- per chapter, the cache key of its inputs (the notebook's cells, its parameters, the
   ``fusion_utils`` source and version, the fingerprints of its models) and whether it must run;
3. :func:`execute` -- run the chapters that must, each in a kernel whose environment says "static book";
4. :func:`appendix` -- the reproducibility appendix and ``build_info.json``;
5. :func:`render` -- Sphinx (jupyter-book's configuration, notebook execution off), then the builds' index page.

Each parameters file builds into its own folder, so books for different models sit side by side::

    book/_build/index.html           every build found: parameters file, models, data, date
    book/_build/<params name>/
        html/                        the book
        src/                         its sources: config, prose pages, executed chapters, appendix
        build_info.json
    .cache/book/<params name>/       the chapters' cache records, failed notebooks, kernel logs

Hashing and provenance come from :mod:`fusion_utils.runs`; the driver sets no process-wide environment variable
(the kernels and Sphinx get theirs). Importing this module has no side effects and imports neither papermill nor
jupyter-book; they are loaded when a build starts.

.. _papermill: https://papermill.readthedocs.io
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import html as _html
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .runs import atomic_write_text, canonical_json, config_hash, package_source_hash, provenance

__all__ = [
    "BookError",
    "BuildReport",
    "ChapterResult",
    "Layout",
    "add_cli",
    "appendix",
    "build",
    "cache_key",
    "clean",
    "execute",
    "find_root",
    "load_params",
    "main",
    "plan",
    "render",
    "validate",
    "write_index",
]

#: Bump when the cache-key recipe changes, so that old cache records never match.
CACHE_SCHEMA = 2

#: What a chapter kernel is told: render the explorers as kernel-free figures (see fusion_utils.widgets).
KERNEL_ENV = {"FUSION_UTILS_STATIC": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}

_SCALARS = (str, int, float, bool, type(None))


class BookError(RuntimeError):
    """A build problem with a one-sentence explanation of how to fix it."""


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


# --------------------------------------------------------------------------- paths


def find_root(start: str | os.PathLike | None = None) -> Path:
    """The book root: the nearest directory (from ``start``, default cwd, upwards)
    holding both ``_config.yml`` and ``_toc.yml``."""
    here = Path(start or os.getcwd()).resolve()
    for d in (here, *here.parents):
        if (d / "_config.yml").is_file() and (d / "_toc.yml").is_file():
            return d
    pkg_root = Path(__file__).resolve().parent.parent
    if (pkg_root / "_config.yml").is_file():
        return pkg_root
    raise BookError(
        f"No _config.yml and _toc.yml found in {here} or its parents; run the command from the repository root."
    )


@dataclasses.dataclass
class Layout:
    """Where one build reads and writes: ``root`` holds the sources (``notebooks/``, ``book/``, the config), ``out``
    the builds (``out == root`` unless building elsewhere), ``name`` is the parameters file's name."""

    root: Path
    out: Path
    name: str

    @property
    def notebooks(self) -> Path:
        return self.root / "notebooks"

    @property
    def builds(self) -> Path:
        return self.out / "book" / "_build"

    @property
    def build_dir(self) -> Path:
        return self.builds / self.name

    @property
    def src(self) -> Path:
        return self.build_dir / "src"

    @property
    def chapters(self) -> Path:
        return self.src / "book" / "chapters"

    @property
    def generated(self) -> Path:
        return self.src / "book" / "_generated"

    @property
    def html(self) -> Path:
        return self.build_dir / "html"

    @property
    def build_info(self) -> Path:
        return self.build_dir / "build_info.json"

    @property
    def cache(self) -> Path:
        return self.out / ".cache" / "book" / self.name

    @property
    def failed(self) -> Path:
        return self.cache / "failed"


def build_name(params_file: str | os.PathLike) -> str:
    """The folder a parameters file builds into: its file name without the suffix (``default.yml`` -> ``default``)."""
    return Path(params_file).stem


def _stage(root: Path, src: Path) -> None:
    """Copy the book sources (config, toc, prose pages, assets) into a build's ``src``; times are kept (copy2) so
    Sphinx re-reads only what changed."""
    src.mkdir(parents=True, exist_ok=True)
    for name in ("_config.yml", "_toc.yml"):
        _copy_if_changed(root / name, src / name)
    book = root / "book"
    if book.is_dir():
        skip = {"_build", "chapters", "_generated", "params"}
        for item in book.iterdir():
            if item.name in skip:
                continue
            dest = src / "book" / item.name
            if item.is_dir():
                shutil.copytree(item, dest, dirs_exist_ok=True, copy_function=_copy_if_changed)
            else:
                _copy_if_changed(item, dest)


def _copy_if_changed(source, dest) -> None:
    source, dest = Path(source), Path(dest)
    if dest.is_file() and dest.stat().st_size == source.stat().st_size and dest.read_bytes() == source.read_bytes():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, dest)


# --------------------------------------------------------------------------- step 1: validate


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


def _toc_chapters(toc_file: Path) -> list[str]:
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
    toc = _toc_chapters(toc_file)
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


# --------------------------------------------------------------------------- step 2: plan


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


def _models_in(parameters: Mapping[str, Any]) -> list[str]:
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


def _fingerprint_function():
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
    fp = _fingerprint_function()
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
        "package_source": source_hash if source_hash is not None else package_source_hash(),
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
    version, source_hash, memo = package_version(prov), package_source_hash(), {}
    out = []
    for name, over in params["chapters"].items():
        nb = layout.notebooks / f"{name}.ipynb"
        parameters = {**params["common"], **over}
        fps = model_fingerprints(_models_in(parameters), memo)
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


# --------------------------------------------------------------------------- step 3: execute


def ensure_kernel(name: str = "python3") -> str:
    """Make sure the Jupyter kernel ``name`` runs *this* interpreter.

    A kernelspec whose ``argv[0]`` is ``python``/``python3`` is launched by
    jupyter_client with ``sys.executable``; any other interpreter gets a
    kernelspec installed into ``sys.prefix``, which is then preferred over
    user-wide specs. Returns the kernelspec directory.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    me = {"python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}", sys.executable}

    def good() -> str | None:
        try:
            spec = KernelSpecManager().get_kernel_spec(name)
        except NoSuchKernel:
            return None
        argv0 = spec.argv[0] if spec.argv else ""
        if argv0 in me or os.path.realpath(argv0) == os.path.realpath(sys.executable):
            return spec.resource_dir
        return None

    found = good()
    if found:
        return found
    from ipykernel.kernelspec import install

    path = install(kernel_name=name, prefix=sys.prefix)
    found = good()
    if not found:
        raise BookError(
            f"The Jupyter kernel '{name}' does not run {sys.executable} even after installing one into {path}; "
            f"remove the conflicting kernelspec (jupyter kernelspec list)."
        )
    return found


def _describe_failure(exc: Exception, notebook: Path, partial: Path, kernel_log: Path | None = None) -> str:
    from papermill.exceptions import PapermillExecutionError

    rel = notebook
    if isinstance(exc, PapermillExecutionError):
        src = (exc.source or "").strip().splitlines()
        first = src[0] if src else ""
        injected = _has_injected_cell(partial)
        idx = exc.cell_index
        if idx is None:
            where = "a cell"
        elif injected:
            where = f"cell {idx - 1} (0-based index; cell {idx} of the executed notebook)"
        else:
            where = f"cell {idx} (0-based index)"
        return (
            f"Chapter notebook {rel} failed in {where}, execution count {exc.exec_count}, "
            f"starting `{first[:80]}`: {exc.ename}: {exc.evalue}. "
            f"The partially executed notebook is kept at {partial}."
        )
    kept = f" The partially executed notebook is kept at {partial}." if partial.exists() else ""
    log = f" The kernel's log is {kernel_log}." if kernel_log is not None and kernel_log.is_file() else ""
    return f"Chapter notebook {rel} could not be executed: {type(exc).__name__}: {exc}.{kept}{log}"


def _has_injected_cell(nb_path: Path) -> bool:
    try:
        nb = json.loads(nb_path.read_text(encoding="utf-8"))
    except Exception:
        return False
    return any("injected-parameters" in (c.get("metadata") or {}).get("tags", []) for c in nb.get("cells", []))


def _placeholder(path: Path, name: str) -> None:
    """A notebook standing in for a chapter not executed in this build (``only``)."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell(
        f"# {name}\n\nThis chapter was not executed in this build (it was left out with `--only`). "
        "Run `fusion-utils book build` without `--only` to include it."))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, nbformat.writes(nb))


def child_env(extra: Mapping[str, str] | None = None) -> dict:
    """The environment of a kernel or of Sphinx: this one, the directory this ``fusion_utils`` is imported from on
    PYTHONPATH (so a checkout that is not pip-installed works), and ``extra``. The driver's own is untouched."""
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent.parent)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([here, *[p for p in parts if p != here]])
    env.update(extra or {})
    return env


def _kernel_manager(env: Mapping[str, str]):
    """A kernel manager class whose kernels start with ``env`` (papermill takes no environment of its own)."""
    from jupyter_client.manager import AsyncKernelManager

    class _KernelWithEnv(AsyncKernelManager):
        async def _async_pre_start_kernel(self, **kw):
            kw["env"] = {**(kw.get("env") or {}), **env}
            return await super()._async_pre_start_kernel(**kw)

    return _KernelWithEnv


#: Cell tags that already say how a cell shows in the book; a code cell with none of them gets ``hide-input``.
VISIBILITY_TAGS = {"remove-cell", "remove-input", "remove-output", "hide-input", "hide-output", "hide-cell",
                   "show-input"}


def _fmt_param(v: Any) -> str:
    if isinstance(v, list):
        return ", ".join(_fmt_param(x) for x in v) or "none"
    return "none" if v is None else str(v)


def parameters_line(parameters: Mapping[str, Any]) -> str:
    """One compact line of the parameters a chapter ran with (the full table is in the appendix)."""
    p = dict(parameters)
    parts = []
    if "models" in p:
        parts.append("models " + ", ".join(f"`{m}`" for m in (p.pop("models") or [])))
    if "dataset" in p:
        data = str(p.pop("dataset"))
        src, n = p.pop("source", None), p.pop("samples", None)
        parts.append("data " + data + (f" ({src})" if src else "") + (f", {n} samples" if n is not None else ""))
    for k in ("device", "dtype"):
        if k in p:
            parts.append(str(p.pop(k)))
    parts += [f"{k} = {_fmt_param(v)}" for k, v in p.items()]
    return "**This build:** " + " · ".join(parts) + " (all values: the reproducibility appendix)."


def _for_readers(path: Path, parameters: Mapping[str, Any]) -> None:
    """Make an executed notebook read like a paper: the declared and injected parameter cells give way to one line of
    the build's parameters, every code cell is folded behind a toggle (``hide-input``) unless its tags say
    otherwise, and the ipywidgets state (tqdm bars leave some) is dropped -- the static book has no live widgets,
    and the state would make myst-nb add widget scripts to the page."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    nb.metadata.pop("widgets", None)
    cells, line_at = [], None
    for cell in nb.cells:
        tags = list(cell.metadata.get("tags", []))
        if {"parameters", "injected-parameters"} & set(tags):
            cell.metadata["tags"] = [*tags, "remove-cell"]
            line_at = len(cells) + 1
        elif cell.cell_type == "code" and not VISIBILITY_TAGS & set(tags):
            cell.metadata["tags"] = [*tags, "hide-input"]
        cells.append(cell)
    if line_at is not None:
        cells.insert(line_at, nbformat.v4.new_markdown_cell(parameters_line(parameters)))
    nb.cells = cells
    atomic_write_text(path, nbformat.writes(nb))


def _execute(notebook: Path, output: Path, parameters: dict, cwd: Path, kernel: str, kernel_log: Path,
             env: Mapping[str, str]) -> None:
    """Run one notebook with papermill. The kernel process's own stderr (ipykernel's
    start-up and shutdown chatter) goes to ``kernel_log`` instead of the terminal;
    everything the notebook prints is in the output notebook."""
    import papermill

    output.parent.mkdir(parents=True, exist_ok=True)
    kernel_log.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(kernel_log, "wb") as log:
            os.dup2(log.fileno(), 2)
            try:
                papermill.execute_notebook(
                    str(notebook), str(output), parameters=parameters, kernel_name=kernel, cwd=str(cwd),
                    progress_bar=False, log_output=False, kernel_manager_class=_kernel_manager(env),
                )
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def execute(chapters: Sequence[ChapterResult], layout: Layout, *, kernel: str = "python3") -> float:
    """Step 3: run every chapter planned ``"execute"`` (write a placeholder for a skipped one never built), keep a
    cache record per chapter, and return the seconds spent. A failing chapter raises `BookError` naming the cell
    and keeps the partial notebook in ``.cache/book/<build>/failed``; the last good notebook is left alone."""
    from tqdm.auto import tqdm

    t_exec = time.perf_counter()
    from .verdict_index import OUT_ENV, files_dir

    env = child_env({**KERNEL_ENV, OUT_ENV: str(files_dir(layout.build_dir))})  # chapters' verdicts, records
    kernel_ready = False
    for d in (layout.chapters, layout.cache):
        d.mkdir(parents=True, exist_ok=True)
    bar = tqdm(chapters, desc="chapters", unit="ch", file=sys.stderr, disable=None, leave=False)
    for result in bar:
        name = result.name
        bar.set_postfix_str(name)
        if result.status == "skipped":
            if not result.output.is_file():
                _placeholder(result.output, name)
            bar.write(f"{name}: skipped (--only)")
            continue
        if result.status == "cached":
            bar.write(f"{name}: cached")
            continue
        if not kernel_ready:
            ensure_kernel(kernel)
            kernel_ready = True
        record_path = layout.cache / f"{name}.json"
        record_path.unlink(missing_ok=True)
        partial = layout.failed / f"{name}.ipynb"
        partial.unlink(missing_ok=True)
        kernel_log = layout.cache / "logs" / f"{name}.kernel.log"
        t0 = time.perf_counter()
        try:
            _execute(result.notebook, partial, result.parameters, layout.notebooks, kernel, kernel_log, env)
        except Exception as exc:  # noqa: BLE001 - turned into a clear message
            result.status, result.seconds = "failed", time.perf_counter() - t0
            bar.close()
            nb = result.notebook
            raise BookError(_describe_failure(exc, nb.relative_to(layout.root) if nb.is_relative_to(layout.root)
                                              else nb, partial, kernel_log)) from exc
        secs = time.perf_counter() - t0
        _for_readers(partial, result.parameters)
        os.replace(partial, result.output)
        result.status, result.seconds = "executed", secs
        record = {"key": result.key, "seconds": round(secs, 3), "output": str(result.output),
                  "executed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "parameters": result.parameters, "fingerprints": result.fingerprints}
        atomic_write_text(record_path, json.dumps(record, indent=2, ensure_ascii=False))
        bar.write(f"{name}: executed in {secs:.1f} s")
    bar.close()
    return time.perf_counter() - t_exec


# --------------------------------------------------------------------------- step 4: appendix


def _versions(prov: Mapping[str, Any]) -> dict[str, str]:
    """The versions that decide what a reader sees: `fusion_utils.runs.provenance`'s, and the book tools'."""
    from importlib.metadata import PackageNotFoundError, version

    out = {k: str(prov.get(k) or "not installed") for k in ("python", "fusion_utils", "torch", "transformers",
                                                              "numpy")}
    for dist in ("jupyter-book", "sphinx", "myst-nb", "papermill", "plotly"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _git_revision(prov: Mapping[str, Any]) -> str | None:
    commit = prov.get("git_commit")
    if not commit:
        return None
    return commit[:7] + ("+dirty" if prov.get("git_dirty") else "")


def _fmt_value(v: Any) -> str:
    return "`" + json.dumps(v, ensure_ascii=False) + "`"


def _appendix_markdown(info: dict) -> str:
    lines = [
        "# Reproducibility appendix",
        "",
        "This page is written by `fusion_utils.book.build` just before the book is rendered. It records what "
        "produced every chapter: the parameters each notebook ran with, how long it took, whether its output came "
        "from the build cache, the fingerprints of the models, and the software versions.",
        "",
        f"- Parameters file: `{info['params_file']}`",
        f"- Built: {info['built_at']}" + (f" from revision `{info['git']}`" if info.get("git") else ""),
        f"- Platform: {info['platform']}",
        "",
        "To rebuild exactly this book run:",
        "",
        "```bash",
        f"make book BOOK_PARAMS={info['params_file']}",
        "```",
        "",
        "## Chapters",
        "",
        "| chapter | status | execution time (s) | cache key |",
        "|---|---|---|---|",
    ]
    for ch in info["chapters"]:
        secs = "–" if ch["seconds"] is None else f"{ch['seconds']:.1f}"
        status = {"cached": "cached (not re-executed)", "skipped": "not built (`--only`)"}.get(ch["status"], ch["status"])
        lines.append(f"| {ch['name']} | {status} | {secs} | `{ch['key'][:12]}` |")
    lines += ["", "## Parameters", ""]
    chs = info["chapters"]
    shared = {k: v for k, v in (chs[0]["parameters"].items() if chs else ())
              if all(k in c["parameters"] and canonical_json({"v": c["parameters"][k]}) == canonical_json({"v": v})
                 for c in chs)}
    lines += ["Passed to every chapter:", ""]
    lines += [f"- `{k}` = {_fmt_value(v)}" for k, v in shared.items()] or ["- (nothing)"]
    lines.append("")
    for ch in chs:
        own = {k: v for k, v in ch["parameters"].items() if k not in shared}
        if own:
            lines += [f"Only for **{ch['name']}**:", ""]
            lines += [f"- `{k}` = {_fmt_value(v)}" for k, v in own.items()]
            lines.append("")
    lines += ["## Models", "", "| model | fingerprint |", "|---|---|"]
    models: dict[str, str] = {}
    for ch in info["chapters"]:
        models.update(ch.get("fingerprints") or {})
    for name, fp in models.items():
        lines.append(f"| `{name}` | `{fp}` |")
    if not models:
        lines.append("| (none) | |")
    lines += ["", "## Software", "", "| package | version |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info["versions"].items()]
    lines += ["", f"The same information is in machine-readable form in `book/_build/{info['name']}/build_info.json`.", ""]
    return "\n".join(lines)


def _write_if_changed(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    atomic_write_text(path, text)


def appendix(report: BuildReport, layout: Layout, params: dict, prov: Mapping[str, Any] | None = None) -> dict:
    """Step 4: the build information (``build_info.json``) and the reproducibility appendix page; returns the
    information. ``prov``: the build's `fusion_utils.runs.provenance` (taken here when not given)."""
    prov = prov if prov is not None else provenance()
    common = params["common"]
    info = {
        "name": layout.name,
        "params_file": _display_path(report.params_file, layout.root),
        "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": _git_revision(prov),
        "platform": f"{platform.system()} {prov.get('machine') or platform.machine()}, Python {prov.get('python')}",
        "versions": _versions(prov),
        "models": list(dict.fromkeys(m for c in report.chapters for m in _models_in(c.parameters))),
        "data": {k: common.get(k) for k in ("dataset", "source", "samples") if k in common},
        "chapters": [
            {"name": c.name, "status": c.status, "seconds": None if c.seconds is None else round(c.seconds, 3),
             "parameters": c.parameters, "key": c.key, "fingerprints": c.fingerprints}
            for c in report.chapters
        ],
    }
    from .verdict_index import files_dir, parameters_markdown  # the chapters' own knobs (threshold, ρ, λ, ...)

    own = parameters_markdown(files_dir(layout.build_dir), [c.name for c in report.chapters])
    _write_if_changed(layout.generated / "reproducibility.md", _appendix_markdown(info) + ("\n" + own if own else ""))
    layout.build_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(layout.build_info, json.dumps(info, indent=2, ensure_ascii=False))
    report.build_info = layout.build_info
    return info


# --------------------------------------------------------------------------- step 5: render


# jupyter-book's own build, minus its fixed output folder: Sphinx writes <build>/html and <build>/.doctrees
_SPHINX = """import sys
from pathlib import Path
from jupyter_book.sphinx import build_sphinx
src, out, strict, keep_going, force_all, quiet = sys.argv[1], sys.argv[2], *(a == "1" for a in sys.argv[3:7])
result = build_sphinx(src, out, noconfig=True, path_config=str(Path(src) / "_config.yml"),
                      confoverrides={"external_toc_path": str(Path(src) / "_toc.yml"), "latex_individualpages": False},
                      builder="html",
                      warningiserror=strict, keep_going=keep_going, force_all=force_all, quiet=quiet,
                      really_quiet=False)
sys.exit(result if isinstance(result, int) else 1)
"""


def render(layout: Layout, *, strict: bool = False, keep_going: bool = True, all_pages: bool = False,
           quiet: bool = True) -> Path:
    """Step 5: Sphinx with jupyter-book's configuration (execution off) on the build's ``src``, into its ``html``;
    then the index page of every build. Returns the HTML folder."""
    cmd = [sys.executable, "-c", _SPHINX, str(layout.src), str(layout.html), *("1" if f else "0" for f in (
        strict, strict and keep_going, all_pages, quiet))]
    sys.stdout.flush()
    sys.stderr.flush()
    proc = subprocess.run(cmd, cwd=str(layout.src), env=child_env({"PYDEVD_DISABLE_FILE_VALIDATION": "1"}))
    if proc.returncode != 0:
        raise BookError(
            f"jupyter-book build failed (exit code {proc.returncode}"
            f"{', warnings are errors' if strict else ''}); see the Sphinx messages above."
        )
    write_index(layout.builds)
    return layout.html


def _fmt_models(models: Iterable[str]) -> str:
    return ", ".join(_html.escape(m) for m in models) or "–"


def write_index(builds: Path) -> Path:
    """``book/_build/index.html``: one row per build found (a folder with ``build_info.json`` and ``html/``), with
    its parameters file, models, data and date, newest first."""
    rows = []
    for info_path in sorted(Path(builds).glob("*/build_info.json")):
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except ValueError:
            continue  # a build being written right now: it lists itself when it finishes
        d = info_path.parent
        if not (d / "html" / "index.html").is_file():
            continue
        data = info.get("data") or {}
        what = " · ".join(str(x) for x in (data.get("dataset"), data.get("source"),
                                            f"{data['samples']} samples" if data.get("samples") is not None else None)
                         if x)
        rows.append((info.get("built_at", ""), f"<tr><td><a href=\"{_html.escape(d.name)}/html/index.html\">"
                     f"{_html.escape(d.name)}</a></td><td><code>{_html.escape(str(info.get('params_file', '')))}"
                     f"</code></td><td>{_fmt_models(info.get('models') or [])}</td><td>{_html.escape(what) or '–'}"
                     f"</td><td>{_html.escape(info.get('built_at', ''))}</td><td><code>"
                     f"{_html.escape(str(info.get('git') or '–'))}</code></td></tr>"))
    rows.sort(reverse=True)
    body = "\n".join(r for _, r in rows) or "<tr><td colspan=\"6\">No build found.</td></tr>"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Companion book: builds</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;width:100%}}th,td{{text-align:left;padding:.4em .6em;border-bottom:1px solid #ddd;
vertical-align:top}}th{{background:#f4f4f4}}</style></head>
<body><h1>Where Does Vision Meet Language? — builds of the companion book</h1>
<p>Each parameters file builds into its own folder (<code>make book BOOK_PARAMS=book/params/&lt;name&gt;.yml</code>).
This page lists the builds found beside it.</p>
<table><thead><tr><th>build</th><th>parameters file</th><th>models</th><th>data</th><th>built (UTC)</th>
<th>revision</th></tr></thead>
<tbody>
{body}
</tbody></table></body></html>
"""
    path = Path(builds) / "index.html"
    _write_if_changed(path, page)
    return path


# --------------------------------------------------------------------------- build


def build(params_file: str | os.PathLike, force: bool = False, only: Sequence[str] | None = None, *,
          root: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
          html: bool = True, strict: bool = False, keep_going: bool = True, all_pages: bool = False,
          kernel: str = "python3",
          raise_on_error: bool = True, log=None) -> BuildReport:
    """Execute the book's chapters (with caching) and render it: `validate`, `plan`, `execute`, `appendix`,
    `render`.

    Parameters
    ----------
    params_file
        A parameters YAML file (e.g. ``book/params/default.yml``); relative paths
        are tried against the working directory, then against ``root``. Its name
        names the build: ``book/_build/<name>/html``.
    force
        Re-execute the selected chapters even when their cache key matches.
    only
        Chapter names to consider; the others are left as they are (a
        placeholder page is written for one that was never built).
    root
        The directory with ``_config.yml``, ``_toc.yml``, ``book/`` and
        ``notebooks/`` (default: found from the working directory).
    out
        Where the builds and caches go (default ``root``): ``out/book/_build`` and ``out/.cache/book``.
    html
        Render the HTML after executing the chapters.
    strict
        Treat Sphinx warnings as errors (``-W``; with ``keep_going`` all
        warnings are reported before failing).
    all_pages
        Re-render every page, not only changed ones; with ``strict`` this
        re-checks warnings of unchanged pages too.
    kernel
        Jupyter kernel name; it is made to run this interpreter.
    raise_on_error
        Raise :class:`BookError` on failure (default) instead of returning a
        report with ``ok=False``.
    """
    t_start = time.perf_counter()
    say = log or (lambda msg: print(msg, flush=True))
    root_p = Path(root).resolve() if root is not None else find_root()
    out_p = Path(out).resolve() if out is not None else root_p
    layout = Layout(root=root_p, out=out_p, name=build_name(params_file))
    report = BuildReport(params_file=Path(params_file), chapters=[], html_dir=None, build_info=None)
    try:
        params = validate(params_file, layout, only)
        report.params_file = params["path"]
        prov = provenance()  # versions and git state, once per build
        report.chapters = plan(params, layout, force=force, only=only, prov=prov)
        _stage(root_p, layout.src)
        report.execute_seconds = execute(report.chapters, layout, kernel=kernel)
        appendix(report, layout, params, prov)
        from . import verdict_index

        names = [c.name for c in report.chapters]
        verdict_index.write_page(verdict_index.files_dir(layout.build_dir), layout.generated, names)
        if html:
            t_jb = time.perf_counter()
            say(f"jupyter-book: rendering {layout.name} ...")
            report.html_dir = render(layout, strict=strict, keep_going=keep_going, all_pages=all_pages)
            verdict_index.publish(verdict_index.files_dir(layout.build_dir), layout.chapters, layout.html, names)
            report.index = layout.builds / "index.html"
            report.jupyter_book_seconds = time.perf_counter() - t_jb
            say(f"jupyter-book: done in {report.jupyter_book_seconds:.1f} s -> {layout.html / 'index.html'}")
    except BookError as exc:
        report.ok, report.error = False, str(exc)
        report.total_seconds = time.perf_counter() - t_start
        if raise_on_error:
            raise
        return report
    report.total_seconds = time.perf_counter() - t_start
    return report


def _display_path(p: Path, root: Path) -> str:
    try:
        return Path(p).resolve().relative_to(root).as_posix()
    except ValueError:
        return str(p)


def clean(root: str | os.PathLike | None = None, *, keep_cache: bool = False, name: str | None = None) -> list[Path]:
    """Remove the builds (``book/_build``) and, unless ``keep_cache``, the chapter caches (``.cache/book``); with
    ``name``, only that build's folder and cache. Also removes ``book/chapters`` and ``book/_generated`` left by
    earlier versions of the driver."""
    root_p = Path(root).resolve() if root is not None else find_root()
    if name is not None:
        targets = [root_p / "book" / "_build" / name] + ([] if keep_cache else [root_p / ".cache" / "book" / name])
    else:
        targets = [root_p / "book" / "_build", root_p / "book" / "chapters", root_p / "book" / "_generated"]
        if not keep_cache:
            targets.append(root_p / ".cache" / "book")
    removed = []
    for t in targets:
        if t.exists():
            shutil.rmtree(t)
            removed.append(t)
    if name is not None and (root_p / "book" / "_build").is_dir():
        write_index(root_p / "book" / "_build")
    return removed


# --------------------------------------------------------------------------- CLI


def _cmd_build(args: argparse.Namespace) -> int:
    try:
        report = build(args.params, force=args.force, only=args.only or None, root=args.root, out=args.out,
                       html=not args.no_html, strict=args.strict)
    except BookError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1)
    n_exec, n_cached = len(report.executed), len(report.cached)
    print(f"book: {n_exec} chapter(s) executed, {n_cached} cached, total {report.total_seconds:.1f} s")
    if report.html_dir is not None:
        print(f"book: {report.html_dir / 'index.html'} (all builds: {report.index})")
    return 0


def _cmd_clean(args: argparse.Namespace) -> int:
    try:
        removed = clean(args.root, keep_cache=args.keep_cache,
                        name=build_name(args.params) if args.params else None)
    except BookError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1)
    for p in removed:
        print(f"removed {p}")
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Add the ``book`` sub-command (``build``, ``clean``) to an argparse
    sub-parsers object. Each leaf sets ``func``; call ``args.func(args)``
    (it returns 0, or raises ``SystemExit(1)`` on failure)."""
    p = subparsers.add_parser("book", help="build the companion book", description="Build or clean the companion book.")
    sub = p.add_subparsers(dest="book_command", metavar="{build,clean,precompute}")
    sub.required = True
    b = sub.add_parser("build", help="execute the chapters (cached) and render the HTML book")
    b.add_argument("--params", default="book/params/default.yml", metavar="FILE",
                   help="parameters file (default: book/params/default.yml); builds into book/_build/<its name>")
    b.add_argument("--force", action="store_true", help="re-execute chapters even if cached")
    b.add_argument("--only", nargs="+", metavar="CHAPTER", help="execute only these chapters")
    b.add_argument("--strict", action="store_true", help="treat Sphinx warnings as errors")
    b.add_argument("--no-html", action="store_true", help="execute the chapters but do not render the HTML")
    b.add_argument("--root", default=None, help="book root (default: found from the working directory)")
    b.add_argument("--out", default=None, help="put book/_build and .cache/book under this directory")
    b.set_defaults(func=_cmd_build)
    c = sub.add_parser("clean", help="remove the builds (book/_build) and the chapter caches (.cache/book)")
    c.add_argument("--params", default=None, metavar="FILE", help="remove only this parameters file's build")
    c.add_argument("--keep-cache", action="store_true", help="keep .cache/book")
    c.add_argument("--root", default=None, help="book root (default: found from the working directory)")
    c.set_defaults(func=_cmd_clean)
    from .precompute import add_cli as add_precompute  # the chapters' experiments only, under a launcher

    add_precompute(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fusion_utils.book build|clean ...`` (same as ``fusion-utils book ...``)."""
    parser = argparse.ArgumentParser(prog="fusion-utils")
    subs = parser.add_subparsers(dest="command")
    subs.required = True
    add_cli(subs)
    args = parser.parse_args(["book", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
