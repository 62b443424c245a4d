"""Precision on a GPU is decided by its compute capability: a faked T4 gets fp16 with loss scaling, a faked A100
bf16, though ``torch.cuda.is_bf16_supported()`` answers True for both (on a T4 it counts emulated bf16)."""
import types

import pytest
import torch

from peft_lab import models, notebook, planner

CARDS = {  # name, compute capability, memory CUDA reports
    "T4": ("Tesla T4", (7, 5), planner.T4_BYTES),
    "A100": ("NVIDIA A100-SXM4-40GB", (8, 0), 40 * 2 ** 30),
}


@pytest.fixture(params=list(CARDS))
def card(request, monkeypatch):
    name, capability, memory = CARDS[request.param]
    monkeypatch.delenv(models.PRECISION_ENV, raising=False)
    monkeypatch.delenv("PEFT_LAB_CHECK_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 answers too
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(name=name, major=capability[0], minor=capability[1],
                                                                  total_memory=memory))
    monkeypatch.setattr(torch, "manual_seed", lambda seed: None)  # no real CUDA to seed
    return request.param


def test_the_precision_follows_the_compute_capability(card):
    expected = {"T4": torch.float16, "A100": torch.bfloat16}[card]
    assert models.pick_device().type == "cuda"
    assert models.compute_dtype("cuda") == expected
    assert models.cuda_has_fast_bf16("cuda") == (card == "A100")


def test_the_setup_cell_prints_the_card_and_its_precision(card, capsys):
    facts = notebook.setup()
    printed = capsys.readouterr().out
    line = next(l for l in printed.splitlines() if l.startswith("precision"))
    assert facts["device"] == f"cuda ({CARDS[card][0]})" and CARDS[card][0] in printed
    if card == "T4":
        assert "frozen base in float16" in line and "compute capability 7.5" in line and "loss scaling" in line
    else:
        assert "frozen base in bfloat16" in line and "compute capability 8.0" in line and "bf16 in hardware" in line


def test_the_memory_prediction_for_each_card(card):
    precision = planner.base_precision("cuda")
    assert precision == "bf16"  # fp16 (T4) and bf16 (A100) both store the base in 2 bytes a number
    half = planner.predict("smollm2-360m", "lora", precision, batch=8, seq_len=512)
    full = planner.predict("smollm2-360m", "lora", "fp32", batch=8, seq_len=512)
    params = planner.parameter_count("smollm2-360m")
    assert full["weights"] - half["weights"] == 2 * params  # 4 bytes a number against 2
    if card == "T4":
        text = planner.answer("smollm2-360m", "lora", precision, 8, 512)
        assert "fits on a free T4" in text and f"of the {planner.gib(planner.T4_BYTES - planner.CUDA_CONTEXT_BYTES)} GiB left" in text


def test_a_forced_precision_still_wins(card, monkeypatch):
    monkeypatch.setenv(models.PRECISION_ENV, "fp32")
    assert models.compute_dtype("cuda") == torch.float32
    monkeypatch.setenv(models.PRECISION_ENV, "bf16")
    assert models.compute_dtype("cuda") == torch.bfloat16  # asked for explicitly, even on a T4
