"""``fusion-utils book precompute --params FILE``: run every chapter's experiments, under the current launcher, so
that ``make book`` afterwards finds each chapter's run records complete and only renders.

    torchrun --nproc_per_node 8 -m fusion_utils book precompute --params book/params/llava-1.5-7b.yml
    make book BOOK_PARAMS=book/params/llava-1.5-7b.yml

Each chapter is the authority on which experiments it runs and with which parameters (some depend on earlier
results, e.g. the contrastive chapter picks its layers from a masking run), so precompute does not restate them: it
executes the chapter notebook's own code, with the parameters file's values injected exactly as the book build
injects them, from its first code cell up to the last one that mentions ``runs_dir`` (the cells that compute; what
follows only renders). Every rank executes the same cells, so every `run` call is made by all ranks in the same
order and data-parallel (see `fusion_utils.distributed`); the chapters' records land where the book build looks for
them (``runs_dir`` relative to ``notebooks/``).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from .. import distributed

COMPUTE_MARK = "runs_dir"  # the cells that write run records pass out=runs_dir


def compute_cells(notebook: Path) -> list[str]:
    """The sources of the notebook's code cells up to the last that mentions ``runs_dir``, parameters cell first."""
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    code = [c for c in nb.get("cells", []) if c.get("cell_type") == "code"]
    sources = ["".join(c.get("source", "")) for c in code]
    marked = [i for i, s in enumerate(sources) if COMPUTE_MARK in s]
    if not marked:
        raise ValueError(f"{notebook} has no code cell that mentions {COMPUTE_MARK}; precompute needs the chapter to "
                         f"write its records with out={COMPUTE_MARK}.")
    for i, s in enumerate(sources[:marked[-1] + 1]):
        if any(line.lstrip().startswith(("%", "!")) for line in s.splitlines()):
            raise ValueError(f"{notebook}, code cell {i + 1}, uses an IPython magic or shell escape; precompute runs "
                             "the cells as plain Python, so write that line in Python.")
    return sources[:marked[-1] + 1]


def run_chapter(notebook: Path, parameters: dict) -> float:
    """Execute the computing cells of ``notebook`` with ``parameters`` in its folder; returns the seconds taken."""
    import matplotlib

    matplotlib.use("Agg")  # figures of the computing cells are never shown here
    import matplotlib.pyplot as plt

    cells = compute_cells(notebook)
    ns: dict = {"__name__": "__precompute__"}
    t0 = time.perf_counter()
    here = os.getcwd()
    os.chdir(notebook.parent)  # the book executes chapters in notebooks/: runs_dir="../runs" resolves the same
    try:
        for i, src in enumerate(cells):
            # the printed tables and figures of these cells are the book's to show; keep the console to progress
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(src, f"{notebook.name}[cell {i + 1}]", "exec"), ns)
            if i == 0:  # papermill injects the parameters right after the parameters cell
                ns.update(parameters)
            plt.close("all")
    finally:
        os.chdir(here)
    return time.perf_counter() - t0


def precompute(params_file: str | os.PathLike, *, root: str | os.PathLike | None = None,
               only: Sequence[str] | None = None) -> dict[str, float]:
    """Run the experiments of every chapter of ``params_file`` (or ``only`` these); returns seconds per chapter."""
    from tqdm.auto import tqdm

    from .layout import find_root
    from .params import load_params

    os.environ["FUSION_UTILS_STATIC"] = "1"  # as in the book build: widgets render as static figures
    distributed.setup()
    root_p = Path(root).resolve() if root is not None else find_root()
    params = load_params(params_file, root_p)
    names = list(params["chapters"])
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ValueError(f"--only names unknown chapter(s) {', '.join(unknown)}; choose from {', '.join(names)}.")
        names = [n for n in names if n in only]
    seconds: dict[str, float] = {}
    bar = tqdm(names, desc="precompute", unit="chapter", disable=not distributed.is_main(), file=sys.stderr)
    for name in bar:
        bar.set_postfix_str(name)
        notebook = root_p / "notebooks" / f"{name}.ipynb"
        if not notebook.is_file():
            raise ValueError(f"Chapter {name!r} has no notebook {notebook}; fix the name in {params['path']}.")
        seconds[name] = run_chapter(notebook, {**params["common"], **params["chapters"][name]})
        if distributed.is_main():
            bar.write(f"{name}: records complete ({seconds[name]:.1f} s, {distributed.world_size()} rank(s))",
                      file=sys.stderr)
    distributed.barrier()
    return seconds


def cmd_precompute(args: argparse.Namespace) -> int:
    from .layout import BookError

    try:
        precompute(args.params, root=args.root, only=args.only)
    except BookError as err:
        print(f"fusion-utils book precompute: {err}", file=sys.stderr)
        return 2
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Add ``precompute`` to the ``book`` sub-commands."""
    p = subparsers.add_parser("precompute", help="run every chapter's experiments (under torchrun / accelerate "
                              "launch: data-parallel), so that `book build` only renders")
    p.add_argument("--params", default="book/params/default.yml", metavar="FILE",
                   help="parameters file (default: book/params/default.yml)")
    p.add_argument("--only", nargs="+", metavar="CHAPTER", help="only these chapters")
    p.add_argument("--root", default=None, help="book root (default: found from the working directory)")
    p.set_defaults(func=cmd_precompute)
    return p


__all__ = ["precompute", "run_chapter", "compute_cells", "add_cli"]
