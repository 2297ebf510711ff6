"""Step 4: the reproducibility appendix and ``build_info.json``."""
from __future__ import annotations

import datetime as _dt
import json
import platform
from typing import Any, Mapping

from ..runs import atomic_write_text, canonical_json, provenance
from .layout import Layout, display_path, write_if_changed
from .plan import BuildReport, models_in
from .verdict_index import files_dir, parameters_markdown


def _versions(prov: Mapping[str, Any]) -> dict[str, str]:
    """The versions that decide what a reader sees: `fusion_utils.runs.provenance`'s, and the book tools'."""
    from importlib.metadata import PackageNotFoundError, version

    out = {k: str(prov.get(k) or "not installed") for k in ("python", "fusion_utils", "torch", "transformers",
                                                              "numpy")}
    for dist in ("jupyter-book", "sphinx", "myst-nb", "papermill", "plotly"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _git_revision(prov: Mapping[str, Any]) -> str | None:
    commit = prov.get("git_commit")
    if not commit:
        return None
    return commit[:7] + ("+dirty" if prov.get("git_dirty") else "")


def _fmt_value(v: Any) -> str:
    return "`" + json.dumps(v, ensure_ascii=False) + "`"


def _appendix_markdown(info: dict) -> str:
    lines = [
        "# Reproducibility appendix",
        "",
        "This page is written by `fusion_utils.book.build` just before the book is rendered. It records what "
        "produced every chapter: the parameters each notebook ran with, how long it took, whether its output came "
        "from the build cache, the fingerprints of the models, and the software versions.",
        "",
        f"- Parameters file: `{info['params_file']}`",
        f"- Built: {info['built_at']}" + (f" from revision `{info['git']}`" if info.get("git") else ""),
        f"- Platform: {info['platform']}",
        "",
        "To rebuild exactly this book run:",
        "",
        "```bash",
        f"make book BOOK_PARAMS={info['params_file']}",
        "```",
        "",
        "## Chapters",
        "",
        "| chapter | status | execution time (s) | cache key |",
        "|---|---|---|---|",
    ]
    for ch in info["chapters"]:
        secs = "–" if ch["seconds"] is None else f"{ch['seconds']:.1f}"
        status = {"cached": "cached (not re-executed)", "skipped": "not built (`--only`)"}.get(ch["status"], ch["status"])
        lines.append(f"| {ch['name']} | {status} | {secs} | `{ch['key'][:12]}` |")
    lines += ["", "## Parameters", ""]
    chs = info["chapters"]
    shared = {k: v for k, v in (chs[0]["parameters"].items() if chs else ())
              if all(k in c["parameters"] and canonical_json({"v": c["parameters"][k]}) == canonical_json({"v": v})
                 for c in chs)}
    lines += ["Passed to every chapter:", ""]
    lines += [f"- `{k}` = {_fmt_value(v)}" for k, v in shared.items()] or ["- (nothing)"]
    lines.append("")
    for ch in chs:
        own = {k: v for k, v in ch["parameters"].items() if k not in shared}
        if own:
            lines += [f"Only for **{ch['name']}**:", ""]
            lines += [f"- `{k}` = {_fmt_value(v)}" for k, v in own.items()]
            lines.append("")
    lines += ["## Models", "", "| model | fingerprint |", "|---|---|"]
    models: dict[str, str] = {}
    for ch in info["chapters"]:
        models.update(ch.get("fingerprints") or {})
    for name, fp in models.items():
        lines.append(f"| `{name}` | `{fp}` |")
    if not models:
        lines.append("| (none) | |")
    lines += ["", "## Software", "", "| package | version |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info["versions"].items()]
    lines += ["", f"The same information is in machine-readable form in `book/_build/{info['name']}/build_info.json`.", ""]
    return "\n".join(lines)


def appendix(report: BuildReport, layout: Layout, params: dict, prov: Mapping[str, Any] | None = None) -> dict:
    """Step 4: the build information (``build_info.json``) and the reproducibility appendix page; returns the
    information. ``prov``: the build's `fusion_utils.runs.provenance` (taken here when not given)."""
    prov = prov if prov is not None else provenance()
    common = params["common"]
    info = {
        "name": layout.name,
        "params_file": display_path(report.params_file, layout.root),
        "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": _git_revision(prov),
        "platform": f"{platform.system()} {prov.get('machine') or platform.machine()}, Python {prov.get('python')}",
        "versions": _versions(prov),
        "models": list(dict.fromkeys(m for c in report.chapters for m in models_in(c.parameters))),
        "data": {k: common.get(k) for k in ("dataset", "source", "samples") if k in common},
        "chapters": [
            {"name": c.name, "status": c.status, "seconds": None if c.seconds is None else round(c.seconds, 3),
             "parameters": c.parameters, "key": c.key, "fingerprints": c.fingerprints}
            for c in report.chapters
        ],
    }
    own = parameters_markdown(files_dir(layout.build_dir), [c.name for c in report.chapters])  # threshold, ρ, λ, ...
    write_if_changed(layout.generated / "reproducibility.md", _appendix_markdown(info) + ("\n" + own if own else ""))
    layout.build_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(layout.build_info, json.dumps(info, indent=2, ensure_ascii=False))
    report.build_info = layout.build_info
    return info
