"""The showdown's grid: which runs notebook 05 compares, where their shipped results live, and where they came from.

A grid that separates the methods (60 steps of 8, three to four learning rates a method, three seeds, every run
scored on all 640 test reviews) takes hours of CPU, so it is computed by the study runner outside the notebook
(``bash results/showdown_grid.sh``, resumable, one thread) and shipped as a run log, ``results/showdown_grid.jsonl``,
each run with its provenance. Notebook 05 reads it on a CPU, retrains it on a GPU (or when asked), and runs a
token-sized grid through the same code in quick mode (the tests).

``GRID`` below is the one definition; ``tests/test_showdown_grid.py`` checks that the shell script runs the same.
"""
from __future__ import annotations

from pathlib import Path

from . import data as data_mod
from . import study

# part -> what it trains: the task, the steps, seeds, learning rates per recipe, and training-set sizes
GRID = {
    "review": {"task": "review_domain", "steps": 60, "seeds": (0, 1, 2), "train_sizes": (None,),
               "lrs": {"full": [1e-5, 3e-5, 1e-4], "lora-qv": [3e-4, 1e-3, 3e-3], "lora-all": [1e-4, 3e-4, 1e-3],
                       "prefix": [1e-3, 3e-3, 1e-2, 3e-2], "prompt": [3e-3, 1e-2, 3e-2]}},
    "facts": {"task": "facts", "facts": 64, "steps": 64, "seeds": (0, 1, 2), "train_sizes": (None,),
              "lrs": {"full": [1e-5, 3e-5, 1e-4, 3e-4], "lora-all": [1e-4, 3e-4, 1e-3, 3e-3]}},
    "low_data": {"task": "review_domain", "steps": 60, "seeds": (0, 1, 2), "train_sizes": (8, 32, 128, 480),
                 "lrs": {"lora-qv": [1e-3], "full": [3e-5]}},
}

# the same code on a token-sized grid: what quick mode (nbval) runs live; its numbers mean nothing
QUICK_GRID = {
    "review": {"task": "review_domain", "steps": 2, "seeds": (0, 1), "train_sizes": (None,),
               "lrs": {"full": [1e-4], "lora-all": [1e-3]}},
    "facts": {"task": "facts", "facts": 16, "steps": 2, "seeds": (0,), "train_sizes": (None,),
              "lrs": {"full": [1e-4], "lora-all": [1e-3]}},
    "low_data": {"task": "review_domain", "steps": 2, "seeds": (0, 1), "train_sizes": (6,),
                 "lrs": {"lora-all": [1e-3], "full": [1e-4]}},
}
QUICK_SIZES = {"test": 16, "val": 8, "probes": 10, "prose_tokens": 256}  # quick mode measures on this little

SHIPPED = Path("results") / "showdown_grid.jsonl"
COMMAND = "bash results/showdown_grid.sh"


def points(part: str, grid: dict = GRID) -> list:
    """The runs of one part of ``grid`` as ``study.Point``s."""
    spec = grid[part]
    return study.grid(list(spec["lrs"]), spec["lrs"], spec["seeds"], spec["train_sizes"], spec["steps"])


def task_of(part: str, grid: dict = GRID):
    """The task a part trains on (the facts part: the first N invented facts, with a validation question each)."""
    spec = grid[part]
    return data_mod.first_facts_task(spec["facts"]) if spec["task"] == "facts" else data_mod.load_task(spec["task"])


def shipped_path() -> Path:
    """results/showdown_grid.jsonl of the workbook the notebooks run from (notebooks/ is next to results/)."""
    here = Path(__file__).resolve().parents[1]
    for root in (Path.cwd(), Path.cwd().parent, here):
        if (root / SHIPPED).exists():
            return root / SHIPPED
    raise FileNotFoundError(f"No {SHIPPED} next to this workbook (looked in {Path.cwd()}, its parent and {here}). It "
                            f"ships with the repository: clone it whole, or compute the grid with `{COMMAND}`.")


