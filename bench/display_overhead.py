"""What the notebook dashboard costs: the same 2,000-step tiny run in a real Jupyter kernel, with the dashboard
(ipywidgets, the default there) and with no display at all (`disable_tqdm=True`).

The run is `tests/tiny_train.py`'s: a two-layer MLP on 8 features (about a millisecond a step on one thread),
2,000 steps, batch 8, a log every 50 steps, an evaluation with a torchmetrics accuracy every 100 steps. A step
is so cheap that the display's per-step and per-event costs show; on a real model they are a smaller share.

The clock runs inside the kernel around `trainer.train()` (so kernel start-up and message transport to this
client are left out, but everything the dashboard does in the kernel, the final snapshot included, is in).
Rounds are interleaved, alternating which variant goes first; after one untimed warm-up run of each, the
median and best rounds are compared, in wall-clock time, in process CPU time (all the kernel's threads,
ipykernel's iopub thread included) and in CPU time of the kernel's main thread, which runs the training and
every dashboard call and which other processes on a shared machine disturb least. Target: the dashboard costs at most 3% wall time.

    python bench/display_overhead.py                  # 7 rounds (~1 min on 2 cores)
    python bench/display_overhead.py --rounds 3       # quick check
    python bench/display_overhead.py --model bert     # the same with a one-layer BERT (a few ms a step)
    python bench/display_overhead.py --breakdown      # also time the dashboard's methods inside the kernel
    python bench/display_overhead.py --profile        # also cProfile one dashboard run inside the kernel

Run it on a quiet machine: other processes sharing the cores inflate every number (the load average is printed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
sys.path.insert(0, str(TESTS))
from kernel_session import error, execute, running_kernel, stdout  # noqa: E402  (the tests' kernel helpers)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "CUDA_VISIBLE_DEVICES": ""}
SETUP = f"""
import sys, json, time, io, cProfile, pstats
sys.path.insert(0, {str(TESTS)!r})
import torch
from tiny_train import make_trainer
import nbtrain
from nbtrain.dashboard import display_mode
"""
RUN = """
trainer = make_trainer(max_steps={steps}, eval_steps=100, logging_steps=50, disable_tqdm={quiet}, model={model!r})
_w, _c, _t = time.perf_counter(), time.process_time(), time.thread_time()
trainer.train()
_w, _c, _t = time.perf_counter() - _w, time.process_time() - _c, time.thread_time() - _t
print("RESULT " + json.dumps(dict(wall=_w, cpu=_c, thread=_t, callbacks=[type(c).__name__ for c in trainer.callbacks])))
"""
PROFILE = """
trainer = make_trainer(max_steps={steps}, eval_steps=100, logging_steps=50, model={model!r})
_prof = cProfile.Profile()
_prof.enable(); trainer.train(); _prof.disable()
_buf = io.StringIO()
_st = pstats.Stats(_prof, stream=_buf)
_st.sort_stats("cumulative").print_stats(r"dashboard|ipywidgets|comm|matplotlib|session|trainer.py", 40)
print(_buf.getvalue())
"""
# Inclusive wall time of the dashboard's methods and of the widget messages, by timing wrappers installed in the kernel
# (cProfile slows small Python calls down several times; these wrappers cost a microsecond or so per call).
BREAKDOWN = """
import functools, collections, nbtrain.dashboard as _D
from ipykernel.comm.comm import BaseComm as _Comm
_T = collections.defaultdict(lambda: [0, 0.0])
def _timed(owner, name, label):
    f = getattr(owner, name)
    @functools.wraps(f)
    def w(*a, **k):
        t = time.perf_counter()
        try: return f(*a, **k)
        finally: e = _T[label]; e[0] += 1; e[1] += time.perf_counter() - t
    setattr(owner, name, w)
for _n in ("on_train_begin", "_tick", "on_log", "on_evaluate", "on_prediction_step", "on_train_end",
           "_refresh", "_widgets", "_html_bundle"):
    _timed(_D.NotebookDashboard, _n, "NotebookDashboard." + _n)
_timed(_D, "history_svg", "history_svg (the figure as SVG)")
_timed(_D, "close_tree", "close_tree")
_timed(_Comm, "publish_msg", "widget comm messages (ipykernel publish_msg)")
for _r in range({rounds}):
    trainer = make_trainer(max_steps={steps}, eval_steps=100, logging_steps=50, model={model!r})
    _w = time.perf_counter(); trainer.train(); _T["trainer.train()"][0] += 1; _T["trainer.train()"][1] += time.perf_counter() - _w
