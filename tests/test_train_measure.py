"""The training loop, the run log and the measurements, on tiny models."""
import math

import pytest
import torch

from peft_lab import data, freeze, lora, measure, models, train

pytestmark = pytest.mark.usefixtures("isolated_run_log")  # `task` and the run log come from conftest.py


def test_fit_lowers_the_loss_and_is_reproducible(tiny_llama, tokenizer, task):
    a = train.fit(freeze.apply(models.fresh_copy(tiny_llama), "full", verbose=False), tokenizer, task,
                  steps=15, lr=1e-2, batch_size=4, progress=False)
    b = train.fit(freeze.apply(models.fresh_copy(tiny_llama), "full", verbose=False), tokenizer, task,
                  steps=15, lr=1e-2, batch_size=4, progress=False)
    assert a.losses == b.losses
    assert sum(a.losses[-3:]) / 3 < sum(a.losses[:3]) / 3
    assert len(a.step_seconds) == 15 and a.seconds_per_step > 0 and a.tokens_per_second > 0


def test_memory_breakdown_is_exact_for_adamw(tiny_llama, tokenizer, task):
    tuned = freeze.apply(models.fresh_copy(tiny_llama), "last_n", n=1, verbose=False)
    run = train.fit(tuned, tokenizer, task, steps=3, batch_size=4, progress=False)
    n_all = sum(p.numel() for p in {id(p): p for p in tuned.parameters()}.values())
    n_train = run.trainable_params
    assert run.memory["weights"] == 4 * n_all
    assert run.memory["gradients"] == 4 * n_train
    assert run.memory["optimizer"] == 8 * n_train + 4 * len(train.trainable_parameters(tuned))  # + step counters
    assert run.memory["activations"] > 0 and run.memory["process_peak"] > 0
    table = measure.memory_table(run)
    assert table["textbook prediction MiB"] == pytest.approx((4 * n_all + 12 * n_train) / 2 ** 20)


def test_activations_grow_with_the_batch(tiny_llama, tokenizer, task):
    small = train.fit(models.fresh_copy(tiny_llama), tokenizer, task, steps=2, batch_size=2, progress=False, log=False)
    large = train.fit(models.fresh_copy(tiny_llama), tokenizer, task, steps=2, batch_size=8, progress=False, log=False)
    assert large.memory["activations"] > small.memory["activations"]


def test_training_a_copy_leaves_the_base_untouched(tiny_gpt2, tokenizer, task):
    before = {k: v.clone() for k, v in tiny_gpt2.state_dict().items()}
    train.fit(models.fresh_copy(tiny_gpt2), tokenizer, task, steps=3, lr=1e-2, batch_size=4, progress=False)
    assert all(torch.equal(before[k], v) for k, v in tiny_gpt2.state_dict().items())


def test_fit_refuses_a_model_with_nothing_to_train(tiny_llama, tokenizer, task):
    for p in tiny_llama.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="Nothing to train"):
        train.fit(tiny_llama, tokenizer, task, steps=1, progress=False)


def test_run_log_round_trip_and_filters(tiny_llama, tokenizer, task):
    tuned = lora.apply(models.fresh_copy(tiny_llama), rank=2, alpha=4)
    run = train.fit(tuned, tokenizer, task, steps=2, batch_size=4, progress=False)
    assert run.method == "lora"
    measure.evaluate_run(run, tiny_llama, tuned, tokenizer, task, limit=4)
    latest = train.latest_run("lora", "tiny")
    assert latest.run_id == run.run_id and latest.metrics["accuracy"] == run.metrics["accuracy"]
    assert train.latest_run("prefix") is None
    assert train.load_runs(quick=not data.quick_mode()) == []


