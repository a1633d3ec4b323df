"""Faults during a run — a NaN loss, a full disk, a metric that raises, a collator that trips on a rare example, a
DataLoader worker that fails — and a long run: each gives a clear nbtrain error, keeps what was made, and leaves
nothing behind (no worker process, no growing memory).

The models are `tiny_train.TinyNet` (an MLP on 8 features) and variants of it that misbehave at a chosen step; nothing
here is mocked except the file-system calls that inject a disk fault (and a real full tmpfs where mounting one is
allowed). fp16 needs CUDA; without it, the fp16 tests give the fp16 Trainer's accelerator what CUDA would give it:
torch's float16 autocast and its real `GradScaler`, both on the CPU.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from torch import nn

from nbtrain import Trainer, TrainerCallback, TrainingArguments
from nbtrain.checkpoint import CheckpointWriteError, list_checkpoints, load_checkpoint, load_weights, read_weights
from nbtrain.data import DataError, EpochSampler, collate_tensors
from nbtrain.metrics import MetricError
from nbtrain.trainer import NonFiniteLossError, weights_finite

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from tiny_train import TinyNet, make_data  # noqa: E402

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------- helpers
class Outcome(TrainerCallback):
    "Records how `on_train_end` was fired: the dashboard's snapshot is drawn from the same event."
    def __init__(self): self.outcome = self.error = None
    def on_train_end(self, args, state, control, outcome="finished", error=None, **kwargs):
        self.outcome, self.error = outcome, error


class NanAt(TinyNet):
    "A TinyNet whose loss is NaN at the training steps in `steps` (counted in training forward calls)."
    def __init__(self, steps):
        super().__init__()
        self.steps, self.calls = set(steps), 0

    def forward(self, x, labels=None):
        out = super().forward(x, labels)
        if self.training and labels is not None:
            self.calls += 1
            if self.calls in self.steps: out["loss"] = out["loss"] * float("nan")
        return out


class _InfGrad(torch.autograd.Function):
    "Identity forward, infinite gradient backward: an overflow in the backward pass with a finite loss."
    @staticmethod
    def forward(ctx, x): return x.view_as(x)
    @staticmethod
    def backward(ctx, g): return g * float("inf")


class OverflowAt(TinyNet):
    "A TinyNet whose gradients overflow (inf) at the training steps in `steps`, while its loss stays finite."
    def __init__(self, steps):
        super().__init__()
        self.steps, self.calls = set(steps), 0

    def forward(self, x, labels=None):
        logits = self.body(x)
        if self.training and labels is not None:
            self.calls += 1
            if self.calls in self.steps: logits = _InfGrad.apply(logits)
        out = {"logits": logits}
        if labels is not None: out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def args(tmp_path=None, **kw) -> TrainingArguments:
    defaults = dict(output_dir=str(tmp_path / "out") if tmp_path else None, per_device_train_batch_size=8,
                    learning_rate=1e-2, lr_scheduler_type="constant", save_strategy="no", logging_steps=5,
                    disable_tqdm=True, seed=0, report_to="none")
    return TrainingArguments(**{**defaults, **kw})


def trainer(model, a, data=None, **kw) -> Trainer:
    torch.manual_seed(0)
    return Trainer(model, a, train_dataset=data if data is not None else make_data(64, seed=1), **kw)


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- NaN / inf
def test_nan_found_at_the_next_log_model_keeps_the_last_finite_step(tmp_path):
    torch.manual_seed(0); model = NanAt({8})
    outcome = Outcome()
    t = trainer(model, args(tmp_path, max_steps=20, save_strategy="steps", save_steps=5), callbacks=[outcome])
    with pytest.raises(NonFiniteLossError, match=r"loss is nan in steps 6-10 .*nan_check='step' finds the exact step.*"
                       r"training stopped at step 10. No update was applied from step 8 on: the model keeps the weights "
                       r"of step 7, the last finite one") as e:
        t.train()
    assert t.state.global_step == 10
    out = tmp_path / "out"
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-5"]  # kept, and nothing saved after the NaN
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert same(weights(t.model), weights(run_clean(max_steps=7).model))  # newer than the checkpoint: step 7's
    assert outcome.outcome == "failed" and outcome.error is e.value  # the dashboard's snapshot says failed
    assert any(h.get("loss") is not None for h in t.state.log_history)  # the logs before the NaN are kept


def test_weights_made_non_finite_otherwise_go_back_to_the_last_checkpoint(tmp_path):
    class PoisonAt(TrainerCallback):
        "Writes a NaN into the weights after step 8, past the optimizer: the guard cannot keep it out."
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 8:
                with torch.no_grad(): model.body[0].weight[0, 0] = float("nan")
    torch.manual_seed(0); model = TinyNet()
    t = trainer(model, args(tmp_path, max_steps=20, save_strategy="steps", save_steps=5), callbacks=[PoisonAt()])
    with pytest.raises(NonFiniteLossError, match=r"loss is nan in steps 6-10 .*training stopped at step 10.*not finite; "
                                                 r"they are now those of .*checkpoint-5"):
        t.train()
    out = tmp_path / "out"
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-5"]
    assert weights_finite(t.model)
    saved = read_weights(out / "checkpoint-5")
    assert all(torch.equal(t.model.state_dict()[k], v) for k, v in saved.items())


def test_nan_check_step_stops_before_the_bad_step(tmp_path):
    torch.manual_seed(0); model = NanAt({8})
    t = trainer(model, args(max_steps=20, nan_check="step"))
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 8 \(it is checked at every step.*training stopped at "
                                                 r"step 7.*step was not taken: the model keeps its finite weights of step 7"):
        t.train()
    assert t.state.global_step == 7
    # the weights are exactly those of a clean 7-step run
    torch.manual_seed(0); clean = TinyNet()
    straight = trainer(clean, args(max_steps=7))
    straight.train()
    assert same(weights(t.model), weights(straight.model))


def test_nan_never_saved_in_a_checkpoint(tmp_path):
    # logs every 10 steps, saves every 2: the NaN of step 3 is found when step 4 is about to be saved
    torch.manual_seed(0); model = NanAt({3})
    t = trainer(model, args(tmp_path, max_steps=20, logging_steps=10, save_strategy="steps", save_steps=2))
    with pytest.raises(NonFiniteLossError, match=r"in steps 1-4.*the model keeps the weights of step 2, the last finite one"):
        t.train()
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["checkpoint-2"]
    saved = read_weights(tmp_path / "out" / "checkpoint-2")
    assert all(torch.equal(t.model.state_dict()[k], v) for k, v in saved.items())


def test_nan_without_a_checkpoint_says_so():
    torch.manual_seed(0); model = NanAt({3})
    t = trainer(model, args(max_steps=20))
    with pytest.raises(NonFiniteLossError, match=r"in steps 1-5.*No update was applied from step 3 on: the model keeps the "
                                                 r"weights of step 2, the last finite one \(and the optimizer its state\)"):
        t.train()
    assert weights_finite(t.model)


def test_interrupt_after_a_nan_saves_no_checkpoint(tmp_path):
    class InterruptAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4: os.kill(os.getpid(), signal.SIGINT)  # the kernel's interrupt, at step 4
    torch.manual_seed(0); model = NanAt({3})
    outcome = Outcome()
    t = trainer(model, args(tmp_path, max_steps=20, logging_steps=10), callbacks=[InterruptAt(), outcome])
    with pytest.raises(NonFiniteLossError, match=r"in steps 1-4"):
        t.train()
    assert list_checkpoints(tmp_path / "out") == []
    assert outcome.outcome == "failed"


def test_nan_check_off_trains_through():
    torch.manual_seed(0); model = NanAt({3})
    t = trainer(model, args(max_steps=10, nan_check="off"))
    t.train()
    assert t.state.global_step == 10
    assert [h["loss"] != h["loss"] for h in t.state.log_history if "loss" in h] == [True, True]  # nan, logged as nan


# ---------------------------------------------------------------------------------------------- a non-finite step never reaches the weights
def run_clean(max_steps: int, optimizer=None, **kw) -> Trainer:
    "A run of `max_steps` steps of a clean TinyNet (the NaN runs' initial weights), arguments as `args(**kw)`."
    torch.manual_seed(0); model = TinyNet()
    t = trainer(model, args(max_steps=max_steps, **kw), optimizers=(optimizer(model), None) if optimizer else (None, None))
    t.train()
    return t


def optimizer_state(opt) -> list[dict]:
    "Per parameter, the optimizer's state tensors (AdamW: step, exp_avg, exp_avg_sq; SGD: momentum_buffer), cloned."
    return [{k: v.detach().clone() for k, v in st.items() if torch.is_tensor(v)} for st in opt.state_dict()["state"].values()]


def same_state(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def sgd(model): return torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)


GUARDED = {  # (arguments, the forward call made NaN: step 5's first micro-batch, an optimizer of the user's)
    "fused-adamw-no-output-dir": ({}, 5, None),
    "save-strategy-no": ({"output_dir": "out"}, 5, None),
    "accumulation": ({"gradient_accumulation_steps": 2}, 9, None),  # step 5 is forward calls 9 and 10
    "bf16-autocast": ({"bf16": True}, 5, None),
    "no-clipping": ({"max_grad_norm": 0}, 5, None),
    "adamw-not-fused": ({"optim": "adamw_torch"}, 5, None),  # skipped after a host read of the flag
    "users-sgd": ({}, 5, sgd),
}


@pytest.mark.parametrize("case", list(GUARDED))
def test_a_nan_step_never_reaches_the_weights_or_the_optimizer(case, tmp_path):
    kw, call, optimizer = GUARDED[case]
    if kw.get("output_dir"): kw = {**kw, "output_dir": str(tmp_path / "out")}
    torch.manual_seed(0); model = NanAt({call})
    dtypes = activation_dtypes(model)
    t = trainer(model, args(max_steps=20, logging_steps=10, **kw), optimizers=(optimizer(model), None) if optimizer else (None, None))
    with pytest.raises(NonFiniteLossError, match=r"loss is nan in steps 1-10 .*training stopped at step 10\. No update was "
                                                 r"applied from step 5 on: the model keeps the weights of step 4, the last finite one"):
        t.train()
    assert dtypes == ({torch.bfloat16} if kw.get("bf16") else {torch.float32}), dtypes
    if kw.get("output_dir"): assert list_checkpoints(tmp_path / "out") == []
    clean = run_clean(4, optimizer=optimizer, **{**kw, "output_dir": None})
    assert same(weights(t.model), weights(clean.model)), "the weights are not those of a run that stopped after step 4"
    assert same_state(optimizer_state(t.optimizer), optimizer_state(clean.optimizer)), "the optimizer moved on"
    if optimizer is None:  # AdamW's moments and its step count
        assert {k for st in optimizer_state(t.optimizer) for k in st} == {"step", "exp_avg", "exp_avg_sq"}
        assert all(st["step"].item() == 4 for st in optimizer_state(t.optimizer))


@pytest.mark.parametrize("clip", [1.0, 0.0], ids=["clipped", "no-clipping"])
def test_an_infinite_gradient_with_a_finite_loss_is_skipped_too(clip):
    # the loss stays finite, so the flag alone holds the later (finite) steps back, and the log step still stops the run
    torch.manual_seed(0); model = OverflowAt({5})
    t = trainer(model, args(max_steps=20, logging_steps=10, max_grad_norm=clip))
    with pytest.raises(NonFiniteLossError, match=r"gradients are not finite in steps 1-10, with a finite loss .*"
                                                 r"the model keeps the weights of step 4, the last finite one"):
        t.train()
    clean = run_clean(4, max_grad_norm=clip)
    assert same(weights(t.model), weights(clean.model))
    assert same_state(optimizer_state(t.optimizer), optimizer_state(clean.optimizer))

    torch.manual_seed(0); model = OverflowAt({5})
    t = trainer(model, args(max_steps=20, logging_steps=10, max_grad_norm=clip, nan_check="step"))
    with pytest.raises(NonFiniteLossError, match=r"gradients are not finite at step 5, with a finite loss \(it is checked "
                                                 r"at every step.*training stopped at step 4\. The step was not taken"):
        t.train()
    assert same(weights(t.model), weights(clean.model))


def test_nan_check_off_lets_the_nan_step_into_the_weights():
    "The control of the test above: without the guard, step 5's NaN reaches the weights and the moments."
    torch.manual_seed(0); model = NanAt({5})
    t = trainer(model, args(max_steps=10, logging_steps=10, nan_check="off"))
    t.train()
    assert not weights_finite(t.model)
    assert not all(torch.isfinite(st["exp_avg"]).all() for st in optimizer_state(t.optimizer))


def host_reads(steps: int, **kw) -> int:
    """The loop's reads of a tensor's value (`.item()`, `bool()`: aten::_local_scalar_dense) in a `train()` of one epoch.
    Reads inside torch's own CPU kernels (the fused AdamW reads its scalars on the CPU) run below the mode: not counted."""
    from torch.utils._python_dispatch import TorchDispatchMode
    class Count(TorchDispatchMode):
        n = 0
        def __torch_dispatch__(self, func, types, a=(), k=None):
            if func is torch.ops.aten._local_scalar_dense.default: self.n += 1
            return func(*a, **(k or {}))
    torch.manual_seed(0); model = TinyNet()
    t = trainer(model, args(max_steps=steps, logging_steps=1000, **kw), data=make_data(512, seed=1))
    with Count() as count: t.train()
    return count.n


