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

:func:`build` executes every chapter whose inputs changed (the notebook's
cells, its parameters, the ``fusion_utils`` source and version, and the
fingerprints of the models it uses), writes the executed notebooks to
``book/chapters/<name>.ipynb``, writes the reproducibility appendix
(``book/_generated/reproducibility.md``) and ``book/_build/build_info.json``,
and then runs ``jupyter-book build`` (notebook execution off) to produce
``book/_build/html``.

Importing this module has no side effects and imports neither papermill nor
jupyter-book; they are loaded when a build starts.

.. _papermill: https://papermill.readthedocs.io
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .runs import canonical_json, package_source_hash

__all__ = [
    "BookError",
    "BuildReport",
    "ChapterResult",
    "add_cli",
    "build",
    "cache_key",
    "clean",
    "find_root",
    "load_params",
    "main",
]

#: Bump when the cache-key recipe changes, so that old cache records never match.
CACHE_SCHEMA = 1

#: Files of the package that do not influence what a chapter computes; editing
#: them does not invalidate the chapter cache.

_SCALARS = (str, int, float, bool, type(None))


class BookError(RuntimeError):
    """A build problem with a one-sentence explanation of how to fix it."""


@dataclasses.dataclass
class ChapterResult:
    """Outcome of one chapter in a :func:`build`."""

    name: str
    #: ``"executed"``, ``"cached"``, ``"skipped"`` (not selected by ``only``) or ``"failed"``.
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
class _Layout:
    root: Path  # where notebooks/ lives (the sources)
    out: Path  # where _config.yml/_toc.yml/book/ are built (== root unless staging)

    @property
    def notebooks(self) -> Path:
        return self.root / "notebooks"

    @property
    def book(self) -> Path:
        return self.out / "book"

    @property
    def chapters(self) -> Path:
        return self.book / "chapters"

    @property
    def generated(self) -> Path:
        return self.book / "_generated"

    @property
    def build_dir(self) -> Path:
        return self.book / "_build"

    @property
    def html(self) -> Path:
        return self.build_dir / "html"

    @property
    def cache(self) -> Path:
        return self.out / ".cache" / "book"

    @property
    def failed(self) -> Path:
        return self.cache / "failed"


