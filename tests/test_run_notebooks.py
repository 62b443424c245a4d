"""The headless runner behind ``make run``: outputs and figures kept, a failing notebook saved as far as it ran."""
import nbformat
import pytest

from peft_lab import run_notebooks


def _notebook(path, *sources):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.cells = [nbformat.v4.new_code_cell(src) for src in sources]
    nbformat.write(nb, path)
    return path


def test_runner_keeps_outputs_and_goes_on_after_a_failure(tmp_path):
    good = _notebook(tmp_path / "good.ipynb", "print(6 * 7)")
    bad = _notebook(tmp_path / "bad.ipynb", "print('before')", "raise ValueError('broken on purpose')", "print('never')")
    later = _notebook(tmp_path / "later.ipynb", "print('still ran')")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="1 notebook.*bad.ipynb"):
        run_notebooks.run([good, bad, later], out, timeout=120)
    saved = {p.name: nbformat.read(p, as_version=4) for p in (out / "notebooks").iterdir()}
    assert set(saved) == {"good.ipynb", "bad.ipynb", "later.ipynb"}
    assert saved["good.ipynb"].cells[0].outputs[0]["text"] == "42\n"
    assert saved["bad.ipynb"].cells[0].outputs[0]["text"] == "before\n"
    assert saved["bad.ipynb"].cells[1].outputs[0]["ename"] == "ValueError"
    assert saved["bad.ipynb"].cells[2].outputs == []
    assert saved["later.ipynb"].cells[0].outputs[0]["text"] == "still ran\n"


def test_the_erased_training_bars_are_not_saved_but_everything_else_is():
    widget = {"model_id": "abc", "version_major": 2, "version_minor": 0}
    bar = nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": widget,
        "text/plain": "training lora:   0%|          | 0/60 [00:00<?, ?it/s]"})
    panel = nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": widget, "text/plain": "VBox(children=(...))"})
    summary = nbformat.v4.new_output("stream", name="stdout", text="training lora: 60 steps, 1.30 s/step, loss 4.91 → 0.21\n")
    printed = nbformat.v4.new_output("stream", name="stdout", text="training lora:   0%|  | 0/60 as plain text\n")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("fit()"), nbformat.v4.new_markdown_cell("text")]
    nb.cells[0].outputs = [bar, summary, panel, printed]
    assert run_notebooks.drop_training_bars(nb) == 1
    assert nb.cells[0].outputs == [summary, panel, printed]
