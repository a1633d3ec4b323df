"""`tools/mutants.py` stays runnable: each breakage's text occurs exactly once in today's source, and each test it
names exists. (Running the breakages takes about 15 minutes: `python tools/mutants.py`, before resolving an issue
that changes what a test claims.)"""
import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from mutants import MUTANTS, apply  # noqa: E402


def _test_names(path: Path) -> set[str]:
    return {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}


@pytest.mark.parametrize("m", MUTANTS, ids=lambda m: m.name)
def test_breakage_applies_to_todays_source(m, tmp_path):
    (tmp_path / m.file).parent.mkdir(parents=True)
    (tmp_path / m.file).write_text((ROOT / m.file).read_text())
    assert apply(m, tmp_path) is None
    assert (tmp_path / m.file).read_text() != (ROOT / m.file).read_text()


@pytest.mark.parametrize("m", MUTANTS, ids=lambda m: m.name)
def test_breakage_names_tests_that_exist(m):
    for node in m.tests:
        file, _, name = node.partition("::")
        assert (ROOT / file).is_file(), node
        if name: assert name.split("[")[0] in _test_names(ROOT / file), node
