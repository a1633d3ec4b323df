#!/usr/bin/env python
"""Chat SFT in the shape of TRL's `SFTTrainer` quick start: a model folder, a conversational prompt-completion
dataset read with `load_dataset("json", ...)`, `SFTConfig`, `SFTTrainer(model=<folder>, ...)`, `train()`, `evaluate()`.

    TRAINER=trl|nbtrain python run_sft.py MODEL_DIR DATA_DIR OUTPUT_DIR

The model is given by name (folder), so the trainer loads it and its tokenizer (with its chat template). The loss is
on the completions only (TRL's default for prompt-completion data). Prints `METRICS {json}` as its last line.
"""
import json
import os
import sys

from datasets import load_dataset

if os.environ.get("TRAINER") == "nbtrain": from nbtrain import SFTConfig, SFTTrainer   # the one changed import
else: from trl import SFTConfig, SFTTrainer

model_dir, data_dir, output_dir = sys.argv[1:4]
data = load_dataset("json", data_files={"train": os.path.join(data_dir, "train.jsonl"),
                                        "test": os.path.join(data_dir, "test.jsonl")})

args = SFTConfig(output_dir=output_dir, max_steps=8, per_device_train_batch_size=4, per_device_eval_batch_size=8,
                 learning_rate=1e-3, logging_steps=2, max_length=64, eval_strategy="steps", eval_steps=4,
                 save_strategy="no", report_to="none", seed=0,
                 bf16=False)  # TRL's default (bf16 unless fp16) fails on a CPU: transformers wants use_cpu=True for it
trainer = SFTTrainer(model=model_dir, args=args, train_dataset=data["train"], eval_dataset=data["test"])
trainer.train()
metrics = trainer.evaluate()

rows = [r for r in trainer.state.log_history if "loss" in r]
print("METRICS " + json.dumps({
    "loss": [r["loss"] for r in rows], "num_tokens": [r["num_tokens"] for r in rows],
    "mean_token_accuracy": [r["mean_token_accuracy"] for r in rows],
    "eval_loss": metrics["eval_loss"], "eval_mean_token_accuracy": metrics["eval_mean_token_accuracy"],
    "bf16": bool(trainer.args.bf16), "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
    "train_rows": len(trainer.train_dataset), "first_labels": list(trainer.train_dataset[0]["labels"])}))
