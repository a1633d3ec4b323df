"""Build the documentation site from the executed notebooks in nbs/: static HTML that needs no network to show.

    python tools/docs.py                 # writes _site/: index.html, one page per notebook, images/, style.css
    python tools/docs.py --out DIR       # somewhere else (DIR must be empty, missing, or a site this command built)

The committed outputs are the documentation, so nothing is executed: run a notebook (and commit it) to refresh its
page. Every notebook under nbs/ is a page (recursively; folders and files starting with `_` or `.` and paths git
ignores, such as training output folders, are skipped), index.ipynb first, the others by path. On each page:
nbdev `#|` directive lines are not shown, `#| hide` and `#| include: false` cells are dropped, `#| echo: false`
shows only the output and `#| output: false` only the code; the title is the notebook's first `# ` heading; a
sidebar lists every page; after each exported cell come the signature and docstring of every
public function and class it defines (nbdev's `show_doc`, as `nbdev_docs` adds them). Pages are named as on nbdev's Quarto site (`02_events.ipynb` -> `events.html`, the
name nbtrain/_modidx.py links to), and links to `X.ipynb` point to X's page. Live widget outputs are dropped:
without a kernel they would only say "Loading widget..." (the dashboard leaves a static HTML + SVG snapshot, which
is shown).

Nothing is fetched when a page is shown: nbconvert's references to MathJax, require.js, mermaid and the widget
renderer on CDNs are left out, the stylesheet is one local file, images are local files or inline.

Quarto's site (`nbdev_docs`, where Quarto is installed) is built from the same notebooks with nbs/_quarto.yml and
nbs/nbdev.yml; this command does not need them.
"""
import argparse
import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import nbformat
from jinja2 import DictLoader
from nbconvert import HTMLExporter
from traitlets.config import Config

from readme import code, directives  # tools/readme.py: nbdev's `#|` directive lines, read and stripped

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
DEFAULT_OUT = ROOT / "_site"
LIB = "nbtrain"
MARKER = ".nbtrain-docs"  # written into the output folder: only a folder holding it is ever emptied
ASSETS = {".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp"}
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
HREF = re.compile(r'href="([^"#:]*?\.ipynb)((?:#[^"]*)?)"')  # relative links only: no scheme, so no ':'
NUMBER = re.compile(r"^\d+[a-zA-Z0-9]*_")  # nbdev names a notebook's page without its number: 02_events -> events
REMOVE_INPUT, REMOVE_OUTPUT = "docs-remove-input", "docs-remove-output"

# The lab template without anything that loads from a CDN, with the sidebar, and one shared stylesheet.
PAGE = r"""{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block notebook_css -%}
<link rel="stylesheet" href="{{ resources.docs.root }}style.css">
{%- endblock notebook_css -%}
{%- block body_header -%}
<body class="jp-Notebook docs-page" data-jp-theme-light="true" data-jp-theme-name="JupyterLab Light">
<nav class="docs-sidebar" aria-label="pages">{{ resources.docs.sidebar }}</nav>
<main class="docs-main">
{%- endblock body_header -%}
"""

EXTRA_CSS = """
/* the site around the notebooks */
body.docs-page { display: flex; align-items: flex-start; margin: 0; padding: 0; overflow: visible; }
.docs-sidebar { position: sticky; top: 0; flex: 0 0 15rem; height: 100vh; overflow-y: auto; box-sizing: border-box;
  padding: 1.2rem 1rem; border-right: 1px solid #e0e0e0; background: #fafafa;
  font-family: var(--jp-ui-font-family); font-size: 14px; }
.docs-sidebar .docs-site-title { display: block; font-size: 18px; font-weight: 600; margin-bottom: 1rem;
  color: inherit; text-decoration: none; }
.docs-sidebar ul { list-style: none; margin: 0; padding: 0; }
.docs-sidebar li { margin: 0.15rem 0; }
.docs-sidebar li a { display: block; padding: 0.25rem 0.5rem; border-radius: 4px; color: #333; text-decoration: none; }
.docs-sidebar li a:hover { background: #eee; }
.docs-sidebar li a[aria-current="page"] { background: #e3ecfa; font-weight: 600; }
main.docs-main { flex: 1 1 auto; min-width: 0; max-width: 64rem; padding: 1rem 2rem 4rem; box-sizing: border-box; }
/* notebook details that do not belong on a page */
.jp-Collapser { display: none; }
.jp-InputArea { overflow: hidden; }
.jp-InputArea-editor { overflow: hidden; }
.cm-editor.cm-s-jupyter .highlight pre { padding: var(--jp-code-padding) 4px; margin: 0;
  font-family: inherit; font-size: inherit; line-height: inherit; color: inherit; }
.jp-OutputArea-output pre { line-height: inherit; font-family: inherit; }
.jp-RenderedText pre { color: var(--jp-content-font-color1); font-size: var(--jp-code-font-size); }
a.anchor-link { visibility: hidden; margin-left: 0.3em; text-decoration: none; }
:is(h1, h2, h3, h4, h5, h6):hover > a.anchor-link { visibility: visible; }
.jp-RenderedMarkdown img { max-width: 100%; }
.jp-RenderedMarkdown pre { background: var(--jp-cell-editor-background); border: 1px solid var(--jp-cell-editor-border-color);
  padding: 0.5em; overflow-x: auto; }
@media (max-width: 50rem) { body.docs-page { display: block; }
  .docs-sidebar { position: static; height: auto; border-right: none; border-bottom: 1px solid #e0e0e0; } }
"""


