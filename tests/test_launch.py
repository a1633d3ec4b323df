"""`launch`: real multi-process data parallelism from a notebook (gloo on CPUs), one dashboard in the parent, the
trained weights back in the caller's model, child failures raised with their traceback, and mixed precision.

Everything runs on the CPU with tiny models (a 4-feature linear regression, a few steps), two processes at most,
one torch thread each. The notebook tests run one real ipykernel through nbclient, so what they see is what a
saved notebook holds. `bench/gpu_check.py` (the GPU check) is exercised here through `--help` and `--cpu-smoke`.
"""
from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import torch._dynamo  # noqa: F401  torch's optimizers import it lazily; imported once here, not in every forked child
from torch import nn

psutil = pytest.importorskip("psutil")

from nbtrain import Trainer, TrainingArguments, launch
from nbtrain.launch import LaunchError

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONPATH": os.pathsep.join(
           [str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}

N, GLOBAL_BATCH, STEPS = 64, 16, 8   # 4 steps an epoch: two epochs, each rank 8 examples a step
# A hang guard, not a speed claim: how long a wait here may last before the test calls it a hang and ends it. Each wait
# it bounds ends within seconds even on a loaded 2-core machine; reaching it means something is stuck (a rank left
# waiting in an all-reduce, whose gloo timeout is 30 minutes; a child that outlived its parent).
HANG_GUARD_S = 120


# ---------------------------------------------------------------------------------------------- model and data
class Regress(nn.Module):
    """Linear regression that records, for every training forward, the example ids of its batch and the autocast
    state it ran under. `idx` is a forward argument so that the Trainer keeps the column (and the model ignores it)."""
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.seen: list[list[int]] = []
        self.autocast: list[tuple] = []

    def forward(self, x, labels=None, idx=None):
        pred = self.lin(x).squeeze(-1)
        if self.training and torch.is_grad_enabled():  # not the Trainer's preflight (eval mode, no grad)
            if idx is not None: self.seen.append(idx.tolist())
            self.autocast.append((torch.is_autocast_enabled("cpu"), str(torch.get_autocast_dtype("cpu")), str(pred.dtype)))
        out = {"logits": pred}
        if labels is not None: out["loss"] = nn.functional.mse_loss(pred.float(), labels)
        return out


def make_data(n: int = N) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])
    return [{"x": xi, "labels": float(xi @ w + 1), "idx": i} for i, xi in enumerate(x)]


def make_model(seed: int = 0) -> Regress:
    torch.manual_seed(seed)
    return Regress()


def make_args(world: int = 1, **kw) -> TrainingArguments:
    defaults = dict(output_dir=None, max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // world, learning_rate=0.05,
                    logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True)
    return TrainingArguments(**{**defaults, **kw})


def losses(log_history: list[dict]) -> list[float]:
    return [h["loss"] for h in log_history if "loss" in h]


def child_pids() -> set[int]:
    "Live (not zombie) descendants of this process."
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE: out.add(p.pid)
        except psutil.NoSuchProcess: pass
    return out


