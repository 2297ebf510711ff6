"""The book build driver (fusion_utils.book) and the book itself.

(a) The driver on a fixture mini-book (tests/fixtures/book: two tiny
    parameterised notebooks, one drawing a figure), rendered with the REAL
    _config.yml under Sphinx -W and opened in headless Chromium: execution,
    caching, failures, bad parameters files, the CLI.
(b) The real book (book/params/tiny.yml) built into a separate output
    directory with warnings as errors; every chapter in _toc.yml is opened in
    headless Chromium and must show a figure and no error output. The prose
    pages and the API page are checked the same way with stub chapters, so
    they are covered even before the chapter notebooks exist.

The browser is Chromium (installed by scripts/ensure_chromium.sh, which
`make test` runs first; or set CHROMIUM=/path/to/chrome). Without it the
browser tests FAIL with an explanation; set FUSION_UTILS_SKIP_BROWSER=1 to
skip them explicitly.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import book_out_dir
import yaml

from fusion_utils import book
from fusion_utils.book import driver as book_driver, params as book_params, plan as book_plan

# the real book is built once per worker that asks for it: keep its readers on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("real_book")

REPO = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "book"
PARAMS = "book/params/fixture.yml"


def built(root: Path, name: str = "fixture") -> Path:
    """A build's folder: book/_build/<params name>."""
    return root / "book" / "_build" / name


def chapter_nb(root: Path, chapter: str, name: str = "fixture") -> Path:
    return built(root, name) / "src" / "book" / "chapters" / f"{chapter}.ipynb"


def cache_dir(root: Path, name: str = "fixture") -> Path:
    return root / ".cache" / "book" / name


# --------------------------------------------------------------------------- helpers


def make_fixture_book(dest: Path) -> Path:
    """A copy of the fixture mini-book with the repository's real _config.yml."""
    shutil.copytree(FIXTURE, dest)
    shutil.copy2(REPO / "_config.yml", dest / "_config.yml")
    return dest


def write_params(root: Path, text: str, name: str = "case.yml") -> Path:
    p = root / "book" / "params" / name
    p.write_text(text, encoding="utf-8")
    return p


def mtime(p: Path) -> int:
    return p.stat().st_mtime_ns


def toc_chapters(toc: Path) -> list[str]:
    return book_params.toc_chapters(toc)


