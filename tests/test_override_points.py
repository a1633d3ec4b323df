"""A subclass that overrides one of transformers' override points works on nbtrain as it does on transformers: the
method is called, and as many times as transformers calls it for the same run.

Each case subclasses one method on both trainers (a counting wrapper that calls `super()`), runs the same run —
a one-layer BERT, 48 examples in batches of 8 with gradient accumulation 2 (6 micro-batches, 3 steps, per epoch),
2 epochs, a log every 2 steps, an evaluation every 3 steps and at the end, then `evaluate()` and `predict()` by
hand — and compares the counts. `TrainingArguments` goes through `HfArgumentParser` on both sides, as scripts do.
"""
import json

import pytest
import torch

torch.set_num_threads(1)

METHODS = ["training_step", "compute_loss", "prediction_step", "evaluation_loop", "evaluate", "log",
           "get_train_dataloader", "get_eval_dataloader", "get_test_dataloader", "create_optimizer", "create_scheduler",
           "save_model"]  # not create_optimizer_and_scheduler: transformers 5 calls the two on their own, as nbtrain does

ARGS = ["--output_dir", "OUT", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
        "--gradient_accumulation_steps", "2", "--num_train_epochs", "2", "--logging_steps", "2", "--eval_strategy", "steps",
        "--eval_steps", "3", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--learning_rate", "1e-3",
        "--seed", "3", "--do_train", "--do_eval"]


pytestmark = pytest.mark.usefixtures("quiet_transformers")


def counting(base: type, name: str) -> type:
    "`base` with `name` wrapped: each call is counted, then the base's method runs."
    def wrapper(self, *args, **kwargs):
        self.calls += 1
        return getattr(base, name)(self, *args, **kwargs)
    return type(f"Counting{name}", (base,), {name: wrapper, "calls": 0})


def run(lib: str, name: str, tmp_path, tiny) -> int:
    "The number of calls of `name` in the run described above, on `lib`'s Trainer."
    from transformers import HfArgumentParser
    if lib == "nbtrain": from nbtrain import Trainer, TrainingArguments
    else: from transformers import Trainer, TrainingArguments
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        [str(tmp_path / lib) if a == "OUT" else a for a in ARGS] + (["--use_cpu"] if lib == "transformers" else []))
    trainer = counting(Trainer, name)(tiny.bert(dropout=0.0), args, train_dataset=tiny.dataset(48, seed=0),
                                      eval_dataset=tiny.dataset(16, seed=1),
                                      compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())})
    trainer.train()
    trainer.evaluate()
    trainer.predict(tiny.dataset(8, seed=2))
    trainer.save_model()
    return trainer.calls


@pytest.mark.parametrize("name", METHODS)
def test_an_override_is_called_as_often_as_transformers_calls_it(name, tmp_path, tiny):
    expected = run("transformers", name, tmp_path, tiny)
    assert expected > 0, f"transformers never calls {name} here: the case tests nothing"
    assert run("nbtrain", name, tmp_path, tiny) == expected


