"""The documentation site as a reader's browser shows it: `python tools/docs.py` builds it, headless Chromium opens it.

The site is served by `http.server` on loopback, and every page is opened: it answers 200, nothing it loads fails
and nothing is fetched from anywhere but this server (the pages must show offline), every internal link points to
a page of the site and, when it has a `#fragment`, to an element with that id there; the sidebar of every page lists
every page; every image has loaded. On the dashboard page, the saved snapshots show: each figure a PNG image drawn at a
non-zero size (no inline SVG, which sanitised pages strip), and the screenshots of the live dashboard as loaded images.

Needs Debian's `chromium` (/usr/bin/chromium) and `playwright` (its wheel ships the driver; `playwright install`
is never run). Without them the test is skipped, except in CI (env CI set), where it fails. Screenshots go to
tests/artifacts/ (ignored by git) for a person to look at: docs_index.png, docs_dashboard.png.
"""
import functools
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlsplit

import pytest
from nbdev.doclinks import _nbpath2html  # the page name nbdev's Quarto site gives a notebook: 05_dashboard -> dashboard

from test_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, _keep, _shot

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
DASHBOARD_NB = NBS / "05_dashboard.ipynb"
BAD_TEXT = ("Loading widget", "Error displaying widget", "Error creating widget")


def _require_browser():
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    if find_spec("playwright") is None:
        missing.append("python module playwright (pip install playwright)")
    if missing:
        msg = "the docs site test needs " + ", ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI is set: .ci/run's set-up must install them)")
        pytest.skip(msg)


def _committed_notebooks() -> list[Path]:
    "The notebooks git tracks under nbs/ (every one must have a page); all of them there when git is missing."
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--", "nbs"], capture_output=True, check=True).stdout
        files = [ROOT / f for f in out.decode().split("\0") if f.endswith(".ipynb")]
    except (OSError, subprocess.CalledProcessError):
        files = list(NBS.rglob("*.ipynb"))
    return [f for f in files if f.is_file() and not any(p.startswith(("_", ".")) for p in f.relative_to(NBS).parts)]


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    "The site built by the command a person runs, served on 127.0.0.1; yields (folder, base URL)."
    _require_browser()
    out = tmp_path_factory.mktemp("docs") / "site"
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "docs.py"), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"tools/docs.py failed:\n{r.stdout}\n{r.stderr}"
    print(f"tools/docs.py took {time.monotonic() - t0:.1f} s: {r.stdout.strip()}")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(out)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield out, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


# What a page holds once loaded: its links (resolved), ids, sidebar links, images and the text shown.
PAGE_JS = """() => ({
  links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
  ids: Array.from(document.querySelectorAll('[id]')).map(e => e.id)
       .concat(Array.from(document.querySelectorAll('a[name]')).map(a => a.name)),
  sidebar: Array.from(document.querySelectorAll('nav.docs-sidebar li a')).map(a => a.href),
  images: Array.from(document.images).map(i => ({src: i.currentSrc || i.src, complete: i.complete, w: i.naturalWidth})),
  text: document.body.innerText,
  title: document.title,
})"""


