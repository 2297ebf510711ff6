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

:func:`build` runs five small steps, each in a module of this package (``params``, ``plan``, ``execute``,
``appendix``, ``render``; ``index`` writes the builds' index page, ``precompute`` runs the chapters' experiments
only, ``chapter`` is what a chapter notebook calls to check its parameters and load its models):

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

from . import appendix, chapter, execute, index, params, plan, precompute, render, verdict_index  # noqa: F401
from .driver import add_cli, build, clean, main
from .index import write_index
from .layout import BookError, Layout, find_root
from .params import load_params, validate
from .plan import BuildReport, ChapterResult, cache_key

# the steps are modules (``book.plan.plan``, ``book.execute.execute``, ...): a function re-exported under its module's
# name would hide the module
__all__ = ["BookError", "BuildReport", "ChapterResult", "Layout", "add_cli", "build", "cache_key", "clean",
           "find_root", "load_params", "main", "validate", "write_index", "appendix", "chapter", "execute", "index",
           "params", "plan", "precompute", "render", "verdict_index"]
