"""Studies: a grid of training runs — recipe x learning rate x seed x training-set size — each trained, measured
and logged once, and summarised as means over seeds with 95 % intervals.

A study is resumable: every finished run is in the run log, so running the same grid again trains only what is
missing (an interrupted study picks up where it stopped, a finished one returns at once). From the command line::

    python -m peft_lab.study --task reviews --recipes lora-qv full --lrs 1e-4 3e-4 --seeds 0 1 2 --steps 30
    python -m peft_lab.study ... --dry-run      # list what would be trained, and what is already in the log
    python -m peft_lab.study --task facts --facts 64 --recipes full lora-all --lrs 1e-4 1e-3 --steps 64   # new knowledge

Runs are logged with the tag ``study:<recipe>``, so they never stand in for a notebook's baselines.
"""
from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass

import torch

from . import data as data_mod
from . import measure, models, recipes, runlog, train, version

# recipe -> how to build the model it trains from the frozen base (always a copy or a wrapper: base never changes);
# the table lives in recipes.py, shared with the baselines and the figures' names
RECIPES = recipes.BUILD
INSTRUCTIONS = recipes.INSTRUCTIONS


@dataclass(frozen=True)
class Point:
    """One run of a study."""
    recipe: str
    lr: float
    seed: int
    train_size: int | None  # None: the whole training set
    steps: int

    @property
    def tag(self) -> str:
        return f"study:{self.recipe}"


def grid(recipes, lrs, seeds=(0, 1, 2), train_sizes=(None,), steps: int = 30) -> list:
    """Every combination, as ``Point``s. ``lrs`` is a list for all recipes, or a dict recipe -> list (each
    method needs its own range: full fine-tuning around 1e-5..1e-4, LoRA 1e-4..1e-3, prompts 1e-2..1e-1)."""
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise ValueError(f"Unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}.")
    points = []
    for recipe in recipes:
        rates = lrs[recipe] if isinstance(lrs, dict) else lrs
        for lr, seed, size in itertools.product(rates, seeds, train_sizes):
            points.append(Point(recipe, float(lr), int(seed), size, int(steps)))
    return points


def _task_for(task, point):
    return task if point.train_size is None else data_mod.subset(task, point.train_size, seed=point.seed)


def logged(point: Point, task, model_name: str | None, path=None):
    """The finished, measured run of ``point`` in the run log (or in the log at ``path``), or None."""
    run = runlog.latest_run(point.tag, _task_for(task, point).name, lr=point.lr, seed=point.seed,
                            steps=point.steps, model=model_name, path=path, quick=False if path else None)
    return run if run is not None and "accuracy" in run.metrics else None


def run(points, base, tokenizer, task, base_scores=None, progress: bool = True, sizes: dict | None = None) -> list:
    """Train and measure every point not yet in the run log; return the runs of all points (logged or new).

    ``sizes`` measures on less, for a grid of many runs on a CPU: ``test`` and ``val`` (the first items of
    each split: the splits are shuffled and balanced, so a prefix is a fair sample, with a wider interval),
    ``probes`` (every k-th fact probe) and ``prose_tokens`` (for the KL). Runs are measured the same way
    whether they are trained now or were logged before: pass the same ``sizes`` to resume a study.

    Interrupting (Ctrl-C, or Kernel > Interrupt) stops after the current run's partial steps are dropped;
    run the same call again to go on.
    """
    model_name = getattr(base, "peft_lab_name", None)
    done = {p: logged(p, task, model_name) for p in points}
    todo = [p for p in points if done[p] is None]
    print(f"study: {len(points)} runs, {len(points) - len(todo)} already in the run log, {len(todo)} to train")
    sizes = sizes or {}
    probes = measure.probe_set()[::sizes.get("probes", 1)]
    if todo and base_scores is None:
        base_scores = measure.base_probe_scores(base, tokenizer, probes)
    started = time.perf_counter()
    for i, point in enumerate(todo):
        if progress and i:
            left = (time.perf_counter() - started) / i * (len(todo) - i)
            print(f"  [{i}/{len(todo)}] about {left / 60:.1f} min left")
        point_task = _task_for(task, point)
        wall = time.perf_counter()
        torch.manual_seed(point.seed)  # the method's own random start (LoRA's A, random prompts) follows the seed
        tuned = RECIPES[point.recipe](base, tokenizer, task.name)
        record = train.fit(tuned, tokenizer, point_task, steps=point.steps, lr=point.lr, seed=point.seed,
                           tag=point.tag, progress=progress, log=False,
                           label=f"{point.recipe}, lr {runlog.short_number(point.lr)}, seed {point.seed}"
                                 + (f", {point.train_size} train" if point.train_size else ""))
        if "interrupted_after_steps" in record.config:
            print(f"study stopped after {i} of {len(todo)} new runs; run it again to go on.")
            break
        record.provenance = provenance()
        measure.evaluate_run(record, base, tuned, tokenizer, point_task, base_scores=base_scores,
                             limit=sizes.get("test"), probes=probes, prose_tokens=sizes.get("prose_tokens"))
        if point_task.val:
            val = measure.accuracy(tuned, tokenizer, point_task, "val", limit=sizes.get("val"))
            record.metrics["val_accuracy"], record.metrics["val_n"] = val["accuracy"], val["n"]
        record.provenance["wall_seconds"] = round(time.perf_counter() - wall, 1)
        runlog.save_run(record)
        done[point] = record
        del tuned
    if progress and todo:
        print(f"study: trained {sum(done[p] is not None for p in todo)} runs in {(time.perf_counter() - started) / 60:.1f} min")
    return [done[p] for p in points if done[p] is not None]