def toc_pages(toc: Path) -> list[str]:
    """Every document of a jb-book toc (root first), without suffix."""
    data = yaml.safe_load(toc.read_text())
    pages = [data["root"]]

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("file"), str):
                pages.append(node["file"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(data.get("parts") or data.get("chapters") or [])
    return [re.sub(r"\.(md|ipynb)$", "", p) for p in pages]


# --------------------------------------------------------------------------- browser


def chromium() -> str | None:
    env = os.environ.get("CHROMIUM")
    if env and Path(env).exists():
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def require_chromium() -> str:
    exe = chromium()
    if exe:
        return exe
    if os.environ.get("FUSION_UTILS_SKIP_BROWSER") == "1":
        pytest.skip("FUSION_UTILS_SKIP_BROWSER=1: the book's pages were not opened in a browser")
    pytest.fail("Chromium is not installed, so the book's pages cannot be checked in a browser: run "
                "`bash scripts/ensure_chromium.sh` (as root) or `apt-get install chromium`, or set CHROMIUM=/path/to/chrome "
                "(FUSION_UTILS_SKIP_BROWSER=1 skips these tests explicitly).")


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_request(self, code="-", size="-"):  # record instead of printing
        code = getattr(code, "value", code)
        self.server.requests.append((self.command, urllib.parse.unquote(urllib.parse.urlsplit(self.path).path),
                                     int(code) if str(code).isdigit() else 0))

    def log_message(self, fmt, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # headless Chromium drops connections it no longer needs once a page has loaded; anything else is reported
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)


class Site:
    """The built HTML served on 127.0.0.1, so the browser's requests (and 404s) are observable."""

    def __init__(self, html_dir: Path):
        self.html_dir = html_dir
        handler = functools.partial(_Handler, directory=str(html_dir))
        self.server = _Server(("127.0.0.1", 0), handler)
        self.server.requests = []
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def dump_dom(self, page: str, tmp: Path) -> tuple[str, list]:
        """Open `page` (path relative to the html dir) in headless Chromium; the DOM after scripts ran
        and the requests the page made to the server."""
        start = len(self.server.requests)
        profile = tmp / f"chromium-profile-{time.monotonic_ns()}"
        cmd = [require_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", "--disable-extensions", "--mute-audio", f"--user-data-dir={profile}",
               "--virtual-time-budget=5000", "--dump-dom", self.base + page]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        shutil.rmtree(profile, ignore_errors=True)
        assert proc.returncode == 0 and "</html>" in proc.stdout, (
            f"Chromium could not open {page} (exit {proc.returncode}): {proc.stderr[-2000:]}")
        return proc.stdout, list(self.server.requests[start:])


class _Outputs(HTMLParser):
    """Collects, inside myst-nb cell outputs, the images, inline SVGs, and error/stderr blocks."""

    def __init__(self):
        super().__init__()
        self.stack: list[tuple[str, bool, str]] = []  # (tag, in_output, kind)
        self.images: list[str] = []
        self.svgs = 0
        self.errors: list[str] = []
        self.stderr: list[str] = []
        self._buf: list[str] | None = None
        self._buf_kind = ""
        self._buf_depth = 0

    VOID = {"img", "br", "hr", "meta", "link", "input", "source", "area", "base", "col", "embed", "wbr", "path",
            "rect", "circle", "line", "polyline", "polygon", "use", "stop", "ellipse"}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        in_output = bool(self.stack and self.stack[-1][1]) or "cell_output" in cls
        if in_output and tag == "img":
            self.images.append(a.get("src") or "")
        if in_output and tag == "svg":
            self.svgs += 1
        kind = ""
        if in_output and ("traceback" in cls or "error" in cls):
            kind = "error"
        elif in_output and "stderr" in cls:
            kind = "stderr"
        if tag in self.VOID:
            return
        self.stack.append((tag, in_output, kind))
        if kind and self._buf is None:
            self._buf, self._buf_kind, self._buf_depth = [], kind, len(self.stack)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        while self.stack:
            t, _, _ = self.stack.pop()
            if self._buf is not None and len(self.stack) < self._buf_depth:
                text = "".join(self._buf)
                (self.errors if self._buf_kind == "error" else self.stderr).append(text)
                self._buf = None
            if t == tag:
                break

    def handle_data(self, data):
        if self._buf is not None:
            self._buf.append(data)


def check_page(site: Site, page: str, tmp: Path, *, need_figure: bool) -> str:
    dom, requests = site.dump_dom(page, tmp)
    failed = [(m, p, s) for m, p, s in requests if s >= 400 and p != "/favicon.ico"]
    assert not failed, f"{page}: the browser's requests failed: {failed}"
    parser = _Outputs()
    parser.feed(dom)
    page_dir = (site.html_dir / page).parent
    problems = []
    if need_figure:
        good = []
        for src in parser.images:
            if not src:
                continue
            if src.startswith("data:image/"):
                good.append(src)
                continue
            url = urllib.parse.urlsplit(src)
            if url.scheme in ("http", "https") and not src.startswith(site.base):
                problems.append(f"image from the network: {src}")
                continue
            target = (site.html_dir / url.path.lstrip("/")) if src.startswith(site.base) else (page_dir / url.path)
            target = target.resolve()
            if not target.is_file() or target.stat().st_size == 0:
                problems.append(f"image {src} -> {target} does not exist")
                continue
            served = "/" + target.relative_to(site.html_dir.resolve()).as_posix()
            if not any(p == served and s == 200 for _, p, s in requests):
                problems.append(f"image {src} was not loaded by the browser")
                continue
            good.append(src)
        assert good or parser.svgs, f"{page}: no figure in the cell outputs ({problems or 'no <img>/<svg>'})"
    assert not problems, f"{page}: {problems}"
    assert not parser.errors, f"{page}: error output in the page: {parser.errors[0][:500]}"
    bad_stderr = [s for s in parser.stderr if re.search(r"Traceback|Error\b|Exception\b", s)]
    assert not bad_stderr, f"{page}: stderr output with an error: {bad_stderr[0][:500]}"
    text = re.sub(r"<[^>]+>", " ", dom)
    assert "Traceback (most recent call last)" not in text, f"{page}: a Python traceback is shown"
    assert "papermill-error-cell" not in dom, f"{page}: papermill's error banner is shown"
    return dom


class Browser:
    """Headless Chromium driven over the DevTools protocol (on 127.0.0.1): every request the page makes, its
    console errors and uncaught exceptions are recorded, and keys can be pressed like a reader would."""

    def __init__(self, tmp: Path):
        import urllib.request

        websocket = pytest.importorskip("websocket", reason="the figure test drives Chromium with websocket-client")
        self.profile = tmp / f"cdp-profile-{time.monotonic_ns()}"
        self.proc = subprocess.Popen(
            [require_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--disable-extensions", "--mute-audio", "--remote-debugging-port=0",
             "--remote-debugging-address=127.0.0.1", f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert time.monotonic() < deadline and self.proc.poll() is None, "Chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30))
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.events: list[dict] = []
        self._id = 0
        for domain in ("Network", "Runtime", "Log", "Page"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                assert "error" not in msg, f"{method}: {msg['error']}"
                return msg.get("result", {})
            self.events.append(msg)

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in r, f"{expression[:80]}: {r['exceptionDetails']}"
        return r["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression)
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)

    def press(self, key: str) -> None:
        code = {"ArrowLeft": 37, "ArrowUp": 38, "ArrowRight": 39, "ArrowDown": 40}[key]
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code,
                      nativeVirtualKeyCode=code)

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append(f"exception: {(d.get('exception') or {}).get('description') or d.get('text')}")
            elif m == "Runtime.consoleAPICalled" and p.get("type") == "error":
                out.append("console.error: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error" and \
                    not p["entry"].get("url", "").endswith("/favicon.ico"):
                out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        return out

    def close(self):
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)


FIGURES = "document.querySelectorAll('.fu-interactive')"


def drive_page(site: Site, page: str, tmp: Path) -> int:
    """Open ``page``, and in every interactive figure move each slider and select with the keyboard: each move must
    redraw the figure, and in each figure at least one must change the data it plots. No request may leave 127.0.0.1
    and the console must stay free of errors. Returns the number of moves that changed a figure's data."""
    b = Browser(tmp)
    try:
        b.call("Page.navigate", url=site.base + page)
        b.wait_for("document.readyState === 'complete'", f"{page} to load")
        n = b.js(f"{FIGURES}.length")
        assert n, f"{page}: no interactive figure"
        b.wait_for(f"Array.from({FIGURES}).every(f => f.hasAttribute('data-state') && "
                   "f.querySelector('.fu-plot').data && f.querySelector('.fu-plot svg.main-svg'))",
                   f"{page}'s figures to draw")
        moved = 0
        for i in range(n):
            fig = f"{FIGURES}[{i}]"
            changed = 0
            for c in range(b.js(f"{fig}.querySelectorAll('[data-control]').length")):
                el = f"{fig}.querySelectorAll('[data-control]')[{c}]"
                data = f"JSON.stringify({fig}.querySelector('.fu-plot').data.map(t => [t.x, t.y, t.z]))"
                before, state = b.js(data), b.js(f"{fig}.getAttribute('data-state')")
                kind, value, last = b.js(f"[{el}.tagName, +{el}.value, {el}.tagName === 'SELECT' ? "
                                         f"{el}.options.length - 1 : +{el}.max]")
                if last == 0:
                    continue  # a control with one choice cannot move
                b.js(f"{el}.scrollIntoView(); {el}.focus(); true")
                if kind == "SELECT":
                    b.press("ArrowDown" if value < last else "ArrowUp")
                else:
                    b.press("ArrowRight" if value < last else "ArrowLeft")
                b.wait_for(f"{fig}.getAttribute('data-state') !== {json.dumps(state)}",
                           f"{page}: figure {i} to follow control {c}", timeout=10)
                # a control may legitimately leave the data as they were (two candidate sets that pick the same
                # layer): each figure needs one that changes them
                changed += b.js(data) != before
            assert changed, f"{page}: figure {i}: no control changed the plotted data"
            moved += changed
        time.sleep(0.3)
        b.call("Runtime.evaluate", expression="0")  # collect the events that arrived meanwhile
        remote = [u for u in b.requests() if not u.startswith((site.base, "data:", "blob:", "about:"))]
        assert not remote, f"{page}: requests left the machine: {remote[:5]}"
        errors = b.errors()
        assert not errors, f"{page}: console errors: {errors[:5]}"
        return moved
    finally:
        b.close()


# --------------------------------------------------------------------------- (a) the fixture mini-book


@pytest.fixture(scope="module")
def fixture_book(tmp_path_factory):
    """The fixture book built once with the real _config.yml, Sphinx warnings as errors."""
    root = make_fixture_book(tmp_path_factory.mktemp("fixture") / "fx")
    t0 = time.perf_counter()
    report = book.build(root / PARAMS, root=root, strict=True)
    report.wall = time.perf_counter() - t0
    return root, report


def test_fixture_build_executes_and_renders(fixture_book):
    root, report = fixture_book
    assert report.ok and report.executed == ["alpha", "beta"] and report.cached == []
    for name in ("alpha", "beta"):
        nb = json.loads(chapter_nb(root, name).read_text())
        assert any("injected-parameters" in c["metadata"].get("tags", []) for c in nb["cells"])
        assert "widgets" not in nb["metadata"], "widget state would make myst-nb load widget scripts"
        tags = [c["metadata"].get("tags", []) for c in nb["cells"]]
        assert all("remove-cell" in t for t in tags if {"parameters", "injected-parameters"} & set(t))
        assert all("hide-input" in t for c, t in zip(nb["cells"], tags) if c["cell_type"] == "code"
                   and "remove-cell" not in t), "the code is one click away, not in the reader's way"
        line = next("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"
                    and "".join(c["source"]).startswith("**This build:**"))
        assert "`fixture/tiny-vlm`" in line and "data world, 5 samples" in line
        rec = json.loads((cache_dir(root) / f"{name}.json").read_text())
        assert rec["key"] == next(c.key for c in report.chapters if c.name == name) and rec["seconds"] > 0
    html = built(root) / "html"
    assert report.html_dir == html
    for page in ("book/intro.html", "book/chapters/alpha.html", "book/chapters/beta.html",
                 "book/_generated/reproducibility.html", "index.html"):
        assert (html / page).is_file(), page
    info = json.loads((built(root) / "build_info.json").read_text())
    assert [c["name"] for c in info["chapters"]] == ["alpha", "beta"]
    assert info["chapters"][0]["parameters"] == {"models": ["fixture/tiny-vlm"], "dataset": "world", "samples": 5,
                                                 "seed": 0}
    assert info["chapters"][1]["parameters"]["fail"] is False
    for k in ("python", "torch", "transformers", "fusion_utils", "jupyter-book"):
        assert info["versions"][k]
    assert info["models"] == ["fixture/tiny-vlm"] and info["data"] == {"dataset": "world", "samples": 5}
    appendix = (built(root) / "src" / "book" / "_generated" / "reproducibility.md").read_text()
    assert "| alpha | executed |" in appendix and "fixture/tiny-vlm" in appendix
    print(f"\nfixture book: first build {report.wall:.1f} s (execute {report.execute_seconds:.1f} s, "
          f"jupyter-book {report.jupyter_book_seconds:.1f} s)")


def test_fixture_fingerprints_come_from_fusion_utils_models(fixture_book):
    root, report = fixture_book
    fp = book_plan.fingerprint_function()
    for ch in report.chapters:
        expected = fp("fixture/tiny-vlm") if fp else "id:fixture/tiny-vlm"
        assert ch.fingerprints == {"fixture/tiny-vlm": expected}


def test_fixture_second_build_is_cached(fixture_book):
    root, _ = fixture_book
    chapters = [chapter_nb(root, n) for n in ("alpha", "beta")]
    before = [mtime(p) for p in chapters]
    t0 = time.perf_counter()
    report = book.build(root / PARAMS, root=root, strict=True)
    wall = time.perf_counter() - t0
    assert report.executed == [] and report.cached == ["alpha", "beta"]
    assert [mtime(p) for p in chapters] == before, "cached chapters must not be rewritten"
    appendix = (built(root) / "src" / "book" / "_generated" / "reproducibility.md").read_text()
    assert "cached (not re-executed)" in appendix
    print(f"\nfixture book: cached rebuild {wall:.1f} s (jupyter-book {report.jupyter_book_seconds:.1f} s)")
    assert wall < 60


def test_fixture_kernel_gets_the_static_flag_and_the_driver_keeps_its_environment(fixture_book):
    root, _ = fixture_book
    nb = json.loads(chapter_nb(root, "alpha").read_text())
    printed = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "static book: 1" in printed, "the chapter kernel must be told it renders a static book"
    before = dict(os.environ)
    book.build(root / PARAMS, root=root, html=False, force=True, only=["alpha"])
    assert dict(os.environ) == before, "the driver must not change its own process environment"


def test_second_params_file_builds_beside_the_first_and_the_index_lists_both(fixture_book, tmp_path):
    root, _ = fixture_book
    other = write_params(root, (root / PARAMS).read_text().replace("samples: 5", "samples: 4"), "other.yml")
    try:
        r = book.build(other, root=root)
        assert r.executed == ["alpha", "beta"], "a second parameters file has its own cache"
        assert (built(root, "other") / "html" / "index.html").is_file()
        assert (built(root) / "html" / "index.html").is_file(), "the first build stays where it was"
        assert (cache_dir(root, "other") / "alpha.json").is_file() and (cache_dir(root) / "alpha.json").is_file()
        index = (root / "book" / "_build" / "index.html").read_text()
        assert r.index == root / "book" / "_build" / "index.html"
        for name in ("fixture", "other"):
            assert f'href="{name}/html/index.html"' in index
        assert "fixture/tiny-vlm" in index and "4 samples" in index and "5 samples" in index
        assert not re.search(r"(src|href)=\"(https?:)?//", index), "the index page loads nothing remote"
    finally:
        book.clean(root, name="other")
    assert 'href="other/html' not in (root / "book" / "_build" / "index.html").read_text()


def test_fixture_pages_in_browser(fixture_book, tmp_path):
    root, _ = fixture_book
    require_chromium()
    site = Site(built(root) / "html")
    try:
        for page in ("book/chapters/alpha.html", "book/chapters/beta.html"):
            check_page(site, page, tmp_path, need_figure=True)
        moved = drive_page(site, "book/chapters/alpha.html", tmp_path)
        assert moved == 2, "the fixture figure has a slider and a select: both must change the figure"
        dom = check_page(site, "book/_generated/reproducibility.html", tmp_path, need_figure=False)
        assert "Reproducibility appendix" in dom
        check_page(site, "book/intro.html", tmp_path, need_figure=False)
    finally:
        site.close()


def test_browser_check_catches_a_page_without_figure(fixture_book, tmp_path):
    """The browser check itself must fail on a page with no figure (the intro)."""
    root, _ = fixture_book
    require_chromium()
    site = Site(built(root) / "html")
    try:
        with pytest.raises(AssertionError, match="no figure"):
            check_page(site, "book/intro.html", tmp_path, need_figure=True)
    finally:
        site.close()


def test_cache_invalidation(tmp_path, monkeypatch):
    root = make_fixture_book(tmp_path / "fx")
    r1 = book.build(root / PARAMS, root=root, html=False)
    assert r1.executed == ["alpha", "beta"]
    # A chapter override changes only that chapter's key.
    write_params(root, (root / PARAMS).read_text().replace("alpha: {}", "alpha: {samples: 6}"), "fixture.yml")
    r2 = book.build(root / PARAMS, root=root, html=False)
    assert r2.executed == ["alpha"] and r2.cached == ["beta"]
    nb = json.loads(chapter_nb(root, "alpha").read_text())
    assert "samples = 6" in "".join("".join(c["source"]) for c in nb["cells"])
    # Editing a notebook's source re-executes it; editing only its outputs/metadata does not.
    p = root / "notebooks" / "beta.ipynb"
    nbj = json.loads(p.read_text())
    nbj["metadata"]["something"] = 1
    p.write_text(json.dumps(nbj))
    assert book.build(root / PARAMS, root=root, html=False).executed == []
    nbj["cells"][-1]["source"] += "\n# edited"
    p.write_text(json.dumps(nbj))
    assert book.build(root / PARAMS, root=root, html=False).executed == ["beta"]
    # A different model fingerprint re-executes everything that uses the model.
    calls = []

    def fake_fingerprint(name):
        calls.append(name)
        return "weights-v2"

    monkeypatch.setattr(book_plan, "fingerprint_function", lambda: fake_fingerprint)
    r3 = book.build(root / PARAMS, root=root, html=False)
    assert r3.executed == ["alpha", "beta"] and calls == ["fixture/tiny-vlm"]  # memoised per build
    # force / only
    r4 = book.build(root / PARAMS, root=root, html=False, force=True, only=["beta"])
    assert r4.executed == ["beta"] and [c.status for c in r4.chapters] == ["skipped", "executed"]


def test_only_writes_placeholder_for_never_built_chapter(tmp_path):
    root = make_fixture_book(tmp_path / "fx")
    r = book.build(root / PARAMS, root=root, only=["alpha"], strict=True)
    assert r.executed == ["alpha"]
    assert chapter_nb(root, "beta").is_file()
    assert "not executed in this build" in (built(root) / "html" / "book" / "chapters" / "beta.html").read_text()


def test_failing_cell_stops_the_build_and_keeps_the_partial_notebook(tmp_path):
    root = make_fixture_book(tmp_path / "fx")
    params = write_params(root, (root / PARAMS).read_text())
    book.build(params, root=root, html=False)
    good = chapter_nb(root, "beta", "case")
    good_before = good.read_bytes()
    params = write_params(root, (root / PARAMS).read_text().replace("fail: false", "fail: true"))
    with pytest.raises(book.BookError) as err:
        book.build(params, root=root)
    msg = str(err.value)
    assert "notebooks/beta.ipynb" in msg and "ValueError" in msg and "asked to fail with samples=5" in msg
    assert re.search(r"cell 3\b", msg), msg  # the 4th cell of the notebook (0-based index 3)
    partial = cache_dir(root, "case") / "failed" / "beta.ipynb"
    assert str(partial) in msg and partial.is_file()
    nb = json.loads(partial.read_text())
    assert any(o.get("output_type") == "error" for c in nb["cells"] for o in c.get("outputs", []))
    assert not (cache_dir(root, "case") / "beta.json").exists(), "a failed chapter must not stay cached"
    assert good.read_bytes() == good_before, "the last good executed notebook is left alone"
    assert not (built(root, "case") / "html").exists(), "no HTML after a failed chapter"
    # The CLI exits non-zero with the same sentence.
    with pytest.raises(SystemExit) as ex:
        book.main(["build", "--params", str(params), "--root", str(root)])
    assert ex.value.code == 1
    # Fixing the parameter re-executes beta (alpha stays cached) and the build passes again.
    write_params(root, (root / PARAMS).read_text())
    r = book.build(params, root=root, html=False)
    assert r.executed == ["beta"] and r.cached == ["alpha"] and not partial.exists()


@pytest.mark.parametrize("text, expect", [
    ("common: {samples: 3\nchapters: {alpha: {}}\n", r"not valid YAML at line \d+"),
    ("- alpha\n- beta\n", r"must be a mapping with the keys 'common' and 'chapters'"),
    ("common: {}\nchapter: {alpha: {}}\n", r"unknown top-level key\(s\) 'chapter'"),
    ("common: {}\nchapters: {}\n", r"'chapters' must be a non-empty mapping"),
    ("common: {}\nchapters: {alpha: {}, beta: {}, gamma: {}}\n", r"Chapter 'gamma' .* has no notebook .*rename it"),
    ("common: {}\nchapters: {alpha: {}}\n", r"_toc.yml lists chapter\(s\) beta .*add them under 'chapters:'"),
    ("common: {}\nchapters: {alpha: [1, 2], beta: {}}\n", r"chapters.alpha must be a mapping"),
    ("common: {samples: 2024-01-01}\nchapters: {alpha: {}, beta: {}}\n", r"is a date .* cannot be passed"),
    ("common: {}\nchapters: {alpha: {sample: 3}, beta: {}}\n", r"chapters.alpha sets sample, which .* does not declare"),
    ("common: {sampels: 3}\nchapters: {alpha: {}, beta: {}}\n", r"common sets sampels, which no chapter notebook"),
])
def test_bad_params_file_gives_one_clear_sentence(tmp_path, text, expect):
    root = make_fixture_book(tmp_path / "fx")
    params = write_params(root, text)
    with pytest.raises(book.BookError, match=expect) as err:
        book.build(params, root=root, html=False)
    msg = str(err.value)
    assert "\n" not in msg and msg.rstrip().endswith(".")
    assert not (root / "book" / "_build").exists(), "nothing runs before the parameters are valid"


def test_missing_params_file(tmp_path):
    root = make_fixture_book(tmp_path / "fx")
    with pytest.raises(book.BookError, match="does not exist"):
        book.build("book/params/nope.yml", root=root)


def test_cli_wiring(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="fusion-utils")
    subs = parser.add_subparsers(dest="command")
    book.add_cli(subs)
    args = parser.parse_args(["book", "build", "--params", "x.yml", "--force", "--only", "fusion", "review"])
    assert args.func is book_driver.cmd_build and args.force and args.only == ["fusion", "review"]
    assert parser.parse_args(["book", "build"]).params == "book/params/default.yml"
    root = make_fixture_book(tmp_path / "fx")
    write_params(root, "chapters: [oops\n")
    with pytest.raises(SystemExit) as ex:
        book.main(["build", "--params", "book/params/case.yml", "--root", str(root)])
    assert ex.value.code == 1
    assert "error: Parameters file" in capsys.readouterr().err
    (root / "book" / "_build" / "a").mkdir(parents=True)
    (root / "book" / "_build" / "b").mkdir(parents=True)
    assert book.main(["clean", "--root", str(root), "--params", "book/params/a.yml"]) == 0
    assert not (root / "book" / "_build" / "a").exists() and (root / "book" / "_build" / "b").is_dir()
    assert book.main(["clean", "--root", str(root)]) == 0
    assert not (root / "book" / "_build").exists()


def test_import_has_no_side_effects():
    code = ("import sys, fusion_utils.book as b; "
            "assert 'papermill' not in sys.modules and 'jupyter_book' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO / "tests")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# --------------------------------------------------------------------------- (b) the real book


REAL_CHAPTERS = toc_chapters(REPO / "_toc.yml")


STUB_FIGURE = """from fusion_utils.interactive import Control, InteractiveFigure

fig = InteractiveFigure("Stub: a slider", [Control("k", [1, 2, 3], kind="slider")], {"height": 250})
for i, k in enumerate(fig.controls[0].choices):
    fig.traces[str(i)] = {"type": "scatter", "x": [0, 1, 2], "y": [0, k, 2 * k]}
    fig.states[str(i)] = {"data": [str(i)], "text": f"k = {k}"}
fig"""


@pytest.fixture(scope="module")
def skeleton_book(tmp_path_factory):
    """The real _config.yml, _toc.yml and prose/API pages with stub chapter notebooks (one figure each),
    built with warnings as errors."""
    root = book_out_dir(tmp_path_factory, "skeleton")
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(REPO / name, root / name)
    shutil.rmtree(root / "book", ignore_errors=True)
    shutil.copytree(REPO / "book", root / "book", ignore=shutil.ignore_patterns("_build", "chapters", "_generated"))
    (root / "notebooks").mkdir(exist_ok=True)
    import nbformat

    tiny = yaml.safe_load((REPO / "book" / "params" / "tiny.yml").read_text())
    keys = sorted({*tiny["common"], *(k for ch in tiny["chapters"].values() for k in (ch or {}))})
    for name in tiny["chapters"]:
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        params = nbformat.v4.new_code_cell("\n".join(f"{k} = None" for k in keys))
        params.metadata["tags"] = ["parameters"]
        nb.cells = [nbformat.v4.new_markdown_cell(f"# Stub chapter `{name}`"), params,
                    nbformat.v4.new_code_cell("import matplotlib.pyplot as plt\nplt.plot([0, 1], [1, 0])\nplt.show()"),
                    # a tqdm bar leaves ipywidgets state, for which myst-nb used to add two CDN scripts
                    nbformat.v4.new_code_cell("from tqdm.auto import tqdm\nfor _ in tqdm(range(3)):\n    pass"),
                    nbformat.v4.new_code_cell(STUB_FIGURE)]
        nbformat.write(nb, str(root / "notebooks" / f"{name}.ipynb"))
    stub = dict(tiny, common={**tiny["common"], "models": ["stub/model-a", "stub/model-b"]})
    (root / "book" / "params" / "stub.yml").write_text(yaml.safe_dump(stub, sort_keys=False))
    report = book.build(root / "book" / "params" / "stub.yml", root=root, strict=True, all_pages=True)
    return root, report


def test_book_skeleton_builds_without_warnings(skeleton_book, tmp_path):
    """Prose pages, appendix and API page of the real book, under -W, in the browser."""
    root, report = skeleton_book
    assert report.ok and set(report.executed + report.cached) == set(REAL_CHAPTERS)
    html = built(root, "stub") / "html"
    for page in toc_pages(root / "_toc.yml"):
        assert (html / f"{page}.html").is_file(), page
    api = (html / "book" / "api.html").read_text()
    assert 'id="fusion_utils.book.build"' in api, "autodoc did not document fusion_utils.book.build"
    require_chromium()
    site = Site(html)
    try:
        for page in toc_pages(root / "_toc.yml"):
            if not page.startswith("book/chapters/"):
                dom = check_page(site, f"{page}.html", tmp_path, need_figure=False)
                if page == "book/intro":  # its formulas are typeset by MathJax served from the build (no network)
                    assert dom.count("<mjx-container") >= 4, "MathJax did not typeset the introduction's formulas"
        check_page(site, "book/chapters/fusion.html", tmp_path, need_figure=True)
        assert drive_page(site, "book/chapters/fusion.html", tmp_path) == 1
    finally:
        site.close()


def test_book_makes_no_network_requests_at_build(skeleton_book):
    """No remote resources are referenced for loading (intersphinx off, no fonts/CDN in <link>, no remote <script>:
    MathJax is served from the build)."""
    root, _ = skeleton_book
    html = built(root, "stub") / "html"
    assert not (built(root, "stub") / ".doctrees" / "intersphinx").exists()
    pages = sorted(html.rglob("*.html"))
    assert any("chapters" in p.parts for p in pages), "the chapter pages must be checked too"
    for page in pages:
        text = page.read_text()
        for m in re.finditer(r"<link[^>]+href=\"(https?:[^\"]+)\"", text):
            assert "stylesheet" not in m.group(0) and "preload" not in m.group(0), f"{page}: {m.group(0)}"
        remote_scripts = re.findall(r"<script[^>]+src=\"(?:https?:)?//[^\"]+\"", text)
        assert not remote_scripts, f"{page}: {remote_scripts}"
        assert "fonts.googleapis" not in text, page


# real_book: the session fixture in conftest.py (tests/test_book_reader.py reads the same build)


@pytest.mark.slow
def test_real_book_builds(real_book):
    out, report = real_book
    assert report.ok and [c.name for c in report.chapters] == REAL_CHAPTERS
    print(f"\nreal book (tiny.yml): {report.wall:.1f} s; executed {report.executed}, cached {report.cached}")


@pytest.mark.slow
@pytest.mark.parametrize("chapter", REAL_CHAPTERS)
def test_real_book_chapter_in_browser(real_book, chapter, tmp_path):
    out, _ = real_book
    require_chromium()
    site = Site(built(out, "tiny") / "html")
    try:
        check_page(site, f"book/chapters/{chapter}.html", tmp_path, need_figure=True)
        assert drive_page(site, f"book/chapters/{chapter}.html", tmp_path) >= 1
    finally:
        site.close()


def test_offline_mathjax_names_its_fix_when_missing(monkeypatch):
    import importlib.util

    from fusion_utils import _sphinx_mathjax

    assert (_sphinx_mathjax.mathjax_dir() / "tex-chtml.js").is_file()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install sphinx-mathjax-offline"):
        _sphinx_mathjax.mathjax_dir()
