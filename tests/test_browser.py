"""A person's view: JupyterLab on loopback, a notebook run with Run > Run All Cells in headless Chromium.

While the watched cell is still executing, its ipywidgets progress bar must be rendered by the widget
manager (no "Loading widget...", no "Error displaying widget", no text repr such as `IntProgress(...)`)
and must advance; screenshots are taken then, and once every cell has run. They are saved in
pytest's tmp dir and copied to tests/artifacts/ (ignored by git) for a person to look at.

Needs Debian's `chromium` (/usr/bin/chromium), `jupyterlab` and `playwright` (whose wheel ships its
driver; `playwright install` is never needed nor run: Chromium comes from apt). Without them the test
is skipped, except in CI (env CI set), where it fails instead.

Screenshots: browser_<notebook>_live_first.png (the bar has just moved), browser_<notebook>_live.png (the
last one taken while the cell still ran, one every LIVE_SHOT_EVERY s), browser_<notebook>_final.png.
NOTEBOOK below (or the env NBTRAIN_BROWSER_NOTEBOOK) says which notebook: the probe, or the quick start.

The tests of saved notebooks share one notebook run in the browser, saved mid-run, its kernel killed, and opened
again untrusted: browser_midrun_live.png (the live dashboard, the finished snapshot of a continued run above it),
browser_untrusted_{finished,interrupted,continued}.png and browser_midrun_reopened.png. All tests of the module share
one JupyterLab server (with a fresh data dir: nothing is trusted that it did not see run) and one Chromium.
"""
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
POLL = 0.5             # seconds between two looks at the page (textContent only: no layout, little CPU)
# Hang guards, not speed claims: how long a wait may last before the test calls it a hang and stops. Each is far above
# what the wait takes on a loaded 2-core machine; reaching one means something is stuck, not slow.
HANG_GUARD_S = 300     # JupyterLab answering, the notebook shown with its kernel idle
RUN_ALL_STARTS_S = 60  # after Run All, how long neither the watched cell nor any queued cell may show before it counts as stopped
LIVE_SHOT_EVERY = 10.0  # seconds between live screenshots (the last one taken while the cell runs is kept)
SENTINEL = "NBTRAIN-BROWSER-TEST-ALL-CELLS-RAN"
BAD_TEXT = ("Loading widget", "Error displaying widget", "Error creating widget", "Could not create")
PROGRESS = ".widget-hprogress, .widget-vprogress"  # an ipywidgets 8 IntProgress/FloatProgress view
# what JupyterLab shows instead of a widget when the widget manager is missing: the model's text repr
TEXT_REPR = re.compile(r"\b(?:Int|Float)Progress\(|\b[HV]Box\(children=")

# A probe that trains nothing: one IntProgress updated for ~15 s, then a line of text.
PROBE_CELLS = [
    "import time\nimport ipywidgets as widgets\nfrom IPython.display import display",
    "bar = widgets.IntProgress(value=0, min=0, max=60, description='probe')\ndisplay(bar)\n"
    "for i in range(1, 61):\n    time.sleep(0.25)\n    bar.value = i",
    "print(f'done: {bar.value}/{bar.max}')",
]


@dataclass
class Case:
    source: Path | None          # the notebook to copy and run; None: the probe above
    live_cell: str               # text of the cell to watch while it executes (first cell containing it)
    live: str = PROGRESS         # the progress widget that must be rendered in that cell while it runs
    final_present: list = field(default_factory=list)  # selectors in that cell's output once all cells have run
    final_absent: list = field(default_factory=list)
    final_text: str | None = None     # text in that cell's or the next cell's output once all have run
    hang_guard_s: float = 300.0  # the whole Run All: a hang guard (see HANG_GUARD_S), not a speed claim


CASES = {
    "probe": Case(None, "IntProgress(", final_present=[PROGRESS], final_text="done: 60/60"),
    # the quick start: the dashboard is ipywidgets while train() runs, a static HTML + image snapshot after it
    "quickstart": Case(ROOT / "nbs" / "index.ipynb", "trainer.train(", final_present=["img, svg"],
                       final_absent=[PROGRESS], final_text="eval_accuracy", hang_guard_s=1200.0),
}
# The one switch: which notebook the browser runs. NBTRAIN_BROWSER_NOTEBOOK overrides it for a run.
NOTEBOOK = os.environ.get("NBTRAIN_BROWSER_NOTEBOOK", "quickstart")


