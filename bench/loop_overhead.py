"""Per-step overhead of the training loop: two raw PyTorch loops vs `transformers.Trainer` vs `nbtrain.Trainer`.

One tiny BERT classifier is trained four ways in the same process, on the same data, with the same
math (torch's fused AdamW, the default of both trainers, with two parameter groups, linear warmup/decay
via LambdaLR, grad-norm clipping at 1.0, batch 8, one CPU thread). The model is so small that a step costs a few milliseconds, so the
Python-side overhead of the loop shows; that overhead is what this benchmark measures.

The two raw loops: one over a DataLoader that collates the dataset's rows (what a hand-written loop usually does),
and the limit: one over the data already in tensors, one random permutation per epoch and each batch gathered by
index, no DataLoader. nbtrain's target is ≥ 0.97× the limit's steps/s.

Steady state only: each run trains `--steps` optimizer steps and the clock runs from the end of step
`--skip` to the end of the last step (a `TrainerCallback.on_step_end` for both trainers, the same point,
after `zero_grad`, in the raw loop), so set-up, preflight, first-step warm-up and tear-down are left out
for every variant alike. Rounds are interleaved (limit, raw, hf, nbtrain, limit, ...) and the best
round per variant is reported, in wall-clock time and, beside it, in CPU time of the training thread
(one torch thread and no DataLoader workers, so all the work runs in it), which other processes on a
shared machine disturb much less.

    python bench/loop_overhead.py                            # default: 1500 steps, 3 rounds (~3-4 min on 2 cores)
    python bench/loop_overhead.py --steps 300 --repeats 1    # quick check

On a shared machine wall clock is noise; count instructions instead, which other processes do not change: run one
variant under callgrind at two lengths with the same data and a fixed hash seed (a random one moves the count by up
to ~100k instructions per step), and divide the difference by the difference in steps, e.g. for nbtrain (and
`--only limit` for the ready-tensor loop):

    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/loop_overhead.py --only nbtrain --steps 40 --examples 1600
    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/loop_overhead.py --only nbtrain --steps 140 --examples 1600
"""
from __future__ import annotations

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU only, for every variant alike
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse
import gc
import platform
import tempfile
import time
import warnings

import torch
from torch import nn

BATCH = 8
SEQ_LEN = 32
VOCAB = 1000
NUM_LABELS = 2
LR = 1e-4
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
SEED = 0


# ---------------------------------------------------------------------------------------------- setup
def make_config(hidden: int = 16, layers: int = 1, max_len: int = SEQ_LEN):
    "The tiny BERT by default (hidden 16, one layer); `hidden=128, layers=4` is the small one."
    from transformers import BertConfig
    return BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                      intermediate_size=2 * hidden if hidden <= 16 else 4 * hidden, max_position_embeddings=max_len,
                      num_labels=NUM_LABELS)


def make_model(config, state_dict):
    "A fresh model with the shared initial weights."
    from transformers import BertForSequenceClassification
    model = BertForSequenceClassification(config)
    model.load_state_dict(state_dict)
    return model


def make_dataset(n: int):
    "Fixed-length random token data (no padding anywhere); examples come out as Python lists, as after tokenizing."
    from datasets import Dataset
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(1, VOCAB, (n, SEQ_LEN), generator=g)
    labels = torch.randint(0, NUM_LABELS, (n,), generator=g)
    # The default (list) format on purpose: with ds.set_format("torch"), nbtrain 0.0.1's preflight fails on the 0-d
    # label tensors (nbtrain/data.py `_lengths`: "len() of a 0-d tensor"). Every variant collates lists with torch.tensor.
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones(n, SEQ_LEN, dtype=torch.long).tolist(),
                              "labels": labels.tolist()})


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    "The raw loop's collator: one tensor per column, what transformers' default_data_collator makes of this data."
    return {k: torch.tensor([e[k] for e in examples]) for k in examples[0]}


def lr_lambda(warmup: int, total: int):
    "Linear warmup then linear decay to 0, as transformers' `get_linear_schedule_with_warmup`."
    def f(step: int) -> float:
        if step < warmup: return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def two_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    "Decayed weights; biases and LayerNorm parameters without weight decay (the trainers' split)."
    no_decay = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)}
    no_decay |= {id(p) for n, p in model.named_parameters() if n.endswith("bias")}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]


class Clock:
    "Marks (wall, thread CPU) times at the end of step `skip` and of step `steps`."
    def __init__(self, skip: int, steps: int):
        self.skip, self.steps, self.marks = skip, steps, {}

    def tick(self, step: int):
        if step == self.skip or step == self.steps: self.marks[step] = (time.perf_counter(), time.thread_time())

    def result(self) -> dict:
        "Seconds per step over the window: wall clock and CPU time of this thread."
        if self.skip not in self.marks or self.steps not in self.marks: raise RuntimeError("the timed window was not reached")
        (w0, c0), (w1, c1), n = self.marks[self.skip], self.marks[self.steps], self.steps - self.skip
        return {"wall": (w1 - w0) / n, "cpu": (c1 - c0) / n}


