"""In a real Jupyter kernel: train in one cell, press interrupt (the kernel gets SIGINT) in the middle of an epoch,
run `trainer.train()` in the next cell; the run stops at the step boundary right after the press, and the final
weights and optimizer state are those of an uninterrupted run."""
import os
import re
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("jupyter_client")
from kernel_session import error, execute, running_kernel  # noqa: E402

TESTS = Path(__file__).parent
MAX_STEPS = 30
STEPS_PER_EPOCH = 8  # keyword_dataset(64) in batches of 8
# Interrupt is pressed once step TARGET has ended: mid-epoch, with the epoch's end (step 16) 6 steps later, so a stop
# that waited for the end of the epoch cannot pass for the step boundary right after the press.
TARGET = 10
# From TARGET on, each step pauses PAUSE_S (0.1 s before it): the press (the test sees "STEP 10", then signals the
# kernel) lands in step TARGET's pause, with a second to spare for a loaded machine, and a run that went on to the
# epoch's end would take only seconds more.
PAUSE_S = 1.0
assert (-TARGET) % STEPS_PER_EPOCH >= 4 and TARGET + 4 < MAX_STEPS

SETUP = f"""
import hashlib, sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, {str(TESTS)!r})
from conftest import tiny_bert, keyword_dataset
from nbtrain import Trainer, TrainerCallback, TrainingArguments

SLOW_FROM = None  # the step from which each step pauses {PAUSE_S} s: set by the cell the test interrupts

class Slow(TrainerCallback):
    "Gives the test time to press interrupt in the middle of the run; says which step ended."
    def on_step_end(self, args, state, control, **kwargs):
        print(f"STEP {{state.global_step}}", flush=True)
        time.sleep({PAUSE_S} if SLOW_FROM is not None and state.global_step >= SLOW_FROM else 0.1)

def make_trainer(out):
    args = TrainingArguments(output_dir=out, max_steps={MAX_STEPS}, per_device_train_batch_size=8, learning_rate=1e-2,
                             seed=3, logging_steps=1, save_strategy="steps", save_steps=1000, report_to="none",
                             disable_tqdm=True)
    return Trainer(tiny_bert(dropout=0.1, seed=0), args, train_dataset=keyword_dataset(64, seed=0), callbacks=[Slow()])

def fingerprint(trainer):
    "A hash of every weight and optimizer tensor and of the logged losses."
    h = hashlib.sha256()
    for k, v in sorted(trainer.model.state_dict().items()): h.update(k.encode()); h.update(v.detach().cpu().numpy().tobytes())
    for pid, st in sorted(trainer.optimizer.state_dict()["state"].items()):
        for k, v in sorted(st.items()): h.update(f"{{pid}}.{{k}}".encode()); h.update(v.cpu().numpy().tobytes())
    h.update(repr([(x["step"], x["loss"]) for x in trainer.state.log_history if "loss" in x]).encode())
    print("FINGERPRINT", trainer.state.global_step, h.hexdigest())
"""


def run_cell(kc, code: str, timeout: float = 120, on_text=None):
    "Execute `code`; returns (stdout text, (ename, evalue) or None). `on_text(text_so_far)` sees the output as it comes."
    text = []
    def seen(msg):
        if msg["msg_type"] == "stream": text.append(msg["content"]["text"]); on_text and on_text("".join(text))
    err = error(execute(kc, code, timeout, seen))
    return "".join(text), err and (err["ename"], err["evalue"])


def fingerprint_of(text: str) -> tuple[int, str]:
    m = re.findall(r"FINGERPRINT (\d+) (\w+)", text)
    assert m, text[-2000:]
    return int(m[-1][0]), m[-1][1]


@pytest.fixture
def kernel(tmp_path):
    with running_kernel(tmp_path, {"OMP_NUM_THREADS": "1"}) as (km, kc): yield km, kc


def test_interrupt_then_next_cell_continues_exactly(kernel, tmp_path):
    km, kc = kernel
    out, err = run_cell(kc, SETUP)
    assert err is None, (err, out)

    # the uninterrupted run
    out, err = run_cell(kc, "t0 = make_trainer('straight'); t0.train(); fingerprint(t0)")
    assert err is None, (err, out)
    straight_step, straight = fingerprint_of(out)
    assert straight_step == MAX_STEPS

    # the interrupted one: press interrupt once step TARGET has ended, in the middle of the second epoch
    pressed = []
    def press(text):
        steps = [int(s) for s in re.findall(r"STEP (\d+)", text)]
        if not pressed and steps and steps[-1] >= TARGET:
            km.interrupt_kernel(); pressed.append(steps[-1])
    out, err = run_cell(kc, f"SLOW_FROM = {TARGET}; t = make_trainer('split'); t.train()", on_text=press)
    assert pressed, out
    assert err is not None and err[0] == "TrainingInterrupted", (err, out[-2000:])
    stopped_at = int(re.search(r"interrupted at step (\d+)", err[1]).group(1))
    # The stop is at the step boundary right after the press: the end of the step the test saw (pressed[0]) when the
    # signal lands in that step's pause, as it does unless the kernel's output reaches the test more than a pause
    # (PAUSE_S) late; one step more is allowed for such a loaded machine. Not the end of the epoch (step 16).
    assert pressed[0] <= stopped_at <= pressed[0] + 1, \
        f"interrupt pressed after step {pressed[0]} stopped the run at step {stopped_at}, not at the next step boundary"
    assert (tmp_path / "split" / f"checkpoint-{stopped_at}" / "COMPLETE").is_file()

    # the next cell: a plain train()
    out, err = run_cell(kc, "SLOW_FROM = None; t.train(); fingerprint(t)")
    assert err is None, (err, out)
    assert f"Continuing the interrupted run from" in out and f"checkpoint-{stopped_at}" in out, out[:2000]
    steps_after = [int(s) for s in re.findall(r"STEP (\d+)", out)]
    assert steps_after[0] == stopped_at + 1 and steps_after[-1] == MAX_STEPS, steps_after
    assert fingerprint_of(out) == (MAX_STEPS, straight), f"interrupted at step {stopped_at}: the weights differ"

    # ten presses within a second, as a user does when nothing seems to happen: one clean stop at a step boundary,
    # one checkpoint, and the next cell continues exactly (the presses that land during the stop's save change nothing)
    presses = []
    def burst(text):
        steps = [int(s) for s in re.findall(r"STEP (\d+)", text)]
        if not presses and steps and steps[-1] >= TARGET:
            for _ in range(10):
                km.interrupt_kernel(); presses.append(time.monotonic()); time.sleep(0.1)
    out, err = run_cell(kc, f"SLOW_FROM = {TARGET}; tb = make_trainer('burst'); tb.train()", on_text=burst)
    assert len(presses) == 10 and presses[-1] - presses[0] < 1.5, presses
    assert err is not None and err[0] == "TrainingInterrupted", (err, out[-2000:])
    stopped_at = int(re.search(r"interrupted at step (\d+)", err[1]).group(1))
    assert [p.name for p in (tmp_path / "burst").glob("checkpoint-*")] == [f"checkpoint-{stopped_at}"]
    assert (tmp_path / "burst" / f"checkpoint-{stopped_at}" / "COMPLETE").is_file()
    out, err = run_cell(kc, "SLOW_FROM = None; tb.train(); fingerprint(tb)")
    assert err is None, (err, out)
    assert fingerprint_of(out) == (MAX_STEPS, straight), f"ten presses, stopped at step {stopped_at}: the weights differ"
