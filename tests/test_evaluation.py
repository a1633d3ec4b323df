"""evaluate() and predict() in the situations a notebook user meets after training: another model put in the
trainer, a test set without labels, a compute_metrics that needs the whole evaluation set, early stopping with
evaluations outside the run, and models whose outputs hold scalars besides the loss."""
import random

import numpy as np
import pytest
import torch

from nbtrain import EarlyStoppingCallback, Trainer, TrainingArguments

torch.set_num_threads(1)


pytestmark = pytest.mark.usefixtures("quiet_transformers")


def bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=32, num_labels=3))


def data(n: int, seed: int, labels: bool = True) -> list[dict]:
    g = random.Random(seed)
    return [{"input_ids": [g.randrange(5, 100) for _ in range(8)], **({"labels": g.randrange(3)} if labels else {})}
            for _ in range(n)]


def args(tmp_path=None, **kw) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path) if tmp_path else None, disable_tqdm=True, per_device_train_batch_size=4,
                             per_device_eval_batch_size=4, **kw)


def accuracy(p) -> dict:
    return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}


def direct_loss(model, examples: list[dict]) -> float:
    "The mean loss of `model` on `examples`, computed without any trainer."
    model.eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([e["input_ids"] for e in examples]), labels=torch.tensor([e["labels"] for e in examples]))
    return out.loss.item()


def test_evaluate_uses_the_model_the_trainer_holds_now():
    ev = data(8, 2)
    trainer = Trainer(bert(), args(max_steps=3), train_dataset=data(16, 1), eval_dataset=ev)
    trainer.train()
    other = bert(seed=5)
    trainer.model = other  # e.g. trainer.model = load_checkpoint(path)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(direct_loss(other, ev), rel=1e-5)


def test_predict_without_labels_computes_no_metrics():
    called = []
    def compute_metrics(p):
        called.append(p)
        return accuracy(p)
    from torchmetrics.classification import MulticlassAccuracy
    trainer = Trainer(bert(), args(), compute_metrics=compute_metrics, metrics={"accuracy": MulticlassAccuracy(3)})
    out = trainer.predict(data(10, 3, labels=False))
    assert out.predictions.shape == (10, 3) and out.label_ids is None
    assert called == [] and not any("accuracy" in k for k in out.metrics), out.metrics
    labelled = trainer.predict(data(10, 3))  # the same trainer with labels: both metrics are there
    assert {"test_accuracy"} <= labelled.metrics.keys() and len(called) == 1


def test_compute_metrics_that_needs_the_whole_set_trains(tmp_path):
    # references kept aside, aligned with the whole evaluation set (as QA post-processing does): one batch is not enough
    ev = data(10, 2)
    refs = np.array([e["labels"] for e in ev])
    def whole_set(p):
        if len(p.predictions) != len(refs): raise ValueError(f"{len(p.predictions)} predictions for {len(refs)} references")
        return {"acc": float((p.predictions.argmax(-1) == refs).mean())}
    kw = dict(num_train_epochs=1, eval_strategy="epoch", save_strategy="epoch", metric_for_best_model="acc",
              load_best_model_at_end=True)
    trainer = Trainer(bert(), args(tmp_path / "ok", **kw), train_dataset=data(16, 1), eval_dataset=ev, compute_metrics=whole_set)
    trainer.train()
    assert trainer.state.best_metric == trainer.evaluate()["eval_acc"]
    # a misnamed metric_for_best_model is still an error, at the run's first evaluation, before any checkpoint
    wrong = Trainer(bert(), args(tmp_path / "wrong", **{**kw, "metric_for_best_model": "accuracy"}), train_dataset=data(16, 1),
                    eval_dataset=ev, compute_metrics=whole_set)
    with pytest.raises(ValueError, match="metric_for_best_model='accuracy' is never computed.*'acc'"):
        wrong.train()
    assert not list((tmp_path / "wrong").glob("checkpoint-*"))


def test_early_stopping_watches_only_the_runs_evaluations():
    ev = data(8, 2)
    es = EarlyStoppingCallback(early_stopping_patience=1)
    trainer = Trainer(bert(), args(max_steps=12, eval_strategy="steps", eval_steps=4, learning_rate=1e-3),
                      train_dataset=data(16, 1), eval_dataset=ev, callbacks=[es])
    assert "test_loss" in trainer.evaluate(data(8, 4), metric_key_prefix="test")  # no error: not an evaluation of the run
    trainer.evaluate()  # a baseline before training: its loss must not become the one to beat
    es.best = -1.0  # ... even an unbeatable one: a new run starts afresh
    trainer.train()
    evals = [h["step"] for h in trainer.state.log_history if "eval_loss" in h and h["step"] > 0]
    assert evals[:2] == [4, 8], evals  # without the reset the run would stop at its first evaluation


def test_scalar_outputs_besides_the_loss_are_not_predictions():
    # an MoE model with output_router_logits=True returns aux_loss, a 0-d tensor, beside the logits
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                                             num_experts_per_tok=1, output_router_logits=True, max_position_embeddings=32))
    g = random.Random(0)
    ids = [[g.randrange(1, 50) for _ in range(8)] for _ in range(6)]
    out = Trainer(model, args()).predict([{"input_ids": i, "labels": i} for i in ids])
    # a causal LM: predictions line up with the label each predicts (the next token), one position fewer
    assert isinstance(out.predictions, np.ndarray) and out.predictions.shape == (6, 7, 50)
    assert np.isfinite(out.metrics["test_loss"])


