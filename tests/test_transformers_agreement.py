"""Same arguments, same numbers: nbtrain.Trainer and transformers.Trainer side by side on tiny models, for the
places where a silent difference would change what a user reads or trains (each once differed):

- gradient accumulation weighs each micro-batch by its labelled tokens, shifted for a causal LM, and a micro-batch
  whose labels are all -100 (a prompt without its answer) adds nothing instead of making the step NaN;
- the learning rate logged is the one the step used;
- step-wise evaluation also scores the last step, `logging_first_step` logs step 1 with any strategy, and
  intervals below 1 (`logging_steps`, `eval_steps`, `warmup_steps`) are fractions of the run;
- question-answering models have start and end positions as labels;
- the evaluation loss comes from `compute_loss_func` (or a `compute_loss` override), as the training loss does.
"""
import random

import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(1)


pytestmark = pytest.mark.usefixtures("quiet_transformers")


def both(make_model, train=None, evaluate=None, nb_cls=None, hf_cls=None, tmp_path=None, **kw):
    "An nbtrain and a transformers Trainer with the same arguments (each on its own copy of the model)."
    from datasets import Dataset
    from transformers import Trainer as HFTrainer
    from transformers import TrainingArguments as HFArgs

    from nbtrain import Trainer, TrainingArguments
    extra = {k: kw.pop(k) for k in ("compute_loss_func", "compute_metrics") if k in kw}
    ds = lambda d: None if d is None else Dataset.from_list(d)
    nb = (nb_cls or Trainer)(make_model(), TrainingArguments(output_dir=None, disable_tqdm=True, report_to="none", **kw),
                             train_dataset=train, eval_dataset=evaluate, **extra)
    hf = (hf_cls or HFTrainer)(make_model(), HFArgs(output_dir=str(tmp_path), use_cpu=True, report_to="none", disable_tqdm=True,
                                                    save_strategy="no", **kw),
                               train_dataset=ds(train), eval_dataset=ds(evaluate), **extra)
    return nb, hf


def logged(trainer, key: str) -> list:
    return [h[key] for h in trainer.state.log_history if key in h]


def steps_with(trainer, key: str) -> list[int]:
    return [h["step"] for h in trainer.state.log_history if key in h]


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16))


def bert(num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=32, num_labels=num_labels))


def classification_data(n: int, seed: int) -> list[dict]:
    g = random.Random(seed)
    return [{"input_ids": [g.randrange(1, 100) for _ in range(8)], "labels": g.randrange(2)} for _ in range(n)]


def test_accumulation_weighs_causal_lm_tokens_as_transformers(tmp_path):
    # one long sequence and one with 2 real tokens: a causal LM predicts 9 tokens of the first and 1 of the second,
    # so counting labels without the shift (10 and 2) weighs the short one 2x too much
    ids = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [20, 21, 0, 0, 0, 0, 0, 0, 0, 0]]
    data = [{"input_ids": ids[0], "attention_mask": [1] * 10, "labels": ids[0]},
            {"input_ids": ids[1], "attention_mask": [1, 1] + [0] * 8, "labels": [20, 21] + [-100] * 8}]
    nb, hf = both(llama, data, tmp_path=tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=1,
                  logging_steps=1, max_grad_norm=1e9)
    nb.train(); hf.train()
    # the exact mean over the window's predicted tokens, by hand
    m, total, count = llama(), 0.0, 0
    for d in data:
        logits = m(input_ids=torch.tensor([d["input_ids"]]), attention_mask=torch.tensor([d["attention_mask"]])).logits[0, :-1]
        targets = torch.tensor(d["labels"][1:])
        total += F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
        count += int((targets != -100).sum())
    assert logged(nb, "loss")[0] == pytest.approx(total / count, rel=1e-5)
    assert logged(nb, "loss")[0] == pytest.approx(logged(hf, "loss")[0], rel=1e-5)
    assert logged(nb, "grad_norm")[0] == pytest.approx(logged(hf, "grad_norm")[0], rel=1e-4)


