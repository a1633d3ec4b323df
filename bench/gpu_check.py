"""The GPU check of `launch` and mixed precision: one prepared script for a session that has a GPU.

Fine-tunes a small GPT-2 built from a config (GPT2LMHeadModel, 2 layers, n_embd 128; nothing is downloaded) on
learnable random token data (arithmetic sequences modulo the vocabulary: each sequence has a random start and a
random stride of 1-4, so the next token is predictable from the two before it) in fp32, fp16 and bf16, through
`Trainer` in this process and through `launch(fn, model, num_processes=1, mixed_precision=...)` with plain
arguments, each also as a background run (`trainer.train(background=True).wait()`: CUDA in a thread of this
process; `launch(..., background=True).wait()`). For each run it checks that:

  - every logged loss is finite and the loss falls (the mean of the last quarter of the logged losses is under
    `--max-loss-ratio` times the mean of the first quarter);
  - the forward ran in the requested precision (autocast on or off, and the dtype of the LM head's output, seen by
    a forward hook) and the Accelerator says so; fp16 has a grad scaler;
  - through `launch`, the model passed in comes back with trained, finite weights.

It prints a Markdown table (tokens/s over the steps after a warm-up, timed with CUDA synchronised at both ends)
and exits 1 if any run failed, 2 if there is no GPU (without `--cpu-smoke`). The `launch` runs go first: a
`Trainer` in this process initialises CUDA, after which `launch` refuses to fork (as it must).

    python bench/gpu_check.py                 # on a GPU machine: 12 runs, about two minutes on an H100-class GPU
    python bench/gpu_check.py --steps 400     # longer runs, steadier tokens/s
    python bench/gpu_check.py --cpu-smoke     # the same logic, tiny, on the CPU in fp32 and bf16 (tests use this)
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "fp16", "bf16")
PATHS = ("launch", "launch-bg", "trainer", "background")  # launch's first: a Trainer here initialises CUDA
LABELS = {"launch": "launch(1)", "launch-bg": "launch(1), background", "trainer": "Trainer", "background": "Trainer, background"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run (default 200)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step (default 32)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--vocab", type=int, default=512, help="vocabulary size (default 512)")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated, of fp32,fp16,bf16")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {','.join(PATHS)}")
    p.add_argument("--max-loss-ratio", type=float, default=0.8,
                   help="the loss falls if mean(last quarter) < this x mean(first quarter) (default 0.8)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads in every run, launch's children included (default: leave as is; --cpu-smoke: 1)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="a tiny fp32/bf16 version on the CPU (hides any GPU): checks this script's logic, not a GPU")
    a = p.parse_args(argv)
    a.precisions = [s.strip() for s in a.precisions.split(",") if s.strip()]
    a.paths = [s.strip() for s in a.paths.split(",") if s.strip()]
    if bad := [s for s in a.precisions if s not in PRECISIONS]: p.error(f"unknown precision(s) {bad}; use {PRECISIONS}")
    if bad := [s for s in a.paths if s not in PATHS]: p.error(f"unknown path(s) {bad}; use {PATHS}")
    if a.cpu_smoke:
        a.steps, a.batch_size, a.seq_len, a.vocab, a.n_layer, a.n_embd, a.n_head, a.lr = 40, 8, 32, 32, 1, 32, 2, 1e-2
        a.threads = a.threads or 1  # launch gives each child cpu_count // world threads: too many on a shared machine
        a.precisions = [s for s in a.precisions if s != "fp16"]  # fp16 autocast with a grad scaler is a GPU matter
    return a


# ---------------------------------------------------------------------------------------------- model and data
def make_data(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict]:
    "`n` arithmetic sequences modulo `vocab`: random start, random stride 1-4; the labels are the inputs (causal LM)."
    import torch
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    stride = torch.randint(1, 5, (n, 1), generator=g)
    ids = (start + stride * torch.arange(seq_len)) % vocab
    return [{"input_ids": row, "labels": row} for row in ids]


def make_model(a):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=a.vocab, n_positions=a.seq_len, n_embd=a.n_embd, n_layer=a.n_layer, n_head=a.n_head,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


# ---------------------------------------------------------------------------------------------- one run
def train_run(model, a, precision_in_args: str, background: bool = False) -> dict:
    """Train `model` with nbtrain's Trainer (in a thread with `background`) and report what happened. Runs in this
    process (the Trainer paths) or in a child of `launch` (then `precision_in_args` is 'fp32' and the precision comes
    from launch)."""
    import torch
    from nbtrain import Trainer, TrainerCallback, TrainingArguments

    if a.threads: torch.set_num_threads(a.threads)
    warmup = max(1, min(10, a.steps // 5))
    seen: dict = {}

    class Clock(TrainerCallback):
        "Times the steps after the warm-up, with the device synchronised at both ends."
        def _sync(self):
            p = next(model.parameters())
            if p.is_cuda: torch.cuda.synchronize(p.device)  # the steps are queued: wait for them before reading the clock
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == warmup: self._sync(); seen["t0"] = time.perf_counter()
            if state.global_step == state.max_steps: self._sync(); seen["t1"] = time.perf_counter()

    def record(module, inputs, output):  # the LM head's output: its dtype shows the autocast in force
        if "autocast" not in seen and module.training:
            dev = output.device.type
            seen["autocast"] = (torch.is_autocast_enabled(dev), str(output.dtype).removeprefix("torch."))
    hook = model.lm_head.register_forward_hook(record)

    world = 1
    if os.environ.get("WORLD_SIZE"):
        from accelerate import PartialState
        world = PartialState().num_processes
    log_every = max(1, a.steps // 20)
    args = TrainingArguments(output_dir=None, max_steps=a.steps, per_device_train_batch_size=a.batch_size // world,
                             learning_rate=a.lr, warmup_steps=warmup, lr_scheduler_type="cosine", logging_steps=log_every,
                             save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
                             fp16=precision_in_args == "fp16", bf16=precision_in_args == "bf16")
    data = make_data(min(a.steps * a.batch_size, 4096), a.seq_len, a.vocab)
    trainer = Trainer(model, args, train_dataset=data, callbacks=[Clock()])
    try:
        out = trainer.train(background=True).wait() if background else trainer.train()
    finally:
        hook.remove()
    acc = trainer.accelerator
    tokens = (a.steps - warmup) * a.batch_size * a.seq_len
    elapsed = seen["t1"] - seen["t0"] if "t0" in seen and "t1" in seen else float("nan")
    return {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "global_step": out.global_step,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else float("nan"), "autocast": seen.get("autocast"),
            "accelerator_precision": acc.mixed_precision, "scaler": acc.scaler is not None, "device": str(acc.device),
            "world": acc.num_processes,
            "device_name": torch.cuda.get_device_name() if acc.device.type == "cuda" else "cpu"}


EXPECTED_AUTOCAST = {"fp32": (False, "float32"), "fp16": (True, "float16"), "bf16": (True, "bfloat16")}


def check(report: dict, precision: str, a, want_device: str) -> list[str]:
    "What is wrong with a run's report; an empty list when it passed."
    problems = []
    ls = report["losses"]
    if report["global_step"] != a.steps: problems.append(f"ran {report['global_step']} of {a.steps} steps")
    if len(ls) < 4: problems.append(f"only {len(ls)} losses logged")
    elif not all(math.isfinite(x) for x in ls): problems.append(f"non-finite loss: {ls}")
    else:
        q = max(1, len(ls) // 4)
        first, last = sum(ls[:q]) / q, sum(ls[-q:]) / q
        if not last < a.max_loss_ratio * first:
            problems.append(f"loss did not fall: first quarter {first:.4g}, last quarter {last:.4g}")
    want_acc = {"fp32": "no"}.get(precision, precision)
    if report["accelerator_precision"] != want_acc:
        problems.append(f"Accelerator mixed_precision={report['accelerator_precision']!r}, wanted {want_acc!r}")
    if tuple(report["autocast"] or ()) != EXPECTED_AUTOCAST[precision]:
        problems.append(f"forward ran with (autocast, dtype)={report['autocast']}, wanted {EXPECTED_AUTOCAST[precision]}")
    if (precision == "fp16") != report["scaler"]: problems.append(f"grad scaler present={report['scaler']} for {precision}")
    if not report["device"].startswith(want_device): problems.append(f"trained on {report['device']}, wanted {want_device}")
    if not math.isfinite(report["tokens_per_s"]): problems.append("no timing")
    return problems


def run_one(path: str, precision: str, a, want_device: str) -> dict:
    import torch
    from nbtrain import launch
    row = {"path": LABELS[path], "precision": precision}
    t = time.perf_counter()
    try:
        model = make_model(a)  # on the CPU: building it does not initialise CUDA
        before = [p.detach().clone() for p in model.parameters()]
        if path.startswith("launch"):
            report = launch(train_run, model, a, "fp32", num_processes=1, mixed_precision={"fp32": "no"}.get(precision, precision),
                            background=path == "launch-bg")
            if path == "launch-bg": report = report.wait()
        else:
            report = train_run(model, a, precision, background=path == "background")
        problems = check(report, precision, a, want_device)
        if path.startswith("launch"):
            params = [p.detach().cpu() for p in model.parameters()]
            if all(torch.equal(p, b) for p, b in zip(params, before)):
                problems.append("the model passed to launch did not get the trained weights")
            if not all(torch.isfinite(p).all() for p in params): problems.append("non-finite weights came back from launch")
        row.update(report)
        row["status"] = "ok" if not problems else "FAIL: " + "; ".join(problems)
    except BaseException as e:  # one failed run must not hide the others
        if isinstance(e, KeyboardInterrupt): raise
        first = str(e).split("\n\nTraceback")[0]  # a LaunchError holds the child's message, then its traceback
        row["status"] = f"FAIL: {type(e).__name__}: {' '.join(first.split())[:300]}".replace("|", "/")
        row["traceback"] = traceback.format_exc()
    row["wall_s"] = time.perf_counter() - t
    return row


# ---------------------------------------------------------------------------------------------- main
def fmt(x, spec=".4g") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def table(rows: list[dict]) -> str:
    head = "| path | precision | device | first loss | last loss | tokens/s | autocast | wall s | status |"
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        ls = r.get("losses") or []
        ac = r.get("autocast")
        lines.append(f"| {r['path']} | {r['precision']} | {r.get('device_name', '-')} | {fmt(ls[0] if ls else None)} | "
                     f"{fmt(ls[-1] if ls else None)} | {fmt(r.get('tokens_per_s'), ',.0f')} | "
                     f"{f'{ac[1]}' + (' (autocast)' if ac[0] else '') if ac else '-'} | {fmt(r['wall_s'], '.1f')} | {r['status']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.cpu_smoke: os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: the smoke run never sees a GPU
    os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    import torch
    import accelerate
    from accelerate.utils import is_cuda_available
    # NVML's answer: torch.cuda.is_available() calls cuInit here, which can spoil CUDA in launch's forked children
    if not a.cpu_smoke and not is_cuda_available():
        print("gpu_check: no CUDA GPU here; run it on a GPU machine, "
              "or pass --cpu-smoke to check the script's logic on the CPU.", file=sys.stderr)
        return 2
    import transformers
    want_device = "cpu" if a.cpu_smoke else "cuda"
    # torch.cuda.get_device_name would initialise CUDA in this process and make launch refuse: only the children ask
    print(f"torch {torch.__version__}, accelerate {accelerate.__version__}, transformers {transformers.__version__}; "
          f"GPT-2 n_layer={a.n_layer} n_embd={a.n_embd} vocab={a.vocab}, {a.steps} steps of {a.batch_size} x {a.seq_len} "
          f"tokens, on {want_device}", flush=True)
    rows = []
    for path in [p for p in PATHS if p in a.paths]:  # launch first: the Trainer runs initialise CUDA here
        for precision in a.precisions:
            row = run_one(path, precision, a, want_device)
            print(f"  {row['path']:<22} {precision}: {row['status']} ({row['wall_s']:.1f}s)", flush=True)
            rows.append(row)
    print()
    print(table(rows))
    failed = [r for r in rows if r["status"] != "ok"]
    for r in failed:
        if "traceback" in r: print(f"\n{r['path']} {r['precision']}:\n{r['traceback']}", file=sys.stderr)
    print(f"\n{len(rows) - len(failed)} of {len(rows)} runs passed.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
