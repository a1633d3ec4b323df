"""Property: whatever the TrainingArguments and whatever the dataset, `Trainer(...).train()` either trains or raises an
nbtrain error with a message — never a bare KeyError, IndexError, AttributeError or a shape error from inside torch.

Each example starts from a run that works (a tiny MLP, up to 12 rows, 1-3 steps) and breaks it in up to two
arguments and one way in each dataset: empty, one row, ragged lists, wrong dtypes, None, nested lists, missing or
extra columns (in every row or in one row deep in the data), labels out of range, rows that are not dicts, things
that are not datasets. The broken row is anywhere, so some failures only show at a later step or in evaluation.
"""
from __future__ import annotations

import collections
import linecache
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings, strategies as st  # noqa: E402

import nbtrain  # noqa: E402
from nbtrain import Trainer, TrainingArguments  # noqa: E402
from nbtrain.checkpoint import CheckpointError, CheckpointWriteError  # noqa: E402
from nbtrain.data import DataError  # noqa: E402
from nbtrain.metrics import MetricError  # noqa: E402
from nbtrain.trainer import NonFiniteLossError  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_train import N_FEATURES, TinyNet  # noqa: E402

torch.set_num_threads(1)
NBTRAIN = os.path.dirname(nbtrain.__file__)
NBTRAIN_ERRORS = (DataError, CheckpointError, CheckpointWriteError, MetricError, NonFiniteLossError)


def nbtrain_error(e: BaseException) -> bool:
    """One of nbtrain's error classes, or a ValueError / TypeError raised by a `raise` statement in nbtrain's own code
    (TrainingArguments and Trainer raise those for bad arguments) — not one from torch, numpy or a stray lookup."""
    if isinstance(e, NBTRAIN_ERRORS): return True
    if not isinstance(e, (ValueError, TypeError)): return False
    tb = e.__traceback__
    while tb.tb_next is not None: tb = tb.tb_next
    path, line = tb.tb_frame.f_code.co_filename, linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno)
    return path.startswith(NBTRAIN) and line.strip().startswith("raise ")


# ---- arguments: each name with values that are wrong in some way (type, range, choice, combination)
BAD_ARGS = {
    "per_device_train_batch_size": [0, -1, 2.0, True, "8"], "per_device_eval_batch_size": [0, None],
    "gradient_accumulation_steps": [0, -2, 1.5, 2], "max_steps": [0, -2, 1.5, "3"],
    "num_train_epochs": [0, -1, float("nan"), float("inf"), 0.25], "learning_rate": [0, -1e-3, float("nan"), float("inf"), "1e-3", 1e3],
    "warmup_ratio": [-0.1, 1.5, float("nan"), 1.0], "warmup_steps": [-1, 1.5, 100], "lr_scheduler_type": ["cosin", "poly", None, "cosine"],
    "logging_steps": [0, -1, 0.5], "save_strategy": ["yes", None, "epoch", "best"], "save_steps": [0, -5],
    "eval_strategy": ["steps", "epoch", "sometimes"], "eval_steps": [0, -1], "label_names": [["y"], [], "labels", [1]],
    "max_grad_norm": [-1.0, float("nan"), 0.0], "weight_decay": [-1.0, float("nan"), 0.1], "dataloader_num_workers": [-1, 1.5],
    "seed": [-5, 2**33, 1.5, None], "data_seed": [-1, 2**40], "metric_for_best_model": ["accuracy", "f1", "loss"],
    "load_best_model_at_end": [True], "save_total_limit": [0, -1, 1], "optim": ["sgd", "adamw"],
    "logging_strategy": ["no", "epoch", "often"], "adam_beta1": [1.5, -0.1], "adam_beta2": [1.0, 2.0], "adam_epsilon": [-1.0, float("nan")],
    "output_dir": [None], "greater_is_better": [True], "fp16": [True], "bf16": [True], "report_to": ["tensorbord", ["none", "foo"]],
    "remove_unused_columns": [False], "dataloader_drop_last": [True], "group_by_length": [True], "logging_first_step": [True],
    "nan_check": ["step", "off", "sometimes"], "evaluation_strategy": ["epoch"], "learning_rat": [1e-3],
}

# ---- datasets: a working list of rows, broken in one way at row `p`
FAULTS = ["none", "empty", "one_row", "ragged", "short_all", "str_feature", "none_feature", "nested", "int_feature",
          "missing_labels_row", "missing_x_row", "missing_labels_all", "extra_col", "extra_text_col", "label_oob", "label_neg",
          "label_float", "label_str", "label_none", "label_alias", "label_list", "tuple_rows", "scalar_rows", "not_a_dataset",
          "dict_of_columns", "nan_feature", "inf_feature", "dataset_none"]


