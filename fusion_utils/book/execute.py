"""Step 3: run the chapters that must, each in a kernel whose environment says "static book"."""
from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..runs import atomic_write_text
from .layout import BookError, Layout
from .plan import ChapterResult
from .verdict_index import OUT_ENV, files_dir

#: What a chapter kernel is told: render the explorers as kernel-free figures (see fusion_utils.widgets).
KERNEL_ENV = {"FUSION_UTILS_STATIC": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}


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
    here = str(Path(__file__).resolve().parents[2])
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
