"""Reliability: the run log keeps runs apart and survives damage and concurrent writers; training stops
clearly on a non-finite loss and can be interrupted; bad inputs get clear errors."""
import json
import multiprocessing

import pytest
import torch

from peft_lab import freeze, lora, methods, models, runlog, train
from tests.conftest import base_for, make_tiny_llama, make_tiny_task


@pytest.fixture
def log(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_LAB_RUNLOG", str(tmp_path / "runs.jsonl"))
    return tmp_path / "runs.jsonl"


def _record(method="full", lr=2e-5, label="", tag="", **kw):
    return runlog.RunRecord(method=method, task="tiny", config={"lr": lr, "steps": 3, **kw},
                            trainable_params=1, total_params=2, quick=True, label=label, tag=tag)


def test_labels_carry_the_settings():
    assert _record().label == "full, lr 2e-5"
    assert _record("lora", 2e-4, rank=8, targets=["q_proj", "v_proj"]).label == "lora r=8 q_proj,v_proj, lr 2e-4"
    assert _record(label="mine").label == "mine"


def test_lookup_by_settings_keeps_runs_apart(log):
    careful, hot = _record(lr=2e-5), _record(lr=1e-4)
    runlog.save_run(careful)
    runlog.save_run(hot)
    panel = _record(lr=3e-4, tag="freeze full")  # the same method, trained as something else (a panel's run)
    runlog.save_run(panel)
    assert panel.method == "full" and panel.label == "freeze full, lr 3e-4"
    assert runlog.latest_run("full", "tiny").run_id == hot.run_id
    assert runlog.latest_run("full", "tiny", lr=2e-5).run_id == careful.run_id
    assert runlog.latest_run("full", "tiny", lr=3e-4) is None
    assert runlog.load_runs("full", model="another model") == []
    assert [r.run_id for r in runlog.load_runs(method="full")] == [careful.run_id, hot.run_id, panel.run_id]


def test_method_tag_and_label_each_have_one_meaning(tiny_llama, tokenizer, log):
    task = make_tiny_task()
    # the method is read from the model whatever the run is called; the tag is what the caller named it
    frozen = freeze.apply(models.fresh_copy(tiny_llama), "attention", verbose=False)
    run = train.fit(frozen, tokenizer, task, steps=1, lr=1e-3, progress=False, tag="attention only")
    assert (run.method, run.tag) == ("freeze:attention", "attention only")
    assert run.label.startswith("attention only") and run.label.endswith("lr 1e-3")
    plain = train.fit(lora.apply(models.frozen_copy(tiny_llama), rank=2), tokenizer, task, steps=1, lr=1e-3,
                      progress=False)
    assert (plain.method, plain.tag) == ("lora", "lora")  # no tag given: the method word
    assert [r.tag for r in runlog.load_runs(method="lora")] == ["lora"]


def test_lines_from_before_runs_had_a_tag_are_read_with_the_method_they_trained(log):
    def old_line(word, **config):
        row = _record(lr=1e-3, **config).to_dict()
        del row["tag"]
        return json.dumps({**row, "method": word, "label": ""}) + "\n"
    log.write_text(old_line("study:lora-qv", rank=8) + old_line("freeze attention", choice="attention")
                   + old_line("lora r=4 (sweep)", rank=4) + old_line("prefix") + old_line("showdown:time:prompt"))
    runs = runlog.load_runs()
    assert [(r.method, r.tag) for r in runs] == [
        ("lora", "study:lora-qv"), ("freeze:attention", "freeze attention"), ("custom", "lora r=4 (sweep)"),
        ("prefix", "prefix"), ("prompt", "showdown:time:prompt")]
    assert runs[2].label == "lora r=4 (sweep) r=4, lr 1e-3"  # labelled by the same rule as before
    assert runlog.latest_run("study:lora-qv", "tiny").method == "lora"


@pytest.mark.parametrize("recipe", ["full", "last-2-blocks", "lora-qv", "lora-all", "prefix", "prompt"])
def test_each_recipes_method_word_is_the_one_its_model_carries(tiny_llama, tokenizer, recipe):
    from peft_lab import recipes

    tuned = recipes.BUILD[recipe](tiny_llama, tokenizer, "tiny")
    info = getattr(tuned, "peft_lab_info", None) or tuned.base_model.peft_lab_info
    assert set(recipes.METHODS) == set(recipes.BUILD) and info["method"] == recipes.METHODS[recipe]


def test_a_broken_line_is_skipped_with_a_warning(log):
    runlog.save_run(_record())
    with open(log, "a", encoding="utf-8") as f:
        f.write('{"method": "full", "task": "ti\n')        # a crash mid-write
        f.write(json.dumps({"unexpected": 1}) + "\n")      # a hand edit
    runlog.save_run(_record(lr=1e-4))
    with pytest.warns(UserWarning, match="skipped unreadable line 2 .*line 3"):
        runs = runlog.load_runs()
    assert [r.config["lr"] for r in runs] == [2e-5, 1e-4]


def _append_many(path, worker):
    import os

    os.environ["PEFT_LAB_RUNLOG"] = path
    for i in range(50):
        runlog.save_run(_record(lr=float(worker * 100 + i), padding="x" * 5000))


def test_two_processes_appending_lose_nothing(log):
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_append_many, args=(str(log), w)) for w in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    runs = runlog.load_runs()
    assert len(runs) == 100 and len({r.config["lr"] for r in runs}) == 100