def _missing() -> list[str]:
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    for mod, pkg in (("playwright", "playwright"), ("jupyterlab", "jupyterlab"), ("jupyterlab_widgets", "ipywidgets")):
        if find_spec(mod) is None:
            missing.append(f"python module {mod} (pip install {pkg})")
    return missing


def _eval_false(src: str) -> bool:
    return re.search(r"^\s*#\|\s*eval:\s*false\s*$", src, re.M) is not None


def _write_notebook(case: Case, dest: Path) -> tuple[int, int]:
    """Write the notebook to run at `dest`: outputs and saved widget state stripped, nbdev `#| eval: false` cells
    dropped (as nbdev_test does), a last cell printing SENTINEL added. Gives the watched cell's index and the cell count."""
    if case.source is None:
        nb = {"cells": [{"id": f"probe-{i}", "cell_type": "code", "source": s, "metadata": {}, "outputs": [],
                         "execution_count": None} for i, s in enumerate(PROBE_CELLS)],
              "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
              "nbformat": 4, "nbformat_minor": 5}
    else:
        nb = json.loads(case.source.read_text())
        nb["metadata"].pop("widgets", None)  # saved widget state would render without a live kernel
        nb["cells"] = [c for c in nb["cells"] if not (c["cell_type"] == "code" and _eval_false("".join(c["source"])))]
    for c in nb["cells"]:
        if c["cell_type"] == "code":
            c["outputs"], c["execution_count"] = [], None
    nb["cells"].append({"id": "browser-test-sentinel", "cell_type": "code", "source": f"print({SENTINEL!r})",
                        "metadata": {}, "outputs": [], "execution_count": None})
    dest.write_text(json.dumps(nb, indent=1))
    live_i = next(i for i, c in enumerate(nb["cells"]) if case.live_cell in "".join(c["source"]))
    return live_i, len(nb["cells"])


