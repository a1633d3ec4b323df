"""`import nbtrain` stays light: transformers' own Trainer machinery is not imported."""
import json
import subprocess
import sys

HEAVY = ("transformers.trainer", "transformers.training_args")

CHECK = f"""
import json, sys
import nbtrain
from nbtrain import Trainer, TrainingArguments
print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""


def _loaded_after(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_nbtrain_leaves_transformers_trainer_out():
    assert _loaded_after(CHECK) == []


def test_the_check_sees_transformers_trainer_when_imported():
    # the same probe does see the modules once something imports them, so the test above can fail
    assert _loaded_after("import transformers.trainer\n" + CHECK) == sorted(HEAVY)


PLAIN_TORCH = """
import json, sys, torch
from nbtrain import Trainer, TrainingArguments

class Regress(torch.nn.Module):
    def __init__(self): super().__init__(); self.lin = torch.nn.Linear(2, 1)
    def forward(self, x, labels=None):
        out = self.lin(x).squeeze(-1)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}

data = [{"x": [float(i), 1.0], "labels": float(i)} for i in range(16)]
args = TrainingArguments(output_dir=None, max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2, disable_tqdm=True)
Trainer(Regress(), args, train_dataset=data).train()
print(json.dumps(["transformers"] if "transformers" in sys.modules else []))
"""


def test_training_a_plain_torch_model_does_not_import_transformers():
    # gradient accumulation asks whether the loss is a causal LM's: a model that is not a transformers one is not
    assert _loaded_after(PLAIN_TORCH) == []
