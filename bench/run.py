"""The benchmark suite: nbtrain against a raw PyTorch loop and `transformers.Trainer`, every figure measured in this run.

    python bench/run.py                          # all six benchmarks (~6-9 min on 2 cores), one Markdown table
    python bench/run.py --only steady,import     # some of them: steady, fixed, import, evalmem, padding, compile
    python bench/run.py --quick                  # fewer steps and rounds: checks that the suite runs, not figures to quote

Each benchmark runs in a fresh Python process (so imports, allocator state and peak memory of one do not leak into
the next) with one torch thread on the CPU, and prints its result as JSON for this script to put in the table.

1. steady: steady-state time per step on a tiny BERT (hidden 16, one layer) and a small one (hidden 128, four
   layers), batch 8, 32 tokens, 1,500 steps, best of 3 interleaved rounds (`loop_overhead.py` has the four loops):
   against a raw loop over data already in tensors (the limit: batches gathered by index, no DataLoader), and
   against a raw loop over a DataLoader.
2. fixed: what a short run costs beyond its steps: a 20-step run from `TrainingArguments(...)` to `train()`'s return,
   and the time from the `train()` call to the end of the first optimizer step; median of 5 after a warm-up run.
3. import: `import nbtrain` against `from transformers import Trainer, TrainingArguments`, 5 fresh processes each,
   interleaved, median of the time the import statement takes.
4. evalmem: growth of peak resident memory during `evaluate()` of a causal LM (4,000-token vocabulary, 128 tokens an
   example) at n and 4n examples: transformers with `compute_metrics` (it keeps every logit) against nbtrain with a
   streaming perplexity in `metrics=`.
5. padding: a dataset tokenized with `padding="max_length"` (texts of 8 to 256 tokens padded to 256; lengths
   log-normal with median 48, and log-uniform with a heavier tail), the same for both trainers and the same
   arguments: steps/s, and eval accuracy after the same two epochs (`padding.py`).
6. compile: `torch_compile=True` against eager on the small BERT with nbtrain: steps/s after compilation, and the
   compile time (first compiled step minus first eager step) reported apart.

Run it on a quiet machine; the load average is printed with the table.
"""
from __future__ import annotations

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

RAW, HF, NB, LIMIT = "raw", "hf", "nbtrain", "limit"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def quiet_libraries():
    import datasets
    import transformers
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()


# ---------------------------------------------------------------------------------------------- 1. steady state
def bench_steady(quick: bool) -> list[dict]:
    import gc

    import torch
    import loop_overhead as L
    torch.set_num_threads(1)
    quiet_libraries()
    steps, repeats = (200, 1) if quick else (1500, 3)
    skip, warmup = steps // 5, steps // 10
    rows = []
    for label, hidden, layers in (("tiny BERT (hidden 16, 1 layer)", 16, 1), ("small BERT (hidden 128, 4 layers)", 128, 4)):
        from transformers import BertForSequenceClassification
        config = L.make_config(hidden, layers)
        torch.manual_seed(L.SEED)
        init = {k: v.clone() for k, v in BertForSequenceClassification(config).state_dict().items()}
        ds = L.make_dataset(steps * L.BATCH)
        best = {}
        for r in range(repeats):
            for name, fn in ((LIMIT, L.run_raw_tensors), (RAW, L.run_raw), (HF, L.run_hf), (NB, L.run_nbtrain)):
                gc.collect()
                clock = L.Clock(skip, steps)
                fn(config, init, ds, steps, clock, warmup)
                wall = clock.result()["wall"]
                best[name] = min(best.get(name, wall), wall)
                log(f"  steady {label} round {r + 1} {name}: {wall * 1e3:.3f} ms/step")
        rows.append(dict(bench="steady state", measure=f"ms per step, {label}; raw loop over ready tensors (the limit)",
                         unit="ms", raw=best[LIMIT] * 1e3, hf=best[HF] * 1e3, nbtrain=best[NB] * 1e3,
                         target="nbtrain steps/s ≥ 0.97 × the limit's", met=best[LIMIT] / best[NB] >= 0.97))
        rows.append(dict(bench="steady state", measure=f"ms per step, {label}; raw loop over a DataLoader", unit="ms",
                         raw=best[RAW] * 1e3, hf=best[HF] * 1e3, nbtrain=best[NB] * 1e3,
                         target="nbtrain ≤ 1.03 × raw", met=best[NB] <= 1.03 * best[RAW]))
    return rows


