"""PEFT models (LoRA, QLoRA) trained by nbtrain: checkpoints hold the adapter only, reload exactly, resume to the bit,
and never reach the network; and the readouts (tokens, tokens/s, peak memory, trainable parameters) in the logs.

Everything runs on a tiny Llama built from a config (nothing is downloaded). Its base is large against the adapter
(LoRA rank 2 on q_proj and v_proj: about 0.6 % of the base's bytes), so "the checkpoint holds the adapter only" is a
claim about sizes that a saved base would break.
"""
import socket
import subprocess
import sys

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'nbtrain[peft]')")

from conftest import ROOT, FirstStep  # noqa: E402
from nbtrain import Trainer, TrainerCallback  # noqa: E402
from nbtrain.checkpoint import CheckpointError, load_checkpoint, save_weights  # noqa: E402

torch.set_num_threads(1)

VOCAB, LEN, ROWS = 256, 12, 32
TARGETS = ["q_proj", "v_proj"]


def llama(seed: int = 0):
    "The tiny base model, the same weights for a seed."
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def lora(**kw):
    return peft.LoraConfig(**{"r": 2, "lora_alpha": 8, "target_modules": TARGETS, "lora_dropout": 0.2, **kw})


def peft_model(seed: int):
    "The base (seed 0) with an adapter drawn under `seed`; B starts random too, so two seeds start from other outputs."
    base = llama(0)
    torch.manual_seed(seed)
    return peft.get_peft_model(base, lora(init_lora_weights=False))


def rows(n: int = ROWS, seed: int = 0) -> list[dict]:
    "Causal-LM rows of 6 to 12 real tokens, right-padded to LEN (padding masked and not labelled)."
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids, k = torch.randint(1, VOCAB, (LEN,), generator=g).tolist(), 6 + i % 7
        out.append({"input_ids": ids, "attention_mask": [1] * k + [0] * (LEN - k), "labels": ids[:k] + [-100] * (LEN - k)})
    return out


def adapter(model) -> dict:
    "The trainable tensors, by name, detached copies."
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def logits(model, x):
    model.eval()
    with torch.no_grad(): return model(input_ids=x).logits


class StopAt(TrainerCallback):
    def __init__(self, k): self.k = k
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.k: control.should_training_stop = True


