"""peft_lab: the helper package of the peft-lab workbook.

Floors, dependencies pointing downwards (see README.md); every module, by floor:

* ground: ``models`` (loading, device, precision, the machine in words), ``data`` (tasks, batching, the
  invented facts, probes and prose), ``version`` (the code version of the package and data);
* methods (``methods/``): ``base`` (the contract), ``layer_wrappers`` (the shared house of the methods that wrap
  linear layers), ``lora``, ``dora``, ``ia3``, ``qlora`` (LoRA over a 4-bit base); ``virtual_tokens`` (the shared house of those that add virtual
  positions), ``prefix``, ``prompt``; ``freeze`` (freezing choices); a registry in ``methods/__init__``
  (``methods.get("lora")``);
* engine: ``recipes`` (the named ways to fine-tune that grids and baselines build, and their names), ``train``
  (one loop), ``memory`` (a step's memory measured part by part, the peak, the textbook
  arithmetic, and every part predicted from a model's architecture numbers), ``runlog`` (run records and the run
  log: each run's method, tag and label), ``stats`` (intervals, paired tests, verdicts), ``measure``
  (accuracy, forgetting), ``study`` (resumable grids), ``showdown`` (notebook 05's measurements),
  ``showdown_grid`` (the shipped grid of 05: its definition, its results, their provenance), ``promises`` (PEFT's
  promises judged from the numbers; which method when), ``planner`` (will it train on that GPU: the memory prediction in words, and checked against real steps), ``nf4`` (QLoRA's 4-bit
  NormalFloat storage, from scratch), ``checkpointing`` (gradient checkpointing, measured), ``libraries`` (QLoRA
  through bitsandbytes and peft, compared with ours), ``chat`` (instruction tuning: conversations through the chat
  template, the loss on the answer only, answers graded), ``baselines`` (the runs notebooks compare against);
* face: ``plots``, ``widgets`` (panels), ``notebook`` (notebook helpers), ``exercises`` (exercise checks),
  ``colab`` (every notebook's first cell), ``run_notebooks`` (the runner of ``make run``, which stamps each saved
  notebook); ``accelerator_check`` (the tests' pretend accelerator).

Import the module you need, e.g. ``from peft_lab import lora`` (the method modules are re-exported
here under their short names).
"""

from .methods import dora, freeze, ia3, lora, prefix, prompt, qlora  # noqa: F401  (``from peft_lab import lora`` works)

__version__ = "0.1.0"
