"""Precision: which dtype runs where, the frozen base in half precision, fp32 master weights, and a memory
breakdown that is right in every precision (weight casts on their own line, never as activations)."""
import pytest
import torch

from peft_lab import freeze, lora, measure, models, train
from tests.conftest import make_tiny_task


@pytest.fixture
def bf16(monkeypatch):
    monkeypatch.setenv(models.PRECISION_ENV, "bf16")


def test_precision_choice_and_override(monkeypatch):
    monkeypatch.setenv(models.PRECISION_ENV, "fp32")
    assert models.compute_dtype("cpu") == torch.float32
    assert "fp32 everywhere" in models.precision_summary("cpu")
    monkeypatch.setenv(models.PRECISION_ENV, "bf16")
    assert models.compute_dtype("cpu") == torch.bfloat16
    assert "frozen base in bfloat16" in models.precision_summary("cpu")
    monkeypatch.setenv(models.PRECISION_ENV, "fp16")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        models.compute_dtype("cpu")
    monkeypatch.setenv(models.PRECISION_ENV, "half")
    with pytest.raises(ValueError, match="not one of"):
        models.compute_dtype("cpu")
    monkeypatch.setenv(models.PRECISION_ENV, "auto")
    expected = torch.bfloat16 if models.cpu_has_bf16() else torch.float32
    assert models.compute_dtype("cpu") == expected


def test_copies_fp32_master_and_frozen_half(tiny_llama):
    half = tiny_llama.to(torch.bfloat16)
    master = models.fresh_copy(half)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in master.parameters())
    frozen = models.frozen_copy(half)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen.parameters())
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())  # the original is untouched


def test_training_half_precision_weights_is_refused(tiny_llama, tokenizer):
    tuned = freeze.apply(tiny_llama.to(torch.bfloat16), "full", verbose=False)
    with pytest.raises(ValueError, match="fresh_copy"):
        train.fit(tuned, tokenizer, make_tiny_task(), steps=1, progress=False, log=False)


def test_lora_on_a_bf16_base_memory_matches_the_tensors(bf16, tiny_llama, tokenizer):
    tuned = lora.apply(models.frozen_copy(tiny_llama.to(torch.bfloat16)), rank=2, targets=["q_proj", "v_proj"])
    run = train.fit(tuned, tokenizer, make_tiny_task(), steps=3, lr=1e-3, batch_size=2, progress=False, log=False)
    trainable, total = run.trainable_params, run.total_params
    assert run.memory["weight_dtypes"] == {"bfloat16": total - trainable, "float32": trainable}
    assert run.memory["weights"] == 2 * (total - trainable) + 4 * trainable
    assert run.memory["gradients"] == 4 * trainable
    assert 8 * trainable <= run.memory["optimizer"] <= 8 * trainable + 64 * len(train.trainable_parameters(tuned))
    table = measure.memory_table(run)
    assert table["textbook prediction MiB"] == pytest.approx((2 * (total - trainable) + 16 * trainable) / 2 ** 20)
    assert table["textbook prediction MiB"] == pytest.approx(measure.predicted_memory(total, trainable)["frozen base in bfloat16"])


def _full_run(model, tokenizer):
    return train.fit(freeze.apply(models.fresh_copy(model), "full", verbose=False), tokenizer, make_tiny_task(),
                     steps=2, lr=1e-4, batch_size=4, progress=False, log=False)


def test_autocast_weight_casts_are_not_activations(monkeypatch, tiny_llama, tokenizer):
    monkeypatch.setenv(models.PRECISION_ENV, "fp32")
    fp32 = _full_run(tiny_llama, tokenizer)
    monkeypatch.setenv(models.PRECISION_ENV, "bf16")
    mixed = _full_run(tiny_llama, tokenizer)
    assert fp32.memory["weight_casts"] == 0
    linear_weights = sum(m.weight.numel() for m in tiny_llama.modules() if isinstance(m, torch.nn.Linear))
    # every linear weight is cast to bf16 once and saved for the backward pass: 2 bytes a number
    assert 0 < mixed.memory["weight_casts"] <= 2 * linear_weights
    assert mixed.memory["activations"] < fp32.memory["activations"]
    # master weights, gradients and AdamW stay fp32 whatever the compute precision
    for key in ("weights", "gradients", "optimizer"):
        assert mixed.memory[key] == fp32.memory[key]


def test_predicted_memory_per_precision():
    rows = measure.predicted_memory(total=1000, trainable=10)
    mib = 2 ** 20
    assert rows["frozen base in float32"] * mib == pytest.approx(4 * 990 + 16 * 10)
    assert rows["frozen base in bfloat16"] * mib == pytest.approx(2 * 990 + 16 * 10)
    assert rows["frozen base in 4-bit"] < rows["frozen base in bfloat16"]
    full = measure.predicted_memory(total=1000, trainable=1000)
    assert len(set(full.values())) == 1  # full fine-tuning: 16 bytes a parameter in every row


def test_maths_checks_run_in_fp32_on_an_fp32_twin_and_the_setting_comes_back(tiny_llama, monkeypatch):
    monkeypatch.setenv(models.PRECISION_ENV, "bf16")
    half = tiny_llama.to(torch.bfloat16)
    twin = models.fp32_twin(half)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in twin.parameters())
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())  # the base is untouched
    with models.fp32_compute():
        assert models.compute_dtype("cpu") == torch.float32
    assert models.compute_dtype("cpu") == torch.bfloat16
    monkeypatch.delenv(models.PRECISION_ENV)
    with models.fp32_compute():
        pass
    assert models.PRECISION_ENV not in __import__("os").environ
