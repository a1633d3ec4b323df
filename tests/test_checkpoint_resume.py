"""Resumption is exact to the bit: a run stopped at step k and continued by a NEW Trainer (fresh model object,
`train(resume_from_checkpoint=True)`) ends with the same weights, optimizer state and logged losses as a run
that was never stopped.

Every case trains the same tiny BERT twice (or three times) in this process: once straight, once stopped at
step `k` — by a callback that sets `control.should_training_stop` at a step where a checkpoint is saved, or by a
real SIGINT sent from a callback (the kernel-interrupt path) — and once more from that checkpoint. `max_steps`
is the same in every run (changing it would change the learning-rate schedule).

The resumed run's model is built from other initial weights (seed 1, not 0) and its first step must be k + 1: a
`train()` that ignored the checkpoint and started anew would neither start there nor end with the straight run's
weights.
"""
import os
import signal

import pytest
import torch

from conftest import FirstStep
from nbtrain import EarlyStoppingCallback, Trainer, TrainerCallback
from nbtrain.checkpoint import list_checkpoints
from nbtrain.trainer import TrainingInterrupted

torch.set_num_threads(1)


class StopAt(TrainerCallback):
    "Ends the run at step `k` as a user would: `should_training_stop` (the checkpoint of step k is saved first)."
    def __init__(self, k): self.k = k
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.k: control.should_training_stop = True


class InterruptAt(TrainerCallback):
    "Sends this process a real SIGINT at the end of step `k`, as the kernel's interrupt button does."
    def __init__(self, k): self.k = k
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.k: os.kill(os.getpid(), signal.SIGINT)