def from_shipped(part: str, model_name: str | None, grid: dict = GRID, path=None) -> tuple:
    """(runs, missing points) of one part, read from the shipped run log: nothing is trained."""
    path = path or shipped_path()
    task = task_of(part, grid)
    found, missing = [], []
    for p in points(part, grid):
        run = study.logged(p, task, model_name, path=path)
        (found if run is not None else missing).append(run if run is not None else p)
    return found, missing


def load(part: str, base, tokenizer, quick: bool, retrain: bool) -> tuple:
    """(runs, missing points, where the numbers come from) for one part of the showdown grid.

    quick: the token-sized grid, trained live (the tests); retrain: the whole grid trained here (a GPU, or a CPU
    with hours to spare), resuming from this machine's own run log; otherwise: the shipped results."""
    model_name = getattr(base, "peft_lab_name", None)
    if quick or retrain:
        grid = QUICK_GRID if quick else GRID
        runs = study.run(points(part, grid), base, tokenizer, task_of(part, grid), sizes=QUICK_SIZES if quick else None)
        return runs, [], "trained in this run" + (" (quick mode: a token grid, numbers mean nothing)" if quick else "")
    runs, missing = from_shipped(part, model_name)
    return runs, missing, f"the shipped grid ({SHIPPED})"


def provenance_lines(runs) -> list:
    """Where shipped runs come from, as lines to print: machines and precisions, torch and code versions, threads,
    and the compute time they took (training and measuring)."""
    if not runs:
        return ["no runs"]
    groups = {}
    for r in runs:
        p = r.provenance or {}
        key = (p.get("machine", "unknown machine"), p.get("precision", "unknown precision"), p.get("torch", "?"))
        g = groups.setdefault(key, {"runs": 0, "seconds": 0.0, "codes": set(), "threads": set()})
        g["runs"] += 1
        g["seconds"] += p.get("wall_seconds", 0.0)
        g["codes"].add(p.get("code_version", "?"))
        g["threads"].add(p.get("threads", "?"))
    lines = []
    for (machine, precision, torch_version), g in groups.items():
        lines.append(f"{g['runs']} runs on {machine}, torch {torch_version}, {' / '.join(map(str, sorted(g['threads'])))} "
                     f"thread(s), {g['seconds'] / 60:.0f} min of compute; precision: {precision}; code version(s) "
                     f"{', '.join(sorted(g['codes']))}")
    return lines


def seeds_logged(runs) -> dict:
    """recipe -> sorted seeds present, to say how complete a shipped part is."""
    out = {}
    for r in runs:
        out.setdefault(study.recipe_of(r), set()).add(r.config["seed"])
    return {k: sorted(v) for k, v in out.items()}


def runs_of(runs, recipe: str, lr: float, task_name: str | None = None) -> dict:
    """seed -> run of one recipe at one learning rate (on one task, e.g. one training-set size)."""
    return {r.config["seed"]: r for r in runs
            if r.tag == f"study:{recipe}" and r.config["lr"] == lr and (task_name is None or r.task == task_name)}


def paired(a: dict, b: dict, metric: str = "accuracy") -> dict | None:
    """``stats.paired_over_seeds`` of ``a`` against ``b`` (each seed -> a run or its metrics, e.g. zero-shot's
    ``measure.accuracy`` result for every seed) over the seeds both have; None when they share none or were not
    scored on the same items."""
    from .stats import paired_over_seeds

    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    metrics = lambda x: getattr(x, "metrics", x)  # noqa: E731
    try:
        return paired_over_seeds([(metrics(a[s]), metrics(b[s])) for s in seeds], metric)
    except ValueError:
        return None


def expected_minutes(runs, part: str, grid: dict = GRID) -> float | None:
    """Minutes the whole part would take on the machine of ``runs``: each recipe's mean wall time (training and
    measuring) times its runs in the grid. None when a recipe has no timed run yet."""
    wall = {}
    for r in runs:
        if "wall_seconds" in (r.provenance or {}):
            wall.setdefault(study.recipe_of(r), []).append(r.provenance["wall_seconds"])
    todo = points(part, grid)
    if any(p.recipe not in wall for p in todo):
        return None
    return sum(sum(wall[p.recipe]) / len(wall[p.recipe]) for p in todo) / 60