def clock_callback(base, clock: Clock):
    "A `base` (transformers' or nbtrain's TrainerCallback) that ticks `clock` at every step end."
    class ClockCallback(base):
        def on_train_begin(self, args, state, control, **kwargs):
            if torch.get_num_threads() != 1:
                warnings.warn(f"torch uses {torch.get_num_threads()} threads under {base.__module__}; resetting to 1")
                torch.set_num_threads(1)

        def on_step_end(self, args, state, control, **kwargs):
            clock.tick(state.global_step)
    return ClockCallback()


# ---------------------------------------------------------------------------------------------- variants
def run_raw(config, init, ds, steps: int, clock: Clock, warmup: int) -> float:
    from torch.utils.data import DataLoader
    torch.manual_seed(SEED)
    model = make_model(config, init)
    optimizer = torch.optim.AdamW(two_param_groups(model, WEIGHT_DECAY), lr=LR, betas=(0.9, 0.999), eps=1e-8, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, steps))
    dl = DataLoader(ds, batch_size=BATCH, shuffle=True, collate_fn=collate, generator=torch.Generator().manual_seed(SEED))
    running = torch.zeros(())  # the running loss any loop keeps for logging, on device, as both trainers do
    model.train()
    step = 0
    while step < steps:
        for batch in dl:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            running += loss.detach()
            step += 1
            clock.tick(step)
            if step == steps: break
    return running.item() / steps


def run_raw_tensors(config, init, ds, steps: int, clock: Clock, warmup: int) -> float:
    "The limit: the data in tensors before the loop, one random permutation per epoch, batches gathered by index."
    torch.manual_seed(SEED)
    model = make_model(config, init)
    optimizer = torch.optim.AdamW(two_param_groups(model, WEIGHT_DECAY), lr=LR, betas=(0.9, 0.999), eps=1e-8, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, steps))
    columns = {k: torch.tensor(ds[k]) for k in ds.column_names}
    n, g = len(ds), torch.Generator().manual_seed(SEED)
    running = torch.zeros(())
    model.train()
    step = 0
    while step < steps:
        order = torch.randperm(n, generator=g)
        for i in range(0, n, BATCH):
            index = order[i:i + BATCH]
            loss = model(**{k: v[index] for k, v in columns.items()}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            running += loss.detach()
            step += 1
            clock.tick(step)
            if step == steps: break
    return running.item() / steps


def run_hf(config, init, ds, steps: int, clock: Clock, warmup: int) -> float:
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
    model = make_model(config, init)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR,
                                 weight_decay=WEIGHT_DECAY, warmup_steps=warmup, lr_scheduler_type="linear",
                                 max_grad_norm=MAX_GRAD_NORM, logging_steps=10 ** 9, save_strategy="no", eval_strategy="no",
                                 report_to="none", disable_tqdm=True, seed=SEED, use_cpu=True, dataloader_num_workers=0,
                                 optim="adamw_torch_fused")
        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[clock_callback(TrainerCallback, clock)])
        trainer.remove_callback(PrinterCallback)  # what disable_tqdm puts instead: it prints the final metrics, nothing per step
        return trainer.train().training_loss


def run_nbtrain(config, init, ds, steps: int, clock: Clock, warmup: int) -> float:
    from nbtrain import Trainer, TrainerCallback, TrainingArguments
    model = make_model(config, init)
    args = TrainingArguments(output_dir=None, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR,
                             weight_decay=WEIGHT_DECAY, warmup_steps=warmup, lr_scheduler_type="linear",
                             max_grad_norm=MAX_GRAD_NORM, logging_steps=10 ** 9, save_strategy="no", eval_strategy="no",
                             report_to="none", disable_tqdm=True, seed=SEED, dataloader_num_workers=0, optim="adamw_torch_fused")
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[clock_callback(TrainerCallback, clock)])
    return trainer.train().training_loss


LIMIT, RAW, HF, NB = "raw loop over ready tensors", "raw loop over a DataLoader", "transformers.Trainer", "nbtrain.Trainer"
VARIANTS = {LIMIT: run_raw_tensors, RAW: run_raw, HF: run_hf, NB: run_nbtrain}