# ---------------------------------------------------------------------------------------------- 2. fixed cost
def bench_fixed(quick: bool) -> list[dict]:
    import torch
    import loop_overhead as L
    torch.set_num_threads(1)
    quiet_libraries()
    import nbtrain
    import transformers
    steps, repeats = 20, (2 if quick else 5)
    config = L.make_config()
    from transformers import BertForSequenceClassification
    torch.manual_seed(L.SEED)
    init = {k: v.clone() for k, v in BertForSequenceClassification(config).state_dict().items()}
    ds = L.make_dataset(steps * L.BATCH)

    def marker(base, marks):
        class FirstStep(base):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == 1: marks["first"] = time.perf_counter()
        return FirstStep()

    def hf_run(out):
        marks = {"start": time.perf_counter()}
        args = transformers.TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=L.BATCH, learning_rate=L.LR, logging_steps=10,
            save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, optim="adamw_torch_fused")
        model = L.make_model(config, init)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[marker(transformers.TrainerCallback, marks)])
        marks["call"] = time.perf_counter(); trainer.train(); marks["end"] = time.perf_counter()
        return marks

    def nb_run(out):
        marks = {"start": time.perf_counter()}
        args = nbtrain.TrainingArguments(output_dir=None, max_steps=steps, per_device_train_batch_size=L.BATCH, learning_rate=L.LR,
                                         logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True)
        model = L.make_model(config, init)
        trainer = nbtrain.Trainer(model=model, args=args, train_dataset=ds, callbacks=[marker(nbtrain.TrainerCallback, marks)])
        marks["call"] = time.perf_counter(); trainer.train(); marks["end"] = time.perf_counter()
        return marks

    def raw_run(out):
        marks = {"start": time.perf_counter()}
        marks["call"] = marks["start"]  # the raw loop has no set-up apart from its steps: model, optimizer, loader, loop
        clock = L.Clock(1, steps)
        L.run_raw(config, init, ds, steps, clock, 0)
        marks["first"], marks["end"] = clock.marks[1][0], time.perf_counter()
        return marks

    res = {RAW: [], HF: [], NB: []}
    with tempfile.TemporaryDirectory() as out:
        for name, fn in ((RAW, raw_run), (HF, hf_run), (NB, nb_run)): fn(out)  # warm-up: lazy imports, first allocations
        for r in range(repeats):
            for name, fn in ((RAW, raw_run), (HF, hf_run), (NB, nb_run)):
                m = fn(out)
                res[name].append((m["end"] - m["start"], m["first"] - m["call"]))
                log(f"  fixed round {r + 1} {name}: run {res[name][-1][0] * 1e3:.1f} ms, call→first step {res[name][-1][1] * 1e3:.1f} ms")
    med = {k: [statistics.median(x[i] for x in v) * 1e3 for i in (0, 1)] for k, v in res.items()}
    return [dict(bench="fixed cost", measure="20-step run: arguments, Trainer, train() (ms)", unit="ms",
                 raw=med[RAW][0], hf=med[HF][0], nbtrain=med[NB][0], target="nbtrain ≤ 0.6 × transformers",
                 met=med[NB][0] <= 0.6 * med[HF][0]),
            dict(bench="fixed cost", measure="train() call → end of first optimizer step (ms)", unit="ms",
                 raw=med[RAW][1], hf=med[HF][1], nbtrain=med[NB][1], target="nbtrain < transformers", met=med[NB][1] < med[HF][1])]


# ---------------------------------------------------------------------------------------------- 3. import time
IMPORTS = {NB: "import nbtrain", HF: "from transformers import Trainer, TrainingArguments"}


def bench_import(quick: bool) -> list[dict]:
    repeats = 2 if quick else 5
    times = {k: [] for k in IMPORTS}
    for r in range(repeats):
        for name, stmt in IMPORTS.items():
            code = f"import time; t = time.perf_counter(); {stmt}; print(time.perf_counter() - t)"
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tempfile.gettempdir())
            times[name].append(float(out.stdout.strip().splitlines()[-1]))
            log(f"  import round {r + 1} {name}: {times[name][-1]:.3f} s")
    med = {k: statistics.median(v) for k, v in times.items()}
    return [dict(bench="import", measure="import statement, fresh process, median (s)", unit="s", raw=None, hf=med[HF],
                 nbtrain=med[NB], target="nbtrain ≤ 0.5 × transformers", met=med[NB] <= 0.5 * med[HF])]


