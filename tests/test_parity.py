"""One tutorial script, two libraries: changing only the import line runs it on nbtrain with the same result."""
import json
import os
import subprocess
import sys

# Written as a user would write it for transformers.Trainer. {IMPORT} is the only line that differs.
# It avoids what transformers 5 no longer accepts (warmup_ratio, evaluation_strategy).
SCRIPT = r'''
import json, random, sys

import numpy as np
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast
{IMPORT}

output_dir = sys.argv[1]

# 1. a small review data set: the word "great" or "awful" decides the label
FILLER = "the a movie film plot actor story scene music it was really quite very this that and but so".split()
def make_reviews(n, seed):
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randrange(2)
        words = rng.choices(FILLER, k=rng.randint(4, 10))
        words.insert(rng.randrange(len(words) + 1), "great" if label else "awful")
        texts.append(" ".join(words)); labels.append(label)
    return {"text": texts, "label": labels}

train_raw = Dataset.from_dict(make_reviews(256, seed=0))
eval_raw = Dataset.from_dict(make_reviews(128, seed=1))

# 2. a WordPiece tokenizer trained on the spot
tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
tok.normalizer = normalizers.BertNormalizer(lowercase=True)
tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
tok.train_from_iterator(train_raw["text"], trainers.WordPieceTrainer(
    vocab_size=100, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
tok.post_processor = processors.TemplateProcessing(
    single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                    cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")

def tokenize(batch):
    return tokenizer(batch["text"], truncation=True)

train_ds = train_raw.map(tokenize, batched=True)
eval_ds = eval_raw.map(tokenize, batched=True)

# 3. a tiny BERT classifier, built from a config
torch.manual_seed(0)
config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=32, num_labels=2)
model = BertForSequenceClassification(config)

def compute_metrics(eval_pred):
    logits, labels = eval_pred
    predictions = np.argmax(logits, axis=-1)
    return {"accuracy": float((predictions == labels).mean())}

# 4. train and evaluate
args = TrainingArguments(
    output_dir=output_dir,
    eval_strategy="epoch",
    num_train_epochs=4,
    per_device_train_batch_size=16,
    learning_rate=2e-3,
    seed=42,
    report_to="none",
    save_strategy="no",
)
trainer = Trainer(
    model=model,
    args=args,
    train_dataset=train_ds,
    eval_dataset=eval_ds,
    processing_class=tokenizer,
    compute_metrics=compute_metrics,
)
trainer.train()
metrics = trainer.evaluate()
print("RESULT " + json.dumps({"eval_accuracy": metrics["eval_accuracy"], "eval_loss": metrics["eval_loss"]}))
'''

IMPORTS = {"transformers": "from transformers import Trainer, TrainingArguments",
           "nbtrain": "from nbtrain import Trainer, TrainingArguments"}


def run_script(library: str, output_dir) -> subprocess.Popen:
    code = SCRIPT.replace("{IMPORT}", IMPORTS[library])
    assert code.count(IMPORTS[library]) == 1
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           # two runs side by side on a small machine: one thread each, or they fight over the cores
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-c", code, str(output_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, cwd=str(output_dir.parent), text=True)


def result(proc: subprocess.Popen, library: str) -> dict:
    out, _ = proc.communicate()
    assert proc.returncode == 0, f"the {library} run failed:\n{out[-4000:]}"
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    assert len(lines) == 1, f"the {library} run printed no RESULT line:\n{out[-4000:]}"
    return json.loads(lines[0].removeprefix("RESULT "))


def test_tutorial_runs_unchanged_with_either_import(tmp_path):
    procs = {lib: run_script(lib, tmp_path / lib) for lib in IMPORTS}
    res = {lib: result(p, lib) for lib, p in procs.items()}
    acc_hf, acc_nb = res["transformers"]["eval_accuracy"], res["nbtrain"]["eval_accuracy"]
    print(res)
    assert acc_hf >= 0.85, f"transformers.Trainer reached only {acc_hf} (chance is 0.5)"
    assert acc_nb >= 0.85, f"nbtrain.Trainer reached only {acc_nb} (chance is 0.5)"
    assert abs(acc_hf - acc_nb) <= 0.1
