"""Sphinx extension for the book: MathJax 3 served from the build instead of a CDN, so the book's math renders on a
machine without internet. The files come from the `sphinx-mathjax-offline` package (MathJax 3.2.2); only the TeX ->
CommonHTML component, its fonts and the TeX extensions that `autoload` may fetch are copied (about 2 MB, not 24)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from sphinx.util.fileutil import copy_asset

PARTS = ("tex-chtml.js", "output/chtml/fonts/woff-v2", "input/tex/extensions")


def mathjax_dir() -> Path:
    spec = importlib.util.find_spec("sphinx-mathjax-offline")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The book's offline MathJax needs the sphinx-mathjax-offline package; run "
                           "`pip install sphinx-mathjax-offline` (or `make book`, which installs it).")
    return Path(list(spec.submodule_search_locations)[0]) / "static" / "mathjax"


def _copy(app, exc):
    if exc is not None or app.builder.format != "html":
        return
    src, dst = mathjax_dir(), Path(app.outdir) / "_static" / "mathjax"
    for part in PARTS:  # copy_asset copies a directory onto its target, a file into its target directory
        source, target = src / part, dst / part
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_asset(str(source), str(target if source.is_dir() else target.parent))


def setup(app):
    mathjax_dir()  # fail at the start of the build, with the fix, when the package is missing
    app.config.mathjax_path = "mathjax/tex-chtml.js"
    app.connect("build-finished", _copy)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
