"""``book/_build/index.html``: every build found, newest first."""
from __future__ import annotations

import html as _html
import json
from pathlib import Path
from typing import Iterable

from .layout import write_if_changed


def _fmt_models(models: Iterable[str]) -> str:
    return ", ".join(_html.escape(m) for m in models) or "–"


def write_index(builds: Path) -> Path:
    """``book/_build/index.html``: one row per build found (a folder with ``build_info.json`` and ``html/``), with
    its parameters file, models, data and date, newest first."""
    rows = []
    for info_path in sorted(Path(builds).glob("*/build_info.json")):
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except ValueError:
            continue  # a build being written right now: it lists itself when it finishes
        d = info_path.parent
        if not (d / "html" / "index.html").is_file():
            continue
        data = info.get("data") or {}
        what = " · ".join(str(x) for x in (data.get("dataset"), data.get("source"),
                                            f"{data['samples']} samples" if data.get("samples") is not None else None)
                         if x)
        rows.append((info.get("built_at", ""), f"<tr><td><a href=\"{_html.escape(d.name)}/html/index.html\">"
                     f"{_html.escape(d.name)}</a></td><td><code>{_html.escape(str(info.get('params_file', '')))}"
                     f"</code></td><td>{_fmt_models(info.get('models') or [])}</td><td>{_html.escape(what) or '–'}"
                     f"</td><td>{_html.escape(info.get('built_at', ''))}</td><td><code>"
                     f"{_html.escape(str(info.get('git') or '–'))}</code></td></tr>"))
    rows.sort(reverse=True)
    body = "\n".join(r for _, r in rows) or "<tr><td colspan=\"6\">No build found.</td></tr>"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Companion book: builds</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;width:100%}}th,td{{text-align:left;padding:.4em .6em;border-bottom:1px solid #ddd;
vertical-align:top}}th{{background:#f4f4f4}}</style></head>
<body><h1>Where Does Vision Meet Language? — builds of the companion book</h1>
<p>Each parameters file builds into its own folder (<code>make book BOOK_PARAMS=book/params/&lt;name&gt;.yml</code>).
This page lists the builds found beside it.</p>
<table><thead><tr><th>build</th><th>parameters file</th><th>models</th><th>data</th><th>built (UTC)</th>
<th>revision</th></tr></thead>
<tbody>
{body}
</tbody></table></body></html>
"""
    path = Path(builds) / "index.html"
    write_if_changed(path, page)
    return path
