"""SFTTrainer: the tokens that carry the loss, packing's exactness, the readouts, and TRL parity.

- completion_only_loss / assistant_only_loss: the labels are -100 on exactly the prompt / non-assistant tokens. The
  expected labels are built here from the pieces of each example tokenized apart (a message's header and body; the
  prompt and the completion), not by the code under test.
- packing: each example's logits in a packed batch are those it has alone (sdpa and eager, rows and one flat row),
  and the trainer's loss on a packed batch is the loss of the examples alone; that one fails if the trainer let the
  model build its KV cache (which stops transformers from separating the packed examples).
- the readouts: num_tokens and mean_token_accuracy of a one-step run, against an independent count.
- TRL: tests/compat/run_sft.py runs on TRL's SFTTrainer and on nbtrain's, one import apart, to the same losses,
  token counts and accuracies (skipped where TRL does not import; it is optional).

Tiny models from configs and a tokenizer trained on the spot; nothing is downloaded.
"""
import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

def chat(a: int, b: int, long: bool = False) -> list[dict]:
    msgs = [{"role": "user", "content": f"what is {a} plus {b}"}, {"role": "assistant", "content": f"{a + b} is {a} plus {b}"}]
    if long:
        msgs = [{"role": "system", "content": "be brief"}] + msgs + [{"role": "user", "content": "yes"},
                                                                     {"role": "assistant", "content": "no"}]
    return msgs

