"""A dataset tokenized with `padding="max_length"`: transformers.Trainer and nbtrain on the same data and arguments.

    python bench/padding.py              # 1,024 training texts, 2 epochs; prints steps/s and accuracy of both
    python bench/padding.py loguniform   # the heavier-tailed lengths

Texts of 8 to 256 tokens, padded to 256 with an attention mask, as the many tutorials that call `tokenizer(..., padding="max_length", max_length=256)` leave them.
Two length distributions: `lognormal` (median 48
tokens, sigma 0.75, clipped to 8..256: the right-skewed shape of sentence and review lengths in common
classification sets) and `loguniform` (every length scale from 8 to 256 equally likely: a heavier upper tail, so
a batch of 8 usually holds one text near 200 tokens). The label says which of two keyword tokens occurs in the text. A tiny BERT (hidden 16, one layer, 256 positions),
batch 8, one thread. nbtrain's default collation cuts each batch back to its longest text (the cut part is
masked padding, so the loss is the same: `nbs/01_data.ipynb` shows it); transformers trains on all 256 positions.
"""
from __future__ import annotations

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import math
import random
import tempfile

import torch

MAX_LEN, VOCAB, BATCH, LR = 256, 1000, 8, 1e-3
POSITIVE, NEGATIVE = 5, 6


DISTRIBUTIONS = {
    "lognormal": lambda rng: rng.lognormvariate(math.log(48), 0.75),
    "loguniform": lambda rng: math.exp(rng.uniform(math.log(8), math.log(MAX_LEN + 1))),
}


def padded_dataset(n: int, seed: int, lengths: str = "lognormal"):
    "`n` keyword texts of 8..256 tokens, padded on the right to 256, with their attention masks."
    from datasets import Dataset
    rng = random.Random(seed)
    cols = {"input_ids": [], "attention_mask": [], "labels": []}
    for _ in range(n):
        length = min(MAX_LEN, max(8, int(DISTRIBUTIONS[lengths](rng))))
        label = rng.randrange(2)
        ids = [1] + [rng.randrange(10, VOCAB) for _ in range(length - 1)]
        ids[rng.randrange(1, length)] = POSITIVE if label else NEGATIVE
        cols["input_ids"].append(ids + [0] * (MAX_LEN - length))
        cols["attention_mask"].append([1] * length + [0] * (MAX_LEN - length))
        cols["labels"].append(label)
    return Dataset.from_dict(cols)


def model():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=32, max_position_embeddings=MAX_LEN, num_labels=2))


def accuracy(pred) -> dict:
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def run(lib: str, train, test, epochs: int) -> dict:
    common = dict(num_train_epochs=epochs, per_device_train_batch_size=BATCH, per_device_eval_batch_size=32, learning_rate=LR,
                  warmup_steps=20, logging_steps=50, save_strategy="no", report_to="none", disable_tqdm=True, seed=0)
    with tempfile.TemporaryDirectory() as out:
        if lib == "hf":
            from transformers import Trainer, TrainingArguments
            from transformers import PrinterCallback
            trainer = Trainer(model=model(), args=TrainingArguments(output_dir=out, use_cpu=True, **common), train_dataset=train,
                              compute_metrics=accuracy)
            trainer.remove_callback(PrinterCallback)  # what disable_tqdm puts in: it prints every log
        else:
            from nbtrain import Trainer, TrainingArguments
            trainer = Trainer(model(), TrainingArguments(output_dir=None, **common), train_dataset=train, compute_metrics=accuracy)
        result = trainer.train()
        metrics = trainer.evaluate(test)
    return {"steps_per_second": result.metrics["train_steps_per_second"], "accuracy": metrics["eval_accuracy"],
            "steps": result.global_step, "epochs": epochs}


def compare(n_train: int = 1024, epochs: int = 2, lengths: str = "lognormal") -> dict:
    "Both trainers on the same pre-padded data: steps/s and held-out accuracy."
    torch.set_num_threads(1)
    import datasets
    import transformers
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    train, test = padded_dataset(n_train, 0, lengths), padded_dataset(256, 1, lengths)
    res = {lib: run(lib, train, test, epochs) for lib in ("hf", "nbtrain")}
    res["epochs"], res["lengths"] = epochs, lengths
    return res


if __name__ == "__main__":
    import sys
    print(json.dumps(compare(lengths=sys.argv[1] if len(sys.argv) > 1 else "lognormal")))
