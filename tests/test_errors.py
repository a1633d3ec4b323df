"""Bad inputs fail before the first optimizer step, with a message that names the problem."""
import numpy as np
import pytest
import torch
from datasets import Dataset

from nbtrain import Trainer, TrainerCallback, TrainingArguments


class StepRecorder(TrainerCallback):
    "Records the step events the loop fires: none may fire when the run is refused."
    def __init__(self): self.events = []
    def on_step_begin(self, args, state, control, **kwargs): self.events.append("step_begin")
    def on_optimizer_step(self, args, state, control, **kwargs): self.events.append("optimizer_step")


def accuracy(p):
    return {"accuracy": float((np.argmax(p.predictions, axis=-1) == p.label_ids).mean())}


def assert_refused_at_train(tiny, trainer, match, exc=ValueError):
    "train() raises `exc` matching `match`, and nothing was stepped: weights, step count and events unchanged."
    recorder = StepRecorder()
    trainer.add_callback(recorder)
    before = tiny.snapshot(trainer.model)
    with pytest.raises(exc, match=match):
        trainer.train()
    assert trainer.state.global_step == 0
    assert recorder.events == []
    assert tiny.same_weights(trainer.model, before)


def test_no_labels_column(tiny, make_args):
    cols = tiny.columns(16)
    del cols["label"]
    trainer = Trainer(tiny.bert(), make_args(), train_dataset=Dataset.from_dict(cols))
    assert_refused_at_train(tiny, trainer, r"returned no loss.*no labels column.*Name the target column 'labels'")


def test_text_column_kept_without_tokenizer(tiny, make_args):
    cols = tiny.columns(16)
    cols["text"] = [f"review number {i}" for i in range(16)]
    trainer = Trainer(tiny.bert(), make_args(remove_unused_columns=False), train_dataset=Dataset.from_dict(cols))
    assert_refused_at_train(tiny, trainer, r"column 'text' holds text.*Tokenize it first")


def test_empty_train_dataset(tiny, make_args):
    empty = tiny.dataset(16).select([])
    assert len(empty) == 0
    trainer = Trainer(tiny.bert(), make_args(), train_dataset=empty)
    assert_refused_at_train(tiny, trainer, r"train_dataset is empty \(0 examples\)")


def test_empty_list_train_dataset(tiny, make_args):
    trainer = Trainer(tiny.bert(), make_args(), train_dataset=[])
    assert_refused_at_train(tiny, trainer, r"train_dataset is empty \(0 examples\)")


def test_eval_strategy_without_eval_dataset(tiny, make_args):
    model = tiny.bert()
    before = tiny.snapshot(model)
    with pytest.raises(ValueError, match=r"eval_strategy='epoch' but no eval_dataset was given.*eval_dataset=\.\.\."):
        Trainer(model, make_args(eval_strategy="epoch"), train_dataset=tiny.dataset(16))
    assert tiny.same_weights(model, before)


def test_model_is_a_string(tiny, make_args):
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str"):
        Trainer("bert-base-uncased", make_args(), train_dataset=tiny.dataset(16))


def test_model_is_a_class(tiny, make_args):
    from transformers import BertForSequenceClassification
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module.*a model class: instantiate it"):
        Trainer(BertForSequenceClassification, make_args(), train_dataset=tiny.dataset(16))


def bert_activation_dtypes(model) -> set:
    "The dtypes of the tiny BERT's hidden activations (its feed-forward layer's output) in the forward passes to come."
    dtypes = set()
    model.bert.encoder.layer[0].intermediate.dense.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    return dtypes


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is valid where CUDA is available")
def test_fp16_without_cuda(tiny, make_args):
    # as in transformers: accepted, said, and trained in full precision (float32), never in float16 on the CPU
    with pytest.warns(UserWarning, match=r"fp16=True, but fp16 needs a CUDA GPU.*training runs in full precision"):
        args = make_args(fp16=True, max_steps=2, per_device_train_batch_size=8)
    model = tiny.bert(seed=0)
    trainer = Trainer(model, args, train_dataset=tiny.dataset(16))
    dtypes = bert_activation_dtypes(model)
    trainer.train()
    assert dtypes == {torch.float32} and trainer.accelerator.scaler is None, (dtypes, trainer.accelerator.scaler)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: without one fp16=True trains in float32 (above)")