def test_docs_site_pages_links_and_dashboard_snapshot(site):
    from playwright.sync_api import sync_playwright

    out, base = site
    shots = out.parent
    pages = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.html"))
    expected = sorted(_nbpath2html(nb.relative_to(NBS)).as_posix() for nb in _committed_notebooks())
    assert pages == expected, f"pages built {pages} != one per committed notebook, named as nbdev does {expected}"
    assert "index.html" in pages

    t0 = time.monotonic()
    seen: dict[str, dict] = {}
    outside, failed, bad_status = [], [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            ctx = browser.new_context(viewport={"width": 1280, "height": 900})

            def route(r):  # the site must not need anything but its own server
                if r.request.url.startswith(base) or r.request.url.startswith("data:"):
                    r.continue_()
                else:
                    outside.append(r.request.url)
                    r.abort()
            ctx.route("**/*", route)
            page = ctx.new_page()
            page.on("requestfailed", lambda req: failed.append(f"{req.url}: {req.failure}"))
            page.on("response", lambda resp: bad_status.append(f"{resp.url}: {resp.status}") if resp.status >= 400 else None)
            for name in pages:
                resp = page.goto(base + name, wait_until="load")
                assert resp is not None and resp.status == 200, f"{name}: {resp and resp.status}"
                seen[name] = page.evaluate(PAGE_JS)
                if name == "index.html":
                    _keep(_shot(page, shots / "docs_index.png"), [])

            # the dashboard page: the saved snapshots (each figure a PNG image) and the live-dashboard screenshots
            dash = _nbpath2html(DASHBOARD_NB.relative_to(NBS)).as_posix()
            assert dash in pages, f"no page for {DASHBOARD_NB.name}"
            page.goto(base + dash, wait_until="load")
            figures = page.evaluate("""() => Array.from(document.querySelectorAll('main img'))
                .filter(i => !i.getAttribute('src').startsWith('images/'))
                .map(i => { const r = i.getBoundingClientRect();
                            return {w: r.width, h: r.height, loaded: i.complete && i.naturalWidth > 0}; })""")
            assert figures, f"{dash}: no snapshot figure (an image beside the notebook's own pictures)"
            assert not page.locator("main svg polyline").count(), f"{dash}: a figure is still inline SVG"
            for f in figures:
                assert f["w"] > 0 and f["h"] > 0 and f["loaded"], f"{dash}: a snapshot figure is not drawn: {f}"
            wanted = re.findall(r"!\[[^\]]*\]\((images/[^)\s]+)\)", json.dumps(json.loads(DASHBOARD_NB.read_text())["cells"]))
            assert wanted, f"{DASHBOARD_NB.name} shows no images/ pictures any more: update this test"
            for src in wanted:
                img = page.locator(f'main img[src="{src}"]')
                assert img.count() == 1, f"{dash}: no <img src={src!r}>"
                img.scroll_into_view_if_needed()
                assert img.evaluate("i => i.complete && i.naturalWidth > 0"), f"{dash}: {src} did not load"
            page.locator("main img").last.scroll_into_view_if_needed()
            _keep(_shot(page, shots / "docs_dashboard.png"), [])
        finally:
            browser.close()

    assert not outside, f"pages asked for something outside the site (they must show offline): {sorted(set(outside))[:10]}"
    assert not failed, f"requests failed: {failed[:10]}"
    assert not bad_status, f"requests answered with errors: {bad_status[:10]}"

    urls = {base + name: name for name in pages}
    for name, info in seen.items():
        for bad in BAD_TEXT:
            assert bad not in info["text"], f"{name} shows {bad!r}: a live widget output was not dropped"
        # the sidebar of every page lists every page, once, in the site's order (index first)
        listed = [urls.get(unquote(urldefrag(h).url)) for h in info["sidebar"]]
        assert listed[0] == "index.html" and sorted(listed) == pages, f"{name}'s sidebar lists {listed}, not every page"
        for img in info["images"]:
            assert img["complete"] and img["w"] > 0, f"{name}: image {img['src'][:100]} did not load"
        for href in info["links"]:
            if not href.startswith(base):
                assert urlsplit(href).scheme in ("http", "https", "mailto"), f"{name}: odd link {href}"
                continue  # an outside link: not this test's business (nothing is fetched from it)
            url, frag = urldefrag(href)
            path = unquote(url[len(base):]) or "index.html"
            assert path in seen, f"{name} links to {href}, which is no page of the site"
            if frag:
                assert unquote(frag) in seen[path]["ids"], f"{name} links to {href}: {path} has no id {frag!r}"
    print(f"{len(pages)} pages opened and checked in {time.monotonic() - t0:.1f} s; "
          f"screenshots: {ARTIFACTS / 'docs_index.png'}, {ARTIFACTS / 'docs_dashboard.png'}")