# ---------------------------------------------------------------------------------------------- shared by the benches
def step_args(description: str, repeats: int, extra: tuple = ()) -> tuple[argparse.Namespace, int]:
    "The options of a steady-state bench (--steps, --repeats, --skip), checked; returns them and the steps before the clock."
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps per run (default 1500)")
    p.add_argument("--repeats", type=int, default=repeats,
                   help=f"interleaved rounds of all variants; the best counts (default {repeats})")
    p.add_argument("--skip", type=int, default=None, help="steps run before the clock starts (default steps // 5)")
    for args, kw in extra: p.add_argument(*args, **kw)
    a = p.parse_args()
    skip = a.skip if a.skip is not None else max(1, a.steps // 5)
    if not 0 < skip < a.steps: p.error(f"--skip must lie in (0, --steps); got {skip} with --steps {a.steps}")
    if a.repeats < 1: p.error("--repeats must be at least 1")
    return a, skip


def initial_weights(config) -> dict[str, torch.Tensor]:
    "One BERT classifier's initial weights, so that every variant and round starts from the same ones."
    from transformers import BertForSequenceClassification
    torch.manual_seed(SEED)
    return {k: v.clone() for k, v in BertForSequenceClassification(config).state_dict().items()}


def versions(*modules) -> str:
    "The Python version and each module's, for a bench's header line."
    return ", ".join([f"python {platform.python_version()}"] + [f"{m.__name__} {m.__version__}" for m in modules])


# ---------------------------------------------------------------------------------------------- main
def main():
    short = {"limit": LIMIT, "raw": RAW, "hf": HF, "nbtrain": NB}
    a, skip = step_args(__doc__.split("\n\n")[0], repeats=3, extra=(
        (("--only",), dict(choices=list(short), help="run one variant (for counting instructions)")),
        (("--examples",), dict(type=int, default=None, help="dataset size (default steps x batch: one epoch)"))))
    variants = {short[a.only]: VARIANTS[short[a.only]]} if a.only else VARIANTS
    warmup = a.steps // 10

    torch.set_num_threads(1)
    import accelerate
    import datasets
    import transformers

    import nbtrain
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()

    config = make_config()
    init = initial_weights(config)
    ds = make_dataset(a.examples or a.steps * BATCH)  # by default exactly one epoch: no epoch boundary inside a run

    n_params = sum(v.numel() for v in init.values())
    print(f"# loop overhead: BertForSequenceClassification ({n_params:,} params), batch {BATCH}, seq {SEQ_LEN}, "
          f"{a.steps} steps per run (timed: steps {skip + 1}..{a.steps}), {a.repeats} interleaved round(s), "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"# {versions(torch, transformers, accelerate, datasets, nbtrain)}\n", flush=True)

    runs = {name: [] for name in variants}
    for r in range(a.repeats):
        for name, fn in variants.items():
            gc.collect()
            clock = Clock(skip, a.steps)
            loss = fn(config, init, ds, a.steps, clock, warmup)
            res = clock.result()
            runs[name].append(res)
            print(f"  round {r + 1}: {name:<50} {res['wall'] * 1e3:6.3f} ms/step wall, {res['cpu'] * 1e3:6.3f} ms/step thread CPU"
                  f"   (train loss {loss:.4f})", flush=True)
    print(f"\n# load average at the end {os.getloadavg()[0]:.2f}\n")
    if a.only: return

    best = {k: {name: min(r[k] for r in rs) for name, rs in runs.items()} for k in ("wall", "cpu")}
    limit = {k: v[LIMIT] for k, v in best.items()}
    print("| variant | steps/s | steps/s vs the limit | ms/step | overhead vs the limit (µs/step) | thread CPU ms/step | CPU vs the limit |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in VARIANTS:
        w, c = best["wall"][name], best["cpu"][name]
        print(f"| {name} | {1 / w:,.1f} | {limit['wall'] / w:.3f}× | {w * 1e3:.3f} | {(w - limit['wall']) * 1e6:+.0f} "
              f"| {c * 1e3:.3f} | {c / limit['cpu']:.3f}× |")
    print()

    def ratio(x: str, y: str) -> str:
        return " | ".join(f"{best[k][x] / best[k][y]:.3f} ({(best[k][x] / best[k][y] - 1) * 100:+.1f}%)"
                          for k in ("wall", "cpu"))
    print("| time-per-step ratio (best rounds) | wall clock | thread CPU |")
    print("|---|---:|---:|")
    print(f"| nbtrain / ready-tensor loop (the limit) | {ratio(NB, LIMIT)} |")
    print(f"| nbtrain / DataLoader loop | {ratio(NB, RAW)} |")
    print(f"| nbtrain / transformers.Trainer | {ratio(NB, HF)} |")
    print(f"| transformers.Trainer / ready-tensor loop (the limit) | {ratio(HF, LIMIT)} |")
    print()
    nb, hf, lim = best["wall"][NB], best["wall"][HF], best["wall"][LIMIT]
    print(f"nbtrain steps/s ≥ 0.97 × the ready-tensor loop's (wall clock): {'yes' if lim / nb >= 0.97 else 'NO'} "
          f"({lim / nb:.3f}×); ahead of transformers.Trainer: {'yes' if nb < hf else 'NO'}")


if __name__ == "__main__":
    main()