def test_a_micro_batch_without_labels_adds_nothing(tmp_path):
    data = [{"input_ids": [5, 6, 7, 8, 9, 10], "attention_mask": [1] * 6, "labels": [-100, -100, -100, 8, 9, 10]},
            {"input_ids": [11, 12, 13, 14, 15, 16], "attention_mask": [1] * 6, "labels": [-100] * 6}]  # the prompt only
    nb, hf = both(llama, data, tmp_path=tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=2,
                  logging_steps=1)
    nb.train(); hf.train()
    assert all(torch.isfinite(p).all() for p in nb.model.parameters())
    assert logged(nb, "loss") == pytest.approx(logged(hf, "loss"), rel=1e-5)
    for (name, p), q in zip(nb.model.named_parameters(), hf.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


@pytest.mark.parametrize("warmup", [3, 0.5], ids=["steps", "fraction"])
def test_logged_learning_rate_is_the_one_the_step_used(tmp_path, warmup):
    # 6 steps; warmup_steps=0.5 is half of them, as in transformers 5
    nb, hf = both(bert, classification_data(10, 1), tmp_path=tmp_path, per_device_train_batch_size=2, num_train_epochs=2,
                  gradient_accumulation_steps=2, logging_steps=1, lr_scheduler_type="linear", warmup_steps=warmup)
    nb.train(); hf.train()
    lrs = logged(nb, "learning_rate")
    assert len(lrs) == 6 and lrs[0] == 0.0 and lrs[3] == pytest.approx(5e-5)  # from 0 (the first step's own rate) to the peak
    assert lrs == pytest.approx(logged(hf, "learning_rate"))


@pytest.mark.parametrize("kw, key, expected", [
    (dict(max_steps=7, eval_strategy="steps", eval_steps=3), "eval_loss", [3, 6, 7]),
    (dict(num_train_epochs=2, logging_strategy="epoch", logging_first_step=True), "loss", [1, 4, 8]),
    (dict(max_steps=12, logging_steps=0.25), "loss", [3, 6, 9, 12]),  # a quarter of the run: every 3 steps
    (dict(max_steps=10, eval_strategy="steps", eval_steps=0.5), "eval_loss", [5, 10])],
    ids=["final-eval", "first-step-log", "fraction-logging", "fraction-eval"])
def test_when_it_evaluates_and_logs(tmp_path, kw, key, expected):
    nb, hf = both(bert, classification_data(8, 1), classification_data(4, 3), tmp_path=tmp_path, per_device_train_batch_size=2, **kw)
    nb.train(); hf.train()
    assert steps_with(nb, key) == steps_with(hf, key) == expected


def test_question_answering_labels_reach_compute_metrics(tmp_path):
    from transformers import BertConfig, BertForQuestionAnswering

    def qa():
        torch.manual_seed(0)
        return BertForQuestionAnswering(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=32))
    g = random.Random(0)
    data = [{"input_ids": [g.randrange(1, 100) for _ in range(8)], "start_positions": g.randrange(8), "end_positions": g.randrange(8)}
            for _ in range(6)]
    seen = []
    def compute_metrics(p):
        seen.append(p.label_ids)
        return {"n": 0.0}
    nb, hf = both(qa, tmp_path=tmp_path, compute_metrics=compute_metrics)
    nb.predict(data)
    from datasets import Dataset
    hf.predict(Dataset.from_list(data))
    assert isinstance(seen[0], tuple) and len(seen[0]) == 2
    for mine, theirs in zip(seen[0], seen[1]):
        assert mine.tolist() == theirs.tolist()
    assert seen[0][0].tolist() == [d["start_positions"] for d in data]


def weighted_loss(outputs, labels, num_items_in_batch=None):
    "A class-weighted loss on 10x the model's own scale: an evaluation that ignores it shows."
    return 10 * F.cross_entropy(outputs.logits, labels, weight=torch.tensor([1.0, 3.0]))


def test_eval_loss_uses_compute_loss_func(tmp_path):
    data = classification_data(8, 1)
    nb, hf = both(bert, None, data, tmp_path=tmp_path, compute_loss_func=weighted_loss)
    mine, theirs = nb.evaluate()["eval_loss"], hf.evaluate()["eval_loss"]
    assert mine == pytest.approx(theirs, rel=1e-5)
    from nbtrain import Trainer, TrainingArguments
    plain = Trainer(bert(), TrainingArguments(output_dir=None, disable_tqdm=True), eval_dataset=data).evaluate()["eval_loss"]
    assert mine > 3 * plain  # the weighted loss, not the model's own