def test_accuracy_is_the_argmax_over_the_verbalizer(tiny_llama, tokenizer, task):
    result = measure.accuracy(tiny_llama, tokenizer, task, "test")
    assert result["n"] == len(task.test)
    # computed here independently: the full logits at each review's last token, argmax over the label words
    verbal = data.verbalizer_ids(task, tokenizer)
    predictions = []
    with torch.no_grad():
        for text, _ in task.test:
            ids = torch.tensor([tokenizer(task.prompt(text), add_special_tokens=False).input_ids])
            logits = tiny_llama(input_ids=ids).logits[0, -1]
            predictions.append(task.labels[int(logits[verbal].argmax())])
    assert result["predictions"] == predictions
    assert result["accuracy"] == sum(p == label for p, (_, label) in zip(predictions, task.test)) / len(task.test)


def _probes_the_model_knows(model, tokenizer):
    """Probes whose 'right answer' is the model's own greedy word, so the base knows them all."""
    probes = []
    for prompt in ["the capital of france is", "water boils at", "the film was", "i loved this"]:
        ids = torch.tensor([tokenizer(prompt).input_ids])
        word = tokenizer.convert_ids_to_tokens(int(model(input_ids=ids).logits[0, -1].argmax()))
        probes.append({"prompt": prompt, "answer": word, "topic": "test"})
    return probes


def test_forgetting_is_zero_for_the_model_itself(tiny_llama, tokenizer):
    probes = _probes_the_model_knows(tiny_llama, tokenizer)
    prose = "the film was great and the food was bad . " * 20
    same = measure.forgetting(tiny_llama, tiny_llama, tokenizer, probes=probes, prose=prose)
    assert same["probes_known_by_base"] == len(probes)
    assert same["kept_greedy"] == 1.0 and same["kept_logprob"] == 1.0
    assert same["kl"] == pytest.approx(0.0, abs=1e-6)
    assert same["ppl_base"] == pytest.approx(same["ppl_tuned"])


def test_forgetting_grows_when_the_model_is_changed(tiny_llama, tokenizer):
    probes = _probes_the_model_knows(tiny_llama, tokenizer)
    prose = "the film was great and the food was bad . " * 20
    changed = models.fresh_copy(tiny_llama)
    with torch.no_grad():
        for p in changed.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    result = measure.forgetting(tiny_llama, changed, tokenizer, probes=probes, prose=prose)
    assert result["kl"] > 0.01
    assert result["answer_logprob_drop"] > 0  # the right answers got less likely
    assert result["ppl_tuned"] > result["ppl_base"]


def test_greedy_probe_scoring_matches_generation(tiny_llama, tokenizer):
    probes = _probes_the_model_knows(tiny_llama, tokenizer)
    scores = measure.score_probes(tiny_llama, tokenizer, probes)
    assert all(s["greedy_right"] for s in scores)
    assert all(s["logprob"] <= 0 and math.isfinite(s["logprob"]) for s in scores)


def test_wilson_interval():
    low, high = measure.wilson(142, 160)  # 88.75 %
    assert low < 142 / 160 < high
    assert (round(low, 3), round(high, 3)) == (0.829, 0.928)
    assert measure.wilson(0, 10)[0] == 0.0 and measure.wilson(10, 10)[1] == 1.0
    assert measure.wilson(600, 1200)[1] - measure.wilson(600, 1200)[0] < measure.wilson(50, 100)[1] - measure.wilson(50, 100)[0]


def test_verdict_wording_follows_the_intervals():
    def acc(k, n):
        return {"accuracy": k / n, "n": n}
    assert measure.verdict(acc(90, 100), acc(60, 100)) == "higher"
    assert measure.verdict(acc(60, 100), acc(90, 100)) == "lower"
    assert measure.verdict(acc(90, 100), acc(88, 100)) == "no measurable difference"  # overlapping intervals
    assert measure.verdict({"accuracy": 0.95, "test_n": 600}, acc(520, 600)) == "higher"  # a run's metrics work too


