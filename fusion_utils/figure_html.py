"""The kernel-free interactive figure: Plotly traces for every combination of its controls, a few lines of
JavaScript that swap them, and the explicit colour scales every figure uses (plotly.js knows no "magma")."""
from __future__ import annotations

import hashlib
import html as _html
import itertools
import json
import os
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Control", "InteractiveFigure", "plotly_js_path", "MARKER_CLASS", "MAGMA", "DIVERGING", "colorbar"]

#: a select with more values than this gets a search box that narrows its options
SEARCH_FROM = 12
#: CSS class of every figure's root element; the book's Sphinx extension loads plotly.js on pages that have one.
MARKER_CLASS = "fu-interactive"

# Explicit stops, so no figure depends on which names a plotly.js version knows: an unknown name silently falls
# back to the default scale. MAGMA samples matplotlib's magma (the static figures' map) at six points.
MAGMA = [[0.0, "#000004"], [0.2, "#3b0f70"], [0.4, "#8c2981"], [0.6, "#de4968"], [0.8, "#fe9f6d"],
         [1.0, "#fcfdbf"]]
#: low (negative) = blue, zero = white, high (positive) = red: red is attention *gained*, as the captions say
DIVERGING = [[0.0, "#2166ac"], [0.25, "#67a9cf"], [0.5, "#f7f7f7"], [0.75, "#ef8a62"], [1.0, "#b2182b"]]


def colorbar(domain, title: str = "") -> dict:
    """A horizontal colour bar under the panel spanning ``domain`` (paper x fractions): it never covers a panel."""
    a, b = domain
    return {"orientation": "h", "x": (a + b) / 2, "xanchor": "center", "y": -0.02, "yanchor": "top",
            "len": max(0.1, (b - a) * 0.95), "lenmode": "fraction", "thickness": 8,
            "title": {"text": title, "side": "top", "font": {"size": 10}}, "tickfont": {"size": 9}}

# --- the figure ---------------------------------------------------------------------------------------------------

@dataclass
class Control:
    """One select (``kind="select"``) or slider (``kind="slider"``) over ``choices`` shown as ``labels``."""

    name: str
    choices: list
    labels: list[str] | None = None
    kind: str = "select"
    value: Any = None  # initial value (default: the first)

    def __post_init__(self):
        if not self.choices:
            raise ValueError(f"Control {self.name!r} has no values; give it at least one choice.")
        if self.kind not in ("select", "slider"):
            raise ValueError(f"Control {self.name!r}: kind must be 'select' or 'slider', not {self.kind!r}.")
        self.choices = list(self.choices)
        self.labels = [str(v) for v in self.choices] if self.labels is None else [str(x) for x in self.labels]
        if self.value is None:
            self.value = self.choices[0]
        if self.value not in self.choices:
            raise ValueError(f"Control {self.name!r}: initial value {self.value!r} is not one of {self.choices}.")


