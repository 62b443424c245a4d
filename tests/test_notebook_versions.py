"""Every saved notebook ran on the code in this tree: its stamp (package, data, its own code cells) equals the
tree's, and it was a full-mode run. A notebook whose stamp differs is stale: refresh it (the message says how)."""
import json

import nbformat
import pytest

from peft_lab import colab, run_notebooks, version

NOTEBOOKS = sorted(colab.NOTEBOOKS.glob("[0-9]*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_saved_notebook_ran_on_this_code(path):
    record = version.saved_record(path)
    refresh = (f"refresh it: make run NOTEBOOKS={path.name[:2]} && cp build/notebooks/{path.name} notebooks/ "
               "(after a change to peft_lab/ or data/, every notebook: make run && cp build/notebooks/*.ipynb notebooks/)")
    assert record, f"{path.name} carries no code-version stamp; {refresh}"
    assert record["mode"] == "full", f"{path.name} was saved from a {record['mode']}-mode run; {refresh}"
    stale = version.stale_parts(path)
    assert not stale, f"{path.name} is stale: its {', '.join(stale)} changed since the run that saved it; {refresh}"
    header = "".join(json.loads(path.read_text(encoding="utf-8"))["cells"][0]["source"])
    assert f"{record['minutes']:.1f} min in full mode on {record['machine']}" in header, "the time line is not the run's"


def _nb(*sources, markdown="# Title\n\n**Time:** typed by hand.\nA GPU is faster."):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(markdown)] + [nbformat.v4.new_code_cell(s) for s in sources]
    return nb


def test_the_version_follows_code_cells_not_markdown(tmp_path):
    nb = _nb("x = 1", "print(x)")
    base = version.cells_version(nb)
    nb.cells[0].source += "\nmore words"
    assert version.cells_version(nb) == base  # markdown changes no output
    nb.cells[2].source = "print(x + 1)"
    assert version.cells_version(nb) != base


def test_the_package_and_data_versions_see_every_file(tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("A = 1\n")
    before = version._hash_files(tmp_path / "pkg", "*.py")
    (tmp_path / "pkg" / "sub").mkdir()
    (tmp_path / "pkg" / "sub" / "b.py").write_text("B = 2\n")
    assert version._hash_files(tmp_path / "pkg", "*.py") != before
    (tmp_path / "pkg" / "__pycache__").mkdir()
    after = version._hash_files(tmp_path / "pkg", "*.py")
    (tmp_path / "pkg" / "__pycache__" / "c.py").write_text("compiled\n")
    assert version._hash_files(tmp_path / "pkg", "*.py") == after


def test_stamp_records_the_run_and_writes_the_time_line(tmp_path, monkeypatch):
    monkeypatch.delenv("PEFT_LAB_QUICK", raising=False)
    path = tmp_path / "00_x.ipynb"
    nb = _nb("print(1)")
    nbformat.write(nb, path)
    record = run_notebooks.stamp(nb, path, minutes=3.14)
    assert nb.metadata["peft_lab"] == record and record["mode"] == "full" and record["minutes"] == 3.1
    assert record["code_version"] == version.code_version(path)
    header = nb.cells[0].source
    assert f"**Time:** 3.1 min in full mode on {record['machine']}, {record['precision']}" in header
    assert "typed by hand" not in header and header.endswith("A GPU is faster.")  # the next line is kept
    monkeypatch.setenv("PEFT_LAB_QUICK", "1")
    nb = _nb("print(1)")
    assert run_notebooks.stamp(nb, path, minutes=1.0)["mode"] == "quick"
    assert "typed by hand" in nb.cells[0].source  # a quick run never writes the header's time


def test_a_stale_notebook_is_caught(tmp_path, monkeypatch):
    path = tmp_path / "00_x.ipynb"
    nb = _nb("print(1)")
    nbformat.write(nb, path)
    run_notebooks.stamp(nb, path, minutes=1.0)
    nbformat.write(nb, path)
    assert version.stale_parts(path) == []
    nb.cells[1].source = "print(2)"
    nbformat.write(nb, path)
    assert version.stale_parts(path) == ["cells"]
    monkeypatch.setattr(version, "package_version", lambda: "changed")
    assert version.stale_parts(path) == ["package", "cells"]