@pytest.mark.parametrize("kw", [{}, {"max_grad_norm": 0}, {"gradient_accumulation_steps": 2}, {"bf16": True}],
                         ids=["default", "no-clipping", "accumulation", "bf16"])
def test_the_guard_reads_nothing_per_step(kw):
    # as many reads in 24 steps as in 4: none per step (the fused AdamW skips on the device)
    assert host_reads(24, **kw) == host_reads(4, **kw)


def test_nan_check_step_reads_every_step():
    "The counter's control: nan_check='step' reads the flag at every step."
    assert host_reads(24, nan_check="step") >= host_reads(4, nan_check="step") + 20


# ---------------------------------------------------------------------------------------------- fp16 overflow
def fp16_trainer(model, a: TrainingArguments) -> Trainer:
    """A Trainer of `model` with fp16=True. Without CUDA there is no fp16 (the arguments say it runs in float32, as
    transformers does, and 🤗 Accelerate makes neither a grad scaler nor a float16 autocast on the CPU): here the
    arguments answer `mixed_precision == "fp16"` as they would on a GPU, and the accelerator that `_make_accelerator`
    made for fp16 gets on the CPU what it would have on a GPU (`native_amp`: its `autocast()` is torch's float16
    autocast; torch's real GradScaler). The loop then autocasts, unscales, steps and updates exactly as under fp16;
    with CUDA nothing is patched but the scaler's starting scale."""
    if not torch.cuda.is_available():
        a.fp16 = True
        a.__class__ = type("AsOnAGPU", (type(a),), {"mixed_precision": property(lambda self: "fp16")})
    else: assert a.fp16
    t = trainer(model, a)
    acc = t.accelerator
    assert acc.mixed_precision == "fp16", f"fp16=True gave an accelerator with mixed_precision={acc.mixed_precision!r}"
    if acc.device.type == "cpu": acc.native_amp = True
    acc.scaler = torch.amp.GradScaler(acc.device.type, init_scale=2.0 ** 10)
    return t


