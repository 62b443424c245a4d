"""ipywidgets panels: controls -> Run -> live loss curve -> comparison with earlier runs.

Explained in notebook 01_full_finetuning_and_freezing, section "Explore"; notebooks 02-04 reuse
``ExperimentPanel`` with their own controls.

A panel holds the frozen base model, a dict of control widgets and a ``make_tuned(base, **values)``
function that returns the model to train. Clicking Run trains a fresh copy, redraws the loss
curve after every step, measures accuracy and forgetting, and adds the run to the table and
plots. ``panel.runs`` keeps every run, so a test can drive the controls, click, and read results.
"""
from __future__ import annotations

import ipywidgets as W
import matplotlib.pyplot as plt
import torch
from IPython.display import clear_output, display

from . import measure, models, plots, train
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
        steps, lr = int(values.pop("steps")), float(values.pop("lr"))
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
                ax.set_title(f"{self.method_label(values)}: step {len(record.losses)}/{steps}")
                display(fig)

        run = train.fit(tuned, self.tokenizer, self.task, steps=steps, lr=lr, on_step=redraw,
                        method=self.method_label(values), progress=False)
        plt.close(fig)
        self.status.value = "measuring accuracy and forgetting ..."
        if self._base_scores is None:
            self._base_scores = measure.score_probes(self.base, self.tokenizer, measure.probe_set())
        measure.evaluate_run(run, self.base, tuned, self.tokenizer, self.task, base_scores=self._base_scores)
        self.runs.append(run)
        self.status.value = (f"done: accuracy {run.metrics['accuracy']:.1%}, "
                             f"{run.seconds_per_step:.2f} s/step, KL {run.metrics['kl']:.4f}")
        self.show_results()
        return run

    def show_results(self):
        import pandas as pd

        with self.results:
            clear_output(wait=True)
            display(pd.DataFrame(measure.comparison_rows(self.runs)).round(4))
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
    """Refuse settings whose predicted training memory exceeds what is free, with the prediction.

    Predicted: a gradient and AdamW's two moments (12 bytes) per trainable number, plus the weights of
    the copy the panel just made (already allocated, so only counted as a share of what is used),
    plus activations of about a quarter of the weights (measured in notebook 00 for batch 8).
    """
    params = train.trainable_parameters(tuned)
    trainable = sum(p.numel() for p in params)
    weights = train.tensor_bytes(tuned.parameters())
    predicted = 12 * trainable + weights // 4
    free = free_memory(next(tuned.parameters()).device)
    if predicted > free:
        raise MemoryError(f"These settings need about {predicted / 2**20:,.0f} MiB more for training "
                          f"({trainable:,} trainable numbers x 12 bytes + activations), but only "
                          f"{free / 2**20:,.0f} MiB are free{' (the copy of the model is already made)' if copied else ''}. "
                          "Train fewer parameters (a smaller rank, fewer blocks) or free memory first.")


def lr_slider(value=2e-5, low=-6, high=-2):
    return W.FloatLogSlider(value=value, base=10, min=low, max=high, step=0.25, description="learning rate",
                            readout_format=".0e", style={"description_width": "initial"})


def steps_slider(value=20, high=200):
    return W.IntSlider(value=value, min=1, max=high, step=1, description="steps")


def freezing_panel(base, tokenizer, task, steps: int = 20, lr: float = 2e-5, compare_with=()):
    """Notebook 01's panel: freezing choice, N blocks, learning rate, steps, Run."""
    n_layers = len(freeze.blocks(base))
    controls = {
        "choice": W.Dropdown(options=list(freeze.CHOICES), value="last_n", description="train"),
        "n": W.IntSlider(value=2, min=1, max=n_layers, description="N blocks"),
        "lr": lr_slider(lr),
        "steps": steps_slider(steps),
    }

    def make_tuned(model, choice, n):
        return freeze.apply(model, choice, n=n, verbose=False)

    def label(values):
        # "freeze ..." keeps panel runs apart from notebook 01's full fine-tuning baselines in the run log
        return "freeze " + (f"last {values['n']}" if values["choice"] == "last_n" else values["choice"])

    return ExperimentPanel(base, tokenizer, task, controls, make_tuned, title="Freezing choices",
                           method_label=label, compare_with=compare_with)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_panel(base, tokenizer, task, steps: int = 20, lr: float = 1e-3, compare_with=()):
    """Notebook 02_lora's panel: rank, alpha, target modules, dropout, learning rate, steps, Run.

    Explained in notebook 02_lora, section "Explore". Each run wraps a fresh copy of ``base`` with
    ``lora.apply`` and joins the comparison with ``compare_with`` (e.g. full fine-tuning).
    """
    from .methods import lora

    names = set(lora.linear_module_names(base))
    options = [t for t in LORA_TARGETS if t in names] or sorted(names)  # GPT-2 style models: c_attn, ...
    default = tuple(t for t in ("q_proj", "v_proj") if t in options) or (options[0],)
    wide = {"description_width": "initial"}
    controls = {
        "rank": W.IntSlider(value=8, min=1, max=64, description="rank r"),
        "alpha": W.FloatSlider(value=16, min=1, max=128, step=1, description="alpha", readout_format=".0f"),
        "targets": W.SelectMultiple(options=options, value=default, rows=len(options),
                                    description="target modules", style=wide),
        "dropout": W.FloatSlider(value=0.0, min=0.0, max=0.5, step=0.05, description="dropout"),
        "lr": lr_slider(lr),
        "steps": steps_slider(steps),
    }

    def make_tuned(model, rank, alpha, targets, dropout):
        if not targets:
            raise ValueError("Select at least one target module.")
        return lora.apply(model, rank=int(rank), alpha=float(alpha), targets=list(targets), dropout=float(dropout))

    def label(values):
        short = ",".join(t.split("_")[0] for t in values["targets"])
        return f"LoRA r={values['rank']} ({short})"

    return ExperimentPanel(base, tokenizer, task, controls, make_tuned, copy_base="frozen", title="LoRA",
                           method_label=label, compare_with=compare_with)


