"""Every notebook opens with the same install-and-setup cell, made from peft_lab/colab.py (one clone URL)."""
import json

import pytest

from peft_lab import colab

NOTEBOOKS = sorted(colab.NOTEBOOKS.glob("[0-9]*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_code_cell_is_the_shared_one(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert "".join(colab.first_code_cell(nb)["source"]) == colab.first_cell(), (
        f"{path.name}: its first cell differs from peft_lab/colab.py; run python -m peft_lab.colab")


def test_the_clone_url_is_in_one_place():
    assert colab.REPO in colab.first_cell()
    for path in NOTEBOOKS:
        text = path.read_text(encoding="utf-8")
        assert text.count("github.com/") == colab.first_cell().count("github.com/"), path.name


def test_write_all_repairs_a_drifted_cell(tmp_path):
    nb = json.loads(NOTEBOOKS[0].read_text(encoding="utf-8"))
    colab.first_code_cell(nb)["source"] = ["print('old cell')\n"]
    (tmp_path / "00_x.ipynb").write_text(json.dumps(nb), encoding="utf-8")
    assert colab.write_all(tmp_path) == ["00_x.ipynb"]
    fixed = json.loads((tmp_path / "00_x.ipynb").read_text(encoding="utf-8"))
    assert "".join(colab.first_code_cell(fixed)["source"]) == colab.first_cell()
    assert colab.write_all(tmp_path) == []


def test_first_cell_is_valid_python():
    import ast

    ast.parse(colab.first_cell())
