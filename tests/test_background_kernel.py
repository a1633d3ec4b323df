"""Background runs in a real Jupyter kernel (no mocks): `trainer.train(background=True)` returns at once, the kernel
answers other cells while it trains, pause holds the step, stop saves a checkpoint that continues exactly, output of the
thread stays in its own cell, and a failure in the thread surfaces from `run.wait()` and in the dashboard.

One kernel for every case. Run with `pytest -s` to see the figures (reply time, steps).
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("jupyter_client")
pytest.importorskip("ipywidgets")
pytest.importorskip("torchmetrics")

from kernel_session import session_with

TESTS = Path(__file__).resolve().parent
MAX_STEPS = 2000  # the Ticker's 2 ms sleep keeps the run under 500 steps/s: it is still going when stopped


SETUP = f"""
import sys; sys.path.insert(0, {str(TESTS)!r})
import json, os, threading, time, torch
from tiny_train import make_trainer
from nbtrain import TrainerCallback
from nbtrain.background import RunActive

class Ticker(TrainerCallback):
    "Prints from the training thread every 100 steps; sleeps a little per step so the run lasts while the cells run."
    def on_step_end(self, args, state, control, **kw):
        time.sleep(0.002)
        if state.global_step % 100 == 0: print("tick", state.global_step)

