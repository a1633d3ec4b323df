"""Logging where users look: TensorBoard through 🤗 Accelerate's trackers (read back with TensorBoard's own reader), the
JSON-lines log that survives interrupts, crashes and resumes with every step once, a clear error for a tracker whose
package is missing, and rank 0 alone writing under `launch`.

Every run trains conftest's one-layer BERT (64 examples, batch 8: 8 steps an epoch) on one CPU thread, or, under
`launch`, a 4-feature linear regression on two processes.
"""
import importlib.metadata
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from nbtrain import Trainer, TrainerCallback, TrainingArguments, history_from, launch
from nbtrain.checkpoint import list_checkpoints
from nbtrain.tracking import LOG_FILE, PACKAGES, installed_trackers, read_log
from nbtrain.trainer import TrainingInterrupted

torch.set_num_threads(1)
TESTS = Path(__file__).resolve().parent


def make_trainer(tiny, out: Path, callbacks=(), eval_n: int = 0, model_seed: int = 0, **kw) -> Trainer:
    """A fresh model and Trainer each time: a resumed run shares nothing in memory with the run it continues (and
    starts from other weights, `model_seed=1`, so that only the checkpoint can make it end where the run would)."""
    args = dict(output_dir=str(out), per_device_train_batch_size=8, learning_rate=1e-2, seed=7, logging_steps=1,
                save_strategy="steps", save_steps=4, max_steps=12, report_to="none", disable_tqdm=True,
                eval_strategy="steps" if eval_n else "no", eval_steps=5 if eval_n else None)
    return Trainer(tiny.bert(dropout=0.1, seed=model_seed), TrainingArguments(**{**args, **kw}), train_dataset=tiny.dataset(64, seed=0),
                   eval_dataset=tiny.dataset(eval_n, seed=1) if eval_n else None, callbacks=list(callbacks))


def without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def values(records: list[dict]) -> list[dict]:
    "The records without what depends on the clock."
    return [{k: v for k, v in r.items() if k not in ("time", "peak_memory_mb") and not k.endswith(("_runtime", "_per_second"))}
            for r in records]


def loss_steps(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if "loss" in r]


def same_records(file_records: list[dict], log_history: list[dict]):
    "The file holds the run's log_history, record for record (a checkpoint's entries come back with sorted keys)."
    dump = lambda rs: [json.dumps(r, sort_keys=True) for r in rs]
    assert dump(without_time(file_records)) == dump(log_history)


