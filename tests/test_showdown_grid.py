"""The showdown's shipped grid and the verdicts built on it: one grid definition shared with the shell script,
runs read from a shipped log (and the missing ones named), comparisons paired seed by seed, what would separate
two methods, the promises' verdicts and the "which method when" lines, and the figures drawn from them."""
import math
import random
import re
import shlex
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

from peft_lab import plots, promises, recipes, runlog, showdown_grid, stats, study  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _script_grid():
    """part -> recipe -> (learning rates, steps, train sizes), read from results/showdown_grid.sh."""
    found = {}
    for line in (ROOT / "results" / "showdown_grid.sh").read_text().splitlines():
        if '"${STUDY[@]}"' not in line or line.strip().startswith("#"):
            continue
        words = shlex.split(line.replace('"${STUDY[@]}"', "").replace('"$seed"', "0"))
        args, key = {}, None
        for w in words:
            if w.startswith("--"):
                key = w[2:]
                args[key] = []
            else:
                args[key].append(w)
        part = "facts" if args["task"] == ["facts"] else "low_data" if "train-sizes" in args else "review"
        for recipe in args["recipes"]:
            found.setdefault(part, {})[recipe] = ([float(x) for x in args["lrs"]], int(args["steps"][0]),
                                                  tuple(int(x) for x in args.get("train-sizes", [])) or (None,))
    return found


def test_the_shell_script_runs_the_grid_the_notebook_reads():
    script = _script_grid()
    assert set(script) == set(showdown_grid.GRID)
    for part, spec in showdown_grid.GRID.items():
        assert set(script[part]) == set(spec["lrs"]), part
        for recipe, lrs in spec["lrs"].items():
            assert script[part][recipe] == (lrs, spec["steps"], spec["train_sizes"]), (part, recipe)
    seeds = re.search(r"for seed in ([\d ]+); do", (ROOT / "results" / "showdown_grid.sh").read_text()).group(1).split()
    assert all(tuple(map(int, seeds)) == spec["seeds"] for spec in showdown_grid.GRID.values())


def _record(recipe, lr, seed, task_name, correct, steps=60, kl=0.1):
    return runlog.RunRecord(
        method=recipes.METHODS[recipe], tag=f"study:{recipe}", task=task_name, config={"lr": lr, "seed": seed, "steps": steps},
        trainable_params=10, total_params=100, step_seconds=[1.0, 0.5, 0.5],
        memory={"weights": 400, "gradients": 40, "optimizer": 80, "activations": 100},
        metrics={"accuracy": correct.count("1") / len(correct), "test_n": len(correct), "test_correct": correct,
                 "test_items": "same", "kl": kl, "val_accuracy": 0.5, "val_n": 10},
        model="tiny-test", provenance={"machine": "a test machine", "precision": "fp32", "torch": "x",
                                       "code_version": "v1", "threads": 1, "wall_seconds": 60.0})


