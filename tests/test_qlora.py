"""QLoRA as a method of its own (``methods/qlora.py``, conformance in test_method_contract.py): it refuses a base
that is not stored in 4 bits, its backward pass keeps no dequantised weight, a run counts the 4-bit weights, the
three merges differ as they should; gradient checkpointing changes the numbers only by float rounding."""
import pytest
import torch

from peft_lab import checkpointing, memory, models, nf4, train
from peft_lab.methods import lora, qlora

IDS = torch.tensor([[4, 5, 6, 7, 8, 9]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_qlora_refuses_a_base_that_is_not_4bit(tiny_llama):
    with pytest.raises(ValueError, match="nf4.quantize_model"):
        qlora.apply(tiny_llama)
    assert not any(isinstance(m, nf4.Linear4bit) for m in tiny_llama.modules())   # nothing quantised in place


def test_a_4bit_layer_saves_no_dequantised_weight_and_gets_the_input_gradient_right():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64)
    layer = nf4.Linear4bit(linear)
    x = torch.randn(3, 128, requires_grad=True)
    with memory.count_saved_activations([]) as saved:
        y = layer(x)
    assert saved["bytes"] == 0     # neither the dequantised weight (64 x 128) nor anything else is kept
    y.pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    reference = torch.nn.functional.linear(x2, layer.dequantized_weight(), layer.bias)
    reference.pow(2).sum().backward()
    assert torch.equal(y, reference) and torch.allclose(x.grad, x2.grad, atol=1e-6)


def test_a_qlora_run_counts_its_4bit_weights(tiny_llama, tokenizer, task):
    total = sum(p.numel() for p in tiny_llama.parameters())
    four_bit = nf4.quantize_model(models.frozen_copy(tiny_llama))
    tuned = qlora.apply(four_bit, rank=2, targets="all-linear")
    run = train.fit(tuned, tokenizer, task, steps=2, lr=1e-2, batch_size=2, progress=False, log=False)
    assert run.method == "qlora" and run.total_params == total + run.trainable_params
    assert run.memory["weight_dtypes"]["nf4 double-quantised"] == sum(
        layer.in_features * layer.out_features for layer in nf4.layers_4bit(tuned).values())
    plain = sum(p.numel() * p.element_size() for p in tuned.parameters())
    assert run.memory["weights"] == plain + nf4.storage_bytes_4bit(tuned)
    table = memory.memory_table(run)
    assert table["textbook prediction MiB"] == pytest.approx(table["weights+grads+optimizer MiB"], rel=0.02)


def test_the_three_merges(tiny_llama, tokenizer, task):
    four_bit = nf4.quantize_model(models.frozen_copy(tiny_llama))
    tuned = qlora.apply(four_bit, rank=2, targets=["q_proj", "v_proj"])
    train.fit(tuned, tokenizer, task, steps=3, lr=3e-2, batch_size=2, progress=False, log=False)
    unmerged = _logits(tuned)
    dequantized = qlora.merged_copy(tuned, "dequantized", original=tiny_llama)
    original = qlora.merged_copy(tuned, "original", original=tiny_llama)
    requantized = qlora.merged_copy(tuned, "requantized", original=tiny_llama)
    assert torch.allclose(_logits(dequantized), unmerged, atol=1e-5)    # the trained model itself, at full size
    assert not torch.allclose(_logits(original), unmerged, atol=1e-3)   # every layer off by the quantisation error
    assert nf4.layers_4bit(requantized) and not nf4.layers_4bit(dequantized)
    assert lora.lora_layers(tuned)                                      # the tuned model is left as it was
    assert torch.equal(_logits(tuned), unmerged)
    with pytest.raises(ValueError, match="how must be one of"):
        qlora.merged_copy(tuned, "somehow", original=tiny_llama)


def test_a_4bit_state_dict_round_trips(tiny_llama):
    a = nf4.quantize_model(models.frozen_copy(tiny_llama))
    torch.manual_seed(1)
    other = models.frozen_copy(tiny_llama)
    for p in other.parameters():
        p.data.add_(torch.randn_like(p) * 0.1)
    b = nf4.quantize_model(other)
    b.load_state_dict(a.state_dict())     # the double quantisation's offset travels in the state dict too
    assert torch.equal(_logits(a), _logits(b))


@pytest.mark.parametrize("make", [models.fresh_copy, lambda m: lora.apply(models.frozen_copy(m), rank=2)],
                         ids=["full", "lora"])
def test_gradient_checkpointing_changes_the_numbers_only_by_rounding(make, tiny_llama, tokenizer):
    plain = checkpointing.measure(make, tiny_llama, tokenizer, tokens=24, checkpointing=False, steps=3, batch_size=2)
    again = checkpointing.measure(make, tiny_llama, tokenizer, tokens=24, checkpointing=True, steps=3, batch_size=2)
    assert plain["losses"] == pytest.approx(again["losses"], rel=1e-3)   # gradients summed in another order
    assert len(plain["losses"]) == 3 and plain["s/step"] > 0
    assert again["gradients+optimizer MiB"] == plain["gradients+optimizer MiB"]
    assert plain["of which block inputs MiB"] == 0 < again["of which block inputs MiB"]
    assert again["activations MiB"] < plain["activations MiB"]      # only the blocks' inputs stay, not their insides


def test_the_prose_task_is_as_wide_as_asked(tokenizer):
    task = checkpointing.prose_task(tokenizer, tokens=16, rows=5)
    assert len(task.train) == 5 and task.is_text
    assert all(len(tokenizer(t, add_special_tokens=False).input_ids) >= 16 for t, _ in task.train)


def _tiny_qwen2():
    """A tiny Qwen2 (biases on q, k and v, untied head): the other architecture the planner and the hub list name."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).eval()


def test_qlora_on_a_qwen2_keeps_the_biases_and_round_trips(tmp_path):
    base = _tiny_qwen2()
    four_bit = nf4.quantize_model(models.frozen_copy(base))
    layers = nf4.layers_4bit(four_bit)
    assert len(layers) == 2 * 7                                    # every block linear, not the untied head
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q.bias is not None and torch.equal(q.bias, base.model.layers[0].self_attn.q_proj.bias)
    before = _logits(four_bit)
    tuned = qlora.apply(four_bit, rank=2, targets="all-linear")
    with torch.no_grad():
        for layer in lora.lora_layers(tuned).values():
            layer.lora_B.weight.normal_(std=0.05)                  # a trained-looking adapter
    trained = _logits(tuned)
    assert not torch.allclose(trained, before, atol=1e-4)
    qlora.save(tuned, tmp_path)
    again = qlora.load(nf4.quantize_model(models.frozen_copy(base)), tmp_path)
    assert torch.equal(_logits(again), trained)
    qlora.remove(again)
    assert torch.equal(_logits(again), before)                     # the 4-bit base is as it was
