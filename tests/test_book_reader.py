"""The built book as a reader sees it (issue 30), in headless Chromium at 1280 px and at 390 px, on every page:

- no table wider than the text column;
- every figure (static image or interactive) has a caption;
- no output cell shows a traceback, a "NaN" or a list of more than 8 numbers;
- book/verdicts.html lists every verdict of the build, each linking to its chapter's row;
- every chapter has its launch links (Colab, Binder) and download links that resolve.

The build checked is the one the real-book test builds (book/params/tiny.yml, the session fixture ``real_book``),
or, with FUSION_UTILS_READER_HTML=book/_build/default/html, an existing build such as the default one.
"""
from __future__ import annotations

import json
import os
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from test_book import REAL_CHAPTERS, Browser, Site, built, require_chromium, toc_pages

# the real book is built once per worker that asks for it: keep its readers on one pytest-xdist worker where the
# mark is honoured (pytest 9 with pytest-xdist 3.8 ignores it; conftest.real_book keeps each build's records apart)
pytestmark = pytest.mark.xdist_group("real_book")

REPO = Path(__file__).resolve().parent.parent
WIDTHS = (1280, 390)

# run in the page: what a reader would see, reduced to the facts the tests check
PROBE = r"""(() => {
  const art = document.querySelector('article.bd-article') || document.querySelector('main');
  const col = art.getBoundingClientRect();
  const wide = [];
  art.querySelectorAll('table').forEach((t, i) => {
    const r = t.getBoundingClientRect();
    if (!r.width) return;
    if (r.right > col.right + 1 || t.scrollWidth > Math.max(t.clientWidth, r.width) + 1)
      wide.push({i: i, width: Math.round(Math.max(r.width, t.scrollWidth)), column: Math.round(col.width),
                 head: (t.tHead ? t.tHead.textContent : t.textContent).trim().slice(0, 80)});
  });
  const uncaptioned = [];
  art.querySelectorAll('img').forEach(img => {
    const fig = img.closest('figure');
    const cap = fig && fig.querySelector('figcaption');
    if (!cap || !cap.textContent.trim()) uncaptioned.push('img ' + (img.getAttribute('alt') || '').slice(0, 60));
  });
  art.querySelectorAll('.fu-interactive').forEach(f => {
    const cap = f.querySelector('.fu-caption');
    if (!cap || cap.textContent.trim().length < 20) uncaptioned.push('interactive ' + f.getAttribute('data-title'));
  });
  const outputs = Array.from(art.querySelectorAll('.cell_output')).map(o => {
    const c = o.cloneNode(true);
    c.querySelectorAll('script, style').forEach(s => s.remove());
    return c.textContent;
  });
  const links = Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href'));
  const downloads = Array.from(art.querySelectorAll('.fu-downloads a[href]')).map(a => a.getAttribute('href'));
  const verdictRows = Array.from(art.querySelectorAll('.fu-vtable tbody tr[id]')).map(tr => tr.id);
  const verdictLinks = Array.from(art.querySelectorAll('.fu-vtable tbody tr a[href]')).map(a => a.getAttribute('href'));
  return {column: col.width, viewport: window.innerWidth, wide, uncaptioned, outputs, links, downloads,
          verdictRows, verdictLinks};
})()"""

LONG_LIST = re.compile(r"-?\d+(?:\.\d+)?(?:\s*,\s*-?\d+(?:\.\d+)?){8,}")


def bad_output(text: str) -> str | None:
    """Why an output cell's visible text is not for a reader, or None."""
    if "Traceback (most recent call last)" in text or re.search(r"\b\w+Error: ", text):
        return "a traceback"
    if re.search(r"\bNaN\b", text):
        return '"NaN"'
    m = LONG_LIST.search(text)
    if m:
        return f"a list of more than 8 numbers: {m.group(0)[:80]}"
    return None


def test_bad_output_rule():
    assert bad_output("layers 0–10, review none found") is None
    assert bad_output("[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]").startswith("a list")
    assert bad_output("gain NaN") == '"NaN"' and bad_output("KeyError: 'x'") == "a traceback"


@pytest.fixture(scope="module")
def reader_html(request):
    env = os.environ.get("FUSION_UTILS_READER_HTML")
    if env:
        html = Path(env).resolve()
        assert (html / "index.html").is_file(), f"FUSION_UTILS_READER_HTML={env}: no index.html there"
        return html
    out, report = request.getfixturevalue("real_book")
    assert report.ok
    return built(out, "tiny") / "html"


def _pages(html: Path) -> list[str]:
    return [f"{p}.html" for p in toc_pages(REPO / "_toc.yml") if (html / f"{p}.html").is_file()]