def test_runs_are_read_from_a_shipped_log_and_the_missing_ones_named(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped.jsonl"
    monkeypatch.setenv("PEFT_LAB_RUNLOG", str(shipped))   # written as the grid script writes it
    runlog.save_run(_record("full", 1e-5, 0, "review_domain", "1100"))
    runlog.save_run(_record("prompt", 3e-2, 2, "review_domain", "1000"))
    monkeypatch.setenv("PEFT_LAB_RUNLOG", str(tmp_path / "mine.jsonl"))  # the user's own log stays apart
    runs, missing = showdown_grid.from_shipped("review", "tiny-test", path=shipped)
    assert {(r.tag, r.method, r.config["seed"]) for r in runs} == {("study:full", "full", 0), ("study:prompt", "prompt", 2)}
    assert len(missing) == len(showdown_grid.points("review")) - 2
    assert all(isinstance(p, study.Point) for p in missing)
    assert showdown_grid.from_shipped("review", "another-model", path=shipped)[0] == []  # runs of another model never stand in
    assert not (tmp_path / "mine.jsonl").exists()  # reading wrote nothing
    assert showdown_grid.seeds_logged(runs) == {"full": [0], "prompt": [2]}
    (line,) = showdown_grid.provenance_lines(runs)
    assert line.startswith("2 runs on a test machine") and "2 min of compute" in line and "v1" in line


def test_a_missing_shipped_log_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(showdown_grid, "__file__", str(tmp_path / "pkg" / "showdown_grid.py"))
    with pytest.raises(FileNotFoundError, match="clone it whole"):
        showdown_grid.shipped_path()


def _bits(n, right, seed):
    rng = random.Random(seed)
    flags = [1] * right + [0] * (n - right)
    rng.shuffle(flags)
    return "".join(map(str, flags))


def test_paired_over_seeds_pools_the_disagreements_and_tests_them_exactly():
    scipy_stats = pytest.importorskip("scipy.stats")
    a = [{"test_n": 4, "test_correct": "1110", "test_items": "x"}, {"test_n": 4, "test_correct": "1101", "test_items": "x"}]
    b = [{"test_n": 4, "test_correct": "1000", "test_items": "x"}, {"test_n": 4, "test_correct": "0001", "test_items": "x"}]
    r = stats.paired_over_seeds(list(zip(a, b)))
    assert (r["only_a"], r["only_b"], r["n"], r["seeds"]) == (4, 0, 8, 2)
    assert r["diff"] == pytest.approx(0.5)
    assert r["p"] == pytest.approx(scipy_stats.binomtest(0, 4, 0.5).pvalue)
    assert r["verdict"] == "no measurable difference"  # 4 to 0 is not enough at 5 %
    many = [({"test_n": 200, "test_correct": _bits(200, 150, s), "test_items": "x"},
             {"test_n": 200, "test_correct": _bits(200, 100, s + 10), "test_items": "x"}) for s in range(3)]
    big = stats.paired_over_seeds(many)
    assert big["verdict"] == "higher" and big["low"] > 0 and big["p"] < 1e-6
    flipped = stats.paired_over_seeds([(y, x) for x, y in many])
    assert flipped["verdict"] == "lower" and flipped["diff"] == pytest.approx(-big["diff"])
    with pytest.raises(ValueError, match="same items"):
        stats.paired_over_seeds([({"test_n": 4, "test_correct": "1110", "test_items": "x"},
                                  {"test_n": 4, "test_correct": "1110", "test_items": "y"})])


def _exact_mcnemar_power(n, p_a, p_b):
    """Power of the exact McNemar test at 5 % for n pairs, P(only A) = p_a, P(only B) = p_b (exact sum)."""
    pd = p_a + p_b
    power = 0.0
    for d in range(n + 1):
        pr_d = math.comb(n, d) * pd ** d * (1 - pd) ** (n - d)
        if pr_d < 1e-12:
            continue
        share = p_a / pd
        power += pr_d * sum(math.comb(d, k) * share ** k * (1 - share) ** (d - k)
                            for k in range(d + 1) if stats.paired_test(k, d - k) < 0.05)
    return power


def test_items_needed_gives_a_paired_test_about_80_percent_power():
    only_a, only_b, n = 60, 30, 640   # a gap of 30 items among 90 disagreements
    need = stats.paired_items_needed(only_a, only_b, n)
    assert 0.7 < _exact_mcnemar_power(need, only_a / n, only_b / n) < 0.9
    assert _exact_mcnemar_power(need // 3, only_a / n, only_b / n) < 0.5
    assert stats.paired_items_needed(40, 40, 640) is None
    assert stats.paired_items_needed(45, 40, 640) > stats.paired_items_needed(60, 30, 640)


def test_seeds_needed_grows_as_the_gap_shrinks():
    assert stats.seeds_needed([1.0], [2.0]) is None
    wide = stats.seeds_needed([1.0, 1.2, 0.8], [1.1, 1.3, 0.9])
    narrow = stats.seeds_needed([1.0, 1.2, 0.8], [2.0, 2.2, 1.8])
    assert wide > narrow >= 2


def _evidence(step_bytes, s_per_step, kl, acc, ckpt, runs=None, trainable=10):
    return {"lr": 1e-3, "accuracy": {"mean": acc, "low": acc - 0.02, "high": acc + 0.02},
            "kl": {"mean": kl, "low": kl * 0.9, "high": kl * 1.1},
            "s_per_step": {"mean": s_per_step, "low": s_per_step * 0.95, "high": s_per_step * 1.05},
            "memory": {"weights": step_bytes // 2, "activations": step_bytes // 4}, "step_bytes": step_bytes,
            "trainable": trainable, "total": 1000, "checkpoint_bytes": ckpt, "latency_s": 0.1, "runs": runs or {}}


def test_the_promises_verdicts_follow_the_numbers():
    full = _evidence(4000 * 2 ** 20, 1.0, 0.1, 0.9, 500 * 2 ** 20, trainable=1000)
    light = _evidence(1000 * 2 ** 20, 0.5, 0.3, 0.88, 2 * 2 ** 20)
    heavy = _evidence(5000 * 2 ** 20, 2.0, 0.03, 0.88, 2 * 2 ** 20)
    assert promises.compute_and_storage({"full": full, "lora-all": light})["verdict"] == "borne out here"
    assert promises.compute_and_storage({"full": full, "lora-all": heavy})["verdict"] == "not borne out here"
    assert "25% of full fine-tuning's step memory" in promises.compute_and_storage({"full": full, "lora-all": light})["paragraph"]
    assert promises.training_speed({"full": full, "lora-all": light})["verdict"] == "borne out here"
    assert promises.training_speed({"full": full, "lora-all": light, "prompt": heavy})["verdict"] == "mixed here"
    assert promises.forgetting({"full": full, "lora-all": light})["verdict"] == "not borne out here"  # higher KL
    assert promises.forgetting({"full": full, "lora-all": heavy})["verdict"] == "borne out here"
    assert "bit for bit unchanged" in promises.forgetting({"full": full, "lora-all": heavy}, base_unchanged=True)["paragraph"]
    assert "CHANGED" in promises.forgetting({"full": full, "lora-all": heavy}, base_unchanged=False)["paragraph"]
    same = {"diff": 0.01, "low": -0.02, "high": 0.04, "only_a": 20, "only_b": 14, "n": 640, "seeds": 1, "p": 0.39,
            "verdict": "no measurable difference"}
    little = promises.little_data([(8, same)], "LoRA", "full")
    assert little["verdict"] == "no measurable difference here" and "paired test answers" in little["paragraph"]
    assert little["agreement"].endswith("neither shown nor ruled out.")
    worse = dict(same, diff=-0.05, low=-0.08, high=-0.02, verdict="lower")
    assert promises.little_data([(8, worse)], "LoRA", "full")["agreement"].endswith("not what they show.")
    swaps = {"a": {"accuracy": [0.5, 0.5], "swap_s": 0.01}}
    mixed = {"rows": 4, "tasks": 2, "same_answers": True}
    assert promises.many_tasks(swaps, True, 40.0, mixed)["verdict"] == "borne out here"
    assert promises.many_tasks({"a": {"accuracy": [0.5, 0.4], "swap_s": 0.01}}, True, 40.0, mixed)["verdict"] == "not borne out here"


def test_which_method_when_names_the_best_and_the_cheapest_among_its_equals():
    full = _evidence(4000, 1.0, 0.1, 0.92, 500)
    lora = _evidence(1000, 0.5, 0.2, 0.90, 2)
    prompt = _evidence(1200, 0.9, 0.15, 0.80, 1)
    tie = {"diff": -0.02, "low": -0.05, "high": 0.01, "only_a": 10, "only_b": 20, "n": 640, "seeds": 3, "p": 0.1,
           "verdict": "no measurable difference"}
    worse = {"diff": -0.12, "low": -0.15, "high": -0.09, "only_a": 10, "only_b": 90, "n": 640, "seeds": 3, "p": 1e-9,
             "verdict": "lower"}
    full["vs_best"], lora["vs_best"], prompt["vs_best"] = tie, tie, worse
    lines = promises.which_method_when({"full": full, "lora-all": lora, "prompt": prompt})
    assert lines[0].startswith("Most accurate here: full fine-tuning (92.0%)")
    assert "full fine-tuning, LoRA r=8 (all linear)." in lines[0]
    assert "least memory per step: LoRA r=8 (all linear)" in lines[1]
    assert "Measurably behind the best here: prompt (-12.0 points" in lines[2]


def test_the_grid_figures_draw_from_the_results():
    result = {"diff": 0.05, "low": 0.01, "high": 0.09, "verdict": "higher"}
    ax = plots.paired_differences([("a − b", result), ("c − b", dict(result, verdict="no measurable difference"))])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["c − b", "a − b"]
    timed = {"full": {"lr": 1e-4, "runs": [{"curve": [(1.0, 0.5), (2.0, 0.8)]}, {"curve": [(1.2, 0.6), (2.2, 0.9)]}]}}
    ax = plots.time_to_accuracy(timed, {"full": "full fine-tuning"}, target=0.7)
    (line,) = [l for l in ax.get_lines() if l.get_label().startswith("full fine-tuning")]
    assert list(line.get_xdata()) == pytest.approx([1.1, 2.1]) and list(line.get_ydata()) == pytest.approx([0.55, 0.85])
    rows = [{"recipe": "full", "task": f"t, {n} train", "accuracy": {"mean": 0.5, "low": 0.4, "high": 0.6}} for n in (8, 32)]
    ax = plots.low_data(rows, {"full": "full"}, [8, 32])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "32"]
    matplotlib.pyplot.close("all")


def test_paired_grid_runs_need_shared_items():
    a = {0: _record("full", 1e-5, 0, "t", "1100"), 1: _record("full", 1e-5, 1, "t", "1110")}
    b = {1: _record("lora-qv", 1e-3, 1, "t", "0000")}
    r = showdown_grid.paired(a, b)
    assert r["seeds"] == 1 and (r["only_a"], r["only_b"]) == (3, 0)
    assert showdown_grid.paired(a, {2: b[1]}) is None
    zero_shot = {"accuracy": 0.25, "n": 4, "correct": "1000", "items": "same"}
    assert showdown_grid.paired(a, {s: zero_shot for s in a})["only_a"] == 3


def test_the_separation_note_says_when_only_the_seeds_keep_a_verdict_open():
    from peft_lab import promises, stats

    # two seeds on 640 items each: the items separate A from B clearly, but the seeds' gaps disagree in size
    a1, b1 = {"correct": "1" * 640, "items": "x", "test_n": 640}, {"correct": "1" * 600 + "0" * 40, "items": "x", "test_n": 640}
    a2, b2 = {"correct": "1" * 640, "items": "x", "test_n": 640}, {"correct": "1" * 638 + "0" * 2, "items": "x", "test_n": 640}
    result = stats.paired_over_seeds([(a1, b1), (a2, b2)])
    assert result["p"] < 0.05 and result["verdict"] == "no measurable difference"
    assert "another seed would settle it" in promises.separation_note(result)
    # one seed, a small gap the test cannot see: the note says how many items would, as a ratio that is never "0x"
    few = stats.paired_over_seeds([({"correct": "1" * 320 + "0" * 320, "items": "x", "test_n": 640},
                                    {"correct": "1" * 318 + "0" * 322, "items": "x", "test_n": 640})])
    note = promises.separation_note(few)
    assert "paired test answers" in note and " 0x" not in note


def test_a_paired_interval_never_leaves_the_possible_range():
    """Two seeds far apart give a t-interval (1 degree of freedom) wider than a difference of shares can be: it is
    cut to [-1, 1], and the verdict still needs the uncut interval to exclude 0."""
    wide = stats.paired_over_seeds([({"correct": "1" * 9 + "0", "items": "x", "test_n": 10},
                                     {"correct": "0" * 10, "items": "x", "test_n": 10}),
                                    ({"correct": "1" + "0" * 9, "items": "x", "test_n": 10},
                                     {"correct": "0" * 10, "items": "x", "test_n": 10})])
    assert wide["diff"] == 0.5 and wide["low"] == -1.0 and wide["high"] == 1.0
    assert wide["verdict"] == "no measurable difference"


def test_every_shipped_part_holds_each_recipe_and_the_saved_showdown_reads_them_all():
    # the shipped grid is complete, read by recipe (the tag), not by the method word two recipes can share; its
    # lines predate the tag, so each is read with the method its recipe's model carries
    for part, spec in showdown_grid.GRID.items():
        runs, missing = showdown_grid.from_shipped(part, None)
        assert missing == [] and {study.recipe_of(r) for r in runs} == set(spec["lrs"]), part
        assert all(r.tag.startswith("study:") and r.method == recipes.METHODS[study.recipe_of(r)] for r in runs), part
    # so the saved notebook 05 must show every part, not the note for a part still to compute
    import json

    notebook = json.loads((ROOT / "notebooks" / "05_showdown.ipynb").read_text(encoding="utf-8"))
    printed = "".join("".join(o.get("text", "")) for c in notebook["cells"] if c["cell_type"] == "code"
                      for o in c.get("outputs", []))
    assert "not computed for every method yet" not in printed and "not computed yet" not in printed
