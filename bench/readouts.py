"""Per-step cost of the token readouts (`num_tokens`, `tokens_per_second` in the logs): counted as nbtrain does, counted
with a mask sum on the device per micro-batch, and not counted at all, in one process.

The model is a bag of embeddings (an `nn.Embedding(1000, 8)` averaged under the attention mask, then a linear
layer: a fraction of a millisecond a step on one torch thread), on token data of 4 to 32 ids with an attention mask,
a `datasets.Dataset` padded by a tokenizer: the in-memory fast path, where a batch brings its own count. So what the
loop pays per step for counting tokens shows. Three variants of the same run (the counter told which way to count):

- `as built`: the count each fast-path batch brings (summed on the host from each example's count when gathered);
- `mask sum`: each micro-batch's `attention_mask.sum()` kept on the device (what a batch from a collator costs);
- `no count`: the readouts off (no `num_tokens` in the logs): the cost before the readouts existed.

Logs every 50 steps, no display (`disable_tqdm=True`), no evaluation. Steady state only: a callback times each step
from the end of step `--skip` to the last one, in wall clock and training-thread CPU time. Rounds are interleaved;
the best and the median round of each are printed.

    python bench/readouts.py                          # 2000 steps x 5 rounds each, ~1 min on 2 cores
    python bench/readouts.py --steps 600 --rounds 1   # quick check

Instruction counts, which a shared machine does not disturb: the same run under callgrind at two lengths, the
difference divided by the extra steps (set-up and imports cancel out), for each variant. Fix the hash seed: with a
random one, two runs of the same variant differed here by up to ~100k instructions per step (hashing changes code
paths), more than what is measured.

    for v in as-built mask-sum no-count; do for n in 100 300; do
      PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/readouts.py --one $v --steps $n 2>&1 | grep "Collected"
    done; done

Target: `as built` costs no more per step than `no count`.
"""
from __future__ import annotations

import argparse
import os
import random
import tempfile

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from torch import nn

from background import StepClock, interleaved, print_table  # this folder's background benchmark: the same clock and table
from nbtrain import Trainer, TrainingArguments
from nbtrain.data import TensorBatches
from nbtrain.readouts import TokenCounter

VARIANTS = ("as-built", "mask-sum", "no-count")


class BagOfEmbeddings(nn.Module):
    "Mean of the token embeddings under the mask, then a linear layer: a step costs little beside the loop."
    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(1000, 8), nn.Linear(8, 2)
    def forward(self, input_ids, attention_mask, labels):
        m = attention_mask.unsqueeze(-1).float()
        logits = self.out((self.emb(input_ids) * m).sum(1) / m.sum(1))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def dataset_and_tokenizer(n: int = 2048):
    "Token data of 4 to 32 ids (padded per batch by the tokenizer) and a word-level tokenizer made on the spot."
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    rng = random.Random(0)
    ids = [[rng.randrange(2, 1000) for _ in range(rng.randrange(4, 33))] for _ in range(n)]
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids],
                            "labels": [i[0] % 2 for i in ids]})
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]")),
                                  pad_token="[PAD]")
    return ds, tok


FIRST = TokenCounter._first  # the counter's own decision, kept before any variant replaces it


def count_with(variant: str):
    "Make the token counter count as `variant` says (decided on a run's first batch, as the counter itself does)."
    def decide(self, batch):
        if variant == "as-built": return FIRST(self, batch)
        self.count = self._mask if variant == "mask-sum" else None
        self.active = self.count is not None
        if self.active: self.count(batch)
    TokenCounter._first = decide


def one_run(variant: str, steps: int, skip: int, data) -> tuple[float, float]:
    "(wall s, thread CPU s) per step of one run; checks that the variant counted what it says."
    count_with(variant)
    clock = StepClock(skip)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=8, logging_steps=50,
                                 save_strategy="no", report_to="none", disable_tqdm=True, log_to_file=False, seed=0)
        trainer = Trainer(BagOfEmbeddings(), args, train_dataset=data[0], processing_class=data[1], callbacks=[clock])
        trainer.train()
    counted = "num_tokens" in trainer.state.log_history[0]
    assert counted == (variant != "no-count"), (variant, trainer.state.log_history[0])
    assert isinstance(trainer.get_train_dataloader().dataset, TensorBatches), "not on the fast path"
    return clock.per_step(steps)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--skip", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--one", choices=VARIANTS, help="one run only, no warm-up: for instruction counts under callgrind")
    a = p.parse_args()
    torch.set_num_threads(1)
    data = dataset_and_tokenizer()
    if a.one: return print(a.one, one_run(a.one, a.steps, min(a.skip, a.steps - 1), data))
    one_run("as-built", 300, 100, data)  # warm-up: first-call imports and allocations
    results = interleaved(lambda v: one_run(v, a.steps, a.skip, data), VARIANTS, a.rounds)
    print(f"bag of embeddings, batch 8 of 4-32 tokens, {a.steps} steps ({a.skip} skipped), {a.rounds} interleaved rounds; "
          f"load average {os.getloadavg()[0]:.2f}\n")
    print_table(results, "token count")


if __name__ == "__main__":
    main()
