"""Write README.md from nbs/index.ipynb (Quarto, which nbdev_readme needs, is not available everywhere).

`python tools/readme.py` writes it; `python tools/readme.py --check` exits 1 when README.md is stale.
"""
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIRECTIVE = re.compile(r"^#\|\s*(.*)$")


def directives(src: str) -> set[str]:
    return {m.group(1).strip().replace(" ", "") for line in src.splitlines() if (m := DIRECTIVE.match(line))}


def code(src: str) -> str:
    return "\n".join(l for l in src.splitlines() if not DIRECTIVE.match(l)).strip("\n")


def outputs(cell: dict) -> list[str]:
    out = []
    for o in cell.get("outputs", []):
        data = o.get("data", {})
        if "application/vnd.jupyter.widget-view+json" in data: continue  # a live widget: nothing to show in Markdown
        if "text/markdown" in data: out.append("".join(data["text/markdown"]))
        elif "text/plain" in data and "image/png" not in data: out.append("```\n" + "".join(data["text/plain"]).rstrip() + "\n```")
        elif o.get("output_type") == "stream" and o.get("name") == "stdout" and "".join(o["text"]).strip(): out.append("```\n" + "".join(o["text"]).rstrip() + "\n```")
    return out


def render(nb: dict) -> str:
    parts = ["<!-- Generated from nbs/index.ipynb by tools/readme.py: edit the notebook, not this file. -->"]
    for cell in nb["cells"]:
        src = "".join(cell["source"])
        flags = directives(src)
        if cell["cell_type"] == "markdown":
            parts.append(src.strip())
        elif cell["cell_type"] == "code" and not flags & {"hide", "default_exp", "exporti"} and "default_expquickstart" not in flags:
            body = code(src)
            if not body or any(f.startswith("default_exp") for f in flags): continue
            parts.append("```python\n" + body + "\n```")
            parts.extend(outputs(cell))
    return "\n\n".join(p for p in parts if p) + "\n"


def main(argv):
    text = render(json.loads((ROOT / "nbs" / "index.ipynb").read_text()))
    readme = ROOT / "README.md"
    if "--check" in argv:
        if not readme.is_file() or readme.read_text() != text:
            print("README.md is stale: run `python tools/readme.py` and commit it.")
            return 1
        return 0
    readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
