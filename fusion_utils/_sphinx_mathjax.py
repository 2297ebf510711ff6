"""Sphinx extension for the book's offline assets: every script a page runs is served from the build, never a CDN,
so the book works on a machine without internet and no page depends on a third-party host.

- MathJax 3 from the `sphinx-mathjax-offline` package (MathJax 3.2.2); only the TeX -> CommonHTML component, its
  fonts and the TeX extensions that `autoload` may fetch are copied (about 2 MB, not 24).
- plotly.js from the `plotly` package, for the kernel-free interactive figures (`fusion_utils.interactive`); it is
  added only to the pages that hold such a figure (it is about 5 MB).

It also keeps the pages free of console errors, which the browser test checks: each inline script is emitted once
(sphinx-thebe's configuration script is registered twice, and its second `const` declaration throws), and the theme
gets a valid default colour mode (an empty one makes pydata-sphinx-theme log an error on every page).

(The module keeps its historical name: `_config.yml` and older builds refer to it.)"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from sphinx.util.fileutil import copy_asset

PARTS = ("tex-chtml.js", "output/chtml/fonts/woff-v2", "input/tex/extensions")
PLOTLY_JS = "plotly/plotly.min.js"  # under _static


def mathjax_dir() -> Path:
    spec = importlib.util.find_spec("sphinx-mathjax-offline")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The book's offline MathJax needs the sphinx-mathjax-offline package; run "
                           "`pip install sphinx-mathjax-offline` (or `make book`, which installs it).")
    return Path(list(spec.submodule_search_locations)[0]) / "static" / "mathjax"


def plotly_js() -> Path:
    from .interactive import plotly_js_path

    return plotly_js_path()


def _copy(app, exc):
    if exc is not None or app.builder.format != "html":
        return
    src, dst = mathjax_dir(), Path(app.outdir) / "_static" / "mathjax"
    for part in PARTS:  # copy_asset copies a directory onto its target, a file into its target directory
        source, target = src / part, dst / part
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_asset(str(source), str(target if source.is_dir() else target.parent))
    js, target = plotly_js(), Path(app.outdir) / "_static" / PLOTLY_JS
    if not target.is_file() or target.stat().st_size != js.stat().st_size:  # 5 MB: copied once, not per build
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        shutil.copyfile(js, tmp)
        tmp.replace(target)


def _page(app, pagename, templatename, context, doctree):
    from .interactive import MARKER_CLASS

    if MARKER_CLASS in (context.get("body") or ""):
        app.add_js_file(PLOTLY_JS)  # inside html-page-context: this page only
    scripts, seen = context.get("script_files"), set()
    if scripts:
        unique = []
        for js in scripts:
            # the same inline script arrives once with filename None and once with '' (registry and builder)
            key = (getattr(js, "filename", None) or "", repr(sorted(getattr(js, "attributes", {}).items())))
            if key not in seen:
                seen.add(key)
                unique.append(js)
        scripts[:] = unique
    if not context.get("default_mode"):  # pydata-sphinx-theme's layout reads it; no theme option sets it here
        context["default_mode"] = "light"




def setup(app):
    mathjax_dir()  # fail at the start of the build, with the fix, when a package is missing
    plotly_js()
    app.config.mathjax_path = "mathjax/tex-chtml.js"
    app.connect("html-page-context", _page)
    app.connect("build-finished", _copy)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