@pytest.fixture(autouse=True)
def one_thread():
    "Two cores are shared: the in-process runs use one thread too (children set their own)."
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- 1. data parallelism
def _train_and_report(model: Regress, out_dir: str, data: list[dict]):
    "The function `launch` runs: trains with the global batch split over the ranks, writes what this rank saw."
    import torch.distributed as dist
    from accelerate import PartialState
    state = PartialState()
    world = state.num_processes
    trainer = Trainer(model, make_args(world), train_dataset=data)
    out = trainer.train()
    report = {"rank": state.process_index, "num_processes": world, "dist_initialized": dist.is_initialized(),
              "dist_world": dist.get_world_size() if dist.is_initialized() else None,
              "dist_backend": dist.get_backend() if dist.is_initialized() else None,
              "env_rank": os.environ.get("RANK"), "distributed_type": str(state.distributed_type),
              "trainer_processes": trainer.accelerator.num_processes, "seen": model.seen, "global_step": out.global_step}
    Path(out_dir, f"rank{state.process_index}.json").write_text(json.dumps(report))
    return {"world": world, "global_step": out.global_step, "loss": out.training_loss,
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def test_two_processes_split_every_global_batch_and_match_one_process(tmp_path):
    data = make_data()
    model, alone = make_model(), make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pids = child_pids()

    result = launch(_train_and_report, model, str(tmp_path), data, num_processes=2)

    assert child_pids() <= pids, "launch left child processes behind"
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, rep in enumerate(reports):
        assert rep["rank"] == r and rep["env_rank"] == str(r)
        assert rep["num_processes"] == 2 and rep["trainer_processes"] == 2, rep
        assert rep["dist_initialized"] and rep["dist_world"] == 2 and rep["dist_backend"] == "gloo", rep
        assert rep["distributed_type"] == "DistributedType.MULTI_CPU", rep
        assert rep["global_step"] == STEPS and len(rep["seen"]) == STEPS, rep
        assert all(len(b) == GLOBAL_BATCH // 2 for b in rep["seen"]), rep["seen"]

    # what one process sees with the whole global batch, from the same initial weights
    out = Trainer(alone, make_args(1), train_dataset=data).train()
    assert len(alone.seen) == STEPS

    r0, r1 = reports[0]["seen"], reports[1]["seen"]
    for step, (a, b, whole) in enumerate(zip(r0, r1, alone.seen)):
        assert not set(a) & set(b), f"step {step}: both ranks trained on {sorted(set(a) & set(b))}"
        assert sorted(a + b) == sorted(whole), f"step {step}: ranks saw {sorted(a + b)}, one process {sorted(whole)}"
    for epoch in range(STEPS * GLOBAL_BATCH // N):  # each epoch covers the data once, split in halves
        per_epoch = N // GLOBAL_BATCH
        e0 = {i for b in r0[epoch * per_epoch:(epoch + 1) * per_epoch] for i in b}
        e1 = {i for b in r1[epoch * per_epoch:(epoch + 1) * per_epoch] for i in b}
        assert not e0 & e1 and e0 | e1 == set(range(N)) and len(e0) == len(e1) == N // 2, (epoch, sorted(e0), sorted(e1))

    # rank 0's result came back, and its trained weights are in the model passed in
    assert result["world"] == 2 and result["global_step"] == STEPS
    trained = model.state_dict()
    for k in before:
        assert not torch.equal(trained[k], before[k]), f"{k} did not change in the caller's model"
        assert torch.equal(trained[k], result["weights"][k]), f"{k}: the caller's model is not rank 0's final weights"
        assert torch.allclose(trained[k], alone.state_dict()[k], atol=1e-6, rtol=0), \
            f"{k}: 2 processes {trained[k]} vs 1 process {alone.state_dict()[k]}"
    assert abs(result["loss"] - out.training_loss) < 1e-5, (result["loss"], out.training_loss)


class Tagger(nn.Module):
    "Per-token classes with a mean cross-entropy over the labelled tokens (-100 ignored), as token classifiers and LMs have."
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(16, 8), nn.Linear(8, 4)

    def forward(self, input_ids, labels=None):
        logits = self.head(self.emb(input_ids))
        out = {"logits": logits}
        if labels is not None: out["loss"] = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return out


def tagging_data(n: int = N) -> list[dict]:
    "Sequences of 6 tokens whose last 0-5 labels are -100: the ranks' micro-batches hold different numbers of labelled tokens."
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 16, (n, 6), generator=g)
    kept = torch.randint(1, 7, (n,), generator=g)
    return [{"input_ids": ids[i], "labels": torch.where(torch.arange(6) < kept[i], ids[i] % 4, -100)} for i in range(n)]


def _train_tagger(model: Tagger, ga: int):
    from accelerate import PartialState
    world = PartialState().num_processes
    args = make_args(world, per_device_train_batch_size=GLOBAL_BATCH // world // ga, gradient_accumulation_steps=ga, learning_rate=0.5)
    out = Trainer(model, args, train_dataset=tagging_data()).train()
    return out.training_loss


@pytest.mark.parametrize("ga", [1, 2], ids=["no-accumulation", "accumulation-2"])
def test_token_losses_average_over_every_process(ga):
    # Each rank's mean is over its own labelled tokens; averaging the ranks' gradients weighs a token on a rank with
    # few of them more than one on a rank with many. The step's loss is the mean over all labelled tokens of the
    # global batch, as one process computes it (and transformers' average_tokens_across_devices).
    torch.manual_seed(0); model = Tagger()
    torch.manual_seed(0); alone = Tagger()
    loss = launch(_train_tagger, model, ga, num_processes=2)
    alone_loss = _train_tagger(alone, ga)
    # the sums run in another order: ~2e-6 apart after 8 steps at lr 0.5; with per-rank means, 0.26 and more
    for (k, a), b in zip(model.state_dict().items(), alone.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), f"{k}: 2 processes differ from 1 by {(a - b).abs().max():.3g}"
    assert loss == pytest.approx(alone_loss, abs=1e-5)


class Tied(nn.Module):
    "Input embedding and output layer share one weight, as in GPT-2, BERT's MLM head, T5 and most language models."
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(8, 4), nn.Linear(4, 8, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, input_ids, labels=None):
        logits = self.head(self.emb(input_ids))
        return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)} if labels is not None else {"logits": logits}


def _train_tied(model: Tied):
    data = [{"input_ids": i % 8, "labels": (i + 1) % 8} for i in range(32)]
    Trainer(model, make_args(1, max_steps=4, learning_rate=0.1), train_dataset=data).train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_model_with_tied_weights_comes_back_trained():
    "Tied weights are two state_dict entries for one tensor: launch must still bring the trained model back."
    torch.manual_seed(0)
    model = Tied()
    before = model.emb.weight.detach().clone()
    final = launch(_train_tied, model, num_processes=1)
    assert model.head.weight is model.emb.weight, "the weights are no longer tied in the caller's model"
    assert not torch.equal(model.emb.weight, before), "the caller's model was not trained"
    assert torch.equal(model.emb.weight, final["emb.weight"]) and torch.equal(model.head.weight, final["head.weight"])


# ---------------------------------------------------------------------------------------------- 3. a failing child
def _fail_on_rank_1(model: Regress, data: list[dict]):
    "Rank 1 raises in its third training forward, while rank 0 waits for it in the gradient all-reduce."
    rank = int(os.environ["RANK"])
    original = model.forward

    def forward_that_breaks(**batch):
        if rank == 1 and len(model.seen) >= 2: raise_the_child_error(len(model.seen))
        return original(**batch)
    model.forward = forward_that_breaks
    Trainer(model, make_args(2), train_dataset=data).train()


def raise_the_child_error(step: int):
    raise ValueError(f"boom on rank {os.environ['RANK']} at step {step}")


def test_child_error_raised_with_its_traceback_and_no_process_left():
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pids = child_pids()
    hung = []

    def end_the_hang():
        "launch left rank 0 waiting for rank 1 in the all-reduce: end the processes it started, so the test fails, not hangs."
        hung.append(sorted(child_pids() - pids))
        for pid in hung[0]:
            try: os.kill(pid, signal.SIGKILL)
            except ProcessLookupError: pass
    guard = threading.Timer(HANG_GUARD_S, end_the_hang)
    guard.start()
    try:
        with pytest.raises(LaunchError) as info:
            launch(_fail_on_rank_1, model, make_data(), num_processes=2)
    finally:
        guard.cancel()
    assert not hung, f"launch did not stop the other rank: the hang guard ({HANG_GUARD_S} s) ended processes {hung[0]}"
    text = str(info.value)
    assert "rank 1 of 2" in text, text
    assert "ValueError: boom on rank 1 at step 2" in text, text
    assert "Traceback (most recent call last)" in text and "raise_the_child_error" in text \
        and "forward_that_breaks" in text, text
    assert child_pids() <= pids, f"left behind: {child_pids() - pids}"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "a failed run changed the caller's model"


# ---------------------------------------------------------------------------------------------- 4. bf16 on the CPU
def _autocast_states(model: Regress) -> set[tuple]:
    return set(model.autocast)


def full_loss(model: Regress, data: list[dict]) -> float:
    "MSE on all the data, in fp32 without autocast: the yardstick for 'the loss decreased'."
    x, y = torch.stack([d["x"] for d in data]), torch.tensor([d["labels"] for d in data])
    with torch.no_grad(), torch.autocast("cpu", enabled=False): return float(nn.functional.mse_loss(model.lin(x).squeeze(-1), y))


def learned(ls: list[float]) -> bool:
    "Finite logged losses whose last three average under half the first three."
    return len(ls) == 12 and all(torch.isfinite(torch.tensor(ls))) and sum(ls[-3:]) < 0.5 * sum(ls[:3])


BF16 = (True, "torch.bfloat16", "torch.bfloat16")   # autocast on, its dtype, the dtype of the Linear's output


def test_bf16_trainer_on_cpu_runs_forward_under_autocast_and_learns():
    model, data = make_model(), make_data()
    start = full_loss(model, data)
    trainer = Trainer(model, make_args(1, bf16=True, max_steps=12, learning_rate=0.3), train_dataset=data)
    assert trainer.accelerator.mixed_precision == "bf16"
    trainer.train()
    assert _autocast_states(model) == {BF16}, model.autocast[:3]
    assert learned(losses(trainer.state.log_history)), trainer.state.log_history
    assert full_loss(model, data) < 0.5 * start, (start, full_loss(model, data))
    assert all(p.dtype == torch.float32 for p in model.parameters()), "mixed precision must keep fp32 master weights"


def test_fp32_trainer_after_a_bf16_one_on_the_same_model_runs_in_fp32():
    "`bf16=False` means fp32, even for a model that an earlier bf16 Trainer trained in this notebook."
    model = make_model()
    Trainer(model, make_args(1, bf16=True, max_steps=2), train_dataset=make_data()).train()
    model.autocast.clear()
    Trainer(model, make_args(1, max_steps=2), train_dataset=make_data()).train()
    assert _autocast_states(model) == {(False, "torch.bfloat16", "torch.float32")}, model.autocast
    with torch.no_grad(): y = model(x=torch.randn(2, 4))["logits"]
    assert y.dtype == torch.float32


def _bf16_report(model: Regress, out_dir: str, data: list[dict]):
    from accelerate import PartialState
    rank, world = PartialState().process_index, PartialState().num_processes
    trainer = Trainer(model, make_args(world, max_steps=12, learning_rate=0.3), train_dataset=data)  # plain: no fp16 / bf16
    trainer.train()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "precision": trainer.accelerator.mixed_precision, "autocast": sorted(map(list, _autocast_states(model))),
        "losses": losses(trainer.state.log_history)}))
    return losses(trainer.state.log_history)


