"""The notebook dashboard in real Jupyter kernels (no mocks): what a saved notebook holds, what the kernel sends
over iopub, what a kernel interrupt leaves behind, and what a script prints.

The model is `tiny_train.TinyNet` (an MLP on 8 features, about a millisecond a step on one thread), so a 2,000-step
run with evaluation takes a few seconds and the display's own cost and traffic show. Run with `pytest -s` to see
the byte figures.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupyter_client = pytest.importorskip("jupyter_client")
pytest.importorskip("ipywidgets")
pytest.importorskip("torchmetrics")

from jupyter_client.session import json_packer

from nbtrain.dashboard import format_value

from kernel_session import execute, running_kernel

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONPATH": os.pathsep.join(
           [str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
SETUP = f"import sys; sys.path.insert(0, {str(TESTS)!r})\nimport json, time, torch\nfrom tiny_train import make_trainer\n" \
        "from nbtrain import TrainerCallback"
DASHBOARD_MSGS = ("comm_open", "comm_msg", "comm_close", "display_data", "update_display_data")


# ---------------------------------------------------------------------------------------------- helpers
def msg_bytes(msg: dict) -> int:
    "Size of a message as sent: its serialized content plus its binary buffers (headers left out)."
    return len(json_packer(msg["content"])) + sum(memoryview(b).nbytes for b in msg.get("buffers") or [])


def run_cell(kc, code: str, timeout: float = 120, on_msg=None) -> list[dict]:
    return execute(kc, code, timeout, on_msg)


def stdout_of(msgs) -> str:
    return "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")


def error_of(msgs) -> dict | None:
    errs = [m["content"] for m in msgs if m["msg_type"] == "error"]
    return errs[-1] if errs else None


def ok(msgs) -> str:
    "The cell's stdout, after checking that it raised nothing."
    err = error_of(msgs)
    assert err is None, f"{err['ename']}: {err['evalue']}\n" + "\n".join(err["traceback"])[-3000:]
    return stdout_of(msgs)


def table(snapshot_html: str) -> tuple[list[str], list[list[str]]]:
    "The header and body rows of the snapshot's metrics table, as displayed text."
    m = re.search(r"<table.*?</table>", snapshot_html, re.S)
    assert m, f"no metrics table in the snapshot HTML: {snapshot_html[:2000]}"
    rows = [[html.unescape(c) for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", r, re.S)]
            for r in re.findall(r"<tr>(.*?)</tr>", m.group(0), re.S)]
    return rows[0], rows[1:]


def expected_rows(log_history: list[dict]) -> list[dict]:
    """What the table must show, from `log_history` alone: per evaluation its step, epoch, the latest train loss
    logged at or before it, and each eval value except timings — formatted by `format_value`."""
    rows, train_loss = [], None
    for h in log_history:
        if "loss" in h: train_loss = h["loss"]
        if "eval_loss" in h:
            row = {"step": h["step"], "epoch": h["epoch"], "train_loss": train_loss,
                   **{k: v for k, v in h.items() if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second"))}}
            rows.append({k: format_value(v) for k, v in row.items()})
    return rows


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    "One python3 kernel (ipykernel, ipywidgets available) shared by the tests that drive it with jupyter_client."
    cwd = tmp_path_factory.mktemp("kernel")
    with running_kernel(cwd, ENV) as (km, kc):
        ok(run_cell(kc, SETUP))
        yield km, kc, cwd


# ---------------------------------------------------------------------------------------------- a. saved notebook
LIVE_ROWS = 8  # the rows NotebookDashboard's live table keeps (table_rows=8); the final snapshot keeps them all


def test_saved_notebook_holds_widget_state_and_static_snapshot(tmp_path):
    # 12 evaluations: more than the live table's last LIVE_ROWS, so a snapshot that kept only those would show
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(SETUP),
        nbformat.v4.new_code_cell("trainer = make_trainer(max_steps=300, eval_steps=25, logging_steps=25)\n"
                                  "out = trainer.train()"),
        nbformat.v4.new_code_cell("print(json.dumps(trainer.state.log_history))"),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3", store_widget_state=True,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=ENV)  # the kernel's environment: offline, one thread, no GUI backend
    saved = tmp_path / "trained.ipynb"
    nbformat.write(nb, saved)
    nb = nbformat.read(saved, as_version=4)  # what a person reopening the notebook gets

    # the widget state holds the progress bars (ipywidgets 8 model names)
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    models = {s["model_name"] for s in state.values()}
    assert {"IntProgressModel", "FloatProgressModel"} <= models, sorted(models)

    # the training cell's final outputs: the static snapshot, no widget view left to render
    outputs = nb.cells[1].outputs
    displays = [o for o in outputs if o.output_type in ("display_data", "execute_result")]
    assert displays, outputs
    assert not any("application/vnd.jupyter.widget-view+json" in o.data for o in displays), \
        "a widget view is left in the saved outputs instead of the snapshot"
    # two outputs: the snapshot's HTML (bars, table) and the figure as a PNG of its own, which a front end that
    # sanitises an untrusted notebook's HTML still shows; the figure is stored once (no SVG, no second copy)
    assert len(displays) == 2, [sorted(o.data) for o in displays]
    snap, figure = displays[0].data, displays[1].data
    assert sorted(figure) == ["image/png", "text/plain"], sorted(figure)
    assert base64.b64decode(figure["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "text/html" in snap and not any("svg" in k for k in snap), sorted(snap)
    assert "<svg" not in snap["text/html"] and "<img" not in snap["text/html"], "the figure is stored twice"
    assert "finished: 300 steps" in snap["text/html"] and "finished: 300 steps" in snap["text/plain"]
    print(f"\nthe training cell's outputs in the saved notebook: {len(json.dumps(outputs)):,} B "
          f"(snapshot HTML {len(snap['text/html']):,} B, figure PNG {len(figure['image/png']):,} B base64)")

    # the metrics table's values are those of log_history, as format_value writes them
    history = json.loads("".join(o.text for o in nb.cells[2].outputs if o.output_type == "stream"))
    want = expected_rows(history)
    assert len(want) == 12 > LIVE_ROWS and want[-1]["step"] == "300" and "eval_accuracy" in want[-1], want
    header, body = table(snap["text/html"])
    assert len(body) == len(want), f"the snapshot's table has {len(body)} rows for {len(want)} evaluations: {body}"
    assert "earlier rows" not in snap["text/html"], "the snapshot hides rows, as the live table does"
    shown = [dict(zip(header, r)) for r in body]
    for got, exp in zip(shown, want):
        assert {k: got.get(k) for k in exp} == exp, f"table row {got} differs from log_history {exp}"


# ---------------------------------------------------------------------------------------------- b. iopub bytes
def dashboard_traffic(kc, eval_steps: int) -> tuple[int, dict, list[dict]]:
    "A 2,000-step run with an evaluation every `eval_steps`: the bytes of the dashboard's messages, by type, and all messages."
    msgs = run_cell(kc, f"trainer = make_trainer(max_steps=2000, eval_steps={eval_steps}, logging_steps=50)\n"
                        "out = trainer.train()", timeout=240)
    ok(msgs)
    per_type = {t: sum(msg_bytes(m) for m in msgs if m["msg_type"] == t) for t in DASHBOARD_MSGS}
    return sum(per_type.values()), per_type, msgs


@pytest.fixture(scope="module")
def traffic(kernel):
    "The two runs the byte tests compare: 20 evaluations (every 100 steps) and 4x as many (every 25 steps)."
    km, kc, _ = kernel
    return {20: dashboard_traffic(kc, 100), 80: dashboard_traffic(kc, 25)}


def test_iopub_bytes_bounded(traffic):
    (base, base_types, msgs), (many, many_types, msgs4) = traffic[20], traffic[80]
    report = (f"dashboard iopub bytes, 2000 steps: eval every 100 steps (20 evals) {base:,} B {base_types}; "
              f"every 25 steps (80 evals) {many:,} B {many_types}; ratio {many / base:.2f}x")
    print("\n" + report)
    # nothing dangling: every comm the run opened is closed, so the saved notebook holds only the snapshot
    for ms in (msgs, msgs4):
        opened = {m["content"]["comm_id"] for m in ms if m["msg_type"] == "comm_open"}
        closed = {m["content"]["comm_id"] for m in ms if m["msg_type"] == "comm_close"}
        assert opened and opened <= closed, f"{len(opened - closed)} comms left open"
        # two outputs, each updated in place: the dashboard (widgets, then the snapshot's HTML) and its saved view
        # (hidden while the widgets show, then the figure)
        assert [m["msg_type"] for m in ms].count("display_data") == 2
        # the bars moved during the run: step values sent live, before the snapshot replaced them
        steps = [m["content"]["data"]["state"]["value"] for m in state_updates(ms)
                 if isinstance(m["content"]["data"]["state"].get("value"), int)]
        assert steps and 0 < min(steps) and max(steps) <= 2000, steps
    assert base < 3_000_000, report
    assert many < 4 * base, report


def state_updates(msgs) -> list[dict]:
    "Widget state updates without binary buffers."
    return [m for m in msgs if m["msg_type"] == "comm_msg" and not m.get("buffers")
            and m["content"]["data"].get("method") == "update"]


def test_bytes_per_update_do_not_grow_with_the_run(traffic):
    """Issue 3: 'the bytes sent per update stay bounded as the run grows (send what changed, not the whole table)'.

    Live, the table shows its last 8 rows and the figure at most 50 points a line, whatever the length of the run:
    each update is checked for that (its size depends on when it was sent, so sizes are not compared), and the
    largest update stays under a fixed bound."""
    sizes = {}
    for n, (_, _, msgs) in traffic.items():
        ups = state_updates(msgs)
        for m in ups:
            value = str(m["content"]["data"]["state"].get("value", ""))
            if "<table" in value: assert value.count("<tr>") <= 1 + 8, f"the live table grew past its last rows ({n} evaluations)"
            for line in re.findall(r'<polyline points="([^"]*)"', value):
                assert len(line.split()) <= 50, f"a live figure line has {len(line.split())} points ({n} evaluations)"
        sizes[n] = max(msg_bytes(m) for m in ups)
    print(f"\nlargest widget update: {sizes[20]:,} B with 20 evaluations, {sizes[80]:,} B with 80")
    assert max(sizes.values()) < 20_000, f"an update is larger than the live table and figure's bound: {sizes}"
    # the run with 80 evaluations really had more rows than the live table keeps: the bound was exercised
    assert any("earlier rows" in str(m["content"]["data"]["state"].get("value", "")) for m in state_updates(traffic[80][2]))


# ---------------------------------------------------------------------------------------------- c. interrupt
# Interrupt is pressed once step INTERRUPT_AT has ended: mid-epoch (256 examples in batches of 8: 32 steps an epoch),
# the epoch's end (step 1024) 6 steps later and no evaluation or log step in between, so a stop that waited for the end
# of the epoch cannot pass for the step boundary right after the press. From that step on each step pauses
# INTERRUPT_PAUSE_S (before it, a step takes about a millisecond): the press lands in that step's pause, with a second
# to spare for a loaded machine, and a run that went on to the epoch's end would take only seconds more.
INTERRUPT_AT, STEPS_PER_EPOCH, INTERRUPT_PAUSE_S = 1018, 32, 1.0
assert (-INTERRUPT_AT) % STEPS_PER_EPOCH >= 4

INTERRUPT_CELLS = f"""
class Count(TrainerCallback):
    "Counts optimizer steps; from step `slow_from` on, says which step ended and pauses, so the test can press interrupt."
    def __init__(self, slow_from=None): self.optimizer_steps, self.slow_from = 0, slow_from
    def on_optimizer_step(self, args, state, control, **kwargs): self.optimizer_steps += 1
    def on_step_end(self, args, state, control, **kwargs):
        if self.slow_from is not None and state.global_step >= self.slow_from:
            print(f"STEP {{state.global_step}}", flush=True); time.sleep({INTERRUPT_PAUSE_S})

