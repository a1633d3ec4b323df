"""Tiny, offline inputs for the compat scripts: models built from configs, word-level tokenizers trained on the spot,
and small JSON / CSV data files, written into a folder.

    python tests/compat/make_inputs.py /tmp/compat   # then run a script by hand, e.g. as tests/test_compat.py does

Dropout is off in every model: the two trainers draw random numbers in different orders, and without dropout a run
is a function of the seed (head initialisation), the data order (the same seeded permutation in both) and the
arithmetic alone, so the two trainers' metrics can be compared closely.

Every model is a "pretrained" checkpoint only in the sense that `from_pretrained(folder)` loads it: the scripts add
their task head (randomly initialised after `set_seed`, as on the Hub). Nothing here touches the network.
"""
from __future__ import annotations

import csv
import json
import os
import random
import sys
from pathlib import Path

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"): os.environ.setdefault(_k, "1")

# a tiny language: names live in places and like things; which word is which decides the labels of every task
NAMES = ["anna", "ben", "carl", "dora", "emil", "fay", "gus", "hana"]
PLACES = ["paris", "rome", "oslo", "lima", "kyiv", "baku", "doha", "riga"]
THINGS = ["tea", "jazz", "rain", "chess", "bread", "snow", "maps", "ink"]
GOOD, BAD = ["good", "great", "nice", "fine"], ["bad", "awful", "poor", "sad"]
FILLER = ["the", "a", "is", "was", "very", "quite", "and", "then", "it", "day"]
OTHER = ["lives", "in", "likes", "where", "does", "live", "?", "."]
# the target language of the translation task: one word for each source word
TARGET = {w: w[::-1] + "x" for w in NAMES + PLACES + THINGS}
TARGET.update({"likes": "mag", "lives": "wohnt", "in": "im", "and": "und"})

WORDS = sorted(set(NAMES + PLACES + THINGS + GOOD + BAD + FILLER + OTHER + list(TARGET.values())))


def word_tokenizer(specials: list[str], kind: str):
    "A word-level `PreTrainedTokenizerFast` over WORDS; `kind` picks the special tokens it adds (bert, t5, or none for a causal LM)."
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]" if "[UNK]" in vocab else "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if kind == "bert":
        cls, sep = vocab["[CLS]"], vocab["[SEP]"]
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                           special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)
    if kind == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", vocab["</s>"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                       model_max_length=64)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", model_max_length=64)


BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_bert(folder: Path):
    "A one-layer BertModel (no head: each script adds its own) and its tokenizer."
    import torch
    from transformers import BertConfig, BertModel
    tok = word_tokenizer(BERT_SPECIALS, "bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=64, pad_token_id=tok.pad_token_id, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def write_llama(folder: Path):
    """A one-layer LlamaForCausalLM. Not GPT-2: transformers 5's Trainer counts a GPT-2 batch's label tokens without the
    causal shift (GPT2LMHeadModel has no `loss_type`), so its training loss is (L-1)/L of the true mean and the two
    trainers would differ for that reason alone; Llama's `loss_type` is ForCausalLM and both count L-1 per row."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = word_tokenizer(["<pad>", "<unk>", "<|endoftext|>"], "causal")
    torch.manual_seed(0)
    eos = tok.eos_token_id
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, bos_token_id=eos, eos_token_id=eos,
                      pad_token_id=tok.pad_token_id, attention_dropout=0.0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def write_t5(folder: Path):
    import torch
    from transformers import T5Config, T5ForConditionalGeneration
    tok = word_tokenizer(["<pad>", "</s>", "<unk>"], "t5")
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=16, d_ff=32, d_kv=8, num_layers=1, num_decoder_layers=1, num_heads=2,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
                   dropout_rate=0.0)
    T5ForConditionalGeneration(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def _jsonl(path: Path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def classification_rows(n: int, rng: random.Random, labelled: bool = True) -> list[dict]:
    "Sentences with one sentiment word among fillers; label 1 for a good one."
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = [rng.choice(FILLER + THINGS) for _ in range(rng.randrange(5, 10))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(GOOD if label else BAD))
        rows.append({"sentence": " ".join(words), "label": label})
    return rows


def ner_rows(n: int, rng: random.Random) -> list[dict]:
    "Pre-split tokens tagged O (0), B-PER (1) or B-LOC (2)."
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randrange(6, 12)):
            r = rng.random()
            w, t = (rng.choice(NAMES), 1) if r < 0.15 else (rng.choice(PLACES), 2) if r < 0.3 else (rng.choice(FILLER + THINGS), 0)
            tokens.append(w); tags.append(t)
        rows.append({"tokens": tokens, "ner_tags": tags})
    return rows


def story(rng: random.Random) -> str:
    n, p, t = rng.choice(NAMES), rng.choice(PLACES), rng.choice(THINGS)
    return f"{n} lives in {p} and likes {t} ."


def qa_rows(n: int, rng: random.Random, start: int = 0) -> list[dict]:
    "SQuAD-style rows: the answer is the place the asked-about person lives in."
    rows = []
    for i in range(n):
        people = rng.sample(NAMES, 3)
        sentences = [f"{who} lives in {rng.choice(PLACES)} ." for who in people]
        context = " ".join(sentences)
        k = rng.randrange(3)
        place = sentences[k].split()[3]
        start_char = len(" ".join(sentences[:k])) + (1 if k else 0) + len(f"{people[k]} lives in ")
        assert context[start_char:start_char + len(place)] == place
        rows.append({"id": f"q{start + i}", "title": "t", "context": context, "question": f"where does {people[k]} live ?",
                     "answers": {"text": [place], "answer_start": [start_char]}})
    return rows


def translation_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        src = f"{rng.choice(NAMES)} likes {rng.choice(THINGS)}" if rng.random() < 0.5 else f"{rng.choice(NAMES)} lives in {rng.choice(PLACES)}"
        rows.append({"translation": {"en": src, "xx": " ".join(TARGET[w] for w in src.split())}})
    return rows


def build(root: str | Path) -> Path:
    "Write every model, tokenizer and data file under `root`; returns it."
    root = Path(root)
    for name, write in (("bert", write_bert), ("llama", write_llama), ("t5", write_t5)):
        if not (root / name / "config.json").is_file(): write(root / name)
    rng = random.Random(1234)
    d = root / "data"
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 96), ("validation", 32), ("test", 32)):  # CSV, as run_glue also reads
        with open(d / f"cls_{split}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["sentence", "label"])
            w.writeheader(); w.writerows(classification_rows(n, rng))
    for split, n in (("train", 96), ("validation", 32)): _jsonl(d / f"ner_{split}.json", ner_rows(n, rng))
    _jsonl(d / "clm_train.json", [{"text": story(rng)} for _ in range(160)])
    _jsonl(d / "clm_validation.json", [{"text": story(rng)} for _ in range(40)])
    _jsonl(d / "qa_train.json", qa_rows(96, rng))
    _jsonl(d / "qa_validation.json", qa_rows(32, rng, start=1000))
    _jsonl(d / "mt_train.json", translation_rows(96, rng))
    _jsonl(d / "mt_validation.json", translation_rows(24, rng))
    return root


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "compat_fixtures"))
