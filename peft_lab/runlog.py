"""Run records and the run log: what each training run did and cost, kept across notebooks.

Explained in notebook 01_full_finetuning_and_freezing, section 2.

The run log is a JSON-lines file ($PEFT_LAB_RUNLOG, else runs.jsonl in the model cache folder), one
run record a line, appended by ``train.fit`` and again by ``measure.evaluate_run`` (a later line with
the same ``run_id`` supersedes the earlier one). Later notebooks read it to compare methods without
training again. Runs are kept apart by tag, settings, model and mode (quick or full): a lookup
names what it wants (``latest_run("full", "reviews", lr=2e-5)``), not just a method word.

Three names, one job each: ``method`` is what trained (the method's registry word from the model, e.g. "lora",
or "full" / "freeze:<choice>" for the freezing choices); ``tag`` is what the run was trained as, the word lookups
find it by ("study:lora-qv", "lora r=4 (sweep)"; the method word when the caller gives none); ``label`` is what a
reader sees in tables and figures (the tag with the run's settings and learning rate).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from . import data as data_mod
from . import models

# settings worth naming in a label, in this order, with their short names
LABEL_SETTINGS = (("rank", "r="), ("targets", ""), ("num_virtual_tokens", "P="), ("init", "init "),
                  ("n", "n="), ("lr", "lr "))


@dataclass
class RunRecord:
    """What one training run did and cost. ``metrics`` is filled in later by ``measure``.

    ``method``: what trained (a registry word, "full", "freeze:<choice>" or "custom"); ``tag``: what the run was
    trained as, for lookups (defaults to the method word); ``label``: its name in tables and figures."""

    method: str
    task: str
    config: dict
    trainable_params: int
    total_params: int
    losses: list = field(default_factory=list)
    label_losses: list = field(default_factory=list)  # the loss over the label words only (see train.fit)
    step_seconds: list = field(default_factory=list)
    tokens_per_step: list = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    model: str = ""
    device: str = "cpu"
    quick: bool = False
    tag: str = ""
    label: str = ""
    # where and on what it ran, for runs shipped as results (study.run fills it): machine, precision, torch,
    # code version, threads, wall seconds of training and measuring
    provenance: dict = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    created: float = field(default_factory=time.time)

    def __post_init__(self):
        self.tag = self.tag or self.method
        self.label = self.label or default_label(self.tag, self.config)

    @property
    def seconds_per_step(self) -> float:
        """Median seconds per step, the warm-up step left out (it pays one-off allocation costs)."""
        times = self.step_seconds[1:] or self.step_seconds
        return float(sorted(times)[len(times) // 2]) if times else float("nan")

    @property
    def tokens_per_second(self) -> float:
        if len(self.step_seconds) < 2:
            return float("nan")
        return sum(self.tokens_per_step[1:]) / sum(self.step_seconds[1:])

    def loss_start_end(self, label_words: bool = False) -> tuple:
        """(mean loss over the first k steps, over the last k steps, k), with k = min(5, a quarter of the steps).

        One batch's loss is noisy (8 reviews), so where a run started and ended is read from a few steps each.
        ``label_words``: the loss over the label words alone (``label_losses``) instead of the whole vocabulary."""
        losses = self.label_losses if label_words else self.losses
        if not losses:
            raise ValueError(f"Run {self.label!r} recorded no {'label-word ' if label_words else ''}losses: it trained no step.")
        k = max(1, min(5, len(losses) // 4))
        return sum(losses[:k]) / k, sum(losses[-k:]) / k, k

    def to_dict(self) -> dict:
        return asdict(self)


def default_label(tag: str, config: dict) -> str:
    """A run's tag with its settings, e.g. "lora r=8 q_proj,v_proj, lr 0.0002" or "full, lr 2e-5"."""
    parts = []
    for key, short in LABEL_SETTINGS:
        value = config.get(key)
        if value is None or value == "" or (key == "n" and config.get("choice") != "last_n"):
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        parts.append(short + (short_number(value) if isinstance(value, float) else str(value)))
    head = " ".join([tag] + [p for p in parts if not p.startswith("lr ")])
    lr = [p for p in parts if p.startswith("lr ")]
    return ", ".join([head] + lr)