@pytest.fixture(scope="module")
def probes(reader_html, tmp_path_factory):
    """Every page of the build at both widths, opened once: {(page, width): probe}."""
    require_chromium()
    site = Site(reader_html)
    b = Browser(tmp_path_factory.mktemp("reader"))
    out = {}
    try:
        for width in WIDTHS:
            b.call("Emulation.setDeviceMetricsOverride", width=width, height=900 if width > 500 else 844,
                   deviceScaleFactor=1, mobile=width < 500)
            for page in _pages(reader_html):
                b.call("Page.navigate", url=site.base + page)
                b.wait_for("document.readyState === 'complete'", f"{page} to load")
                time.sleep(0.2)  # the deferred table script
                out[(page, width)] = b.js(PROBE)
        yield site, out
    finally:
        b.close()
        site.close()


def test_pages_were_opened_at_both_widths(probes, reader_html):
    _, out = probes
    pages = _pages(reader_html)
    assert "book/verdicts.html" in pages and any(p.startswith("book/chapters/") for p in pages)
    for page in pages:
        assert out[(page, 390)]["viewport"] <= 400 and out[(page, 1280)]["viewport"] >= 1200, page


@pytest.mark.parametrize("width", WIDTHS)
def test_no_table_wider_than_the_text_column(probes, width):
    _, out = probes
    wide = {page: p["wide"] for (page, w), p in out.items() if w == width and p["wide"]}
    assert not wide, f"at {width} px, tables wider than the text column: {json.dumps(wide, ensure_ascii=False)[:1500]}"


def test_every_figure_has_a_caption(probes):
    _, out = probes
    missing = {page: p["uncaptioned"] for (page, w), p in out.items() if w == 1280 and p["uncaptioned"]}
    assert not missing, f"figures without a caption: {missing}"


def test_no_output_cell_shows_a_traceback_nan_or_a_long_list(probes):
    _, out = probes
    bad = []
    for (page, w), p in out.items():
        if w != 1280:
            continue
        for text in p["outputs"]:
            why = bad_output(text)
            if why:
                bad.append(f"{page}: {why}")
    assert not bad, bad[:10]


def test_verdict_page_lists_every_verdict_of_the_build(probes, reader_html):
    _, out = probes
    listed = out[("book/verdicts.html", 1280)]
    chapter_rows = [rid for (page, w), p in out.items() if w == 1280 and page.startswith("book/chapters/")
                    for rid in p["verdictRows"]]
    assert chapter_rows, "no chapter shows a verdict table"
    assert sorted(listed["verdictRows"]) == sorted(chapter_rows)
    assert len(listed["verdictLinks"]) == len(chapter_rows)
    for href in listed["verdictLinks"]:
        page, anchor = href.split("#")
        assert anchor in out[(f"book/{page}", 1280)]["verdictRows"], href
    intro = out[("book/intro.html", 1280)]["links"]
    assert any(h.split("#")[0].endswith("verdicts.html") for h in intro), "the intro does not link the verdicts page"


def test_every_chapter_has_launch_and_download_links(probes):
    site, out = probes
    for chapter in REAL_CHAPTERS:
        page = f"book/chapters/{chapter}.html"
        p = out[(page, 1280)]
        colab = [h for h in p["links"] if "colab.research.google.com" in h]
        binder = [h for h in p["links"] if "mybinder.org" in h]
        assert colab and binder, f"{page}: no launch links"
        assert all(f"notebooks/{chapter}.ipynb" in h or f"notebooks%2F{chapter}.ipynb" in h for h in colab + binder)
        assert any(h.endswith(".ipynb") for h in p["downloads"]), f"{page}: no download of the executed notebook"
        assert any(h.endswith(".csv") for h in p["downloads"]), f"{page}: no download of the run records"
        for href in p["downloads"]:
            url = urllib.parse.urljoin(site.base + page, href)
            with urllib.request.urlopen(url, timeout=30) as resp:
                assert resp.status == 200 and resp.read(1), url


# every explorer offers every question: the last one loads from the file beside the page, and a search box narrows
# a long list; each figure also says how many questions it offers (checked against the chapter's data below)
EXPLORER_PROBE = r"""(() => Array.from(document.querySelectorAll('.fu-interactive')).map(f => {
  const sel = f.querySelector('select[data-control="0"]');
  return {title: f.getAttribute('data-title'), n: sel ? sel.options.length : 0,
          label: sel ? f.querySelector('[data-control="0"]').closest('label').textContent.trim().split(' ')[0] : '',
          search: !!f.querySelector('input[data-filter]'),
          outside: JSON.parse(f.querySelector('.fu-spec').textContent).outside || null};
}))()"""


def _explorer_pages(html: Path) -> list[str]:
    return [p for p in _pages(html) if p.startswith("book/chapters/")
            and 'class="fu-interactive' in (html / p).read_text(encoding="utf-8")]