def test_bf16_through_launch_reaches_every_child(tmp_path):
    model, data = make_model(), make_data()
    start = full_loss(model, data)
    ls = launch(_bf16_report, model, str(tmp_path), data, num_processes=2, mixed_precision="bf16")
    for r in range(2):
        rep = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert rep["precision"] == "bf16", (r, rep)
        assert rep["autocast"] == [list(BF16)], (r, rep["autocast"])
    assert learned(ls), ls
    assert full_loss(model, data) < 0.5 * start, (start, full_loss(model, data))  # the weights that came back


# ---------------------------------------------------------------------------------------------- 4b. what comes back, and what can go wrong
def _train_keyword(data: list[dict], model: Regress = None):
    trainer = Trainer(model, make_args(1, max_steps=4), train_dataset=data)
    trainer.evaluate(data[:8])  # a baseline before training: relayed from the child before any on_train_begin
    trainer.train()
    return "ok"


def test_a_model_passed_by_keyword_comes_back_trained():
    model, data = make_model(), make_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert launch(_train_keyword, data, model=model, num_processes=2) == "ok"
    assert not any(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _return_a_lambda(model: Regress):
    Trainer(model, make_args(1, max_steps=2), train_dataset=make_data()).train()
    return lambda: None


def test_a_result_that_cannot_come_back_is_an_error_not_a_hang():
    # the queue pickles in a background thread, where a failure is only printed: the parent would wait forever
    pids = child_pids()
    with pytest.raises(LaunchError, match="what fn returned cannot be sent back to the notebook.*lambda"):
        launch(_return_a_lambda, make_model(), num_processes=2)
    assert child_pids() <= pids


INTERRUPTED = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_launch import Regress, make_args, make_data, make_model
    from nbtrain import Trainer, launch
    from nbtrain.trainer import TrainingInterrupted

    class Announce:
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 20 and state.is_world_process_zero: print("STEP 20", flush=True)

    def fn(model, out):
        from nbtrain import TrainerCallback
        cb = type("A", (TrainerCallback,), {{"on_step_end": Announce.on_step_end}})()
        args = make_args(2, max_steps={steps}, output_dir=out, save_strategy="no", logging_steps=1000, learning_rate=1e-3)
        Trainer(model, args, train_dataset=make_data(), callbacks=[cb]).train()
        return "finished"

    try: print("RESULT", launch(fn, make_model(), sys.argv[1], num_processes=2), flush=True)
    except TrainingInterrupted as e: print("INTERRUPTED", e, flush=True)
""")


def test_kernel_interrupt_stops_every_rank_at_one_step_and_saves(tmp_path):
    # Jupyter's interrupt sends SIGINT to the kernel's whole process group, children included. The ranks step in lock-step
    # (each step's gradients are averaged), so they must all stop at the same step, or one waits forever for the others.
    steps = 100_000 // 16  # long enough never to finish on its own
    script = tmp_path / "run.py"
    script.write_text(INTERRUPTED.format(tests=str(TESTS), steps=steps))
    out = str(tmp_path / "out")
    p = subprocess.Popen([sys.executable, str(script), out], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=ENV, start_new_session=True)
    seen = []
    for line in p.stdout:
        seen.append(line)
        if line.startswith("STEP 20"): break
    os.killpg(p.pid, signal.SIGINT)  # what the interrupt button does
    rest, _ = p.communicate(timeout=HANG_GUARD_S)
    said = "".join(seen) + rest
    assert "INTERRUPTED Training interrupted at step" in said, said[-3000:]
    step = int(said.split("INTERRUPTED Training interrupted at step ")[1].split()[0])
    assert (tmp_path / "out" / f"checkpoint-{step}" / "COMPLETE").is_file(), said[-3000:]
    assert "launch again with train(resume_from_checkpoint=True)" in said
    gone = subprocess.run(["pgrep", "-g", str(p.pid)], capture_output=True, text=True).stdout.split()
    assert not gone, f"processes left in the group: {gone}"


TWO_RUNS = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_launch import make_args, make_data, make_model
    from nbtrain import Trainer, TrainerCallback, launch
    from nbtrain.trainer import TrainingInterrupted

    class Second(TrainerCallback):
        "The second run's set-up takes a while (a bigger model, a first batch from disk): the interrupt lands there."
        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero: print("SECOND RUN BEGINS", flush=True)
            time.sleep(2)

    def fn(model, out):
        first = make_args(2, max_steps=300, logging_steps=1000, learning_rate=1e-3)
        Trainer(model, first, train_dataset=make_data()).train()
        second = make_args(2, max_steps=10**6, output_dir=out, save_strategy="no", logging_steps=1000, learning_rate=1e-3)
        Trainer(model, second, train_dataset=make_data(), callbacks=[Second()]).train()

    try: launch(fn, make_model(), sys.argv[1], num_processes=2)
    except TrainingInterrupted as e: print("INTERRUPTED", e, flush=True)
""")


