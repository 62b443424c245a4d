"""The pretend accelerator: CPU tensors fed to the model must fail on a CPU-only machine, as on a GPU.

The notebooks run under it in CI (``PEFT_LAB_CHECK_DEVICES=1``), so these tests show that it refuses
what a GPU refuses (and lets through what a GPU lets through), on a tiny model and on a real notebook.
"""
import json
import sys

import pytest
import torch

from peft_lab import accelerator_check, data, lora, measure, prefix, prompt, train
from tests.conftest import make_tiny_llama, make_tiny_task, make_tokenizer


@pytest.fixture
def simulated():
    accelerator_check.enable()
    try:
        yield
    finally:
        accelerator_check.disable()


def _model_on_accelerator():
    model = make_tiny_llama().requires_grad_(False)
    return model.to(torch.device("cpu"))  # under the check, a move to a device puts buffers on the accelerator


def test_host_ids_fed_to_the_model_fail(simulated, tokenizer):
    model = _model_on_accelerator()
    ids = tokenizer("the film was great", return_tensors="pt").input_ids
    with pytest.raises(RuntimeError, match="same device"):
        model(input_ids=ids)


def test_ids_on_the_model_device_pass(simulated, tokenizer):
    model = _model_on_accelerator()
    ids = data.token_ids(tokenizer, "the film was great", device=model)
    logits = model(input_ids=ids).logits
    assert accelerator_check.on_accelerator(logits)
    assert not accelerator_check.on_accelerator(logits.cpu())
    with pytest.raises(TypeError, match="numpy"):
        logits.numpy()
    logits.cpu().numpy()  # the host copy is fine


def test_encode_with_device_and_generation(simulated, tokenizer):
    model = _model_on_accelerator()
    task = make_tiny_task()
    batch = data.encode(task.test, task, tokenizer, device=model)
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with pytest.raises(RuntimeError, match="same device"):
        plain = data.encode(task.test, task, tokenizer)
        model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"])
    with pytest.raises(RuntimeError, match="same device"):
        torch.cat([plain["input_ids"], batch["input_ids"]], dim=1)  # a host and an accelerator tensor
    # what a GPU allows: 0-dim host scalars, copying in, and indexing with host indices
    batch["input_ids"] * torch.tensor(1)
    batch["input_ids"][:, :1] = plain["input_ids"][:, :1]
    batch["input_ids"][torch.tensor([0])]


def test_package_code_is_device_clean(simulated, tokenizer, panel_env):
    """Training, measuring and the three methods run under the check: the package moves what it makes."""
    base = _model_on_accelerator()
    task = make_tiny_task()
    ids = data.token_ids(tokenizer, "the film was", device=base)
    for tuned in (lora.apply(make_tiny_llama().to(torch.device("cpu")), rank=2, targets=["q_proj", "v_proj"]),
                  prefix.apply(base, 3), prompt.apply(base, 3)):
        run = train.fit(tuned, tokenizer, task, steps=2, lr=1e-3, batch_size=2, progress=False, log=False)
        measure.evaluate_run(run, base, tuned, tokenizer, task)
        tuned.generate(ids, max_new_tokens=2, pad_token_id=0)


def _notebook(cells):
    return {"cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None, "outputs": [], "source": c}
                      for i, c in enumerate(cells)],
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


SETUP = f"""
import sys, torch
sys.path.insert(0, {str(__import__('pathlib').Path(__file__).resolve().parent.parent)!r})
from peft_lab import notebook, data
notebook.setup()
from tests.conftest import make_tiny_llama, make_tokenizer
base, tok = make_tiny_llama().to(data.device_of("cpu")), make_tokenizer()
"""


@pytest.mark.parametrize("cell, fails", [
    ("base(input_ids=tok('the film was great', return_tensors='pt').input_ids)", True),
    ("base(input_ids=data.token_ids(tok, 'the film was great', device=base))", False),
])
def test_a_notebook_cell_feeding_a_cpu_tensor_fails(tmp_path, monkeypatch, cell, fails):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv(accelerator_check.ENV, "1")
    nb = nbformat.reads(json.dumps(_notebook([SETUP, cell])), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    if fails:
        with pytest.raises(nbclient.exceptions.CellExecutionError, match="same device"):
            client.execute()
    else:
        client.execute()