def test_fp16_with_cuda_trains_in_float16(tiny, make_args):
    # the other side: where there is fp16 it is in effect, not dropped on the way to the accelerator (the forward runs
    # under float16 autocast, and the loss is scaled)
    model = tiny.bert(seed=0)
    trainer = Trainer(model, make_args(fp16=True, max_steps=2, per_device_train_batch_size=8), train_dataset=tiny.dataset(16))
    assert trainer.accelerator.mixed_precision == "fp16" and trainer.accelerator.scaler is not None
    dtypes = bert_activation_dtypes(model)
    trainer.train()
    assert dtypes == {torch.float16}, f"fp16=True: the forward ran in {dtypes}"


@pytest.mark.parametrize("wrong, right", [("learning_rat", "learning_rate"),
                                          ("num_train_epoch", "num_train_epochs"),
                                          ("evaluation_stratgy", "eval_strategy")])
def test_unknown_training_argument_suggests_closest(tmp_path, wrong, right):
    with pytest.raises(TypeError, match=rf"unknown argument '{wrong}'\. Did you mean '{right}'\?"):
        TrainingArguments(output_dir=str(tmp_path), **{wrong: 1})


def test_metric_for_best_model_never_computed(tiny, make_args):
    trainer = Trainer(tiny.bert(), make_args(eval_strategy="epoch", metric_for_best_model="f1"),
                      train_dataset=tiny.dataset(16), eval_dataset=tiny.dataset(8, seed=1), compute_metrics=accuracy)
    assert_refused_at_train(tiny, trainer, r"metric_for_best_model='f1' is never computed.*'accuracy'")


def test_metric_for_best_model_that_is_computed_trains(tiny, make_args):
    # the counterpart of the test above: the same run naming a computed metric does train
    trainer = Trainer(tiny.bert(), make_args(eval_strategy="epoch", metric_for_best_model="accuracy", num_train_epochs=1),
                      train_dataset=tiny.dataset(16), eval_dataset=tiny.dataset(8, seed=1), compute_metrics=accuracy)
    trainer.train()
    assert trainer.state.global_step == 2
    assert any("eval_accuracy" in h for h in trainer.state.log_history)


def test_no_trainable_parameters(tiny, make_args):
    model = tiny.bert()
    for p in model.parameters(): p.requires_grad_(False)
    trainer = Trainer(model, make_args(), train_dataset=tiny.dataset(16))
    assert_refused_at_train(tiny, trainer, r"no trainable parameters.*requires_grad_\(True\)")


def test_nan_in_the_first_batch(tiny, make_args):
    from nbtrain.trainer import NonFiniteLossError
    trainer = Trainer(tiny.bert(), make_args(), train_dataset=[{"inputs_embeds": [[float("nan")] * 16] * tiny.SEQ_LEN, "labels": 0}] * 16)
    assert_refused_at_train(tiny, trainer, r"first train_dataset batch gives a loss of nan before any training step", NonFiniteLossError)


def test_eval_label_out_of_range_found_before_training(tiny, make_args):
    cols = tiny.columns(8, seed=1)
    cols["label"] = [5] * 8  # the model has 2 classes
    trainer = Trainer(tiny.bert(), make_args(eval_strategy="epoch"), train_dataset=tiny.dataset(16),
                      eval_dataset=Dataset.from_dict(cols))
    assert_refused_at_train(tiny, trainer, r"preflight, the first eval_dataset batch: the model failed on it with IndexError.*"
                                           r"labels \(8,\) int64 in \[5, 5\]")


def test_training_argument_values_torch_would_reject(tmp_path):
    for kw, match in [({"seed": -1}, r"seed=-1: must be an integer from 0 to 2\*\*32 - 1"),
                      ({"dataloader_num_workers": -1}, r"dataloader_num_workers=-1: must be 0"),
                      ({"adam_beta1": 1.5}, r"adam_beta1=1.5: must be in \[0, 1\)"),
                      ({"learning_rate": float("inf")}, r"learning_rate=inf: must be a finite positive number"),
                      ({"nan_check": "always"}, r"nan_check='always' is not one of 'log', 'step', 'off'")]:
        with pytest.raises(ValueError, match=match):
            TrainingArguments(output_dir=str(tmp_path), **kw)
