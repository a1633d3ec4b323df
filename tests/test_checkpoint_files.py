"""The checkpoint folder: clear errors for what cannot be loaded, no pickle ever loaded, transformers-loadable
weights, and rotation that keeps the best and the newest."""
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nbtrain import Trainer, TrainerCallback, load_checkpoint
from nbtrain.checkpoint import CheckpointError, list_checkpoints, load_weights

torch.set_num_threads(1)

SEQ = 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    "One short run with checkpoints at steps 2 and 4 (the last): (trainer, output_dir)."
    from conftest import keyword_dataset, tiny_bert
    from nbtrain import TrainingArguments
    out = tmp_path_factory.mktemp("trained") / "out"
    args = TrainingArguments(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=8, learning_rate=1e-2,
                             logging_steps=1, report_to="none", disable_tqdm=True)
    trainer = Trainer(tiny_bert(dropout=0.1), args, train_dataset=keyword_dataset(32))
    trainer.train()
    return trainer, out


@pytest.fixture
def checkpoint(trained, tmp_path) -> Path:
    "A copy of the first checkpoint (step 2 of 4), free to damage."
    _, out = trained
    dst = tmp_path / "copy" / "checkpoint-2"
    shutil.copytree(out / "checkpoint-2", dst)
    return dst


def resuming_trainer(tiny, make_args, tmp_path, model=None):
    "A new trainer of the `trained` run (or with another `model`), to resume from a checkpoint."
    return Trainer(model if model is not None else tiny.bert(dropout=0.1), make_args(max_steps=4, save_steps=2, logging_steps=1,
                   save_strategy="steps", learning_rate=1e-2, output_dir=str(tmp_path / "resumed")),
                   train_dataset=tiny.dataset(32))


def assert_resume_refused(tiny, make_args, tmp_path, path, match, exc=CheckpointError, model=None):
    "resume_from_checkpoint=path raises, and leaves the model as it was: nothing is half-restored, no step runs."
    trainer = resuming_trainer(tiny, make_args, tmp_path, model)
    before = tiny.snapshot(trainer.model)
    with pytest.raises(exc, match=match):
        trainer.train(resume_from_checkpoint=str(path))
    assert tiny.same_weights(trainer.model, before)
    assert trainer.state.global_step == 0


# ---- clear errors -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "rng_state.safetensors"])
def test_truncated_file_is_named(tiny, make_args, tmp_path, checkpoint, name):
    f = checkpoint / name
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    match = rf"{f}.*cannot be read as safetensors.*truncated"
    assert_resume_refused(tiny, make_args, tmp_path, checkpoint, match)
    if name == "model.safetensors":
        with pytest.raises(CheckpointError, match=match): load_checkpoint(checkpoint, tiny.bert())
        with pytest.raises(CheckpointError, match=match): load_checkpoint(checkpoint)  # built from config.json


@pytest.mark.parametrize("name", ["optimizer.json", "trainer_state.json", "scheduler.json"])
def test_damaged_json_is_named(tiny, make_args, tmp_path, checkpoint, name):
    f = checkpoint / name
    f.write_text(f.read_text()[:-20])
    assert_resume_refused(tiny, make_args, tmp_path, checkpoint, rf"{f} is not valid JSON")


def test_other_architecture_lists_mismatched_keys(tiny, make_args, tmp_path, checkpoint):
    from transformers import GPT2Config, GPT2ForSequenceClassification
    gpt2 = GPT2ForSequenceClassification(GPT2Config(vocab_size=32, n_positions=SEQ, n_embd=16, n_layer=1, n_head=2,
                                                    num_labels=2, pad_token_id=0, bos_token_id=1, eos_token_id=1))
    match = (r"checkpoint of BertForSequenceClassification.*does not fit this GPT2ForSequenceClassification.*"
             r"17 in the model but not in the checkpoint: transformer\.wte\.weight.*"
             r"25 in the checkpoint but not in the model: .*bert\.embeddings\.word_embeddings\.weight")
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(checkpoint, gpt2)
    assert_resume_refused(tiny, make_args, tmp_path, checkpoint, match, model=gpt2)