def test_an_interrupt_between_two_runs_stops_the_second_at_its_start(tmp_path):
    # fn trains twice; the ranks' last recorded steps are the first run's (300), which must not become the second's
    # stopping point: it stops within its first two steps
    script = tmp_path / "run.py"
    script.write_text(TWO_RUNS.format(tests=str(TESTS)))
    p = subprocess.Popen([sys.executable, str(script), str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=ENV, start_new_session=True)
    seen = []
    for line in p.stdout:
        seen.append(line)
        if line.startswith("SECOND RUN BEGINS"): break
    os.killpg(p.pid, signal.SIGINT)
    rest, _ = p.communicate(timeout=HANG_GUARD_S)
    said = "".join(seen) + rest
    assert "INTERRUPTED Training interrupted at step" in said, said[-3000:]
    step = int(said.split("INTERRUPTED Training interrupted at step ")[1].split()[0])
    assert 1 <= step <= 2, said[-3000:]


def _train_forever(model: Regress, out: str):
    args = make_args(2, max_steps=10**7, output_dir=out, save_strategy="no", logging_steps=1)
    Trainer(model, args, train_dataset=make_data()).train()


KILLED = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_launch import _train_forever, make_model
    from nbtrain import launch
    launch(_train_forever, make_model(), sys.argv[1], num_processes=2)
""")


def test_children_die_with_a_killed_notebook(tmp_path):
    # the kernel killed outright (kill -9, the OOM killer): nothing in it can stop its children, so they must notice
    script = tmp_path / "run.py"
    script.write_text(KILLED.format(tests=str(TESTS)))
    log = tmp_path / "out" / "log.jsonl"
    p = subprocess.Popen([sys.executable, str(script), str(tmp_path / "out")], env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while time.monotonic() < deadline and not (log.is_file() and log.stat().st_size):  # training has begun
            time.sleep(0.1)
        children = [c.pid for c in psutil.Process(p.pid).children()]
        assert len(children) == 2, children
    finally:
        os.kill(p.pid, signal.SIGKILL); p.wait()
    alive = lambda: [c for c in children if psutil.pid_exists(c) and psutil.Process(c).status() != psutil.STATUS_ZOMBIE]
    deadline = time.monotonic() + HANG_GUARD_S  # they are killed at once; a loaded machine may take a while to run them
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = alive()
    for c in left: os.kill(c, signal.SIGKILL)
    assert not left, f"children {left} kept running after the notebook's process was killed"


# ---------------------------------------------------------------------------------------------- 5. CUDA guard
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: launch refuses only when CUDA is initialised")
def test_launch_refuses_after_cuda_was_initialised():
    # in a fresh interpreter: initialising CUDA here would make every later fork in this test process unsafe
    code = textwrap.dedent("""
        import torch
        from nbtrain import launch
        torch.zeros(1, device="cuda")
        try: launch(print, num_processes=1)
        except RuntimeError as e: print("REFUSED:", e)
        else: print("NOT REFUSED")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=ENV, cwd=ROOT)
    assert "REFUSED: launch: CUDA is already initialised" in out.stdout, out.stdout + out.stderr
    assert "inside the function you pass to launch" in out.stdout