def activation_dtypes(model) -> set:
    "The dtypes of the model's hidden activations in the training forward passes to come (the first layer's output)."
    seen = set()
    model.body[0].register_forward_hook(lambda m, i, o: seen.add(o.dtype) if m.training else None)
    return seen


def test_fp16_overflow_steps_are_counted_not_failures():
    torch.manual_seed(0); model = OverflowAt({3, 4, 12})
    t = fp16_trainer(model, args(max_steps=15, fp16=torch.cuda.is_available()))
    dtypes = activation_dtypes(model)
    out = t.train()
    assert dtypes == {torch.float16}, f"the forward ran in {dtypes}: not under fp16 autocast"
    logs = [h for h in t.state.log_history if "loss" in h]
    assert [h["skipped_steps"] for h in logs] == [2, 2, 3]  # cumulative, at steps 5, 10, 15
    assert out.metrics["train_skipped_steps"] == 3
    assert all(h["loss"] == h["loss"] for h in logs) and weights_finite(t.model)
    assert t.accelerator.scaler.get_scale() < 2.0 ** 10  # the scaler really backed off


def test_fp16_a_nan_loss_is_an_overflow_but_all_nan_is_a_failure():
    torch.manual_seed(0); model = NanAt({7})
    t = fp16_trainer(model, args(max_steps=10, fp16=torch.cuda.is_available()))
    dtypes = activation_dtypes(model)
    out = t.train()  # one NaN loss: its step is skipped, and it stays out of the logged loss
    assert dtypes == {torch.float16}, f"the forward ran in {dtypes}: not under fp16 autocast"
    assert out.metrics["train_skipped_steps"] == 1
    assert all(h["loss"] == h["loss"] for h in t.state.log_history if "loss" in h)

    torch.manual_seed(0); model = NanAt(range(6, 100))
    t = fp16_trainer(model, args(max_steps=20, fp16=torch.cuda.is_available()))
    with pytest.raises(NonFiniteLossError, match=r"in steps 6-10.*Under fp16 every step since the last log had a non-finite loss"):
        t.train()
    assert weights_finite(t.model)  # the scaler never applied a non-finite step