def result(trainer) -> dict:
    "Everything that must match bit for bit: weights, optimizer state, scheduler, logged losses and evaluations."
    opt = trainer.optimizer.state_dict()
    return dict(
        weights={k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()},
        opt_state={(pid, k): v.clone() if torch.is_tensor(v) else v for pid, st in opt["state"].items() for k, v in st.items()},
        opt_groups=[{k: v for k, v in g.items()} for g in opt["param_groups"]],
        scheduler=trainer.lr_scheduler.state_dict()["last_epoch"],
        losses=[(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h],
        lrs=[(h["step"], h["learning_rate"]) for h in trainer.state.log_history if "learning_rate" in h],
        evals=[(h["step"], h["eval_loss"]) for h in trainer.state.log_history if "eval_loss" in h],
        step=trainer.state.global_step,
        train_loss=[h["train_loss"] for h in trainer.state.log_history if "train_loss" in h][-1:],
    )


def assert_same(straight: dict, resumed: dict):
    assert resumed["step"] == straight["step"]
    assert straight["weights"].keys() == resumed["weights"].keys()
    for k in straight["weights"]:
        assert torch.equal(straight["weights"][k], resumed["weights"][k]), f"weight {k} differs"
    assert straight["opt_state"].keys() == resumed["opt_state"].keys()
    assert straight["opt_state"], "the optimizer holds no state: nothing was compared"
    for key, v in straight["opt_state"].items():
        w = resumed["opt_state"][key]
        if torch.is_tensor(v): assert torch.equal(v, w), f"optimizer state {key} differs"
        else: assert v == w, f"optimizer state {key} differs"
    assert straight["opt_groups"] == resumed["opt_groups"]
    assert straight["scheduler"] == resumed["scheduler"]
    assert straight["losses"] == resumed["losses"]
    assert straight["lrs"] == resumed["lrs"]
    assert straight["evals"] == resumed["evals"]


class Case:
    "One configuration, trained straight, stopped, and resumed; each run builds a fresh model and Trainer."
    def __init__(self, tiny, make_args, tmp_path, n=64, dropout=0.0, eval_n=0, callbacks=(), collator=None, **args):
        self.tiny, self.make_args, self.tmp_path, self.collator = tiny, make_args, tmp_path, collator
        self.n, self.dropout, self.eval_n, self.callbacks = n, dropout, eval_n, callbacks
        self.args = {**dict(per_device_train_batch_size=8, learning_rate=1e-2, seed=7, logging_steps=1, save_strategy="steps",
                            save_steps=2), **args}

    def trainer(self, out: str, extra=(), seed: int = 0):
        "A fresh model (initial weights from `seed`) and Trainer writing to `out`."
        model = self.tiny.bert(dropout=self.dropout, seed=seed)
        eval_ds = self.tiny.dataset(self.eval_n, seed=1) if self.eval_n else None
        callbacks = [cb() for cb in self.callbacks] + list(extra)
        return Trainer(model, self.make_args(output_dir=str(self.tmp_path / out), **self.args),
                       train_dataset=self.tiny.dataset(self.n, seed=0), eval_dataset=eval_ds, callbacks=callbacks,
                       data_collator=self.collator)

    def straight(self) -> dict:
        t = self.trainer("straight")
        t.train()
        return result(t)

    def stopped(self, k: int, how: str = "stop"):
        "Run until step k; returns the trainer (whose checkpoint-k is on disk)."
        if how == "stop":
            t = self.trainer("split", [StopAt(k)])
            t.train()
        else:
            t = self.trainer("split", [InterruptAt(k)])
            with pytest.raises(TrainingInterrupted, match=f"interrupted at step {k}"):
                t.train()
        assert t.state.global_step == k
        assert list_checkpoints(self.tmp_path / "split")[-1].name == f"checkpoint-{k}"
        return t

    def resuming(self):
        "A new Trainer of the stopped run whose model starts from OTHER weights (seed 1): only the checkpoint gives them back."
        first = FirstStep()
        return self.trainer("split", [first], seed=1), first

    def resumed(self, k: int) -> dict:
        "Resume the stopped run from its checkpoint-k: the first step it takes is k + 1."
        t, first = self.resuming()
        t.train(resume_from_checkpoint=True)
        assert first.first == k + 1, f"the resumed run started at step {first.first}, not {k + 1}"
        return result(t)

    def check(self, k: int, how: str = "stop", expect_steps: int | None = None):
        straight = self.straight()
        if expect_steps is not None: assert straight["step"] == expect_steps
        stopped = self.stopped(k, how)
        assert stopped.state.global_step < straight["step"], "the stop came too late to test anything"
        resumed = self.resumed(k)
        assert_same(straight, resumed)
        return straight, resumed


# 64 examples, batch 8: 8 optimizer steps per epoch
def test_resume_mid_epoch(tiny, make_args, tmp_path):
    Case(tiny, make_args, tmp_path, max_steps=12).check(k=6, expect_steps=12)


def test_resume_at_epoch_boundary(tiny, make_args, tmp_path):
    # step 8 ends epoch 0: the checkpoint is taken between the last batch of one epoch and the first of the next
    Case(tiny, make_args, tmp_path, max_steps=12, save_steps=4).check(k=8, expect_steps=12)


def test_resume_with_epoch_save_strategy(tiny, make_args, tmp_path):
    # num_train_epochs instead of max_steps, checkpoints at epoch ends (saved after on_epoch_end)
    Case(tiny, make_args, tmp_path, num_train_epochs=3, save_strategy="epoch").check(k=16, expect_steps=24)


def test_resume_with_gradient_accumulation(tiny, make_args, tmp_path):
    # 72 examples in batches of 4 = 18 micro-batches per epoch; 4 per step = 5 steps per epoch, the last with 2.
    # k=7 is mid-window-aligned in epoch 1 (skips 2 steps = 8 micro-batches), and the run crosses two epoch ends
    case = Case(tiny, make_args, tmp_path, n=72, per_device_train_batch_size=4, gradient_accumulation_steps=4,
                max_steps=12, save_steps=7)
    case.check(k=7, expect_steps=12)


def test_resume_with_dropout(tiny, make_args, tmp_path):
    # dropout draws from torch's global generator: its state at step k must come back with the checkpoint
    Case(tiny, make_args, tmp_path, dropout=0.3, max_steps=12).check(k=6)


def test_dropout_makes_the_rng_state_matter(tiny, make_args, tmp_path, monkeypatch):
    # guards the test above against being vacuous: a resume that lost the torch RNG state ends elsewhere
    import nbtrain.trainer
    case = Case(tiny, make_args, tmp_path, dropout=0.3, max_steps=12)
    straight = case.straight()
    case.stopped(6)
    real = nbtrain.trainer.restore_training
    def forgetful(*a, **kw):
        state = real(*a, **kw)
        torch.manual_seed(12345)
        return state
    monkeypatch.setattr(nbtrain.trainer, "restore_training", forgetful)
    resumed = case.resumed(6)
    assert not all(torch.equal(straight["weights"][k], v) for k, v in resumed["weights"].items())


def random_mask(examples: list[dict]) -> dict:
    "A user's collator that masks 30% of the tokens with torch's global generator, as masked-LM collators do."
    batch = {k: torch.tensor([e[k] for e in examples]) for k in examples[0]}
    keep = torch.rand(batch["input_ids"].shape) >= 0.3
    keep[:, 0] = True  # [CLS]
    return dict(batch, input_ids=batch["input_ids"] * keep)


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "2-workers"])
@pytest.mark.parametrize("k", [3, 8], ids=["mid-epoch", "epoch-end"])
def test_resume_with_a_collator_that_draws_random_numbers(tiny, make_args, tmp_path, k, workers):
    # The loader collates batch k+1 before step k ends, so the global random state saved at step k has already served
    # it; with dropout drawing from the same state, a resumed run that re-collates batch k+1 from it would mask it
    # differently and shift every later draw.
    Case(tiny, make_args, tmp_path, dropout=0.1, collator=random_mask, max_steps=12, save_steps=k,
         dataloader_num_workers=workers).check(k=k)


