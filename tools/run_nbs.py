"""Run notebooks top to bottom in a fresh kernel and save their outputs in place: the outputs are the documentation.

    python tools/run_nbs.py nbs/05_dashboard.ipynb [more notebooks]   # then: nbdev_clean && nbdev_export

Cells marked `#| eval: false` (the hub versions of offline examples) are skipped, as nbdev_test skips them, and keep
no outputs. Each notebook runs with its own folder as the working directory, as in Jupyter. Live widget state is not
saved (the dashboard leaves a static snapshot when training ends), and neither are jupytext or widget metadata.
"""
import argparse
import copy
import re
import sys
from pathlib import Path

import nbclient
import nbformat

NO_EVAL = re.compile(r"^\s*#\|\s*eval:\s*false\s*$", re.M)


def run(path: Path, timeout: int = 900, kernel: str = "python3") -> int:
    "Execute the notebook at `path` and write it back with the new outputs; gives the number of cells run."
    nb = nbformat.read(path, as_version=4)
    skipped = {id(c) for c in nb.cells if c.cell_type == "code" and NO_EVAL.search(c.source)}
    runnable = copy.deepcopy(nb)
    runnable.cells = [copy.deepcopy(c) for c in nb.cells if id(c) not in skipped]
    nbclient.NotebookClient(runnable, timeout=timeout, kernel_name=kernel, store_widget_state=False,
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    ran = iter(runnable.cells)
    for cell in nb.cells:
        if id(cell) in skipped:
            cell.outputs, cell.execution_count = [], None
            continue
        done = next(ran)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = done.outputs, done.execution_count
    for key in ("jupytext", "widgets"):
        nb.metadata.pop(key, None)
    nbformat.write(nb, path)
    return len(runnable.cells)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--timeout", type=int, default=900, help="seconds a cell may run (default 900)")
    a = p.parse_args(argv)
    for path in a.notebooks:
        print(f"ran {run(path, a.timeout)} cells of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