def test_paired_verdict_sees_a_difference_that_overlapping_intervals_hide():
    # 640 shared items: a right on 548 (85.6 %), b on 579 (90.5 %); b alone right on 40, a alone on 9
    a = "1" * 539 + "1" * 9 + "0" * 40 + "0" * 52
    b = "1" * 539 + "0" * 9 + "1" * 40 + "0" * 52
    run_a = {"accuracy": a.count("1") / 640, "test_n": 640, "test_correct": a, "test_items": "x"}
    run_b = {"accuracy": b.count("1") / 640, "test_n": 640, "test_correct": b, "test_items": "x"}
    unpaired = [{k: v for k, v in r.items() if k != "test_correct"} for r in (run_a, run_b)]
    assert measure.verdict(*unpaired) == "no measurable difference"  # the 95 % intervals overlap
    assert measure.paired_counts(run_a, run_b) == (9, 40)
    assert measure.paired_test(9, 40) < 0.001
    assert measure.verdict(run_a, run_b) == "lower" and measure.verdict(run_b, run_a) == "higher"
    # other items: no pairing, back to the intervals
    assert measure.verdict(run_a, dict(run_b, test_items="y")) == "no measurable difference"
    # a few disagreements either way: no measurable difference, though the accuracies differ
    c = "1" * 539 + "1" * 3 + "0" * 8 + "0" * 90
    d = "1" * 539 + "0" * 3 + "1" * 8 + "0" * 90
    assert measure.paired_test(3, 8) > 0.05
    assert measure.verdict({"accuracy": 0, "n": 640, "correct": c, "items": "x"},
                           {"accuracy": 1, "n": 640, "correct": d, "items": "x"}) == "no measurable difference"
    assert measure.paired_test(0, 0) == 1.0
    assert measure.paired_test(0, 6) == pytest.approx(2 / 64)  # exact binomial, two-sided


def test_accuracy_and_forgetting_keep_right_and_wrong_per_item(tiny_llama, tokenizer, task):
    result = measure.accuracy(tiny_llama, tokenizer, task, "test")
    assert len(result["correct"]) == result["n"] and result["correct"].count("1") == round(result["accuracy"] * result["n"])
    assert result["items"] == measure.accuracy(tiny_llama, tokenizer, task, "test")["items"]
    assert result["items"] != measure.accuracy(tiny_llama, tokenizer, task, "val")["items"]
    assert measure.verdict(result, result) == "no measurable difference"
    # and a verdict that can go the other way: the same items, one run right far more often
    better = {**result, "correct": "1" * result["n"], "accuracy": 1.0}
    worse = {**result, "correct": "0" * result["n"], "accuracy": 0.0}
    assert result["n"] >= 8  # enough items for an exact paired test to reach 5 %
    assert measure.verdict(better, worse) == "higher" and measure.verdict(worse, better) == "lower"
    forgot = measure.forgetting(tiny_llama, tiny_llama, tokenizer, prose_tokens=256)
    assert forgot["kept_greedy_bits"] == "1" * forgot["probes_known_by_base"]


def test_lr_scale_gives_lora_b_its_own_learning_rate(tiny_llama, tokenizer, task):
    tuned = lora.apply(models.frozen_copy(tiny_llama), rank=2, targets=["q_proj", "v_proj"])
    run = train.fit(tuned, tokenizer, task, steps=1, lr=1e-3, lr_scale={"lora_B": 16}, progress=False, log=False)
    assert run.config["lr_scale"] == {"lora_B": 16}
    groups = train._param_groups(tuned, train.trainable_parameters(tuned), 1e-3, {"lora_B": 16})
    assert sorted(g["lr"] for g in groups) == [1e-3, 16e-3]
    with pytest.raises(ValueError, match="no trainable parameter"):
        train._param_groups(tuned, train.trainable_parameters(tuned), 1e-3, {"lora_C": 2})


def test_compare_reads_kl_and_probe_intervals_the_right_way_round():
    def kl(value, low, high):
        return {"kl": value, "kl_low": low, "kl_high": high}
    assert measure.compare(kl(0.09, 0.07, 0.11), kl(0.005, 0.004, 0.006), "kl") == "higher"
    assert measure.compare(kl(0.005, 0.004, 0.006), kl(0.09, 0.07, 0.11), "kl") == "lower"
    assert measure.compare(kl(0.010, 0.006, 0.014), kl(0.012, 0.009, 0.015), "kl") == "no measurable difference"
    kept = lambda share: {"kept_greedy": share, "probes_known_by_base": 132}
    assert measure.compare(kept(0.99), kept(0.80), "kept_greedy") == "higher"
    assert measure.compare(kept(0.99), kept(0.97), "kept_greedy") == "no measurable difference"
    with pytest.raises(ValueError, match="No interval"):
        measure.compare({"ppl_tuned": 17.0}, {"ppl_tuned": 18.0}, "ppl_tuned")


