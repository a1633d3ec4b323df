"""Per-step cost of logging: `nbtrain.Trainer` with `report_to="none"` vs the JSON-lines log vs TensorBoard.

The tiny BERT classifier of `loop_overhead.py` (same config, data and clock) is trained by `nbtrain.Trainer` with
`logging_steps=50` in three ways, in the same process:

- `none, no file`: `report_to="none"`, `log_to_file=False` — logs go to `trainer.state.log_history` only;
- `none + log.jsonl`: `report_to="none"` with the default JSON-lines file in `output_dir`;
- `tensorboard + log.jsonl`: `report_to="tensorboard"` (🤗 Accelerate's tracker) and the file.

Steady state only: the clock runs from the end of step `--skip` to the end of the last step, so the start of the
trackers (and their hyperparameters) and their end are left out; the log steps inside the window are in. Rounds are
interleaved (each round in another order) and the best round per variant counts, in wall-clock time and in CPU time
of the training thread (the TensorBoard writer flushes from a thread of its own, which the wall clock sees and the
thread CPU does not; nbtrain also calls the trackers from a thread of its own). On a shared machine those differences
drown in noise; the last column is immune to it: the time the training thread spends inside the logging callbacks'
`on_log` (the file write; handing the values to the trackers' thread) in the timed window, per timed step.

    python bench/logging_overhead.py                           # 1500 steps x 5 rounds (~2-3 min on 2 cores)
    python bench/logging_overhead.py --steps 300 --repeats 1   # quick check
"""
from __future__ import annotations

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import gc
import tempfile
import time

import torch

from loop_overhead import (BATCH, LR, MAX_GRAD_NORM, SEED, WEIGHT_DECAY, Clock, clock_callback, initial_weights,
                           make_config, make_dataset, make_model, step_args, versions)

LOGGING_STEPS = 50
BASE, FILE, TB = "none, no file", "none + log.jsonl", "tensorboard + log.jsonl"
VARIANTS = {BASE: dict(report_to="none", log_to_file=False), FILE: dict(report_to="none"),
            TB: dict(report_to="tensorboard")}


def timed_on_log(trainer, clock: Clock) -> list[float]:
    "Make the Trainer's logging callbacks add the seconds each `on_log` in the clock's window takes to the list returned."
    from nbtrain.tracking import LogFileCallback, TrackerCallback
    spent = [0.0]
    for cb in trainer.callbacks:
        if isinstance(cb, (LogFileCallback, TrackerCallback)):
            def on_log(args, state, control, _inner=cb.on_log, logs=None, **kw):
                t = time.perf_counter()
                try: return _inner(args, state, control, logs=logs, **kw)
                finally:
                    if clock.skip < state.global_step <= clock.steps and "train_runtime" not in logs:  # not the run's summary
                        spent[0] += time.perf_counter() - t
            cb.on_log = on_log
    trainer.callback_handler._index()  # the handler keeps the bound methods it calls
    return spent


def run(config, init, ds, steps: int, clock: Clock, warmup: int, **variant) -> tuple[int, float]:
    "Train one variant; returns the number of records logged and the seconds spent in the logging callbacks."
    from nbtrain import Trainer, TrainerCallback, TrainingArguments
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR,
                                 weight_decay=WEIGHT_DECAY, warmup_steps=warmup, lr_scheduler_type="linear",
                                 max_grad_norm=MAX_GRAD_NORM, logging_steps=LOGGING_STEPS, save_strategy="no",
                                 eval_strategy="no", disable_tqdm=True, seed=SEED, dataloader_num_workers=0,
                                 optim="adamw_torch_fused", run_name="bench", **variant)
        trainer = Trainer(model=make_model(config, init), args=args, train_dataset=ds,
                          callbacks=[clock_callback(TrainerCallback, clock)])
        spent = timed_on_log(trainer, clock)
        trainer.train()
        return len(trainer.state.log_history), spent[0]


def main():
    a, skip = step_args(__doc__.split("\n\n")[0], repeats=5)

    torch.set_num_threads(1)
    import accelerate
    import datasets
    import transformers

    import nbtrain
    from nbtrain.tracking import installed_trackers
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    variants = dict(VARIANTS)
    if "tensorboard" not in installed_trackers():
        print("# tensorboard is not installed (pip install tensorboard): its variant is left out")
        variants.pop(TB)

    config = make_config()
    init = initial_weights(config)
    ds = make_dataset(a.steps * BATCH)

    print(f"# logging overhead: tiny BERT, batch {BATCH}, logging_steps={LOGGING_STEPS}, {a.steps} steps per run (timed: steps "
          f"{skip + 1}..{a.steps}, {(a.steps - skip) // LOGGING_STEPS} logs), {a.repeats} interleaved round(s), torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"# {versions(torch, accelerate, nbtrain)}\n", flush=True)

    runs, in_log = {name: [] for name in variants}, {name: [] for name in variants}
    names = list(variants)
    for r in range(a.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            gc.collect()
            clock = Clock(skip, a.steps)
            n_logs, spent = run(config, init, ds, a.steps, clock, a.steps // 10, **variants[name])
            res = clock.result()
            runs[name].append(res)
            in_log[name].append(spent / (a.steps - skip))
            print(f"  round {r + 1}: {name:<26} {res['wall'] * 1e3:6.3f} ms/step wall, {res['cpu'] * 1e3:6.3f} ms/step thread CPU, "
                  f"{spent / (a.steps - skip) * 1e6:5.2f} µs/step in on_log   ({n_logs} records)", flush=True)
    print(f"\n# load average at the end {os.getloadavg()[0]:.2f}\n")

    best = {k: {name: min(r[k] for r in rs) for name, rs in runs.items()} for k in ("wall", "cpu")}
    print("| variant | steps/s | ms/step | vs none, no file (wall) | thread CPU ms/step | vs none, no file (CPU) "
          "| in the logging callbacks, µs/step (share of a step) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in variants:
        w, c, l = best["wall"][name], best["cpu"][name], min(in_log[name])
        print(f"| {name} | {1 / w:,.1f} | {w * 1e3:.3f} | {w / best['wall'][BASE]:.4f}× | {c * 1e3:.3f} | "
              f"{c / best['cpu'][BASE]:.4f}× | {l * 1e6:.2f} ({l / w * 100:.3f}%) |")
    print()
    for name in variants:
        if name == BASE: continue
        ratio = best["wall"][BASE] / best["wall"][name]  # steps/s of the variant over the baseline's
        share = min(in_log[name]) / best["wall"][name]
        print(f"{name}: steps/s {ratio:.4f} of report_to='none' without the file (wall clock, {'within' if ratio >= 0.99 else 'NOT within'} "
              f"1%); its logging callbacks take {share * 100:.3f}% of a step ({'within' if share <= 0.01 else 'NOT within'} 1%)")
    if TB in variants:  # the comparison: a tracker against the default report_to="none" (which keeps log.jsonl)
        ratio = best["wall"][FILE] / best["wall"][TB]
        print(f"{TB}: steps/s {ratio:.4f} of the default report_to='none' with log.jsonl "
              f"({'within' if ratio >= 0.99 else 'NOT within'} 1%)")


if __name__ == "__main__":
    main()
