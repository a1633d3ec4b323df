"""SIGKILL while a checkpoint is being written: the half-written folder is never picked, the run resumes from
the previous complete checkpoint (its first step is the one after it, its model built from other initial weights)
and finishes as if nothing had happened."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from nbtrain.checkpoint import latest_checkpoint, list_checkpoints

TESTS = Path(__file__).parent

# a model with a 3.8M-parameter embedding, so that writing a checkpoint (weights, then twice as much optimizer
# state, fsync) takes long enough to be caught in the middle
SCRIPT = f"""
import hashlib, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {str(TESTS)!r})
from conftest import FirstStep, keyword_dataset
from transformers import BertConfig, BertForSequenceClassification
from nbtrain import Trainer, TrainingArguments

def train(out, resume, seed=0):
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(vocab_size=30000, hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=64, max_position_embeddings=8, hidden_dropout_prob=0.1))
    args = TrainingArguments(output_dir=out, max_steps=6, save_steps=2, per_device_train_batch_size=8, learning_rate=1e-3,
                             seed=1, logging_steps=1, report_to="none", disable_tqdm=True)
    first = FirstStep()
    trainer = Trainer(model, args, train_dataset=keyword_dataset(64, seed=0), callbacks=[first])
    trainer.train(resume_from_checkpoint=resume)
    print("FIRST STEP", first.first, flush=True)
    h = hashlib.sha256()
    for k, v in sorted(trainer.model.state_dict().items()): h.update(v.detach().numpy().tobytes())
    print("FINGERPRINT", trainer.state.global_step, h.hexdigest(), flush=True)

if sys.argv[2] == "fresh": train(sys.argv[1], None)
else:  # resume the crashed run from other initial weights (only the checkpoint gives step 2's back), then (same
    # process, to save an import) train the run that was never killed
    train(sys.argv[1], True, seed=1)
    train(sys.argv[3], None)
"""


HANG_GUARD_S = 300  # a hang guard for each child process, not a speed claim: a run takes a few seconds


def resume_and_straight(out: Path, straight: Path) -> tuple[list[str], list[str]]:
    "The fingerprints of the resumed run and the straight one, and the first step each took."
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out), "resume", str(straight)], capture_output=True, text=True,
                          timeout=HANG_GUARD_S, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return re.findall(r"FINGERPRINT \d+ \w+", proc.stdout), re.findall(r"FIRST STEP (\w+)", proc.stdout)


def test_sigkill_while_saving_resumes_from_previous_checkpoint(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(out), "fresh"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    killed_in, deadline = None, time.monotonic() + HANG_GUARD_S
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            # the save of step 4 has begun and its weights are on disk: the optimizer state is being written now
            tmp = [p for p in out.glob(".tmp-checkpoint-4-*") if (p / "model.safetensors").is_file()] if out.is_dir() else []
            if tmp:
                os.kill(proc.pid, signal.SIGKILL)
                killed_in = tmp[0]
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None and killed_in is None: proc.kill()
        _, err = proc.communicate(timeout=HANG_GUARD_S)
    assert killed_in is not None, f"never saw the save of step 4 in progress; the process ended with: {err.decode()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "checkpoint-4" / "COMPLETE").exists(), "killed too late: the save of step 4 had finished"

    # what the crash left: a complete checkpoint-2 and an unfinished temporary folder, which is never picked
    assert killed_in.is_dir() and not (killed_in / "COMPLETE").exists()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert latest_checkpoint(out).name == "checkpoint-2"

    (resumed, straight), firsts = resume_and_straight(out, tmp_path / "straight")
    assert firsts == ["3", "1"], f"first steps (resumed, straight) {firsts}: the resumed run starts at 3, after checkpoint-2"
    assert resumed.startswith("FINGERPRINT 6 ")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert not killed_in.exists(), "the dead process's temporary folder was not cleaned up"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    # and it ends where the run that was never killed ends
    assert resumed == straight