def _lab_settings(config_dir: Path):
    "Fresh JupyterLab user settings: no news or update toasts, and every cell kept in the DOM."
    settings = {"@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
                "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"}}
    for name, value in settings.items():
        path = config_dir / "lab" / "user-settings" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    "Every live descendant of `pid` (Linux /proc), so that kernels started by the server are ended too."
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Lab:
    "`jupyter lab` on 127.0.0.1 with a token, in `root`, with its own config, data and runtime dirs."

    def __init__(self, root: Path, home: Path):
        self.port, self.token = _free_port(), secrets.token_hex(16)
        self.base = f"http://127.0.0.1:{self.port}"
        config = home / "config"
        _lab_settings(config)
        env = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "JUPYTER_PATH", "JUPYTER_CONFIG_PATH")}
        env.update(JUPYTER_CONFIG_DIR=str(config), JUPYTER_DATA_DIR=str(home / "data"),
                   JUPYTER_RUNTIME_DIR=str(home / "runtime"), IPYTHONDIR=str(home / "ipython"),
                   JUPYTER_PLATFORM_DIRS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        self.log_path = home / "jupyter.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
             f"--port={self.port}", "--ServerApp.port_retries=0", f"--ServerApp.root_dir={root}",
             f"--IdentityProvider.token={self.token}", "--LabApp.news_url=None",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + HANG_GUARD_S
        while True:
            if self.proc.poll() is not None:
                log = self.tail()
                self.stop()
                raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}:\n{log}")
            try:
                with urllib.request.urlopen(f"{self.base}/api/status?token={self.token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log = self.tail()
                self.stop()
                raise RuntimeError(f"jupyter lab did not answer on {self.base} in {HANG_GUARD_S} s (a hang guard):\n{log}")
            time.sleep(0.5)

    def tail(self, n: int = 4000) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def url(self, name: str) -> str:
        return f"{self.base}/lab/tree/{name}?token={self.token}&reset"

    def stop(self):
        "Shut the server down (and with it its kernels); end whatever of its process tree is left."
        tree = _descendants(self.proc.pid)
        if self.proc.poll() is None:
            try:
                req = urllib.request.Request(f"{self.base}/api/shutdown", method="POST",
                                             headers={"Authorization": f"token {self.token}"})
                urllib.request.urlopen(req, timeout=10).close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in tree:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        self.log.close()


# Run in the page. READY: is the notebook shown with its kernel up? CELL_STATE: cell i and the notebook, in one go.
READY_JS = """() => ({
  cells: document.querySelectorAll('.jp-NotebookPanel .jp-Notebook .jp-Cell').length,
  kernel: [...document.querySelectorAll('.jp-StatusBar-Item:not(.lm-mod-hidden)')].map(e => e.innerText)
            .find(t => / \\| [A-Z][a-z]+$/.test(t)) || '',
  dialog: !!document.querySelector('.jp-Dialog'),
})"""
CELL_STATE_JS = """([i, bad, live]) => {
  const cells = [...document.querySelectorAll('.jp-NotebookPanel .jp-Notebook .jp-Cell')];
  const cell = cells[i];
  const prompts = cells.map(c => (c.querySelector('.jp-InputPrompt') || {}).textContent || '');
  const texts = c => c ? [...c.querySelectorAll('.jp-OutputArea-output')].map(o => o.textContent).join('\\n') : '';
  const outputs = [...document.querySelectorAll('.jp-NotebookPanel .jp-OutputArea-output')].map(o => o.textContent);
  const widgets = cell ? [...cell.querySelectorAll(live)] : [];
  return {
    n: cells.length,
    executing: cell ? /\\[\\*\\]/.test(prompts[i]) : false,
    done: cell ? /\\[\\d+\\]/.test(prompts[i]) : false,
    anyQueued: prompts.some(p => /\\[\\*\\]/.test(p)),
    bars: widgets.map(w => { const b = w.querySelector('.progress-bar'); return b ? b.style.width : '?'; }).join(' '),
    cellText: texts(cell),
    nextText: texts(cells[i + 1]),
    bad: outputs.filter(t => bad.some(b => t.includes(b))),
    errors: [...document.querySelectorAll('.jp-NotebookPanel .jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
             .map(o => o.textContent).filter(t => /Traceback \\(most recent call last\\)/.test(t)),
    allText: outputs.join('\\n'),
  };
}"""


def _shot(page, path: Path, cell=None) -> Path:
    "Screenshot the page to `path`, with `cell`'s output scrolled to the bottom of the window (its code above it)."
    if cell is not None:
        cell.locator(".jp-Cell-outputWrapper").evaluate("e => e.scrollIntoView({block: 'end'})")
    page.screenshot(path=str(path))
    return path


def _keep(path: Path, copies: list):
    "Copy a screenshot to tests/artifacts/ (ignored by git: the folder ignores itself) for a person to look at."
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")
    shutil.copy(path, ARTIFACTS / path.name)
    if ARTIFACTS / path.name not in copies:
        copies.append(ARTIFACTS / path.name)


@dataclass
class Browser:
    "One JupyterLab server and one Chromium for the module's tests (each starts in seconds, but seconds add up)."
    lab: Lab
    ctx: object
    work: Path
    shots: Path
    copies: list
    console: list

    def page(self):
        page = self.ctx.new_page()
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        page.set_default_timeout(60_000)
        return page

    @contextlib.contextmanager
    def failure_report(self, page, name: str):
        "On a failure: a screenshot, the server's log and the browser's errors."
        try:
            yield
        except BaseException:
            try:
                _keep(_shot(page, self.shots / f"browser_{name}_failure.png"), self.copies)
            except Exception:
                pass
            print("jupyter log tail:\n" + self.lab.tail(), "\nbrowser console errors:\n" + "\n".join(self.console[-30:]))
            raise


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = _missing()
    if missing:
        msg = "browser test needs " + ", ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI is set: .ci/run's set-up must install them)")
        pytest.skip(msg)
    from playwright.sync_api import sync_playwright

    root = tmp_path_factory.mktemp("browser")
    work, home, shots = root / "work", root / "home", root / "screenshots"
    for d in (work, home, shots):
        d.mkdir()
    t0 = time.monotonic()
    lab = Lab(work, home)  # a fresh Jupyter data dir: no notebook is trusted unless this server saw it run
    pw = ctx = None
    try:
        pw = sync_playwright().start()
        ctx = pw.chromium.launch_persistent_context(
            str(home / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000})
        b = Browser(lab, ctx, work, shots, [], [])
        yield b
    finally:
        if ctx is not None:
            ctx.close()
        if pw is not None:
            pw.stop()
        lab.stop()
    print(f"\nbrowser tests took {time.monotonic() - t0:.1f} s; screenshots: " + ", ".join(str(c) for c in b.copies))