# ---------------------------------------------------------------------------------------------- disk faults
def fail_writes(name: str, err: int, from_step: int = 0):
    "Patch `Path.write_text`, the file-system write of the checkpoint's JSON files, to fail with `err` for `name`."
    write_text = Path.write_text
    def write(self, *a, **k):
        step = int(self.parent.name.split("-")[2]) if self.parent.name.startswith(".tmp-checkpoint-") else -1
        if self.name == name and step >= from_step: raise OSError(err, os.strerror(err), str(self))
        return write_text(self, *a, **k)
    return patch.object(Path, "write_text", write)


def check_after_failed_save(t: Trainer, out: Path, tmp_path: Path, kept: list[str]):
    assert [p.name for p in list_checkpoints(out)] == kept
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "the partial folder was left behind"
    for name in kept: load_checkpoint(out / name, TinyNet())  # complete and loadable
    # the trainer in memory is usable: its model saves elsewhere, and training continues from the last checkpoint
    t.save_model(tmp_path / "elsewhere")
    assert same(weights(load_weights(TinyNet(), tmp_path / "elsewhere")), weights(t.model))
    t.train(resume_from_checkpoint=True if kept else None)  # with the disk fixed: from the last checkpoint, or anew
    assert t.state.global_step == t.state.max_steps