def _ignored(paths: list[Path]) -> set[Path]:
    "The paths among `paths` that git ignores (none when git or the repository is missing)."
    if not paths:
        return set()
    try:
        r = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "--stdin"], capture_output=True, text=True,
                           input="\n".join(str(p.relative_to(ROOT)) for p in paths))
    except OSError:
        return set()
    return {ROOT / line for line in r.stdout.splitlines() if line} if r.returncode in (0, 1) else set()


def _files(suffixes: set[str]) -> list[Path]:
    "Files under nbs/ with one of `suffixes`, skipping what nbdev skips (names starting with `_` or `.`) and git ignores."
    found = [p for p in NBS.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
             and not any(part.startswith(("_", ".")) for part in p.relative_to(NBS).parts)]
    ignored = _ignored(found)
    return [p for p in found if p not in ignored]


def page_path(notebook: Path) -> Path:
    "The page of a notebook (relative to nbs/), named as nbdev names it on the Quarto site: `02_events.ipynb` -> `events.html`."
    return notebook.with_name(NUMBER.sub("", notebook.name.lower())).with_suffix(".html")


def link_fixer(pages: dict[Path, Path], current: Path):
    "A function for `HREF.sub` that points a link to `X.ipynb` on the page `current` at X's page."
    def fix(m: re.Match) -> str:
        target = Path(os.path.normpath(current.parent / unquote(m.group(1))))
        page = pages.get(target, page_path(target))  # a notebook that is not there: a broken link, as it was
        return f'href="{html.escape(Path(os.path.relpath(page, pages[current].parent)).as_posix())}{m.group(2)}"'
    return fix


def notebooks() -> list[Path]:
    "The notebooks to publish: nbs/index.ipynb first, then the others by path."
    return sorted(_files({".ipynb"}), key=lambda p: (p.relative_to(NBS) != Path("index.ipynb"), p.relative_to(NBS).as_posix()))


def title(nb, fallback: str) -> str:
    "The notebook's first `# ` heading."
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return fallback


DEFAULT_EXP = re.compile(r"^#\|\s*default_exp\s+(\S+)", re.M)
EXPORT = re.compile(r"^#\|\s*export\s*$", re.M)


def api_doc(obj) -> str:
    "nbdev's `show_doc` of `obj` as Markdown, without the link to the source on GitHub (this site is local)."
    from nbdev.showdoc import BasicMarkdownRenderer, show_doc
    md = show_doc(obj, renderer=BasicMarkdownRenderer)._repr_markdown_()
    return md[md.index("###"):] if "###" in md else md


def with_api_docs(nb):
    "After each exported cell, the documentation of every public function and class it defines, as `nbdev_docs` adds it."
    import ast
    import importlib
    exp = next((m.group(1) for c in nb.cells if c.cell_type == "code" for m in [DEFAULT_EXP.search(c.source)] if m), None)
    if exp is None: return nb
    module = importlib.import_module(f"{LIB}.{exp}")
    cells = []
    for cell in nb.cells:
        cells.append(cell)
        if cell.cell_type != "code" or not EXPORT.search(cell.source): continue
        try: tree = ast.parse(code(cell.source))
        except SyntaxError: continue
        names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                 and not n.name.startswith("_") and n.name in getattr(module, "__all__", ())]
        if names: cells.append(nbformat.v4.new_markdown_cell("\n\n".join(api_doc(getattr(module, n)) for n in names)))
    nb.cells = cells
    return nb