# ---------------------------------------------------------------------------------------------- TensorBoard
def test_tensorboard_scalars_read_back_with_their_steps(tiny, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is a dev requirement: pip install -e '.[dev]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    # logs at steps 3, 6, 9 and 10 (the last step), evaluations at 5 and 10
    trainer = make_trainer(tiny, tmp_path / "out", eval_n=16, max_steps=10, logging_steps=3, report_to="tensorboard",
                           run_name="tb-run", save_strategy="no")
    trainer.train()
    assert trainer.accelerator.trackers == []  # ended with the run
    history = trainer.state.log_history

    run_dir = tmp_path / "out" / "runs" / "tb-run"  # logging_dir defaults to output_dir/runs; the run is named run_name
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    for tag, key in [("train/loss", "loss"), ("train/learning_rate", "learning_rate"), ("train/grad_norm", "grad_norm"),
                     ("eval/loss", "eval_loss"), ("train/train_loss", "train_loss")]:
        logged = [(h["step"], h[key]) for h in history if key in h]
        read = [(e.step, e.value) for e in ea.Scalars(tag)]
        assert [s for s, _ in read] == [s for s, _ in logged], tag
        assert [v for _, v in read] == pytest.approx([v for _, v in logged], rel=1e-6, abs=1e-12), tag  # float32 on disk
    assert [e.step for e in ea.Scalars("train/loss")] == [3, 6, 9, 10]
    assert [e.step for e in ea.Scalars("eval/loss")] == [5, 10]

    # the arguments, logged once as hyperparameters (Accelerate's tracker writes them to a sub-run)
    (hp_dir,) = {p.parent for p in run_dir.glob("*/events.out.tfevents.*")}
    hp = EventAccumulator(str(hp_dir))
    hp.Reload()
    info = plugin_data_pb2.HParamsPluginData.FromString(hp.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hparams = info.session_start_info.hparams
    assert hparams["learning_rate"].number_value == pytest.approx(1e-2)
    assert hparams["max_steps"].number_value == 10
    assert hparams["report_to"].string_value == "['tensorboard']"


def test_a_resumed_run_reports_to_the_same_tensorboard_run(tiny, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is a dev requirement: pip install -e '.[dev]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "out"
    make_trainer(tiny, out, callbacks=[StopAt(4)], report_to="tensorboard").train()  # named after the time it started
    (run_dir,) = (out / "runs").iterdir()
    from conftest import FirstStep
    resumed = make_trainer(tiny, out, callbacks=[first := FirstStep()], model_seed=1, report_to="tensorboard")
    resumed.train(resume_from_checkpoint=True)
    assert first.first == 5, f"the resumed run started at step {first.first}, not 5"
    assert [p.name for p in (out / "runs").iterdir()] == [run_dir.name]
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(1, 13))


# ---------------------------------------------------------------------------------------------- the JSON-lines file
class StopAt(TrainerCallback):
    def __init__(self, k): self.k = k
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.k: control.should_training_stop = True


class InterruptAt(TrainerCallback):
    "A real SIGINT at the end of step `k`, as the kernel's interrupt button sends."
    def __init__(self, k): self.k = k
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.k: os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("how", ["new-trainer", "same-trainer"])
def test_interrupt_and_resume_log_each_step_once_in_order(tiny, tmp_path, how):
    from conftest import FirstStep
    straight = make_trainer(tiny, tmp_path / "straight", eval_n=16)
    straight.train()
    out = tmp_path / "split"
    trainer = make_trainer(tiny, out, callbacks=[InterruptAt(7)], eval_n=16)  # checkpoint-4 saved, then interrupted in step 7
    with pytest.raises(TrainingInterrupted, match="interrupted at step 7"): trainer.train()
    assert loss_steps(read_log(out)) == list(range(1, 8))  # everything logged up to the interrupt is on disk
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-7"]

    first = FirstStep()
    if how == "new-trainer":
        trainer = make_trainer(tiny, out, callbacks=[first], eval_n=16)
    else:  # the next cell of the notebook: a plain train() continues the interrupted run
        trainer.remove_callback(InterruptAt)
        trainer.add_callback(first)
    # other weights than the run's (seed 1, not 0): only checkpoint-7 gives back step 7's
    trainer.model.load_state_dict(tiny.bert(dropout=0.1, seed=1).state_dict())
    if how == "new-trainer": trainer.train(resume_from_checkpoint=True)
    else: trainer.train()
    assert first.first == 8, f"the resumed run started at step {first.first}, not 8"
    records = read_log(out)
    assert loss_steps(records) == list(range(1, 13))
    assert [r["step"] for r in records if "eval_loss" in r] == [5, 10, 12]  # every 5 steps, and the last one
    same_records(records, trainer.state.log_history)
    # the same values as a run that was never interrupted (timings aside)
    assert values(records) == values(read_log(tmp_path / "straight"))
    assert records[-1].keys() >= {"train_runtime", "train_loss"}
    assert [r["time"] for r in records] == sorted(r["time"] for r in records)


CRASH = f"""
import os, signal, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {str(TESTS)!r})
from conftest import tiny_bert, keyword_dataset
from nbtrain import Trainer, TrainerCallback, TrainingArguments

class KillAt(TrainerCallback):
    "SIGKILL, as a crash or the OOM killer would: nothing after it runs, not even a finally block."
    def on_log(self, args, state, control, **kwargs):
        if state.global_step == 7: os.kill(os.getpid(), signal.SIGKILL)

args = TrainingArguments(output_dir=sys.argv[1], per_device_train_batch_size=8, learning_rate=1e-2, seed=7, logging_steps=1,
                         save_strategy="steps", save_steps=4, max_steps=12, report_to="none", disable_tqdm=True)
Trainer(tiny_bert(dropout=0.1, seed=0), args, train_dataset=keyword_dataset(64, seed=0), callbacks=[KillAt()]).train()
"""


def test_crash_keeps_the_log_and_the_resumed_run_drops_the_steps_it_redoes(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", CRASH, str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert loss_steps(read_log(out)) == list(range(1, 8))  # every record up to the crash, in another process's file
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4"]

    from conftest import FirstStep
    trainer = make_trainer(tiny, out, callbacks=[first := FirstStep()], model_seed=1)
    capsys.readouterr()
    trainer.train(resume_from_checkpoint=True)  # from step 4: steps 5..7 are logged again
    assert first.first == 5, f"the resumed run started at step {first.first}, not 5"
    assert "3 record(s) logged after the checkpoint of step 4 were dropped" in capsys.readouterr().out
    records = read_log(out)
    assert loss_steps(records) == list(range(1, 13))
    same_records(records, trainer.state.log_history)
    # after a kernel restart, the table trainer.history gave, from the file
    pd.testing.assert_frame_equal(history_from(out).drop(columns="time"), trainer.history, check_like=True)
    pd.testing.assert_frame_equal(Trainer.history_from(out), history_from(out))


def test_logging_strategies_and_the_switch(tiny, tmp_path):
    first = make_trainer(tiny, tmp_path / "first", logging_steps=5, logging_first_step=True, save_strategy="no")
    first.train()
    assert loss_steps(read_log(tmp_path / "first")) == [1, 5, 10, 12]
    by_epoch = make_trainer(tiny, tmp_path / "epoch", logging_strategy="epoch", max_steps=16, save_strategy="no")
    by_epoch.train()
    assert loss_steps(read_log(tmp_path / "epoch")) == [8, 16]
    none = make_trainer(tiny, tmp_path / "no", eval_n=16, logging_strategy="no", save_strategy="no")
    none.train()
    records = read_log(tmp_path / "no")
    assert loss_steps(records) == [] and [r["step"] for r in records if "eval_loss" in r] == [5, 10, 12]
    off = make_trainer(tiny, tmp_path / "off", log_to_file=False, save_strategy="no")
    off.train()
    assert not (tmp_path / "off" / LOG_FILE).exists()
    with pytest.raises(FileNotFoundError, match="log_to_file=True"): history_from(tmp_path / "off")


def test_a_new_run_in_the_same_output_dir_starts_a_new_log(tiny, tmp_path):
    make_trainer(tiny, tmp_path / "out", max_steps=8).train()
    trainer = make_trainer(tiny, tmp_path / "out", max_steps=6)
    trainer.train()  # not resumed: steps 1..6 again
    records = read_log(tmp_path / "out")
    assert loss_steps(records) == list(range(1, 7))
    same_records(records, trainer.state.log_history)


# ---------------------------------------------------------------------------------------------- any Accelerate tracker
@pytest.fixture
def recorder():
    "A tracker class registered with Accelerate (its own mechanism for custom trackers) that records what it gets."
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker, register_tracker_class

    class Recorder(GeneralTracker):
        name, requires_logging_directory, main_process_only = "recorder", False, True
        calls, fail_at = [], None
        def __init__(self, run_name: str, **kwargs):
            super().__init__()
            self.calls.append(("init", run_name))
        @property
        def tracker(self): return self
        def store_init_configuration(self, values: dict): self.calls.append(("config", values))
        def log(self, values: dict, step: int | None = None, **kwargs):
            if step == self.fail_at: raise ConnectionError("the tracking server went away")
            self.calls.append(("log", step, values))
        def finish(self): self.calls.append(("finish",))

    register_tracker_class(Recorder)
    yield Recorder
    del LOGGER_TYPE_TO_CLASS["recorder"]


def test_a_registered_tracker_gets_config_logs_in_order_and_the_end(tiny, tmp_path, recorder):
    trainer = make_trainer(tiny, tmp_path / "out", callbacks=[InterruptAt(6)], eval_n=16, logging_steps=2,
                           report_to="recorder", run_name="rec")
    with pytest.raises(TrainingInterrupted): trainer.train()
    kinds = [c[0] for c in recorder.calls]
    assert kinds[:2] == ["init", "config"] and kinds[-1] == "finish" and kinds.count("config") == 1
    assert recorder.calls[1][1]["learning_rate"] == 1e-2 and recorder.calls[1][1]["run_name"] == "rec"
    logs = [(c[1], sorted(c[2])) for c in recorder.calls if c[0] == "log"]
    assert [step for step, _ in logs] == [2, 4, 5, 6]  # in order, from the logging thread
    readouts = ["train/num_tokens", "train/peak_memory_mb", "train/tokens_per_second", "train/total_params",
                "train/trainable_params", "train/trainable_percent"]  # the first row of a run holds the parameter counts
    assert logs[0][1] == sorted(["train/epoch", "train/grad_norm", "train/learning_rate", "train/loss"] + readouts)
    assert "eval/loss" in logs[2][1]
    assert trainer.accelerator.trackers == []


def test_a_failing_tracker_fails_the_run(tiny, tmp_path, recorder):
    recorder.fail_at = 2  # then 5 more log steps, each some milliseconds later: the logging thread has long failed by then
    trainer = make_trainer(tiny, tmp_path / "out", logging_steps=2, report_to="recorder")
    with pytest.raises(RuntimeError, match="tracker failed to log: ConnectionError: the tracking server went away"):
        trainer.train()
    assert trainer.state.global_step > 2  # the log of step 2 failed in the logging thread; a later log step raised it
    assert recorder.calls[-1] == ("finish",)


# ---------------------------------------------------------------------------------------------- which trackers
def test_every_tracker_accelerate_knows_is_accepted():
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    assert set(PACKAGES) <= set(LOGGER_TYPE_TO_CLASS)
    for name in list(LOGGER_TYPE_TO_CLASS) + ["all"]:
        assert TrainingArguments(report_to=name).report_to == [name]


def importable(name: str) -> bool:
    """Whether the package of Accelerate's tracker `name` can be imported here, found with importlib alone (not with
    `installed_trackers`, which the tests below check): its module (for tensorboard, tensorboardX's also does), aim before 4.0."""
    modules = {"tensorboard": ("tensorboard", "tensorboardX")}.get(name, (name,))
    if not any(importlib.util.find_spec(m) is not None for m in modules): return False
    return name != "aim" or int(importlib.metadata.version("aim").split(".")[0]) < 4


INSTALLED = [name for name in PACKAGES if importable(name)]
MISSING = [name for name in PACKAGES if not importable(name)]


@pytest.mark.skipif(not MISSING, reason="every tracker package is installed here: none is missing to test with")
@pytest.mark.parametrize("name", MISSING or ["-"])
def test_missing_tracker_package_is_an_error_before_training(tiny, tmp_path, name):
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=name, max_steps=2, disable_tqdm=True)
    with pytest.raises(ImportError, match=rf"report_to='{name}' needs the '{PACKAGES[name]}' package.*pip install '{PACKAGES[name]}'"):
        Trainer(tiny.bert(seed=0), args, train_dataset=tiny.dataset(16))
    assert not (tmp_path / "out").exists()  # nothing ran: no log, no checkpoint, no tracker folder


def test_all_means_every_installed_tracker(tiny, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is a dev requirement: pip install -e '.[dev]'")
    assert "tensorboard" in INSTALLED
    assert sorted(installed_trackers()) == sorted(INSTALLED)  # no tracker class is registered with Accelerate here
    trainer = make_trainer(tiny, tmp_path / "out", report_to="all", max_steps=2)
    assert sorted(str(t) for t in trainer.accelerator.log_with) == sorted(INSTALLED)


# ---------------------------------------------------------------------------------------------- launch
class Regress(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x, labels=None):
        pred = self.lin(x).squeeze(-1)
        return {"logits": pred, "loss": nn.functional.mse_loss(pred, labels)} if labels is not None else {"logits": pred}


def _train_launched(model, out: str, report_to: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    data = [{"x": xi, "labels": float(xi.sum())} for xi in x]
    args = TrainingArguments(output_dir=out, max_steps=8, per_device_train_batch_size=8, learning_rate=0.05, logging_steps=1,
                             save_strategy="no", report_to=report_to, run_name="launched", seed=0, disable_tqdm=True)
    trainer = Trainer(model, args, train_dataset=data)
    trainer.train()
    return trainer.state.log_history


def test_under_launch_only_rank_0_logs(tmp_path):
    report_to = "tensorboard" if "tensorboard" in INSTALLED else "none"
    torch.manual_seed(0)
    history = launch(_train_launched, Regress(), str(tmp_path / "out"), report_to, num_processes=2)
    records = read_log(tmp_path / "out")
    assert loss_steps(records) == list(range(1, 9))  # once, not once per process
    same_records(records, history)
    if report_to == "tensorboard":
        run_dir = tmp_path / "out" / "runs" / "launched"
        assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