# ---------------------------------------------------------------------------------------------- 2. a real kernel
NB_SETUP = f"""
import json, os, sys, time
import psutil, torch
sys.path.insert(0, {str(TESTS)!r})
from torch import nn
from safetensors.torch import save_file, load_file
from nbtrain import Trainer, TrainingArguments, launch
torch.set_num_threads(1)
import torch._dynamo  # the optimizer imports it lazily; imported here, the forked children need not (3 s each)

class Net(nn.Module):  # defined in the notebook: fork, not pickling, carries it to the children
    def __init__(self): super().__init__(); self.lin = nn.Linear(4, 1)
    def forward(self, x, labels=None):
        y = self.lin(x).squeeze(-1)
        return {{"logits": y, **({{"loss": nn.functional.mse_loss(y, labels)}} if labels is not None else {{}})}}

g = torch.Generator().manual_seed(0)
data = [{{"x": x, "labels": float(x.sum())}} for x in torch.randn(64, 4, generator=g)]

def train(model, steps=8):
    from accelerate import PartialState
    st = PartialState()
    args = TrainingArguments(output_dir=None, max_steps=steps, per_device_train_batch_size=16 // st.num_processes,
                             learning_rate=0.05, logging_steps=2, save_strategy="no", report_to="none", seed=0)
    Trainer(model, args, train_dataset=data).train()
    save_file({{k: v.contiguous() for k, v in model.state_dict().items()}}, f"rank{{st.process_index}}.safetensors")
    return st.num_processes

def broken(model):
    if os.environ["RANK"] == "1": raise KeyError("rank 1 has no shard")
    return train(model, steps=1000)  # rank 0 blocks in its first all-reduce until launch stops it

def breaks_midway(model):  # rank 1 fails at step 3, after rank 0's dashboard is up; rank 0 then waits in its all-reduce
    from nbtrain import TrainerCallback
    class Break(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if os.environ["RANK"] == "1" and state.global_step == 3: time.sleep(0.5); raise RuntimeError("rank 1 broke at step 3")
    from accelerate import PartialState
    args = TrainingArguments(output_dir=None, max_steps=1000, per_device_train_batch_size=8, learning_rate=0.05,
                             logging_steps=1, save_strategy="no", report_to="none", seed=0)
    Trainer(model, args, train_dataset=data, callbacks=[Break()]).train()

def children():
    return sorted(p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE)

torch.manual_seed(0); model = Net()
before = {{k: v.clone() for k, v in model.state_dict().items()}}
kids_before = children()
"""
NB_LAUNCH = "world = launch(train, model, num_processes=2)"
NB_AFTER = """
saved = load_file("rank0.safetensors")
now = model.state_dict()
print(json.dumps({"world": world,
                  "changed": all(not torch.equal(now[k], before[k]) for k in now),
                  "equals_rank0": now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in now),
                  "rank1_equal": all(torch.equal(v, load_file("rank1.safetensors")[k]) for k, v in saved.items()),
                  "kids": children(), "kids_before": kids_before}))
"""
NB_BROKEN = "weights = {k: v.clone() for k, v in model.state_dict().items()}\nlaunch(broken, model, num_processes=2)"
NB_AFTER_BROKEN = """
print(json.dumps({"kids": children(), "kids_before": kids_before,
                  "unchanged": all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())}))
"""
NB_MIDWAY = "launch(breaks_midway, model, num_processes=2)"
NB_AFTER_MIDWAY = "print(json.dumps({'kids': children(), 'kids_before': kids_before}))"