def _stage(root: Path, out: Path) -> None:
    """Copy the book sources (config, toc, prose pages, params, assets) to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(root / name, out / name)
    src = root / "book"
    if src.is_dir():
        skip = {"_build", "chapters", "_generated"}
        for item in src.iterdir():
            if item.name in skip:
                continue
            dest = out / "book" / item.name
            if item.is_dir():
                shutil.copytree(item, dest, dirs_exist_ok=True)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(item, dest)


# --------------------------------------------------------------------------- params


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


def _validate(params: dict, layout: _Layout, toc_file: Path) -> None:
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


# --------------------------------------------------------------------------- cache key


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(obj: Any) -> str:
    return canonical_json(obj) if isinstance(obj, Mapping) else canonical_json({"value": obj})


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
    return _sha256(_canonical(cells).encode("utf-8"))


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("fusion_utils")
    except Exception:
        try:
            import fusion_utils

            return str(getattr(fusion_utils, "__version__", "0+unknown"))
        except Exception:
            return "0+unknown"


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
    """The cache key of one chapter execution."""
    parts = {
        "schema": CACHE_SCHEMA,
        "notebook": notebook_source_hash(notebook),
        "parameters": _canonical(dict(parameters)),
        "fusion_utils": version if version is not None else package_version(),
        "package_source": source_hash if source_hash is not None else package_source_hash(),
        "models": _canonical(dict(fingerprints)),
    }
    return _sha256(_canonical(parts).encode("utf-8"))


# --------------------------------------------------------------------------- execution


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

    os.environ["JUPYTER_PREFER_ENV_PATH"] = "1"
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
    nbformat.write(nb, str(path))


class _kernel_sees_this_package:
    """Put the directory this ``fusion_utils`` is imported from on the kernel's
    PYTHONPATH (so a checkout that is not pip-installed works), then restore it."""

    def __enter__(self):
        self.saved = os.environ.get("PYTHONPATH")
        here = str(Path(__file__).resolve().parent.parent)
        parts = [p for p in (self.saved or "").split(os.pathsep) if p]
        if here not in parts:
            os.environ["PYTHONPATH"] = os.pathsep.join([here, *parts])

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = self.saved
        return False


def _execute(notebook: Path, output: Path, parameters: dict, cwd: Path, kernel: str, kernel_log: Path) -> None:
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
                    progress_bar=False, log_output=False,
                )
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


# --------------------------------------------------------------------------- build info / appendix


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("fusion_utils", "torch", "transformers", "jupyter-book", "sphinx", "myst-nb", "papermill", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    out["fusion_utils"] = package_version() if out["fusion_utils"] == "not installed" else out["fusion_utils"]
    return out


def _git_revision(root: Path) -> str | None:
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:
        return None


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
              if all(k in c["parameters"] and _canonical(c["parameters"][k]) == _canonical(v) for c in chs)}
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
    lines += ["", "The same information is in machine-readable form in `book/_build/build_info.json`.", ""]
    return "\n".join(lines)


def _write_if_changed(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- jupyter-book


def _jupyter_book_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "jupyter-book"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("jupyter-book")
    if found:
        return [found]
    return [sys.executable, "-c", "from jupyter_book.cli.main import main; main()"]


def run_jupyter_book(out: Path, *, strict: bool = False, keep_going: bool = True, all_pages: bool = False,
                     quiet: bool = True) -> None:
    """``jupyter-book build out --path-output out/book`` (execution is off in ``_config.yml``)."""
    cmd = _jupyter_book_cmd() + ["build", str(out), "--path-output", str(out / "book")]
    if strict:
        cmd.append("-W")
        if keep_going:
            cmd.append("--keep-going")
    if all_pages:
        cmd.append("--all")
    if quiet:
        cmd.append("-q")
    env = dict(os.environ)
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    sys.stdout.flush()
    sys.stderr.flush()
    proc = subprocess.run(cmd, cwd=str(out), env=env)
    if proc.returncode != 0:
        raise BookError(
            f"jupyter-book build failed (exit code {proc.returncode}"
            f"{', warnings are errors' if strict else ''}); see the Sphinx messages above."
        )


# --------------------------------------------------------------------------- build


def build(params_file: str | os.PathLike, force: bool = False, only: Sequence[str] | None = None, *,
          root: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
          html: bool = True, strict: bool = False, keep_going: bool = True, all_pages: bool = False,
          kernel: str = "python3",
          raise_on_error: bool = True, log=None) -> BuildReport:
    """Execute the book's chapters (with caching) and render it with jupyter-book.

    Parameters
    ----------
    params_file
        A parameters YAML file (e.g. ``book/params/default.yml``); relative paths
        are tried against the working directory, then against ``root``.
    force
        Re-execute the selected chapters even when their cache key matches.
    only
        Chapter names to consider; the others are left as they are (a
        placeholder page is written for one that was never built).
    root
        The directory with ``_config.yml``, ``_toc.yml``, ``book/`` and
        ``notebooks/`` (default: found from the working directory).
    out
        Where to build (default ``root``). A different directory gets a copy of
        the book sources, and its own ``book/chapters``, ``book/_build`` and
        ``.cache/book``; the user's build is left untouched.
    html
        Run ``jupyter-book build`` after executing the chapters.
    strict
        Treat Sphinx warnings as errors (``-W``; with ``keep_going`` all
        warnings are reported before failing).
    all_pages
        Re-render every page (``jupyter-book build --all``), not only changed
        ones; with ``strict`` this re-checks warnings of unchanged pages too.
    kernel
        Jupyter kernel name; it is made to run this interpreter.
    raise_on_error
        Raise :class:`BookError` on failure (default) instead of returning a
        report with ``ok=False``.
    """
    os.environ["FUSION_UTILS_STATIC"] = "1"  # chapter kernels render widgets as static figures
    t_start = time.perf_counter()
    say = log or (lambda msg: print(msg, flush=True))
    root_p = Path(root).resolve() if root is not None else find_root()
    out_p = Path(out).resolve() if out is not None else root_p
    layout = _Layout(root=root_p, out=out_p)
    report = BuildReport(params_file=Path(params_file), chapters=[], html_dir=None, build_info=None)
    try:
        params = load_params(params_file, root_p)
        report.params_file = params["path"]
        for f in ("_config.yml", "_toc.yml"):
            if not (root_p / f).is_file():
                raise BookError(f"{root_p / f} is missing; run the build from the repository root or pass root=.")
        _validate(params, layout, root_p / "_toc.yml")
        names = list(params["chapters"])
        if only:
            unknown = [n for n in only if n not in params["chapters"]]
            if unknown:
                raise BookError(f"--only names unknown chapter(s) {', '.join(unknown)}; choose from {', '.join(names)}.")
        if out_p != root_p:
            _stage(root_p, out_p)
        for d in (layout.chapters, layout.cache, layout.generated):
            d.mkdir(parents=True, exist_ok=True)

        version = package_version()
        source_hash = package_source_hash()
        memo: dict[str, str] = {}
        kernel_ready = False

        from tqdm.auto import tqdm

        bar = tqdm(names, desc="chapters", unit="ch", file=sys.stderr, disable=None, leave=False)
        t_exec = time.perf_counter()
        for name in bar:
            bar.set_postfix_str(name)
            nb = layout.notebooks / f"{name}.ipynb"
            parameters = {**params["common"], **params["chapters"][name]}
            fps = model_fingerprints(_models_in(parameters), memo)
            key = cache_key(nb, parameters, fps, version=version, source_hash=source_hash)
            output = layout.chapters / f"{name}.ipynb"
            record_path = layout.cache / f"{name}.json"
            record = None
            if record_path.is_file():
                try:
                    record = json.loads(record_path.read_text(encoding="utf-8"))
                except ValueError:
                    record = None
            result = ChapterResult(name=name, status="", seconds=None, parameters=parameters, key=key,
                                   notebook=nb, output=output, fingerprints=fps)
            report.chapters.append(result)
            selected = not only or name in only
            if not selected:
                result.status = "skipped"
                if record and output.is_file():
                    result.seconds = record.get("seconds")
                if not output.is_file():
                    _placeholder(output, name)
                bar.write(f"{name}: skipped (--only)")
                continue
            if not force and record and record.get("key") == key and output.is_file():
                result.status = "cached"
                result.seconds = record.get("seconds")
                bar.write(f"{name}: cached")
                continue
            if not kernel_ready:
                ensure_kernel(kernel)
                kernel_ready = True
            record_path.unlink(missing_ok=True)
            partial = layout.failed / f"{name}.ipynb"
            partial.unlink(missing_ok=True)
            kernel_log = layout.cache / "logs" / f"{name}.kernel.log"
            t0 = time.perf_counter()
            try:
                with _kernel_sees_this_package():
                    _execute(nb, partial, parameters, layout.notebooks, kernel, kernel_log)
            except Exception as exc:  # noqa: BLE001 - turned into a clear message
                result.status = "failed"
                result.seconds = time.perf_counter() - t0
                bar.close()
                raise BookError(_describe_failure(exc, nb.relative_to(root_p) if nb.is_relative_to(root_p) else nb,
                                                  partial, kernel_log)) from exc
            secs = time.perf_counter() - t0
            os.replace(partial, output)
            result.status, result.seconds = "executed", secs
            record = {
                "key": key, "seconds": round(secs, 3), "output": str(output),
                "executed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "parameters": parameters, "fingerprints": fps,
            }
            record_path.write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
            bar.write(f"{name}: executed in {secs:.1f} s")
        bar.close()
        report.execute_seconds = time.perf_counter() - t_exec

        # Build information + appendix page (written before jupyter-book runs).
        info = {
            "params_file": _display_path(report.params_file, root_p),
            "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "git": _git_revision(root_p),
            "platform": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
            "versions": _versions(),
            "chapters": [
                {"name": c.name, "status": c.status, "seconds": None if c.seconds is None else round(c.seconds, 3),
                 "parameters": c.parameters, "key": c.key, "fingerprints": c.fingerprints}
                for c in report.chapters
            ],
        }
        _write_if_changed(layout.generated / "reproducibility.md", _appendix_markdown(info))
        layout.build_dir.mkdir(parents=True, exist_ok=True)
        info_path = layout.build_dir / "build_info.json"
        info_path.write_text(json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8")
        report.build_info = info_path

        if html:
            t_jb = time.perf_counter()
            say("jupyter-book: rendering the book ...")
            run_jupyter_book(out_p, strict=strict, keep_going=keep_going, all_pages=all_pages)
            report.jupyter_book_seconds = time.perf_counter() - t_jb
            report.html_dir = layout.html
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


def clean(root: str | os.PathLike | None = None, *, keep_cache: bool = False) -> list[Path]:
    """Remove the build outputs (``book/_build``, ``book/chapters``,
    ``book/_generated``) and, unless ``keep_cache``, ``.cache/book``."""
    root_p = Path(root).resolve() if root is not None else find_root()
    targets = [root_p / "book" / "_build", root_p / "book" / "chapters", root_p / "book" / "_generated"]
    if not keep_cache:
        targets.append(root_p / ".cache" / "book")
    removed = []
    for t in targets:
        if t.exists():
            shutil.rmtree(t)
            removed.append(t)
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
    return 0


def _cmd_clean(args: argparse.Namespace) -> int:
    try:
        removed = clean(args.root, keep_cache=args.keep_cache)
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
                   help="parameters file (default: book/params/default.yml)")
    b.add_argument("--force", action="store_true", help="re-execute chapters even if cached")
    b.add_argument("--only", nargs="+", metavar="CHAPTER", help="execute only these chapters")
    b.add_argument("--strict", action="store_true", help="treat Sphinx warnings as errors")
    b.add_argument("--no-html", action="store_true", help="execute the chapters but do not run jupyter-book")
    b.add_argument("--root", default=None, help="book root (default: found from the working directory)")
    b.add_argument("--out", default=None, help="build into this directory instead of the root")
    b.set_defaults(func=_cmd_build)
    c = sub.add_parser("clean", help="remove book/_build, book/chapters, book/_generated and .cache/book")
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