def test_mean_interval_over_seeds_and_its_verdict():
    seeds = measure.mean_interval([0.90, 0.92, 0.91])
    assert seeds["n"] == 3 and seeds["low"] < 0.91 < seeds["high"]
    # t with 2 degrees of freedom (4.303), not the normal 1.96: three seeds give a wide interval
    assert seeds["high"] - seeds["mean"] == pytest.approx(4.303 * 0.01 / math.sqrt(3))
    assert measure.mean_interval([0.5])["low"] == measure.mean_interval([0.5])["high"] == 0.5
    far = measure.mean_interval([0.70, 0.71, 0.72])
    assert measure.compare(seeds, far) == "higher" and measure.compare(far, seeds) == "lower"
    assert measure.compare(seeds, measure.mean_interval([0.89, 0.93, 0.91])) == "no measurable difference"
    with pytest.raises(ValueError):
        measure.mean_interval([])


def test_drift_sentence_names_the_run_that_moved_further(tiny_llama, tokenizer, task):
    a = train.fit(freeze.apply(models.fresh_copy(tiny_llama), "full", verbose=False), tokenizer, task,
                  steps=1, batch_size=4, progress=False, log=False, label="hot")
    b = train.fit(freeze.apply(models.fresh_copy(tiny_llama), "full", verbose=False), tokenizer, task,
                  steps=1, batch_size=4, progress=False, log=False, label="careful")
    a.metrics = {"kl": 0.09, "kl_low": 0.07, "kl_high": 0.11}
    b.metrics = {"kl": 0.005, "kl_low": 0.004, "kl_high": 0.006}
    assert measure.drift_sentence(a, b).startswith("hot drifted further from the base than careful")
    assert measure.drift_sentence(b, a).startswith("hot drifted further from the base than careful")
    b.metrics = {"kl": 0.08, "kl_low": 0.06, "kl_high": 0.10}
    assert "no measurable difference" in measure.drift_sentence(a, b)


def test_forgetting_reports_a_kl_interval_that_contains_the_kl(tiny_llama, tokenizer):
    tuned = models.fresh_copy(tiny_llama)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    stats = measure.prose_stats(tiny_llama, tuned, tokenizer, data.load_prose(), 1024)
    assert 0 <= stats["kl_low"] <= stats["kl"] <= stats["kl_high"]
    assert stats["kl_high"] > stats["kl_low"]  # several chunks of prose: a spread to measure


def test_fit_records_the_label_word_loss_beside_the_full_loss(tiny_llama, tokenizer, task):
    run = train.fit(freeze.apply(models.fresh_copy(tiny_llama), "full", verbose=False), tokenizer, task,
                    steps=4, batch_size=4, progress=False, log=False)
    assert len(run.label_losses) == len(run.losses) == 4
    # two label words compete in one, the whole vocabulary in the other: the label-word loss is smaller
    assert all(lw <= full + 1e-6 for lw, full in zip(run.label_losses, run.losses))
    result = measure.accuracy(tiny_llama, tokenizer, task, "test")
    assert result["loss_label_words"] <= result["loss_full_vocabulary"]
    assert 0 < result["label_word_mass"] <= 1


def test_the_base_logprob_cache_notices_a_changed_base(tiny_llama, tokenizer):
    base = models.fresh_copy(tiny_llama)
    prose = data.load_prose()
    first = measure.prose_stats(base, tiny_llama, tokenizer, prose, 512)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        next(base.parameters()).add_(0.5)  # an in-place change: the cached log-probabilities must not be reused
    again = measure.prose_stats(base, tiny_llama, tokenizer, prose, 512)
    fresh = measure.prose_stats(models.fresh_copy(base), tiny_llama, tokenizer, prose, 512)
    assert again["kl"] == pytest.approx(fresh["kl"]) and again["kl"] > 1e-4