class Record(TrainerCallback):
    "Keeps the weights as they are at the end of step `step`."
    def __init__(self, step): self.step, self.weights = step, None
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step: self.weights = {{k: v.detach().clone() for k, v in model.state_dict().items()}}

ARGS = dict(max_steps=3000, eval_steps=100, logging_steps=50)
"""


def test_interrupt_stops_at_a_step_with_consistent_state(kernel):
    km, kc, cwd = kernel
    ok(run_cell(kc, INTERRUPT_CELLS))
    pressed = []

    def press(msg):
        if pressed or msg["msg_type"] != "stream": return
        steps = [int(s) for s in re.findall(r"STEP (\d+)", msg["content"]["text"])]
        if steps and steps[-1] >= INTERRUPT_AT:
            km.interrupt_kernel(); pressed.append(steps[-1])

    msgs = run_cell(kc, f"count = Count(slow_from={INTERRUPT_AT})\n"
                        "t = make_trainer(output_dir='interrupted', callbacks=[count], **ARGS)\n"
                        "t.train()", timeout=240, on_msg=press)
    assert pressed, f"the run ended before step {INTERRUPT_AT}: " + stdout_of(msgs)[-2000:]

    # the cell ends in a short error: TrainingInterrupted's one line, no stack
    err = error_of(msgs)
    assert err is not None and err["ename"] == "TrainingInterrupted", (err, stdout_of(msgs)[-2000:])
    m = re.search(r"Training interrupted at step (\d+) of 3000", err["evalue"])
    assert m, err["evalue"]
    stopped = int(m.group(1))
    # The stop is at the step boundary right after the press: the end of the step the test saw (pressed[0]) when the
    # signal lands in that step's pause, as it does unless the kernel's output reaches the test more than a pause
    # (INTERRUPT_PAUSE_S) late; one step more is allowed for such a loaded machine. Not the end of the epoch (1024).
    assert pressed[0] <= stopped <= pressed[0] + 1, \
        f"interrupt pressed after step {pressed[0]} stopped the run at step {stopped}, not at the next step boundary"
    assert len(err["traceback"]) <= 3 and len("\n".join(err["traceback"])) < 600, err["traceback"]
    assert "Training interrupted at step" in "\n".join(err["traceback"])
    assert (cwd / "interrupted" / f"checkpoint-{stopped}" / "COMPLETE").is_file()

    # the same output area now holds the snapshot, and it says "interrupted", with no time "left", and how to go on
    # under the name the notebook gives the trainer (`t`); the error message too
    updates = [m["content"]["data"] for m in msgs if m["msg_type"] == "update_display_data"]
    assert updates, [m["msg_type"] for m in msgs]
    snap = [u for u in updates if "text/html" in u][-1]
    for mime in ("text/plain", "text/html"):
        assert f"interrupted at step {stopped} of 3000: t.train() continues from there" in snap[mime], snap[mime][:1000]
        assert " left" not in snap[mime], snap[mime][:1000]
    assert "`t.train()` continues exactly from there" in err["evalue"], err["evalue"]
    assert "image/png" in updates[-1], sorted(updates[-1])  # and the figure below it
    opened = {m["content"]["comm_id"] for m in msgs if m["msg_type"] == "comm_open"}
    closed = {m["content"]["comm_id"] for m in msgs if m["msg_type"] == "comm_close"}
    assert opened <= closed, f"{len(opened - closed)} comms left open after the interrupt"
    # and the dashboard's clock thread is gone with it
    threads = ok(run_cell(kc, "import threading; print([t.name for t in threading.enumerate()])"))
    assert "nbtrain-dashboard" not in threads, threads

    # counters agree with the optimizer steps applied, and the weights are an uninterrupted run's at that step
    out = ok(run_cell(kc, f"""