def weights(t): return {{k: v.clone() for k, v in t.model.state_dict().items()}}
def same(a, b): return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
ARGS = dict(max_steps={MAX_STEPS}, eval_steps=1000, logging_steps=100, save_strategy="no")
"""


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("background")
    with session_with(tmp, SETUP) as s: yield s, tmp


def test_background_run_pause_stop_continue(session):
    s, tmp = session
    s.ok(f"trainer = make_trainer(**ARGS, output_dir={str(tmp / 'bg')!r}, callbacks=[Ticker()])\n"
         "plt_before = 'matplotlib.pyplot' in sys.modules")
    # cell 1: the reply comes while the run trains
    cell1, own, reply_s = s.run("run = trainer.train(background=True)\nprint(json.dumps(trainer.state.global_step))")
    assert not [m for m in own if m["msg_type"] == "error"], own
    at_reply = s.ok("print(json.dumps([run.active, run.status, trainer.state.global_step]))")
    assert at_reply[0] and at_reply[2] < MAX_STEPS, f"the run was not going on after cell 1's reply: {at_reply}"
    print(f"\ncell 1's execute_reply after {reply_s * 1000:.0f} ms, at step {at_reply[2]} of {MAX_STEPS}")

    # cell 2: the step grows while this cell runs; the thread's prints do not land here
    cell2, own2, _ = s.run("a = trainer.state.global_step; time.sleep(0.5); b = trainer.state.global_step\n"
                           "print(json.dumps([a, b]))")
    out2 = "".join(m["content"]["text"] for m in own2 if m["msg_type"] == "stream")
    a, b = json.loads(out2.strip().splitlines()[-1])
    assert b > a, f"the step did not grow while another cell ran: {a} -> {b}"
    assert "tick" not in out2, f"the training thread's output landed in another cell: {out2!r}"

    # pause: the step holds for 2 s; the trainer refuses evaluate(); run.evaluate() is served while paused
    held, after, status, refused, metrics = s.ok(
        "held = run.pause(); time.sleep(2); after = trainer.state.global_step\n"
        "try: trainer.evaluate(); refused = ''\nexcept RunActive as e: refused = str(e)\n"
        "m = run.evaluate()\n"
        "print(json.dumps([held, after, run.status, refused, m]))")
    assert after == held, f"the step moved while paused: {held} -> {after}"
    assert status == f"paused at step {held}", status
    assert "run.pause()" in refused and "run.evaluate()" in refused, refused
    assert "eval_loss" in metrics and metrics.get("epoch") is not None, metrics

    # resume, then stop(save=True): a complete checkpoint of the step it stopped at
    grown = s.ok("run.resume(); time.sleep(0.3); print(json.dumps(trainer.state.global_step))")
    assert grown > held, f"the run did not go on after resume: {held} -> {grown}"

    # the kernel's interrupt (meant for a busy cell) stops that cell, not the run
    threading.Timer(0.5, s.km.interrupt_kernel).start()
    _, busy, _ = s.run("time.sleep(2)")
    interrupted = [m["content"] for m in busy if m["msg_type"] == "error"]
    assert interrupted and interrupted[0]["ename"] == "KeyboardInterrupt", "the busy cell was not interrupted"
    active, status, later = s.ok("time.sleep(0.2); print(json.dumps([run.active, run.status, trainer.state.global_step]))")
    assert active and status == "running" and later > grown, (active, status, grown, later)
    status, step, ck, files = s.ok(
        "run.stop(save=True)\n"
        "print(json.dumps([run.status, trainer.state.global_step, str(trainer.last_checkpoint), sorted(os.listdir(trainer.last_checkpoint))]))")
    assert step < MAX_STEPS and status.startswith(f"stopped at step {step}"), (status, step)
    assert Path(ck).name == f"checkpoint-{step}" and "COMPLETE" in files and "model.safetensors" in files, (ck, files)

    # trainer.train(resume_from_checkpoint=True) continues to the same weights as one foreground run of the same arguments
    same, final_step, plt_after = s.ok(
        "trainer.pop_callback(Ticker)\n"
        "out = trainer.train(resume_from_checkpoint=True)\n"
        f"ref = make_trainer(**ARGS, output_dir={str(tmp / 'ref')!r}); ref.train()\n"
        "print(json.dumps([same(weights(trainer), weights(ref)), out.global_step, 'matplotlib.pyplot' in sys.modules and not plt_before]))",
        timeout=300)
    assert final_step == MAX_STEPS and same, "the background run, stopped and continued, differs from a foreground run"
    assert not plt_after, "the run imported pyplot (its global state is not for a thread)"

    # the thread's prints went to cell 1, and only there
    s.drain(0.2)
    ticks = [m for m in s.msgs if m["msg_type"] == "stream" and "tick" in m["content"]["text"]]
    assert ticks and all(m["parent_header"]["msg_id"] == cell1 for m in ticks), \
        {m["parent_header"]["msg_id"] for m in ticks} - {cell1}


def test_failure_in_background_surfaces_and_keeps_progress(session):
    s, tmp = session
    s.ok("class Boom(TrainerCallback):\n"
         "    def on_step_end(self, args, state, control, **kw):\n"
         "        if state.global_step == 7: raise RuntimeError('boom at step 7')\n"
         "def boom_trainer(): return make_trainer(max_steps=40, eval_steps=None, logging_steps=2, callbacks=[Boom()])")
    s.ok("t2 = boom_trainer()")
    start, own, reply_s = s.run("run2 = t2.train(background=True)")
    assert not [m for m in own if m["msg_type"] == "error"], own
    print(f"\na second background start in the same kernel: execute_reply after {reply_s * 1000:.0f} ms")
    _, own, _ = s.run("run2.wait(timeout=60)")
    errs = [m["content"] for m in own if m["msg_type"] == "error"]
    assert errs, "run.wait() raised nothing after the run failed"
    err = errs[0]
    tb = "\n".join(err["traceback"])
    # the trainer names the callback that failed (a CallbackError, a RuntimeError) and chains the original error
    assert err["ename"] in ("RuntimeError", "CallbackError") and "boom at step 7" in err["evalue"], err
    assert "on_step_end" in tb and "_training_loop" in tb, f"the thread's frames are not in the traceback:\n{tb}"

    dash, status, step, same_state = s.ok(
        "dash = next(cb for cb in t2.callbacks if type(cb).__name__ == 'NotebookDashboard')\n"
        "t3 = boom_trainer()\n"
        "try: t3.train()\nexcept RuntimeError: pass\n"
        "untimed = lambda t: [{k: h.get(k) for k in ('step', 'epoch', 'loss', 'grad_norm', 'learning_rate')} for h in t.state.log_history]\n"
        "print(json.dumps([dash.progress.status, run2.status, t2.state.global_step,\n"
        "                  same(weights(t2), weights(t3)) and untimed(t2) == untimed(t3) and len(untimed(t2)) == 3]))")
    assert "failed at step 7" in dash and "Error" in dash, dash
    assert status.startswith("failed at step 7: ") and "boom at step 7" in status, status
    # the progress made is kept: the same weights and history as the same run in the foreground, which fails alike
    assert step == 7 and same_state
    # the traceback also went to the cell that started the run, and the snapshot there says it failed
    s.drain(0.2)
    stderr = "".join(m["content"]["text"] for m in s.of(start, "stream") if m["content"]["name"] == "stderr")
    assert "boom at step 7" in stderr and "Traceback" in stderr, stderr[-2000:]
    snapshot = [m["content"]["data"].get("text/plain", "") for m in s.of(start, "update_display_data")]
    assert any("failed at step 7" in t for t in snapshot), snapshot
