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