def test_disk_full_partway_through_a_save(tmp_path):
    out = tmp_path / "out"
    outcome = Outcome()
    t = trainer(TinyNet(), args(tmp_path, max_steps=6, save_strategy="steps", save_steps=2), callbacks=[outcome])
    # weights and optimizer state are written, then trainer_state.json of checkpoint-4 meets a full disk
    with fail_writes("trainer_state.json", errno.ENOSPC, from_step=4), pytest.raises(CheckpointWriteError) as e:
        t.train()
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    msg = str(e.value)
    assert f"could not write checkpoint-4 in {out}: writing trainer_state.json failed with No space left on device" in msg
    assert "partial folder was removed and the earlier checkpoints are intact (checkpoint-2)" in msg
    assert "Training stopped at step 4" in msg and "trainer.save_model('another/folder')" in msg
    assert outcome.outcome == "failed" and t.state.global_step == 4
    check_after_failed_save(t, out, tmp_path, ["checkpoint-2"])


def test_permission_denied_on_the_checkpoint_folder(tmp_path):
    out = tmp_path / "out"
    t = trainer(TinyNet(), args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2))
    mkdir = os.mkdir
    def refuse(path, *a, **k):
        if Path(path).name.startswith(".tmp-checkpoint-"): raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return mkdir(path, *a, **k)
    with patch.object(os, "mkdir", refuse), pytest.raises(CheckpointWriteError, match=r"could not write checkpoint-2 .*"
                                                          r"Permission denied.*there is no earlier checkpoint") as e:
        t.train()
    assert e.value.errno == errno.EACCES
    check_after_failed_save(t, out, tmp_path, [])