def test_explorers_offer_every_question_and_load_the_rest_beside_the_page(reader_html, tmp_path):
    require_chromium()
    site = Site(reader_html)
    b = Browser(tmp_path)
    checked = 0
    try:
        for page in _explorer_pages(reader_html):
            b.call("Page.navigate", url=site.base + page)
            b.wait_for("document.readyState === 'complete'", f"{page} to load")
            b.wait_for("Array.from(document.querySelectorAll('.fu-interactive')).every(f => f.hasAttribute("
                       "'data-state'))", f"{page}'s figures to draw")
            for i, fig in enumerate(b.js(EXPLORER_PROBE)):
                if fig["label"] != "question":
                    continue
                checked += 1
                root = f"document.querySelectorAll('.fu-interactive')[{i}]"
                sel = f"{root}.querySelector('select[data-control=\"0\"]')"
                last = fig["n"] - 1
                # the last question: beyond the three kept in the page whenever the build has more
                b.js(f"{sel}.value = '{last}'; {sel}.dispatchEvent(new Event('change')); true")
                b.wait_for(f"({root}.getAttribute('data-state') || '').split('|')[0] === '{last}'",
                           f"{page}: {fig['title']}: the last question to draw", timeout=60)
                text = b.js(f"{root}.querySelector('.fu-text').textContent")
                assert "did not load" not in text and "Loading" not in text, f"{page}: {fig['title']}: {text[:200]}"
                assert b.js(f"{root}.querySelector('.fu-plot').data.length > 0"), f"{page}: {fig['title']}: empty plot"
                if fig["n"] > 3:
                    assert fig["outside"], f"{page}: {fig['title']}: {fig['n']} questions, all in the page"
                if fig["search"]:
                    word = b.js(f"{sel}.options[{last}].textContent.split(/\\s+/).filter(w => w.length > 3)[0]")
                    box = f"{root}.querySelector('input[data-filter]')"
                    b.js(f"{box}.value = {json.dumps(word)}; {box}.dispatchEvent(new Event('input')); true")
                    shown = b.js(f"Array.from({sel}.options).map(o => o.textContent)")
                    assert 0 < len(shown) < fig["n"] and all(word.lower() in s.lower() for s in shown), (page, word)
                elif fig["n"] > 12:
                    raise AssertionError(f"{page}: {fig['title']}: {fig['n']} questions and no search box")
        remote = [u for u in b.requests() if not u.startswith((site.base, "data:", "blob:", "about:"))]
        assert not remote, f"requests left the machine: {remote[:5]}"
        assert not b.errors(), b.errors()[:5]
    finally:
        b.close()
        site.close()
    assert checked >= 3, "the masking, attention and contrastive explorers"


def test_every_explorer_offers_every_question_of_the_build(reader_html):
    """Each question select holds as many questions as the chapter's run records (downloaded CSVs) name."""
    import pandas as pd

    for page in _explorer_pages(reader_html):
        chapter = Path(page).stem
        files = sorted((reader_html / "_chapter_files" / chapter).glob("*.csv"))
        if not files:
            continue
        n_build = pd.read_csv(files[0], usecols=["id"])["id"].nunique()
        text = (reader_html / page).read_text(encoding="utf-8")
        for sel in re.findall(r'question <select data-control="0">(.*?)</select>', text):
            assert sel.count("<option") == n_build, f"{page}: {sel.count('<option')} of {n_build} questions"


def _repository_url() -> str:
    import yaml

    return yaml.safe_load((REPO / "_config.yml").read_text())["repository"]["url"]


def test_the_colab_notebook_names_the_configured_repository():
    """`repository.url` in _config.yml is the one setting; the Colab notebook's first cell repeats it (Colab runs
    it before any clone), so the two must agree."""
    cells = json.loads((REPO / "book" / "colab.ipynb").read_text())["cells"]
    code = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    m = re.search(r'REPOSITORY = "([^"]+)"', code)
    assert m and m.group(1) == _repository_url(), (
        f"book/colab.ipynb clones {m.group(1) if m else 'nothing'} but _config.yml's repository.url is "
        f"{_repository_url()}; set REPOSITORY in book/colab.ipynb's first code cell to the same URL")


def test_cite_and_rerun_pages_name_the_configured_repository(reader_html):
    url = _repository_url()
    for page in ("book/cite.html", "book/rerun.html"):
        text = (reader_html / page).read_text(encoding="utf-8")
        assert url in text and "{{ repository" not in text and "repository.url" in text, page
    cite = (reader_html / "book" / "cite.html").read_text(encoding="utf-8")
    assert re.search(r"url\s*=\s*\{" + re.escape(url) + r"\}", re.sub(r"<[^>]+>", "", cite)), \
        "the companion's BibTeX entry does not carry repository.url"
