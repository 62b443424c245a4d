"""The shared house of the layer methods: one wrapper base, one way to wrap and unwrap, peft's layout read and
written once, and a typed config per method that maps to peft's names both ways."""
import pytest
import torch

from peft_lab.methods import dora, ia3, layer_wrappers, lora


@pytest.mark.parametrize("module, settings", [(lora, {"rank": 2}), (dora, {"rank": 2}), (ia3, {})],
                         ids=["lora", "dora", "ia3"])
def test_every_layer_method_wraps_and_unwraps_through_the_house(module, settings, tiny_llama):
    grads = {n: p.requires_grad for n, p in tiny_llama.named_parameters()}
    tiny_llama.model.embed_tokens.weight.requires_grad_(False)  # a choice the method must give back
    grads["model.embed_tokens.weight"] = False
    tuned = module.apply(tiny_llama, **settings)
    wrapped = layer_wrappers.layers_of(tuned, layer_wrappers.WrappedLinear)
    assert wrapped and all(l.label == {"lora": "LoRA", "dora": "DoRA", "ia3": "IA3"}[module.__name__.rsplit(".", 1)[-1]]
                           for l in wrapped.values())
    trained = {id(p) for l in wrapped.values() for p in l.trained_parameters()}
    assert {id(p) for p in tuned.parameters() if p.requires_grad} == trained  # exactly the wrappers' own numbers
    with pytest.raises(ValueError, match="already has"):
        (lora if module is ia3 else ia3).apply(tuned)  # one layer method at a time, whichever it is
    model = module.remove(tuned)
    assert not layer_wrappers.layers_of(model, layer_wrappers.WrappedLinear)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def test_the_lora_config_maps_to_peft_and_back(tiny_llama):
    config = lora.LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"), dropout=0.1, init="gaussian", rslora=True)
    tuned = lora.apply(tiny_llama, **config.apply_args())
    peft_config = config.to_peft(tuned)
    assert (peft_config["r"], peft_config["lora_alpha"], peft_config["use_rslora"]) == (4, 8, True)
    assert peft_config["init_lora_weights"] == "gaussian" and peft_config["target_modules"] == ["q_proj", "v_proj"]
    assert lora.LoRAConfig.from_peft(peft_config, tuned) == lora.LoRAConfig(4, 8, ["q_proj", "v_proj"], 0.1, "gaussian", True)
    assert lora.settings(tuned).scaling == pytest.approx(8 / 2)  # alpha / sqrt(rank) with rsLoRA
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        lora.LoRAConfig(alpha=0)


def test_a_damaged_key_in_a_saved_adapter_is_named(tiny_llama, tmp_path):
    tuned = lora.apply(tiny_llama, rank=2, targets=["q_proj"])
    state = {layer_wrappers.saved_key(n, "lora_A.weight"): l.lora_A.weight for n, l in lora.lora_layers(tuned).items()}
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="Unexpected key.*lora_C"):
        layer_wrappers.tensors_by_module(state, ("lora_A.weight", "lora_B.weight"), lora.lora_layers(tuned), "weights", "LoRA")