# ---------------------------------------------------------------------------------------------- 4. evaluation memory
def bench_evalmem(quick: bool) -> list[dict]:
    import eval_memory
    n = 32 if quick else 64
    growth = {}
    for lib in (HF, NB):  # "nbtrain" and "hf", as eval_memory.py names them
        for size in (n, 4 * n):
            growth[lib, size] = eval_memory.growth(lib, size)["growth"] / 2 ** 20
            log(f"  evalmem {lib} n={size}: peak RSS growth {growth[lib, size]:.1f} MB")
    nb_ok = growth[NB, 4 * n] <= 1.2 * growth[NB, n] + eval_memory.LOGITS_PER_BATCH / 2 ** 20
    return [dict(bench="evaluation memory", measure=f"peak RSS growth in evaluate(), n={n} examples (MB)", unit="MB", raw=None,
                 hf=growth[HF, n], nbtrain=growth[NB, n], target="", met=None),
            dict(bench="evaluation memory", measure=f"peak RSS growth in evaluate(), 4n={4 * n} examples (MB)", unit="MB", raw=None,
                 hf=growth[HF, 4 * n], nbtrain=growth[NB, 4 * n], target="nbtrain: 4n ≤ 1.2 × n + one batch of logits (16 MB), and < 0.1 × transformers",
                 met=nb_ok and growth[NB, 4 * n] < 0.1 * growth[HF, 4 * n])]


# ---------------------------------------------------------------------------------------------- 5. padding
def bench_padding(quick: bool) -> list[dict]:
    import padding
    rows = []
    for lengths, label in (("lognormal", "median 48"), ("loguniform", "log-uniform")):
        res = padding.compare(n_train=256 if quick else 1024, epochs=1 if quick else 2, lengths=lengths)
        speed = res[NB]["steps_per_second"] / res[HF]["steps_per_second"]
        head = lengths == "lognormal"  # the target is stated on skewed lengths; the heavier tail is shown beside it
        rows += [dict(bench="padding", measure=f"steps/s, texts of 8-256 tokens ({label}) padded to 256", unit="steps/s",
                      raw=None, hf=res[HF]["steps_per_second"], nbtrain=res[NB]["steps_per_second"],
                      target="nbtrain ≥ 2 × transformers" if head else "(shown)", met=speed >= 2 if head else None),
                 dict(bench="padding", measure=f"eval accuracy after the same {res['epochs']} epochs ({label})", unit="", raw=None,
                      hf=res[HF]["accuracy"], nbtrain=res[NB]["accuracy"], target="the same (within 0.03)",
                      met=abs(res[NB]["accuracy"] - res[HF]["accuracy"]) <= 0.03)]
    return rows


# ---------------------------------------------------------------------------------------------- 6. torch.compile
def bench_compile(quick: bool) -> list[dict]:
    import torch
    import loop_overhead as L
    torch.set_num_threads(1)
    quiet_libraries()
    import nbtrain
    steps = 60 if quick else 200
    skip = 20 if quick else 50
    config = L.make_config(128, 4)
    from transformers import BertForSequenceClassification
    torch.manual_seed(L.SEED)
    init = {k: v.clone() for k, v in BertForSequenceClassification(config).state_dict().items()}
    ds = L.make_dataset(steps * L.BATCH)
    out = {}
    for compiled in (False, True):
        clock = L.Clock(skip, steps)
        marks = {}

        class First(nbtrain.TrainerCallback):
            def on_train_begin(self, args, state, control, **kw): marks["begin"] = time.perf_counter()
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == 1: marks["first"] = time.perf_counter()
                clock.tick(state.global_step)

        args = nbtrain.TrainingArguments(output_dir=None, max_steps=steps, per_device_train_batch_size=L.BATCH, learning_rate=L.LR,
                                         logging_steps=10 ** 9, save_strategy="no", disable_tqdm=True, torch_compile=compiled)
        trainer = nbtrain.Trainer(L.make_model(config, init), args, train_dataset=ds, callbacks=[First()])
        trainer.train()
        out[compiled] = dict(step=clock.result()["wall"], first=marks["first"] - marks["begin"])
        log(f"  compile={compiled}: {out[compiled]['step'] * 1e3:.2f} ms/step, first step {out[compiled]['first']:.2f} s")
    eager, comp = out[False], out[True]
    return [dict(bench="torch_compile", measure="nbtrain small BERT, steady state steps/s: eager, compiled", unit="steps/s",
                 raw=None, hf=None, nbtrain=None, eager=1 / eager["step"], compiled=1 / comp["step"],
                 target="works on CPU; effect shown", met=True),
            dict(bench="torch_compile", measure="compile time (first compiled step − first eager step, s)", unit="s", raw=None,
                 hf=None, nbtrain=comp["first"] - eager["first"], target="", met=None)]