def chats(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    return [chat(rng.randrange(5), rng.randrange(5), long=rng.random() < 0.5) for _ in range(n)]

@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from nbtrain.sft import CHATML
    words = [m["content"] for c in chats(100) for m in c] + ["user assistant system be brief yes no"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(words, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                                       show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML)

def tiny_llama(tok, seed: int = 0, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                                        attn_implementation=attn))

_OUT, _RUNS = [], itertools.count()  # a fresh output folder per trainer (a training run holds its output_dir)

def config(**kw):
    from nbtrain import SFTConfig
    return SFTConfig(**{"output_dir": str(_OUT[0] / f"run{next(_RUNS)}"), "bf16": False, "save_strategy": "no", "disable_tqdm": True,
                        "report_to": "none", **kw})

@pytest.fixture(autouse=True)
def _output_dirs(tmp_path):
    _OUT[:] = [tmp_path]
    yield
    _OUT.clear()

def pieces(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]

def expected_chat(tok, messages: list[dict], loss_on) -> tuple[list[int], list[int]]:
    "ids and labels of a ChatML conversation, from each message's header and body tokenized apart."
    ids, labels = [], []
    for i, m in enumerate(messages):
        head, body = pieces(tok, f"<|im_start|>{m['role']}\n"), pieces(tok, f"{m['content']}<|im_end|>\n")
        ids += head + body
        labels += [-100] * len(head) + (body if loss_on(i, m) else [-100] * len(body))
    return ids, labels


def test_completion_only_loss_masks_exactly_the_prompt(tok):
    from datasets import Dataset
    from nbtrain import SFTTrainer
    model = tiny_llama(tok)
    prompts, completions = [f"what is {a} plus {b}" for a, b in [(1, 2), (3, 4), (0, 4)]], [" 3", " 7 is 3 plus 4", " 4"]
    data = Dataset.from_dict({"prompt": prompts, "completion": completions})
    trainer = SFTTrainer(model, config(), train_dataset=data, processing_class=tok)  # completion_only_loss=None: on
    for row, p, c in zip(trainer.train_dataset, prompts, completions):
        prompt, whole = pieces(tok, p), pieces(tok, p + c + "<|im_end|>")  # the EOS ends a plain completion
        assert whole[:len(prompt)] == prompt
        assert row["input_ids"] == whole
        assert row["labels"] == [-100] * len(prompt) + whole[len(prompt):]
    off = SFTTrainer(model, config(completion_only_loss=False), train_dataset=data, processing_class=tok)
    assert all(r["labels"] == r["input_ids"] for r in off.train_dataset)
    # conversational prompt-completion: the prompt's messages and the generation prompt are the prompt
    convs = [chat(a, b, long) for a, b, long in [(1, 2, False), (2, 2, True)]]
    conv = Dataset.from_dict({"prompt": [c[:-1] for c in convs], "completion": [c[-1:] for c in convs]})
    trainer = SFTTrainer(model, config(), train_dataset=conv, processing_class=tok)
    for row, c in zip(trainer.train_dataset, convs):
        ids, labels = expected_chat(tok, c, lambda i, m: i == len(c) - 1)
        assert row["input_ids"] == ids and row["labels"] == labels


@pytest.mark.parametrize("packing", [False, True])
def test_assistant_only_loss_masks_exactly_the_non_assistant_tokens(tok, packing):
    from datasets import Dataset
    from nbtrain import SFTTrainer
    convs = chats(12, seed=1)
    data = Dataset.from_dict({"messages": convs})
    trainer = SFTTrainer(tiny_llama(tok), config(assistant_only_loss=True, packing=packing, max_length=96),
                         train_dataset=data, processing_class=tok)
    expected = [expected_chat(tok, c, lambda i, m: m["role"] == "assistant") for c in convs]
    assert any(m["role"] == "system" for c in convs for m in c) and any(len(c) == 5 for c in convs)
    if not packing:
        assert [(r["input_ids"], r["labels"]) for r in trainer.train_dataset] == expected
        return
    seen = []
    for row in trainer.train_dataset:  # each packed row is its examples one after the other
        start = 0
        for n in row["seq_lengths"]:
            seen.append((row["input_ids"][start:start + n], row["labels"][start:start + n])); start += n
        assert start == len(row["input_ids"]) <= 96
    assert sorted(seen) == sorted(expected)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    got = sorted((row_ids[s:s + n].tolist(), row_labels[s:s + n].tolist())
                 for row_ids, row_labels, row in zip(batch["input_ids"], batch["labels"], trainer.train_dataset)
                 for s, n in zip([sum(row["seq_lengths"][:k]) for k in range(len(row["seq_lengths"]))], row["seq_lengths"]))
    assert got == sorted(expected)  # the collator's -100 on each example's first token is already there: a header


def test_assistant_only_loss_with_generation_markers_is_transformers_mask(tok):
    "A template with {% generation %} takes transformers' return_assistant_tokens_mask (TRL's path): the same labels."
    from datasets import Dataset
    from nbtrain import SFTTrainer
    marked = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
              "{{ m['content'] + '<|im_end|>\n' }}{% endgeneration %}{% else %}{{ '<|im_start|>' + m['role'] + '\n' + "
              "m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}")
    convs = chats(4, seed=2)
    marked_tok = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               chat_template=marked)
    rows = SFTTrainer(tiny_llama(tok), config(assistant_only_loss=True), train_dataset=Dataset.from_dict({"messages": convs}),
                      processing_class=marked_tok).train_dataset
    assert [(r["input_ids"], r["labels"]) for r in rows] == [expected_chat(tok, c, lambda i, m: m["role"] == "assistant") for c in convs]


