#!/usr/bin/env python
"""Causal language modelling from a text file, in the shape of transformers' `examples/pytorch/language-modeling/run_clm.py`.

API exercised:
- `HfArgumentParser(...).parse_args_into_dataclasses()`, `main_process_first(desc=...)` around tokenizing and
  `group_texts` (concatenate, cut into blocks of `block_size`, `labels` = a copy of `input_ids`);
- `DataCollatorForLanguageModeling(tokenizer, mlm=False)` (or `default_data_collator`, as run_clm, with
  `--data_collator default`);
- `preprocess_logits_for_metrics(logits, labels)` returning `logits.argmax(dim=-1)` (so evaluation keeps token ids,
  not vocabulary-wide logits), and a `compute_metrics` that scores them against the labels shifted by one;
- `eval_accumulation_steps`, `eval_strategy="epoch"`, `train()`, `evaluate()`, perplexity from `eval_loss`,
  `log_metrics` / `save_metrics` / `save_state` / `save_model`.

Prints `METRICS {json}` as its last line.
"""
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from itertools import chain
from typing import Optional

import numpy as np
import transformers
from datasets import load_dataset
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, HfArgumentParser,
                          default_data_collator, set_seed)

if os.environ.get("TRAINER") == "nbtrain": from nbtrain import Trainer, TrainingArguments   # the one changed import
else: from transformers import Trainer, TrainingArguments

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "A folder saved with save_pretrained (model and tokenizer)."})


@dataclass
class DataTrainingArguments:
    train_file: str = field(metadata={"help": "A json lines (or txt) file with a `text` column."})
    validation_file: str = field(metadata={"help": "The same, for evaluation."})
    block_size: Optional[int] = field(default=16, metadata={"help": "Length of the training blocks, in tokens."})
    data_collator: str = field(default="default", metadata={"help": "'default' (default_data_collator) or 'lm'."})


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    set_seed(training_args.seed)

    extension = data_args.train_file.split(".")[-1]
    raw_datasets = load_dataset("text" if extension == "txt" else extension,
                                data_files={"train": data_args.train_file, "validation": data_args.validation_file})
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)

    column_names = raw_datasets["train"].column_names
    text_column_name = "text" if "text" in column_names else column_names[0]

    def tokenize_function(examples):
        # each line ends with the end-of-text token, so that blocks that span two lines say where one ends
        return tokenizer([t + " " + tokenizer.eos_token for t in examples[text_column_name]])

    with training_args.main_process_first(desc="dataset map tokenization"):
        tokenized_datasets = raw_datasets.map(tokenize_function, batched=True, remove_columns=column_names,
                                              desc="Running tokenizer on dataset")
    block_size = data_args.block_size

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size  # drop the remainder
        result = {k: [t[i: i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    with training_args.main_process_first(desc="grouping texts together"):
        lm_datasets = tokenized_datasets.map(group_texts, batched=True, desc=f"Grouping texts in chunks of {block_size}")
    train_dataset, eval_dataset = lm_datasets["train"], lm_datasets["validation"]

    def preprocess_logits_for_metrics(logits, labels):
        if isinstance(logits, tuple): logits = logits[0]  # the model may return more than the logits
        return logits.argmax(dim=-1)

    def compute_metrics(eval_preds):
        preds, labels = eval_preds
        # labels are shifted inside the model: the prediction at position i is for the label at i + 1
        labels = labels[:, 1:].reshape(-1)
        preds = preds[:, :-1].reshape(-1)
        keep = labels != -100
        return {"accuracy": float((preds[keep] == labels[keep]).mean())}

    collator = (DataCollatorForLanguageModeling(tokenizer, mlm=False) if data_args.data_collator == "lm"
                else default_data_collator)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset if training_args.do_train else None,
                      eval_dataset=eval_dataset if training_args.do_eval else None, processing_class=tokenizer,
                      data_collator=collator,
                      compute_metrics=compute_metrics if training_args.do_eval else None,
                      preprocess_logits_for_metrics=preprocess_logits_for_metrics if training_args.do_eval else None)

    results = {}
    if training_args.do_train:
        train_result = trainer.train()
        trainer.save_model()
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results.update(metrics)
        results["global_step"] = train_result.global_step

    if training_args.do_eval:
        logger.info("*** Evaluate ***")
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        try: perplexity = math.exp(metrics["eval_loss"])
        except OverflowError: perplexity = float("inf")
        metrics["perplexity"] = perplexity
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)

    print("METRICS " + json.dumps(results, default=float), flush=True)


if __name__ == "__main__":
    main()
