#!/usr/bin/env python
"""Extractive question answering with a `QuestionAnsweringTrainer`, in the shape of transformers'
`examples/pytorch/question-answering/run_qa.py` and `trainer_qa.py`.

API exercised (what trainer_qa.py's subclass calls on the Trainer it extends):
- `evaluate(self, eval_dataset=None, eval_examples=None, ignore_keys=None, metric_key_prefix="eval")` and
  `predict(self, predict_dataset, predict_examples, ignore_keys=None, metric_key_prefix="test")` overridden;
- inside them: `self.get_eval_dataloader(ds)`, `self.get_test_dataloader(ds)`, `self.compute_metrics` set to None
  and back, `self.evaluation_loop(dataloader, description=..., prediction_loss_only=True if compute_metrics is None
  else None, ignore_keys=..., metric_key_prefix=...)` returning an `EvalLoopOutput` (`.predictions` a tuple of start
  and end logits, `.metrics`, `.num_samples`), `speed_metrics`, `self.args.eval_batch_size`, `self.args.world_size`,
  `self.args.should_save`, `self.args.should_log`, `self.log(metrics)`,
  `self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)`,
  `transformers.trainer_utils.PredictionOutput`, `EvalPrediction`;
- the training loop calling the overridden `evaluate()` (`eval_strategy="epoch"`);
- `default_data_collator` (features padded to `max_seq_length`), start/end positions as the labels.

The post-processing is deliberately simple (argmax of start and end logits per feature, best score per example).
Prints `METRICS {json}` as its last line.
"""
import collections
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import transformers
from datasets import load_dataset
from transformers import (AutoModelForQuestionAnswering, AutoTokenizer, EvalPrediction, HfArgumentParser,
                          default_data_collator, set_seed)
from transformers.trainer_utils import PredictionOutput, speed_metrics

if os.environ.get("TRAINER") == "nbtrain": from nbtrain import Trainer, TrainingArguments   # the one changed import
else: from transformers import Trainer, TrainingArguments

logger = logging.getLogger(__name__)


