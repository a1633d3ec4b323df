"""Tiny, offline fixtures shared by the tests: models built from configs, datasets built in memory."""
import os

# nothing in the test suite may download; set before transformers / datasets are imported anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import functools
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

VOCAB = 32        # token ids 0..31; 0 is padding, 1 is [CLS]
POSITIVE, NEGATIVE = 5, 6  # the keyword tokens that decide the label
SEQ_LEN = 8


def tiny_bert(dropout: float = 0.1, seed: int = 0, num_labels: int = 2):
    "A one-layer BertForSequenceClassification built from a config (nothing is downloaded)."
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=SEQ_LEN, num_labels=num_labels,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, classifier_dropout=dropout)
    return BertForSequenceClassification(config)


def keyword_columns(n: int, seed: int = 0) -> dict:
    """`n` fixed-length examples of token ids: label 1 when the keyword POSITIVE is present, 0 for NEGATIVE.

    Every sequence has SEQ_LEN tokens, so no padding (and no tokenizer) is needed."""
    rng = random.Random(seed)
    cols = {"input_ids": [], "attention_mask": [], "label": []}
    for _ in range(n):
        label = rng.randrange(2)
        ids = [1] + [rng.randrange(7, VOCAB) for _ in range(SEQ_LEN - 1)]
        ids[rng.randrange(1, SEQ_LEN)] = POSITIVE if label else NEGATIVE
        cols["input_ids"].append(ids)
        cols["attention_mask"].append([1] * SEQ_LEN)
        cols["label"].append(label)
    return cols


def keyword_dataset(n: int, seed: int = 0):
    "`keyword_columns` as a `datasets.Dataset`."
    from datasets import Dataset
    return Dataset.from_dict(keyword_columns(n, seed))


def snapshot(model: torch.nn.Module) -> dict:
    "A detached copy of every parameter, to compare weights before and after."
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def same_weights(model: torch.nn.Module, before: dict) -> bool:
    "Whether every parameter of `model` is bit-identical to the `snapshot` `before`."
    now = dict(model.named_parameters())
    return now.keys() == before.keys() and all(torch.equal(now[k].detach().cpu(), before[k].cpu()) for k in before)


@functools.cache
def _first_step_class():
    from nbtrain import TrainerCallback  # imported when first used: collecting the tests does not import nbtrain

    class FirstStep(TrainerCallback):
        """Records `first`, the first step a run executes (None while no step has run): a run resumed from
        checkpoint-k must start at step k + 1, where a run that ignored the checkpoint would start at step 1."""
        def __init__(self): self.first = None
        def on_step_end(self, args, state, control, **kwargs):
            if self.first is None: self.first = state.global_step
    return FirstStep


def FirstStep():
    "A new `FirstStep` callback (see `_first_step_class`)."
    return _first_step_class()()


@pytest.fixture
def quiet_transformers():
    "transformers' warnings and progress bars off for a test (files that compare with it use it for every test)."
    import warnings
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture
def tiny():
    "The helpers above, as a fixture (so tests need not import conftest)."
    import types
    return types.SimpleNamespace(bert=tiny_bert, columns=keyword_columns, dataset=keyword_dataset,
                                 snapshot=snapshot, same_weights=same_weights, SEQ_LEN=SEQ_LEN)


@pytest.fixture
def make_args(tmp_path):
    "nbtrain TrainingArguments writing under tmp_path, quiet, without checkpoints unless asked."
    from nbtrain import TrainingArguments

    def make(**kwargs):
        defaults = dict(output_dir=str(tmp_path / "out"), save_strategy="no", report_to="none", disable_tqdm=True)
        return TrainingArguments(**{**defaults, **kwargs})
    return make


def copy_source(dest: Path) -> Path:
    "Copy the repository's source to `dest`: git's tracked files and the untracked ones it does not ignore."
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout
        files = [f for f in out.decode().split("\0") if f and (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: what a build and nbdev read
        files = [p.relative_to(ROOT).as_posix() for d in ("nbs", "nbtrain", "tools") for p in (ROOT / d).rglob("*")
                 if p.is_file() and not {"__pycache__", ".ipynb_checkpoints"} & set(p.parts)]
        files += [f for f in ("settings.ini", "setup.py", "pyproject.toml", "README.md", "LICENSE") if (ROOT / f).is_file()]
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    return dest


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    "A copy of the repository's source, to run commands in that write into it (nbdev_export, pip wheel, ...)."
    return copy_source(tmp_path_factory.mktemp("repo") / "nbtrain")
