#!/usr/bin/env python
"""Sequence classification from CSV/JSON files, in the shape of transformers' `examples/pytorch/text-classification/run_glue.py`.

API exercised (as a script written for transformers uses it):
- `HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))`: `parse_args_into_dataclasses()`,
  or `parse_json_file` when the only argument is a `.json` file;
- `TrainingArguments`: `get_process_log_level()`, `should_log`, `local_process_index`, `device`, `n_gpu`,
  `parallel_mode`, `fp16`, `main_process_first(desc=...)` around `datasets.map`, `do_train/do_eval/do_predict`,
  `resume_from_checkpoint`, `output_dir`, `seed`;
- `transformers.trainer_utils.get_last_checkpoint(output_dir)` to detect a run to resume;
- `Trainer(model, args, train_dataset, eval_dataset, compute_metrics, processing_class, data_collator=None)`;
- `train(resume_from_checkpoint=...)` and its `TrainOutput.metrics`, `save_model()`, `log_metrics`, `save_metrics`,
  `save_state`, `evaluate(eval_dataset=...)`, `predict(..., metric_key_prefix="predict").predictions`,
  `is_world_process_zero()`, `create_model_card(**kwargs)` (no `push_to_hub`).

Prints `METRICS {json}` as its last line.
"""
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import datasets
import numpy as np
import transformers
from datasets import load_dataset
from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, EvalPrediction, HfArgumentParser,
                          set_seed)
from transformers.trainer_utils import get_last_checkpoint

if os.environ.get("TRAINER") == "nbtrain": from nbtrain import Trainer, TrainingArguments   # the one changed import
else: from transformers import Trainer, TrainingArguments

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "A folder saved with save_pretrained (model and tokenizer)."})
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Tokenizer folder, if not the model's."})


@dataclass
class DataTrainingArguments:
    train_file: Optional[str] = field(default=None, metadata={"help": "A csv or json file of training data."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "A csv or json file of validation data."})
    test_file: Optional[str] = field(default=None, metadata={"help": "A csv or json file of test data."})
    max_seq_length: int = field(default=32, metadata={"help": "Longer inputs are truncated."})
    pad_to_max_length: bool = field(default=False, metadata={"help": "Pad to max_seq_length rather than per batch."})
    max_train_samples: Optional[int] = field(default=None)

    def __post_init__(self):
        if self.train_file is None or self.validation_file is None:
            raise ValueError("Need a training and a validation file.")
        if self.train_file.split(".")[-1] not in ("csv", "json"):
            raise ValueError("`train_file` should be a csv or a json file.")


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()  # the default log_level is passive: info, as the examples do
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning(f"Process rank: {training_args.local_process_index}, device: {training_args.device}, "
                   f"n_gpu: {training_args.n_gpu}, distributed training: {training_args.parallel_mode.value == 'distributed'}, "
                   f"16-bits training: {training_args.fp16}")

    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
        if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
            logger.info(f"Checkpoint detected, resuming training at {last_checkpoint}.")

    set_seed(training_args.seed)

    data_files = {"train": data_args.train_file, "validation": data_args.validation_file}
    if training_args.do_predict:
        if data_args.test_file is None: raise ValueError("--do_predict needs a --test_file")
        data_files["test"] = data_args.test_file
    extension = data_args.train_file.split(".")[-1]
    raw_datasets = load_dataset(extension, data_files=data_files)

    label_list = sorted(raw_datasets["train"].unique("label"))
    num_labels = len(label_list)
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, num_labels=num_labels)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_args.model_name_or_path, config=config)
    label_to_id = {v: i for i, v in enumerate(label_list)}
    model.config.label2id = label_to_id
    model.config.id2label = {i: l for l, i in label_to_id.items()}

    padding = "max_length" if data_args.pad_to_max_length else False

    def preprocess_function(examples):
        result = tokenizer(examples["sentence"], padding=padding, max_length=data_args.max_seq_length, truncation=True)
        if "label" in examples: result["label"] = [label_to_id[l] for l in examples["label"]]
        return result

    with training_args.main_process_first(desc="dataset map pre-processing"):
        raw_datasets = raw_datasets.map(preprocess_function, batched=True, desc="Running tokenizer on dataset")
    train_dataset = raw_datasets["train"]
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))
    eval_dataset = raw_datasets["validation"]
    predict_dataset = raw_datasets["test"] if training_args.do_predict else None

    def compute_metrics(p: EvalPrediction):
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        preds = np.argmax(preds, axis=1)
        return {"accuracy": (preds == p.label_ids).astype(np.float32).mean().item()}

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        compute_metrics=compute_metrics,
        processing_class=tokenizer,
        data_collator=None,  # dynamic padding: the Trainer pads with the tokenizer
    )

    results = {}
    if training_args.do_train:
        checkpoint = None
        if training_args.resume_from_checkpoint is not None: checkpoint = training_args.resume_from_checkpoint
        elif last_checkpoint is not None: checkpoint = last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.save_model()  # saves the tokenizer too
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results.update(metrics)
        results["global_step"] = train_result.global_step
        results["resumed_from"] = os.path.basename(checkpoint) if checkpoint else None

    if training_args.do_eval:
        logger.info("*** Evaluate ***")
        metrics = trainer.evaluate(eval_dataset=eval_dataset)
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)

    if training_args.do_predict:
        logger.info("*** Predict ***")
        labels = np.array([label_to_id[l] for l in predict_dataset["label"]])
        predict_dataset = predict_dataset.remove_columns("label")  # as run_glue: test labels may be unknown (-1)
        predictions = trainer.predict(predict_dataset, metric_key_prefix="predict").predictions
        predictions = np.argmax(predictions, axis=1)
        output_predict_file = os.path.join(training_args.output_dir, "predict_results.txt")
        if trainer.is_world_process_zero():
            with open(output_predict_file, "w") as writer:
                writer.write("index\tprediction\n")
                for index, item in enumerate(predictions): writer.write(f"{index}\t{label_list[item]}\n")
        results["predict_accuracy"] = float((predictions == labels).mean())  # against the labels kept aside

    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-classification"}
    if training_args.push_to_hub: trainer.push_to_hub(**kwargs)
    else: trainer.create_model_card(**kwargs)

    print("METRICS " + json.dumps(results, default=float), flush=True)


if __name__ == "__main__":
    main()
