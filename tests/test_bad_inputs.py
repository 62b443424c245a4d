"""Bad input, tried as a new user would: each gets a clear error that says what to do, never a raw traceback
from deep inside torch, json or datasets (and a run-log line that is JSON but not a run is skipped, not fatal)."""
import json

import pytest

from peft_lab import data, measure, runlog, study
from peft_lab.methods import dora, ia3, lora


@pytest.mark.parametrize("module", [lora, dora], ids=["lora", "dora"])
@pytest.mark.parametrize("settings, message", [
    ({"alpha": 0}, "alpha must be a positive number"),
    ({"alpha": -8}, "alpha must be a positive number"),
    ({"rank": 2.5}, "rank must be a whole number"),
    ({"rank": 0}, "rank must be a whole number"),
])
def test_settings_that_cannot_train_are_refused(module, settings, message, tiny_llama):
    with pytest.raises(ValueError, match=message):
        module.apply(tiny_llama, **settings)
    assert not lora.lora_layers(tiny_llama)  # refused before anything was wrapped


@pytest.mark.parametrize("module, name", [(lora, "LoRA"), (dora, "DoRA"), (ia3, "IA3")])
@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_a_damaged_adapter_config_says_so(module, name, content, tiny_llama, tmp_path):
    (tmp_path / "adapter_config.json").write_text(content)
    with pytest.raises(ValueError, match="damaged.*Save the adapter again"):
        module.load(tiny_llama, tmp_path)
    with pytest.raises(FileNotFoundError, match=f"saved {name} adapter"):
        module.load(tiny_llama, tmp_path / "empty")


def _csv(path, header, rows):
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def test_a_local_file_with_other_columns_names_what_it_needs(tmp_path):
    path = _csv(tmp_path / "news.csv", "text,category", [f"story {i},1" for i in range(20)])
    with pytest.raises(ValueError, match=r"no column 'label' \(it has \['text', 'category'\]\)"):
        data.load_task("ag_news", source=path)


def test_a_label_outside_the_task_is_refused_with_its_row(tmp_path):
    path = _csv(tmp_path / "news.csv", "text,label", [f"story {i},{i % 4}" for i in range(19)] + ["odd one,7"])
    with pytest.raises(ValueError, match=r"row 20: label 7 is not one of 0..3 \(world, sports, business, science\)"):
        data.load_task("ag_news", source=path)


def test_an_empty_or_tiny_file_is_refused(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        data.load_task("ag_news", source=empty)
    one_row = _csv(tmp_path / "one.csv", "text,label", ["a single story,2"])
    with pytest.raises(ValueError, match="holds 1 example.*at least 10"):
        data.load_task("ag_news", source=one_row)
    with pytest.raises(ValueError, match="reads no file"):
        data.load_task("reviews", source=one_row)


def test_a_run_log_line_that_is_json_but_not_a_run_is_skipped(tmp_path, monkeypatch):
    log = tmp_path / "runs.jsonl"
    monkeypatch.setenv("PEFT_LAB_RUNLOG", str(log))
    good = runlog.RunRecord(method="lora", task="tiny", config={"lr": 1e-3}, trainable_params=1, total_params=2, quick=True)
    runlog.save_run(good)
    with log.open("a") as f:
        f.write("[1, 2]\n\"a string\"\n")
    with pytest.warns(UserWarning, match="line 2 .*line 3"):
        runs = runlog.load_runs(quick=True)
    assert [r.run_id for r in runs] == [good.run_id]


def test_wilson_refuses_counts_that_are_not_counts():
    with pytest.raises(ValueError, match="0 <= correct <= n"):
        measure.wilson(5, 3)
    with pytest.raises(ValueError, match="at least one answer"):
        measure.wilson(0, 0)


@pytest.mark.parametrize("argv, message", [
    (["--lrs", "1e-3", "--steps", "-5"], "-5 must be above 0"),
    (["--lrs", "-1"], "-1 must be above 0"),
    (["--lrs", "0"], "0 must be above 0"),
    (["--lrs", "1e-3", "--facts", "0"], "0 must be above 0"),
    (["--lrs", "1e-3", "--task", "facts", "--source", "x.csv"], "--source FILE goes with a classification task"),
])
def test_the_study_command_line_refuses_impossible_grids(argv, message, capsys):
    with pytest.raises(SystemExit):
        study.main(argv)
    assert message in capsys.readouterr().err
