"""`launch(fn, ..., background=True)` in a real Jupyter kernel: two CPU processes train while the notebook runs other
cells; pause holds every rank at one step, a save and an evaluation asked while paused are served by every rank there,
stop ends every rank at one step with a complete checkpoint, and a new launch continues from it to the weights of an
uninterrupted launch, bit for bit. The dashboard in the launching cell has the buttons and ends as a snapshot.

Each rank writes the step it has just finished to a file of its own, so what every rank did is read from the ranks
themselves, not from the notebook's bookkeeping. Run with `pytest -s` to see the figures.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("jupyter_client")
pytest.importorskip("ipywidgets")
psutil = pytest.importorskip("psutil")

from kernel_session import session_with

TESTS = Path(__file__).resolve().parent
MAX_STEPS = 3000  # at the 10 ms a step the ranks sleep, the run is still going when it is stopped

SETUP = f"""
import json, os, sys, time
import psutil, torch
from torch import nn
from nbtrain import Trainer, TrainerCallback, TrainingArguments, launch
from nbtrain.background import RunActive
torch.set_num_threads(1)
import torch._dynamo  # the optimizer imports it lazily; imported here, the forked children need not

class Net(nn.Module):
    def __init__(self): super().__init__(); self.lin = nn.Linear(4, 1); self.drop = nn.Dropout(0.3)
    def forward(self, x, labels=None):
        y = self.lin(self.drop(x)).squeeze(-1)  # dropout: the random state must continue too
        return {{"logits": y, **({{"loss": nn.functional.mse_loss(y, labels)}} if labels is not None else {{}})}}

g = torch.Generator().manual_seed(0)
data = [{{"x": x, "labels": float(x.sum())}} for x in torch.randn(64, 4, generator=g)]

class Where(TrainerCallback):
    "Each rank writes the step it has just finished to a file of its own (and sleeps, so the run lasts)."
    def __init__(self, folder, slow): self.folder, self.slow = folder, slow; os.makedirs(folder, exist_ok=True)
    def on_step_end(self, args, state, control, **kw):
        path = os.path.join(self.folder, "rank" + os.environ["RANK"] + ".step")
        with open(path + ".tmp", "w") as f: f.write(str(state.global_step))
        os.replace(path + ".tmp", path)
        if self.slow: time.sleep(0.01)
    def on_evaluate(self, args, state, control, **kw):  # the step each rank evaluated at
        with open(os.path.join(self.folder, "rank" + os.environ["RANK"] + ".evals"), "a") as f: f.write(f"{{state.global_step}}\\n")

def fn(model, out, slow=True, resume=False):
    from accelerate import PartialState
    args = TrainingArguments(output_dir=out, max_steps={MAX_STEPS}, per_device_train_batch_size=8, learning_rate=0.01,
                             logging_steps=100, save_strategy="no", eval_strategy="no", report_to="none", seed=0)
    trainer = Trainer(model, args, train_dataset=data, eval_dataset=data[:16], callbacks=[Where(out, slow)])
    return trainer.train(resume_from_checkpoint=resume).global_step