def test_a_non_finite_loss_stops_with_the_likely_cause(tiny_llama, tokenizer, log):
    tuned = freeze.apply(models.fresh_copy(tiny_llama), "full", verbose=False)
    with torch.no_grad():
        tuned.get_input_embeddings().weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="learning rate .* too high"):
        train.fit(tuned, tokenizer, make_tiny_task(), steps=2, progress=False)


def test_interrupting_training_keeps_the_model_usable(tiny_llama, tokenizer, log):
    base_state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    tuned = lora.apply(models.frozen_copy(tiny_llama), rank=2, targets=["q_proj", "v_proj"])

    def interrupt(record):
        if len(record.losses) == 2:
            raise KeyboardInterrupt

    run = train.fit(tuned, tokenizer, make_tiny_task(), steps=5, progress=False, on_step=interrupt)
    assert len(run.losses) == 2 and run.config["interrupted_after_steps"] == 2
    assert runlog.load_runs() == []  # a partial run never stands in for a full one
    assert not tuned.training
    tuned(input_ids=torch.tensor([[4, 5, 6]]))  # still usable
    assert all(torch.equal(base_state[k], v) for k, v in tiny_llama.state_dict().items())


def test_seeded_runs_repeat_exactly(tiny_llama, tokenizer, log):
    def losses():
        torch.manual_seed(0)  # the adapter's random start comes from the global generator: seed it first
        tuned = lora.apply(models.frozen_copy(tiny_llama), rank=2, targets=["q_proj", "v_proj"], init="gaussian")
        return train.fit(tuned, tokenizer, make_tiny_task(), steps=3, seed=3, progress=False, log=False).losses
    assert losses() == losses()


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="Known methods: lora"):
        methods.get("lorax")


@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_more_virtual_tokens_than_the_context_is_refused(name, tiny_llama):
    with pytest.raises(ValueError, match="whole context of 128"):
        methods.get(name).apply(tiny_llama, num_virtual_tokens=500)


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_rank_must_be_positive(name, tiny_llama):
    with pytest.raises(ValueError, match="rank must be a whole number of at least 1"):
        methods.get(name).apply(tiny_llama, rank=0, targets=["q_proj"])


@pytest.mark.parametrize("name", methods.names())
def test_a_truncated_weights_file_is_a_clear_error(name, tiny_llama, tmp_path):
    module = methods.get(name)
    settings = {"lora": {"rank": 2, "targets": ["q_proj"]}, "dora": {"rank": 2, "targets": ["q_proj"]},
                "prefix": {"num_virtual_tokens": 2}, "prompt": {"num_virtual_tokens": 2}}.get(name, {})
    folder = module.save(module.apply(base_for(name, make_tiny_llama()), **settings), tmp_path / "adapter")
    weights = next(p for p in folder.iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(ValueError, match="damaged|truncated|corrupt"):
        module.load(base_for(name, tiny_llama), folder)