def test_notebook_widgets_render_live_in_jupyterlab(browser):
    case = CASES[NOTEBOOK]
    name = f"browser_{NOTEBOOK}.ipynb"
    live_i, n_cells = _write_notebook(case, browser.work / name)
    page = browser.page()
    with browser.failure_report(page, NOTEBOOK):
        _run(page, browser.lab, name, case, live_i, n_cells, browser.shots, browser.copies)
    page.close()


def _wait_ready(page, n_cells: int, timeout: float = HANG_GUARD_S):
    "Wait until the notebook shows all its cells and the status bar says its kernel is idle ('Python 3 (ipykernel) | Idle')."
    deadline, idle_since, state = time.monotonic() + timeout, None, {}
    while time.monotonic() < deadline:
        state = page.evaluate(READY_JS)
        if state["dialog"]:  # e.g. "Select Kernel" when the kernel specs came late: take the notebook's own
            page.locator(".jp-Dialog .jp-mod-accept").click()
        elif state["cells"] == n_cells and state["kernel"].endswith("| Idle") and "No Kernel" not in state["kernel"]:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > 1.0:
                return
        else:
            idle_since = None
        time.sleep(0.25)
    raise AssertionError(f"the notebook or its kernel was not ready in {timeout:.0f} s (a hang guard): {state}")


