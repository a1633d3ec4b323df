#!/usr/bin/env python
"""Token classification (NER) with a `Trainer` subclass, in the shape of transformers'
`examples/pytorch/token-classification/run_ner.py` plus the two overrides users write most.

API exercised:
- `compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None)` overridden: a class-weighted
  cross-entropy computed from `outputs.logits` (also used for the evaluation loss, as transformers'
  `prediction_step` calls `compute_loss(..., return_outputs=True)` when the batch has labels);
- `training_step(self, model, inputs, num_items_in_batch=None)` overridden: counts its calls, then `super()`;
- `HfArgumentParser(...).parse_args_into_dataclasses()`, `DataCollatorForTokenClassification`,
  `tokenizer(..., is_split_into_words=True).word_ids()`, `main_process_first(desc=...)`,
  `eval_strategy="epoch"`, `compute_metrics` with seqeval, `train()`, `evaluate()`, `predict()` returning
  `(predictions, labels, metrics)`, `log_metrics` / `save_metrics`, `save_model`.

Gradient accumulation stays at 1: a per-batch mean returned by `compute_loss` is then the loss of the optimizer step
in both trainers (transformers 5 reads `loss_is_scaled_for_ga` to decide whether to divide it by the accumulation).

Prints `METRICS {json}` as its last line.
"""
import json
import logging
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import transformers
from datasets import load_dataset
from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score
from torch import nn
from transformers import (AutoConfig, AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification,
                          HfArgumentParser, set_seed)

if os.environ.get("TRAINER") == "nbtrain": from nbtrain import Trainer, TrainingArguments   # the one changed import
else: from transformers import Trainer, TrainingArguments

logger = logging.getLogger(__name__)
LABEL_LIST = ["O", "B-PER", "B-LOC"]


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "A folder saved with save_pretrained (model and tokenizer)."})


@dataclass
class DataTrainingArguments:
    train_file: str = field(metadata={"help": "A json lines file with `tokens` and `ner_tags`."})
    validation_file: str = field(metadata={"help": "The same, for evaluation and prediction."})
    max_seq_length: int = field(default=32)
    label_all_tokens: bool = field(default=False)
    class_weights: str = field(default="1.0,3.0,3.0", metadata={"help": "Comma-separated loss weight of each label."})


class WeightedLossTrainer(Trainer):
    "Rare entity labels weigh more in the loss; counts the training steps it is asked to take."
    def __init__(self, *args, class_weights=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.class_weights = class_weights
        self.training_step_calls = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits
        loss_fct = nn.CrossEntropyLoss(weight=self.class_weights.to(logits.device), ignore_index=-100)
        loss = loss_fct(logits.view(-1, self.model.config.num_labels), labels.view(-1))
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.training_step_calls += 1
        return super().training_step(model, inputs, num_items_in_batch)


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    set_seed(training_args.seed)

    raw_datasets = load_dataset("json", data_files={"train": data_args.train_file, "validation": data_args.validation_file})
    label_to_id = {i: i for i in range(len(LABEL_LIST))}
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, num_labels=len(LABEL_LIST),
                                        label2id={l: i for i, l in enumerate(LABEL_LIST)},
                                        id2label=dict(enumerate(LABEL_LIST)))
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForTokenClassification.from_pretrained(model_args.model_name_or_path, config=config)

    def tokenize_and_align_labels(examples):
        tokenized = tokenizer(examples["tokens"], padding=False, truncation=True, max_length=data_args.max_seq_length,
                              is_split_into_words=True)
        labels = []
        for i, label in enumerate(examples["ner_tags"]):
            word_ids = tokenized.word_ids(batch_index=i)
            previous, label_ids = None, []
            for word_idx in word_ids:
                if word_idx is None: label_ids.append(-100)  # special tokens
                elif word_idx != previous: label_ids.append(label_to_id[label[word_idx]])
                else: label_ids.append(label_to_id[label[word_idx]] if data_args.label_all_tokens else -100)
                previous = word_idx
            labels.append(label_ids)
        tokenized["labels"] = labels
        return tokenized

    with training_args.main_process_first(desc="train dataset map pre-processing"):
        train_dataset = raw_datasets["train"].map(tokenize_and_align_labels, batched=True,
                                                  remove_columns=raw_datasets["train"].column_names)
    with training_args.main_process_first(desc="validation dataset map pre-processing"):
        eval_dataset = raw_datasets["validation"].map(tokenize_and_align_labels, batched=True,
                                                      remove_columns=raw_datasets["validation"].column_names)

    data_collator = DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=8 if training_args.fp16 else None)

    def compute_metrics(p):
        predictions, labels = p
        predictions = np.argmax(predictions, axis=2)
        true_predictions = [[LABEL_LIST[p] for (p, l) in zip(pred, lab) if l != -100] for pred, lab in zip(predictions, labels)]
        true_labels = [[LABEL_LIST[l] for (p, l) in zip(pred, lab) if l != -100] for pred, lab in zip(predictions, labels)]
        return {"precision": precision_score(true_labels, true_predictions), "recall": recall_score(true_labels, true_predictions),
                "f1": f1_score(true_labels, true_predictions), "accuracy": accuracy_score(true_labels, true_predictions)}

    weights = torch.tensor([float(w) for w in data_args.class_weights.split(",")])
    trainer = WeightedLossTrainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                                  processing_class=tokenizer, data_collator=data_collator, compute_metrics=compute_metrics,
                                  class_weights=weights)

    results = {}
    if training_args.do_train:
        train_result = trainer.train()
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.save_model()
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results.update(metrics)
        results["global_step"] = train_result.global_step
        results["training_step_calls"] = trainer.training_step_calls

    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)

    if training_args.do_predict:
        predictions, labels, metrics = trainer.predict(eval_dataset, metric_key_prefix="predict")
        predictions = np.argmax(predictions, axis=2)
        true_predictions = [[LABEL_LIST[p] for (p, l) in zip(pred, lab) if l != -100] for pred, lab in zip(predictions, labels)]
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        if trainer.is_world_process_zero():
            with open(os.path.join(training_args.output_dir, "predictions.txt"), "w") as writer:
                for prediction in true_predictions: writer.write(" ".join(prediction) + "\n")
        results.update(metrics)

    print("METRICS " + json.dumps(results, default=float), flush=True)


if __name__ == "__main__":
    main()
