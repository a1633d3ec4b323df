"""Real Jupyter kernels for the tests and benchmarks that make claims about a kernel: start one, run a cell in it."""
import contextlib
import json
import os
import time

import jupyter_client

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MPLBACKEND": "Agg"}


@contextlib.contextmanager
def running_kernel(cwd, env: dict | None = None, timeout: float = 90):
    "A python3 kernel (ipykernel) started in `cwd`, offline, with its client; shut down on exit."
    km = jupyter_client.KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(cwd), env={**os.environ, **OFFLINE, **(env or {})})
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=timeout)
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def execute(kc, code: str, timeout: float = 120, on_msg=None) -> list[dict]:
    "Run `code`; every iopub message of that execution until the kernel is idle again. `on_msg(msg)` sees each as it comes."
    msg_id = kc.execute(code)
    msgs, deadline = [], time.monotonic() + timeout
    while True:
        msg = kc.get_iopub_msg(timeout=max(1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id: continue
        msgs.append(msg)
        if on_msg: on_msg(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle": return msgs


def stdout(msgs: list[dict]) -> str:
    "What the cell printed."
    return "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")


def error(msgs: list[dict]) -> dict | None:
    "The cell's error content, if it raised."
    return next((m["content"] for m in msgs if m["msg_type"] == "error"), None)


class Session:
    "A kernel and every iopub message it sent, whichever cell it belongs to (a background thread's output comes late)."
    def __init__(self, km, kc):
        self.km, self.kc, self.msgs = km, kc, []

    def run(self, code: str, timeout: float = 120) -> tuple[str, list[dict], float]:
        "Run `code`; its msg_id, its own iopub messages until idle, and the seconds until its execute_reply."
        msg_id = self.kc.execute(code)
        start, deadline = time.monotonic(), time.monotonic() + timeout
        reply_s = None
        while reply_s is None:
            reply = self.kc.get_shell_msg(timeout=max(1, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg_id: reply_s = time.monotonic() - start
        own = []
        while True:
            msg = self.kc.get_iopub_msg(timeout=max(1, deadline - time.monotonic()))
            self.msgs.append(msg)
            if msg["parent_header"].get("msg_id") != msg_id: continue
            own.append(msg)
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle": return msg_id, own, reply_s

    def ok(self, code: str, timeout: float = 120):
        "Run `code`, check it raised nothing, and give what it printed last as JSON."
        _, own, _ = self.run(code, timeout)
        err = next((m["content"] for m in own if m["msg_type"] == "error"), None)
        assert err is None, f"{err['ename']}: {err['evalue']}\n" + "\n".join(err["traceback"])[-3000:]
        out = "".join(m["content"]["text"] for m in own if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")
        return json.loads(out.strip().splitlines()[-1]) if out.strip() else None

    def drain(self, seconds: float = 0.5):
        "Collect what arrives in `seconds` (a thread's last messages)."
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try: self.msgs.append(self.kc.get_iopub_msg(timeout=0.1))
            except Exception: pass

    def of(self, msg_id: str, kind: str) -> list[dict]:
        return [m for m in self.msgs if m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == kind]


@contextlib.contextmanager
def session_with(cwd, setup: str):
    "A `Session` in a kernel started in `cwd` (one torch thread, the tests and the project importable) that ran `setup`."
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([tests, os.path.dirname(tests)])}
    with running_kernel(cwd, env=env) as (km, kc):
        s = Session(km, kc)
        s.ok(setup)
        yield s