def prepare(nb):
    "The notebook as a page shows it: hidden cells gone, directive lines stripped, live widget outputs dropped."
    nb.metadata.pop("widgets", None)  # saved widget state would need the widget renderer from a CDN
    cells = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            flags = {f.lower() for f in directives(cell.source)}  # as README.md reads them: "hide", "eval:false"
            if flags & {"hide", "include:false"}:
                continue
            cell.source = code(cell.source)
            tags = set(cell.metadata.get("tags", []))
            if "echo:false" in flags:
                tags.add(REMOVE_INPUT)
            if "output:false" in flags:
                tags.add(REMOVE_OUTPUT)
            outputs = []
            for out in cell.get("outputs", []):
                if WIDGET_VIEW in out.get("data", {}):
                    continue  # a live widget: its text is its state when created (e.g. a 0% bar), not what ran
                outputs.append(out)
            cell.outputs = outputs
            if not cell.source and not outputs:
                continue  # e.g. `#| default_exp name`, nothing left to show
            if tags:
                cell.metadata["tags"] = sorted(tags)
        cells.append(cell)
    nb.cells = cells
    return nb


def sidebar(pages: list[tuple[Path, str]], current: Path, site_title: str) -> str:
    "The sidebar of the page at `current` (paths relative to the site): every page, links relative to this one."
    def rel(target: Path) -> str:
        return html.escape(Path(os.path.relpath(target, current.parent)).as_posix())
    here = ' aria-current="page"'
    items = "".join(f'<li><a href="{rel(p)}"{here if p == current else ""}>{html.escape(t)}</a></li>' for p, t in pages)
    return f'<a class="docs-site-title" href="{rel(Path("index.html"))}">{html.escape(site_title)}</a><ul>{items}</ul>'


def exporter() -> HTMLExporter:
    "nbconvert's exporter with the page template above; `#| echo/output: false` act through its tag remover."
    config = Config({"TagRemovePreprocessor": {"enabled": True, "remove_input_tags": {REMOVE_INPUT},
                                               "remove_all_outputs_tags": {REMOVE_OUTPUT}}})
    return HTMLExporter(config=config, template_name="lab", template_file="docs_page.html.j2",
                        extra_loaders=[DictLoader({"docs_page.html.j2": PAGE})],
                        exclude_input_prompt=True, exclude_output_prompt=True)


def stylesheet(ex: HTMLExporter) -> str:
    "JupyterLab's notebook styles (shipped with nbconvert's lab template) and this site's."
    parts = []
    for name in ("index.css", "theme-light.css"):
        path = next((Path(d) / "static" / name for d in ex.template_paths if (Path(d) / "static" / name).is_file()), None)
        if path is None:
            raise FileNotFoundError(f"nbconvert's lab template has no static/{name} (template paths: {ex.template_paths})")
        parts.append(path.read_text(encoding="utf-8"))
    return "\n".join(parts) + EXTRA_CSS


def _prepare_out(out: Path):
    "Make `out` an empty folder, refusing to empty one that this command did not write."
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file()):
            raise SystemExit(f"{out} exists and was not written by tools/docs.py: give an empty or new folder with --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by tools/docs.py; emptied on every build\n")


def build(out: Path = DEFAULT_OUT, site_title: str = "nbtrain") -> list[Path]:
    "Write the site to `out`; gives the pages written."
    nbs = notebooks()
    if not nbs:
        raise SystemExit(f"no notebooks under {NBS}")
    loaded = [nbformat.read(p, as_version=4) for p in nbs]
    rels = [p.relative_to(NBS) for p in nbs]
    page_of = {rel: page_path(rel) for rel in rels}
    if len(set(page_of.values())) < len(page_of):
        clash = sorted(str(r) for r in rels if list(page_of.values()).count(page_of[r]) > 1)
        raise SystemExit(f"notebooks {clash} would have the same page name (nbdev drops the number prefix): rename one")
    pages = [(page_of[rel], title(nb, rel.stem)) for rel, nb in zip(rels, loaded)]
    _prepare_out(out)
    ex = exporter()
    (out / "style.css").write_text(stylesheet(ex), encoding="utf-8")
    written = []
    for rel, nb, (page, page_title) in zip(rels, loaded, pages):
        nb = prepare(with_api_docs(nb))
        nb.metadata["title"] = page_title if page_title == site_title else f"{page_title} – {site_title}"
        root = "../" * (len(page.parts) - 1)
        body, _ = ex.from_notebook_node(nb, resources={"docs": {"root": root, "sidebar": sidebar(pages, page, site_title)},
                                                       "metadata": {"name": page_title}})
        body = HREF.sub(link_fixer(page_of, rel), body)
        dest = out / page
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(body, encoding="utf-8")
        written.append(dest)
    for asset in _files(ASSETS):
        dest = out / asset.relative_to(NBS)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(asset, dest)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the site's folder (default {DEFAULT_OUT.relative_to(ROOT)}/)")
    a = p.parse_args(argv)
    written = build(a.out.resolve())
    print(f"{len(written)} pages in {a.out}: " + ", ".join(w.name for w in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