record = Record({stopped})
ref = make_trainer(output_dir='straight', callbacks=[record], **ARGS)
ref.train()
same = {{k: torch.equal(v, record.weights[k]) for k, v in t.model.state_dict().items()}}
print(json.dumps(dict(global_step=t.state.global_step, optimizer_steps=count.optimizer_steps,
                      ref_steps=ref.state.global_step, recorded=record.weights is not None, same=same)))
""", timeout=240))
    res = json.loads(out.strip().splitlines()[-1])
    print(f"\ninterrupt pressed after step {pressed[0]} (target {INTERRUPT_AT}); stopped at step {stopped}; "
          f"optimizer steps {res['optimizer_steps']}; traceback {err['traceback']}")
    assert res["global_step"] == res["optimizer_steps"] == stopped, res
    assert res["recorded"] and res["ref_steps"] == 3000, res
    assert all(res["same"].values()), f"interrupted at step {stopped}: weights differ from the uninterrupted run's: {res['same']}"


# ---------------------------------------------------------------------------------------------- d. script
def test_script_prints_one_line_per_log_step(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(f"{SETUP}\n"
                      "trainer = make_trainer(max_steps=400, eval_steps=100, logging_steps=50)\n"
                      "trainer.train()\n"
                      "open('history.json', 'w').write(json.dumps(trainer.state.log_history))\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((tmp_path / "history.json").read_text())
    log_events = [h for h in history if "train_runtime" not in h]  # each on_log call during training
    assert len([h for h in log_events if "loss" in h]) == 8 and len([h for h in log_events if "eval_loss" in h]) == 4
    logged_steps = sorted({h["step"] for h in log_events})  # 8: the 4 evaluations fall on logged steps
    out = proc.stdout
    assert "\r" not in out, "carriage returns: a redrawing bar, not lines"
    lines = out.splitlines()
    step_lines = [l for l in lines if l.startswith("step ")]
    summary = [l for l in lines if not l.startswith("step ")]
    # the summary lines: the columns used, the run's plan, the final summary
    assert len(summary) <= 3 and sum(l.startswith("done: 400 steps") for l in summary) == 1, summary
    assert [int(l.split()[1].split("/")[0]) for l in step_lines] == logged_steps, out  # one line per logged step
    for l in step_lines:  # at an evaluated step, the eval values are on the training line
        if int(l.split()[1].split("/")[0]) % 100 == 0: assert "loss=" in l and "eval_loss=" in l, l


# ---------------------------------------------------------------------------------------------- e. evaluation bar, NaN metrics
SLOW_EVAL = """
from tiny_train import TinyNet, make_data
from nbtrain import Trainer, TrainingArguments
class SlowEval(TinyNet):
    "Each evaluation batch takes 0.1 s: a 3 s evaluation, long enough for its bar."
    def forward(self, x, labels=None):
        if not self.training: time.sleep(0.1)
        return super().forward(x, labels)