class QuestionAnsweringTrainer(Trainer):
    def __init__(self, *args, eval_examples=None, post_process_function=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_examples = eval_examples
        self.post_process_function = post_process_function

    def evaluate(self, eval_dataset=None, eval_examples=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        eval_dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        eval_dataloader = self.get_eval_dataloader(eval_dataset)
        eval_examples = self.eval_examples if eval_examples is None else eval_examples

        # metrics need the examples, not the features: computed here, after the loop
        compute_metrics = self.compute_metrics
        self.compute_metrics = None
        start_time = time.time()
        try:
            output = self.evaluation_loop(eval_dataloader, description="Evaluation",
                                          prediction_loss_only=True if compute_metrics is None else None,
                                          ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self.compute_metrics = compute_metrics
        total_batch_size = self.args.eval_batch_size * self.args.world_size
        output.metrics.update(speed_metrics(metric_key_prefix, start_time, num_samples=output.num_samples,
                                            num_steps=math.ceil(output.num_samples / total_batch_size)))
        if self.post_process_function is not None and self.compute_metrics is not None and self.args.should_save:
            eval_preds = self.post_process_function(eval_examples, eval_dataset, output.predictions)
            metrics = self.compute_metrics(eval_preds)
            for key in list(metrics.keys()):
                if not key.startswith(f"{metric_key_prefix}_"): metrics[f"{metric_key_prefix}_{key}"] = metrics.pop(key)
            metrics.update(output.metrics)
        else:
            metrics = output.metrics

        if self.args.should_log: self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def predict(self, predict_dataset, predict_examples, ignore_keys=None, metric_key_prefix: str = "test"):
        predict_dataloader = self.get_test_dataloader(predict_dataset)
        compute_metrics = self.compute_metrics
        self.compute_metrics = None
        start_time = time.time()
        try:
            output = self.evaluation_loop(predict_dataloader, description="Prediction",
                                          prediction_loss_only=True if compute_metrics is None else None,
                                          ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self.compute_metrics = compute_metrics
        total_batch_size = self.args.eval_batch_size * self.args.world_size
        output.metrics.update(speed_metrics(metric_key_prefix, start_time, num_samples=output.num_samples,
                                            num_steps=math.ceil(output.num_samples / total_batch_size)))
        if self.post_process_function is None or self.compute_metrics is None: return output

        predictions = self.post_process_function(predict_examples, predict_dataset, output.predictions, "predict")
        metrics = self.compute_metrics(predictions)
        for key in list(metrics.keys()):
            if not key.startswith(f"{metric_key_prefix}_"): metrics[f"{metric_key_prefix}_{key}"] = metrics.pop(key)
        metrics.update(output.metrics)
        return PredictionOutput(predictions=predictions.predictions, label_ids=predictions.label_ids, metrics=metrics)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "A folder saved with save_pretrained (model and tokenizer)."})


@dataclass
class DataTrainingArguments:
    train_file: str = field(metadata={"help": "SQuAD-style json lines: id, context, question, answers."})
    validation_file: str = field(metadata={"help": "The same, for evaluation and prediction."})
    max_seq_length: int = field(default=40)
    doc_stride: int = field(default=8)
    max_answer_length: int = field(default=4)


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    set_seed(training_args.seed)

    raw_datasets = load_dataset("json", data_files={"train": data_args.train_file, "validation": data_args.validation_file})
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForQuestionAnswering.from_pretrained(model_args.model_name_or_path)
    pad_on_right = tokenizer.padding_side == "right"
    max_seq_length = data_args.max_seq_length

    def prepare_train_features(examples):
        examples["question"] = [q.lstrip() for q in examples["question"]]
        tokenized = tokenizer(examples["question"], examples["context"], truncation="only_second", max_length=max_seq_length,
                              stride=data_args.doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                              padding="max_length")
        sample_mapping = tokenized.pop("overflow_to_sample_mapping")
        offset_mapping = tokenized.pop("offset_mapping")
        tokenized["start_positions"], tokenized["end_positions"] = [], []
        for i, offsets in enumerate(offset_mapping):
            input_ids = tokenized["input_ids"][i]
            cls_index = input_ids.index(tokenizer.cls_token_id)
            sequence_ids = tokenized.sequence_ids(i)
            answers = examples["answers"][sample_mapping[i]]
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            context = [k for k, s in enumerate(sequence_ids) if s == 1]
            if offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:  # not in this window
                tokenized["start_positions"].append(cls_index); tokenized["end_positions"].append(cls_index)
                continue
            tokenized["start_positions"].append(max(k for k in context if offsets[k][0] <= start_char))
            tokenized["end_positions"].append(min(k for k in context if offsets[k][1] >= end_char))
        return tokenized

    def prepare_validation_features(examples):
        examples["question"] = [q.lstrip() for q in examples["question"]]
        tokenized = tokenizer(examples["question"], examples["context"], truncation="only_second", max_length=max_seq_length,
                              stride=data_args.doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                              padding="max_length")
        sample_mapping = tokenized.pop("overflow_to_sample_mapping")
        tokenized["example_id"] = []
        for i in range(len(tokenized["input_ids"])):
            sequence_ids = tokenized.sequence_ids(i)
            tokenized["example_id"].append(examples["id"][sample_mapping[i]])
            # only the context's offsets are kept: a span outside it can then not be chosen
            tokenized["offset_mapping"][i] = [o if sequence_ids[k] == 1 else None for k, o in enumerate(tokenized["offset_mapping"][i])]
        return tokenized

    train_examples, eval_examples = raw_datasets["train"], raw_datasets["validation"]
    with training_args.main_process_first(desc="train dataset map pre-processing"):
        train_dataset = train_examples.map(prepare_train_features, batched=True, remove_columns=train_examples.column_names)
    with training_args.main_process_first(desc="validation dataset map pre-processing"):
        eval_dataset = eval_examples.map(prepare_validation_features, batched=True, remove_columns=eval_examples.column_names)

    def post_processing_function(examples, features, predictions, stage="eval"):
        "Best (start, end) span of each example over its features: argmax start, then the best end after it."
        all_start_logits, all_end_logits = predictions
        features_per_example = collections.defaultdict(list)
        for i, example_id in enumerate(features["example_id"]): features_per_example[example_id].append(i)
        predicted = []
        for example in examples:
            best, best_text = None, ""
            for i in features_per_example[example["id"]]:
                offsets = features[i]["offset_mapping"]
                start_logits, end_logits = all_start_logits[i], all_end_logits[i]
                valid = [k for k, o in enumerate(offsets) if o is not None]
                s = max(valid, key=lambda k: start_logits[k])
                ends = [k for k in valid if s <= k < s + data_args.max_answer_length]
                e = max(ends, key=lambda k: end_logits[k])
                score = start_logits[s] + end_logits[e]
                if best is None or score > best:
                    best, best_text = score, example["context"][offsets[s][0]: offsets[e][1]]
            predicted.append({"id": example["id"], "prediction_text": best_text})
        references = [{"id": ex["id"], "answers": ex["answers"]} for ex in examples]
        return EvalPrediction(predictions=predicted, label_ids=references)

    def compute_metrics(p: EvalPrediction):
        gold = {r["id"]: r["answers"]["text"] for r in p.label_ids}
        exact = [float(pred["prediction_text"] in gold[pred["id"]]) for pred in p.predictions]
        return {"exact_match": 100.0 * sum(exact) / len(exact)}

    trainer = QuestionAnsweringTrainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                                       eval_examples=eval_examples, processing_class=tokenizer,
                                       data_collator=default_data_collator, post_process_function=post_processing_function,
                                       compute_metrics=compute_metrics)

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
        # each evaluation during training went through the overridden evaluate(): its exact match was logged
        results["evaluations_logged"] = sum("eval_exact_match" in h for h in trainer.state.log_history)

    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)

    if training_args.do_predict:
        results_p = trainer.predict(eval_dataset, eval_examples)
        metrics = results_p.metrics
        metrics["predict_samples"] = len(eval_dataset)
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        results.update(metrics)

    print("METRICS " + json.dumps(results, default=float), flush=True)


if __name__ == "__main__":
    main()
