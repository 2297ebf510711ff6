"""`build` runs the five steps; `clean`; the ``book`` command line."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

from ..runs import provenance
from . import verdict_index
from .appendix import appendix
from .execute import execute
from .index import write_index
from .layout import BookError, Layout, build_name, find_root
from .params import validate
from .plan import BuildReport, plan
from .render import render, stage


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
        stage(root_p, layout.src)
        report.execute_seconds = execute(report.chapters, layout, kernel=kernel)
        appendix(report, layout, params, prov)
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


def cmd_build(args: argparse.Namespace) -> int:
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


def cmd_clean(args: argparse.Namespace) -> int:
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
    b.set_defaults(func=cmd_build)
    c = sub.add_parser("clean", help="remove the builds (book/_build) and the chapter caches (.cache/book)")
    c.add_argument("--params", default=None, metavar="FILE", help="remove only this parameters file's build")
    c.add_argument("--keep-cache", action="store_true", help="keep .cache/book")
    c.add_argument("--root", default=None, help="book root (default: found from the working directory)")
    c.set_defaults(func=cmd_clean)
    from .precompute import (
        add_cli as add_precompute,  # the chapters' experiments only, under a launcher
    )

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