@dataclass
class InteractiveFigure:
    """Plotly traces for every combination of ``controls``.

    ``traces`` maps an id to a Plotly trace (dict) and ``layouts`` an id to a layout fragment, both shared between
    states (an image drawn in many states is stored once); ``states`` maps a key (the control value indices joined
    by ``|``) to ``{"data": [trace ids], "layout": [fragment ids or dicts], "text": html}``, whose fragments update
    the base ``layout`` key by key, in order. `state` reads one state back as Python data (what the page draws)."""

    title: str
    controls: list[Control]
    layout: dict
    traces: dict = field(default_factory=dict)
    layouts: dict = field(default_factory=dict)
    states: dict = field(default_factory=dict)
    height: int = 380
    caption: str = ""
    #: set by `beside_page`: (file to write, its URL from the page, how many first-control values stay embedded)
    outside: tuple | None = None

    def key(self, **choices) -> str:
        idx = []
        for c in self.controls:
            v = choices.get(c.name, c.value)
            if v not in c.choices:
                raise ValueError(f"{v!r} is not a choice of {c.name!r}; choose one of {c.labels}.")
            idx.append(str(c.choices.index(v)))
        return "|".join(idx)

    def state(self, **choices) -> dict:
        """``{"data": [traces], "layout": {...}, "text": ...}`` for the given control values (default: initial)."""
        st = self.states[self.key(**choices)]
        layout = dict(self.layout)
        for part in self._parts(st):
            layout.update(self.layouts[part] if isinstance(part, str) else part)
        text = st.get("text", "")
        return {"data": [self.traces[t] for t in st["data"]], "layout": layout,
                "text": "".join(text) if isinstance(text, list) else text}

    @staticmethod
    def _parts(st: dict) -> list:
        lay = st.get("layout", [])
        return lay if isinstance(lay, list) else [lay]

    def check(self) -> None:
        """Every combination of the controls has a state and every state's traces exist."""
        for combo in itertools.product(*(range(len(c.choices)) for c in self.controls)):
            k = "|".join(map(str, combo))
            if k not in self.states:
                raise ValueError(f"{self.title}: no state for {dict(zip((c.name for c in self.controls), combo))}.")
            missing = [t for t in self.states[k]["data"] if t not in self.traces]
            missing += [p for p in self._parts(self.states[k]) if isinstance(p, str) and p not in self.layouts]
            if missing:
                raise ValueError(f"{self.title}: state {k} names unknown traces {missing}.")

    def spec(self) -> dict:
        """What the page's script reads: the states, their traces (repeated settings factored into ``bases``) and
        their layout fragments (identical inline fragments stored once)."""
        traces, bases = _factor(self.traces)
        layouts, states = _intern(self.layouts, self.states, self._parts)
        states, snippets = _snippets(states)
        return {"controls": [{"name": c.name, "labels": c.labels} for c in self.controls], "layout": self.layout,
                "bases": bases, "traces": traces, "layouts": layouts, "states": states, "snippets": snippets,
                # no mode bar: it would sit on the last panel's title; zoom by dragging, double-click resets
                "config": {"responsive": True, "displaylogo": False, "typesetMath": False, "displayModeBar": False}}

    def beside_page(self, chapter: str, *, keep: int = 3) -> "InteractiveFigure":
        """In a book build, keep the states of the first ``keep`` values of the first control (the questions) in
        the page and write the others to a script file beside the chapter's downloads, which the figure loads from
        the same host when a reader picks one of them: a figure over every question of the build without a huge
        page. Outside a book build (a notebook run by hand) everything stays in the page. Returns the figure."""
        from .report.display import FILES_BASE, OUT_ENV, downloads_dir

        if os.environ.get(OUT_ENV) and len(self.controls[0].choices) > keep:
            slug = re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")[:60]
            name = f"explorer-{slug}-{hashlib.sha1(self.title.encode()).hexdigest()[:6]}.js"
            self.outside = (downloads_dir(chapter) / name, f"{FILES_BASE}/{chapter}/{name}", int(keep))
        return self

    def _split(self, spec: dict) -> tuple[dict, dict | None]:
        """``spec`` without the states (and the traces and fragments only they use) of the first control's values
        from ``keep`` on, and those as a separate dict; (spec, None) when the figure is not `beside_page`."""
        if self.outside is None:
            return spec, None
        keep = set(range(self.outside[2])) | {self.controls[0].choices.index(self.controls[0].value)}
        owner: dict = {"traces": {}, "layouts": {}, "snippets": {}}
        for k, st in spec["states"].items():
            q = int(k.split("|")[0])
            text = st.get("text")
            for table, ids in (("traces", st["data"]), ("layouts", st.get("layout", [])),
                               ("snippets", [t for t in text if isinstance(t, int)] if isinstance(text, list) else [])):
                for i in ids:
                    owner[table].setdefault(i, set()).add(q)
        away: dict = {"traces": {}, "layouts": {}, "snippets": {}, "states": {}}
        for table, owners in owner.items():
            for i, qs in owners.items():
                if len(qs) == 1 and not qs & keep:  # used by one question only, and not an embedded one
                    away[table][i] = spec[table].pop(i)
        for k in [k for k in spec["states"] if int(k.split("|")[0]) not in keep]:
            away["states"][k] = spec["states"].pop(k)
        return spec, away

    def to_html(self, plotly_js: bool = False) -> str:
        """The figure as an HTML fragment; ``plotly_js=True`` inlines plotly.js (about 5 MB) so it runs anywhere."""
        self.check()
        fid = f"fu-{uuid.uuid4().hex[:10]}"
        parts = [f'<div class="{MARKER_CLASS}" id="{fid}" data-title="{_html.escape(self.title)}">',
                 f'<div class="fu-title"><b>{_html.escape(self.title)}</b></div>', '<div class="fu-controls">']
        for i, c in enumerate(self.controls):
            j = c.choices.index(c.value)
            if c.kind == "slider":
                parts.append(f'<label class="fu-control">{_html.escape(c.name)} <input type="range" min="0" '
                             f'max="{len(c.choices) - 1}" step="1" value="{j}" data-control="{i}" '
                             f'aria-label="{_html.escape(c.name)}"> <output>{_html.escape(c.labels[j])}</output></label>')
            else:
                opts = "".join(f'<option value="{k}"{" selected" if k == j else ""}>{_html.escape(lab)}</option>'
                               for k, lab in enumerate(c.labels))
                if len(c.choices) > SEARCH_FROM:
                    parts.append(f'<label class="fu-control fu-search">search <input type="search" data-filter="{i}" '
                                 f'placeholder="words or a family" size="18" '
                                 f'aria-label="search the {len(c.choices)} values of {_html.escape(c.name)}"></label>')
                parts.append(f'<label class="fu-control">{_html.escape(c.name)} <select data-control="{i}">{opts}'
                             f'</select></label>')
        parts.append("</div>")
        parts.append(f'<div class="fu-plot" style="width:100%;height:{int(self.height)}px"></div>')
        parts.append('<div class="fu-text"></div>')
        if self.caption:
            parts.append(f'<div class="fu-caption" role="note"><b>Figure.</b> {self.caption}</div>')
        spec, away = self._split(self.spec())
        if away is not None:
            path, url, _ = self.outside
            name = path.name
            # a script, not JSON read by fetch: it loads from the same folder over http and from file:// alike
            path.write_text(f"(window.fuExplorerData=window.fuExplorerData||{{}})[{json.dumps(name)}]="
                            f"{_json(away)};\n", encoding="utf-8")
            spec["outside"] = {"url": url, "name": name}
        data = _json(spec).replace("</", "<\\/")  # "</" inside the JSON would end the <script> element early
        parts.append(f'<script type="application/json" class="fu-spec">{data}</script></div>')
        if plotly_js:
            parts.append(f"<script>{plotly_js_path().read_text(encoding='utf-8')}</script>")
        parts.append(f"<script>{_CONTROLLER.replace('__ID__', fid)}</script>")
        return "".join([_STYLE, *parts])

    def _repr_html_(self) -> str:
        return self.to_html()

    def __repr__(self) -> str:
        return (f"InteractiveFigure({self.title!r}, controls={[c.name for c in self.controls]}, "
                f"{len(self.states)} states)")