def test_other_sizes_list_the_shapes(tiny, make_args, tmp_path, checkpoint):
    from transformers import BertConfig, BertForSequenceClassification
    wider = BertForSequenceClassification(BertConfig(vocab_size=32, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=32, max_position_embeddings=SEQ))
    match = r"23 with different shapes: .*bert\.embeddings\.word_embeddings\.weight: checkpoint \(32, 16\), model \(32, 24\)"
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(checkpoint, wider)
    assert_resume_refused(tiny, make_args, tmp_path, checkpoint, match, model=wider)
    # more classes: only the classifier differs, and the message says so
    with pytest.raises(CheckpointError, match=r"\. 2 with different shapes: classifier\.bias: checkpoint \(2,\), model \(3,\), "
                                             r"classifier\.weight: checkpoint \(2, 16\), model \(3, 16\)\. Build"):
        load_checkpoint(checkpoint, tiny.bert(num_labels=3))


def test_missing_path(tiny, make_args, tmp_path):
    missing = tmp_path / "no-such-run" / "checkpoint-5"
    with pytest.raises(FileNotFoundError, match=rf"{missing} does not exist"):
        load_checkpoint(missing)
    assert_resume_refused(tiny, make_args, tmp_path, missing, rf"{missing} does not exist", exc=FileNotFoundError)


def test_folder_without_checkpoints(tiny, make_args, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"no complete checkpoint in {empty}: it holds no checkpoint-N folder"):
        load_checkpoint(empty)
    # resume_from_checkpoint=True looks in output_dir
    trainer = Trainer(tiny.bert(), make_args(output_dir=str(empty), max_steps=2), train_dataset=tiny.dataset(16))
    with pytest.raises(FileNotFoundError, match=rf"no complete checkpoint in {empty}"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 0
    # only unfinished ones: named, and still refused
    (empty / "checkpoint-3").mkdir()
    with pytest.raises(FileNotFoundError, match=r"only unfinished ones \(checkpoint-3\)"):
        load_checkpoint(empty)
    with pytest.raises(CheckpointError, match=r"checkpoint-3 is an incomplete checkpoint"):
        load_checkpoint(empty / "checkpoint-3")


def test_incomplete_checkpoint_is_never_picked(trained, tmp_path):
    _, out = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-6")
    (run / "checkpoint-6" / "COMPLETE").unlink()  # as a crash before the marker would leave it
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2", "checkpoint-4"]
    model = load_checkpoint(run)  # the output folder: the latest complete checkpoint
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), load_checkpoint(run / "checkpoint-4").state_dict().values()))


# ---- no pickle ----------------------------------------------------------------------------------
class Payload:
    "Unpickling this runs code: it creates the file `path`."
    def __init__(self, path): self.path = str(path)
    def __reduce__(self): return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


def pickles(marker: Path) -> dict:
    "The same payload as plain pickle and in torch.save's zip format."
    import io
    buf = io.BytesIO()
    torch.save({"state": Payload(marker)}, buf)
    plain = pickle.dumps({"state": Payload(marker)})
    pickle.loads(plain)  # guards the test: the payload is live
    assert marker.read_text() == "pwned"
    marker.unlink()
    return {"pickle": plain, "torch.save": buf.getvalue()}


@pytest.mark.parametrize("fmt", ["pickle", "torch.save"])
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "rng_state.safetensors", "optimizer.json",
                                  "trainer_state.json"])
def test_planted_pickle_is_refused(tiny, make_args, tmp_path, checkpoint, name, fmt):
    marker = tmp_path / "side-effect"
    (checkpoint / name).write_bytes(pickles(marker)[fmt])
    trainer = resuming_trainer(tiny, make_args, tmp_path)
    with pytest.raises(Exception):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert not marker.exists(), "the pickle ran"
    assert_resume_refused(tiny, make_args, tmp_path, checkpoint, rf"{checkpoint / name}")
    if name == "model.safetensors":
        with pytest.raises(CheckpointError, match=rf"{checkpoint / name}.*a pickle is never loaded"):
            load_checkpoint(checkpoint)
        with pytest.raises(CheckpointError): load_checkpoint(checkpoint, tiny.bert())
    assert not marker.exists(), "the pickle ran"


def test_pickled_weights_instead_of_safetensors_are_refused(tiny, tmp_path, checkpoint):
    # a checkpoint "repaired" by someone with a pickled pytorch_model.bin: from_pretrained would read it; we never do
    marker = tmp_path / "side-effect"
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "pytorch_model.bin").write_bytes(pickles(marker)["torch.save"])
    for load in (lambda: load_checkpoint(checkpoint), lambda: load_checkpoint(checkpoint, tiny.bert()),
                 lambda: load_weights(tiny.bert(), checkpoint)):
        with pytest.raises(CheckpointError, match=r"holds no model\*\.safetensors file.*never a pickle"):
            load()
    assert not marker.exists(), "the pickle ran"


