"""Every verdict of a build on one page, and the files each chapter leaves for download.

Each chapter writes its verdict rows (``verdicts.json``) and its run records (CSV) into
``<build>/files/<chapter>/`` (`fusion_utils.report.display.downloads_dir`, which reads the folder from the
``FUSION_UTILS_BOOK_FILES`` environment variable the driver gives the kernel). The driver then calls, per build:

- `write_page` after the chapters ran and before Sphinx: the body of ``book/verdicts.md`` (an include), with
  every claim x model verdict, its Holm-adjusted p-value across the build's claims and a link to its chapter's row;
- `publish` after Sphinx: the chapters' files and executed notebooks copied into ``html/_chapter_files/``, where
  the chapters' download links point.
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Sequence

from ..report.display import OUT_ENV, holm, verdicts_html

__all__ = ["OUT_ENV", "FILES_URL", "collect", "page_markdown", "write_page", "publish", "files_dir",
           "chapter_parameters", "parameters_markdown"]

#: where the chapters' files are served from, relative to the html root
FILES_URL = "_chapter_files"
BODY = "verdicts_body.md"


def files_dir(build_dir: str | Path) -> Path:
    """The folder of a build where its chapters write (the value of ``FUSION_UTILS_BOOK_FILES``)."""
    return Path(build_dir) / "files"


def collect(files: str | Path, chapters: Sequence[str]) -> list[dict]:
    """The verdict rows every chapter of ``chapters`` wrote, in that order; a chapter that wrote none adds none.
    A file that does not parse is named in a `ValueError` (a chapter died while writing it: rebuild it)."""
    rows = []
    for ch in chapters:
        path = Path(files) / ch / "verdicts.json"
        if not path.is_file():
            continue
        try:
            got = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); rebuild the {ch} chapter with --force.") from None
        rows += [dict(r, chapter=ch) for r in got]
    return rows


def page_markdown(rows: Sequence[dict]) -> str:
    """The verdict page's body: counts, then one table of every verdict with Holm's correction across the build's
    claims (every row with a p-value is one test of the family) and links to the chapters' rows."""
    adjusted = holm([r.get("p") for r in rows])
    links = {r["anchor"]: f"chapters/{r['chapter']}.html#{r['anchor']}" for r in rows if r.get("anchor")}
    kinds = Counter(str(r.get("verdict", "")).split(":")[0] for r in rows)
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])) or "none"
    chapters = list(dict.fromkeys(r["chapter"] for r in rows))
    html = verdicts_html(rows, holm_p=adjusted, links=links).replace("\n", " ")
    return (f"This build reached **{len(rows)} verdicts** over {len(chapters)} chapters ({summary}).\n\n"
            f"```{{raw}} html\n{html}\n```\n")


def write_page(files: str | Path, generated: str | Path, chapters: Sequence[str]) -> Path:
    """Write ``<generated>/verdicts_body.md`` (included by ``book/verdicts.md``) from the chapters' verdict files."""
    out = Path(generated) / BODY
    out.parent.mkdir(parents=True, exist_ok=True)
    text = page_markdown(collect(files, chapters))
    if not (out.is_file() and out.read_text(encoding="utf-8") == text):
        out.write_text(text, encoding="utf-8")
    return out


def publish(files: str | Path, executed: str | Path, html: str | Path, chapters: Sequence[str]) -> Path:
    """Copy the chapters' files and their executed notebooks (``<executed>/<chapter>.ipynb``) to
    ``<html>/_chapter_files/<chapter>/``, where the chapters link to them. Returns that folder."""
    dest = Path(html) / FILES_URL
    for ch in chapters:
        d = dest / ch
        d.mkdir(parents=True, exist_ok=True)
        src = Path(files) / ch
        if src.is_dir():
            shutil.copytree(src, d, dirs_exist_ok=True)
        nb = Path(executed) / f"{ch}.ipynb"
        if nb.is_file():
            shutil.copy2(nb, d / nb.name)
    return dest


def chapter_parameters(files: str | Path, chapters: Sequence[str]) -> dict[str, dict]:
    """The knobs each chapter used beyond the parameters file (threshold, ρ, λ, k, ...), as it wrote them
    (``<files>/<chapter>/parameters.json``); chapters that wrote none are left out."""
    out = {}
    for ch in chapters:
        path = Path(files) / ch / "parameters.json"
        if path.is_file():
            out[ch] = json.loads(path.read_text(encoding="utf-8"))
    return out


def parameters_markdown(files: str | Path, chapters: Sequence[str]) -> str:
    """A section for the reproducibility appendix: every chapter's own knobs, so the appendix lists every
    parameter that decides a number (the parameters file's values are listed there already)."""
    rows = [f"| {ch} | " + ", ".join(f"`{k} = {v!r}`" for k, v in knobs.items()) + " |"
            for ch, knobs in chapter_parameters(files, chapters).items()]
    if not rows:
        return ""
    return ("## The chapters' own parameters\n\nThe notebook defaults each chapter ran with, beside the parameters "
            "file's values above.\n\n| chapter | parameters |\n|---|---|\n" + "\n".join(rows) + "\n")