def test_training_step_override_changes_training(tmp_path, tiny):
    # the override is not only called but is the step: one that skips backward leaves the weights where they started
    from nbtrain import Trainer, TrainingArguments

    class NoBackward(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            with torch.no_grad(): return self.compute_loss(model, inputs).detach()

    model = tiny.bert(dropout=0.0)
    before = tiny.snapshot(model)
    NoBackward(model, TrainingArguments(output_dir=None, max_steps=3, disable_tqdm=True, report_to="none", weight_decay=0.0),
               train_dataset=tiny.dataset(32)).train()
    assert tiny.same_weights(model, before)


def test_qa_style_subclass_runs_its_own_evaluation_loop(tmp_path, tiny):
    # transformers' trainer_qa.py: evaluate() calls evaluation_loop itself with compute_metrics switched off, post-processes
    # the predictions, logs, and fires on_evaluate through the callback handler
    from nbtrain import Trainer, TrainerCallback, TrainingArguments

    class Seen(TrainerCallback):
        metrics = None
        def on_evaluate(self, args, state, control, metrics=None, **kwargs): self.metrics = metrics

    class PostProcessing(Trainer):
        def evaluate(self, eval_dataset=None, eval_examples=None, ignore_keys=None, metric_key_prefix="eval"):
            dataloader = self.get_eval_dataloader(eval_dataset)
            compute_metrics, self.compute_metrics = self.compute_metrics, None
            try:
                output = self.evaluation_loop(dataloader, description="Evaluation",
                                              prediction_loss_only=True if compute_metrics is None else None,
                                              ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
            finally: self.compute_metrics = compute_metrics
            answers = output.predictions.argmax(-1)  # the post-processing step
            metrics = {f"{metric_key_prefix}_positive_share": float(answers.mean()), **output.metrics}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    seen = Seen()
    trainer = PostProcessing(tiny.bert(dropout=0.0), TrainingArguments(output_dir=None, max_steps=2, disable_tqdm=True, report_to="none"),
                             train_dataset=tiny.dataset(16), eval_dataset=tiny.dataset(16, seed=1), callbacks=[seen],
                             compute_metrics=lambda p: {})
    trainer.train()
    metrics = trainer.evaluate()
    assert 0 <= metrics["eval_positive_share"] <= 1 and "eval_loss" in metrics
    assert seen.metrics is metrics
    assert trainer.state.log_history[-1]["eval_positive_share"] == metrics["eval_positive_share"]


def test_script_helpers_write_what_transformers_writes(tmp_path, tiny, capsys):
    # log_metrics / save_metrics / save_state / create_model_card, and train metrics with transformers' epoch key
    from transformers import HfArgumentParser
    from nbtrain import Trainer, TrainingArguments
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--max_steps", "4", "--eval_strategy", "steps", "--eval_steps", "2",
         "--disable_tqdm", "true", "--report_to", "none", "--save_strategy", "no"])
    trainer = Trainer(tiny.bert(dropout=0.0), args, train_dataset=tiny.dataset(32), eval_dataset=tiny.dataset(16, seed=1))
    metrics = trainer.train().metrics
    assert metrics["epoch"] == trainer.state.epoch and "train_loss" in metrics
    trainer.log_metrics("train", metrics)
    printed = capsys.readouterr().out
    assert printed.startswith("***** train metrics *****") and "  train_loss " in printed and "train_runtime" in printed
    trainer.save_metrics("train", metrics)
    evaluated = trainer.evaluate()
    assert "epoch" in evaluated
    trainer.save_metrics("eval", evaluated)
    assert json.loads((tmp_path / "train_results.json").read_text()) == metrics
    assert json.loads((tmp_path / "all_results.json").read_text()) == {**metrics, **evaluated}
    trainer.save_state()
    assert json.loads((tmp_path / "trainer_state.json").read_text())["log_history"] == trainer.state.log_history
    trainer.create_model_card(model_name="tiny-keyword", finetuned_from="nbtrain/tiny-bert", dataset="keywords")
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\n") and 'base_model: "nbtrain/tiny-bert"' in card and "# tiny-keyword" in card
    assert "| Training Loss | Epoch | Step | loss |" in card and "- learning_rate: 5e-05" in card


def test_push_to_hub_offline_is_a_clear_error_after_saving(tmp_path, tiny, monkeypatch):
    from huggingface_hub import constants
    from nbtrain import Trainer, TrainingArguments
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    trainer = Trainer(tiny.bert(), TrainingArguments(output_dir=str(tmp_path), hub_model_id="me/tiny", report_to="none"),
                      train_dataset=tiny.dataset(8))
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE=1.*'me/tiny'"): trainer.push_to_hub()
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "README.md").is_file()


def test_last_checkpoint_is_found_by_transformers(tmp_path, tiny):
    # transformers' get_last_checkpoint, which the example scripts call to resume, finds nbtrain's checkpoints
    from transformers.trainer_utils import get_last_checkpoint
    from nbtrain import Trainer, TrainingArguments
    Trainer(tiny.bert(), TrainingArguments(output_dir=str(tmp_path), max_steps=4, save_steps=2, disable_tqdm=True, report_to="none"),
            train_dataset=tiny.dataset(32)).train()
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