def _json(x) -> str:
    return json.dumps(x, separators=(",", ":"), allow_nan=False, ensure_ascii=False)


#: data keys, never factored out of a trace (they are what differs between states)
_DATA_KEYS = {"x", "y", "z", "text", "customdata"}


def _factor(traces: dict) -> tuple[dict, dict]:
    """The settings that several traces repeat (colour scale, colour bar, marker, hover template, ...) moved into
    shared bases; each trace keeps its data and names its base under ``"@"``. The page merges them back."""
    enc = {tid: {k: _json(v) for k, v in t.items() if k not in _DATA_KEYS} for tid, t in traces.items()}
    counts = Counter((k, v) for e in enc.values() for k, v in e.items())
    bases: dict = {}
    sig_ids: dict = {}
    out = {}
    for tid, t in traces.items():
        sig = tuple(sorted((k, v) for k, v in enc[tid].items() if counts[(k, v)] > 1))
        if not sig:
            out[tid] = t
            continue
        bid = sig_ids.setdefault(sig, str(len(sig_ids)))
        bases.setdefault(bid, {k: t[k] for k, _ in sig})
        out[tid] = {"@": bid, **{k: v for k, v in t.items() if k not in bases[bid]}}
    return out, bases


def _intern(layouts: dict, states: dict, parts) -> tuple[dict, dict]:
    """Each state's inline layout fragments stored once among the named ones (titles repeat across questions), and
    a picture drawn under several panels stored once per fragment (``"=i"``: the source of its image ``i``)."""
    layouts = {k: _same_pictures(v) for k, v in layouts.items()}
    seen: dict = {}
    out = {}
    for k, st in states.items():
        names = []
        for part in parts(st):
            if isinstance(part, str):
                names.append(part)
                continue
            j = _json(part)
            if j not in seen:
                seen[j] = f"~{len(seen)}"
                layouts[seen[j]] = _same_pictures(part)
            names.append(seen[j])
        out[k] = {**st, "layout": names}
    return layouts, out


