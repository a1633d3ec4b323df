"""The fast path (batches gathered from tensors made once) gives the general path's batches, in the same order, so a
run gives bit-identical weights on either path — with dynamic padding, group_by_length, accumulation and resume."""
import random

import pytest
import torch

import nbtrain.data
from nbtrain import Trainer
from nbtrain.data import TensorBatches

N, BATCH = 44, 4


def tagging_dataset(n: int = N, seed: int = 0):
    "Token classification data of 2 to 19 tokens, some labels -100: lengths vary, so every batch is padded."
    from datasets import Dataset
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [rng.randrange(2, 30) for _ in range(rng.randrange(2, 20))]
        rows.append({"text": "unused", "input_ids": ids, "attention_mask": [1] * len(ids),
                     "labels": [i % 3 if rng.random() < 0.8 else -100 for i in ids]})
    return Dataset.from_list(rows)


def word_tokenizer(side: str = "right"):
    "A tokenizer trained on the spot (a word-level vocabulary), pad id 0."
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]")),
                                  pad_token="[PAD]")
    tok.padding_side = side
    return tok


def tagger(seed: int = 0):
    "A one-layer BertForTokenClassification (dropout on: the run's random draws reach the weights)."
    from transformers import BertConfig, BertForTokenClassification
    torch.manual_seed(seed)
    return BertForTokenClassification(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=32, max_position_embeddings=32, num_labels=3))


def args(out, **kw):
    from nbtrain import TrainingArguments
    return TrainingArguments(**{**dict(output_dir=str(out), per_device_train_batch_size=BATCH, gradient_accumulation_steps=2,
                                       num_train_epochs=2, learning_rate=5e-3, seed=3, data_seed=7, group_by_length=True,
                                       save_strategy="steps", save_steps=4, logging_steps=3, report_to="none",
                                       disable_tqdm=True, log_to_file=False), **kw})


def loaders(trainer, monkeypatch):
    "The trainer's training DataLoader on the fast path and on the general path."
    fast = trainer.get_train_dataloader()
    with monkeypatch.context() as m:
        m.setattr(nbtrain.data, "FAST_PATH_MAX_BYTES", 0)
        general = trainer.get_train_dataloader()
    assert isinstance(fast.dataset, TensorBatches) and not isinstance(general.dataset, TensorBatches)
    return fast, general


def train(out, resume=None, **kw):
    "A run (or the end of one, from `resume`); its final weights, its log and whether it took the fast path."
    trainer = Trainer(tagger(), args(out, **kw), train_dataset=tagging_dataset(), processing_class=word_tokenizer())
    trainer.train(resume_from_checkpoint=resume)
    fast = isinstance(trainer.get_train_dataloader().dataset, TensorBatches)
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return weights, [h for h in trainer.state.log_history if "loss" in h], fast


def run_both(tmp_path, monkeypatch):
    "The same run on the fast path and the general path, and each resumed from the other's checkpoint (FAST_PATH_MAX_BYTES = 0: no dataset fits)."
    fast = train(tmp_path / "fast")
    with monkeypatch.context() as m:
        m.setattr(nbtrain.data, "FAST_PATH_MAX_BYTES", 0)
        general = train(tmp_path / "general")
        # 6 steps an epoch: checkpoint-4 is in the middle of the first, checkpoint-8 of the second
        general_resumed = train(tmp_path / "general_resumed", resume=str(tmp_path / "fast" / "checkpoint-4"), save_strategy="no")
    fast_resumed = train(tmp_path / "fast_resumed", resume=str(tmp_path / "general" / "checkpoint-8"), save_strategy="no")
    return fast, general, fast_resumed, general_resumed