def good_row(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    return {"x": torch.randn(N_FEATURES, generator=g).tolist(), "labels": i % 2}


def broken(fault: str, n: int, p: int, offset: int = 0):
    rows = [good_row(offset + i) for i in range(n)]
    p = min(p, n - 1)
    r = rows[p]
    if fault == "empty": return []
    if fault == "one_row": return rows[:1]
    if fault == "dataset_none": return None
    if fault == "ragged": r["x"] = r["x"][:3]
    elif fault == "short_all": rows = [{**q, "x": q["x"][:3]} for q in rows]
    elif fault == "str_feature": r["x"] = "abc"
    elif fault == "none_feature": r["x"] = None
    elif fault == "nested": r["x"] = [[1.0] * N_FEATURES]
    elif fault == "int_feature": rows = [{**q, "x": [1] * N_FEATURES} for q in rows]
    elif fault == "missing_labels_row": del r["labels"]
    elif fault == "missing_x_row": del r["x"]
    elif fault == "missing_labels_all": rows = [{"x": q["x"]} for q in rows]
    elif fault == "extra_col": r["extra"] = 1.0
    elif fault == "extra_text_col": rows = [{**q, "text": "hello"} for q in rows]
    elif fault == "label_oob": r["labels"] = 7
    elif fault == "label_neg": r["labels"] = -3
    elif fault == "label_float": r["labels"] = 0.5
    elif fault == "label_str": r["labels"] = "pos"
    elif fault == "label_none": r["labels"] = None
    elif fault == "label_alias": rows = [{"x": q["x"], "label": q["labels"]} for q in rows]
    elif fault == "label_list": r["labels"] = [0, 1]
    elif fault == "tuple_rows": return [tuple(q.values()) for q in rows]
    elif fault == "scalar_rows": return [q["labels"] for q in rows]
    elif fault == "not_a_dataset": return iter(rows)
    elif fault == "dict_of_columns": return {"x": [q["x"] for q in rows], "labels": [q["labels"] for q in rows]}
    elif fault == "nan_feature": r["x"] = [float("nan")] * N_FEATURES
    elif fault == "inf_feature": r["x"] = [float("inf")] * N_FEATURES
    return rows


def as_hf_dataset(rows):
    "The same rows as a `datasets.Dataset`, where Arrow can hold them."
    import datasets
    try: return datasets.Dataset.from_list(rows)
    except Exception: return rows


def test_every_combination_trains_or_raises_an_nbtrain_error():
    seen = collections.Counter()
    faults_seen = set()

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(n=st.integers(1, 12), fault=st.sampled_from(FAULTS), p=st.integers(0, 11),
           eval_fault=st.sampled_from(["absent", "none", "none"] + FAULTS), bad=st.lists(st.sampled_from(sorted(BAD_ARGS)), max_size=2, unique=True),
           pick=st.integers(0, 4), hf=st.booleans(), bs=st.integers(1, 4), steps=st.integers(1, 3),
           eval_mode=st.sampled_from(["no", "steps", "epoch"]), save=st.booleans())
    def one_run(n, fault, p, eval_fault, bad, pick, hf, bs, steps, eval_mode, save):
        faults_seen.add(fault)
        with tempfile.TemporaryDirectory() as out:
            train = broken(fault, n, p)
            ev = None if eval_fault == "absent" else broken(eval_fault, n, p, offset=100)
            if hf and isinstance(train, list) and train and all(isinstance(r, dict) for r in train): train = as_hf_dataset(train)
            kw = dict(output_dir=out, disable_tqdm=True, report_to="none", max_steps=steps, per_device_train_batch_size=bs,
                      eval_strategy=eval_mode if ev is not None else "no", eval_steps=1, logging_steps=1,
                      save_strategy="steps" if save else "no", save_steps=1)
            for name in bad: kw[name] = BAD_ARGS[name][pick % len(BAD_ARGS[name])]
            try:
                torch.manual_seed(0)
                trainer = Trainer(TinyNet(), TrainingArguments(**kw), train_dataset=train, eval_dataset=ev)
                trainer.train()
            except Exception as e:
                assert nbtrain_error(e), f"{type(e).__name__} is not an nbtrain error: {e}"
                assert len(str(e)) > 30, f"a message too short to say what to fix: {e!r}"
                seen["refused"] += 1
                seen[type(e).__name__] += 1
                return
            assert trainer.state.global_step >= 1
            seen["trained"] += 1

    for i, fault in enumerate(FAULTS):  # each fault at least once, deep in the data, on top of the 300 drawn examples
        one_run = example(n=12, fault=fault, p=9, eval_fault=FAULTS[-1 - i], bad=[], pick=0, hf=i % 2 == 0, bs=4, steps=3,
                          eval_mode="steps", save=True)(one_run)
    one_run()
    print(dict(seen))
    assert seen["trained"] + seen["refused"] == 300 + len(FAULTS)
    assert seen["trained"] >= 30 and seen["refused"] >= 100  # both outcomes well covered
    assert seen["DataError"] >= 30 and seen["ValueError"] >= 30
    assert faults_seen == set(FAULTS)