def test_bad_input_is_an_error_before_the_first_step(tok):
    from datasets import Dataset
    from nbtrain import SFTTrainer
    from nbtrain.data import DataError
    model = tiny_llama(tok)
    with pytest.raises(DataError, match=r"'question', 'answer'.*dataset_text_field"):
        SFTTrainer(model, config(), train_dataset=Dataset.from_dict({"question": ["q"], "answer": ["a"]}), processing_class=tok)
    bare = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    with pytest.raises(ValueError, match="chat template"):
        SFTTrainer(model, config(), train_dataset=Dataset.from_dict({"messages": chats(2)}), processing_class=bare)
    with pytest.raises(ValueError, match="completion_only_loss=True needs 'prompt' and 'completion'"):
        SFTTrainer(model, config(completion_only_loss=True), train_dataset=Dataset.from_dict({"text": ["hi"]}), processing_class=tok)
    no_reply = Dataset.from_dict({"messages": [chat(1, 1), [{"role": "user", "content": "yes"}]]})
    with pytest.raises(ValueError, match=r"without an assistant turn \(the first: 1\)"):
        SFTTrainer(model, config(assistant_only_loss=True), train_dataset=no_reply, processing_class=tok)
    rewriting = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              chat_template="{% for m in messages %}{{ m['role'] + ': ' }}{% if m['role'] == 'assistant' and "
                                            "not loop.last %}{{ '...' }}{% else %}{{ m['content'] }}{% endif %}{{ '\n' }}{% endfor %}")
    with pytest.raises(ValueError, match="generation %}"):
        SFTTrainer(model, config(assistant_only_loss=True), train_dataset=Dataset.from_dict({"messages": chats(4, seed=3)}),
                   processing_class=rewriting)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_have_their_logits_alone(tok, attn, capsys):
    from nbtrain.sft import SFTCollator, pack_dataset
    from datasets import Dataset
    model = tiny_llama(tok, attn=attn).eval()
    rng = random.Random(0)
    seqs = [[rng.randrange(3, len(tok)) for _ in range(rng.randrange(3, 40))] for _ in range(16)]
    packed = pack_dataset(Dataset.from_dict({"input_ids": seqs, "labels": seqs}), 64)
    assert max(len(r["seq_lengths"]) for r in packed) >= 3  # rows really hold several examples
    with torch.no_grad():
        alone = {tuple(s): model(input_ids=torch.tensor([s])).logits[0] for s in seqs}
        for flat in (False, True):
            rows = [packed[i] for i in range(len(packed))]
            batch = SFTCollator(tok.pad_token_id, padding_free=flat)(rows)
            logits = model(**batch, use_cache=False).logits
            worst, pos, r = 0.0, 0, 0
            for row in rows:
                start = 0 if not flat else pos
                for n in row["seq_lengths"]:
                    ids = batch["input_ids"][0 if flat else r, start:start + n].tolist()
                    worst = max(worst, (logits[0 if flat else r, start:start + n] - alone[tuple(ids)]).abs().max().item())
                    start += n
                pos, r = (start if flat else 0), r + 1
            with capsys.disabled(): print(f"\n{attn}, {'one flat row' if flat else 'rows'}: largest logit difference {worst:.1e}")
            assert worst <= 1e-5, worst


def test_trainer_loss_on_a_packed_batch_is_the_examples_loss_alone(tok):
    "The trainer runs the model without a KV cache: with one, the packed examples would see each other."
    from datasets import Dataset
    from nbtrain import SFTTrainer
    convs = chats(6, seed=4)
    model = tiny_llama(tok)
    trainer = SFTTrainer(model, config(packing=True, max_length=128, gradient_checkpointing=False),
                         train_dataset=Dataset.from_dict({"messages": convs}), processing_class=tok)
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    assert any(len(r["seq_lengths"]) > 1 for r in rows)
    batch = trainer.data_collator(rows)
    model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        nll, count = 0.0, 0
        for c in convs:  # each conversation alone, its mean loss weighed by its predicted tokens
            ids = torch.tensor([tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]])
            nll += model(input_ids=ids, labels=ids, use_cache=False).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert abs(loss.item() - nll / count) < 1e-5, (loss.item(), nll / count)


def accuracy(model, ids: list[list[int]]) -> float:
    "The share of next tokens the model's top prediction gets right, each sequence alone."
    right = total = 0
    model.eval()
    with torch.no_grad():
        for x in ids:
            pred = model(input_ids=torch.tensor([x])).logits[0, :-1].argmax(-1).tolist()
            right += sum(p == t for p, t in zip(pred, x[1:])); total += len(x) - 1
    return right / total

