"""Break nbtrain on purpose, one named way at a time, and see which tests notice.

Each breakage is a text replacement in one module of a copy of the repository (its tracked and not-ignored files,
in a temporary folder); the tests that claim the behaviour then run against that copy: `PYTHONPATH` puts the copy's
`nbtrain` before the installed one, and the real kernels and launched processes the tests start inherit it. The
table says, per breakage, how many of its tests failed; a breakage no test caught, or whose text no longer occurs
exactly once in the source, makes the script exit 1. With `--control`, each breakage's tests first run on the
unbroken copy, where they must pass.

    python tools/mutants.py              # every breakage (about 15 minutes on 2 cores)
    python tools/mutants.py --list       # their names
    python tools/mutants.py resume-ignored snapshot-keeps-8-rows
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutant:
    name: str
    what: str             # the behaviour that breaks, in a user's words
    file: str             # the module, relative to the repository
    old: str              # text that occurs exactly once in it
    new: str
    tests: list[str]      # pytest node ids or files that claim the behaviour
    select: str = ""      # a pytest -k expression, when only some tests of those files claim it


MUTANTS = [
    Mutant("resume-ignored", "train(resume_from_checkpoint=...) silently starts over from step 0",
           "nbtrain/trainer.py", "        self._continue_from = None\n",
           "        self._continue_from = None\n        resume_from_checkpoint = None\n",
           ["tests/test_checkpoint_resume.py", "tests/test_checkpoint_crash.py", "tests/test_checkpoint_files.py",
            "tests/test_tracking.py"], select="(resume or sigkill or pickles or interrupt) and not resume_false and not random_collator_changes"),
    Mutant("interrupt-at-epoch-end", "a kernel interrupt stops at the end of the epoch instead of the next step",
           "nbtrain/trainer.py", "return control.should_epoch_stop or control.should_training_stop or self.interrupted",
           "return control.should_epoch_stop or control.should_training_stop",
           ["tests/test_checkpoint_kernel.py::test_interrupt_then_next_cell_continues_exactly",
            "tests/test_dashboard_kernel.py::test_interrupt_stops_at_a_step_with_consistent_state"]),
    Mutant("snapshot-keeps-8-rows", "the final snapshot's metrics table keeps only the live table's last rows",
           "nbtrain/dashboard.py", "table_html(table_rows(log_history), last))", "table_html(table_rows(log_history), last or 8))",
           ["tests/test_dashboard_kernel.py::test_saved_notebook_holds_widget_state_and_static_snapshot"]),
    Mutant("nan-plotted-as-0", "a NaN metric is drawn as a point at 0 instead of a gap",
           "nbtrain/dashboard.py",
           'return [(h["step"], h[key]) for h in log_history if isinstance(h.get(key), (int, float)) and math.isfinite(h[key])]',
           'return [(h["step"], h[key] if math.isfinite(h[key]) else 0.0) for h in log_history if isinstance(h.get(key), (int, float))]',
           ["tests/test_dashboard_kernel.py::test_a_nan_metric_leaves_a_gap_not_an_error"]),
    Mutant("evaluation-keeps-every-logit", "streaming metrics: evaluate() keeps every logit of the set, as transformers does",
           "nbtrain/trainer.py", "prediction_loss_only=True if self.compute_metrics is None else None)",
           "prediction_loss_only=None)",
           ["tests/test_eval_memory.py::test_nbtrain_evaluate_memory_does_not_grow_with_the_eval_set"]),
    Mutant("no-ddp-under-launch", "launch runs the processes without DistributedDataParallel: each trains on its shard alone",
           "nbtrain/trainer.py", "        if acc.num_processes > 1:\n            # not Accelerate's prepare_model",
           "        if False:\n            # not Accelerate's prepare_model",
           ["tests/test_launch.py::test_two_processes_split_every_global_batch_and_match_one_process",
            "tests/test_launch.py::test_token_losses_average_over_every_process"]),
    Mutant("fp16-off", "fp16=True trains in float32: the Accelerator gets mixed_precision='no'",
           "nbtrain/trainer.py", "precision = self.args.mixed_precision", 'precision = "bf16" if self.args.bf16 else "no"',
           ["tests/test_reliability.py::test_fp16_overflow_steps_are_counted_not_failures",
            "tests/test_reliability.py::test_fp16_a_nan_loss_is_an_overflow_but_all_nan_is_a_failure"]),
    Mutant("no-trackers-found", "installed_trackers() finds none of the installed trackers",
           "nbtrain/tracking.py",
           "    return [name for name in LOGGER_TYPE_TO_CLASS if name in available or name not in builtin]",
           "    return []",
           ["tests/test_tracking.py"], select="installed or all_means or missing"),
]


def copy_repo(dest: Path):
    "The repository's tracked and not-ignored files, copied to `dest`."
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


def apply(m: Mutant, root: Path) -> str | None:
    "Apply `m` to the copy at `root`; the reason it cannot be applied, or None."
    path = root / m.file
    text = path.read_text()
    n = text.count(m.old)
    if n != 1: return f"its text occurs {n} times in {m.file}: update the breakage to the source"
    path.write_text(text.replace(m.old, m.new))
    return None


def run_tests(root: Path, m: Mutant) -> tuple[int, int, str]:
    "(failed, passed, pytest's summary line) of `m`'s tests run against the copy at `root`."
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *m.tests] + (["-k", m.select] if m.select else [])
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True).stdout
    summary = next((l for l in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed|error)", l)), out[-300:])
    count = lambda word: sum(int(n) for n in re.findall(rf"(\d+) {word}", summary))
    return count("failed") + count("error"), count("passed"), summary.strip("= ")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="breakages to run (default: all)")
    p.add_argument("--list", action="store_true", help="name the breakages and stop")
    p.add_argument("--control", action="store_true", help="also run each breakage's tests on the unbroken copy")
    a = p.parse_args(argv)
    if a.list:
        for m in MUTANTS: print(f"{m.name:30} {m.what}")
        return 0
    unknown = set(a.names) - {m.name for m in MUTANTS}
    if unknown: p.error(f"unknown breakage {', '.join(sorted(unknown))}; --list names them")
    rows, bad = [], 0
    with tempfile.TemporaryDirectory(prefix="nbtrain-mutants-") as tmp:
        for m in (m for m in MUTANTS if not a.names or m.name in a.names):
            root = Path(tmp) / m.name
            copy_repo(root)
            if a.control:  # the same tests on the same copy before it is broken: they must pass
                failed, passed, _ = run_tests(root, m)
                bad += failed > 0 or passed == 0
                rows.append((f"{m.name} (unbroken)", "passes" if not failed and passed else "FAILS UNBROKEN",
                             f"{failed} of {failed + passed} tests failed"))
                print(f"{rows[-1][0]:30} {rows[-1][1]:12} {rows[-1][2]}", flush=True)
            why, start = apply(m, root), time.monotonic()
            if why:
                rows.append((m.name, "NOT APPLIED", why)); bad += 1
            else:
                failed, passed, _ = run_tests(root, m)
                bad += failed == 0
                rows.append((m.name, "caught" if failed else "NOT CAUGHT",
                             f"{failed} of {failed + passed} tests failed ({time.monotonic() - start:.0f} s)"))
            shutil.rmtree(root)
            print(f"{rows[-1][0]:30} {rows[-1][1]:12} {rows[-1][2]}", flush=True)
    print("\n| breakage | result | tests |\n|---|---|---|")
    for r in rows: print(f"| {r[0]} | {r[1]} | {r[2]} |")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
