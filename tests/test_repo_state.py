"""What CI must refuse: a committed state that the project's own commands would change.

- README.md is what `python tools/readme.py` writes from nbs/index.ipynb;
- `nbdev_export` would leave nbtrain/ as committed (the package is the notebooks' export);
- `nbdev_clean` would leave the notebooks as committed (no stray metadata, ids or execution counts);
- nbs/nbdev.yml and nbs/_quarto.yml are what nbdev writes from settings.ini before `nbdev_docs` renders with Quarto.

The nbdev commands run in a temporary copy of the repository (its tracked and not-ignored files), never in place.
The docs site build (`tools/docs.py`) is checked by test_docs_site.py.
"""
import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    "An nbdev console script of this Python's environment."
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install the dev tools (pip install -e '.[dev]')")
    return found


def _differences(a: Path, b: Path, pattern: str) -> list[str]:
    "Files matching `pattern` under `a` and `b` (relative paths) that differ, or exist on one side only."
    def files(root):
        return {p.relative_to(root).as_posix() for p in root.glob(pattern)
                if p.is_file() and not any(part in ("__pycache__", ".ipynb_checkpoints") for part in p.relative_to(root).parts)}
    fa, fb = files(a), files(b)
    out = [f"only in the repository: {f}" for f in sorted(fa - fb)] + [f"written by the command: {f}" for f in sorted(fb - fa)]
    out += [f"changed: {f}" for f in sorted(fa & fb) if not filecmp.cmp(a / f, b / f, shallow=False)]
    return out


def _run(cmd: list[str], cwd: Path):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}"


def test_readme_is_generated_from_index():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "readme.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_nbdev_export_changes_nothing(repo_copy):
    _run([_tool("nbdev_export")], repo_copy)
    diff = _differences(ROOT / "nbtrain", repo_copy / "nbtrain", "**/*")
    assert not diff, "nbtrain/ is not the notebooks' export: run `nbdev_export` and commit\n" + "\n".join(diff)


def test_nbdev_clean_changes_nothing(repo_copy):
    _run([_tool("nbdev_clean")], repo_copy)
    diff = _differences(ROOT / "nbs", repo_copy / "nbs", "**/*.ipynb")
    assert not diff, "notebooks are not clean: run `nbdev_clean` and commit\n" + "\n".join(diff)


def test_quarto_settings_match_settings_ini(repo_copy):
    "nbdev_docs rewrites nbs/nbdev.yml from settings.ini (and writes _quarto.yml when missing): the committed ones are that."
    _run([sys.executable, "-c", "from nbdev.quarto import refresh_quarto_yml; refresh_quarto_yml()"], repo_copy)
    for name in ("nbdev.yml", "_quarto.yml"):
        assert (ROOT / "nbs" / name).is_file(), f"nbs/{name} is missing: nbdev_docs needs it"
        assert filecmp.cmp(ROOT / "nbs" / name, repo_copy / "nbs" / name, shallow=False), \
            f"nbs/{name} is stale: run `python -c 'from nbdev.quarto import refresh_quarto_yml; refresh_quarto_yml()'`"
