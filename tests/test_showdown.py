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
    assert showdown.folder_bytes(tmp_path) == 0


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


def test_a_mixed_batch_answers_each_row_as_its_own_prompt_model_would(tiny_llama, tokenizer, task):
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
    assert "Of the 1 pairs" in second and "less far in 1" in second  # matched at 0.70: KL 0.010 < 0.030
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