def _same_pictures(fragment: dict) -> dict:
    images = fragment.get("images") if isinstance(fragment, dict) else None
    if not images:
        return fragment
    first: dict = {}
    out = []
    for i, im in enumerate(images):
        src = im.get("source")
        j = first.setdefault(src, i) if isinstance(src, str) else i
        out.append(im if j == i else {**im, "source": f"={j}"})
    return {**fragment, "images": out}


def _snippets(states: dict) -> tuple[dict, dict]:
    """A state's text may be a list of parts: the parts several states repeat (a question's line) are stored once
    in ``snippets`` and named by their index there; the page joins the parts back."""
    counts = Counter(t for st in states.values() if isinstance(st.get("text"), list) for t in st["text"])
    index: dict = {}
    out = {}
    for k, st in states.items():
        text = st.get("text")
        if isinstance(text, list):
            text = [index.setdefault(t, len(index)) if counts[t] > 1 and len(t) > 12 else t for t in text]
        out[k] = {**st, "text": text} if "text" in st else st
    return out, {i: t for t, i in index.items()}


# A light card in light and dark themes alike: plotly draws on white, so the text around it stays dark on white.
_STYLE = ("<style>.fu-interactive{margin:.5em 0 1em;background:#fff;color:#222;padding:.4em .5em;"
          "border-radius:4px;max-width:100%;overflow-x:auto}.fu-interactive code{color:#222;background:#f1f1f1}"
          ".fu-controls{display:flex;flex-wrap:wrap;gap:.4em 1.2em;"
          "margin:.3em 0;font-size:.9em}.fu-control select{max-width:min(28em,85vw)}.fu-control output{display:inline-block;"
          "min-width:3em;font-variant-numeric:tabular-nums}.fu-text{font-size:.9em;margin-top:.2em}"
          ".fu-caption{font-size:.88em;color:#333;margin-top:.3em}</style>")