def test_the_random_collator_changes_training(tiny, make_args, tmp_path):
    # guards the test above against being vacuous: the masks differ from batch to batch and change the weights
    plain = Case(tiny, make_args, tmp_path / "plain", max_steps=4).straight()
    masked = Case(tiny, make_args, tmp_path / "masked", collator=random_mask, max_steps=4).straight()
    assert not all(torch.equal(plain["weights"][k], v) for k, v in masked["weights"].items())


def test_interrupt_during_the_last_step_finishes_the_run(tiny, make_args, tmp_path):
    # every step was taken: the run ends as finished (no TrainingInterrupted), and resuming its last checkpoint
    # trains nothing more: no step runs, and the weights (built from seed 1) are the checkpoint's, the straight run's
    case = Case(tiny, make_args, tmp_path, dropout=0.1, max_steps=12)
    straight = case.straight()
    t = case.trainer("split", [InterruptAt(12)])
    out = t.train()
    assert out.global_step == 12
    assert_same(straight, result(t))
    again, first = case.resuming()
    again.train(resume_from_checkpoint=True)
    assert first.first is None, f"the resumed run took step {first.first}"
    assert again.state.global_step == 12
    assert_same(straight, result(again))


def test_resume_with_dataloader_workers(tiny, make_args, tmp_path):
    Case(tiny, make_args, tmp_path, dropout=0.1, max_steps=12, dataloader_num_workers=2).check(k=6)


@pytest.mark.parametrize("k", [2, 6], ids=["in-warmup", "after-warmup"])
def test_resume_with_cosine_schedule_and_warmup(tiny, make_args, tmp_path, k):
    straight, _ = Case(tiny, make_args, tmp_path, max_steps=12, lr_scheduler_type="cosine", warmup_steps=4).check(k=k)
    # the schedule the test is about, as the steps used it: up from 0 over 4 warm-up steps to the peak at step 5,
    # then a cosine down
    lrs = [lr for _, lr in straight["lrs"]]
    assert len(lrs) == 12 and lrs[0] == 0.0 and lrs[4] == max(lrs)
    assert all(a < b for a, b in zip(lrs[:4], lrs[1:5])) and all(a > b for a, b in zip(lrs[4:], lrs[5:]))


def test_resume_with_evaluation_and_early_stopping(tiny, make_args, tmp_path):
    # A threshold of 1.0 makes every evaluation after the first one "no improvement": with patience 3 the run stops
    # at the 4th evaluation (step 8 of 16). The checkpoint at step 6 holds a patience counter of 2; a resumed run that
    # lost it would evaluate 3 more times and stop at step 12 instead.
    es = lambda: EarlyStoppingCallback(early_stopping_patience=3, early_stopping_threshold=1.0)
    case = Case(tiny, make_args, tmp_path, eval_n=16, callbacks=(es,), max_steps=16, eval_strategy="steps", eval_steps=2,
                metric_for_best_model="loss")
    straight, resumed = case.check(k=6)
    assert straight["step"] == 8
    assert [s for s, _ in straight["evals"]] == [2, 4, 6, 8]