def evals(out): return [open(os.path.join(out, f"rank{{r}}.evals")).read().split() for r in range(2)]
def ranks(out): return [int(open(os.path.join(out, f"rank{{r}}.step")).read()) for r in range(2)]
def children(): return sorted(p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE)
kids_before = children()
"""


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launch_background")
    with session_with(tmp, SETUP) as s: yield s, tmp


def test_background_launch_pause_save_stop_every_rank_at_one_step(session):
    s, tmp = session
    out, ref = str(tmp / "bg"), str(tmp / "ref")
    s.ok(f"out, ref = {out!r}, {ref!r}\ntorch.manual_seed(0); model = Net()")

    # the cell returns once training has begun, and the ranks go on training while other cells run
    start, own, reply_s = s.run("run = launch(fn, model, out, num_processes=2, background=True)")
    assert not [m for m in own if m["msg_type"] == "error"], own
    a, b, active = s.ok("a = run.step; time.sleep(0.5); print(json.dumps([a, run.step, run.active]))")
    assert active and b > a and b < MAX_STEPS, (a, b, active)
    print(f"\nlaunch(background=True) replied after {reply_s:.2f} s; step {a} -> {b} over 0.5 s of another cell")

    # pause: both ranks hold at the same step for 2 s; a second launch meanwhile is refused
    held, later, on_ranks, status, refused = s.ok(
        "held = run.pause(); time.sleep(2)\n"
        "try: launch(fn, Net(), out, num_processes=2); refused = ''\nexcept RunActive as e: refused = str(e)\n"
        "print(json.dumps([held, run.step, ranks(out), run.status, refused]))")
    assert later == held and on_ranks == [held, held], (held, later, on_ranks)
    assert status == f"paused at step {held}", status
    assert "run.wait() or run.stop()" in refused, refused

    # an evaluation and a save asked while paused: served by every rank at the held step, answered by rank 0
    metrics, folder, files, after = s.ok(
        "m = run.evaluate(timeout=60); ck = run.save(timeout=60)\n"
        "print(json.dumps([m, str(ck), sorted(os.listdir(ck)), ranks(out)]))")
    assert "eval_loss" in metrics, metrics
    assert Path(folder).name == f"checkpoint-{held}" and "COMPLETE" in files, (folder, files)
    assert after == [held, held], after

    # resume, then stop(save=True): every rank ends at one step, with a complete checkpoint of it
    grown = s.ok("run.resume(); time.sleep(0.5); print(json.dumps(run.step))")
    assert grown > held, (held, grown)
    # an evaluation asked while the ranks run: both evaluate at one step, ahead of where they were when it was asked
    before, got, at = s.ok("before = run.step; m2 = run.evaluate(timeout=60)\nprint(json.dumps([before, m2, evals(out)]))")
    assert "eval_loss" in got and at[0] == at[1] and len(at[0]) == 2 and int(at[0][1]) > before, (before, at)
    status, step, on_ranks, files, result, kids = s.ok(
        "run.stop(save=True, timeout=60)\n"
        "print(json.dumps([run.status, run.step, ranks(out), sorted(os.listdir(os.path.join(out, f'checkpoint-{run.step}'))),\n"
        "                  run.wait(), children() == kids_before]))")
    assert step < MAX_STEPS and status == f"stopped at step {step}" and on_ranks == [step, step], (status, step, on_ranks)
    assert "COMPLETE" in files and "model.safetensors" in files, files
    assert result is None and kids, "the stopped launch left processes, or returned a result"
    print(f"paused at step {held} on both ranks; stopped at step {step} on both ranks")

    # a new launch continues from the stop's checkpoint to the weights of one launch that never stopped, bit for bit
    same, steps = s.ok(
        "done = launch(fn, model, out, slow=False, resume=True, num_processes=2)\n"
        "torch.manual_seed(0); straight = Net(); launch(fn, straight, ref, slow=False, num_processes=2)\n"
        "print(json.dumps([all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), straight.state_dict().values())), done]))",
        timeout=300)
    assert steps == MAX_STEPS and same, "stopped and continued under launch, the weights differ from an uninterrupted launch"

    # the launching cell's dashboard had the buttons, and ended as the snapshot of the stopped run
    s.drain(0.3)
    buttons = {m["content"]["data"]["state"].get("description") for m in s.of(start, "comm_open")
               if m["content"]["data"]["state"].get("_model_name") == "ButtonModel"}
    assert {"Pause", "Save now", "Stop"} <= buttons, buttons
    snapshot = [m["content"]["data"].get("text/html", "") for m in s.of(start, "update_display_data")]
    assert any(f"stopped at step {step} of {MAX_STEPS}" in t for t in snapshot), snapshot[-1:]


def test_a_failing_rank_surfaces_from_wait(session):
    s, tmp = session
    s.ok("class Boom(TrainerCallback):\n"
         "    def on_step_end(self, args, state, control, **kw):\n"
         "        if state.global_step == 30 and os.environ['RANK'] == '1': raise RuntimeError('rank 1 broke at step 30')\n"
         "def breaks(model, out):\n"
         "    args = TrainingArguments(output_dir=out, max_steps=1000, per_device_train_batch_size=8, save_strategy='no',\n"
         "                             report_to='none', logging_steps=10)\n"
         "    Trainer(model, args, train_dataset=data, callbacks=[Boom(), Where(out, True)]).train()")
    _, own, _ = s.run(f"run2 = launch(breaks, Net(), {str(tmp / 'boom')!r}, num_processes=2, background=True)")
    assert not [m for m in own if m["msg_type"] == "error"], own
    _, own, _ = s.run("run2.wait(timeout=120)")
    err = next((m["content"] for m in own if m["msg_type"] == "error"), None)
    assert err is not None and err["ename"] == "LaunchError" and "rank 1 broke at step 30" in err["evalue"], err
    status, kids = s.ok("print(json.dumps([run2.status, children() == kids_before]))")
    assert status.startswith("failed at step") and "rank 1 broke at step 30" in status, status
    assert kids, "processes left behind after the failure"


def test_a_second_run_in_fn_is_drawn_without_widgets_from_the_relay_thread(session):
    "Widgets are displayed from the main thread only: a later train() in a background launch's fn gets the HTML dashboard."
    s, tmp = session
    s.ok("def twice(model, out):\n"
         "    for steps in (20, 30):\n"
         "        args = TrainingArguments(output_dir=None, max_steps=steps, per_device_train_batch_size=8, save_strategy='no',\n"
         "                                 report_to='none', logging_steps=10)\n"
         "        Trainer(model, args, train_dataset=data, callbacks=[Where(out, True)]).train()\n"
         "    return 'both'")
    start, own, _ = s.run(f"run3 = launch(twice, Net(), {str(tmp / 'twice')!r}, num_processes=2, background=True)")
    assert not [m for m in own if m["msg_type"] == "error"], own
    assert s.ok("print(json.dumps(run3.wait(timeout=120)))") == "both"
    s.drain(0.3)
    shown = [m["content"]["data"] for m in s.of(start, "display_data")]
    views = ["application/vnd.jupyter.widget-view+json" in d for d in shown if "image/png" not in d]
    # the first run: its widgets and the saved view under them; the second: one HTML display, no widget
    assert views[0] and views.count(True) == 1 and len(views) >= 3 and not views[-1], views
    snapshots = [m["content"]["data"].get("text/html", "") for m in s.of(start, "update_display_data")]
    assert any("finished: 30 steps" in t for t in snapshots), [t[:80] for t in snapshots][-3:]