def short_number(x: float) -> str:
    """A learning rate as people write it: 2e-5, 1e-4, 3e-3, 0.03."""
    text = f"{x:.2g}" if x >= 1e-2 else f"{x:.1e}".replace(".0e", "e")
    return text.replace("e-0", "e-")


def run_log_path() -> Path:
    """$PEFT_LAB_RUNLOG, else runs.jsonl in the model cache folder (shared by every notebook)."""
    return Path(os.environ.get("PEFT_LAB_RUNLOG", models.cache_dir() / "runs.jsonl"))


@contextlib.contextmanager
def _locked(f):
    """An exclusive lock on an open file where the system has one, so two processes never interleave lines."""
    try:
        import fcntl
    except ImportError:  # Windows: appends of one short line are close to atomic anyway
        yield
        return
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)


def save_run(record: RunRecord) -> None:
    """Append ``record`` to the run log; a later entry with the same ``run_id`` supersedes it."""
    path = run_log_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record.to_dict()) + "\n"
    with open(path, "a", encoding="utf-8") as f, _locked(f):
        f.write(line)
        f.flush()


_KNOWN_FIELDS = {f.name for f in fields(RunRecord)}


def _from_older_log(row: dict) -> dict:
    """A line written before runs carried a tag, whose ``method`` held whatever the caller named the run (the
    shipped grid's "study:lora-qv", a notebook's "lora r=4 (sweep)"): that word becomes the tag, and the method is
    read from the recipe or the settings where they say it, else "custom". Newer lines pass unchanged."""
    if "tag" in row or not isinstance(row.get("method"), str):
        return row
    from . import methods, recipes

    word, config = row["method"], row.get("config") or {}
    recipe = word.removeprefix("study:").removeprefix("showdown:time:")
    if word in methods.names() or word == "full" or word.startswith("freeze:"):
        method = word
    elif recipe in recipes.METHODS:
        method = recipes.METHODS[recipe]
    elif "choice" in config:
        method = "full" if config["choice"] == "full" else f"freeze:{config['choice']}"
    else:
        method = "custom"
    return {**row, "method": method, "tag": word}


def load_runs(tag: str | None = None, task: str | None = None, quick: bool | None = None,
              model: str | None = None, path=None, method: str | None = None, **settings) -> list:
    """Runs from the log, oldest first, filtered by tag, task, model, method and ``settings`` (config values,
    e.g. ``lr=2e-5``); by default only those of the current mode (quick or full). ``path``: another log to
    read (a shipped one, such as results/showdown_grid.jsonl) instead of ``run_log_path()``.

    A line that cannot be read (a crash mid-write, a hand edit) is skipped with a warning; the rest is kept.
    Lines from before runs carried a tag are read as ``_from_older_log`` says.
    """
    path = Path(path) if path is not None else run_log_path()
    if not path.exists():
        return []
    latest, broken = {}, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise TypeError(f"a JSON {type(row).__name__}, not a run")
            record = RunRecord(**{k: v for k, v in _from_older_log(row).items() if k in _KNOWN_FIELDS})
        except (ValueError, TypeError) as err:
            broken.append(f"line {number} ({type(err).__name__})")
            continue
        latest[record.run_id] = record
    if broken:
        warnings.warn(f"run log {path}: skipped unreadable {', '.join(broken)}; the other runs are kept", stacklevel=2)
    quick = data_mod.quick_mode() if quick is None else quick
    return [r for r in latest.values()
            if (tag is None or r.tag == tag) and (task is None or r.task == task) and r.quick == quick
            and (model is None or r.model == model) and (method is None or r.method == method)
            and all(r.config.get(k) == v for k, v in settings.items())]


def latest_run(tag: str, task: str | None = None, path=None, **settings):
    """The newest logged run tagged ``tag`` with these ``settings`` (in the current mode), or None; ``path`` as
    in ``load_runs``."""
    runs = load_runs(tag, task, path=path, **settings)
    return runs[-1] if runs else None