# Swaps the traces when a control moves. It waits for the page (plotly.js may load later in <head> with defer) and
# says so in the figure instead of failing silently when plotly.js is absent. States kept beside the page
# (`InteractiveFigure.beside_page`) load once, from the same folder, the first time a reader picks one; a search box
# narrows a long select to the options whose label has every word typed.
_CONTROLLER = r"""(function(){
var root=document.getElementById("__ID__");
function start(){
  var text=root.querySelector(".fu-text"), plot=root.querySelector(".fu-plot");
  if(!window.Plotly){text.textContent="This figure needs plotly.js: open it in the built book (make book).";return;}
  var spec=JSON.parse(root.querySelector(".fu-spec").textContent), away=spec.outside, waiting=null;
  var inputs=Array.prototype.slice.call(root.querySelectorAll("[data-control]"));
  function key(){return inputs.map(function(el){return el.value;}).join("|");}
  function trace(id){var t=spec.traces[id];if(t["@"]===undefined){return t;}
    var o=Object.assign({}, spec.bases[t["@"]], t);delete o["@"];return o;}
  function fetchAway(done){
    if(waiting){waiting.push(done);return;}
    waiting=[done];
    var s=document.createElement("script");
    function finish(){var d=(window.fuExplorerData||{})[away.name], ok=!!d;
      if(ok){["traces","layouts","snippets","states"].forEach(function(t){Object.assign(spec[t], d[t]);});}
      away.tried=true;var w=waiting;waiting=null;w.forEach(function(f){f(ok);});}
    s.src=away.url;s.async=true;s.onload=finish;s.onerror=finish;document.head.appendChild(s);
  }
  function draw(){
    inputs.forEach(function(el){var o=el.parentNode.querySelector("output");
      if(o){o.textContent=spec.controls[+el.getAttribute("data-control")].labels[+el.value];}});
    var k=key(), st=spec.states[k];
    if(!st){
      if(away&&!away.tried){text.textContent="Loading this question\u2019s data\u2026";
        fetchAway(function(){if(key()===k){draw();}});return;}
      text.textContent="This setting\u2019s data ("+(away?away.url:"none")+") did not load: open the book from its "+
        "folder on a web server (python -m http.server), or pick another question.";
      root.setAttribute("data-state", k);return;
    }
    var layout=Object.assign({}, spec.layout), parts=st.layout||[];
    (Array.isArray(parts)?parts:[parts]).forEach(function(p){Object.assign(layout, typeof p==="string"?spec.layouts[p]:p);});
    if(layout.images){layout.images=layout.images.map(function(im, i, all){
      return /^=\d+$/.test(im.source)?Object.assign({}, im, {source: all[+im.source.slice(1)].source}):im;});}
    window.Plotly.react(plot, st.data.map(trace), layout, spec.config);
    text.innerHTML=Array.isArray(st.text)?st.text.map(function(t){return typeof t==="number"?spec.snippets[t]:t;}).join(""):(st.text||"");
    root.setAttribute("data-state", k);
  }
  Array.prototype.slice.call(root.querySelectorAll("[data-filter]")).forEach(function(box){
    var i=+box.getAttribute("data-filter"), sel=root.querySelector('select[data-control="'+i+'"]');
    var labels=spec.controls[i].labels;
    box.addEventListener("input", function(){
      var words=box.value.toLowerCase().split(/\s+/).filter(Boolean), cur=sel.value, keepCur=false;
      sel.innerHTML="";
      labels.forEach(function(lab, j){var l=lab.toLowerCase();
        if(words.every(function(w){return l.indexOf(w)>=0;})){var o=document.createElement("option");
          o.value=String(j);o.textContent=lab;sel.appendChild(o);if(String(j)===cur){keepCur=true;}}});
      if(!sel.options.length){var o=document.createElement("option");o.value=cur;o.textContent="(no match)";
        sel.appendChild(o);}
      sel.value=keepCur||!sel.options.length?cur:sel.options[0].value;
      if(sel.value!==cur){draw();}
    });
  });
  inputs.forEach(function(el){el.addEventListener("input", draw);el.addEventListener("change", draw);});
  draw();
}
if(document.readyState==="loading"){document.addEventListener("DOMContentLoaded", start);}else{start();}
})();"""


def plotly_js_path() -> Path:
    """plotly.min.js from the installed ``plotly`` package (served by the book, never fetched)."""
    try:
        import plotly
    except ImportError:
        raise ImportError("The book's interactive figures need the plotly package for plotly.min.js; run "
                          "`pip install plotly` (or `make book`, which installs it).") from None
    p = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing; reinstall plotly (`pip install --force-reinstall plotly`).")
    return p


