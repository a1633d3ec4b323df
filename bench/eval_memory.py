"""Peak resident memory that `evaluate()` adds on a causal LM, for one library and one eval-set size, in this process.

    python bench/eval_memory.py --lib nbtrain --n 256     # prints {"growth": bytes, ...} as its last line
    python bench/eval_memory.py --lib hf --n 256          # transformers.Trainer with compute_metrics

`growth(lib, n)` runs it in a fresh process (what `bench/run.py` and `tests/test_eval_memory.py` call), with
glibc told to hand large freed blocks back at once (`MALLOC_MMAP_THRESHOLD_`), so that the resident size follows
the memory in use rather than what the allocator happens to keep cached.

A GPT-2 of one layer with a 4,000-token vocabulary, examples of 128 random tokens, batch 8, one thread. One
evaluation of 16 examples runs first, so lazy imports and first allocations are not counted; then the resident set
size is sampled every millisecond during `evaluate()` of n examples, and the peak minus the size just before is
the growth. transformers keeps every logit for `compute_metrics` (n x 128 x 4,000 floats); nbtrain streams its
metrics batch by batch. `bench/run.py` runs this at n and 4n for both.
"""
from __future__ import annotations

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import psutil
import torch

VOCAB, SEQ, BATCH = 4000, 128, 8
LOGITS_PER_BATCH = BATCH * SEQ * VOCAB * 4  # bytes of one batch of float32 logits: 16 MB


def model():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=1, n_head=2))


def dataset(n: int):
    from datasets import Dataset
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(n)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def perplexity(pred) -> dict:
    "transformers' way: from all the logits, kept until the end (shifted, as the model's own loss is)."
    logits, labels = pred.predictions, pred.label_ids
    logits, labels = torch.from_numpy(np.asarray(logits))[:, :-1], torch.from_numpy(np.asarray(labels))[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return {"perplexity": float(torch.exp(nll))}


def make_trainer(lib: str, out: str):
    if lib == "hf":
        from transformers import Trainer, TrainingArguments
        args = TrainingArguments(output_dir=out, per_device_eval_batch_size=BATCH, report_to="none", use_cpu=True,
                                 disable_tqdm=True)
        return Trainer(model=model(), args=args, compute_metrics=perplexity)
    from nbtrain import Trainer, TrainingArguments
    from nbtrain.lm import Perplexity
    args = TrainingArguments(output_dir=None, per_device_eval_batch_size=BATCH, disable_tqdm=True)
    return Trainer(model(), args, metrics={"perplexity": Perplexity()})


class PeakRSS:
    "The largest resident set size seen while in the block, sampled every millisecond."
    def __enter__(self):
        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.before = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.stop.wait(0.001)

    def __exit__(self, *exc):
        self.stop.set(); self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.growth = self.peak - self.before


def measure(lib: str, n: int) -> dict:
    "Peak RSS growth (MB) of one `evaluate()` on n examples, after a warm-up evaluation."
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(lib, out)
        trainer.evaluate(dataset(2 * BATCH))
        ds = dataset(n)
        with PeakRSS() as peak:
            metrics = trainer.evaluate(ds)
    return {"lib": lib, "n": n, "growth": peak.growth, "perplexity": metrics["eval_perplexity"]}


def growth(lib: str, n: int) -> dict:
    "`measure(lib, n)` in a fresh process."
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, __file__, "--lib", lib, "--n", str(n)], capture_output=True, text=True, env=env,
                         timeout=600)
    if out.returncode: raise RuntimeError(f"eval_memory.py --lib {lib} --n {n} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lib", choices=("hf", "nbtrain"), required=True)
    p.add_argument("--n", type=int, required=True)
    a = p.parse_args()
    print(json.dumps(measure(a.lib, a.n)))