def recipe_of(run) -> str:
    """The recipe a study run trained (its tag is ``study:<recipe>``)."""
    return run.tag.removeprefix("study:")


def provenance() -> dict:
    """What a shipped run ran on: machine, precision, torch, the package's and data's code version, threads."""
    return {"machine": models.machine(), "precision": models.precision_summary(models.pick_device()),
            "torch": torch.__version__, "code_version": version.short(version.code_version()),
            "threads": torch.get_num_threads()}


def _value(record, metric: str):
    """A measured number of a run: its speed (``s_per_step``, ``tokens_per_s``) or one of its metrics."""
    speed = {"s_per_step": record.seconds_per_step, "tokens_per_s": record.tokens_per_second}
    return speed[metric] if metric in speed else record.metrics.get(metric)


def summarize(runs, metrics=("accuracy", "kl", "kept_greedy", "kept_logprob", "val_accuracy")) -> list:
    """One row per recipe, learning rate and training-set size: each metric's mean over the seeds with its
    95 % interval (``measure.mean_interval``), and the number of seeds."""
    groups = {}
    for r in runs:
        key = (recipe_of(r), r.config["lr"], r.task)
        groups.setdefault(key, []).append(r)
    rows = []
    for (recipe, lr, task_name), members in groups.items():
        row = {"recipe": recipe, "lr": lr, "task": task_name, "seeds": len(members)}
        for m in metrics:
            # a share of nothing is NaN (no probe the base knew was measured): no value, not a zero
            measured = [r for r in members if _value(r, m) is not None and _value(r, m) == _value(r, m)]
            if measured:
                row[m] = _widened(measure.mean_interval([_value(r, m) for r in measured]), measured, m)
        rows.append(row)
    return rows


# metric -> (how many items each run measured it on); accuracies and probe shares are pooled over the seeds
_COUNTS = {"accuracy": "test_n", "val_accuracy": "val_n", "kept_greedy": "probes_known_by_base",
           "kept_logprob": "probes_known_by_base"}


def _widened(summary: dict, members, metric: str) -> dict:
    """The seeds' t-interval, widened to cover the measurement's own uncertainty: a few seeds that happen to
    agree would otherwise claim a precision the finite test set does not have.

    Shares (accuracy, probes kept): the Wilson interval of the answers pooled over the seeds. KL: the mean of
    the runs' own intervals (over the prose chunks). Shares stay within 0..1 and KL at or above 0."""
    low, high = summary["low"], summary["high"]
    if metric in _COUNTS and all(_COUNTS[metric] in r.metrics for r in members):
        n = sum(r.metrics[_COUNTS[metric]] for r in members)
        right = sum(round(r.metrics[metric] * r.metrics[_COUNTS[metric]]) for r in members)
        w_low, w_high = measure.wilson(right, n)
        low, high = max(0.0, min(low, w_low)), min(1.0, max(high, w_high))
    elif metric == "kl" and all("kl_low" in r.metrics for r in members):
        low = max(0.0, min(low, sum(r.metrics["kl_low"] for r in members) / len(members)))
        high = max(high, sum(r.metrics["kl_high"] for r in members) / len(members))
    return {**summary, "low": low, "high": high}


def _positive(kind):
    """An argparse type: a number of ``kind`` above zero, refused when the command line is read."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} must be above 0")
        return value
    return parse


def _seed(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"seed {text} must be 0 or more")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run (or resume) a grid of training runs; see peft_lab/study.py.")
    parser.add_argument("--task", default="reviews", help="a task of data.load_task, or 'facts' (new knowledge)")
    parser.add_argument("--source", default=None,
                        help="a local file in the hub's columns for --task (as data.load_task(task, source=FILE))")
    parser.add_argument("--facts", type=_positive(int), default=None,
                        help="with --task facts: learn the first N invented facts (default 64; each fact's first question validates)")
    parser.add_argument("--recipes", nargs="+", default=["lora-qv"], choices=sorted(RECIPES))
    parser.add_argument("--lrs", nargs="+", type=_positive(float), required=True)
    parser.add_argument("--seeds", nargs="+", type=_seed, default=[0, 1, 2])
    parser.add_argument("--train-sizes", nargs="+", type=_positive(int), default=None)
    parser.add_argument("--steps", type=_positive(int), default=30)
    parser.add_argument("--threads", type=_positive(int), default=None,
                        help="torch threads (1 leaves a core free for other work beside a long grid)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and which are logged; train nothing")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.facts is not None and args.task != "facts":
        parser.error("--facts N goes with --task facts (learn the first N invented facts).")
    if args.source is not None and args.task == "facts":
        parser.error("--source FILE goes with a classification task (e.g. --task ag_news), not --task facts.")
    points = grid(args.recipes, args.lrs, args.seeds, args.train_sizes or (None,), args.steps)
    # the task before the model: a wrong name fails at once, not after a load
    task = (data_mod.first_facts_task(args.facts or 64) if args.task == "facts"
            else data_mod.load_task(args.task, source=args.source))
    base, tok = models.load()
    if args.dry_run:
        for p in points:
            print(("logged " if logged(p, task, getattr(base, "peft_lab_name", None)) else "to run ") + str(p))
        return
    runs = run(points, base, tok, task)
    for row in summarize(runs):
        acc = row.get("accuracy")
        print(f"{row['recipe']:>14} lr {runlog.short_number(row['lr']):>6} {row['task']}: "
              f"accuracy {acc['mean']:.1%} [{acc['low']:.1%}, {acc['high']:.1%}] over {row['seeds']} seeds")


if __name__ == "__main__":
    main()
