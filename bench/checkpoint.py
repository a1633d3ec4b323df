"""Checkpoint save time and size: `transformers.Trainer` vs `nbtrain.Trainer`, same model, same optimizer.

One BertForSequenceClassification (built from a config; ~5M parameters by default) is trained by both trainers
in the same process, from the same initial weights, with the same optimizer (torch's fused AdamW, the default of
both) and `save_steps=1`, so that every step writes a full checkpoint: weights, optimizer state, scheduler, RNG
states, trainer state and arguments. A callback (the same public API in both libraries) measures the time from
`on_step_end` to `on_save` of every save step, which is the time the loop spends saving and rotating
(`save_total_limit=2` in both) and nothing else: no logging or evaluation is due at those steps.
The first save of each run is left out (warm-up). Runs are interleaved (hf, nbtrain, hf, ...); the table gives the
median and the best save over all rounds, and the size of one checkpoint folder.

What each one writes differs, and so does its safety: transformers pickles `optimizer.pt`, `scheduler.pt`,
`rng_state.pth` and `training_args.bin` and does not fsync; nbtrain writes safetensors and JSON only, fsyncs every
file, writes into a temporary folder and renames it into place with a completeness marker. A third row, nbtrain
with its fsync calls stubbed out (not a setting nbtrain offers), shows how much of the difference is durability.

    python bench/checkpoint.py                       # ~5M params, 6 saves x 3 rounds each (~1-2 min on 2 cores)
    python bench/checkpoint.py --hidden 128 --saves 4 --rounds 1   # quick check
"""
from __future__ import annotations

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU only, for both alike
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loop_overhead import initial_weights, versions

BATCH = 8
SEQ_LEN = 32
LR = 1e-4
SEED = 0
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")


def make_config(vocab: int, hidden: int, layers: int):
    from transformers import BertConfig
    return BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      intermediate_size=4 * hidden, max_position_embeddings=SEQ_LEN, num_labels=2)


def make_model(config, init):
    from transformers import BertForSequenceClassification
    model = BertForSequenceClassification(config)
    model.load_state_dict(init)
    return model


def make_dataset(n: int, vocab: int):
    from datasets import Dataset
    g = torch.Generator().manual_seed(SEED)
    return Dataset.from_dict({"input_ids": torch.randint(1, vocab, (n, SEQ_LEN), generator=g).tolist(),
                              "attention_mask": torch.ones(n, SEQ_LEN, dtype=torch.long).tolist(),
                              "labels": torch.randint(0, 2, (n,), generator=g).tolist()})