def test_pickles_beside_a_good_checkpoint_are_never_read(tiny, make_args, tmp_path, checkpoint, trained):
    # transformers.Trainer's pickled files, planted beside ours: resuming works and reads none of them. The model
    # starts from other weights (seed 1), so ending on the trained run's weights proves our files ARE read
    from conftest import FirstStep
    marker = tmp_path / "side-effect"
    payload = pickles(marker)["torch.save"]
    for name in ["training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt", "pytorch_model.bin"]:
        (checkpoint / name).write_bytes(payload)
    trainer = resuming_trainer(tiny, make_args, tmp_path, model=tiny.bert(dropout=0.1, seed=1))
    first = FirstStep()
    trainer.add_callback(first)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert first.first == 3 and trainer.state.global_step == 4  # continued after step 2, the checkpoint's
    assert tiny.same_weights(trainer.model, tiny.snapshot(trained[0].model))  # and exactly
    load_checkpoint(checkpoint)
    assert not marker.exists(), "a pickle ran"


# ---- transformers can load it -------------------------------------------------------------------
def test_from_pretrained_gives_the_same_logits(trained):
    from transformers import AutoModelForSequenceClassification
    trainer, out = trained
    batch = {"input_ids": torch.randint(1, 32, (4, SEQ), generator=torch.Generator().manual_seed(0)),
             "attention_mask": torch.ones(4, SEQ, dtype=torch.long)}
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(**batch).logits
        hf = AutoModelForSequenceClassification.from_pretrained(out / "checkpoint-4").eval()
        ours = load_checkpoint(out).eval()  # the output folder: its latest checkpoint, built from config.json
        assert type(hf).__name__ == type(ours).__name__ == "BertForSequenceClassification"
        assert torch.equal(hf(**batch).logits, want)
        assert torch.equal(ours(**batch).logits, want)
        # an earlier checkpoint is a different model
        assert not torch.equal(load_checkpoint(out / "checkpoint-2").eval()(**batch).logits, want)


# ---- rotation -----------------------------------------------------------------------------------
class Kept(TrainerCallback):
    "The checkpoints on disk after each save."
    def __init__(self): self.after = {}
    def on_save(self, args, state, control, **kwargs):
        self.after[state.global_step] = [int(p.name.split("-")[1]) for p in list_checkpoints(args.output_dir)]


@pytest.mark.parametrize("scores, best, kept", [
    ({2: 0.5, 4: 0.9, 6: 0.6, 8: 0.4, 10: 0.3}, 4, {2: [2], 4: [2, 4], 6: [4, 6], 8: [4, 8], 10: [4, 10]}),
    ({2: 0.1, 4: 0.2, 6: 0.3, 8: 0.4, 10: 0.5}, 10, {2: [2], 4: [2, 4], 6: [4, 6], 8: [6, 8], 10: [8, 10]}),
], ids=["best-in-the-middle", "best-is-newest"])
def test_save_total_limit_keeps_best_and_newest(tiny, make_args, tmp_path, scores, best, kept):
    holder = {}
    score = lambda p: {"score": scores.get(holder["t"].state.global_step, 0.0)}  # the preflight evaluates at step 0
    kept_cb = Kept()
    trainer = holder["t"] = Trainer(
        tiny.bert(dropout=0.0), make_args(max_steps=10, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2,
                                          save_total_limit=2, load_best_model_at_end=True, metric_for_best_model="score",
                                          learning_rate=1e-2, logging_steps=2),
        train_dataset=tiny.dataset(32), eval_dataset=tiny.dataset(8, seed=1), compute_metrics=score, callbacks=[kept_cb])
    trainer.train()
    out = Path(trainer.args.output_dir)
    assert sorted(p.name for p in out.iterdir() if p.name != "log.jsonl") == sorted({f"checkpoint-{best}", "checkpoint-10"} | {f"checkpoint-{s}" for s in kept[10]})
    assert kept_cb.after == kept
    assert Path(trainer.state.best_model_checkpoint).name == f"checkpoint-{best}"
    assert trainer.state.best_metric == scores[best]
    # load_best_model_at_end: the trainer's model is now the best checkpoint's
    best_model = load_checkpoint(out / f"checkpoint-{best}")
    assert all(torch.equal(a, b) for a, b in zip(trainer.model.state_dict().values(), best_model.state_dict().values()))