@pytest.fixture(scope="module")
def notebook(tmp_path_factory):
    "Run the notebook once in a real ipykernel; every iopub message of every cell is kept beside the saved outputs."
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipywidgets")
    path = tmp_path_factory.mktemp("launch_nb")
    cells = [NB_SETUP, NB_LAUNCH, NB_AFTER, NB_BROKEN, NB_AFTER_BROKEN, NB_MIDWAY, NB_AFTER_MIDWAY]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.cells[3].metadata["tags"] = nb.cells[5].metadata["tags"] = ["raises-exception"]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    messages: dict[int, list[dict]] = {}

    class Recording(nbclient.NotebookClient):
        def process_message(self, msg, cell, cell_index):
            messages.setdefault(cell_index, []).append(msg)
            return super().process_message(msg, cell, cell_index)

    client = Recording(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(path)}})
    client.execute(env=ENV)
    nbformat.write(nb, path / "launched.ipynb")
    return nbformat.read(path / "launched.ipynb", as_version=4), messages


def _stdout(cell) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def test_notebook_cell_shows_exactly_one_dashboard(notebook):
    nb, messages = notebook
    outputs = nb.cells[1].outputs
    assert not [o for o in outputs if o.output_type == "error"], outputs
    # one dashboard: its snapshot (HTML) and, in an output of its own, its figure (PNG)
    displays = [o for o in outputs if o.output_type == "display_data" and "image/png" not in o.data]
    assert len(displays) == 1, [sorted(o.data) for o in displays]
    assert len([o for o in outputs if o.output_type == "display_data"]) == 2, [sorted(o.data) for o in outputs]
    snap = displays[0].data
    assert "application/vnd.jupyter.widget-view+json" not in snap, "the live widgets were not replaced by the snapshot"
    assert "finished: 8 steps" in snap["text/html"], snap["text/plain"]  # the static snapshot (HTML, with its plot)
    msgs = messages[1]
    # on the wire: the widgets, drawn by the parent, and under them the saved view (the HTML a notebook saved mid-run
    # shows without its kernel); then updates of those two displays only
    shown = [m for m in msgs if m["msg_type"] == "display_data"]
    assert len(shown) == 2, [m["content"]["data"].keys() for m in shown]
    assert "application/vnd.jupyter.widget-view+json" in shown[0]["content"]["data"], "the dashboard was not live widgets"
    assert "text/html" in shown[1]["content"]["data"], "no saved view under the widgets"
    ids = {m["content"]["transient"]["display_id"] for m in shown}
    updates = [m for m in msgs if m["msg_type"] == "update_display_data"]
    assert updates and {m["content"]["transient"]["display_id"] for m in updates} <= ids