# A whole sentence that states the task. As a prefix it reads like this text, so P should equal its
# token count: cut mid-sentence or repeated, it reads like garbled text and starts far worse
# (notebook 03, section 6).
from .baselines import PREFIX_INIT_TEXT  # noqa: E402  (one init text for notebook 03, its panel and its baseline)


def prefix_panel(base, tokenizer, task, steps: int = 20, lr: float = 1e-3, compare_with=()):
    """Notebook 03's panel: prefix length, reparametrisation, init (random / text), learning rate, steps, Run.

    Explained in notebook 03_prefix_tuning, section "Explore". The prefix is evaluated as trained (a
    reparametrised prefix is not folded: folding changes no output). The length starts at the init
    text's token count.
    """
    from .methods import prefix

    text_tokens = len(tokenizer(PREFIX_INIT_TEXT).input_ids)
    controls = {
        "length": W.IntSlider(value=min(max(text_tokens, 1), 64), min=1, max=64, description="prefix P"),
        "reparametrize": W.Checkbox(value=False, description="reparametrise (MLP)"),
        "init": W.Dropdown(options=list(prefix.INITS), value="text", description="init"),
        "init_text": W.Text(value=PREFIX_INIT_TEXT, description="init text", style={"description_width": "initial"},
                            layout=W.Layout(width="80%")),
        "lr": lr_slider(lr, low=-5, high=-1),
        "steps": steps_slider(steps),
    }

    def make_tuned(model, length, reparametrize, init, init_text):
        return prefix.apply(model, int(length), reparametrize=bool(reparametrize), init=init,
                            init_text=init_text if init == "text" else None, tokenizer=tokenizer)

    def label(values):
        return (f"prefix P={values['length']}" + (" +MLP" if values["reparametrize"] else "")
                + f" ({values['init']})")

    return ExperimentPanel(base, tokenizer, task, controls, make_tuned, copy_base="frozen", title="Prefix tuning",
                           method_label=label, compare_with=compare_with)


def prompt_panel(base, tokenizer, task, steps: int = 20, lr: float = 3e-2, compare_with=(),
                 init_text: str = "Is this review positive or negative?"):
    """Notebook 04's panel: prompt length, initialisation (and its text), learning rate, steps, Run.

    Prompt tuning never changes the base model, so the panel puts each new prompt in front of ``base``
    itself instead of a copy (``copy_base=False``): one frozen model serves every prompt. Soft prompts
    want large learning rates, so the slider reaches 1. Explained in notebook 04_prompt_tuning, "Explore".
    """
    from .methods import prompt

    controls = {
        "length": W.IntSlider(value=20, min=1, max=100, description="prompt length"),
        "init": W.Dropdown(options=list(prompt.INITS), value="text", description="init"),
        "init_text": W.Text(value=init_text, description="init text", style={"description_width": "initial"},
                            layout=W.Layout(width="60%")),
        "lr": lr_slider(lr, low=-4, high=0),
        "steps": steps_slider(steps),
    }

    def make_tuned(model, length, init, init_text):
        return prompt.apply(model, int(length), init=init, init_text=init_text, tokenizer=tokenizer)

    def label(values):
        return f"prompt P={values['length']} ({values['init']})"

    return ExperimentPanel(base, tokenizer, task, controls, make_tuned, copy_base=False,
                           title="Prompt tuning", method_label=label, compare_with=compare_with)