BENCHES = {"steady": bench_steady, "fixed": bench_fixed, "import": bench_import, "evalmem": bench_evalmem,
           "padding": bench_padding, "compile": bench_compile}


# ---------------------------------------------------------------------------------------------- the table
def fmt(v) -> str:
    if v is None: return "–"
    if isinstance(v, bool): return "yes" if v else "NO"
    return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"


def ratios(row: dict) -> str:
    if "eager" in row: return f"compiled / eager steps/s: {row['compiled'] / row['eager']:.2f}×"
    parts = []
    nb = row.get("nbtrain")
    if nb is None or not row.get("unit"): return ""
    for other, label in ((RAW, "raw"), (HF, "transformers")):
        v = row.get(other)
        if v: parts.append(f"{nb / v:.2f}× {label}")
    return ", ".join(parts)


def table(rows: list[dict]) -> str:
    lines = ["| benchmark | measure | raw loop | transformers.Trainer | nbtrain | nbtrain vs | target | met |",
             "|---|---|---:|---:|---:|---|---|---|"]
    for r in rows:
        nb = f"{fmt(r['eager'])}, {fmt(r['compiled'])}" if "eager" in r else fmt(r.get("nbtrain"))
        lines.append(f"| {r['bench']} | {r['measure']} | {fmt(r.get('raw'))} | {fmt(r.get('hf'))} | {nb} | {ratios(r)} "
                     f"| {r.get('target', '')} | {fmt(r['met']) if r.get('met') is not None else ''} |")
    return "\n".join(lines)


def machine() -> str:
    import torch
    import transformers
    import accelerate
    import nbtrain
    cpu = platform.processor() or platform.machine()
    try: cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration): pass
    return (f"{cpu}, {os.cpu_count()} CPUs, one torch thread; python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, accelerate {accelerate.__version__}, nbtrain {nbtrain.__version__}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {', '.join(BENCHES)}")
    p.add_argument("--quick", action="store_true", help="fewer steps and rounds: a smoke test, not figures to quote")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:  # one benchmark, in this fresh process
        print(json.dumps(BENCHES[a.worker](a.quick)))
        return
    names = [n.strip() for n in a.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHES]
    if unknown: p.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHES)}")
    start, rows = time.perf_counter(), []
    log(f"# load average at the start {os.getloadavg()[0]:.2f}")
    for name in names:
        t = time.perf_counter()
        log(f"# {name}")
        out = subprocess.run([sys.executable, __file__, "--worker", name] + (["--quick"] if a.quick else []),
                             stdout=subprocess.PIPE, text=True)
        if out.returncode: sys.exit(f"benchmark {name!r} failed (exit {out.returncode})")
        rows += json.loads(out.stdout.strip().splitlines()[-1])
        log(f"# {name}: {time.perf_counter() - t:.0f} s")
    print(f"\n# nbtrain benchmarks{' (--quick: not figures to quote)' if a.quick else ''}\n")
    print(f"Machine: {machine()}. Load average {os.getloadavg()[0]:.2f} at the end; {time.perf_counter() - start:.0f} s in all.\n")
    print(table(rows))
    print(f"\nReproduce: `python bench/run.py{' --only ' + ','.join(names) if len(names) < len(BENCHES) else ''}`")


if __name__ == "__main__":
    main()