def test_eval_loss_uses_a_compute_loss_override(tmp_path):
    from transformers import Trainer as HFTrainer

    from nbtrain import Trainer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = weighted_loss(outputs, labels)
        return (loss, outputs) if return_outputs else loss
    nb, hf = both(bert, None, classification_data(8, 1), tmp_path=tmp_path,
                  nb_cls=type("Custom", (Trainer,), {"compute_loss": compute_loss}),
                  hf_cls=type("Custom", (HFTrainer,), {"compute_loss": compute_loss}))
    assert nb.evaluate()["eval_loss"] == pytest.approx(hf.evaluate()["eval_loss"], rel=1e-5)


def test_train_batch_size_is_one_devices_batch(tmp_path):
    # transformers' args.train_batch_size and state.train_batch_size count one device's batch; the examples per
    # optimizer step (batch x accumulation x processes) are nbtrain's state.total_train_batch_size
    nb, hf = both(bert, classification_data(16, 1), tmp_path=tmp_path, per_device_train_batch_size=2,
                  gradient_accumulation_steps=4, max_steps=2)
    nb.train(); hf.train()
    assert nb.args.train_batch_size == hf.args.train_batch_size == 2
    assert nb.state.train_batch_size == hf.state.train_batch_size == 2
    assert nb.state.total_train_batch_size == 8


def bert_without_dropout():
    model = bert()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout): m.p = 0.0  # the two trainers draw dropout masks in another order
    return model


@pytest.mark.parametrize("make_model", [bert_without_dropout, llama], ids=["classifier", "causal-lm"])
def test_label_smoothing_trains_as_transformers(tmp_path, make_model):
    # label_smoothing_factor: the same smoothed loss (shifted for a causal LM), logged and evaluated, step by step
    if make_model is bert_without_dropout: train, evaluate = classification_data(8, 1), classification_data(4, 3)
    else:
        g = random.Random(2)
        train = [{"input_ids": (ids := [g.randrange(1, 100) for _ in range(8)]), "labels": ids} for _ in range(8)]
        evaluate = train[:4]
    nb, hf = both(make_model, train, evaluate, tmp_path=tmp_path, per_device_train_batch_size=2, max_steps=4, logging_steps=1,
                  eval_strategy="steps", eval_steps=4, label_smoothing_factor=0.1)
    nb.train(); hf.train()
    plain, _ = both(make_model, train, tmp_path=tmp_path / "plain", per_device_train_batch_size=2, max_steps=1, logging_steps=1)
    plain.train()
    assert logged(nb, "loss")[0] != pytest.approx(logged(plain, "loss")[0], rel=1e-5)  # the smoothing changes the loss
    assert logged(nb, "loss") == pytest.approx(logged(hf, "loss"), rel=1e-5)
    assert logged(nb, "eval_loss") == pytest.approx(logged(hf, "eval_loss"), rel=1e-4)  # batch means summed in another order


def test_batch_eval_metrics_calls_compute_metrics_per_batch(tmp_path):
    # batch_eval_metrics=True: compute_metrics(eval_pred, compute_result=...) sees each batch, the last with
    # compute_result=True, and its return value then is the evaluation's metrics
    def make_metric(calls):
        sums = {"right": 0, "seen": 0}
        def accuracy(p, compute_result):
            calls.append(compute_result)
            preds, labels = torch.as_tensor(p.predictions).argmax(-1), torch.as_tensor(p.label_ids)
            sums["right"] += int((preds == labels).sum()); sums["seen"] += len(labels)
            if not compute_result: return {}
            value = sums["right"] / sums["seen"]; sums.update(right=0, seen=0)
            return {"accuracy": value}
        return accuracy
    nb_calls, hf_calls = [], []
    nb, hf = both(bert, classification_data(8, 1), classification_data(10, 3), tmp_path=tmp_path, per_device_train_batch_size=2,
                  per_device_eval_batch_size=4, max_steps=2, batch_eval_metrics=True)
    nb.compute_metrics, hf.compute_metrics = make_metric(nb_calls), make_metric(hf_calls)
    nb_metrics, hf_metrics = nb.evaluate(), hf.evaluate()
    assert nb_calls == hf_calls == [False, False, True]  # 10 examples in batches of 4
    assert nb_metrics["eval_accuracy"] == pytest.approx(hf_metrics["eval_accuracy"])