@pytest.fixture
def tiny_disk(tmp_path):
    "A real 1 MiB tmpfs (needs root and a kernel that allows the mount; skipped elsewhere)."
    mnt = tmp_path / "disk"; mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0: pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try: yield mnt
    finally: subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_full_disk(tiny_disk, tmp_path):
    # 55k parameters: a checkpoint (weights, twice as much optimizer state, RNG) is ~690 KB: one fits in 1 MiB, two do not
    torch.manual_seed(0)
    t = Trainer(TinyNet(hidden=5000), args(max_steps=6, save_strategy="steps", save_steps=2, output_dir=str(tiny_disk / "out")),
                train_dataset=make_data(64, seed=1))
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint-4 .*No space left on device.*intact \(checkpoint-2\)") as e:
        t.train()
    assert e.value.errno == errno.ENOSPC
    out = tiny_disk / "out"
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    load_checkpoint(out / "checkpoint-2", TinyNet(hidden=5000))
    t.save_model(tmp_path / "elsewhere")  # another disk: works
    assert same(weights(load_weights(TinyNet(hidden=5000), tmp_path / "elsewhere")), weights(t.model))


# ---------------------------------------------------------------------------------------------- metric faults
def test_compute_metrics_raising_on_the_second_evaluation(tmp_path):
    calls = []
    def flaky(p):
        calls.append(1)
        if len(calls) == 2: return {"f1": {}["f1"]}
        return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}
    a = args(tmp_path, max_steps=9, eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=3)
    outcome = Outcome()
    torch.manual_seed(0); model = TinyNet()
    t = trainer(model, a, eval_dataset=make_data(16, seed=2), compute_metrics=flaky, callbacks=[outcome])
    with pytest.raises(MetricError, match=r"evaluation at step 6: compute_metrics \(flaky\) raised KeyError: 'f1'.*Training "
                                          r"stopped at step 6\. Its state is saved in .*checkpoint-6") as e:
        t.train()
    assert isinstance(e.value, ValueError) and isinstance(e.value.__cause__, KeyError)
    assert outcome.outcome == "failed" and t.state.global_step == 6
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["checkpoint-3", "checkpoint-6"]
    # usable in the next cell: evaluate again, then continue exactly where it stopped
    m = t.evaluate()
    assert "eval_accuracy" in m and t.state.log_history[-1]["step"] == 6
    t.train()
    assert t.state.global_step == 9
    torch.manual_seed(0); model = TinyNet()
    straight = trainer(model, args(tmp_path / "straight", max_steps=9, eval_strategy="steps", eval_steps=3),
                       eval_dataset=make_data(16, seed=2))
    straight.train()
    assert same(weights(t.model), weights(straight.model))


