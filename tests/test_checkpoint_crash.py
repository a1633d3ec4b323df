"""SIGKILL while checkpoints are being written, at ten different moments of ten different saves: after each kill,
`resume_from_checkpoint=True` picks the newest complete checkpoint (the next process starts at the step after it, from
other initial weights), the unfinished folders are cleaned up, and the run that was killed ten times ends bit-identical
to a run that never was."""
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from nbtrain.checkpoint import MARKER, is_complete, latest_checkpoint, list_checkpoints, optimizer_from_files, read_weights

TESTS = Path(__file__).parent
MAX_STEPS = 30
KILLS = 10

# A model with a 1.3M-parameter embedding, saved at every step: a checkpoint (weights, then twice as much optimizer
# state, then fsync, the marker and the rename) takes a good part of each step, and a kill lands inside one.
SCRIPT = f"""
import hashlib, sys
import torch
from torch import nn
torch.set_num_threads(1)
sys.path.insert(0, {str(TESTS)!r})
from conftest import FirstStep
from nbtrain import Trainer, TrainingArguments

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.drop, self.head = nn.Embedding(10000, 128), nn.Dropout(0.1), nn.Linear(128, 2)
    def forward(self, input_ids, labels=None):
        logits = self.head(self.drop(self.emb(input_ids).mean(1)))
        return {{"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}}

def data(n):
    ids = torch.randint(0, 10000, (n, 8), generator=torch.Generator().manual_seed(0))
    return [{{"input_ids": r.tolist(), "labels": int(r[0] % 2)}} for r in ids]

def train(out, resume, seed):
    torch.manual_seed(seed)
    args = TrainingArguments(output_dir=out, max_steps={MAX_STEPS}, save_steps=1, per_device_train_batch_size=8,
                             learning_rate=1e-3, seed=1, logging_steps=1, report_to="none", disable_tqdm=True)
    first = FirstStep()
    trainer = Trainer(Net(), args, train_dataset=data(48), callbacks=[first])
    trainer.train(resume_from_checkpoint=resume)
    print("FIRST STEP", first.first, flush=True)
    h = hashlib.sha256()
    for k, v in sorted(trainer.model.state_dict().items()): h.update(v.detach().numpy().tobytes())
    for i, st in sorted(trainer.optimizer.state_dict()["state"].items()):
        for k, v in sorted(st.items()): h.update(v.numpy().tobytes())
    print("FINGERPRINT", trainer.state.global_step, h.hexdigest(), flush=True)

# a resumed process builds its model from other initial weights: only the checkpoint gives the run's back
if sys.argv[2] == "fresh": train(sys.argv[1], None, seed=0)
else:
    train(sys.argv[1], True, seed=1)
    if len(sys.argv) > 3: train(sys.argv[3], None, seed=0)  # the run never killed, in the same process to save an import
"""

HANG_GUARD_S = 300  # a hang guard for each child process, not a speed claim: a run takes a few seconds
SAVE_S = 0.15  # about the time one save takes here; kills land up to this long after a save begins (or just after it)


def child(*argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def step_of(p: Path | None) -> int:
    return int(re.search(r"checkpoint-(\d+)", p.name).group(1)) if p is not None else 0


def started_since(out: Path, pid: int, begun: list[str]) -> list[str]:
    "The temporary folders of saves `pid` has begun that are not in `begun`."
    return [p.name for p in sorted(out.glob(f".tmp-checkpoint-*-{pid}"), key=step_of) if p.name not in begun]


def kill_during_a_save(out: Path, rng: random.Random) -> tuple[str, str]:
    "Start the run (resumed when there is a checkpoint), SIGKILL it `delay` after its 1st or 2nd save began; what it was doing."
    before = latest_checkpoint(out)
    proc = child(out, "resume" if before is not None else "fresh")
    nth, delay = rng.choice([1, 2]), rng.uniform(0, SAVE_S)
    begun, moment, deadline = [], None, time.monotonic() + HANG_GUARD_S
    try:
        while time.monotonic() < deadline and proc.poll() is None and moment is None:
            if out.is_dir(): begun += started_since(out, proc.pid, begun)
            if len(begun) >= nth:
                # wait out the delay, but no further than the start of the next save: a process killed by then has
                # finished at most `nth` saves, so ten kills cannot reach the run's last step however fast saves are
                until = time.monotonic() + delay
                while time.monotonic() < until and not started_since(out, proc.pid, begun): time.sleep(0.001)
                begun += started_since(out, proc.pid, begun)
                tmp = out / begun[-1]
                files = sorted(f.name for f in tmp.iterdir()) if tmp.is_dir() else None
                os.kill(proc.pid, signal.SIGKILL)
                final = out / begun[-1].split("-", 1)[1].rsplit("-", 1)[0]
                moment = (f"{final.name} renamed into place" if files is None and is_complete(final) else
                          f"{final.name} with {', '.join(files) if files else 'nothing'} written")
            else: time.sleep(0.001)
    finally:
        if proc.poll() is None and moment is None: proc.kill()
        _, err = proc.communicate(timeout=HANG_GUARD_S)
    assert moment is not None, f"never saw a save in progress; the process ended with: {err[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    return moment, str(before)


def test_sigkill_at_ten_moments_of_checkpoint_writes(tmp_path):
    out, rng = tmp_path / "out", random.Random(7)
    moments = []
    for _ in range(KILLS):
        moment, _ = kill_during_a_save(out, rng)
        moments.append(moment)
        # what resume_from_checkpoint=True picks now: complete, and every file of it reads back
        latest = latest_checkpoint(out)
        assert latest is not None and (latest / MARKER).is_file(), moments
        read_weights(latest); optimizer_from_files(latest)
        assert all(is_complete(p) for p in out.iterdir() if re.fullmatch(r"checkpoint-\d+", p.name))  # unfinished: only .tmp-*
    # ten different moments: inside the writing of different files, and of different checkpoints
    assert len(set(moments)) >= 5, moments

    # the last kill's leftovers are there; the next run picks the newest complete checkpoint and cleans them up
    start = step_of(latest_checkpoint(out))
    assert start < MAX_STEPS
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out), "resume", str(tmp_path / "straight")], capture_output=True,
                          text=True, timeout=HANG_GUARD_S, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    firsts = re.findall(r"FIRST STEP (\w+)", proc.stdout)
    assert firsts == [str(start + 1), "1"], f"first steps (resumed, straight) {firsts}; the newest complete checkpoint was {start}"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "a dead process's temporary folder is left"
    assert [step_of(p) for p in list_checkpoints(out)] == list(range(1, MAX_STEPS + 1))
    resumed, straight = re.findall(r"FINGERPRINT \d+ \w+", proc.stdout)
    assert resumed.startswith(f"FINGERPRINT {MAX_STEPS} ") and resumed == straight, "the killed run ended elsewhere"
