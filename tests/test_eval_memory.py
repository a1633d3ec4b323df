"""Evaluating a causal LM with a streaming `Perplexity` keeps memory flat as the evaluation set grows.

Each measurement runs in a fresh process: a GPT-2 with a 4,000-token vocabulary, examples of 128 tokens, and
`evaluate()` on n or 4n examples. A thread samples the resident set size (RSS) every millisecond during
`evaluate()`; the growth is the peak minus the RSS just before the call, after a warm-up evaluation has
allocated everything a first call allocates once (lazy imports, the allocator's first arenas).

The contrast is transformers' `Trainer` with a `compute_metrics` that computes the same perplexity from the logits:
it keeps every logit of the set (128 x 4,000 floats, 2 MB per example), so its growth is about 4 times larger at 4n.
"""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

N = 64
VOCAB, SEQ, BATCH = 4000, 128, 8
LOGITS_PER_BATCH = BATCH * SEQ * VOCAB * 4  # bytes of one batch's float32 logits: 16 MB

WORKER = r"""
import json, sys, tempfile, threading, time
import psutil, torch
torch.set_num_threads(1)
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel

which, n = sys.argv[1], int(sys.argv[2])
VOCAB, SEQ, BATCH = 4000, 128, 8
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=1, n_head=2))
def blocks(k):
    ids = torch.randint(0, VOCAB, (k, SEQ), generator=torch.Generator().manual_seed(k)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})
out = tempfile.mkdtemp()

if which == "nbtrain":
    from nbtrain import Trainer, TrainingArguments
    from nbtrain.lm import Perplexity
    args = TrainingArguments(out, per_device_eval_batch_size=BATCH, report_to="none", disable_tqdm=True)
    trainer = Trainer(model, args, metrics={"perplexity": Perplexity()})
else:
    from transformers import Trainer, TrainingArguments
    def compute_metrics(p):  # the usual recipe: every logit of the set arrives at once
        logits, labels = torch.from_numpy(p.predictions[:, :-1]), torch.from_numpy(p.label_ids[:, 1:])
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
        return {"perplexity": float(nll.exp())}
    args = TrainingArguments(out, per_device_eval_batch_size=BATCH, report_to="none", disable_tqdm=True, use_cpu=True)
    trainer = Trainer(model, args, compute_metrics=compute_metrics)

trainer.evaluate(blocks(2 * BATCH))  # warm-up: what a first evaluation allocates once
proc, peak, done = psutil.Process(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(0.001)
ds = blocks(n)
base = proc.memory_info().rss
sampler = threading.Thread(target=sample, daemon=True); sampler.start()
metrics = trainer.evaluate(ds)
done.set(); sampler.join()
peak[0] = max(peak[0], proc.memory_info().rss)
print(json.dumps({"growth": peak[0] - base, "perplexity": metrics["eval_perplexity"]}))
"""


def _growth(which: str, n: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           # glibc gives large freed blocks back at once instead of keeping them by a threshold that adapts as the
           # program runs: the RSS then follows the memory in use, not what the allocator happens to keep cached
           "MALLOC_MMAP_THRESHOLD_": "1048576",
           "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, "-c", WORKER, which, str(n)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _growths(which: str) -> tuple[dict, dict]:
    "Growth at n and at 4n, measured in two processes side by side (each measures its own RSS)."
    with ThreadPoolExecutor(2) as pool: return tuple(pool.map(lambda n: _growth(which, n), (N, 4 * N)))


def _mb(b: int) -> str: return f"{b / 2**20:7.1f} MB"


def test_nbtrain_evaluate_memory_does_not_grow_with_the_eval_set():
    small, large = _growths("nbtrain")
    print(f"\nnbtrain evaluate() with Perplexity: growth {_mb(small['growth'])} at n={N}, {_mb(large['growth'])} at 4n={4 * N}")
    # Flat: the growth at 4n is within 20% of the growth at n, give or take one batch of logits (16 MB), which is the
    # granularity at which the allocator keeps or returns freed blocks. Keeping the predictions would add 384 MB.
    assert large["growth"] <= 1.2 * small["growth"] + LOGITS_PER_BATCH, (small, large)
    # random tokens: the perplexity of an untrained model is near the vocabulary size
    assert all(0.5 * VOCAB < m["perplexity"] < 2 * VOCAB for m in (small, large))


def test_transformers_trainer_with_compute_metrics_grows_with_the_eval_set():
    # the contrast, and a check that the probe above does see memory kept across batches
    small, large = _growths("transformers")
    print(f"\ntransformers.Trainer with compute_metrics: growth {_mb(small['growth'])} at n={N}, "
          f"{_mb(large['growth'])} at 4n={4 * N}")
    kept = 3 * N * SEQ * VOCAB * 4  # the logits of the 3n extra examples
    assert large["growth"] - small["growth"] > 0.8 * kept, (small, large)
