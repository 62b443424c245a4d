"""peft_lab: the helper package of the peft-lab workbook.

One module per idea (see README.md): models, data, freeze, lora, prefix, prompt, train, measure,
plots, widgets. Import the module you need, e.g. ``from peft_lab import lora``.
"""

__version__ = "0.1.0"
