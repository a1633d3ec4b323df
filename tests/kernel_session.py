"""Real Jupyter kernels for the tests and benchmarks that make claims about a kernel: start one, run a cell in it."""
import contextlib
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