args = TrainingArguments(output_dir=None, max_steps=4, per_device_train_batch_size=8, per_device_eval_batch_size=1,
                         eval_strategy="steps", eval_steps=4, logging_steps=2, report_to="none")
torch.manual_seed(0)
Trainer(SlowEval(), args, train_dataset=make_data(32), eval_dataset=make_data(30)).train();
"""


def test_a_long_evaluation_shows_its_bar(kernel):
    # the clock thread refreshes the training bars every 0.25 s; the evaluation bar has its own clock, or it never shows
    _, kc, _ = kernel
    msgs = run_cell(kc, SLOW_EVAL)
    ok(msgs)
    opened = [m["content"]["data"]["state"] for m in msgs if m["msg_type"] == "comm_open"]
    bars = [s.get("description") for s in opened if s.get("_model_name", "").endswith("ProgressModel")]
    assert "eval" in bars, bars
    values = [m["content"]["data"].get("state", {}).get("value") for m in msgs if m["msg_type"] == "comm_msg"]
    assert any("evaluating" in str(v) for v in values)


NAN_METRIC = """
evals = []
def correlations(p):
    "pearson is NaN at the second of the three evaluations only (a correlation of constant predictions); spearman always."
    evals.append(len(evals) + 1)
    return {"pearson": float("nan") if len(evals) == 2 else 0.2 * len(evals), "spearman": float("nan")}
