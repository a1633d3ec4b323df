"""Per-step cost of a background run (`trainer.train(background=True)`, the loop in a thread) against the same run in
the foreground, in one process.

The model is `tests/tiny_train.py`'s TinyNet (an MLP on 8 features, about a millisecond a step on one torch thread),
so what the loop pays per step for running in a thread shows: the one attribute it reads per step
(`RunControl.pending`), and any contention with the main thread, which waits in `run.wait()` meanwhile. No display
(`disable_tqdm=True`) and no evaluation, for both alike. Steady state only: a callback times each step from the end
of step `--skip` to the last one, in wall clock and in CPU time of the training thread (the least disturbed by other
processes on a shared machine). Rounds are interleaved (foreground, background, foreground, ...); the best round of
each is compared, and the median beside it.

    python bench/background.py                       # 3000 steps x 5 rounds each, ~1 min on 2 cores
    python bench/background.py --steps 1000 --rounds 2  # quick check

Target: a background step costs within 5% of a foreground one.

Instruction counts, which a shared machine does not disturb: the same run under callgrind at two lengths, the
difference divided by the extra steps (set-up and imports cancel out), for each mode, with a fixed hash seed
(a random one moves the count of the same run by up to ~100k instructions per step):

    for mode in foreground background; do for n in 200 700; do
      PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/background.py --one $mode --steps $n 2>&1 | grep "Collected"
    done; done
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch

from nbtrain import TrainerCallback
from tiny_train import make_trainer


class StepClock(TrainerCallback):
    "Wall and training-thread CPU time at the end of step `skip` and of the last step."
    def __init__(self, skip: int): self.skip, self.t0 = skip, None
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.skip: self.t0 = (time.perf_counter(), time.thread_time())
        elif state.global_step == state.max_steps: self.t1 = (time.perf_counter(), time.thread_time())
    def per_step(self, steps: int) -> tuple[float, float]:
        n = steps - self.skip
        return (self.t1[0] - self.t0[0]) / n, (self.t1[1] - self.t0[1]) / n


def interleaved(run: Callable[[str], tuple[float, float]], names: Sequence[str], rounds: int) -> dict[str, list]:
    "Each name's `run(name)` results over `rounds` rounds, the order reversed every other round (drift hits all alike)."
    results = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]): results[name].append(run(name))
    return results


def print_table(results: dict[str, list], what: str):
    "The best and median (wall, thread CPU) per step of each entry of `results`, as a markdown table."
    print(f"| {what} | best wall µs/step | median wall µs/step | best thread-CPU µs/step | median thread-CPU µs/step |")
    print("|---|---|---|---|---|")
    for name, rs in results.items():
        walls, cpus = [w for w, _ in rs], [c for _, c in rs]
        print(f"| {name} | {min(walls) * 1e6:.0f} | {statistics.median(walls) * 1e6:.0f} | {min(cpus) * 1e6:.0f} | "
              f"{statistics.median(cpus) * 1e6:.0f} |")


def one_run(background: bool, steps: int, skip: int) -> tuple[float, float]:
    "(wall s, thread CPU s) per step of one run."
    clock = StepClock(skip)
    trainer = make_trainer(max_steps=steps, eval_steps=None, metric=False, callbacks=[clock], disable_tqdm=True,
                           logging_steps=50)
    trainer.train(background=True).wait() if background else trainer.train()
    return clock.per_step(steps)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--skip", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--one", choices=("foreground", "background"),
                   help="one run only, no warm-up: for instruction counts under callgrind (see below)")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.one: return print(a.one, one_run(a.one == "background", a.steps, min(a.skip, a.steps - 1)))
    one_run(False, 300, 100)  # warm-up: first-call imports and allocations
    results = interleaved(lambda mode: one_run(mode == "background", a.steps, a.skip), ("foreground", "background"), a.rounds)
    print(f"TinyNet, {a.steps} steps ({a.skip} skipped), {a.rounds} interleaved rounds; load average {os.getloadavg()[0]:.2f}\n")
    print_table(results, "run")
    fg, bg = results["foreground"], results["background"]
    ratio = lambda i, f: f(x[i] for x in bg) / f(x[i] for x in fg)
    print(f"\nbackground / foreground: best wall {ratio(0, min):.3f}, median wall {ratio(0, statistics.median):.3f}, "
          f"best thread CPU {ratio(1, min):.3f}, median thread CPU {ratio(1, statistics.median):.3f}")


if __name__ == "__main__":
    main()
