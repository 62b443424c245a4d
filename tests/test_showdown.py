"""Notebook 05's measurements on tiny models: checkpoints on disk, adapter swaps on one base, a batch of mixed
tasks behind per-row soft prompts, storage arithmetic, the learning rate picked on validation, and the
frontier's sentences from seed means."""
import pytest
import torch

from peft_lab import data, measure, models, showdown, train
from peft_lab.methods import freeze, lora, prompt

pytestmark = pytest.mark.usefixtures("isolated_run_log")  # `task` and the run log come from conftest.py


def test_checkpoints_hold_what_each_method_trained(tiny_llama, tmp_path):
    adapter = showdown.checkpoint_bytes(lora.apply(models.frozen_copy(tiny_llama), rank=2, targets=["q_proj"]))
    soft = showdown.checkpoint_bytes(prompt.apply(tiny_llama, 4))
    last = showdown.checkpoint_bytes(freeze.apply(models.fresh_copy(tiny_llama), "last_n", n=1, verbose=False))
    full = showdown.checkpoint_bytes(freeze.apply(models.fresh_copy(tiny_llama), "full", verbose=False))
    numbers = sum(p.numel() for p in tiny_llama.parameters())
    assert full >= 4 * numbers  # every fp32 weight, plus the config
    assert soft < adapter < full and last < full
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_bytes(b"y" * 24)
    assert showdown.folder_bytes(tmp_path) == 1024  # every file, in subfolders too


def test_swapping_adapters_gives_each_its_own_accuracy_and_leaves_the_base_alone(tiny_llama, tokenizer, task, tmp_path):
    negated = data.Task("flipped", [(t, "negative" if y == "positive" else "positive") for t, y in task.train],
                        task.val, [(t, "negative" if y == "positive" else "positive") for t, y in task.test],
                        task.verbalizer, task.template)
    tasks = {"tiny": task, "flipped": negated}
    before = [p.detach().clone() for p in tiny_llama.parameters()]
    adapters = showdown.train_lora_adapters(tiny_llama, tokenizer, tasks, tmp_path, steps=3, lr=1e-2)
    alone = {}
    for name, (folder, _) in adapters.items():
        lora.load(tiny_llama, folder)
        alone[name] = measure.accuracy(tiny_llama, tokenizer, tasks[name])["accuracy"]
        lora.remove(tiny_llama)
    swaps = showdown.swap_and_measure(tiny_llama, tokenizer, adapters, tasks, limit=None, rounds=2)
    for name in tasks:
        assert swaps[name]["accuracy"] == [alone[name]] * 2
        assert swaps[name]["swap_s"] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_llama.parameters()))
    assert not lora.lora_layers(tiny_llama)


def test_a_mixed_batch_answers_each_row_as_its_own_prompt_model_would(tiny_llama, tokenizer, task, monkeypatch):
    # fp32, to check the maths to 1e-4: under bf16 autocast (a CPU with bf16 arithmetic) batches of other shapes
    # round differently, by about 1e-3
    monkeypatch.setenv(models.PRECISION_ENV, "fp32")
    other = data.Task("other", task.train, task.val, task.test, task.verbalizer, "Sentiment of this film: {text} Sentiment:")
    tasks = {"tiny": task, "other": other}
    prompts = {}
    for i, name in enumerate(tasks):
        torch.manual_seed(i)
        prompts[name] = prompt.apply(tiny_llama, 3)  # two different random prompts
    out = showdown.mixed_batch_check(tiny_llama, tokenizer, prompts, tasks, per_task=3)
    assert out["rows"] == 6 and out["max_abs_diff"] < 1e-4 and out["same_answers"]
    # and the check can fail: the same prompt for every row differs from the per-row answers
    batch = data.encode(task.test[:3] + other.test[:3], task, tokenizer)
    one = showdown.mixed_prompt_label_logits(tiny_llama, [prompts["tiny"].prompt] * 6, batch)
    mixed = showdown.mixed_prompt_label_logits(tiny_llama, [prompts["tiny"].prompt] * 3 + [prompts["other"].prompt] * 3, batch)
    assert (one[3:] - mixed[3:]).abs().max() > 1e-4
    assert torch.allclose(one[:3], mixed[:3], atol=1e-5)


def test_storage_table_scales_measured_sizes():
    rows = showdown.storage_table(full_bytes=100 * 2**20, adapter_bytes={"a": 2**20, "b": 3 * 2**20}, base_bytes=100 * 2**20)
    assert rows[0] == {"tasks": 2, "N full checkpoints (MiB)": 200, "base + N adapters (MiB)": 104}
    assert rows[1]["N full checkpoints (MiB)"] == 10_000 and rows[1]["base + N adapters (MiB)"] == 100 + 100 * 2


def _row(recipe, lr, acc, kl, val=None):
    def mean(m, half):
        return {"mean": m, "low": m - half, "high": m + half, "n": 3}
    return {"recipe": recipe, "lr": lr, "task": "t", "seeds": 3, "accuracy": mean(acc, 0.02),
            "val_accuracy": mean(acc if val is None else val, 0.02), "kl": mean(kl, 0.001)}


def test_the_learning_rate_is_chosen_on_validation_not_test():
    rows = [_row("lora-all", 1e-4, acc=0.90, kl=0.01, val=0.70), _row("lora-all", 1e-3, acc=0.80, kl=0.02, val=0.85)]
    assert showdown.best_by_validation(rows, "lora-all", "t")["lr"] == 1e-3
    with pytest.raises(ValueError, match="No runs"):
        showdown.best_by_validation(rows, "prompt", "t")


