"""A person's view of a background run: JupyterLab on loopback in headless Chromium, a notebook that starts
`trainer.train(background=True)`; then the dashboard's buttons are clicked as a person would.

Pause: the status line says "paused at step N" and the step holds for 2 s; Resume: it trains again; Stop: the run
saves a checkpoint and ends, and the widgets give way to the static snapshot. Screenshots after each click are saved
in pytest's tmp dir and copied to tests/artifacts/ (ignored by git): browser_background_{paused,resumed,stopped}.png.

Needs what test_browser.py needs (Debian's chromium, jupyterlab, playwright); skipped without them, failed in CI.
It starts a JupyterLab of its own (tens of seconds on 2 cores).
"""
import json
import os
import re
import time
from pathlib import Path

import pytest

from test_browser import CHROMIUM, CHROMIUM_ARGS, Lab, _keep, _missing, _shot, _wait_ready

TESTS = Path(__file__).resolve().parent
HANG_GUARD_S = 120  # a wait that lasts this long is stuck, not slow
CELLS = [
    f"import sys; sys.path.insert(0, {str(TESTS)!r})\nfrom tiny_train import make_trainer\n"
    "trainer = make_trainer(max_steps=200_000, eval_steps=500, logging_steps=50, output_dir='bg_out')",
    "run = trainer.train(background=True)",
    "print('cells done while the run trains')",
]
NOTE = ".widget-html code"  # the dashboard's status line: "<status> · epoch ... · step N/200000 · ..."


def _notebook(dest: Path):
    nb = {"cells": [{"id": f"bg-{i}", "cell_type": "code", "source": s, "metadata": {}, "outputs": [], "execution_count": None}
                    for i, s in enumerate(CELLS)],
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
          "nbformat": 4, "nbformat_minor": 5}
    dest.write_text(json.dumps(nb, indent=1))


def _wait(what: str, probe, timeout: float = HANG_GUARD_S, every: float = 0.25):
    "Poll `probe()` until it gives something true; that value. A hang guard, not a speed claim."
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        last = probe()
        if last: return last
        time.sleep(every)
    raise AssertionError(f"{what}: not seen in {timeout:.0f} s (a hang guard); last: {last!r}")


def test_background_buttons_in_jupyterlab(tmp_path):
    missing = _missing()
    if missing:
        msg = "browser test needs " + ", ".join(missing)
        if os.environ.get("CI"): pytest.fail(msg + " (CI is set: .ci/run's set-up must install them)")
        pytest.skip(msg)
    from playwright.sync_api import sync_playwright

    work, home, shots = tmp_path / "work", tmp_path / "home", tmp_path / "screenshots"
    for d in (work, home, shots): d.mkdir()
    _notebook(work / "background.ipynb")
    copies, t0 = [], time.monotonic()
    lab = Lab(work, home)
    print(f"\njupyter lab up after {time.monotonic() - t0:.1f} s")
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(str(home / "chromium-profile"), executable_path=CHROMIUM, headless=True,
                                                        args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 900})
            try:
                page = ctx.pages[0] if ctx.pages else ctx.new_page()
                page.set_default_timeout(60_000)
                page.goto(lab.url("background.ipynb"), wait_until="domcontentloaded", timeout=120_000)
                _wait_ready(page, len(CELLS))
                page.keyboard.press("Control+b")
                page.locator(".lm-MenuBar-item", has_text=re.compile(r"^\s*Run\s*$")).click()
                page.locator(".lm-Menu-item", has=page.locator(".lm-Menu-itemLabel",
                                                                has_text=re.compile(r"^\s*Run All Cells\s*$"))).click()
                cell = page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").nth(1)
                after = page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").nth(2)
                # the last cell ran while the run trains: the kernel is free
                _wait("the next cell's output", lambda: "cells done while the run trains" in after.inner_text())
                note = cell.locator(NOTE).first
                pause = cell.locator("button", has_text="Pause")

                def step() -> int:
                    m = re.search(r"step (\d+)/200000", note.inner_text())
                    return int(m.group(1)) if m else -1

                first = _wait("the run training (step > 0)", lambda: step() > 0 and step())
                _wait("the step growing", lambda: step() > first)
                print(f"the run training after {time.monotonic() - t0:.1f} s")

                pause.click()
                held = _wait("the status 'paused at step N'",
                             lambda: (m := re.search(r"paused at step (\d+)", note.inner_text())) and int(m.group(1)))
                _wait("the button turned into Resume", lambda: cell.locator("button", has_text="Resume").count())
                time.sleep(2.0)
                assert step() == held and f"paused at step {held}" in note.inner_text(), (held, note.inner_text())
                _keep(_shot(page, shots / "browser_background_paused.png", cell), copies)

                cell.locator("button", has_text="Resume").click()
                _wait("the status 'running' again", lambda: note.inner_text().startswith("running"))
                _wait("the step growing after Resume", lambda: step() > held)
                _keep(_shot(page, shots / "browser_background_resumed.png", cell), copies)

                cell.locator("button", has_text="Stop").click()
                text = _wait("the snapshot saying 'stopped at step N'",
                             lambda: (t := cell.locator(".jp-OutputArea-output").all_inner_texts())
                             and any("stopped at step" in x for x in t) and "\n".join(t))
                page.wait_for_timeout(500)
                assert cell.locator(".widget-button").count() == 0, "the buttons are still there after the run ended"
                stopped = int(re.search(r"stopped at step (\d+)", text).group(1))
                assert "continues from there" in text, text
                assert held < stopped < 200_000, (held, stopped)
                ck = work / "bg_out" / f"checkpoint-{stopped}"
                assert (ck / "COMPLETE").is_file(), f"Stop left no complete checkpoint of step {stopped}: {sorted(work.rglob('*'))[:20]}"
                _keep(_shot(page, shots / "browser_background_stopped.png", cell), copies)
            except BaseException:
                try: _keep(_shot(page, shots / "browser_background_failure.png"), copies)
                except Exception: pass
                print("jupyter log tail:\n" + lab.tail())
                raise
            finally:
                ctx.close()
    finally:
        lab.stop()
    print(f"browser test took {time.monotonic() - t0:.1f} s; screenshots: " + ", ".join(str(c) for c in copies))
