"""Execute the workbook's notebooks headless and keep the results: ``python -m peft_lab.run_notebooks``.

Used by ``make run``: each notebook is executed top to bottom (full mode unless PEFT_LAB_QUICK=1 is
set), saved with its outputs under ``<out>/notebooks``, and every figure is written as a PNG under
``<out>/figures``. The time each notebook took is printed at the end. A notebook that fails is saved
as far as it ran (the error shows in place) and the others still run; the command then exits non-zero.

A notebook that ran through is stamped (``stamp``): its metadata records the code version it ran on
(``version.code_version``: package, data, its own code cells), the machine, the precision, the mode and the
minutes; and the "**Time:**" line of its header is written from that record, never by hand. Copy a refreshed
notebook from ``<out>/notebooks`` over the one in ``notebooks/``; ``make run NOTEBOOKS=02`` refreshes one alone.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import os
import re
import time
from pathlib import Path

from . import version


# A training bar as a saved notebook keeps it: tqdm's widget, with the text it showed when it appeared
# ("training lora:   0%|          | 0/60 [00:00<?, ?it/s]"). train.fit erases the bar when it is done and
# prints a summary line in its place, but the saved output keeps the widget, and wherever the page is read
# without running it (GitHub, a static viewer) the bar shows frozen at 0 %.
TRAINING_BAR = re.compile(r"^training .*\d+%\|.*\| *\d+/\d+")

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
MODEL_REFERENCE = re.compile(r"IPY_MODEL_([0-9a-f]+)")


def drop_training_bars(nb) -> int:
    """Remove the erased training progress bars from ``nb``'s outputs; returns how many were removed."""
    removed = 0
    for cell in nb.cells:
        kept = []
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            text = data.get("text/plain", "")
            text = "".join(text) if isinstance(text, list) else text
            if WIDGET_VIEW in data and TRAINING_BAR.match(text):
                removed += 1
            else:
                kept.append(output)
        if "outputs" in cell:
            cell["outputs"] = kept
    return removed


def _referenced_models(value, found: set) -> None:
    """Every widget model ``value`` names: a view's ``model_id``, or a child written as "IPY_MODEL_<id>"."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "model_id" and isinstance(item, str):
                found.add(item)
            else:
                _referenced_models(item, found)
    elif isinstance(value, list):
        for item in value:
            _referenced_models(item, found)
    elif isinstance(value, str):
        found.update(MODEL_REFERENCE.findall(value))


def drop_unshown_widgets(nb) -> int:
    """Remove from the saved widget state every model no output shows; returns how many were removed.

    The kernel reports each widget it made, so the state nbclient saves still holds the erased training bars
    (their bar, labels, layouts and styles: about a dozen models per run). No output shows them any more,
    but they make up most of the saved state. Kept: the models the remaining outputs display, and every
    model those name (a panel's sliders, its layouts and styles, the output area inside it)."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state")
    if not state:
        return 0
    keep, todo = set(), set()
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            _referenced_models(output.get("data", {}).get(WIDGET_VIEW, {}), todo)
    while todo:
        model = todo.pop()
        if model in keep or model not in state:
            continue
        keep.add(model)
        named = set()
        _referenced_models(state[model], named)
        todo |= named - keep
    unshown = [m for m in state if m not in keep]
    for model in unshown:
        del state[model]
    return len(unshown)


TIME_LINE = re.compile(r"^\*\*Time[^*]*:\*\*.*$", re.M)


def stamp(nb, source_path: Path, minutes: float, code_version: dict | None = None) -> dict:
    """Record in ``nb`` what it ran on (``code_version``: taken before the run, so an edit made while it ran
    cannot pass for the code it ran on), and write its header's time line from that record; returns the record."""
    import torch

    from . import data as data_mod
    from . import models

    mode = "quick" if data_mod.quick_mode() else "full"
    record = {"code_version": code_version or version.code_version(source_path), "mode": mode, "minutes": round(minutes, 1),
              "machine": models.machine(), "precision": models.precision_summary(models.pick_device()),
              "torch": torch.__version__, "date": datetime.date.today().isoformat()}
    nb.metadata[version.METADATA_KEY] = record
    header = next((c for c in nb.cells if c.cell_type == "markdown"), None)
    if header is not None and mode == "full":
        line = (f"**Time:** {record['minutes']:.1f} min in full mode on {record['machine']}, {record['precision']} "
                f"(measured by the run that saved this notebook, {record['date']}; other machines: the README); "
                "quick mode (`PEFT_LAB_QUICK=1`) under 3 minutes.")
        header.source = TIME_LINE.sub(lambda _match: line, header.source, count=1)
    return record


def run(paths, out: Path, timeout: int = 3600) -> dict:
    import nbformat
    from nbclient import NotebookClient

    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    seconds, failed = {}, {}
    for path in map(Path, paths):
        print(f"running {path.name} ...", flush=True)
        nb = nbformat.read(path, as_version=4)
        started = time.perf_counter()
        ran_on = version.code_version(path)
        os.environ["PEFT_LAB_NOTEBOOK"] = str(path.resolve())  # the kernel inherits it: its first cell prints the version
        try:
            NotebookClient(nb, timeout=timeout, kernel_name="python3",
                           resources={"metadata": {"path": str(path.parent)}}).execute()
        except Exception as err:  # keep what ran (the error is in the saved notebook) and go on with the rest
            message = str(err).strip()
            failed[path.name] = message.splitlines()[-1] if message else type(err).__name__
            print(f"  FAILED: {failed[path.name]}", flush=True)
        seconds[path.name] = time.perf_counter() - started
        if path.name not in failed and version.code_version(path) != ran_on:
            failed[path.name] = "peft_lab/, data/ or the notebook changed while it ran; run it again"
            print(f"  NOT STAMPED: {failed[path.name]}", flush=True)
        if path.name not in failed:
            stamp(nb, path, seconds[path.name] / 60, ran_on)
        drop_training_bars(nb)
        drop_unshown_widgets(nb)
        nbformat.write(nb, out / "notebooks" / path.name)
        n = 0
        for cell in nb.cells:
            for output in cell.get("outputs", []):
                png = output.get("data", {}).get("image/png")
                if png:
                    n += 1
                    (out / "figures" / f"{path.stem}_fig{n:02d}.png").write_bytes(base64.b64decode(png))
        print(f"  done in {seconds[path.name]:.0f} s, {n} figures", flush=True)
    for name, s in seconds.items():
        print(f"{name:<45} {s / 60:5.1f} min" + ("  FAILED" if name in failed else ""))
    if failed:
        raise SystemExit(f"{len(failed)} notebook(s) failed: {', '.join(failed)}; open them under {out / 'notebooks'} "
                         "to see the error in place.")
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+")
    parser.add_argument("--out", default="build", type=Path)
    args = parser.parse_args()
    run(args.notebooks, args.out)


if __name__ == "__main__":
    main()