@pytest.fixture
def args(make_args):
    def make(**kw):
        return make_args(**{"per_device_train_batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1, **kw})
    return make


def test_checkpoint_is_the_adapter_and_reloads_exactly(args, tmp_path, quiet_transformers):
    "checkpoint-N holds the adapter (and its optimizer state) only; PeftModel.from_pretrained gives the trained logits exactly."
    from safetensors.torch import load_file
    a = args(max_steps=8, save_strategy="steps", save_steps=8)
    trainer = Trainer(llama(), a, train_dataset=rows(), peft_config=lora())
    trainer.train()
    ckpt = tmp_path / "out" / "checkpoint-8"
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= names and not any(n.startswith("model") for n in names), names
    saved = load_file(ckpt / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved), list(saved)
    base_bytes = sum(t.numel() * t.element_size() for t in llama().state_dict().values())
    ckpt_bytes = sum(t.numel() * t.element_size() for f in ckpt.glob("*.safetensors") if f.name != "rng_state.safetensors"
                     for t in load_file(f).values())
    assert ckpt_bytes < 0.05 * base_bytes, (ckpt_bytes, base_bytes)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    moments = load_file(ckpt / "optimizer.safetensors")
    assert sum(t.numel() for k, t in moments.items() if k.endswith(".exp_avg")) == trainable  # the adapter's state only

    x = torch.randint(1, VOCAB, (2, LEN))
    reloaded = peft.PeftModel.from_pretrained(llama(), str(ckpt))
    assert torch.equal(logits(reloaded, x), logits(trainer.model, x))
    assert not torch.equal(logits(llama(), x), logits(trainer.model, x))  # the adapter trained: the check can fail

    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file() and not (tmp_path / "adapter" / "model.safetensors").exists()
    trainer.save_model(str(tmp_path / "merged"), merged=True)
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not isinstance(merged, peft.PeftModel)
    torch.testing.assert_close(logits(merged, x), logits(trainer.model, x), rtol=1e-5, atol=1e-5)
    assert isinstance(trainer.model, peft.PeftModel)  # merging worked on a copy: the trainer's model keeps its adapter


def test_readouts_in_log_history(args, quiet_transformers):
    "Every training row has num_tokens (real tokens, padding left out), tokens_per_second, peak_memory_mb; the first the parameters."
    data = rows()
    trainer = Trainer(llama(), args(max_steps=8, logging_steps=2), train_dataset=data, peft_config=lora())
    trainer.train()
    train_rows = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_rows) == 4
    tokens = [h["num_tokens"] for h in train_rows]
    assert tokens == sorted(tokens) and tokens[-1] == sum(sum(r["attention_mask"]) for r in data)  # one epoch: every row once
    assert tokens[-1] < ROWS * LEN  # padding is not counted
    assert all(h["tokens_per_second"] > 0 and h["peak_memory_mb"] > 0 for h in train_rows)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    first = train_rows[0]
    assert (first["trainable_params"], first["total_params"]) == (trainable, total)
    assert first["trainable_percent"] == pytest.approx(100 * trainable / total, abs=1e-4)
    assert not any("trainable_params" in h for h in trainer.state.log_history[1:])  # once per run
    assert (trainer.state.trainable_params, trainer.state.total_params) == (trainable, total)


@pytest.fixture(scope="module")
def straight_and_stopped(tmp_path_factory):
    "A run of 6 steps straight, and the same run stopped at step 3 (its checkpoint kept): adapter, optimizer, logs."
    from nbtrain import TrainingArguments
    out = {}
    for name, cbs in (("straight", []), ("stopped", [StopAt(3)])):
        a = TrainingArguments(output_dir=str(tmp_path_factory.mktemp(name)), max_steps=6, save_steps=3, per_device_train_batch_size=4,
                              learning_rate=5e-3, logging_steps=1, report_to="none", disable_tqdm=True)
        t = Trainer(peft_model(0), a, train_dataset=rows(), callbacks=cbs)
        t.train()
        out[name] = t
    return out


def test_resume_is_bit_exact(straight_and_stopped, quiet_transformers):
    "A run stopped at step 3 and resumed by a new Trainer ends with the straight run's adapter and optimizer, bit for bit (dropout on)."
    straight, stopped = straight_and_stopped["straight"], straight_and_stopped["stopped"]
    first = FirstStep()
    model = peft_model(1)  # another adapter to start from: a restart would not end where the straight run did
    resumed = Trainer(model, stopped.args, train_dataset=rows(), callbacks=[first])
    resumed.train(resume_from_checkpoint=True)
    assert first.first == 4
    want, got = adapter(straight.model), adapter(resumed.model)
    assert want.keys() == got.keys() and want
    for k in want: assert torch.equal(want[k], got[k]), k
    s, r = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert s.keys() == r.keys() and all(torch.equal(s[i]["exp_avg_sq"], r[i]["exp_avg_sq"]) for i in s)
    row = lambda t: [(h["step"], h["loss"], h["num_tokens"]) for h in t.state.log_history if "loss" in h]
    assert row(straight) == row(resumed)


def test_frozen_adapter_is_named_and_load_checkpoint_trains(straight_and_stopped, quiet_transformers):
    "PeftModel.from_pretrained loads frozen: the error says is_trainable=True; load_checkpoint(path, model=base) gives a trainable one."
    stopped = straight_and_stopped["stopped"]
    ckpt = stopped.last_checkpoint
    frozen = peft.PeftModel.from_pretrained(llama(), str(ckpt))
    with pytest.raises(ValueError, match="is_trainable=True"):
        Trainer(frozen, stopped.args, train_dataset=rows()).train(resume_from_checkpoint=str(ckpt))
    model = load_checkpoint(ckpt, model=llama())
    assert isinstance(model, peft.PeftModel) and any(p.requires_grad for p in model.parameters())
    before = adapter(model)
    t = Trainer(model, stopped.args, train_dataset=rows())
    t.train(resume_from_checkpoint=str(ckpt))
    assert t.state.global_step == 6 and any(not torch.equal(before[k], p) for k, p in adapter(t.model).items())
    with pytest.raises(ValueError, match="base model"): load_checkpoint(ckpt)


def test_other_trainable_tensors_on_resume_are_named(straight_and_stopped, quiet_transformers):
    "Resuming with other tensors trainable (torch: 'parameter group doesn't match', or silently wrong) names them; nothing is loaded."
    stopped = straight_and_stopped["stopped"]
    model = peft_model(1)
    for n, p in model.named_parameters():
        if "layers.1." in n and "lora_A" in n: p.requires_grad_(False)  # same adapter, fewer tensors trained
    before = adapter(model)
    with pytest.raises(CheckpointError, match=r"trained then, not now: .*layers\.1\.self_attn\.q_proj\.lora_A"):
        Trainer(model, stopped.args, train_dataset=rows()).train(resume_from_checkpoint=True)
    after = adapter(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # checked before anything was loaded
    other = peft.get_peft_model(llama(), lora(target_modules=["q_proj"]))
    with pytest.raises(CheckpointError, match="does not fit"):
        Trainer(other, stopped.args, train_dataset=rows()).train(resume_from_checkpoint=True)


def test_load_best_model_at_end_restores_the_best_adapter(args, tmp_path, quiet_transformers):
    "load_best_model_at_end puts the best checkpoint's adapter back (here the highest eval loss, not the last step's)."
    from safetensors.torch import load_file
    a = args(max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2, learning_rate=2e-2,
             load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    trainer = Trainer(llama(), a, train_dataset=rows(), eval_dataset=rows(8, seed=1), peft_config=lora())
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best and not best.endswith("checkpoint-6"), best
    saved = load_file(f"{best}/adapter_model.safetensors")
    last = load_file(tmp_path / "out" / "checkpoint-6" / "adapter_model.safetensors")
    own = peft.get_peft_model_state_dict(trainer.model)
    assert saved.keys() == own.keys() and all(torch.equal(saved[k], own[k]) for k in saved)
    assert any(not torch.equal(last[k], own[k]) for k in last)


def test_gradient_checkpointing_with_lora(args, quiet_transformers):
    "gradient_checkpointing=True trains the adapter as without it (reentrant too: the inputs require grads)."
    ends = {}
    for name, kw in (("off", {}), ("on", {"gradient_checkpointing": True}),
                     ("reentrant", {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}})):
        t = Trainer(llama(), args(max_steps=2, **kw), train_dataset=rows(), peft_config=lora())
        t.train()
        assert t.model.get_base_model().is_gradient_checkpointing == (name != "off")
        ends[name] = adapter(t.model)
    assert any(v.abs().sum() > 0 for k, v in ends["on"].items() if "lora_B" in k)  # B starts at zero: it moved
    for name in ("on", "reentrant"):
        for k in ends["off"]: torch.testing.assert_close(ends[name][k], ends["off"][k], rtol=1e-5, atol=1e-7)


def test_peft_config_seeds_the_adapter_and_refuses_what_it_cannot_save(args):
    "peft_config= draws the adapter under args.seed; a PeftModel with peft_config=, or transformers' add_adapter, is refused."
    a = lambda seed: adapter(Trainer(llama(), args(seed=seed), peft_config=lora()).model)
    one, same, other = a(3), a(3), a(4)
    assert all(torch.equal(one[k], same[k]) for k in one) and any(not torch.equal(one[k], other[k]) for k in one)
    with pytest.raises(ValueError, match="already a PeftModel"): Trainer(peft_model(0), args(), peft_config=lora())
    m = llama()
    m._hf_peft_config_loaded = True  # what transformers' model.add_adapter leaves on the model
    with pytest.raises(ValueError, match="get_peft_model"): Trainer(m, args())


def test_saves_never_reach_the_network(tmp_path, monkeypatch):
    "peft's own save (save_embedding_layers='auto') asks the Hub about the base; nbtrain's save of the same model does not."
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # as on a machine that is online, or thinks it is
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    model = peft_model(0)
    model.peft_config["default"].base_model_name_or_path = "someone/tiny-llama"  # as from_pretrained("someone/tiny-llama") sets it
    attempts = []
    def refuse(*a, **k):
        attempts.append(a[:1])
        raise OSError("the network is off in this test")
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(tmp_path / "peft"))
    assert attempts, "peft's default save did not try the network: this test could not tell"
    attempts.clear()
    save_weights(model, tmp_path / "nbtrain")
    assert attempts == [] and (tmp_path / "nbtrain" / "adapter_model.safetensors").is_file()


def test_qlora_on_4bit_base(tmp_path, args, quiet_transformers):
    "A 4-bit base (bitsandbytes, on the CPU here) trains a LoRA adapter; the checkpoint holds the adapter only."
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'nbtrain[qlora]')")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    llama().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    assert isinstance(base.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    t = Trainer(base, args(max_steps=3, save_strategy="steps", save_steps=3, learning_rate=2e-2), train_dataset=rows(), peft_config=lora())
    t.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in t.state.log_history if "loss" in h)
    assert any(v.abs().sum() > 0 for k, v in adapter(t.model).items() if "lora_B" in k)
    names = {p.name for p in (tmp_path / "out" / "checkpoint-3").iterdir()}
    assert "adapter_model.safetensors" in names and not any(n.startswith("model") for n in names)
    assert t.state.trainable_params < 0.05 * t.state.total_params  # 4-bit weights counted unpacked, as peft counts them

    # bitsandbytes repacks 4-bit layers for a CPU inference kernel without backward at their first eval-mode run
    # (on CPUs with AVX512-BF16): a model repacked before the Trainer got it is refused, not trained without gradients
    late = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    logits(late, torch.randint(1, VOCAB, (1, LEN)))
    if not getattr(late.model.layers[0].self_attn.q_proj.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack, the rest of the test passed")
    with pytest.raises(ValueError, match="repacked by bitsandbytes"):
        Trainer(late, args(max_steps=1), train_dataset=rows(), peft_config=lora())


def test_import_does_not_import_peft():
    "import nbtrain (and its trainer) leaves peft unimported: it is optional, and heavy."
    code = "import sys, nbtrain, nbtrain.trainer, nbtrain.checkpoint; assert 'peft' not in sys.modules, 'peft imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