print("| where (inclusive, summed over {rounds} runs) | calls per run | ms per run | ms per call |")
print("|---|---:|---:|---:|")
for k, (n, t) in sorted(_T.items(), key=lambda kv: -kv[1][1]):
    print(f"| {{k}} | {{n / {rounds}:.0f}} | {{t * 1e3 / {rounds}:.1f}} | {{t * 1e3 / max(n, 1):.3f}} |")
"""
VARIANTS = {"dashboard": "False", "no display": "True"}


def run_cell(kc, code: str, timeout: float = 600) -> str:
    "Execute `code` in the kernel, draining iopub as a front end would; returns stdout, raises on an error."
    msgs = execute(kc, code, timeout)
    err = error(msgs)
    if err: raise RuntimeError(f"{err['ename']}: {err['evalue']}\n" + "\n".join(err["traceback"])[-3000:])
    return stdout(msgs)


def timed(kc, variant: str, steps: int, model: str) -> dict:
    out = run_cell(kc, RUN.format(steps=steps, quiet=VARIANTS[variant], model=model))
    res = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
    shown = "NotebookDashboard" in res["callbacks"]
    if shown != (variant == "dashboard"): raise RuntimeError(f"{variant}: callbacks {res['callbacks']}")
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--model", choices=("mlp", "bert"), default="mlp",
                   help="mlp: tests/tiny_train.py's TinyNet, ~1 ms/step (default); bert: the one-layer BERT of tests/conftest.py")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds of both variants (default 7)")
    p.add_argument("--profile", action="store_true", help="also cProfile one dashboard run inside the kernel")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the dashboard's methods, the figure and the widget messages (3 runs, timing wrappers)")
    a = p.parse_args()

    with running_kernel(ROOT, ENV) as (km, kc):
        run_cell(kc, SETUP)
        mode = run_cell(kc, "print(display_mode(), nbtrain.__version__, torch.__version__)").split()
        if mode[0] != "widgets": raise RuntimeError(f"the kernel's display mode is {mode[0]!r}, not 'widgets'")
        print(f"# display overhead: {a.steps}-step tiny {a.model.upper()} run in a Jupyter kernel (nbtrain {mode[1]}, torch {mode[2]}), "
              f"eval every 100 steps, log every 50; {a.rounds} interleaved rounds; {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        for v in VARIANTS: timed(kc, v, a.steps, a.model)  # warm-up: imports, first figure, allocator
        runs = {v: [] for v in VARIANTS}
        for r in range(a.rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]
            for v in order:
                res = timed(kc, v, a.steps, a.model)
                runs[v].append(res)
                print(f"  round {r + 1}: {v:<10} {res['wall']:7.3f} s wall  {res['cpu']:7.3f} s process CPU  "
                      f"{res['thread']:7.3f} s main-thread CPU", flush=True)
        print(f"\n# load average at the end {os.getloadavg()[0]:.2f}\n")
        kinds = {"wall": "wall", "cpu": "process CPU", "thread": "main-thread CPU"}
        print("| variant | " + " | ".join(f"{kinds[k]} s, median | best" for k in kinds) + " |")
        print("|---|" + "---:|---:|" * len(kinds))
        stat = {}
        for v, rs in runs.items():
            stat[v] = {(k, f): f(r[k] for r in rs) for k in kinds for f in (statistics.median, min)}
            print(f"| {v} | " + " | ".join(f"{stat[v][k, statistics.median]:.3f} | {stat[v][k, min]:.3f}" for k in kinds) + " |")
        d, n = stat["dashboard"], stat["no display"]
        ratio = {key: d[key] / n[key] for key in d}
        print("\ndashboard / no display: " + "; ".join(
            f"{kinds[k]} {ratio[k, statistics.median]:.3f} (median), {ratio[k, min]:.3f} (best)" for k in kinds))
        print("dashboard - no display, median: " + "; ".join(
            f"{kinds[k]} {(d[k, statistics.median] - n[k, statistics.median]) * 1e3:+.0f} ms" for k in kinds))
        per_round = [dr["wall"] / nr["wall"] for dr, nr in zip(runs["dashboard"], runs["no display"])]
        print("per-round wall ratios: " + " ".join(f"{x:.3f}" for x in per_round))
        verdict = ratio["wall", statistics.median] <= 1.03
        print(f"dashboard within 3% wall time (median): {'yes' if verdict else 'NO'}")
        if a.breakdown:
            print("\n# where the dashboard's time goes, inside the kernel (inclusive wall time; nested rows overlap)\n")
            print(run_cell(kc, BREAKDOWN.format(steps=a.steps, rounds=3, model=a.model)))
        if a.profile:
            print("\n# cProfile of one dashboard run inside the kernel (cumulative time, filtered)\n")
            print(run_cell(kc, PROFILE.format(steps=a.steps, model=a.model)))


if __name__ == "__main__":
    sys.exit(main())
