"""Throughput on a GPU: a GPT-2-small-shaped model in bf16, trained by nbtrain and by a raw PyTorch loop.

One prepared script for a session that has a GPU. The model is GPT2LMHeadModel built from a config with GPT-2
small's shape (12 layers, 12 heads, n_embd 768, 1,024 positions, vocabulary 50,257; nothing is downloaded), on
random tokens (throughput does not depend on what the tokens say). Both variants use the same math: bf16
autocast, fused AdamW, clipping at 1.0, a linear schedule; the raw loop is the plain loop nanoGPT-style code
writes. Each runs `--steps` optimizer steps; the clock runs, with CUDA synchronised at both ends, from the end of
step `--warmup` to the end of the last one.

It prints a Markdown table: tokens/s, ms per step, and model FLOPs utilisation (MFU): the model's training
FLOPs per token, 6 N + 12 L T d (N non-embedding parameters, L layers, T tokens a sequence, d the width;
PaLM's appendix B formula, the one nanoGPT uses), times tokens/s, over the GPU's peak dense bf16 FLOP/s
(`--peak-tflops`, default: looked up from the device name for A100, H100 and H200, else required).

    python bench/gpu.py                            # batch 16 x 1,024 tokens, 60 steps (about a minute on an H100-class GPU)
    python bench/gpu.py --batch-size 8 --steps 40  # less memory, shorter
    python bench/gpu.py --cpu-smoke                # a tiny model on the CPU in bf16: checks the script, not a GPU
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse
import math
import sys
import time

import torch

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks, SXM parts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="steps before the clock starts (default 10)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak dense bf16 TFLOP/s, for MFU")
    p.add_argument("--cpu-smoke", action="store_true", help="a tiny model on the CPU (hides any GPU)")
    a = p.parse_args(argv)
    if a.cpu_smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        a.steps, a.warmup, a.batch_size, a.seq_len = 6, 2, 2, 32
    if not 0 < a.warmup < a.steps: p.error("--warmup must lie in (0, --steps)")
    return a


def config(a):
    from transformers import GPT2Config
    if a.cpu_smoke: return GPT2Config(vocab_size=256, n_positions=a.seq_len, n_embd=32, n_layer=2, n_head=2)
    return GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)


def flops_per_token(cfg, seq_len: int, model) -> float:
    "6 N + 12 L T d: the weights' matmuls forward and backward, plus attention's."
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wte.weight.numel() - model.transformer.wpe.weight.numel()
    return 6 * n + 12 * cfg.n_layer * seq_len * cfg.n_embd


def data(a, vocab: int):
    from datasets import Dataset
    n = a.steps * a.batch_size
    ids = torch.randint(0, vocab, (n, a.seq_len), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")


def sync(device):
    if device.type == "cuda": torch.cuda.synchronize()


def run_raw(a, cfg, init, ds, device) -> float:
    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel(cfg).to(device); model.load_state_dict(init)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / a.steps))
    dl = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, shuffle=True)
    model.train()
    t0 = None
    for step, batch in enumerate(dl, 1):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        if step == a.warmup: sync(device); t0 = time.perf_counter()
        if step == a.steps: break
    sync(device)
    if not math.isfinite(loss.item()): raise RuntimeError(f"raw loop: loss {loss.item()}")
    return (time.perf_counter() - t0) / (a.steps - a.warmup)


def run_nbtrain(a, cfg, init, ds, device) -> float:
    from transformers import GPT2LMHeadModel
    from nbtrain import Trainer, TrainerCallback, TrainingArguments
    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (a.warmup, a.steps): sync(device); marks[state.global_step] = time.perf_counter()

    model = GPT2LMHeadModel(cfg); model.load_state_dict(init)
    args = TrainingArguments(output_dir=None, max_steps=a.steps, per_device_train_batch_size=a.batch_size, learning_rate=3e-4,
                             bf16=True, logging_steps=max(1, a.steps // 4), save_strategy="no", disable_tqdm=True)
    out = Trainer(model, args, train_dataset=ds, callbacks=[Clock()]).train()
    if not math.isfinite(out.training_loss): raise RuntimeError(f"nbtrain: loss {out.training_loss}")
    return (marks[a.steps] - marks[a.warmup]) / (a.steps - a.warmup)


def main(argv=None) -> int:
    a = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not a.cpu_smoke:
        print("no GPU here: run this on a GPU machine, or with --cpu-smoke to check the script", file=sys.stderr)
        return 2
    from transformers import GPT2LMHeadModel
    cfg = config(a)
    torch.manual_seed(0)
    probe = GPT2LMHeadModel(cfg)
    init = {k: v.clone() for k, v in probe.state_dict().items()}
    fpt = flops_per_token(cfg, a.seq_len, probe)
    del probe
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak = a.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    ds = data(a, cfg.vocab_size)
    tokens = a.batch_size * a.seq_len
    print(f"# {name}: GPT-2 shape {cfg.n_layer} layers x {cfg.n_embd}, batch {a.batch_size} x {a.seq_len} tokens, bf16, "
          f"{a.steps} steps (timed after {a.warmup}); {fpt / 1e9:.2f} GFLOP per token; peak {peak or '?'} TFLOP/s\n")
    print("| variant | ms/step | tokens/s | MFU |")
    print("|---|---:|---:|---:|")
    res = {}
    for label, fn in (("raw PyTorch loop", run_raw), ("nbtrain.Trainer", run_nbtrain)):
        sec = fn(a, cfg, init, ds, device)
        res[label] = sec
        tps = tokens / sec
        mfu = f"{tps * fpt / (peak * 1e12) * 100:.1f}%" if peak else "–"
        print(f"| {label} | {sec * 1e3:.1f} | {tps:,.0f} | {mfu} |", flush=True)
    print(f"\nnbtrain / raw loop, time per step: {res['nbtrain.Trainer'] / res['raw PyTorch loop']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