def test_a_dict_of_eval_datasets_as_transformers(tmp_path):
    from datasets import Dataset, DatasetDict
    from transformers import Trainer as HFTrainer
    from transformers import TrainingArguments as HFArgs
    evals = {"a": data(8, 2), "b": data(6, 3)}
    kw = dict(max_steps=4, eval_strategy="steps", eval_steps=2, per_device_train_batch_size=4, per_device_eval_batch_size=4,
              metric_for_best_model="b_loss")
    nb = Trainer(bert(), TrainingArguments(output_dir=None, disable_tqdm=True, **kw), train_dataset=data(16, 1), eval_dataset=evals)
    hf = HFTrainer(bert(), HFArgs(output_dir=str(tmp_path / "hf"), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, **kw),
                   train_dataset=Dataset.from_list(data(16, 1)), eval_dataset=DatasetDict({k: Dataset.from_list(v) for k, v in evals.items()}))
    nb.train(); hf.train()
    def losses(t) -> dict:
        "step -> (eval_a_loss, eval_b_loss), merging the log records of a step (transformers logs each dataset apart)"
        by_step = {}
        for h in t.state.log_history:
            by_step.setdefault(h["step"], {}).update({k: v for k, v in h.items() if k in ("eval_a_loss", "eval_b_loss")})
        return {st: (d["eval_a_loss"], d["eval_b_loss"]) for st, d in by_step.items() if d}
    mine, theirs = losses(nb), losses(hf)
    assert list(mine) == list(theirs) == [2, 4]
    for st in mine: assert mine[st] == pytest.approx(theirs[st], rel=1e-4)
    # the best evaluation is tracked without checkpoints too (output_dir=None), as transformers does
    assert nb.state.best_metric == pytest.approx(hf.state.best_metric, rel=1e-4) and nb.state.best_global_step in (2, 4)
    with pytest.raises(Exception, match=r"metric_for_best_model='loss' is never computed.*'a_loss'"):
        Trainer(bert(), TrainingArguments(output_dir=None, disable_tqdm=True, **{**kw, "metric_for_best_model": "loss"}),
                train_dataset=data(16, 1), eval_dataset=evals).train()


def test_predictions_are_as_wide_as_the_inputs(tmp_path):
    # a dataset tokenized with padding="max_length": training batches are cut to their longest text, but predict()
    # returns logits as wide as the inputs, as transformers does, so they line up with the user's own columns
    from datasets import Dataset
    from transformers import BertConfig, BertForTokenClassification
    from transformers import Trainer as HFTrainer
    from transformers import TrainingArguments as HFArgs
    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                  intermediate_size=32, num_labels=3))
    g = random.Random(0)
    rows = []
    for _ in range(8):
        n = g.randrange(2, 6)  # 2-5 real tokens, padded to 12
        rows.append({"input_ids": [g.randrange(5, 100) for _ in range(n)] + [0] * (12 - n), "attention_mask": [1] * n + [0] * (12 - n),
                     "labels": [g.randrange(3) for _ in range(n)] + [-100] * (12 - n)})
    mine = Trainer(model, args()).predict(rows)
    theirs = HFTrainer(model, HFArgs(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_eval_batch_size=4)
                       ).predict(Dataset.from_list(rows))
    assert mine.predictions.shape == theirs.predictions.shape == (8, 12, 3)
    assert np.allclose(mine.predictions, theirs.predictions, atol=1e-5)
    assert (mine.label_ids == theirs.label_ids).all()


def test_squeezed_logits_of_a_batch_of_one_are_kept():
    # a regression head that squeezes its output gives 0-d logits for a last batch of one example
    class Regress(torch.nn.Module):
        def __init__(self): super().__init__(); self.lin = torch.nn.Linear(3, 1)
        def forward(self, x, labels=None):
            p = self.lin(x).squeeze()
            return {"loss": torch.nn.functional.mse_loss(p, labels), "logits": p} if labels is not None else {"logits": p}
    rows = [{"x": [float(i), 1.0, -1.0], "labels": float(i)} for i in range(5)]
    out = Trainer(Regress(), args()).predict(rows)  # batches of 4 and 1
    assert out.predictions.shape == (5,) and out.label_ids.shape == (5,)


def test_rounded_fractions_must_still_give_every_save_an_evaluation(tmp_path):
    # on 10 steps, eval_steps=0.25 evaluates every 3 steps and save_steps=0.5 saves every 5: the best checkpoint could
    # never be chosen among the saved ones, so the run is refused before its first step
    trainer = Trainer(bert(), args(tmp_path, max_steps=10, eval_strategy="steps", eval_steps=0.25, save_strategy="steps",
                                   save_steps=0.5, load_best_model_at_end=True), train_dataset=data(16, 1), eval_dataset=data(8, 2))
    with pytest.raises(ValueError, match="saves every 5 steps and eval_steps=0.25 evaluates every 3"):
        trainer.train()
    assert trainer.state.global_step == 0 and not list(tmp_path.glob("checkpoint-*"))


def test_early_stopping_on_a_metric_the_evaluation_lacks_fails_before_training():
    # a dict of eval datasets names its losses a_loss and b_loss: early stopping on the default "loss" would train
    # until the first evaluation and fail there; the preflight says so before the first step
    trainer = Trainer(bert(), args(max_steps=20, eval_strategy="steps", eval_steps=10), train_dataset=data(16, 1),
                      eval_dataset={"a": data(8, 2), "b": data(8, 3)}, callbacks=[EarlyStoppingCallback(2)])
    with pytest.raises(ValueError, match=r"metric_for_best_model='loss' is never computed.*'a_loss'"):
        trainer.train()
    assert trainer.state.global_step == 0