def test_versus_reads_as_a_sentence():
    hi, lo = {"accuracy": 0.9, "n": 600}, {"accuracy": 0.5, "n": 600}
    assert measure.versus(hi, lo, "zero-shot") == "higher than zero-shot"
    assert measure.versus(lo, hi, "zero-shot") == "lower than zero-shot"
    assert measure.versus(hi, hi, "before") == "no measurable difference from before"


def test_fit_prints_one_summary_line_when_progress_is_on(tiny_llama, tokenizer, task, isolated_run_log, capsys):
    from peft_lab import lora, train

    run = train.fit(lora.apply(tiny_llama, rank=2), tokenizer, task, steps=3, lr=1e-3, tag="lora", label="lora r=2, lr 1e-3")
    # the line names the run by its label, so runs of one method with different settings read apart
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("training ")]
    assert lines == [f"training lora r=2, lr 1e-3: 3 steps, {run.seconds_per_step:.2f} s/step, "
                     f"loss {run.losses[0]:.2f} → {run.losses[-1]:.2f}"]
    train.fit(tiny_llama, tokenizer, task, steps=2, lr=1e-3, progress=False)
    assert "training" not in capsys.readouterr().out


def test_the_summary_line_of_an_interrupted_run_says_how_far_it_got():
    from peft_lab import train
    from peft_lab.runlog import RunRecord

    record = RunRecord(method="lora", task="tiny", config={}, trainable_params=1, total_params=1)
    assert train._summary_line("lora", record, 60) == "training lora: stopped before the first of 60 steps"
    record.losses, record.step_seconds = [4.91, 3.5], [1.0, 1.3]
    assert train._summary_line("lora", record, 60) == "training lora: stopped after 2 of 60 steps, 1.30 s/step, loss 4.91 → 3.50"


def test_the_summary_line_averages_the_loss_over_a_few_steps_of_a_long_run():
    from peft_lab import train
    from peft_lab.runlog import RunRecord

    record = RunRecord(method="lora", task="tiny", config={}, trainable_params=1, total_params=1)
    record.losses = [5.0, 4.0, 5.0, 4.0, 5.0] + [1.0] * 10 + [0.5, 0.1, 0.5, 0.1, 0.3]  # 20 steps: 5 at each end
    record.step_seconds = [1.0] * 20
    assert train._summary_line("lora", record, 20).endswith("loss 4.60 → 0.30 (means of the first and last 5 steps)")
    record.label_losses = [0.8] * 5 + [0.1] * 15
    assert record.loss_start_end(label_words=True) == (0.8, 0.1, 5)   # the label-word loss, read the same way
    record.label_losses = []
    with pytest.raises(ValueError, match="no label-word losses"):
        record.loss_start_end(label_words=True)


def test_saved_activations_of_a_network_small_enough_to_count_by_hand():
    # x (5 x 4) -> Linear(4, 3) -> ReLU -> Linear(3, 2), every weight trainable, fp32. Autograd keeps:
    #   the first linear's input x, for its weight's gradient:             5 * 4 * 4 B = 80 B
    #   ReLU's output (for its own backward, and the same tensor is the second linear's input): 5 * 3 * 4 B = 60 B
    # and no weight (the weights are parameters, not activations). By hand: 140 bytes.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    x = torch.randn(5, 4)
    with train.count_saved_activations(list(net.parameters())) as saved:
        loss = net(x).sum()
    loss.backward()
    assert saved["bytes"] == 140 and saved["weight_cast_bytes"] == 0
    # freeze the first linear: its input is no longer needed (nothing upstream wants a gradient), 60 B remain
    net[0].requires_grad_(False)
    with train.count_saved_activations([p for p in net.parameters() if p.requires_grad]) as saved:
        loss = net(x).sum()
    loss.backward()
    assert saved["bytes"] == 60
