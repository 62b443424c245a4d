"""Small helpers the notebooks share: the environment check, showing the package's own source,
comparing tensors, and checking exercises.

Used in every notebook's first cells.
"""
from __future__ import annotations

import importlib.metadata
import inspect
import os
import platform
from pathlib import Path

import torch

from . import accelerator_check, models, version
from . import data as data_mod


def setup(seed: int = 0) -> dict:
    """Print versions, device, precision and quick mode; seed everything; return the facts as a dict.

    With ``PEFT_LAB_CHECK_DEVICES=1`` (the tests set it) the notebook runs on a pretend accelerator:
    a cell that feeds a CPU tensor to the model stops, as it would on a GPU (see ``accelerator_check``).
    """
    if accelerator_check.requested():
        accelerator_check.enable()
    torch.manual_seed(seed)
    device = models.pick_device()
    facts = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "datasets", "ipywidgets", "matplotlib"):
        try:
            facts[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            facts[pkg] = "not installed"
    facts["device"] = str(device) + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
    facts["precision"] = models.precision_summary(device)
    facts["quick mode"] = data_mod.quick_mode()
    facts["cpu threads"] = torch.get_num_threads()
    facts["code version"] = version.short(version.code_version(this_notebook()))
    if accelerator_check.requested():
        facts["device check"] = "on: CPU tensors fed to the model fail, as on a GPU"
    width = max(map(len, facts))
    for key, value in facts.items():
        print(f"{key:<{width}}  {value}")
    return facts


def this_notebook() -> Path | None:
    """The notebook this kernel runs, where it can be known: set by the runner of ``make run``
    (``PEFT_LAB_NOTEBOOK``), or by JupyterLab (``__session__``); else None (then only the package and data
    versions are printed)."""
    path = os.environ.get("PEFT_LAB_NOTEBOOK")
    if not path:
        try:
            path = get_ipython().user_ns.get("__session__")  # noqa: F821  (defined inside IPython only)
        except NameError:
            path = None
    return Path(path) if path and str(path).endswith(".ipynb") and Path(path).is_file() else None


def show_source(obj) -> None:
    """Display the package's real source of ``obj``, so the text and the code cannot drift apart."""
    from IPython.display import Code, display

    display(Code(inspect.getsource(obj), language="python"))


def cmp(label: str, ours: torch.Tensor, reference: torch.Tensor, atol: float = 1e-5) -> bool:
    """Print whether two tensors are exactly equal, approximately equal, and their largest difference."""
    exact = torch.equal(ours, reference)
    approx = torch.allclose(ours, reference, atol=atol, rtol=0)
    maxdiff = (ours - reference).abs().max().item()
    print(f"{label:<40} exact: {str(exact):5} | approximate (atol {atol:g}): {str(approx):5} | max diff: {maxdiff:.2e}")
    return approx


def _same_form(answer, expected):
    """Answers in any reasonable form: a list for a tuple, a plain int for a float, a token written as text
    (" negative") or as the tokenizer shows it ("Ġnegative")."""
    if isinstance(expected, (tuple, list)) and isinstance(answer, (tuple, list)):
        return len(answer) == len(expected) and all(_same_form(a, e) for a, e in zip(answer, expected))
    if isinstance(expected, str) and isinstance(answer, str):
        def plain(token):
            return token.replace("Ġ", " ").replace("Ċ", "\n").strip()
        return plain(answer) == plain(expected)
    return answer == expected


def check(name: str, answer, expected, tol: float = 1e-6) -> None:
    """Check an exercise answer against the expected value; prints a verdict instead of raising."""
    if answer is None or answer is ...:
        print(f"{name}: not answered yet - replace the ... with your answer.")
        return
    if torch.is_tensor(expected):
        ok = torch.is_tensor(answer) and answer.shape == expected.shape and torch.allclose(answer.float(), expected.float(), atol=tol)
    elif isinstance(expected, float):
        try:
            ok = abs(float(answer) - expected) <= tol * max(1.0, abs(expected))
        except (TypeError, ValueError):
            ok = False
    else:
        ok = _same_form(answer, expected)
    print(f"{name}: {'correct' if ok else 'not yet - try again'}")


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2 ** 20:,.1f} MiB"