def _run(page, lab, name, case, live_i, n_cells, shots, copies):
    page.set_default_timeout(60_000)
    page.goto(lab.url(name), wait_until="domcontentloaded", timeout=120_000)
    _wait_ready(page, n_cells)
    page.keyboard.press("Control+b")  # fold the file browser away: more room for the notebook
    # Run > Run All Cells, as a person would
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^\s*Run\s*$")).click()
    page.locator(".lm-Menu-item", has=page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^\s*Run All Cells\s*$"))).click()
    started = time.monotonic()
    deadline = started + case.hang_guard_s
    cell = page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").nth(live_i)

    def state():
        st = page.evaluate(CELL_STATE_JS, [live_i, list(BAD_TEXT), case.live])
        assert not st["errors"], "a cell failed:\n" + "\n".join(st["errors"])
        return st

    def problems(st) -> str:
        "What shows that a widget did not render: the widget manager's messages, or a model's text repr."
        if st["bad"]:
            return f"widget messages in the outputs: {st['bad']}"
        if TEXT_REPR.search(st["allText"]):
            return f"a widget shows as its text repr (no widget manager?):\n{st['allText'][-2000:]}"
        return ""

    # 1. While the watched cell runs: its progress widget is rendered, nothing says it failed to, and it advances.
    #    ("Loading widget..." may show for an instant: a sample counts only when no such message is on the page.)
    #    Screenshots: "live_first" once the bar has moved, then "live" every LIVE_SHOT_EVERY s, the last one kept
    #    that was taken while the cell was still running (checked after the shot) with its widget showing.
    seen, shot_at, last = [], {}, "nothing rendered in the cell yet"
    while True:
        st = state()
        if st["executing"]:
            last = problems(st) or ("" if st["bars"] else f"no {case.live} in the cell; its output: {st['cellText'][-500:]!r}")
            if not last:
                if st["bars"] != (seen[-1] if seen else None):
                    seen.append(st["bars"])
                due = "live_first" if "live_first" not in shot_at else "live"
                wait = 0 if due == "live_first" else LIVE_SHOT_EVERY
                if len(seen) >= 2 and time.monotonic() - max(shot_at.values(), default=0) >= wait:
                    pending = _shot(page, shots / "pending.png", cell)
                    after = state()
                    if after["executing"] and after["bars"] and not problems(after):
                        _keep(pending.replace(shots / f"browser_{NOTEBOOK}_{due}.png"), copies)
                        shot_at[due] = time.monotonic()
        elif st["done"]:
            break  # the cell ended
        elif not st["anyQueued"] and time.monotonic() - started > RUN_ALL_STARTS_S:
            pytest.fail(f"Run All stopped before cell {live_i} ran:\n{st['allText'][-3000:]}")
        assert time.monotonic() < deadline, \
            f"cell {live_i} still running after {case.hang_guard_s:.0f} s (a hang guard)" + (f": {last}" if last else " (its widget rendered)")
        time.sleep(POLL)
    assert seen, f"cell {live_i} ran without its progress widget ever rendered: {last}"
    assert len(seen) >= 2, f"the progress bar never moved while the cell ran: widths seen {seen}"
    assert "live_first" in shot_at, f"no screenshot could be taken while cell {live_i} was running with its widget showing"

    # 2. Every cell ran (the added last cell printed SENTINEL); the watched cell's final output is what it should be.
    while True:
        st = state()
        if SENTINEL in st["allText"] and not st["anyQueued"]:
            break
        if not st["anyQueued"] and SENTINEL not in st["allText"]:
            page.wait_for_timeout(1000)  # between two cells nothing may show as queued for an instant
            if not state()["anyQueued"] and SENTINEL not in state()["allText"]:
                pytest.fail(f"Run All stopped before the last cell:\n{st['allText'][-3000:]}")
        assert time.monotonic() < deadline, f"Run All did not finish in {case.hang_guard_s:.0f} s (a hang guard): {st['allText'][-3000:]}"
        time.sleep(POLL)
    page.wait_for_timeout(500)  # let the last comm messages land
    _keep(_shot(page, shots / f"browser_{NOTEBOOK}_final.png", cell), copies)
    st = state()
    assert not problems(st), f"after the run: {problems(st)}"
    for sel in case.final_present:
        assert cell.locator(f".jp-OutputArea-output :is({sel})").count() > 0, f"{sel} missing in cell {live_i}'s output"
    for sel in case.final_absent:
        assert cell.locator(f".jp-OutputArea-output :is({sel})").count() == 0, f"{sel} still in cell {live_i}'s output"
    if case.final_text:
        assert case.final_text in st["cellText"] + st["nextText"], (st["cellText"], st["nextText"])
    if case.source is None:
        assert st["bars"] == "100%", f"the probe's bar ended at {st['bars']}"
    print(f"progress bar widths seen while live ({len(seen)} states): {seen[:3]} ... {seen[-2:]}")


# ---------------------------------------------------------------------------------------------- saved notebooks
TESTS = Path(__file__).resolve().parent
KERNEL_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
              "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
SETUP = (f"import sys, time, signal; sys.path.insert(0, {str(TESTS)!r})\nfrom tiny_train import make_trainer\n"
         "from nbtrain import TrainerCallback\nfrom nbtrain.trainer import TrainingInterrupted\n"
         "from nbtrain.dashboard import NotebookDashboard")
# What sanitising removes: an inline SVG in HTML. Its absence on the page shows the notebook is shown untrusted.
TRUST_PROBE = ("from IPython.display import HTML\n"
               "HTML('<svg id=\"nbtrain-trust-probe\" width=\"12\" height=\"12\"><circle cx=\"6\" cy=\"6\" r=\"5\"/></svg>')")
PRESS_INTERRUPT = """class PressInterrupt(TrainerCallback):
    "What the kernel's interrupt button does (a SIGINT), once step `at` has ended."
    def __init__(self, at): self.at = at
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at: signal.raise_signal(signal.SIGINT)
run = make_trainer(max_steps=120, eval_steps=40, logging_steps=10, output_dir='out', callbacks=[PressInterrupt(60)])
try: run.train()
except TrainingInterrupted as e: print(e)"""
# the outputs of cell i: what the page shows there
OUTPUTS_JS = """([i]) => {
  const cell = document.querySelectorAll('.jp-NotebookPanel .jp-Notebook .jp-Cell')[i];
  const outs = [...cell.querySelectorAll('.jp-OutputArea-output')];
  const visible = e => !!(e.offsetWidth || e.offsetHeight || e.getClientRects().length);
  const saved = [...cell.querySelectorAll('.jp-OutputArea-output div')]
                  .find(d => d.firstChild && d.firstChild.textContent.startsWith('the dashboard as it was at step'));
  const rowHeights = t => t ? [...t.querySelectorAll('tr')].slice(1).map(r => r.getBoundingClientRect().height) : [];
  return {
    text: outs.map(o => o.textContent).join('\\n'),
    imgs: [...cell.querySelectorAll('.jp-OutputArea-output img')].filter(visible)
            .map(im => [im.naturalWidth, im.naturalHeight, im.complete]),
    svgs: cell.querySelectorAll('.jp-OutputArea-output svg').length,
    progress: [...cell.querySelectorAll('.jp-OutputArea-output progress')].filter(visible).length,
    tables: [...cell.querySelectorAll('.jp-OutputArea-output table')].filter(visible).length,
    snapshotRows: rowHeights([...cell.querySelectorAll('.jp-RenderedHTML table')].filter(visible).pop()),
    liveRows: rowHeights(cell.querySelector('.widget-html-content table')),
    widgets: cell.querySelectorAll('.widget-hprogress').length,
    saved: saved ? {shown: visible(saved), imgs: saved.querySelectorAll('img').length,
                    progress: saved.querySelectorAll('progress').length, tables: saved.querySelectorAll('table').length} : null,
  };
}"""
# the text an inline SVG figure leaves when a sanitiser drops its elements: titles, ticks and labels run together
SVG_AS_TEXT = re.compile(r"step\s*train loss|train loss\s*eval loss|\d(?:step)?\s*accuracy\d")


def _cell(page, i):
    return page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").nth(i)


def _open(page, browser, name: str, n_cells: int):
    page.goto(browser.lab.url(name), wait_until="domcontentloaded", timeout=120_000)
    _wait_ready(page, n_cells)


# One notebook serves both tests below (one kernel start, one page load, one reopening): three short runs (finished,
# interrupted, continued) and a long one, run with Run All; saved mid-run; the kernel killed; the file opened again,
# changed by one metadata field so that its signature no longer matches: the server shows it untrusted, as it shows a
# clone or a notebook from another server (a probe cell's inline SVG shows that the HTML is sanitised).
CELLS = [SETUP, TRUST_PROBE,
         "trainer = make_trainer(max_steps=120, eval_steps=40, logging_steps=10)\ntrainer.train();",
         PRESS_INTERRUPT, "run.train();",
         "class Slow(TrainerCallback):\n    def on_step_end(self, args, state, control, **kwargs): time.sleep(0.02)\n"
         "long = make_trainer(max_steps=100_000, eval_steps=20, logging_steps=10, disable_tqdm=True,\n"
         "                    callbacks=[NotebookDashboard(save_every=2), Slow()])\n"
         "long.train()"]
LONG = len(CELLS) - 1


@pytest.fixture(scope="module")
def reopened(browser):
    "The notebook above, run in the browser, saved mid-run, its kernel killed, and open again (untrusted): the page and what was seen live."
    name, path = "reopened.ipynb", browser.work / "reopened.ipynb"
    path.write_text(json.dumps({"cells": [{"id": f"c{i}", "cell_type": "code", "source": c, "metadata": {}, "outputs": [],
                                            "execution_count": None} for i, c in enumerate(CELLS)],
                                 "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
                                 "nbformat": 4, "nbformat_minor": 5}, indent=1))
    page = browser.page()
    with browser.failure_report(page, "reopened"):
        _open(page, browser, name, len(CELLS))
        page.locator(".lm-MenuBar-item", has_text=re.compile(r"^\s*Run\s*$")).click()
        page.locator(".lm-Menu-item", has=page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^\s*Run All Cells\s*$"))).click()
        # live: the widgets show and hide the saved view, which holds the figure once an evaluation has been drawn
        deadline, live = time.monotonic() + HANG_GUARD_S, {}
        while time.monotonic() < deadline:
            live = page.evaluate(OUTPUTS_JS, [LONG])
            if live["widgets"] and live["saved"] and live["saved"]["imgs"] and len(live["liveRows"]) >= 2:
                break
            time.sleep(POLL)
        else:
            raise AssertionError(f"the live dashboard and its saved view with a figure never showed (a hang guard): {live}")
        _keep(_shot(page, browser.shots / "browser_midrun_live.png", _cell(page, LONG)), browser.copies)
        page.locator(".jp-NotebookPanel .jp-Notebook").first.click()
        page.keyboard.press("Control+s")  # what JupyterLab's autosave does every 120 s
        deadline = time.monotonic() + 60
        while "data:image/png;base64," not in json.dumps(json.loads(path.read_text())["cells"][LONG]["outputs"]):
            assert time.monotonic() < deadline, "the notebook was not saved with the saved view (a hang guard)"
            time.sleep(POLL)
        page.close()
    kernels = [p for p in _descendants(browser.lab.proc.pid) if "ipykernel" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
    assert kernels, "no kernel process to kill"
    for p in kernels:
        os.kill(p, signal.SIGKILL)  # the kernel dies as of an out-of-memory kill: no goodbye
    nb = json.loads(path.read_text())
    nb["metadata"]["reopened"] = True  # its signature no longer matches: shown untrusted
    path.write_text(json.dumps(nb, indent=1))

    page = browser.page()
    with browser.failure_report(page, "reopened"):
        # no wait for the (restarted) kernel: what is checked is what the saved file shows
        page.goto(browser.lab.url(name), wait_until="domcontentloaded", timeout=120_000)
        page.wait_for_function(f"document.querySelectorAll('.jp-NotebookPanel .jp-Notebook .jp-Cell').length == {len(CELLS)}",
                               timeout=HANG_GUARD_S * 1000)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the images decoded
            states = [page.evaluate(OUTPUTS_JS, [i]) for i in range(2, len(CELLS))]
            if all(st["imgs"] and all(im[2] and im[0] for im in st["imgs"]) for st in states):
                break
            time.sleep(POLL)
        yield page, nb, live
    page.close()


def test_untrusted_notebook_shows_the_figures_as_images(browser, reopened):
    """Opened untrusted, JupyterLab sanitises a notebook's HTML (an inline SVG goes): each dashboard snapshot's
    figure still shows, as one image (a PNG output), nothing of it as text, and the bars and table with it."""
    page, _, _ = reopened
    probe = page.evaluate(OUTPUTS_JS, [1])
    assert probe["svgs"] == 0, "the probe's inline SVG shows: the notebook is trusted, so this proves nothing"
    seen = {}
    for i, state in ((2, "finished"), (3, "interrupted"), (4, "continued")):
        out = page.evaluate(OUTPUTS_JS, [i])
        assert out["svgs"] == 0 and not SVG_AS_TEXT.search(out["text"]), f"{state}: a figure as SVG or its text: {out['text'][:800]}"
        assert len(out["imgs"]) == 1, f"{state}: {len(out['imgs'])} images for one figure: {out['imgs']}"
        w, h, complete = out["imgs"][0]
        assert complete and w >= 300 and h >= 100, f"{state}: the figure did not decode: {out['imgs']}"
        assert out["progress"] == 2 and out["tables"] == 1, f"{state}: bars or table missing: {out}"
        seen[state] = out
        _keep(_shot(page, browser.shots / f"browser_untrusted_{state}.png", _cell(page, i)), browser.copies)
    assert "finished: 120 steps" in seen["finished"]["text"]
    assert re.search(r"interrupted at step 60 of 120: run\.train\(\) continues from there", seen["interrupted"]["text"])
    assert " left" not in seen["interrupted"]["text"]
    assert "finished: 60 steps" in seen["continued"]["text"] and "(continued from step 60)" in seen["continued"]["text"]
    print(f"\nuntrusted: probe SVG removed; per snapshot (image size, bars): "
          f"{[(k, v['imgs'][0][:2], v['progress']) for k, v in seen.items()]}")


def test_a_notebook_saved_mid_run_shows_the_run_without_its_kernel(browser, reopened):
    """Saved (as autosave would) while it trains, its kernel killed, opened again: under the dead widget the saved view
    of the dashboard shows the run as it was (bars, the whole table, the figure as a PNG image), not the error alone."""
    page, nb, live = reopened
    assert not live["saved"]["shown"], "the saved view showed beside the live widgets"
    step = re.search(r"saved at step (\d+)", "".join("".join(o.get("data", {}).get("text/plain", ""))
                                                      for o in nb["cells"][LONG]["outputs"]))
    assert step, nb["cells"][LONG]["outputs"]
    out = page.evaluate(OUTPUTS_JS, [LONG])
    _keep(_shot(page, browser.shots / "browser_midrun_reopened.png", _cell(page, LONG)), browser.copies)
    assert f"the dashboard as it was at step {step.group(1)}" in out["text"], out["text"][:800]
    assert out["progress"] == 2 and out["tables"] == 1, out
    assert len(out["imgs"]) == 1 and out["imgs"][0][0] >= 300, out["imgs"]
    # the saved table's rows as tall as the live table's: the snapshot replaces the live view without a jump
    assert out["snapshotRows"] and abs(out["snapshotRows"][0] - live["liveRows"][0]) <= 1, (live["liveRows"], out["snapshotRows"])
    print(f"\nmid-run save at step {step.group(1)}: reopened without its kernel, the widget output says "
          f"{[t for t in ('model not found', 'Loading widget') if t in out['text']]}; the saved view shows "
          f"{out['progress']} bars, {out['tables']} table, image {out['imgs'][0][:2]}; table rows live {live['liveRows'][:2]} px, "
          f"saved {out['snapshotRows'][:2]} px")
