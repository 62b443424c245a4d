"""The study runner: a grid of runs, each trained once, resumable from the run log, summarised over seeds."""
from collections import Counter

import pytest
import torch

from peft_lab import data, runlog, study, train

pytestmark = pytest.mark.usefixtures("isolated_run_log")  # `task` and the run log come from conftest.py


@pytest.fixture
def count_fits(monkeypatch):
    calls = Counter()
    real = train.fit

    def counting(*args, **kwargs):
        calls[kwargs["tag"]] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(study.train, "fit", counting)
    return calls


def test_grid_is_every_combination_with_its_own_learning_rates():
    points = study.grid(["full", "lora-qv"], {"full": [1e-5, 1e-4], "lora-qv": [1e-3]}, seeds=[0, 1], steps=5)
    assert len(points) == 2 * 2 + 1 * 2
    assert {p.lr for p in points if p.recipe == "full"} == {1e-5, 1e-4}
    with pytest.raises(ValueError, match="Unknown recipe"):
        study.grid(["dora-magic"], [1e-3])


def test_a_study_trains_each_point_once_and_resumes_from_the_log(tiny_llama, tokenizer, task, count_fits):
    points = study.grid(["lora-qv"], [1e-2], seeds=[0, 1], steps=2)
    first = study.run(points, tiny_llama, tokenizer, task, progress=False)
    assert count_fits["study:lora-qv"] == 2 and len(first) == 2
    assert {r.config["seed"] for r in first} == {0, 1}
    again = study.run(points, tiny_llama, tokenizer, task, progress=False)
    assert count_fits["study:lora-qv"] == 2, "a logged point was trained again"
    assert [r.run_id for r in again] == [r.run_id for r in first]
    bigger = study.grid(["lora-qv"], [1e-2], seeds=[0, 1, 2], steps=2)
    study.run(bigger, tiny_llama, tokenizer, task, progress=False)
    assert count_fits["study:lora-qv"] == 3, "only the new seed should train"
    assert all("val_accuracy" in r.metrics for r in runlog.load_runs("study:lora-qv"))


def test_each_study_run_is_logged_with_where_and_on_what_it_ran(tiny_llama, tokenizer, task):
    from peft_lab import models, version

    (run,) = study.run(study.grid(["lora-qv"], [1e-2], seeds=[0], steps=2), tiny_llama, tokenizer, task,
                       progress=False)
    (logged,) = runlog.load_runs("study:lora-qv")  # as a later sitting reads it from the shipped log
    for record in (run, logged):
        p = record.provenance
        assert p["machine"] == models.machine() and p["torch"] == torch.__version__
        assert p["code_version"] == version.short(version.code_version()) and p["threads"] >= 1
        assert p["precision"] == models.precision_summary(models.pick_device())
        assert 0 < p["wall_seconds"] and "val_accuracy" in record.metrics


def test_an_interrupted_run_is_not_logged_and_the_study_goes_on_next_time(tiny_llama, tokenizer, task, monkeypatch):
    real = train.fit
    state = {"interrupt": True}

    def flaky(*args, **kwargs):
        if state["interrupt"]:
            state["interrupt"] = False
            kwargs["on_step"] = lambda record: (_ for _ in ()).throw(KeyboardInterrupt)
        return real(*args, **kwargs)
    monkeypatch.setattr(study.train, "fit", flaky)
    points = study.grid(["lora-qv"], [1e-2], seeds=[0, 1], steps=3)
    assert study.run(points, tiny_llama, tokenizer, task, progress=False) == []
    assert runlog.load_runs("study:lora-qv") == []
    assert len(study.run(points, tiny_llama, tokenizer, task, progress=False)) == 2


def test_low_data_points_train_on_a_balanced_subset_and_test_on_everything(tiny_llama, tokenizer, task):
    points = study.grid(["lora-qv"], [1e-2], seeds=[0], train_sizes=[4], steps=1)
    (run,) = study.run(points, tiny_llama, tokenizer, task, progress=False)
    assert run.task == "tiny, 4 train" and run.metrics["test_n"] == len(task.test)
    small = data.subset(task, 4, seed=0)
    assert Counter(label for _, label in small.train) == {"positive": 2, "negative": 2}
    assert small.test == task.test and data.subset(task, 100) is task
    with pytest.raises(ValueError):
        data.subset(task, 0)


def test_summary_gives_a_mean_and_interval_over_seeds(tiny_llama, tokenizer, task):
    runs = study.run(study.grid(["lora-qv"], [1e-2], seeds=[0, 1, 2], steps=1), tiny_llama, tokenizer, task,
                     progress=False)
    (row,) = study.summarize(runs)
    assert row["seeds"] == 3 and row["recipe"] == "lora-qv"
    acc = row["accuracy"]
    assert acc["n"] == 3 and acc["low"] <= acc["mean"] <= acc["high"]
    assert acc["mean"] == pytest.approx(sum(r.metrics["accuracy"] for r in runs) / 3)