def test_resume_after_sigint(tiny, make_args, tmp_path):
    # the kernel-interrupt path: a real SIGINT during step 5; the trainer stops at the step boundary and saves
    # checkpoint-5 although save_steps=4 would not have
    Case(tiny, make_args, tmp_path, dropout=0.1, max_steps=12, save_steps=4).check(k=5, how="interrupt")


def test_plain_train_after_interrupt_continues_exactly(tiny, make_args, tmp_path, capsys):
    # the same Trainer object, a plain train() in the next cell
    case = Case(tiny, make_args, tmp_path, dropout=0.1, max_steps=12, save_steps=4)
    straight = case.straight()
    t = case.stopped(5, how="interrupt")
    t.remove_callback(InterruptAt)
    # other weights in the model: only checkpoint-5 can give back step 5's
    t.model.load_state_dict(tiny.bert(dropout=0.1, seed=1).state_dict())
    first = FirstStep()
    t.add_callback(first)
    capsys.readouterr()
    t.train()
    assert "Continuing the interrupted run from" in capsys.readouterr().out
    assert first.first == 6
    assert_same(straight, result(t))


def test_resume_false_after_interrupt_starts_a_new_run(tiny, make_args, tmp_path, capsys):
    case = Case(tiny, make_args, tmp_path, max_steps=12, save_steps=4)
    t = case.stopped(5, how="interrupt")
    t.remove_callback(InterruptAt)
    first = FirstStep()
    t.add_callback(first)
    capsys.readouterr()
    t.train(resume_from_checkpoint=False)
    assert "Continuing" not in capsys.readouterr().out
    assert first.first == 1 and t.state.global_step == 12


def test_logged_loss_spanning_the_stop(tiny, make_args, tmp_path):
    # logging_steps=4 and a stop at step 5: the loss logged at step 8 averages steps 5..8 in the straight run;
    # the resumed run logs the mean of steps 6..8 only
    Case(tiny, make_args, tmp_path, max_steps=12, logging_steps=4, save_steps=5).check(k=5)


def test_training_loss_of_a_resumed_run(tiny, make_args, tmp_path):
    # TrainOutput.training_loss (and the logged train_loss) of the resumed run is the mean over all 12 steps,
    # as in the straight run, not over the 6 steps after the resume
    straight, resumed = Case(tiny, make_args, tmp_path, max_steps=12).check(k=6)
    assert straight["train_loss"] == resumed["train_loss"]


def test_interrupt_in_the_last_step_of_an_epoch(tiny, make_args, tmp_path):
    # eval and save at epoch ends: an interrupt during step 8, the last of epoch 0, must not lose that epoch's
    # evaluation (the straight run evaluates at steps 8, 16 and 24)
    case = Case(tiny, make_args, tmp_path, eval_n=16, num_train_epochs=3, eval_strategy="epoch", save_strategy="epoch")
    straight, resumed = case.check(k=8, how="interrupt", expect_steps=24)
    assert [s for s, _ in resumed["evals"]] == [8, 16, 24]


def test_resume_with_more_steps_runs_to_the_new_end_and_warns(tiny, make_args, tmp_path):
    case = Case(tiny, make_args, tmp_path, max_steps=8)
    case.stopped(4)
    case.args["max_steps"] = 12
    t, first = case.resuming()
    with pytest.warns(UserWarning, match=r"max_steps: 8 in the checkpoint, 12 now"):
        t.train(resume_from_checkpoint=True)
    assert first.first == 5
    assert t.state.global_step == t.state.max_steps == 12


def test_resume_with_another_learning_rate_warns(tiny, make_args, tmp_path):
    case = Case(tiny, make_args, tmp_path, max_steps=8)
    case.stopped(4)
    case.args["learning_rate"] = 5e-3
    t, first = case.resuming()
    with pytest.warns(UserWarning, match=r"learning_rate: 0\.01 in the checkpoint, 0\.005 now"):
        t.train(resume_from_checkpoint=True)
    assert first.first == 5 and t.state.global_step == 8


def test_stop_at_epoch_end_with_epoch_evaluation(tiny, make_args, tmp_path):
    # checkpoint-8 is written at the end of step 8, before epoch 0's on_epoch_end evaluation
    case = Case(tiny, make_args, tmp_path, eval_n=16, num_train_epochs=3, eval_strategy="epoch", save_steps=4)
    straight, resumed = case.check(k=8, expect_steps=24)
