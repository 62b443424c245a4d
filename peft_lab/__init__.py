"""peft_lab: the helper package of the peft-lab workbook.

Floors, dependencies pointing downwards (see README.md):

* ground: ``models`` (loading, device, precision), ``data`` (tasks, batching);
* methods: ``methods/`` - LoRA, prefix, prompt, freezing, DoRA, IA3, each behind one contract
  (``methods/base.py``) and found through a registry (``methods.get("lora")``);
* engine: ``train`` (one loop), ``runlog`` (run records and the run log), ``measure``;
* face: ``plots``, ``widgets``, ``notebook``, ``colab`` (every notebook's first cell), ``run_notebooks`` and
  ``version`` (the runner of ``make run`` and the code-version stamp of a saved notebook).

Import the module you need, e.g. ``from peft_lab import lora`` (the method modules are re-exported
here under their short names).
"""

from .methods import dora, freeze, ia3, lora, prefix, prompt  # noqa: F401  (``from peft_lab import lora`` works)

__version__ = "0.1.0"