def test_command_line_dry_run_lists_the_grid_and_trains_nothing(tiny_llama, tokenizer, task, monkeypatch, capsys,
                                                                 count_fits):
    monkeypatch.setattr(study.models, "load", lambda *a, **k: (tiny_llama, tokenizer))
    monkeypatch.setattr(study.data_mod, "load_task", lambda name, source=None: task)
    study.main(["--recipes", "lora-qv", "full", "--lrs", "1e-3", "--seeds", "0", "1", "--steps", "2", "--dry-run"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("to run ") for line in lines)
    assert sum(count_fits.values()) == 0


def test_seed_means_keep_the_test_sets_own_uncertainty_and_stay_in_range():
    def record(acc, kl):
        r = runlog.RunRecord(method="lora", tag="study:lora-qv", task="t", config={"lr": 1e-3, "seed": 0}, trainable_params=1,
                             total_params=2)
        r.metrics = {"accuracy": acc, "test_n": 50, "kl": kl, "kl_low": kl - 0.01, "kl_high": kl + 0.01}
        return r
    same = study.summarize([record(0.98, 0.02), record(0.98, 0.02)], metrics=("accuracy", "kl"))[0]
    # two seeds that agree exactly: no spread over seeds, but 100 answers still leave a Wilson interval
    assert same["accuracy"]["low"] < 0.95 and same["accuracy"]["high"] <= 1.0
    assert same["kl"]["low"] == pytest.approx(0.01) and same["kl"]["high"] == pytest.approx(0.03)
    apart = study.summarize([record(0.99, 0.001), record(0.40, 0.30)], metrics=("accuracy", "kl"))[0]
    # two seeds far apart: the t-interval is huge, and it is cut to what a share and a KL can be
    assert apart["accuracy"]["low"] == 0.0 and apart["accuracy"]["high"] == 1.0
    assert apart["kl"]["low"] == 0.0


def test_a_seed_whose_base_knew_no_measured_probe_is_left_out_of_probes_kept_not_counted_as_zero():
    def record(kept, known):
        r = runlog.RunRecord(method="full", tag="study:full", task="t", config={"lr": 1e-4, "seed": known}, trainable_params=1,
                             total_params=2)
        r.metrics = {"accuracy": 0.5, "test_n": 10, "kept_greedy": kept, "probes_known_by_base": known}
        return r
    row = study.summarize([record(0.75, 4), record(float("nan"), 0)], metrics=("accuracy", "kept_greedy"))[0]
    assert row["kept_greedy"]["mean"] == 0.75 and row["kept_greedy"]["n"] == 1
    nothing = study.summarize([record(float("nan"), 0)], metrics=("kept_greedy",))[0]
    assert "kept_greedy" not in nothing


def test_a_study_of_new_facts_chooses_its_learning_rate_on_the_validation_questions(tiny_llama, tokenizer):
    from peft_lab import showdown
    facts = data.first_facts_task(4)
    runs = study.run(study.grid(["lora-all"], [1e-3, 1e-2], seeds=(0,), steps=2), tiny_llama, tokenizer, facts,
                     progress=False, sizes={"prose_tokens": 64})
    rows = study.summarize(runs)
    assert len(rows) == 2 and all(r["task"] == "fictional_facts_4" and "val_accuracy" in r for r in rows)
    assert all(run.metrics["val_n"] == 4 and run.metrics["test_n"] == len(facts.test) for run in runs)
    best = showdown.best_by_validation(rows, "lora-all", facts.name)
    assert best["val_accuracy"]["mean"] == max(r["val_accuracy"]["mean"] for r in rows)


def test_command_line_studies_the_first_facts_and_refuses_facts_without_the_facts_task(tiny_llama, tokenizer,
                                                                                       monkeypatch, capsys, count_fits):
    monkeypatch.setattr(study.models, "load", lambda *a, **k: (tiny_llama, tokenizer))
    study.main(["--task", "facts", "--facts", "5", "--recipes", "full", "--lrs", "1e-4", "--seeds", "0", "--dry-run"])
    assert capsys.readouterr().out.strip().startswith("to run ")
    loads = []
    monkeypatch.setattr(study.models, "load", lambda *a, **k: loads.append(1))
    with pytest.raises(SystemExit):
        study.main(["--task", "reviews", "--facts", "5", "--lrs", "1e-4", "--dry-run"])
    assert "--facts N goes with --task facts" in capsys.readouterr().err
    assert loads == [] and sum(count_fits.values()) == 0  # refused before the model loads
