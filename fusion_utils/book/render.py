"""Step 5: Sphinx with jupyter-book's configuration on a build's sources, then the builds' index."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from .execute import child_env
from .index import write_index
from .layout import BookError, Layout


def stage(root: Path, src: Path) -> None:
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
