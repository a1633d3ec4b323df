"""The package people pip install: a wheel of nbtrain/ alone that trains in an environment without the notebook tooling.

`pip wheel --no-deps .` is built from a copy of the repository's source (so no stale build/ folder can leak into
it). The wheel holds nbtrain/ and its dist-info only; its metadata requires the runtime dependencies of settings.ini
(`requirements`) and the development tools (`dev_requirements`: nbdev, pytest, jupytext, ...) only under the `dev`
extra; its version is settings.ini's, and so is `nbtrain.__version__`.

Then a fresh virtual environment (no system site packages) gets the CPU build of torch (`pip install torch==2.13.0`,
a file pip finds on this machine's disk, as the README's set-up does; the test stops before pip would download a
CUDA build) and the wheel, whose dependencies come from the package index (or pip's cache). There, from a folder
outside the source tree, a short training run: a one-layer BERT built from a config on a generated
`datasets.Dataset`, `Trainer(...).train()` with an evaluation and a checkpoint, the checkpoint loaded back. The
import must come from the venv's site-packages, and none of the development tools may be importable there.

Without network for pip the test is skipped, except in CI (env CI set), where it fails.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from configparser import ConfigParser
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the README's set-up line installs this CPU build first
DEV_TOOLS = ("nbdev", "fastcore", "execnb", "ghapi", "pytest", "jupytext", "nbclient", "jupyterlab", "playwright")
NO_NETWORK = re.compile(r"NewConnectionError|Temporary failure in name resolution|Name or service not known|"
                        r"Network is unreachable|Failed to establish a new connection|ConnectTimeout|ReadTimeout|"
                        r"No matching distribution found|Could not find a version that satisfies")

# What runs in the venv: nothing from the source tree, nothing downloaded (the model and data are made here).
TRAIN = r'''
import importlib.util, json, math, os, sys, sysconfig
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification
import nbtrain
from nbtrain import Trainer, TrainingArguments, load_checkpoint

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
n, seq = 256, 8
ids = torch.randint(7, 32, (n, seq), generator=g)
labels = torch.randint(0, 2, (n,), generator=g)
ids[torch.arange(n), torch.randint(1, seq, (n,), generator=g)] = torch.where(labels == 1, 5, 6)  # the keyword decides
ids[:, 0] = 1
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seq] * n, "label": labels.tolist()})
torch.manual_seed(0)
model = BertForSequenceClassification(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=32, max_position_embeddings=seq, num_labels=2))
args = TrainingArguments(output_dir="out", max_steps=60, per_device_train_batch_size=16, learning_rate=3e-3,
                         logging_steps=10, eval_strategy="steps", eval_steps=60, save_strategy="steps", save_steps=60,
                         report_to="none", disable_tqdm=True, seed=0)
trainer = Trainer(model, args, train_dataset=ds.select(range(192)), eval_dataset=ds.select(range(192, n)))
out = trainer.train()
metrics = trainer.evaluate()
reloaded = load_checkpoint("out/checkpoint-60")  # built from the checkpoint's config.json, weights from safetensors
mine, theirs = model.state_dict(), reloaded.state_dict()
same = mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
print("RESULT " + json.dumps({
    "file": nbtrain.__file__, "version": nbtrain.__version__, "purelib": sysconfig.get_paths()["purelib"],
    "prefix": sys.prefix, "steps": out.global_step, "losses": losses, "eval_loss": metrics["eval_loss"],
    "reloaded_equal": same, "history_rows": len(trainer.history),
    "dev_tools": [m for m in sys.argv[1:] if importlib.util.find_spec(m) is not None]}))
'''


def _settings() -> dict:
    cfg = ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini", encoding="utf-8")
    return cfg["DEFAULT"]


def _names(spec: str) -> dict[str, Requirement]:
    import shlex
    return {Requirement(r).name.lower().replace("_", "-"): Requirement(r) for r in shlex.split(spec)}


def _pip(python: Path, *args, cwd: Path, timeout: int = 1200) -> subprocess.CompletedProcess:
    "Run pip; where it fails for want of network, skip (fail in CI)."
    r = subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", *args], cwd=cwd, capture_output=True,
                       text=True, timeout=timeout, env=_clean_env())
    if r.returncode != 0:
        log = r.stdout[-3000:] + r.stderr[-3000:]
        if NO_NETWORK.search(log) and not os.environ.get("CI"):
            pytest.skip(f"pip {' '.join(args[:2])} needs the package index, which is not reachable here:\n{log[-800:]}")
        pytest.fail(f"pip {' '.join(args)} failed:\n{log}")
    return r


def _clean_env() -> dict:
    "The environment without anything that points Python at the source tree or at this interpreter's packages."
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", PYTHONNOUSERSITE="1")
    return env


@pytest.fixture(scope="module")
def wheel(repo_copy) -> Path:
    src = repo_copy
    dist = src.parent / "dist"
    t0 = time.monotonic()
    _pip(Path(sys.executable), "wheel", "--no-deps", ".", "-w", str(dist), cwd=src)
    print(f"pip wheel: {time.monotonic() - t0:.1f} s")
    wheels = list(dist.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contents_and_metadata(wheel):
    settings = _settings()
    version = settings["version"]
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        dist_info = f"nbtrain-{version}.dist-info/"
        meta = z.read(dist_info + "METADATA").decode()
    assert wheel.name.startswith(f"nbtrain-{version}-"), wheel.name
    stray = [n for n in names if not (n.startswith("nbtrain/") or n.startswith(dist_info))]
    assert not stray, f"the wheel holds more than nbtrain/: {stray}"
    modules = {Path(n).name for n in names if n.startswith("nbtrain/")}
    assert {"__init__.py", "trainer.py", "args.py"} <= modules, modules
    assert not [n for n in names if n.endswith((".ipynb", ".pyc"))], names
    assert re.search(rf"^Version: {re.escape(version)}$", meta, re.M), meta[:400]
    assert re.search(r"^License: Apache", meta, re.M), "the license (Apache-2.0) is not in the metadata"
    assert re.search(rf"^Classifier: Development Status :: {settings['status']} - ", meta, re.M), \
        f"the development status is not settings.ini's status {settings['status']}"
    with zipfile.ZipFile(wheel) as z:
        init = z.read("nbtrain/__init__.py").decode()
    assert re.search(rf'^__version__ = "{re.escape(version)}"$', init, re.M), "nbtrain.__version__ is not settings.ini's version"

    runtime = _names(settings["requirements"])
    # each `<extra>_requirements` of settings.ini is the extra nbtrain[<extra>] (dev, and the optional peft and qlora)
    declared = {k.removesuffix("_requirements"): set(_names(v)) for k, v in settings.items()
                if k.endswith("_requirements") and k != "requirements"}
    assert "dev" in declared, declared
    unconditional, extras = {}, {}
    for line in re.findall(r"^Requires-Dist: (.+)$", meta, re.M):
        req = Requirement(line)
        name = req.name.lower().replace("_", "-")
        if req.marker is None:
            unconditional[name] = req
        else:
            which = [e for e in declared if req.marker.evaluate({"extra": e})]
            assert which and not req.marker.evaluate({"extra": ""}), f"{line}: only settings.ini's extras may add requirements"
            for e in which: extras.setdefault(e, set()).add(name)
    assert {n: str(r.specifier) for n, r in unconditional.items()} == {n: str(r.specifier) for n, r in runtime.items()}, \
        "the wheel's requirements are not settings.ini's `requirements`"
    assert extras == declared, "the wheel's extras are not settings.ini's `<extra>_requirements`"
    tooling = [t for t in DEV_TOOLS if t in unconditional]
    assert not tooling, f"notebook/test tooling required at run time: {tooling}"


def test_wheel_trains_in_a_fresh_venv(wheel, tmp_path):
    t0 = time.monotonic()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=_clean_env())
    try:
        _train_in(venv, wheel, tmp_path, t0)
    finally:  # 1-2 GB: not left behind in the temporary folder
        shutil.rmtree(venv, ignore_errors=True)


def _train_in(venv: Path, wheel: Path, tmp_path: Path, t0: float):
    python = venv / "bin" / "python"
    work = tmp_path / "run"  # outside the source tree: `import nbtrain` can only find the installed wheel
    work.mkdir()
    assert not work.resolve().is_relative_to(ROOT)

    # the CPU build of torch, from a file pip finds (never a multi-gigabyte CUDA build from the index)
    report = tmp_path / "torch.json"
    _pip(python, "install", "--dry-run", "--quiet", "--report", str(report), TORCH, cwd=work)
    torch_pick = next(i for i in json.loads(report.read_text())["install"] if i["metadata"]["name"] == "torch")
    if "+cpu" not in torch_pick["metadata"]["version"]:
        msg = f"pip would install torch {torch_pick['metadata']['version']} from {torch_pick['download_info']['url']}, " \
              "not the CPU build: put the CPU wheel where pip finds it (find-links) first"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    _pip(python, "install", "--quiet", "--no-compile", TORCH, cwd=work)  # no .pyc: a one-off environment
    t_torch = time.monotonic()
    _pip(python, "install", "--quiet", "--no-compile", str(wheel), cwd=work)
    t_install = time.monotonic()

    script = work / "train_tiny.py"
    script.write_text(TRAIN)
    r = subprocess.run([str(python), str(script), *DEV_TOOLS], cwd=work, capture_output=True, text=True, timeout=600,
                       env=_clean_env())
    assert r.returncode == 0, f"training in the venv failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    res = json.loads(next(l for l in r.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    t_train = time.monotonic()

    assert Path(res["prefix"]).resolve() == venv.resolve(), res["prefix"]
    assert Path(res["file"]).resolve().is_relative_to(Path(res["purelib"]).resolve()), \
        f"nbtrain was imported from {res['file']}, not from the venv's site-packages {res['purelib']}"
    assert not Path(res["file"]).resolve().is_relative_to(ROOT)
    assert res["version"] == _settings()["version"]
    assert not res["dev_tools"], f"development tools are installed with the wheel: {res['dev_tools']}"
    assert res["steps"] == 60 and len(res["losses"]) == 6, res
    assert all(map(lambda x: x == x and abs(x) < float("inf"), res["losses"] + [res["eval_loss"]])), res
    assert res["losses"][-1] < res["losses"][0], f"the loss did not fall: {res['losses']}"
    assert res["reloaded_equal"], "the checkpoint did not load back the trained weights"
    assert res["history_rows"] > 0
    print(f"venv + torch {t_torch - t0:.0f} s, wheel and its dependencies {t_install - t_torch:.0f} s, "
          f"training {t_train - t_install:.0f} s; total {t_train - t0:.0f} s")