def test_the_same_run_gives_bit_identical_weights_on_either_path(tmp_path, monkeypatch):
    fast, general, fast_resumed, general_resumed = run_both(tmp_path, monkeypatch)
    assert (fast[2], general[2], fast_resumed[2], general_resumed[2]) == (True, False, True, False)
    init = tagger().state_dict()
    assert any(not torch.equal(fast[0][k], init[k]) for k in init), "training changed nothing"
    for name, (weights, log, _) in {"general": general, "fast, resumed from the general run's checkpoint-8": fast_resumed,
                                    "general, resumed from the fast run's checkpoint-4": general_resumed}.items():
        for k in fast[0]:
            assert torch.equal(weights[k], fast[0][k]), f"{name}: {k} differs from the fast run's"
    assert [h["loss"] for h in general[1]] == [h["loss"] for h in fast[1]]
    # tokens seen: counted from the gather's host-side counts on the fast path, from the masks on the device on the
    # general one; a resumed run goes on from its checkpoint's count. 12 steps make two epochs of the real tokens.
    tokens = lambda log: [(h["step"], h["num_tokens"]) for h in log]
    assert tokens(fast[1]) == tokens(general[1])
    assert tokens(fast_resumed[1]) == tokens(fast[1])[-len(fast_resumed[1]):]
    assert tokens(general_resumed[1]) == tokens(fast[1])[-len(general_resumed[1]):]
    assert fast[1][-1]["step"] == 12 and fast[1][-1]["num_tokens"] == 2 * sum(map(len, tagging_dataset()["input_ids"]))


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("collator", ["default", "DataCollatorWithPadding(pad_to_multiple_of=8)"])
def test_every_batch_of_two_epochs_is_the_general_paths(side, collator, tmp_path, monkeypatch):
    # every key, dtype, shape and value, in order: a pad value, a padding side, a rounding or an order of its own fails here
    from transformers import DataCollatorWithPadding
    tok = word_tokenizer(side)
    data_collator = DataCollatorWithPadding(tok, pad_to_multiple_of=8) if collator != "default" else None
    ds = tagging_dataset()
    if data_collator is not None: ds = ds.remove_columns("labels").add_column("labels", [i % 3 for i in range(N)])
    trainer = Trainer(tagger(), args(tmp_path), train_dataset=ds, processing_class=tok, data_collator=data_collator)
    fast, general = loaders(trainer, monkeypatch)
    widths = set()
    for epoch in range(2):
        fast.sampler.set_epoch(epoch); general.sampler.set_epoch(epoch)
        pairs = list(zip(fast, general, strict=True))
        for i, (a, b) in enumerate(pairs):
            assert list(a) == list(b), (epoch, i, list(a), list(b))
            for k in a:
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"epoch {epoch}, batch {i}, {k}:\n{a[k]}\n{b[k]}"
            widths.add(a["input_ids"].shape[1])
    assert len(widths) > 1, "no batch was padded to another width: the test pads nothing"


def test_a_resumed_epoch_starts_at_the_same_batch_on_either_path(tmp_path, monkeypatch):
    # resume sets the sampler's skip: both loaders go on from the same example
    trainer = Trainer(tagger(), args(tmp_path), train_dataset=tagging_dataset(), processing_class=word_tokenizer())
    fast, general = loaders(trainer, monkeypatch)
    for dl in (fast, general): dl.sampler.set_epoch(1); dl.sampler.skip = 3 * BATCH
    got = list(zip(fast, general, strict=True))
    assert len(got) == N // BATCH - 3
    for a, b in got: assert all(torch.equal(a[k], b[k]) for k in b)


def test_accelerate_shards_the_fast_paths_batches_as_the_general_paths(tmp_path, monkeypatch):
    # what launch does with each process's loader: Accelerate gives rank r every other batch (and pads the last round)
    from accelerate.data_loader import prepare_data_loader
    from nbtrain.data import gather_batches
    trainer = Trainer(tagger(), args(tmp_path), train_dataset=tagging_dataset(), processing_class=word_tokenizer())
    fast, general = loaders(trainer, monkeypatch)
    for rank in range(2):
        fast_shard, general_shard = [prepare_data_loader(dl, num_processes=2, process_index=rank, put_on_device=False)
                                     for dl in (fast, general)]
        # the loop takes the fast path's batches with gather_batches: the same as iterating the prepared loader
        got = list(zip(gather_batches(fast_shard), fast_shard, general_shard, strict=True))
        assert len(got) == -(-N // BATCH // 2)
        for a, b, c in got: assert all(torch.equal(a[k], c[k]) and torch.equal(b[k], c[k]) for k in c)


def test_evaluation_gives_the_same_metrics_on_either_path(tmp_path, monkeypatch):
    trainer = Trainer(tagger(), args(tmp_path, eval_strategy="no"), eval_dataset=tagging_dataset(seed=1),
                      processing_class=word_tokenizer())
    fast = trainer.evaluate()
    assert isinstance(trainer.get_eval_dataloader().dataset, TensorBatches)
    with monkeypatch.context() as m:
        m.setattr(nbtrain.data, "FAST_PATH_MAX_BYTES", 0)
        general = trainer.evaluate()
    assert fast["eval_loss"] == general["eval_loss"]


def test_a_subclass_with_its_own_train_dataloader_is_trained_on_it(tmp_path):
    # get_train_dataloader is transformers' override point: whatever it returns is what the run trains on
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForTokenClassification
    seen = []

    class OwnLoader(Trainer):
        def get_train_dataloader(self):
            pad = DataCollatorForTokenClassification(self.processing_class)
            def collate(rows):
                seen.append(len(rows))
                return pad(rows)
            return DataLoader(self.train_dataset.remove_columns(["text"]), batch_size=2, collate_fn=collate)

    trainer = OwnLoader(tagger(), args(tmp_path, save_strategy="no", max_steps=3, gradient_accumulation_steps=1,
                                       group_by_length=False), train_dataset=tagging_dataset(), processing_class=word_tokenizer())
    assert trainer.train().global_step == 3
    assert seen[:3] == [2, 2, 2]
