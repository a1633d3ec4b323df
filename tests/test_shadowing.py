"""No file of ours takes the name of a module that Python or an installed package provides.

pytest puts `tests/` first on `sys.path` (and the benchmarks and tools put their own folder there), so a helper named
like a package hides it from every import, transformers' own included: `tests/kernels.py` once did exactly that when
transformers began to import the `kernels` package, and a fresh machine's suite went red.
"""
import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("tests", "bench", "tools")


def shadowed(root: Path, provided: dict[str, list[str]]) -> list[str]:
    "Each `*.py` in `root`'s script folders (and below) whose name is a top-level module of the standard library or of `provided`."
    found = []
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):  # scripts in subfolders run with theirs first on sys.path
            name = path.stem
            if name in provided:
                found.append(f"{path.relative_to(root)} hides the module {name!r} of {', '.join(sorted(set(provided[name])))}")
            elif name in sys.stdlib_module_names:
                found.append(f"{path.relative_to(root)} hides the standard library's module {name!r}")
    return found


def test_no_script_folder_module_shadows_an_installed_package():
    found = shadowed(ROOT, importlib.metadata.packages_distributions())
    assert not found, "rename these files (a name that says what they hold):\n" + "\n".join(found)


def test_the_guard_names_a_file_that_shadows(tmp_path):
    # the same check, on a copy of the layout with one helper named like an installed package and one like a
    # standard module: both are named, with the package that provides the name
    provided = importlib.metadata.packages_distributions()
    package = next(n for n in ("torch", "transformers", "pytest") if n in provided)
    for folder in FOLDERS: (tmp_path / folder).mkdir()
    (tmp_path / "tests" / f"{package}.py").write_text("")
    (tmp_path / "bench" / "json.py").write_text("")
    (tmp_path / "tools" / "what_it_holds.py").write_text("")
    found = shadowed(tmp_path, provided)
    assert len(found) == 2, found
    assert found[0].startswith(f"tests/{package}.py") and provided[package][0] in found[0]
    assert found[1].startswith("bench/json.py") and "standard library" in found[1]