def test_num_tokens_and_mean_token_accuracy(tok):
    "One step on one batch: the tokens it holds, and the accuracy of the weights the step started from; then evaluation's."
    from datasets import Dataset
    from nbtrain import SFTTrainer
    convs = chats(8, seed=5)
    model = tiny_llama(tok)
    fresh = tiny_llama(tok)  # the same initial weights
    trainer = SFTTrainer(model, config(max_steps=1, logging_steps=1, per_device_train_batch_size=8, learning_rate=1e-2),
                         train_dataset=Dataset.from_dict({"messages": convs}), processing_class=tok)
    trainer.train()
    row = next(r for r in trainer.state.log_history if "loss" in r)
    ids = [tok.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"] for c in convs]
    assert row["num_tokens"] == sum(map(len, ids))  # padding left out
    assert abs(row["mean_token_accuracy"] - accuracy(fresh, ids)) < 1e-6, (row["mean_token_accuracy"], accuracy(fresh, ids))
    # trained a little, the model gets some tokens right: evaluation's accuracy, one batch of the whole set
    trainer = SFTTrainer(fresh, config(max_steps=25, logging_steps=25, per_device_train_batch_size=8, learning_rate=1e-2,
                                       per_device_eval_batch_size=8, gradient_checkpointing=False),
                         train_dataset=Dataset.from_dict({"messages": chats(32, 6)}),
                         processing_class=tok)
    trainer.train()
    got = trainer.evaluate(Dataset.from_dict({"messages": convs}))["eval_mean_token_accuracy"]
    expected = accuracy(fresh, ids)
    assert expected > 0.2 and abs(got - expected) < 1e-6, (got, expected)


# ---- TRL parity --------------------------------------------------------------------------------
def _trl_missing() -> str | None:
    try:
        import trl  # noqa: F401  (TRL is optional; a dev extra)
        return None
    except Exception as e:  # ImportError, or an incompatibility with the transformers installed
        return f"TRL does not import here: {type(e).__name__}: {e}"

@pytest.mark.skipif(_trl_missing() is not None, reason=str(_trl_missing()))
def test_trl_script_runs_on_both_trainers_to_the_same_losses(tok, tmp_path):
    model_dir, data_dir = tmp_path / "model", tmp_path / "data"
    tiny_llama(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data_dir.mkdir()
    for name, n, seed in (("train", 32, 6), ("test", 8, 7)):
        with open(data_dir / f"{name}.jsonl", "w") as f:
            for c in chats(n, seed):
                f.write(json.dumps({"prompt": c[:-1], "completion": c[-1:]}) + "\n")
    procs = {}
    for trainer in ("trl", "nbtrain"):  # both at once: each is mostly imports
        env = {**os.environ, "TRAINER": trainer, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        procs[trainer] = subprocess.Popen([sys.executable, str(ROOT / "tests" / "compat" / "run_sft.py"), str(model_dir),
                                           str(data_dir), str(tmp_path / f"out_{trainer}")], env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    results = {}
    for trainer, proc in procs.items():
        out, err = proc.communicate(timeout=300)  # a hang guard, not a speed claim
        assert proc.returncode == 0, f"TRAINER={trainer}:\n{err[-3000:]}"
        results[trainer] = json.loads(out.strip().splitlines()[-1].removeprefix("METRICS "))
    trl, ours = results["trl"], results["nbtrain"]
    print(json.dumps({t: {k: v for k, v in r.items() if k != "first_labels"} for t, r in results.items()}))
    # the same data preparation (rows, labels) and the same defaults (bf16 where it runs, gradient checkpointing)
    for key in ("train_rows", "first_labels", "bf16", "gradient_checkpointing", "num_tokens"):
        assert ours[key] == trl[key], key
    # float32 on both sides, the same steps on the same batches: they agree to float rounding (observed: identical
    # training losses, eval_loss 3e-7 apart); a wrong mask or a missed token moves the loss by more than 1%
    for a, b in zip(ours["loss"] + [ours["eval_loss"]], trl["loss"] + [trl["eval_loss"]]):
        assert abs(a - b) <= 1e-4 * abs(b), (ours["loss"], trl["loss"], ours["eval_loss"], trl["eval_loss"])
    for a, b in zip(ours["mean_token_accuracy"] + [ours["eval_mean_token_accuracy"]],
                    trl["mean_token_accuracy"] + [trl["eval_mean_token_accuracy"]]):
        assert abs(a - b) <= 1e-6, (ours["mean_token_accuracy"], trl["mean_token_accuracy"])
