"""Assemble every book build under book/_build/ into one static site (`make site`).

    python scripts/assemble_site.py [--builds book/_build] [--out site]

Each build's rendered HTML and its build_info.json are copied to <out>/<build>/ (the sources, doctrees and chapter
caches are left behind), and the index page listing the builds is written by the book driver's own
`fusion_utils.book.write_index`, so the site's index is the one `make book` writes. `.nojekyll` keeps GitHub Pages
from hiding the `_static/` folders. The result is served by any static host: open <out>/index.html.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from fusion_utils.book import write_index


def assemble(builds: Path, out: Path) -> list[str]:
    """Copy each finished build (``<build>/build_info.json`` and ``<build>/html/index.html``) to ``out``; return
    the build names. Raises ValueError naming the fix when there is none."""
    found = sorted(d for d in builds.glob("*/") if (d / "build_info.json").is_file()
                   and (d / "html" / "index.html").is_file())
    if not found:
        raise ValueError(f"No finished book build under {builds}: run `make book` (or `fusion-utils book build "
                         "--params book/params/<name>.yml`) first.")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for d in found:
        shutil.copytree(d / "html", out / d.name / "html", ignore=shutil.ignore_patterns(".buildinfo", ".doctrees"))
        shutil.copy2(d / "build_info.json", out / d.name / "build_info.json")
    write_index(out)
    (out / ".nojekyll").write_text("")
    return [d.name for d in found]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--builds", default="book/_build", help="the folder holding the builds (default book/_build)")
    ap.add_argument("--out", default="site", help="where the site goes (default site/; replaced)")
    args = ap.parse_args(argv)
    try:
        names = assemble(Path(args.builds), Path(args.out))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"site: {len(names)} build(s) ({', '.join(names)}) -> {Path(args.out) / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
