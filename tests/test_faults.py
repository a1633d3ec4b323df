"""Faults as a user meets them, each injected for real: two runs on one output_dir (a live one, then a killed one), an
exception in a user's callback and in the collator between two steps, and a damaged newest checkpoint. Each says what
failed and where, and keeps what was made: the other run's files, the progress so far in a checkpoint that a plain
`train()` continues from exactly, the previous complete checkpoint."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nbtrain import Trainer, TrainerCallback, TrainingArguments
from nbtrain.checkpoint import LOCK, DamagedCheckpointError, OutputDirBusy, list_checkpoints
from nbtrain.data import DataError, collate_tensors
from nbtrain.events import CallbackError

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from tiny_train import TinyNet, make_data  # noqa: E402

torch.set_num_threads(1)
HANG_GUARD_S = 120  # a hang guard for the child process, not a speed claim


def args(out, **kw) -> TrainingArguments:
    return TrainingArguments(**{**dict(output_dir=str(out), per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=1,
                                       save_strategy="steps", save_steps=1000, disable_tqdm=True, seed=0, report_to="none"), **kw})


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def straight_run(tmp_path, **kw) -> dict:
    "The weights of the run nothing happened to."
    torch.manual_seed(0)
    t = Trainer(TinyNet(), args(tmp_path / "straight", **kw), train_dataset=make_data(64, seed=1))
    t.train()
    return weights(t.model)


# ---------------------------------------------------------------------------------------------- one run per output_dir
HOLDER = f"""
import sys, time
from pathlib import Path
import torch
sys.path.insert(0, {str(TESTS)!r})
from tiny_train import TinyNet, make_data
from nbtrain import Trainer, TrainerCallback, TrainingArguments

class Hold(TrainerCallback):
    "After step 2 (saved), says so and waits: a run in the middle of training."
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 2:
            Path(sys.argv[2]).touch()
            time.sleep(600)

args = TrainingArguments(output_dir=sys.argv[1], max_steps=8, save_steps=2, per_device_train_batch_size=8, report_to="none",
                         disable_tqdm=True)
Trainer(TinyNet(), args, train_dataset=make_data(64, seed=1), callbacks=[Hold()]).train()
"""


def test_two_runs_on_one_output_dir(tmp_path):
    out, ready = tmp_path / "out", tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(ready)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while not ready.exists() and holder.poll() is None and time.monotonic() < deadline: time.sleep(0.05)
        assert ready.exists(), holder.stderr.read()[-2000:] if holder.poll() is not None else "the holder never reached step 2"
        time.sleep(0.5)  # its checkpoint-2 is being written
        torch.manual_seed(0)
        t = Trainer(TinyNet(), args(out, max_steps=4, save_steps=1), train_dataset=make_data(64, seed=1))
        before = weights(t.model)
        with pytest.raises(OutputDirBusy, match=rf"output_dir '{out}' is in use by another training run: process {holder.pid} "
                                                r"on .*, since .*another output_dir"):
            t.train()
        assert same(weights(t.model), before) and t.state.global_step == 0  # not a step taken
        assert not (out / "checkpoint-1").exists()  # nothing of this run was written there
    finally:
        holder.send_signal(signal.SIGKILL); holder.wait()
    # the holder is dead, its lock file is still there: taken over, no file to delete by hand
    assert (out / LOCK).is_file()
    t.train()
    assert t.state.global_step == 4 and not (out / LOCK).exists()
    assert same(weights(t.model), straight_run(tmp_path, max_steps=4, save_steps=1))


# ---------------------------------------------------------------------------------------------- the user's code fails
class FailsOnce(TrainerCallback):
    "A user's callback with a bug that shows at step 5's log."
    def __init__(self): self.armed = True
    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.armed and state.global_step == 5: raise KeyError("val_loss")


def test_a_callback_that_raises_names_itself_and_keeps_the_progress(tmp_path):
    torch.manual_seed(0)
    cb = FailsOnce()
    t = Trainer(TinyNet(), args(tmp_path / "out", max_steps=12), train_dataset=make_data(64, seed=1), callbacks=[cb])
    with pytest.raises(CallbackError, match=r"callback FailsOnce.on_log raised KeyError: 'val_loss' \(at step 5; epoch 0.62\)"
                                            r".*Its state is saved in .*checkpoint-5: after the fix, trainer.train\(\) continues"):
        t.train()
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["checkpoint-5"]
    cb.armed = False  # the fix; the next cell's plain train() continues from checkpoint-5
    t.train()
    assert t.state.global_step == 12 and same(weights(t.model), straight_run(tmp_path, max_steps=12))


RARE = 37


def picky(examples):
    "A user's collator that cannot take example RARE (it fails at whichever step draws it)."
    if any(e["idx"] == RARE for e in examples): raise ValueError(f"cannot collate example {RARE}")
    return collate_tensors(examples)


def fixed(examples):
    return collate_tensors([{k: v for k, v in e.items()} for e in examples])


class IdxNet(TinyNet):
    def forward(self, x, labels=None, idx=None): return super().forward(x, labels)


def test_a_collator_failing_on_a_rare_example_keeps_the_progress(tmp_path):
    data = [dict(e, idx=i) for i, e in enumerate(make_data(64, seed=1))]
    torch.manual_seed(0)
    t = Trainer(IdxNet(), args(tmp_path / "out", max_steps=16), train_dataset=data, data_collator=picky)
    with pytest.raises(DataError, match=r"step (\d+) \(batch \d+ of epoch 0, train_dataset\); training stopped at step (\d+).*"
                                        r"cannot collate example 37.*Its state is saved in .*checkpoint-") as e:
        t.train()
    stopped = t.state.global_step
    assert 0 < stopped < 8 and [p.name for p in list_checkpoints(tmp_path / "out")] == [f"checkpoint-{stopped}"]
    t.data_collator = fixed
    t.train()
    torch.manual_seed(0)
    s = Trainer(IdxNet(), args(tmp_path / "straight", max_steps=16), train_dataset=data, data_collator=fixed)
    s.train()
    assert t.state.global_step == 16 and same(weights(t.model), weights(s.model)), f"continued from step {stopped}: differs"


# ---------------------------------------------------------------------------------------------- a damaged checkpoint
@pytest.mark.parametrize("name,damage", [("model.safetensors", "header"), ("model.safetensors", "cut"),
                                         ("trainer_state.json", "cut")])
def test_a_damaged_newest_checkpoint_names_the_file_and_offers_the_previous(tmp_path, name, damage):
    out = tmp_path / "out"
    torch.manual_seed(0)
    Trainer(TinyNet(), args(out, max_steps=6, save_steps=2), train_dataset=make_data(64, seed=1)).train()
    f = out / "checkpoint-6" / name
    data = f.read_bytes()
    f.write_bytes(os.urandom(64) + data[64:] if damage == "header" else data[: len(data) // 2])
    torch.manual_seed(1)
    t = Trainer(TinyNet(), args(out, max_steps=6, save_steps=2), train_dataset=make_data(64, seed=1))
    before = weights(t.model)
    with pytest.raises(DamagedCheckpointError, match=rf"{f} (cannot be read as safetensors|is not valid JSON).*The checkpoint "
                                                     rf"before it is complete: train\(resume_from_checkpoint='{out / 'checkpoint-4'}'\)"):
        t.train(resume_from_checkpoint=True)
    assert same(weights(t.model), before) and t.state.global_step == 0
    t.train(resume_from_checkpoint=str(out / "checkpoint-4"))  # the offer works
    assert t.state.global_step == 6
