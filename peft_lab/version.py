"""The code version a saved notebook ran on, so a stale notebook is caught and one notebook can be refreshed alone.

A notebook's outputs are true for one state of three things: the package (``peft_lab/``), the data (``data/``) and
the notebook's own code cells. ``code_version(path)`` hashes each of them; the runner behind ``make run``
(``run_notebooks``) writes the result into the notebook's metadata (``metadata["peft_lab"]``) together with what
it ran on (machine, precision, minutes), and the first cell prints it. ``tests/test_notebook_versions.py``
compares every saved notebook's record with the tree: after a change to the package or the data, every notebook is
stale; after a change to one notebook's code, only that one. Markdown edits do not make a notebook stale (they
change no output). Explained in the README, "Refreshing the saved notebooks".
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "peft_lab"
DATA = ROOT / "data"
METADATA_KEY = "peft_lab"


def _hash_files(folder: Path, pattern: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob(pattern) if p.is_file() and "__pycache__" not in p.parts):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def package_version() -> str:
    """A hash of every Python file of ``peft_lab/``."""
    return _hash_files(PACKAGE, "*.py")


def data_version() -> str:
    """A hash of every file under ``data/``."""
    return _hash_files(DATA, "*")


def cells_version(nb: dict) -> str:
    """A hash of a notebook's code cells (their sources, in order; outputs and markdown are left out)."""
    digest = hashlib.sha256()
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            source = cell["source"]
            digest.update(("".join(source) if isinstance(source, list) else source).encode() + b"\0")
    return digest.hexdigest()[:12]


def code_version(notebook: Path | str | dict | None = None) -> dict:
    """``{"package", "data", "cells"}`` for a notebook (a path or its JSON), or the package and data alone."""
    version = {"package": package_version(), "data": data_version()}
    if notebook is not None:
        nb = notebook if isinstance(notebook, dict) else json.loads(Path(notebook).read_text(encoding="utf-8"))
        version["cells"] = cells_version(nb)
    return version


def short(version: dict) -> str:
    """One line: "package 1a2b3c4d5e6f · data 0f9e8d7c6b5a · cells 123456789abc"."""
    return " · ".join(f"{part} {value}" for part, value in version.items())


def saved_record(notebook: Path | str | dict) -> dict:
    """What the runner wrote into a saved notebook (``{}`` for a notebook saved before stamps existed)."""
    nb = notebook if isinstance(notebook, dict) else json.loads(Path(notebook).read_text(encoding="utf-8"))
    return nb.get("metadata", {}).get(METADATA_KEY, {})


def stale_parts(notebook: Path | str) -> list:
    """The parts whose saved version differs from the tree's (empty: the saved outputs are current)."""
    saved = saved_record(notebook).get("code_version", {})
    now = code_version(notebook)
    return [part for part in now if saved.get(part) != now[part]]
