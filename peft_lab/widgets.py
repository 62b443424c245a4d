"""ipywidgets panels: controls -> Run -> live loss curve -> comparison with earlier runs.

Explained in notebook 01_full_finetuning_and_freezing, section "Explore"; notebooks 02-04 reuse
``ExperimentPanel`` with their own controls.

A panel is declared as a table (``PANELS``): for each method, the controls *named after its
``apply`` arguments*, the fixed arguments, and how to copy the base. ``method_panel("lora", ...)``
builds it; the panel calls ``apply(model, **control values, **fixed)``, so a knob can be followed from
the widget straight to the argument, and from there to the layer. Adding a method's panel is one entry. Clicking Run trains a fresh copy, redraws the loss
curve after every step, measures accuracy and forgetting, and adds the run to the table and
plots. ``panel.runs`` keeps every run, so a test can drive the controls, click, and read results.
"""
from __future__ import annotations

import ipywidgets as W
import matplotlib.pyplot as plt
import torch
from IPython.display import clear_output, display

from . import measure, memory, methods, models, planner, plots, runlog, train
from .methods import freeze


class ExperimentPanel:
    """Controls, a Run button, a live loss plot, and a growing comparison of runs."""

    def __init__(self, base, tokenizer, task, controls: dict, make_tuned, copy_base: bool = True,
                 title: str = "Experiment", method_label=None, compare_with=()):
        self.base, self.tokenizer, self.task = base, tokenizer, task
        self.controls = controls
        self.make_tuned = make_tuned
        self.copy_base = copy_base
        self.method_label = method_label or (lambda values: title)
        self.runs = list(compare_with)
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.status = W.HTML()
        self.live = W.Output()
        self.results = W.Output()
        self.run_button.on_click(self._on_click)
        self._base_scores = None
        self.widget = W.VBox([W.HTML(f"<b>{title}</b>"), *controls.values(),
                              W.HBox([self.run_button, self.status]), self.live, self.results])

    def values(self) -> dict:
        return {name: c.value for name, c in self.controls.items()}

    def _ipython_display_(self):
        display(self.widget)

    def _on_click(self, _button):
        self.run_button.disabled = True
        try:
            self.run()
        except Exception as err:  # show the error in the panel instead of losing it in a log
            self.status.value = f"<span style='color:#b00'>Error: {err}</span>"
            raise
        finally:
            self.run_button.disabled = False

    def run(self):
        """Train once with the current control values; returns the run record."""
        values = self.values()
        # a log slider moves in steps of 10**0.25 and cannot land on 2e-4; train at the one significant figure
        # its readout shows (1.78e-4 reads "2e-04", so it trains at 2e-4)
        steps, lr = int(values.pop("steps")), float(f"{float(values.pop('lr')):.0e}")
        name = self.method_label(values)
        self.status.value = "training ..."
        # True: a trainable fp32 copy (freezing choices); "frozen": a frozen copy in the base's own
        # precision for a method to attach to (LoRA, prefix); False: the base itself (soft prompts)
        start = (models.fresh_copy(self.base) if self.copy_base is True
                 else models.frozen_copy(self.base) if self.copy_base == "frozen" else self.base)
        torch.manual_seed(0)  # random starts (LoRA's A, random prompts) are the same run after run
        tuned = self.make_tuned(start, **values)
        check_memory(tuned, start is not self.base)
        fig, ax = plt.subplots(figsize=(6, 3))

        def redraw(record):
            if len(record.losses) % max(1, steps // 20) and len(record.losses) != steps:
                return  # redraw about twenty times per run, not every step
            with self.live:
                clear_output(wait=True)
                ax.clear()
                ax.plot(range(1, len(record.losses) + 1), record.losses)
                ax.set_xlabel("step")
                ax.set_ylabel("loss")
                ax.set_title(f"{name}: step {len(record.losses)}/{steps}")
                display(fig)

        # the panel's label already names the settings; only the learning rate is added (the default label
        # would repeat them: "prefix P=19 +MLP (text) P=19 init text, lr 1e-4")
        run = train.fit(tuned, self.tokenizer, self.task, steps=steps, lr=lr, on_step=redraw,
                        tag=name, progress=False, label=f"{name}, lr {runlog.short_number(lr)}")
        plt.close(fig)
        self.status.value = "measuring accuracy and forgetting ..."
        if self._base_scores is None:
            self._base_scores = measure.base_probe_scores(self.base, self.tokenizer, measure.probe_set())
        measure.evaluate_run(run, self.base, tuned, self.tokenizer, self.task, base_scores=self._base_scores)
        self.runs.append(run)
        low, high = measure.accuracy_interval(run.metrics)
        self.status.value = (f"done: accuracy {run.metrics['accuracy']:.1%} [{low:.1%}, {high:.1%}], "
                             f"{run.seconds_per_step:.2f} s/step, KL {run.metrics['kl']:.4f}")
        self.show_results()
        return run

    def show_results(self):
        import pandas as pd

        with self.results:
            clear_output(wait=True)
            display(pd.DataFrame(measure.comparison_rows(self.runs), index=[r.label for r in self.runs]).round(4))
            fig = plots.comparison(self.runs, title="All runs of this panel")
            display(fig)
            plt.close(fig)


def free_memory(device) -> int:
    """Bytes free for training on ``device``: CUDA's free memory, or the system's available memory."""
    import psutil

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def check_memory(tuned, copied: bool) -> None:
    """Refuse settings whose training needs more memory than is free (``memory.rough_training_bytes``), with the
    prediction."""
    predicted = memory.rough_training_bytes(tuned)
    free = free_memory(next(tuned.parameters()).device)
    if predicted > free:
        trainable = sum(p.numel() for p in train.trainable_parameters(tuned))
        raise MemoryError(f"These settings need about {predicted / 2**20:,.0f} MiB more for training "
                          f"({trainable:,} trainable numbers x 12 bytes + activations), but only "
                          f"{free / 2**20:,.0f} MiB are free{' (the copy of the model is already made)' if copied else ''}. "
                          "Train fewer parameters (a smaller rank, fewer blocks) or free memory first.")


def lr_slider(value=2e-5, low=-6, high=-2):
    return W.FloatLogSlider(value=value, base=10, min=low, max=high, step=0.25, description="learning rate",
                            readout_format=".0e", style={"description_width": "initial"})


def steps_slider(value=20, high=200):
    return W.IntSlider(value=value, min=1, max=high, step=1, description="steps")


WIDE = {"description_width": "initial"}
LORA_TARGETS = models.LLAMA_LINEARS

# A whole sentence that states the task. As a prefix it reads like this text, so P should equal its
# token count: cut mid-sentence or repeated, it reads like garbled text and starts far worse
# (notebook 03, section 6).
from .baselines import PREFIX_INIT_TEXT  # noqa: E402  (one init text for notebook 03, its panel and its baseline)
PROMPT_INIT_TEXT = "Decide whether the following customer review is positive or negative."  # notebook 04's TEXT


def _freeze_controls(base, tokenizer):
    return {"choice": W.Dropdown(options=list(freeze.CHOICES), value="last_n", description="train"),
            "n": W.IntSlider(value=2, min=1, max=len(freeze.blocks(base)), description="N blocks")}


def _lora_controls(base, tokenizer):
    from .methods import lora

    names = set(lora.linear_module_names(base))
    options = [t for t in LORA_TARGETS if t in names] or sorted(names)  # GPT-2 style models: c_attn, ...
    default = tuple(t for t in ("q_proj", "v_proj") if t in options) or (options[0],)
    return {"rank": W.IntSlider(value=8, min=1, max=64, description="rank r"),
            "alpha": W.FloatSlider(value=16, min=1, max=128, step=1, description="alpha", readout_format=".0f"),
            "targets": W.SelectMultiple(options=options, value=default, rows=len(options),
                                        description="target modules", style=WIDE),
            "dropout": W.FloatSlider(value=0.0, min=0.0, max=0.5, step=0.05, description="dropout")}


def _prefix_controls(base, tokenizer):
    from .methods import prefix

    text_tokens = len(tokenizer(PREFIX_INIT_TEXT).input_ids)
    return {"num_virtual_tokens": W.IntSlider(value=min(max(text_tokens, 1), 64), min=1, max=64, description="prefix P"),
            "reparametrize": W.Checkbox(value=False, description="reparametrise (MLP)"),
            "init": W.Dropdown(options=list(prefix.INITS), value="text", description="init"),
            "init_text": W.Text(value=PREFIX_INIT_TEXT, description="init text", style=WIDE, layout=W.Layout(width="80%"))}


def _prompt_controls(base, tokenizer, init_text=PROMPT_INIT_TEXT):
    from .methods import prompt

    # one virtual token per token of the text, as in notebook 04: the text fits whole, neither cut nor repeated
    text_tokens = len(tokenizer(init_text, add_special_tokens=False).input_ids)
    return {"num_virtual_tokens": W.IntSlider(value=min(max(text_tokens, 1), 100), min=1, max=100, description="prompt P"),
            "init": W.Dropdown(options=list(prompt.INITS), value="text", description="init"),
            "init_text": W.Text(value=init_text, description="init text", style=WIDE, layout=W.Layout(width="60%"))}


def _lora_label(v):
    return f"LoRA r={v['rank']} ({','.join(t.split('_')[0] for t in v['targets'])})"


# method -> how its panel is built. "controls" are named after the method's ``apply`` arguments;
# "fixed" are further arguments; "copy": True = a trainable fp32 copy (freezing), "frozen" = a frozen
# copy in the base's precision (LoRA, prefix), False = the base itself (soft prompts never change it).
PANELS = {
    "freeze": {"title": "Freezing choices", "controls": _freeze_controls, "fixed": lambda tok: {"verbose": False},
               "copy": True, "lr_range": (-6, -2),
               # "freeze ..." keeps panel runs apart from notebook 01's full fine-tuning baselines in the run log
               "label": lambda v: "freeze " + (f"last {v['n']}" if v["choice"] == "last_n" else v["choice"])},
    "lora": {"title": "LoRA", "controls": _lora_controls, "fixed": lambda tok: {}, "copy": "frozen",
             "lr_range": (-6, -2), "label": _lora_label},
    "prefix": {"title": "Prefix tuning", "controls": _prefix_controls, "fixed": lambda tok: {"tokenizer": tok},
               "copy": "frozen", "lr_range": (-5, -1),
               "label": lambda v: f"prefix P={v['num_virtual_tokens']}" + (" +MLP" if v["reparametrize"] else "") + f" ({v['init']})"},
    "prompt": {"title": "Prompt tuning", "controls": _prompt_controls, "fixed": lambda tok: {"tokenizer": tok},
               "copy": False, "lr_range": (-4, 0),
               "label": lambda v: f"prompt P={v['num_virtual_tokens']} ({v['init']})"},
}


def _clean(value):
    """Widget values as ``apply`` wants them: a multiple selection is a list."""
    return list(value) if isinstance(value, tuple) else value


def method_panel(method: str, base, tokenizer, task, steps: int = 20, lr: float = 1e-3, compare_with=(),
                 controls: dict | None = None) -> ExperimentPanel:
    """The panel of ``method`` (a key of ``PANELS``): its controls, learning rate, steps and Run.

    Each Run calls ``apply(copy of base, **control values, **fixed)`` of the method's module.
    """
    if method not in PANELS:
        raise ValueError(f"No panel for {method!r}; panels exist for {', '.join(PANELS)}.")
    spec = PANELS[method]
    module = freeze if method == "freeze" else methods.get(method)
    controls = {**(controls or spec["controls"](base, tokenizer)),
                "lr": lr_slider(lr, *spec["lr_range"]), "steps": steps_slider(steps)}
    fixed = spec["fixed"](tokenizer)

    def make_tuned(model, **values):
        if "targets" in values and not values["targets"]:
            raise ValueError("Select at least one target module.")
        if values.get("init") != "text":
            values.pop("init_text", None)  # only a text init reads it
        return module.apply(model, **{k: _clean(v) for k, v in values.items()}, **fixed)

    return ExperimentPanel(base, tokenizer, task, controls, make_tuned, copy_base=spec["copy"], title=spec["title"],
                           method_label=spec["label"], compare_with=compare_with)


def freezing_panel(base, tokenizer, task, steps: int = 20, lr: float = 2e-5, compare_with=()):
    """Notebook 01's panel: freezing choice, N blocks, learning rate, steps, Run. Explained in notebook 01, section 5."""
    return method_panel("freeze", base, tokenizer, task, steps, lr, compare_with)


def lora_panel(base, tokenizer, task, steps: int = 20, lr: float = 1e-3, compare_with=()):
    """Notebook 02's panel: rank, alpha, target modules, dropout. Explained in notebook 02_lora, section "Explore"."""
    return method_panel("lora", base, tokenizer, task, steps, lr, compare_with)


def prefix_panel(base, tokenizer, task, steps: int = 20, lr: float = 1e-3, compare_with=()):
    """Notebook 03's panel: prefix length, reparametrisation, init and its text. The prefix is evaluated as
    trained (folding changes no output). Explained in notebook 03_prefix_tuning, section "Explore"."""
    return method_panel("prefix", base, tokenizer, task, steps, lr, compare_with)


def prompt_panel(base, tokenizer, task, steps: int = 20, lr: float = 3e-2, compare_with=(),
                 init_text: str = PROMPT_INIT_TEXT):
    """Notebook 04's panel: prompt length, init and its text. One frozen model serves every prompt, so no
    copy is made. Soft prompts want large learning rates: the slider reaches 1. Explained in notebook 04_prompt_tuning, "Explore"."""
    return method_panel("prompt", base, tokenizer, task, steps, lr, compare_with,
                        controls=_prompt_controls(base, tokenizer, init_text))


# --- the memory planner's panel --------------------------------------------------------------------

class PlannerPanel:
    """Dropdowns (model, method, precision, loss), sliders (batch, sequence length) and a checkbox (gradient
    checkpointing): a stacked bar per method with the T4's 14.75 GiB drawn in, and the answer in words. ``controls`` and ``answer`` are there for tests."""

    def __init__(self, model: str = "smollm2-360m", method: str = "lora", precision: str = "bf16"):
        self.controls = {
            "model": W.Dropdown(options=planner.configs(), value=model, description="model"),
            "method": W.Dropdown(options=planner.METHODS, value=method, description="method"),
            "precision": W.Dropdown(options=planner.PRECISIONS, value=precision, description="base"),
            "batch": W.IntSlider(value=8, min=1, max=64, description="batch"),
            "seq_len": W.SelectionSlider(options=[2 ** k for k in range(5, 14)], value=512, description="seq len"),
            "checkpointing": W.Checkbox(value=False, description="gradient checkpointing"),
            "loss": W.Dropdown(options=[("label token", "label"), ("every token (text)", "text")], value="label",
                               description="loss on"),
        }
        self.answer = W.HTML()
        self.figure = W.Output()
        for c in self.controls.values():
            c.observe(lambda _change: self.update(), names="value")
        self.widget = W.VBox([W.HTML("<b>Memory planner</b>"), *self.controls.values(), self.figure, self.answer])
        self.update()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def update(self):
        v = {k: c.value for k, c in self.controls.items()}
        method, precision = v["method"], v["precision"]
        if method == "full" and precision == "4-bit":
            precision = "bf16"  # full fine-tuning keeps fp32 masters: show it with bf16 compute
        levers = {"checkpointing": v["checkpointing"], "loss": v["loss"]}
        self.answer.value = planner.answer(v["model"], method, precision, v["batch"], v["seq_len"], **levers)
        with self.figure:
            from IPython.display import clear_output

            clear_output(wait=True)
            plots.planner_bars(v["model"], v["precision"], v["batch"], v["seq_len"], highlight=method, **levers)


def planner_panel(model: str = "smollm2-360m", method: str = "lora", precision: str = "bf16") -> PlannerPanel:
    """The memory planner (``planner``) as an interactive panel (display it as a cell's last line). Explained in notebook
    05_showdown, section 7."""
    return PlannerPanel(model, method, precision)


class ChatPanel:
    """A message box and an Ask button: each model's greedy answer (``chat.reply``, through the chat template)
    side by side. ``models`` maps a name to a model: the base and the tuned ones. ``message``, ``ask`` and
    ``replies`` are there for tests."""

    def __init__(self, models: dict, tokenizer, message: str = "", max_new_tokens: int = 64):
        if not models:
            raise ValueError("Give the panel at least one model to ask: {'base': base, 'LoRA': tuned, ...}.")
        self.models, self.tokenizer, self.max_new_tokens = dict(models), tokenizer, max_new_tokens
        self.message = W.Textarea(value=message, placeholder="Type a message to the models",
                                  layout=W.Layout(width="100%", height="70px"))
        self.button = W.Button(description="Ask", button_style="primary", icon="comment")
        self.status = W.HTML()
        self.table = W.HTML()
        self.replies = {}
        self.button.on_click(lambda _button: self.ask())
        self.widget = W.VBox([W.HTML("<b>Chat with the base and the tuned models</b> (greedy, the chat template)"),
                              self.message, W.HBox([self.button, self.status]), self.table])

    def _ipython_display_(self):
        display(self.widget)

    def ask(self) -> dict:
        """Every model's answer to the message in the box; shown as a table and returned."""
        import html

        from . import chat

        self.button.disabled = True
        self.status.value = "answering ..."
        try:
            self.replies = {name: chat.reply(model, self.tokenizer, self.message.value, self.max_new_tokens)
                            for name, model in self.models.items()}
            self.status.value = ""
        except ValueError as err:  # an empty message: say so in the panel
            self.status.value = f"<span style='color:#b00'>{html.escape(str(err))}</span>"
            return {}
        finally:
            self.button.disabled = False
        rows = "".join(f"<tr><td style='text-align:left;vertical-align:top'><b>{html.escape(name)}</b></td>"
                       f"<td style='text-align:left;font-family:monospace;white-space:pre-wrap'>{html.escape(text)}</td></tr>"
                       for name, text in self.replies.items())
        self.table.value = f"<table>{rows}</table>"
        return self.replies


def chat_panel(models: dict, tokenizer, message: str = "", max_new_tokens: int = 64) -> ChatPanel:
    """Ask the base and the tuned models the same message, answers side by side (display it as a cell's last
    line). Explained in notebook 08_chat_tuning, section 6."""
    return ChatPanel(models, tokenizer, message, max_new_tokens)
