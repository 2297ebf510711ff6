"""Sphinx extension: ``repository.url`` of _config.yml as MyST substitutions for the prose pages, and launch
buttons (Colab, Binder) that open the notebook a reader can run, ``notebooks/<chapter>.ipynb`` in the repository,
not the executed copy the driver writes to ``book/chapters/`` in the build (which is not in the repository)."""
from __future__ import annotations

CHAPTERS = "book/chapters/"
NOTEBOOKS = "notebooks/"


def _rewrite(node, old: str, new: str):
    if isinstance(node, dict):
        return {k: (v.replace(old, new) if k == "url" and isinstance(v, str) else _rewrite(v, old, new))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite(x, old, new) for x in node]
    return node


def point_at_source_notebooks(app, pagename, templatename, context, doctree) -> None:
    if not pagename.startswith(CHAPTERS) or "header_buttons" not in context:
        return
    name = pagename[len(CHAPTERS):]
    # Binder and Colab spell the path with "/" or with "%2F": both are rewritten
    for old, new in ((f"{CHAPTERS}{name}.ipynb", f"{NOTEBOOKS}{name}.ipynb"),
                     (f"{CHAPTERS.replace('/', '%2F')}{name}.ipynb", f"{NOTEBOOKS.replace('/', '%2F')}{name}.ipynb")):
        context["header_buttons"] = _rewrite(context["header_buttons"], old, new)


def repository_substitutions(app, config) -> None:
    """``{{ repository }}`` (a link) and ``{{ repository_url }}`` in the prose pages, from ``repository.url``."""
    url = (config.html_theme_options or {}).get("repository_url") or ""
    subs = dict(getattr(config, "myst_substitutions", None) or {})
    subs.setdefault("repository_url", url or "(repository URL not set in _config.yml)")
    subs.setdefault("repository", f"[{url}]({url})" if url else "(repository URL not set in _config.yml)")
    repo = url.split("github.com/")[-1].strip("/") if "github.com/" in url else ""
    subs.setdefault("colab_link", f"[open `book/colab.ipynb` in Colab](https://colab.research.google.com/github/{repo}"
                    "/blob/main/book/colab.ipynb)" if repo else "`book/colab.ipynb`")
    config.myst_substitutions = subs


def repository_in_code(app, docname, source) -> None:
    """``{{ repository_url }}`` inside code blocks too (the BibTeX entry, the clone command), where MyST does not
    substitute: the raw text of a Markdown page gets the URL before it is parsed."""
    token = "{{ repository_url }}"
    if source and token in source[0]:
        source[0] = source[0].replace(token, app.config.myst_substitutions.get("repository_url", ""))


def setup(app):
    app.connect("config-inited", repository_substitutions)
    app.connect("source-read", repository_in_code)
    # after sphinx-book-theme adds its launch buttons (priority 501)
    app.connect("html-page-context", point_at_source_notebooks, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
