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


def test_widget_state_keeps_what_outputs_show_and_drops_the_erased_bars():
    view = lambda model: nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": model, "version_major": 2, "version_minor": 0},
        "text/plain": "VBox(children=(...))"})
    state = {
        "panel": {"model_name": "VBoxModel", "state": {"children": ["IPY_MODEL_a1", "IPY_MODEL_b2"], "layout": "IPY_MODEL_c3"}},
        "a1": {"model_name": "IntSliderModel", "state": {"style": "IPY_MODEL_d4"}},
        "b2": {"model_name": "OutputModel", "state": {"outputs": [{"output_type": "display_data", "data": {
            "application/vnd.jupyter.widget-view+json": {"model_id": "e5"}}}]}},
        "c3": {"model_name": "LayoutModel", "state": {}},
        "d4": {"model_name": "SliderStyleModel", "state": {}},
        "e5": {"model_name": "HTMLModel", "state": {"value": "inside the output area"}},
        "f6": {"model_name": "HBoxModel", "state": {"children": ["IPY_MODEL_f7"]}},   # an erased bar
        "f7": {"model_name": "FloatProgressModel", "state": {"value": 60}},
    }
    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": state, "version_major": 2, "version_minor": 0}}
    nb.cells = [nbformat.v4.new_code_cell("panel")]
    nb.cells[0].outputs = [view("panel")]
    assert run_notebooks.drop_unshown_widgets(nb) == 2
    kept = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    assert set(kept) == {"panel", "a1", "b2", "c3", "d4", "e5"}
    assert run_notebooks.drop_unshown_widgets(nbformat.v4.new_notebook()) == 0   # no widgets at all: nothing to do