def save_timer(base):
    "A `base` (transformers' or nbtrain's TrainerCallback) timing on_step_end -> on_save of every save step."
    class SaveTimer(base):
        def __init__(self):
            self.times, self.folders, self.t0 = [], [], None
        def on_train_begin(self, args, state, control, **kwargs):
            torch.set_num_threads(1)
        def on_step_end(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()
        def on_save(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0)
            self.folders.append(Path(args.output_dir) / f"checkpoint-{state.global_step}")
    return SaveTimer()


def folder_report(folder: Path) -> dict:
    files = {p.name: p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    return {"bytes": sum(files.values()), "files": files, "pickles": sorted(n for n in files if n.endswith(PICKLE_SUFFIXES))}


def run_hf(config, init, ds, saves: int, out: str):
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
    timer = save_timer(TrainerCallback)
    args = TrainingArguments(output_dir=out, max_steps=saves, per_device_train_batch_size=BATCH, learning_rate=LR,
                             logging_steps=10 ** 9, save_strategy="steps", save_steps=1, save_total_limit=2,
                             eval_strategy="no", report_to="none", disable_tqdm=True, seed=SEED, use_cpu=True,
                             optim="adamw_torch_fused")
    trainer = Trainer(model=make_model(config, init), args=args, train_dataset=ds, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return timer, folder_report(timer.folders[-1])


def run_nbtrain(config, init, ds, saves: int, out: str):
    from nbtrain import Trainer, TrainerCallback, TrainingArguments
    timer = save_timer(TrainerCallback)
    args = TrainingArguments(output_dir=out, max_steps=saves, per_device_train_batch_size=BATCH, learning_rate=LR,
                             logging_steps=10 ** 9, save_strategy="steps", save_steps=1, save_total_limit=2,
                             eval_strategy="no", report_to="none", disable_tqdm=True, seed=SEED, optim="adamw_torch_fused")
    trainer = Trainer(model=make_model(config, init), args=args, train_dataset=ds, callbacks=[timer])
    trainer.train()
    return timer, folder_report(timer.folders[-1])


def run_nbtrain_nosync(config, init, ds, saves: int, out: str):
    "nbtrain with its fsync calls disabled, to show what durability costs (not a supported setting)."
    import nbtrain.checkpoint as ck
    saved = ck._fsync_tree, ck._fsync_dir, ck.os.fsync
    ck._fsync_tree = ck._fsync_dir = lambda folder: None
    try:
        import types
        ck.os = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
        ck.os.fsync = lambda fd: None
        return run_nbtrain(config, init, ds, saves, out)
    finally:
        ck._fsync_tree, ck._fsync_dir = saved[:2]
        ck.os = os


HF, NB, NB_NOSYNC = "transformers.Trainer", "nbtrain.Trainer", "nbtrain.Trainer without fsync"
VARIANTS = {HF: run_hf, NB: run_nbtrain, NB_NOSYNC: run_nbtrain_nosync}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--saves", type=int, default=6, help="optimizer steps per run, each one saved (default 6)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    a = p.parse_args()
    if a.saves < 2: p.error("--saves must be at least 2 (the first save of a run is not counted)")

    torch.set_num_threads(1)
    import datasets
    import safetensors
    import transformers

    import nbtrain
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # transformers' "Writing model shards" bar
    datasets.disable_progress_bars()

    config = make_config(a.vocab, a.hidden, a.layers)
    init = initial_weights(config)
    ds = make_dataset(a.saves * BATCH, a.vocab)
    n_params = sum(v.numel() for v in init.values())
    print(f"# checkpoint save: BertForSequenceClassification ({n_params:,} params, {n_params * 4 / 2**20:.1f} MiB fp32), "
          f"fused AdamW, {a.saves} saves per run (first not counted), {a.rounds} interleaved round(s), torch threads 1, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"# {versions(torch, transformers, safetensors, nbtrain)}; output on {tempfile.gettempdir()}\n", flush=True)

    times, reports = {name: [] for name in VARIANTS}, {}
    for r in range(a.rounds):
        for name, fn in VARIANTS.items():
            gc.collect()
            with tempfile.TemporaryDirectory() as out:
                timer, reports[name] = fn(config, init, ds, a.saves, out)
            times[name] += timer.times[1:]
            print(f"  round {r + 1}: {name:<30} saves (ms): " + " ".join(f"{t * 1e3:.0f}" for t in timer.times)
                  + f"   ({len(timer.times)} saves)", flush=True)
    print(f"\n# load average at the end {os.getloadavg()[0]:.2f}\n")

    med = {n: statistics.median(t) for n, t in times.items()}
    print("| trainer | save, median (ms) | save, best (ms) | checkpoint size (MiB) | files | pickled files |")
    print("|---|---:|---:|---:|---:|---|")
    for name in VARIANTS:
        rep = reports[name]
        print(f"| {name} | {med[name] * 1e3:.0f} | {min(times[name]) * 1e3:.0f} | {rep['bytes'] / 2**20:.2f} | {len(rep['files'])} "
              f"| {', '.join(rep['pickles']) or 'none'} |")
    print()
    print("| ratio to transformers.Trainer | save time (median) | size |")
    print("|---|---:|---:|")
    for name in (NB, NB_NOSYNC):
        print(f"| {name} | {med[name] / med[HF]:.2f}× | {reports[name]['bytes'] / reports[HF]['bytes']:.3f}× |")
    print()
    for name in (HF, NB):
        files = reports[name]["files"]
        print(f"{name} checkpoint: " + ", ".join(f"{n} {s / 2**20:.2f} MiB" if s > 2**16 else f"{n} {s:,} B"
                                                   for n, s in sorted(files.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
