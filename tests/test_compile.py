"""`torch_compile=True` on CPU: the model is really compiled, training matches eager, and checkpoints keep the plain names."""
import torch
from safetensors.torch import load_file

from conftest import keyword_dataset, tiny_bert


def train(tmp_path, name: str, compile_: bool):
    from nbtrain import Trainer, TrainingArguments
    args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=12, per_device_train_batch_size=8, learning_rate=1e-3,
                             logging_steps=4, save_steps=12, disable_tqdm=True, torch_compile=compile_, seed=0)
    trainer = Trainer(tiny_bert(dropout=0.0), args, train_dataset=keyword_dataset(96))
    trainer.train()
    return trainer


def test_torch_compile_trains_like_eager(tmp_path):
    torch.set_num_threads(1)
    eager, compiled = train(tmp_path, "eager", False), train(tmp_path, "compiled", True)
    assert not isinstance(eager.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(compiled.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)  # compiled, not silently eager
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (eager, compiled)]
    assert len(losses[0]) == 3
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)  # fused kernels round differently, barely
    for k, v in eager.model.state_dict().items():
        torch.testing.assert_close(compiled.model.state_dict()[k], v, rtol=1e-3, atol=1e-5)
    saved = load_file(tmp_path / "compiled" / "checkpoint-12" / "model.safetensors")
    assert set(saved) == set(load_file(tmp_path / "eager" / "checkpoint-12" / "model.safetensors"))  # no "_orig_mod." prefix
    metrics = compiled.evaluate(keyword_dataset(32, seed=1))  # evaluation runs through the compiled model too
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