class Flaky:
    "A streaming metric (torchmetrics' interface) whose update raises once, at its first call after `armed` is set."
    def __init__(self): self.armed, self.n = False, 0
    def update(self, preds, target):
        if self.armed: self.armed = False; raise ValueError("target has an unexpected class")
        self.n += len(target)
    def compute(self): return torch.tensor(float(self.n))
    def reset(self): self.n = 0


class ArmAfterFirstEvaluation(TrainerCallback):
    "Arms the metric when the first evaluation is done: the second one fails."
    def __init__(self, metric): self.metric, self.seen = metric, 0
    def on_evaluate(self, args, state, control, **kwargs):
        self.seen += 1
        if self.seen == 1: self.metric.armed = True


def test_a_streaming_metric_that_raises():
    a = args(max_steps=8, eval_strategy="steps", eval_steps=4, per_device_eval_batch_size=4)
    flaky = Flaky()
    t = trainer(TinyNet(), a, eval_dataset=make_data(16, seed=2), metrics={"flaky": flaky},
                callbacks=[ArmAfterFirstEvaluation(flaky)])
    with pytest.raises(MetricError, match=r"evaluation at step 8: metrics\['flaky'\] \(Flaky\)\.update\(\) raised ValueError: "
                                          r"target has an unexpected class \(given predictions \(4, 2\) float32.*The model "
                                          r"in memory holds the weights of step 8"):
        t.train()
    assert t.state.global_step == 8
    assert t.evaluate()["eval_flaky"] == 16.0  # the next cell: the metric works again, the trainer is usable


# ---------------------------------------------------------------------------------------------- rare bad examples
RARE = 37  # the one example the collator cannot take


def rare_data(n: int = 64) -> list[dict]:
    return [dict(e, idx=i) for i, e in enumerate(make_data(n, seed=1))]


class IdxNet(TinyNet):
    "Takes the `idx` column too, so that it reaches the collator."
    def forward(self, x, labels=None, idx=None): return super().forward(x, labels)


def rare_collator(examples):
    "A user's collator that fails on one rare example."
    if any(e["idx"] == RARE for e in examples): raise ValueError(f"cannot collate example {RARE}")
    return collate_tensors(examples)


def test_collator_raising_on_a_rare_example():
    t = trainer(IdxNet(), args(max_steps=8), data=rare_data(), data_collator=rare_collator)
    with pytest.raises(DataError, match=r"step (\d+) \(batch (\d+) of epoch 0, train_dataset\); training stopped at step \d+: "
                                        r"building the batch failed: train_dataset: collating a batch failed in rare_collator "
                                        r"with ValueError: cannot collate example 37") as e:
        t.train()
    # the batch named is the one holding example 37 in this epoch's order (batch size 8, one batch per step)
    batch = EpochSampler(64, seed=0).order().index(RARE) // 8
    assert str(e.value).startswith(f"step {batch + 1} (batch {batch} of epoch 0, train_dataset)")
    assert t.state.global_step < batch + 1  # the steps before it were taken, not that one


def test_a_later_batch_with_a_label_out_of_range():
    data = make_data(64, seed=1)
    data[50]["labels"] = 7  # TinyNet has 2 classes
    t = trainer(TinyNet(), args(max_steps=8), data=data)
    with pytest.raises(DataError, match=r"step \d+ \(batch \d+ of epoch 0, train_dataset\); the model keeps the weights of step "
                                        r"\d+: the model failed on it with IndexError: Target 7 is out of bounds\. The batch: "
                                        r"x \(8, 8\) float32, labels \(8,\) int64 in \[0, 7\]"):
        t.train()


# ---------------------------------------------------------------------------------------------- hygiene
def children() -> set[int]:
    import psutil
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture
def ipython():
    "An IPython shell in this process (as in a terminal IPython), so that the dashboard can display; removed after."
    from IPython.core.interactiveshell import InteractiveShell
    shell = InteractiveShell.instance()
    try: yield shell
    finally: InteractiveShell.clear_instance()


