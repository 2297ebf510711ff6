"""Where a build reads and writes, and the one error type of the book driver."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..runs import atomic_write_text


class BookError(RuntimeError):
    """A build problem with a one-sentence explanation of how to fix it."""


def find_root(start: str | os.PathLike | None = None) -> Path:
    """The book root: the nearest directory (from ``start``, default cwd, upwards)
    holding both ``_config.yml`` and ``_toc.yml``."""
    here = Path(start or os.getcwd()).resolve()
    for d in (here, *here.parents):
        if (d / "_config.yml").is_file() and (d / "_toc.yml").is_file():
            return d
    pkg_root = Path(__file__).resolve().parents[2]
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


def display_path(p: Path, root: Path) -> str:
    try:
        return Path(p).resolve().relative_to(root).as_posix()
    except ValueError:
        return str(p)


def write_if_changed(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    atomic_write_text(path, text)
