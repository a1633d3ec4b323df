"""A causal LM's metrics pair the output at position t with the label at t + 1, as its loss does: through streaming
metrics, `preprocess_logits_for_metrics`, `compute_metrics` and `predict()`, by default, and equal to the value computed
from all the logits at once with that shift."""
import dataclasses

import numpy as np
import pytest
import torch

from nbtrain import Trainer, TrainingArguments

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("quiet_transformers")

V, T, BATCH = 24, 12, 4


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=T, n_embd=16, n_layer=1, n_head=2))


def counting(n: int, seed: int) -> list[dict]:
    "Rows that count up (mod V): the next token is always the current one plus one, never a copy of it."
    g = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        ids = [int((g.integers(V) + t) % V) for t in range(T)]
        labels = list(ids)
        if i % 3 == 0: labels[:4] = [-100] * 4  # unlabelled positions, as a prompt would be
        rows.append({"input_ids": ids, "labels": labels})
    return rows


class NextTokenAccuracy:
    "A streaming metric that counts: exact, whatever the order of the batches."
    def reset(self): self.correct, self.total = 0, 0
    def update(self, logits, labels):
        preds = logits.argmax(-1) if logits.dim() == labels.dim() + 1 else logits  # logits, or argmax predictions
        keep = labels != -100  # align() has dropped them from logits; predictions keep their shape
        self.correct += int((preds[keep] == labels[keep]).sum()); self.total += int(keep.sum())
    def compute(self): return self.correct / self.total


def reference(model, rows: list[dict], shift: bool) -> float:
    "Accuracy from all the evaluation logits at once (computed batch by batch, as the Trainer batches them)."
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(input_ids=torch.tensor([r["input_ids"] for r in rows[i:i + BATCH]])).logits
                            for i in range(0, len(rows), BATCH)])
    labels = torch.tensor([r["labels"] for r in rows])
    if shift: logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    return int((logits.argmax(-1)[keep] == labels[keep]).sum()) / int(keep.sum())


def token_accuracy(p) -> dict:
    preds, labels = p.predictions.argmax(-1), p.label_ids
    keep = labels != -100
    return {"acc": int((preds[keep] == labels[keep]).sum()) / int(keep.sum())}


def run_clm_accuracy(eval_preds) -> dict:
    "transformers' run_clm.py: it shifts by itself, after preprocess_logits_for_metrics took the argmax."
    preds, labels = eval_preds
    labels = labels[:, 1:].reshape(-1)
    preds = preds[:, :-1].reshape(-1)
    keep = labels != -100
    return {"acc": int((preds[keep] == labels[keep]).sum()) / int(keep.sum())}


def argmax_logits(logits, labels):
    return logits.argmax(dim=-1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    "A GPT-2 that has learnt some counting: its next-token accuracy is far from its copy accuracy."
    args = TrainingArguments(output_dir=str(tmp_path_factory.mktemp("out")), max_steps=40, learning_rate=1e-2,
                             per_device_train_batch_size=8, per_device_eval_batch_size=BATCH, save_strategy="no",
                             report_to="none", disable_tqdm=True)
    trainer = Trainer(gpt2(), args, train_dataset=counting(64, seed=0))
    trainer.train()
    return trainer.model, args


def evaluate(trained, rows, **kw) -> dict:
    model, args = trained
    shift = kw.pop("shift_metric_labels", None)
    return Trainer(model, dataclasses.replace(args, shift_metric_labels=shift), eval_dataset=rows, **kw).evaluate()


def test_next_token_accuracy_streaming_and_compute_metrics_equal_the_shifted_reference(trained):
    rows = counting(22, seed=1)  # 22 rows: the last batch is short
    shifted, copies = reference(trained[0], rows, shift=True), reference(trained[0], rows, shift=False)
    assert abs(shifted - copies) > 0.2, (shifted, copies)  # the pairing matters for this model
    m = evaluate(trained, rows, metrics={"acc": NextTokenAccuracy()}, compute_metrics=token_accuracy)
    assert m["eval_acc"] == shifted  # the two give one name: both are checked below, one at a time
    assert evaluate(trained, rows, metrics={"acc": NextTokenAccuracy()})["eval_acc"] == shifted
    assert evaluate(trained, rows, compute_metrics=token_accuracy)["eval_acc"] == shifted


def test_preprocess_logits_for_metrics_gets_the_shifted_pair(trained):
    rows, seen = counting(8, seed=2), []
    def preprocess(logits, labels):
        seen.append((tuple(logits.shape), labels.tolist()))
        return logits.argmax(-1)
    m = evaluate(trained, rows, compute_metrics=lambda p: {"n": float(p.predictions.shape[1])}, preprocess_logits_for_metrics=preprocess)
    assert [s for s, _ in seen] == [(BATCH, T - 1, V)] * 2 and m["eval_n"] == T - 1
    assert seen[0][1] == [r["labels"][1:] for r in rows[:BATCH]]


def test_run_clm_that_shifts_itself_is_not_shifted_twice(trained, capsys):
    rows = counting(12, seed=3)
    m = evaluate(trained, rows, compute_metrics=run_clm_accuracy, preprocess_logits_for_metrics=argmax_logits,
                 metrics={"stream": NextTokenAccuracy()})
    assert m["eval_acc"] == m["eval_stream"] == reference(trained[0], rows, shift=True)
    assert "run_clm_accuracy shifts the labels itself" in capsys.readouterr().out


def test_shift_metric_labels_false_pairs_as_transformers(trained):
    rows = counting(12, seed=4)
    m = evaluate(trained, rows, metrics={"acc": NextTokenAccuracy()}, shift_metric_labels=False)
    assert m["eval_acc"] == reference(trained[0], rows, shift=False) != reference(trained[0], rows, shift=True)


def test_predict_lines_predictions_up_with_label_ids(trained):
    model, args = trained
    rows = counting(6, seed=5)
    p = Trainer(model, args).predict(rows)
    assert p.predictions.shape == (6, T - 1, V) and p.label_ids.tolist() == [r["labels"][1:] for r in rows]


def test_a_classifier_is_not_shifted():
    from transformers import GPT2Config, GPT2ForSequenceClassification
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=V, n_positions=T, n_embd=16, n_layer=1, n_head=2, pad_token_id=0))
    rows = [{"input_ids": r["input_ids"], "labels": i % 2} for i, r in enumerate(counting(8, seed=6))]
    p = Trainer(model, TrainingArguments(output_dir=None, report_to="none", disable_tqdm=True)).predict(rows)
    assert p.predictions.shape == (8, 2) and p.label_ids.tolist() == [i % 2 for i in range(8)]
