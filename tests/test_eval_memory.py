"""Evaluating a causal LM with a streaming `Perplexity` keeps memory flat as the evaluation set grows.

Each measurement is `bench/eval_memory.py` in a fresh process: a GPT-2 with a 4,000-token vocabulary, examples of
128 tokens, and `evaluate()` on n or 4n examples; a thread samples the resident set size every millisecond during
`evaluate()`, and the growth is the peak minus the size just before the call, after a warm-up evaluation.

The contrast is transformers' `Trainer` with a `compute_metrics` that computes the same perplexity from the logits:
it keeps every logit of the set (128 x 4,000 floats, 2 MB per example), so its growth is about 4 times larger at 4n.
"""
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from eval_memory import LOGITS_PER_BATCH, SEQ, VOCAB, growth  # noqa: E402

N = 64


def _growths(lib: str) -> tuple[dict, dict]:
    "Growth at n and at 4n, measured in two processes side by side (each measures its own RSS)."
    with ThreadPoolExecutor(2) as pool: return tuple(pool.map(lambda n: growth(lib, n), (N, 4 * N)))


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
    small, large = _growths("hf")
    print(f"\ntransformers.Trainer with compute_metrics: growth {_mb(small['growth'])} at n={N}, "
          f"{_mb(large['growth'])} at 4n={4 * N}")
    kept = 3 * N * SEQ * VOCAB * 4  # the logits of the 3n extra examples
    assert large["growth"] - small["growth"] > 0.8 * kept, (small, large)
