"""The README's main command: `python -m nbtrain.quickstart` trains, evaluates and writes what it says it wrote."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path


def test_quickstart_runs_headless_and_writes_its_files(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nbtrain.quickstart"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # console progress: one line per log step, and a final summary
    assert re.search(r"^step \d+/\d+ epoch [\d.]+ \| loss=", out, re.M), out
    assert re.search(r"^done: \d+ steps", out, re.M), out
    accuracy = float(re.search(r"eval accuracy: ([\d.]+)", out).group(1))
    assert accuracy >= 0.8, out
    checkpoint = tmp_path / re.search(r"checkpoint:\s+(\S+)", out).group(1)
    figure = tmp_path / re.search(r"figure:\s+(\S+)", out).group(1)
    assert (checkpoint / "COMPLETE").is_file() and (checkpoint / "model.safetensors").is_file()
    assert json.loads((checkpoint / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
