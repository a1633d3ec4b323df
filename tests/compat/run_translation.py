#!/usr/bin/env python
"""Translation with a sequence-to-sequence model, in the shape of transformers'
`examples/pytorch/translation/run_translation.py`.

API exercised:
- `HfArgumentParser((ModelArguments, DataTrainingArguments, Seq2SeqTrainingArguments))` with
  `--predict_with_generate --generation_max_length N --generation_num_beams K`;
- `tokenizer(inputs, ...)` and `tokenizer(text_target=targets, ...)`, `-100` for padded label tokens,
  `DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)` (decoder inputs from the labels);
- `Seq2SeqTrainer(..., compute_metrics=...)` where `compute_metrics` decodes generated ids (`-100` replaced by the
  pad id) and scores them with sacrebleu and exact match, plus `gen_len`;
- `train()`, `evaluate(max_length=..., num_beams=..., metric_key_prefix="eval")`,
  `predict(ds, metric_key_prefix="predict", max_length=..., num_beams=...)` with `.predictions` / `.metrics`,
  `is_world_process_zero()`, `log_metrics` / `save_metrics` / `save_state` / `save_model`.

A tiny T5 built from a config; the "language" maps each word to another one. Prints `METRICS {json}` as its last line.
"""
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import sacrebleu
import transformers
from datasets import load_dataset
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, HfArgumentParser, set_seed

if os.environ.get("TRAINER") == "nbtrain": from nbtrain import Seq2SeqTrainer, Seq2SeqTrainingArguments   # the one changed import
else: from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "A folder saved with save_pretrained (model and tokenizer)."})


@dataclass
class DataTrainingArguments:
    source_lang: str = field(default="en")
    target_lang: str = field(default="xx")
    train_file: Optional[str] = field(default=None, metadata={"help": "json lines with a `translation` dict."})
    validation_file: Optional[str] = field(default=None)
    max_source_length: int = field(default=16)
    max_target_length: int = field(default=16)
    val_max_target_length: Optional[int] = field(default=None)
    num_beams: Optional[int] = field(default=None, metadata={"help": "Beams for evaluate and predict."})
    ignore_pad_token_for_loss: bool = field(default=True)
    source_prefix: str = field(default="")

    def __post_init__(self):
        if self.val_max_target_length is None: self.val_max_target_length = self.max_target_length


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, Seq2SeqTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    set_seed(training_args.seed)

    raw_datasets = load_dataset("json", data_files={"train": data_args.train_file, "validation": data_args.validation_file})
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_args.model_name_or_path)
    if model.config.decoder_start_token_id is None: raise ValueError("Make sure that `config.decoder_start_token_id` is set")

    source_lang, target_lang, prefix = data_args.source_lang, data_args.target_lang, data_args.source_prefix
    padding = False

    def preprocess_function(examples, max_target_length):
        inputs = [prefix + ex[source_lang] for ex in examples["translation"]]
        targets = [ex[target_lang] for ex in examples["translation"]]
        model_inputs = tokenizer(inputs, max_length=data_args.max_source_length, padding=padding, truncation=True)
        labels = tokenizer(text_target=targets, max_length=max_target_length, padding=padding, truncation=True)
        if padding == "max_length" and data_args.ignore_pad_token_for_loss:
            labels["input_ids"] = [[(l if l != tokenizer.pad_token_id else -100) for l in label] for label in labels["input_ids"]]
        model_inputs["labels"] = labels["input_ids"]
        return model_inputs

    column_names = raw_datasets["train"].column_names
    with training_args.main_process_first(desc="train dataset map pre-processing"):
        train_dataset = raw_datasets["train"].map(preprocess_function, batched=True, remove_columns=column_names,
                                                  fn_kwargs={"max_target_length": data_args.max_target_length})
    with training_args.main_process_first(desc="validation dataset map pre-processing"):
        eval_dataset = raw_datasets["validation"].map(preprocess_function, batched=True, remove_columns=column_names,
                                                      fn_kwargs={"max_target_length": data_args.val_max_target_length})

    label_pad_token_id = -100 if data_args.ignore_pad_token_for_loss else tokenizer.pad_token_id
    data_collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=label_pad_token_id,
                                           pad_to_multiple_of=8 if training_args.fp16 else None)

    def postprocess_text(preds, labels):
        return [p.strip() for p in preds], [[l.strip()] for l in labels]

    def compute_metrics(eval_preds):
        preds, labels = eval_preds
        if isinstance(preds, tuple): preds = preds[0]
        preds = np.where(preds != -100, preds, tokenizer.pad_token_id)  # generated ids padded with -100 when gathered
        decoded_preds = tokenizer.batch_decode(preds, skip_special_tokens=True)
        labels = np.where(labels != -100, labels, tokenizer.pad_token_id)
        decoded_labels = tokenizer.batch_decode(labels, skip_special_tokens=True)
        decoded_preds, decoded_labels = postprocess_text(decoded_preds, decoded_labels)
        bleu = sacrebleu.corpus_bleu(decoded_preds, [[l[0] for l in decoded_labels]]).score
        exact = np.mean([p == l[0] for p, l in zip(decoded_preds, decoded_labels)])
        prediction_lens = [np.count_nonzero(pred != tokenizer.pad_token_id) for pred in preds]
        return {"bleu": round(bleu, 4), "exact_match": float(exact), "gen_len": round(float(np.mean(prediction_lens)), 4)}

    trainer = Seq2SeqTrainer(model=model, args=training_args, train_dataset=train_dataset if training_args.do_train else None,
                             eval_dataset=eval_dataset if training_args.do_eval else None, processing_class=tokenizer,
                             data_collator=data_collator,
                             compute_metrics=compute_metrics if training_args.predict_with_generate else None)

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

    max_length = training_args.generation_max_length if training_args.generation_max_length is not None else data_args.val_max_target_length
    num_beams = data_args.num_beams if data_args.num_beams is not None else training_args.generation_num_beams
    if training_args.do_eval:
        metrics = trainer.evaluate(max_length=max_length, num_beams=num_beams, metric_key_prefix="eval")
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)

    if training_args.do_predict:
        predict_results = trainer.predict(eval_dataset, metric_key_prefix="predict", max_length=max_length, num_beams=num_beams)
        metrics = predict_results.metrics
        metrics["predict_samples"] = len(eval_dataset)
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        if trainer.is_world_process_zero() and training_args.predict_with_generate:
            predictions = np.where(predict_results.predictions != -100, predict_results.predictions, tokenizer.pad_token_id)
            predictions = [p.strip() for p in tokenizer.batch_decode(predictions, skip_special_tokens=True)]
            with open(os.path.join(training_args.output_dir, "generated_predictions.txt"), "w", encoding="utf-8") as writer:
                writer.write("\n".join(predictions))
        results.update(metrics)

    print("METRICS " + json.dumps(results, default=float), flush=True)


if __name__ == "__main__":
    main()