def test_frontier_sentences_follow_the_numbers():
    rows = [_row("lora-all", 1e-4, 0.70, 0.010), _row("lora-all", 1e-3, 0.80, 0.020),
            _row("full", 1e-5, 0.70, 0.030), _row("full", 1e-4, 0.90, 0.050)]
    first, second = showdown.frontier_verdicts(rows, "lora-all", "full", "t")
    assert "lower than full fine-tuning" in first          # 0.80 +- 0.02 against 0.90 +- 0.02
    assert "lower than full fine-tuning (0.0200 vs 0.0500)" in first  # and it drifted less
    assert "Of the 1 pair of" in second and "less far in 1" in second  # matched at 0.70: KL 0.010 < 0.030
    overlapping = [_row("lora-all", 1e-3, 0.80, 0.020), _row("full", 1e-4, 0.81, 0.0205)]
    first, second = showdown.frontier_verdicts(overlapping, "lora-all", "full", "t")
    assert "no measurable difference from full fine-tuning" in first
    assert "no measurably different in 1" in second
    apart = [_row("lora-all", 1e-3, 0.60, 0.020), _row("full", 1e-4, 0.90, 0.05)]
    assert "cannot compare their forgetting" in showdown.frontier_verdicts(apart, "lora-all", "full", "t")[1]


def test_frontier_sentences_report_probes_kept_beside_the_kl():
    def with_kept(row, share):
        return dict(row, kept_greedy={"mean": share, "low": share - 0.05, "high": share + 0.05, "n": 3})
    rows = [with_kept(_row("lora-all", 1e-3, 0.80, 0.020), 0.79), with_kept(_row("full", 1e-4, 0.81, 0.0205), 0.97)]
    lines = showdown.frontier_verdicts(rows, "lora-all", "full", "t")
    assert "probes it kept (greedy) was lower than full fine-tuning (79.0%" in lines[0]  # KL alone would hide this
    assert len(lines) == 3 and "kept more of the base's probes in 0, fewer in 1" in lines[2]


def test_time_to_accuracy_counts_training_seconds_and_reports_a_miss(tiny_llama, tokenizer, task):
    out = showdown.time_to_accuracy("lora-qv", 1e-2, tiny_llama, tokenizer, task, target=2.0, steps=4, every=2, val_limit=None)
    assert [round(s, 6) >= 0 for s, _ in out["curve"]] == [True, True] and out["seconds_to_target"] is None
    reached = showdown.time_to_accuracy("lora-qv", 1e-2, tiny_llama, tokenizer, task, target=0.0, steps=2, every=1, val_limit=None)
    assert reached["seconds_to_target"] == reached["curve"][0][0]


def test_a_skipped_grid_is_costed_from_the_measured_seconds_per_step():
    from peft_lab import study
    rows = [dict(_row("full", 1e-4, 0.8, 0.01), s_per_step={"mean": 3.0}),
            dict(_row("full", 1e-5, 0.7, 0.01), s_per_step={"mean": 5.0}),
            dict(_row("lora-all", 1e-3, 0.8, 0.01), s_per_step={"mean": 2.0})]
    points = study.grid(["full", "lora-all"], {"full": [1e-4], "lora-all": [1e-3, 3e-3]}, seeds=(0, 1), steps=60)
    # full: 2 runs x 60 steps x 4 s (the mean of its rows); LoRA: 4 runs x 60 x 2 s
    assert showdown.training_minutes(points, rows) == pytest.approx((2 * 60 * 4 + 4 * 60 * 2) / 60)
    with pytest.raises(ValueError, match="No measured seconds per step for \\['prompt'\\]"):
        showdown.training_minutes(study.grid(["prompt"], [1e-2], seeds=(0,)), rows)


def test_time_to_accuracy_over_seeds_averages_the_seeds_that_reached_the_target(tiny_llama, tokenizer, task):
    out = showdown.time_to_accuracy_over_seeds("lora-qv", 1e-2, tiny_llama, tokenizer, task, target=0.0, steps=2,
                                               every=1, val_limit=None, seeds=(0, 1))
    assert out["reached"] == out["seeds"] == 2 and [r["lr"] for r in out["runs"]] == [1e-2, 1e-2]
    firsts = [r["curve"][0][0] for r in out["runs"]]
    assert out["seconds"]["mean"] == pytest.approx(sum(firsts) / 2) and out["seconds"]["n"] == 2
    missed = showdown.time_to_accuracy_over_seeds("lora-qv", 1e-2, tiny_llama, tokenizer, task, target=2.0, steps=2,
                                                  every=1, val_limit=None, seeds=(0,))
    assert missed["reached"] == 0 and missed["seconds"] is None


def test_time_sentences_follow_the_numbers_and_skip_seeds_that_missed():
    def result(recipe, mean, half, reached=3):
        return {"recipe": recipe, "reached": reached, "seeds": 3,
                "seconds": {"mean": mean, "low": mean - half, "high": mean + half, "n": reached}}
    sooner = showdown.time_verdict(result("lora-all", 6, 1), result("full", 19, 2))
    assert sooner.startswith("LoRA r=8 (all linear) reached the target sooner than full fine-tuning (6 s [5, 7] against 19 s")
    assert "later than" in showdown.time_verdict(result("full", 19, 2), result("lora-all", 6, 1))
    assert "no measurable difference" in showdown.time_verdict(result("lora-all", 10, 5), result("full", 12, 5))
    missed = showdown.time_verdict(result("lora-all", 6, 1, reached=2), result("full", 19, 2))
    assert "in 2 of 3 seeds" in missed and "not compared" in missed