def test_next_cell_sees_the_trained_weights(notebook):
    nb, _ = notebook
    out = json.loads(_stdout(nb.cells[2]))
    assert out["world"] == 2, out
    assert out["changed"], "the model in the notebook was not trained"
    assert out["equals_rank0"], "the notebook's model is not what rank 0 had at the end of fn"
    assert out["rank1_equal"], "the ranks ended with different weights"
    assert out["kids"] == out["kids_before"], out


def test_notebook_cell_shows_the_child_error_and_leaves_no_process(notebook):
    nb, _ = notebook
    errors = [o for o in nb.cells[3].outputs if o.output_type == "error"]
    assert len(errors) == 1, nb.cells[3].outputs
    err = errors[0]
    shown = err.ename + ": " + err.evalue + "\n" + "\n".join(err.traceback)
    assert err.ename == "LaunchError", shown
    assert "rank 1 of 2 failed: KeyError: 'rank 1 has no shard'" in err.evalue, shown
    assert "Traceback (most recent call last)" in err.evalue and "in broken" in err.evalue, shown
    out = json.loads(_stdout(nb.cells[4]))
    assert out["kids"] == out["kids_before"], f"processes left behind in the kernel: {out}"
    assert out["unchanged"], "the failed launch changed the notebook's model"


def test_dashboard_of_a_run_whose_other_rank_failed_ends_as_a_snapshot(notebook):
    """Rank 1 fails at step 3 while rank 0's dashboard is live in the cell: the cell shows the error, and the dashboard
    ends as the static snapshot that says it failed (DESIGN: finished, interrupted or failed), not as live widgets."""
    nb, messages = notebook
    cell = nb.cells[5]
    errors = [o for o in cell.outputs if o.output_type == "error"]
    assert len(errors) == 1 and re.search(r"rank 1 of 2 failed: CallbackError: callback \w+\.on_step_end raised RuntimeError: "
                                          r"rank 1 broke at step 3", errors[0].evalue), cell.outputs
    displays = [o for o in cell.outputs if o.output_type == "display_data" and "image/png" not in o.data]  # and its figure
    assert len(displays) == 1, [sorted(o.data) for o in displays]
    assert "application/vnd.jupyter.widget-view+json" not in displays[0].data, \
        "the dashboard is left as live widgets (open comms; a saved notebook cannot show it)"
    assert "failed" in displays[0].data["text/html"], displays[0].data["text/plain"]
    out = json.loads(_stdout(nb.cells[6]))
    assert out["kids"] == out["kids_before"], f"processes left behind in the kernel: {out}"