def html_dashboard():
    "The notebook dashboard in HTML mode (IPython's rich display without widgets): it draws from a clock thread of its own."
    from nbtrain.dashboard import NotebookDashboard
    return NotebookDashboard(mode="html", interval=0.01)


def test_no_worker_left_after_a_failure_in_a_dataloader_worker(ipython, capsys):
    before_children, before_threads = children(), set(threading.enumerate())
    t = trainer(IdxNet(), args(max_steps=8, dataloader_num_workers=2), data=rare_data(), data_collator=rare_collator,
                callbacks=[html_dashboard()])
    with pytest.raises(DataError, match=r"cannot collate example 37.*\(in a DataLoader worker\)") as e:
        t.train()
    # `e` still holds the traceback, as IPython's last traceback does in a notebook: the workers must be gone anyway
    assert e.value.__cause__ is not None
    assert children() - before_children == set(), "DataLoader workers outlived the failed run"
    assert set(threading.enumerate()) - before_threads == set()


def test_no_thread_left_when_a_callback_refuses_to_start(ipython, capsys):
    from nbtrain import EarlyStoppingCallback
    before = set(threading.enumerate())
    t = trainer(TinyNet(), args(max_steps=4), callbacks=[html_dashboard(), EarlyStoppingCallback()])
    with pytest.raises(ValueError, match="EarlyStoppingCallback needs evaluations"):
        t.train()
    assert set(threading.enumerate()) - before == set()
    assert "failed at step 0 of 4: ValueError" in capsys.readouterr().out  # the dashboard's last state says so


def test_no_worker_left_after_a_run_with_workers():
    before = children()
    t = trainer(TinyNet(), args(max_steps=12, dataloader_num_workers=2, eval_strategy="steps", eval_steps=6),
                eval_dataset=make_data(16, seed=2))
    t.train()
    assert children() - before == set()


MEMORY_CELL = """
import gc, json, psutil, sys
sys.path.insert(0, {tests!r})
from tiny_train import make_trainer
from nbtrain import TrainerCallback

class Memory(TrainerCallback):
    "Resident memory of this kernel every 1,000 steps."
    def __init__(self): self.rss, self.proc = {{}}, psutil.Process()
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % 1000 == 0: self.rss[state.global_step] = self.proc.memory_info().rss

memory = Memory()
trainer = make_trainer(max_steps=20000, eval_steps=2000, logging_steps=10, callbacks=[memory])
trainer.train()
progress = next(cb for cb in trainer.callbacks if hasattr(cb, "mode"))
print("RSS", json.dumps({{"rss": memory.rss, "progress": type(progress).__name__, "mode": progress.mode,
                         "logs": len(trainer.state.log_history)}}))
"""


def test_memory_stays_flat_over_20000_steps_with_the_dashboard():
    "A 20,000-step run in a real kernel, the widget dashboard drawing it, logging every 10 steps."
    pytest.importorskip("psutil"); pytest.importorskip("ipywidgets")
    from kernel_session import execute, running_kernel
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    with running_kernel(TESTS.parent, env=env) as (km, kc):
        msgs = execute(kc, MEMORY_CELL.format(tests=str(TESTS)), timeout=600)
    err = next((m["content"] for m in msgs if m["msg_type"] == "error"), None)
    assert err is None, f"{err['ename']}: {err['evalue']}"
    out = "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream")
    report = json.loads(out.split("RSS ", 1)[1].splitlines()[0])
    assert report["progress"] == "NotebookDashboard" and report["mode"] == "widgets"
    assert report["logs"] >= 2000
    rss = {int(k): v for k, v in report["rss"].items()}
    growth = (rss[20000] - rss[1000]) / 2**20
    print(f"resident memory from step 1,000 to 20,000: {rss[1000] / 2**20:.1f} MB -> {rss[20000] / 2**20:.1f} MB "
          f"({growth:+.1f} MB)")
    assert growth < 50, {k: round(v / 2**20, 1) for k, v in sorted(rss.items())}
