"""Sphinx extension: every table of the book fits its text column, at 1280 px and on a 390 px phone.

On a wide screen tables take the column's width with a fixed layout and wrap long words; on a narrow one each row
becomes a card whose cells are labelled with their column's header (a few lines of script copy the header text into
``data-label``). Figures scale to the column. Served from the build's ``_static`` (nothing loads from the network).
"""
from __future__ import annotations

from pathlib import Path

CSS_NAME = "fu-reader.css"
JS_NAME = "fu-reader.js"

CSS = """
.bd-article table{max-width:100%}
.bd-article table.table,.bd-article table.fu-table,.bd-article table.dataframe{table-layout:fixed;width:100%}
.bd-article table td,.bd-article table th{overflow-wrap:anywhere;word-break:normal;hyphens:auto}
.bd-article table td code,.bd-article table th code{white-space:normal;overflow-wrap:anywhere}
.bd-article .cell_output .output{overflow-x:visible}
.bd-article :not(pre)>code,.bd-article :not(pre)>code span.pre{white-space:normal;overflow-wrap:anywhere}
.bd-article dt.sig{white-space:normal;overflow-wrap:anywhere;max-width:100%}
.bd-article pre{max-width:100%;overflow-x:auto}
.bd-article figure img,.bd-article .cell_output img{max-width:100%;height:auto}
.bd-article .pst-scrollable-table-container{overflow-x:visible}
@media (max-width:640px){
  .bd-article table.fu-cards,.bd-article table.fu-cards tbody,.bd-article table.fu-cards tr,
  .bd-article table.fu-cards td{display:block;width:100%!important}
  .bd-article table.fu-cards thead{display:none}
  .bd-article table.fu-cards tr{border-bottom:2px solid rgba(128,128,128,.5);padding:.3em 0}
  .bd-article table.fu-cards td{border:0;padding:.1em .3em;text-align:left!important}
  .bd-article table.fu-cards td[data-label]::before{content:attr(data-label) ": ";font-weight:600}
}
"""

# Marks every table with a header row as a card table and labels its cells with the header text.
JS = """(function(){
function label(){
  document.querySelectorAll('.bd-article table').forEach(function(t){
    var head=t.tHead&&t.tHead.rows.length?t.tHead.rows[t.tHead.rows.length-1]:null;
    if(!head){return;}
    var names=Array.prototype.map.call(head.cells,function(c){return c.textContent.trim();});
    Array.prototype.forEach.call(t.tBodies,function(b){Array.prototype.forEach.call(b.rows,function(r){
      Array.prototype.forEach.call(r.cells,function(c,i){if(!c.hasAttribute('data-label')&&names[i]){
        c.setAttribute('data-label',names[i]);}});});});
    t.classList.add('fu-cards');
  });
}
if(document.readyState==='loading'){document.addEventListener('DOMContentLoaded',label);}else{label();}
})();"""


def write_assets(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    static = Path(app.outdir) / "_static"
    static.mkdir(parents=True, exist_ok=True)
    for name, text in ((CSS_NAME, CSS), (JS_NAME, JS)):
        path = static / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")


def setup(app):
    app.add_css_file(CSS_NAME)
    app.add_js_file(JS_NAME, loading_method="defer")
    app.connect("build-finished", write_assets)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