trainer = make_trainer(max_steps=60, eval_steps=20, metric=False, logging_steps=10)
trainer.compute_metrics = correlations
trainer.train();
print("NAN-RUN", trainer.state.global_step, json.dumps([[h["step"], h["eval_pearson"]] for h in trainer.state.log_history
                                                        if "eval_pearson" in h]))
from nbtrain.dashboard import history_svg
print("NAN-SVG", history_svg(trainer.state.log_history))  # the live figure's drawing of the run's history
"""


def svg_panels(svg: str) -> dict[str, dict]:
    """The panels of the dashboard's SVG figure, by title: each panel's left edge (its frame's x) and its lines, by
    label, as the [(x, y), ...] points drawn. A line's label is the legend entry of its colour, or the panel's title
    when the panel has one line (and no legend)."""
    titles = list(re.finditer(r'<text [^>]*font-size="11">([^<]*)</text>', svg))
    panels = {}
    for t, nxt in zip(titles, titles[1:] + [None]):
        part = svg[t.end():nxt.start() if nxt else len(svg)]
        title = html.unescape(t.group(1))
        frame = re.search(r'<rect x="([-\d.]+)"', part)
        legend = {color: html.unescape(label) for color, label in re.findall(r'<text [^>]*fill="([^"]+)">([^<]*)</text>', part)}
        lines = {legend.get(color, title): [tuple(float(v) for v in p.split(",")) for p in pts.split()]
                 for pts, color in re.findall(r'<polyline points="([^"]*)" fill="none" stroke="([^"]+)"', part)}
        panels[title] = {"x0": float(frame.group(1)) if frame else None, "lines": lines}
    return panels


def test_a_nan_metric_leaves_a_gap_not_an_error(kernel):
    _, kc, _ = kernel
    msgs = run_cell(kc, NAN_METRIC)
    out = ok(msgs)
    m = re.search(r"NAN-RUN 60 (.*)", out)
    assert m, out[-2000:]
    logged = json.loads(m.group(1))
    assert [s for s, _ in logged] == [20, 40, 60] and math.isnan(logged[1][1]), logged  # the NaN is in log_history

    figures = [m["content"]["data"] for m in msgs if m["msg_type"] == "update_display_data" and "image/png" in m["content"]["data"]]
    assert figures, "no snapshot figure"  # matplotlib drew the history with its NaN
    panels = svg_panels(re.search(r"NAN-SVG (<svg.*</svg>)", out).group(1))
    # the metric's panel is drawn, its line through the two finite values only: step 40 is a gap, not a point at 0
    assert "pearson" in panels, f"no pearson panel in the figure: panels {sorted(panels)}"
    drawn = panels["pearson"]["lines"].get("pearson")
    assert drawn is not None, panels["pearson"]
    # where steps 20, 40 and 60 are on the x axis: the eval loss points of the loss panel, moved to this panel
    evals_x = [x for x, _ in panels["loss"]["lines"]["eval loss"]]
    shift = panels["pearson"]["x0"] - panels["loss"]["x0"]
    assert len(evals_x) == 3, panels["loss"]
    assert [x for x, _ in drawn] == pytest.approx([evals_x[0] + shift, evals_x[2] + shift], abs=0.11), \
        f"pearson drawn at x {[x for x, _ in drawn]}: the NaN of step 40 must be left out (steps 20, 60 at {evals_x[0::2]} + {shift})"
    assert drawn[0][1] > drawn[1][1]  # 0.2 then 0.6: the later value higher (SVG y grows downwards)
    # a metric that is NaN at every evaluation has nothing to draw: no line (no panel)
    assert not panels.get("spearman", {}).get("lines"), panels.get("spearman")

    # the table shows the NaN as it is
    snaps = [m["content"]["data"] for m in msgs if m["msg_type"] == "update_display_data" and "text/html" in m["content"]["data"]]
    header, body = table(snaps[-1]["text/html"])
    rows = [dict(zip(header, r)) for r in body]
    assert [(r["step"], r["eval_pearson"], r["eval_spearman"]) for r in rows] == \
        [(str(step), format_value(v), "nan") for step, v in logged], rows


PREDICT_IN_RUN = """
from tiny_train import TinyNet, make_data
from nbtrain import Trainer, TrainerCallback, TrainingArguments
class SlowEval(TinyNet):
    def forward(self, x, labels=None):
        if not self.training: time.sleep(0.1)
        return super().forward(x, labels)
class PredictAt10(TrainerCallback):
    "A predict() from a callback (a sample of outputs, say), then slow steps: the bars must go on moving after it."
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 10: trainer.predict(make_data(10))
        if state.global_step > 10: time.sleep(0.03)
args = TrainingArguments(output_dir=None, max_steps=60, per_device_train_batch_size=8, per_device_eval_batch_size=1,
                         logging_steps=20, report_to="none")
torch.manual_seed(0)
trainer = Trainer(SlowEval(), args, train_dataset=make_data(64), callbacks=[PredictAt10()])
trainer.train();
"""


def test_a_predict_during_the_run_does_not_freeze_the_bars(kernel):
    _, kc, _ = kernel
    msgs = run_cell(kc, PREDICT_IN_RUN)
    ok(msgs)
    opened = {m["content"]["comm_id"]: m["content"]["data"]["state"] for m in msgs if m["msg_type"] == "comm_open"}
    step_bar = next(cid for cid, st in opened.items() if st.get("description") == "step")
    updates = [(m["content"]["comm_id"], m["content"]["data"].get("state", {})) for m in msgs if m["msg_type"] == "comm_msg"]
    evaluating = next(i for i, (_, st) in enumerate(updates) if "evaluating" in str(st.get("value", "")))
    later = [st["value"] for cid, st in updates[evaluating:] if cid == step_bar and "value" in st]
    assert any(10 < v < 60 for v in later), f"the step bar did not move after the predict: {later}"


# ---------------------------------------------------------------------------------------------- f. show() again, the saved view
# A run in a thread, started from one cell (its display belongs to that cell, as a background run's would), so that
# another cell can run during it: the only way a second cell runs while the kernel trains. From step 100 each step
# pauses 10 ms, so the run is still going when the second cell calls show().
SHOW_RUN = """
import contextvars, threading
from nbtrain.dashboard import NotebookDashboard
class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= 100: time.sleep(0.01)
board = NotebookDashboard(save_every=0.6)  # the saved view redrawn often, so this short run has a few
bg = make_trainer(max_steps=400, eval_steps=50, logging_steps=25, disable_tqdm=True, callbacks=[board, Slow()])
th = threading.Thread(target=contextvars.copy_context().run, args=(bg.train,), name="bg-train")
th.start()
while bg.state.global_step < 120: time.sleep(0.02)
"""


def all_messages_until_idle(kc, code: str, timeout: float = 120) -> tuple[list[dict], str]:
    "Run `code`; every iopub message until its cell is idle, whichever cell each belongs to (a thread's too), and the id."
    msg_id = kc.execute(code)
    msgs, deadline = [], time.monotonic() + timeout
    while True:
        msg = kc.get_iopub_msg(timeout=max(1, deadline - time.monotonic()))
        msgs.append(msg)
        if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"): return msgs, msg_id


def test_show_in_another_cell_gets_the_same_updates(kernel):
    """`trainer.show()` in another cell during a run displays the same widget models again, so every update the run
    sends reaches both views (an ipywidgets update message is addressed to a model, not a view), and the same saved
    view (same display id); the saved view holds bars, the whole table and the figure as a PNG, and the widgets hide it."""
    _, kc, _ = kernel
    first, first_id = all_messages_until_idle(kc, SHOW_RUN)
    assert not [m for m in first if m["msg_type"] == "error"], [m["content"] for m in first if m["msg_type"] == "error"]
    shown, show_id = all_messages_until_idle(kc, "bg.show()\nprint('SHOWN AT', bg.state.global_step)")
    rest, _ = all_messages_until_idle(kc, "th.join(); print('JOINED', bg.state.global_step)")
    msgs = first + shown + rest

    displays = [m for m in msgs if m["msg_type"] == "display_data"]
    orig = [m for m in displays if m["parent_header"]["msg_id"] == first_id]
    again = [m for m in displays if m["parent_header"]["msg_id"] == show_id]
    assert len(orig) == 2 and len(again) == 2, [(m["parent_header"]["msg_id"], sorted(m["content"]["data"])) for m in displays]
    view = "application/vnd.jupyter.widget-view+json"
    box_id = orig[0]["content"]["data"][view]["model_id"]
    assert again[0]["content"]["data"][view]["model_id"] == box_id, "show() displayed other widgets, not the run's"
    assert [m["content"]["transient"]["display_id"] for m in again] == [m["content"]["transient"]["display_id"] for m in orig]
    assert "IntProgress(" not in orig[0]["content"]["data"]["text/plain"]  # a line of text, not the widgets' repr

    # the box's step bar, and its updates after show(): the views in both cells render that one model
    opened = {m["content"]["comm_id"]: m["content"]["data"]["state"] for m in msgs if m["msg_type"] == "comm_open"}
    assert box_id in opened
    step_bar = next(cid for cid, st in opened.items() if st.get("description") == "step")
    assert f"IPY_MODEL_{step_bar}" in opened[box_id]["children"]
    shown_at = msgs.index(again[0])
    later = [m["content"]["data"]["state"]["value"] for m in msgs[shown_at:] if m["msg_type"] == "comm_msg"
             and m["content"]["comm_id"] == step_bar and "value" in m["content"]["data"].get("state", {})]
    at = int(re.search(r"SHOWN AT (\d+)", "".join(m["content"].get("text", "") for m in shown)).group(1))
    assert later and max(later) > at, f"no update of the step bar after show() at step {at}: {later}"
    assert all(m["content"]["comm_id"] in opened for m in msgs[shown_at:] if m["msg_type"] == "comm_msg")

    # the saved view: refreshed during the run under its display id, hidden by a style element in the widgets
    saved_id = orig[1]["content"]["transient"]["display_id"]
    saved = [m["content"]["data"] for m in msgs if m["msg_type"] == "update_display_data"
             and m["content"]["transient"]["display_id"] == saved_id]
    mid = [d for d in saved if "text/html" in d and "<img" in d["text/html"]]
    assert mid, "the saved view was never redrawn with the figure during the run"
    page = mid[-1]["text/html"]
    css_class = re.search(r'<div class="(nbtrain-saved-[0-9a-f]+)">', page).group(1)
    assert page.count("<progress") == 2 and "<table" in page and 'src="data:image/png;base64,' in page, page[:500]
    hides = [m for m in msgs if m["msg_type"] in ("comm_open", "comm_msg") and
             f"<style>.{css_class}{{display:none}}</style>" in str(m["content"]["data"].get("state", {}).get("value", ""))]
    assert hides, "no widget hides the saved view while it shows"
    # the run's end: the dashboard's display becomes the snapshot, the saved view the figure
    ends = [m["content"]["data"] for m in msgs if m["msg_type"] == "update_display_data"]
    assert "finished: 400 steps" in ends[-2]["text/html"] and "image/png" in ends[-1], [sorted(e) for e in ends[-2:]]
    print(f"\nshow() at step {at}: {len(later)} step-bar updates after it, up to {max(later)}; saved view redrawn "
          f"{len(mid)} times with the figure ({len(page):,} B the last)")