# ---------------------------------------------------------------------------------------------- 6. the GPU check script
GPU_CHECK = ROOT / "bench" / "gpu_check.py"


def test_gpu_check_help():
    out = subprocess.run([sys.executable, str(GPU_CHECK), "--help"], capture_output=True, text=True, timeout=60, env=ENV)
    assert out.returncode == 0, out.stderr
    assert "--cpu-smoke" in out.stdout and "--steps" in out.stdout


def test_gpu_check_cpu_smoke():
    "The script's logic on the CPU: fp32 and bf16, through Trainer and launch(num_processes=1), each also in the background; a table and exit 0."
    out = subprocess.run([sys.executable, str(GPU_CHECK), "--cpu-smoke"], capture_output=True, text=True, timeout=180,
                         env={**ENV, "CUDA_VISIBLE_DEVICES": ""}, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "tokens/s" not in line and "---" not in line]
    assert {(r.split("|")[1].strip(), r.split("|")[2].strip()) for r in rows} == \
        {(path, p) for path in ("Trainer", "Trainer, background", "launch(1)", "launch(1), background") for p in ("fp32", "bf16")}, out.stdout
    assert all("| ok |" in r for r in rows), out.stdout


def test_gpu_check_fails_loudly_on_cpu_without_smoke():
    "Without a GPU (and without --cpu-smoke) the check must not pass by measuring the CPU."
    out = subprocess.run([sys.executable, str(GPU_CHECK)], capture_output=True, text=True, timeout=60,
                         env={**ENV, "CUDA_VISIBLE_DEVICES": ""}, cwd=ROOT)
    assert out.returncode != 0 and "no CUDA GPU" in out.stdout + out.stderr, out.stdout + out.stderr


def test_gpu_check_exits_non_zero_when_a_run_fails():
    "A run whose check fails (here: a loss that would have to fall below zero) makes the script exit 1, with the reason."
    out = subprocess.run([sys.executable, str(GPU_CHECK), "--cpu-smoke", "--paths", "trainer", "--precisions", "fp32",
                          "--max-loss-ratio", "0"], capture_output=True, text=True, timeout=120,
                         env={**ENV, "CUDA_VISIBLE_DEVICES": ""}, cwd=ROOT)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "| Trainer | fp32 |" in out.stdout and "FAIL: loss did not fall" in out.stdout, out.stdout
