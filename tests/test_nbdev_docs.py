"""`nbdev_docs` (the Quarto site) works from the committed notebooks and nbdev's Quarto files.

Quarto is not installed everywhere (it cannot be here), so this runs everything `nbdev_docs` does before it calls
`quarto render`: `nbdev_proc_nbs` writes nbs/nbdev.yml from settings.ini, the sidebar, and the processed notebooks
in _proc/ (executing each notebook's exported cells and imports to render the API docs). Where `quarto` is on the
PATH, it runs the whole `nbdev_docs`. Always in a temporary copy of the repository.
"""
import shutil
import subprocess
import sys

PROC = ("import nbdev.quarto as q; q._ensure_quarto = lambda: None; "  # never download Quarto
        "q.nbdev_proc_nbs.__wrapped__(n_workers=0)")

def test_nbdev_docs_processing(repo_copy):
    r = subprocess.run([sys.executable, "-c", PROC], cwd=repo_copy, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"nbdev_proc_nbs failed:\n{r.stderr[-3000:]}"
    proc = repo_copy / "_proc"
    notebooks = sorted(p.relative_to(repo_copy / "nbs") for p in (repo_copy / "nbs").rglob("*.ipynb")
                       if not any(part.startswith(("_", ".")) for part in p.relative_to(repo_copy / "nbs").parts))
    for rel in notebooks:
        assert (proc / rel).is_file(), f"_proc/{rel} was not written"
    for name in ("_quarto.yml", "nbdev.yml", "sidebar.yml", "styles.css"):
        assert (proc / name).is_file(), f"_proc/{name} is missing: Quarto needs it"
    sidebar = (proc / "sidebar.yml").read_text()
    assert all(rel.as_posix() in sidebar for rel in notebooks), sidebar
    if shutil.which("quarto"):
        r = subprocess.run(["nbdev_docs"], cwd=repo_copy, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"nbdev_docs failed:\n{r.stderr[-3000:]}"
        assert (repo_copy / "_docs" / "index.html").is_file()
