"""A tiny, fast, offline training setup that the kernel tests and `bench/display_overhead.py` import inside a kernel.

A two-layer MLP on 8 random features (a step costs about a millisecond on one CPU thread), so the per-step cost of
the progress display is what shows. Everything is seeded: two trainers made with the same arguments train alike.
"""
from __future__ import annotations

import torch
from torch import nn

N_FEATURES = 8


class TinyNet(nn.Module):
    "Returns `{'loss', 'logits'}` like a transformers model."
    def __init__(self, hidden: int = 16, num_labels: int = 2):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, num_labels))

    def forward(self, x, labels=None):
        logits = self.body(x)
        out = {"logits": logits}
        if labels is not None: out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def make_data(n: int, seed: int = 0) -> list[dict]:
    "`n` examples `{'x': 8 floats, 'labels': 0/1}`; the label is the sign of a fixed linear function, so it is learnable."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEATURES, generator=g)
    w = torch.linspace(-1, 1, N_FEATURES)
    y = (x @ w > 0).long()
    return [{"x": xi.tolist(), "labels": int(yi)} for xi, yi in zip(x, y)]


def make_trainer(max_steps: int = 2000, eval_steps: int | None = 100, output_dir: str | None = None, metric: bool = True,
                 callbacks: list | None = None, model: str = "mlp", **kwargs):
    """A Trainer with the same initial weights and data each time; extra kwargs go to TrainingArguments.

    `model="mlp"`: `TinyNet` (about 1 ms a step); `model="bert"`: conftest's one-layer BERT from a config on its
    keyword data (a few ms a step)."""
    from nbtrain import Trainer, TrainingArguments
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if model == "bert":
        from conftest import keyword_dataset, tiny_bert
        net, train_ds, eval_ds = tiny_bert(seed=0), keyword_dataset(256, seed=1), keyword_dataset(64, seed=2)
    else:
        net, train_ds, eval_ds = TinyNet(), make_data(256, seed=1), make_data(64, seed=2)
    defaults = dict(output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=8, per_device_eval_batch_size=32,
                    learning_rate=1e-2, logging_steps=50, save_strategy="no", report_to="none", seed=0,
                    eval_strategy="steps" if eval_steps else "no", eval_steps=eval_steps)
    args = TrainingArguments(**{**defaults, **kwargs})
    metrics = None
    if metric:
        from torchmetrics.classification import MulticlassAccuracy
        metrics = {"accuracy": MulticlassAccuracy(num_classes=2)}
    return Trainer(net, args, train_dataset=train_ds, eval_dataset=eval_ds if eval_steps else None,
                   metrics=metrics, callbacks=callbacks)
