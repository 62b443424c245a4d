"""DoRA and IA3 (peft_lab.methods.dora, .ia3): properties, and equivalence with Hugging Face peft.

Every test builds tiny models from configs (tests/conftest.py); nothing touches the network. Each
equivalence test first puts non-trivial numbers in (random B and magnitudes, random IA3 vectors):
at their initial values both methods leave the model unchanged and any comparison would pass.
"""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import make_tiny_gpt2, make_tiny_llama
from peft_lab import methods
from peft_lab.methods import base, dora, ia3, lora

peft = pytest.importorskip("peft")
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model  # noqa: E402

DORA_TARGETS = {"gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "v_proj", "down_proj"]}
GPT2_WIDER = dict(vocab_size=51, n_positions=128, n_embd=48, n_layer=2, n_head=4)


def kind(model):
    return model.config.model_type


def batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.config.vocab_size, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding, as everywhere in this project
    return ids, mask


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def one_step(model, lr=1e-2):
    """One AdamW step on all trainable parameters (weight decay on, as it would touch frozen ones)."""
    ids, mask = batch(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def random_biases(model, seed=3):
    """Tiny GPT-2 starts with zero biases; give them values, so that the bias handling is tested
    (DoRA takes the bias out of the base output, IA3 scales it with the output). Returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and p.dim() == 1 and "ln_" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_registered_and_conforming():
    for name, module in (("dora", dora), ("ia3", ia3)):
        assert methods.get(name) is module
        assert base.missing_functions(module) == []
        assert all(callable(getattr(module, f)) for f in ("merge", "unmerge"))


# =================================================================================================
# DoRA
# =================================================================================================

def randomise_dora(model, seed=1):
    """B away from zero and m away from ||W||, so that both DoRA parts really act."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in dora.dora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.3)
            m = layer.lora_magnitude_vector
            m.mul_(1 + 0.2 * torch.randn(m.shape, generator=g))


def dora_adapted(model, rank=4, alpha=8, targets=None, **kw):
    """(pristine copy of model, model with DoRA applied and non-trivial B and m)."""
    pristine = copy.deepcopy(random_biases(model))
    tuned = dora.apply(model, rank=rank, alpha=alpha, targets=targets or DORA_TARGETS[kind(model)], **kw)
    randomise_dora(tuned)
    return pristine, tuned.eval()


def dora_twin(pristine, ours, dropout=0.0):
    """peft's DoRA on a copy of the untouched base, with our A, B and m copied in."""
    info = ours.peft_lab_info
    config = LoraConfig(r=info["rank"], lora_alpha=info["alpha"], target_modules=info["targets"],
                        lora_dropout=dropout, init_lora_weights=False, use_dora=True,
                        fan_in_fan_out=kind(pristine) == "gpt2", task_type="CAUSAL_LM")
    twin = get_peft_model(copy.deepcopy(pristine), config)
    with torch.no_grad():
        for name, layer in dora.dora_layers(ours).items():
            theirs = twin.base_model.model.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(layer.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(layer.lora_B.weight)
            theirs.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)
    return twin.eval()


def test_dora_logits_match_peft_unmerged_and_merged(tiny_model):
    pristine, ours = dora_adapted(tiny_model)
    twin = dora_twin(pristine, ours)
    ids, mask = batch(ours)
    ours_logits = logits(ours, ids, mask)
    assert (ours_logits - logits(pristine, ids, mask)).abs().max() > 1e-3  # DoRA really changes the output
    assert_close(ours_logits, logits(twin, ids, mask), atol=1e-5, rtol=0)

    dora.merge(ours)
    twin.merge_adapter()
    assert_close(logits(ours, ids, mask), logits(twin, ids, mask), atol=1e-5, rtol=0)
    assert_close(logits(ours, ids, mask), ours_logits, atol=1e-5, rtol=0)  # merged == unmerged


def test_dora_gradients_match_peft(tiny_model):
    """Same gradients for A, B and m: the norm ||W + s B A|| is detached here as in peft."""
    pristine, ours = dora_adapted(tiny_model)
    twin = dora_twin(pristine, ours)
    ids, mask = batch(ours)
    labels = ids.masked_fill(mask == 0, -100)
    ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    twin(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for name, layer in dora.dora_layers(ours).items():
        theirs = twin.base_model.model.get_submodule(name)
        for mine, their in ((layer.lora_A.weight, theirs.lora_A["default"].weight),
                            (layer.lora_B.weight, theirs.lora_B["default"].weight),
                            (layer.lora_magnitude_vector, theirs.lora_magnitude_vector["default"].weight)):
            assert mine.grad.abs().sum() > 0
            assert_close(mine.grad, their.grad, atol=1e-5, rtol=1e-4)


def test_dora_dropout_in_training_matches_peft(tiny_model):
    """With dropout on (train mode) peft drops the input of the LoRA path and of the W x correction
    term but not of the base output; ours does the same, so the same random masks give the same logits."""
    pristine, ours = dora_adapted(tiny_model, dropout=0.3)
    twin = dora_twin(pristine, ours, dropout=0.3)
    ours.train(), twin.train()
    ids, mask = batch(ours)
    torch.manual_seed(123)
    a = logits(ours, ids, mask)
    torch.manual_seed(123)
    b = logits(twin, ids, mask)
    assert_close(a, b, atol=1e-5, rtol=0)
    torch.manual_seed(7)
    assert (logits(ours, ids, mask) - a).abs().max() > 1e-4  # dropout really acts


def test_dora_starts_unchanged_with_magnitude_the_row_norm(tiny_model):
    ids, mask = batch(tiny_model)
    pristine = copy.deepcopy(tiny_model)
    before = logits(tiny_model, ids, mask)
    ours = dora.apply(tiny_model, rank=4, alpha=8, targets=DORA_TARGETS[kind(tiny_model)])
    assert_close(logits(ours, ids, mask), before, atol=1e-6, rtol=0)
    # peft's own initial magnitudes (B = 0 there too)
    twin = get_peft_model(pristine, LoraConfig(r=4, lora_alpha=8, target_modules=DORA_TARGETS[kind(ours)],
                                               use_dora=True, fan_in_fan_out=kind(ours) == "gpt2",
                                               task_type="CAUSAL_LM"))
    for name, layer in dora.dora_layers(ours).items():
        w = layer.base.weight.T if layer.fan_in_fan_out else layer.base.weight  # (out, in)
        assert_close(layer.lora_magnitude_vector, w.norm(dim=1), atol=1e-6, rtol=0)  # one norm per output
        theirs = twin.base_model.model.get_submodule(name).lora_magnitude_vector["default"].weight
        assert_close(layer.lora_magnitude_vector, theirs, atol=1e-6, rtol=0)


def test_dora_trainable_parameters_match_peft(tiny_model):
    pristine = copy.deepcopy(tiny_model)
    targets = DORA_TARGETS[kind(tiny_model)]
    ours = dora.apply(tiny_model, rank=4, alpha=8, targets=targets)
    twin = get_peft_model(pristine, LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True,
                                               fan_in_fan_out=kind(ours) == "gpt2", task_type="CAUSAL_LM"))
    assert ours.peft_lab_info["trainable_parameters"] == trainable(ours) == trainable(twin)
    expected = {id(p) for l in dora.dora_layers(ours).values()
                for p in (l.lora_A.weight, l.lora_B.weight, l.lora_magnitude_vector)}
    assert {id(p) for p in ours.parameters() if p.requires_grad} == expected
    info = ours.peft_lab_info
    assert info["method"] == "dora" and info["targets"] == targets and info["scaling"] == 2.0


def test_dora_merge_then_unmerge_restores_weights(tiny_model):
    _, model = dora_adapted(tiny_model)
    before = {n: l.base.weight.clone() for n, l in dora.dora_layers(model).items()}
    dora.merge(model)
    assert all(not torch.equal(l.base.weight, before[n]) for n, l in dora.dora_layers(model).items())
    dora.merge(model)  # a second merge does nothing
    dora.unmerge(model)
    for name, layer in dora.dora_layers(model).items():
        assert_close(layer.base.weight, before[name], atol=1e-6, rtol=0)
        assert not layer.merged


def test_dora_training_step_then_remove_restores_originals(tiny_model):
    tiny_model.get_input_embeddings().requires_grad_(False)  # not everything trainable before apply
    grad_before = {n: p.requires_grad for n, p in tiny_model.named_parameters()}
    snapshot = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    targets = DORA_TARGETS[kind(tiny_model)]
    originals = {n: m for n, m in tiny_model.named_modules() if n.endswith(tuple(targets))}
    model = dora.apply(tiny_model, rank=4, alpha=8, targets=targets, dropout=0.1).train()
    m0 = [l.lora_magnitude_vector.clone() for l in dora.dora_layers(model).values()]
    one_step(model)
    layers = list(dora.dora_layers(model).values())
    assert all(l.lora_B.weight.abs().sum() > 0 for l in layers)  # it trained
    assert any(not torch.equal(l.lora_magnitude_vector, m) for l, m in zip(layers, m0))

    with pytest.raises(ValueError, match="unmerge"):  # a merged model is refused
        dora.remove(dora.merge(model))
    dora.unmerge(model)
    # unmerging is exact only up to rounding: put the bits back to test remove on its own
    with torch.no_grad():
        for name, module in originals.items():
            for pname, p in module.named_parameters():
                p.copy_(snapshot[f"{name}.{pname}"])
    dora.remove(model)
    assert not dora.dora_layers(model) and not hasattr(model, "peft_lab_info")
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    after = model.state_dict()
    assert after.keys() == snapshot.keys() and all(torch.equal(after[k], snapshot[k]) for k in snapshot)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grad_before


def test_dora_frozen_weights_unchanged_by_training(tiny_gpt2):
    snapshot = {k: v.clone() for k, v in tiny_gpt2.state_dict().items()}
    model = dora.apply(tiny_gpt2, rank=4, alpha=8, targets=DORA_TARGETS["gpt2"]).train()
    one_step(model)
    dora.remove(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], snapshot[k]) for k in snapshot)


def test_dora_adapter_loads_in_peft_and_back(tiny_model, tmp_path):
    pristine, ours = dora_adapted(tiny_model, rslora=True)
    assert dora.save(ours, tmp_path) == tmp_path  # the contract: save returns the folder
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True and config["use_rslora"] is True
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert sum(k.endswith(".lora_magnitude_vector") for k in keys) == len(dora.dora_layers(ours))
    twin = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path).eval()
    ids, mask = batch(ours)
    assert_close(logits(twin, ids, mask), logits(ours, ids, mask), atol=1e-5, rtol=0)
    again = dora.load(copy.deepcopy(pristine), tmp_path).eval()
    assert again.peft_lab_info["method"] == "dora"
    assert torch.equal(logits(again, ids, mask), logits(ours, ids, mask))


def test_peft_dora_adapter_loads_here(tiny_model, tmp_path):
    pristine = copy.deepcopy(random_biases(tiny_model))
    targets = DORA_TARGETS[kind(tiny_model)]
    # init_lora_weights=False: B random, so the adapter changes the output; m moved off its start too
    twin = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_dora=True,
                                                 init_lora_weights=False, fan_in_fan_out=kind(tiny_model) == "gpt2",
                                                 task_type="CAUSAL_LM")).eval()
    with torch.no_grad():
        for m in twin.base_model.model.modules():
            if hasattr(m, "lora_magnitude_vector") and "default" in m.lora_magnitude_vector:
                m.lora_magnitude_vector["default"].weight.mul_(1.3)
    twin.save_pretrained(tmp_path)
    ours = dora.load(copy.deepcopy(pristine), tmp_path).eval()
    assert ours.peft_lab_info["rank"] == 4 and ours.peft_lab_info["alpha"] == 16
    ids, mask = batch(ours)
    assert (logits(ours, ids, mask) - logits(pristine, ids, mask)).abs().max() > 1e-3
    assert_close(logits(ours, ids, mask), logits(twin, ids, mask), atol=1e-5, rtol=0)


def test_dora_wrong_base_load_refused(tiny_gpt2, tmp_path):
    _, model = dora_adapted(tiny_gpt2)
    dora.save(model, tmp_path)
    with pytest.raises(ValueError, match="c_attn"):  # another architecture: no such modules
        dora.load(make_tiny_llama(), tmp_path)
    wider = GPT2LMHeadModel(GPT2Config(**GPT2_WIDER))
    with pytest.raises(ValueError, match="hidden size"):
        dora.load(wider, tmp_path)
    assert not dora.dora_layers(wider) and not hasattr(wider, "peft_lab_info")  # left as it came


def test_dora_and_lora_adapters_not_mixed_up(tiny_llama, tmp_path):
    pristine, model = dora_adapted(tiny_llama)
    dora.save(model, tmp_path / "dora")
    with pytest.raises(ValueError, match="use_dora"):
        lora.load(copy.deepcopy(pristine), tmp_path / "dora")
    lora.save(lora.apply(copy.deepcopy(pristine), targets=["q_proj"]), tmp_path / "lora")
    with pytest.raises(ValueError, match="plain LoRA"):
        dora.load(copy.deepcopy(pristine), tmp_path / "lora")
    with pytest.raises(FileNotFoundError):
        dora.load(copy.deepcopy(pristine), tmp_path / "nothing")


def test_dora_unknown_target_and_double_apply(tiny_llama, tiny_gpt2):
    with pytest.raises(ValueError, match=r"q_proj.*v_proj"):
        dora.apply(tiny_llama, targets=["query"])
    with pytest.raises(ValueError, match="c_attn"):
        dora.apply(tiny_gpt2)  # the default q_proj, v_proj: GPT-2 has c_attn instead
    dora.apply(tiny_llama, targets=["q_proj"])
    with pytest.raises(ValueError, match="already has DoRA"):
        dora.apply(tiny_llama, targets=["v_proj"])


def test_dora_bf16_base_trains_fp32_numbers(tiny_llama):
    model = dora.apply(tiny_llama.to(torch.bfloat16), rank=4, targets=["q_proj", "v_proj"])
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    ids, mask = batch(model)
    assert logits(model, ids, mask).dtype == torch.bfloat16


# =================================================================================================
# IA3
# =================================================================================================

def randomise_ia3(model, seed=2):
    """Vectors away from 1, so that the scaling really acts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in ia3.ia3_layers(model).values():
            layer.ia3_l.copy_(1 + 0.5 * torch.randn(layer.ia3_l.shape, generator=g))


def ia3_adapted(model, **kw):
    pristine = copy.deepcopy(random_biases(model))
    tuned = ia3.apply(model, **kw)
    randomise_ia3(tuned)
    return pristine, tuned.eval()


def ia3_twin(pristine, ours):
    """peft's IA3 with its own defaults for this architecture, with our vectors copied in."""
    twin = get_peft_model(copy.deepcopy(pristine), IA3Config(task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, layer in ia3.ia3_layers(ours).items():
            theirs = twin.base_model.model.get_submodule(name).ia3_l["default"]
            theirs.copy_(layer.ia3_l.view(theirs.shape))
    return twin.eval()


def test_ia3_defaults_are_peft_defaults(tiny_model):
    pristine = copy.deepcopy(tiny_model)
    ours = ia3.apply(tiny_model)
    twin = get_peft_model(pristine, IA3Config(task_type="CAUSAL_LM"))
    theirs = {n: m.is_feedforward for n, m in twin.base_model.model.named_modules() if hasattr(m, "ia3_l")}
    assert {n: l.feedforward for n, l in ia3.ia3_layers(ours).items()} == theirs
    expected = {"gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
                "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"])}[kind(ours)]
    assert (ours.peft_lab_info["targets"], ours.peft_lab_info["feedforward"]) == expected
    # trainable numbers: the same count as peft's, and nothing else trainable
    assert ours.peft_lab_info["trainable_parameters"] == trainable(ours) == trainable(twin)
    assert {id(p) for p in ours.parameters() if p.requires_grad} == \
        {id(l.ia3_l) for l in ia3.ia3_layers(ours).values()}


def test_ia3_shapes_per_layer(tiny_gpt2, tiny_llama):
    layers = ia3.ia3_layers(ia3.apply(tiny_gpt2))
    assert layers["transformer.h.0.attn.c_attn"].ia3_l.shape == (96,)  # q, k and v outputs (fused)
    assert layers["transformer.h.0.mlp.c_proj"].ia3_l.shape == (128,)  # the MLP's hidden units: input
    layers = ia3.ia3_layers(ia3.apply(tiny_llama))
    assert layers["model.layers.0.self_attn.k_proj"].ia3_l.shape == (16,)  # 2 kv heads of 8 (GQA)
    assert layers["model.layers.0.mlp.down_proj"].ia3_l.shape == (64,)
    assert all(torch.equal(l.ia3_l, torch.ones_like(l.ia3_l)) for l in layers.values())


def test_ia3_logits_match_peft_unmerged_and_merged(tiny_model):
    pristine, ours = ia3_adapted(tiny_model)
    twin = ia3_twin(pristine, ours)
    ids, mask = batch(ours)
    ours_logits = logits(ours, ids, mask)
    assert (ours_logits - logits(pristine, ids, mask)).abs().max() > 1e-3
    assert_close(ours_logits, logits(twin, ids, mask), atol=1e-5, rtol=0)

    ia3.merge(ours)
    twin.merge_adapter()
    assert_close(logits(ours, ids, mask), logits(twin, ids, mask), atol=1e-5, rtol=0)
    assert_close(logits(ours, ids, mask), ours_logits, atol=1e-5, rtol=0)  # merged == unmerged


def test_ia3_starts_unchanged(tiny_model):
    ids, mask = batch(tiny_model)
    before = logits(tiny_model, ids, mask)
    assert torch.equal(logits(ia3.apply(tiny_model), ids, mask), before)  # times 1.0 is exact


def test_ia3_merge_then_unmerge_restores_weights_and_biases(tiny_model):
    _, model = ia3_adapted(tiny_model)
    layers = ia3.ia3_layers(model)
    before = {n: [p.clone() for p in l.base.parameters()] for n, l in layers.items()}
    ia3.merge(model)
    assert all(not torch.equal(l.base.weight, before[n][0]) for n, l in layers.items())
    if kind(model) == "gpt2":  # c_attn's bias is scaled with its output; mlp.c_proj's (input scaling) is not
        assert not torch.equal(layers["transformer.h.0.attn.c_attn"].base.bias, before["transformer.h.0.attn.c_attn"][1])
        assert torch.equal(layers["transformer.h.0.mlp.c_proj"].base.bias, before["transformer.h.0.mlp.c_proj"][1])
    ia3.unmerge(model)
    for name, layer in layers.items():
        for p, q in zip(layer.base.parameters(), before[name]):
            assert_close(p, q, atol=1e-6, rtol=0)
        assert not layer.merged


def test_ia3_unmerge_refuses_zeros(tiny_llama):
    _, model = ia3_adapted(tiny_llama)
    layer = next(iter(ia3.ia3_layers(model).values()))
    with torch.no_grad():
        layer.ia3_l[0] = 0.0
    ia3.merge(model)
    with pytest.raises(ValueError, match="zeros"):
        ia3.unmerge(model)
    assert all(l.merged for l in ia3.ia3_layers(model).values())  # nothing half done


def test_ia3_training_step_then_remove_restores_originals(tiny_model):
    tiny_model.get_input_embeddings().requires_grad_(False)
    grad_before = {n: p.requires_grad for n, p in tiny_model.named_parameters()}
    snapshot = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    model = ia3.apply(tiny_model).train()
    originals = {n: l.base for n, l in ia3.ia3_layers(model).items()}
    one_step(model)
    assert all(not torch.equal(l.ia3_l, torch.ones_like(l.ia3_l)) for l in ia3.ia3_layers(model).values())
    frozen = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if not k.endswith(".ia3_l")}
    assert frozen.keys() == snapshot.keys() and all(torch.equal(frozen[k], snapshot[k]) for k in snapshot)

    ia3.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        ia3.remove(model)
    ia3.unmerge(model)
    with torch.no_grad():  # unmerge is exact only up to rounding: put the bits back to test remove alone
        for name, module in originals.items():
            for pname, p in module.named_parameters():
                p.copy_(snapshot[f"{name}.{pname}"])
    ia3.remove(model)
    assert not ia3.ia3_layers(model) and not hasattr(model, "peft_lab_info")
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    after = model.state_dict()
    assert after.keys() == snapshot.keys() and all(torch.equal(after[k], snapshot[k]) for k in snapshot)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grad_before


def test_ia3_adapter_loads_in_peft_and_back(tiny_model, tmp_path):
    pristine, ours = ia3_adapted(tiny_model)
    assert ia3.save(ours, tmp_path) == tmp_path  # the contract: save returns the folder
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["fan_in_fan_out"] == (kind(ours) == "gpt2")
    assert all(k.endswith(".ia3_l") for k in load_file(tmp_path / "adapter_model.safetensors"))
    twin = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path).eval()
    ids, mask = batch(ours)
    assert_close(logits(twin, ids, mask), logits(ours, ids, mask), atol=1e-5, rtol=0)
    again = ia3.load(copy.deepcopy(pristine), tmp_path).eval()
    assert again.peft_lab_info["method"] == "ia3"
    assert torch.equal(logits(again, ids, mask), logits(ours, ids, mask))


def test_peft_ia3_adapter_loads_here(tiny_model, tmp_path):
    pristine = copy.deepcopy(random_biases(tiny_model))
    twin = get_peft_model(tiny_model, IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False)).eval()  # random
    twin.save_pretrained(tmp_path)
    ours = ia3.load(copy.deepcopy(pristine), tmp_path).eval()
    ids, mask = batch(ours)
    assert (logits(ours, ids, mask) - logits(pristine, ids, mask)).abs().max() > 1e-3
    assert_close(logits(ours, ids, mask), logits(twin, ids, mask), atol=1e-5, rtol=0)


def test_ia3_all_linear_with_feedforward_round_trips_through_peft(tiny_gpt2, tmp_path):
    """all-linear on GPT-2 saves target_modules ['c_attn', 'c_fc', 'c_proj']: 'mlp.c_proj' is not in that
    list, which peft refuses, so save writes the feedforward layers by full name."""
    pristine, ours = ia3_adapted(tiny_gpt2, targets="all-linear", feedforward=["mlp.c_proj"])
    assert len(ia3.ia3_layers(ours)) == 2 * 4
    assert ours.peft_lab_info["feedforward_modules"] == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    ia3.save(ours, tmp_path)
    twin = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path).eval()
    ids, mask = batch(ours)
    assert_close(logits(twin, ids, mask), logits(ours, ids, mask), atol=1e-5, rtol=0)
    again = ia3.load(copy.deepcopy(pristine), tmp_path).eval()
    assert {n: l.feedforward for n, l in ia3.ia3_layers(again).items()} == \
        {n: l.feedforward for n, l in ia3.ia3_layers(ours).items()}


def test_ia3_wrong_base_load_refused(tiny_gpt2, tmp_path):
    _, model = ia3_adapted(tiny_gpt2)
    ia3.save(model, tmp_path)
    with pytest.raises(ValueError, match="c_attn"):
        ia3.load(make_tiny_llama(), tmp_path)
    wider = GPT2LMHeadModel(GPT2Config(**GPT2_WIDER))
    with pytest.raises(ValueError, match="hidden size"):
        ia3.load(wider, tmp_path)
    assert not ia3.ia3_layers(wider) and not hasattr(wider, "peft_lab_info")
    lora.save(lora.apply(make_tiny_gpt2(), targets=["c_attn"]), tmp_path / "lora")
    with pytest.raises(ValueError, match="not IA3"):
        ia3.load(make_tiny_gpt2(), tmp_path / "lora")


def test_ia3_unknown_target_and_feedforward_refused(tiny_llama):
    with pytest.raises(ValueError, match=r"down_proj.*k_proj.*v_proj"):
        ia3.apply(tiny_llama, targets=["key"])
    with pytest.raises(ValueError, match="among the targets"):
        ia3.apply(tiny_llama, targets=["k_proj", "v_proj"], feedforward=["down_proj"])
    assert not ia3.ia3_layers(tiny_llama)
    model = ia3.apply(tiny_llama, targets=["k_proj", "v_proj"])  # default feedforward: none targeted
    assert model.peft_lab_info["feedforward"] == []
    with pytest.raises(ValueError, match="already has IA3"):
        ia3.apply(model)


def test_ia3_bf16_base_trains_fp32_vectors(tiny_gpt2):
    model = ia3.apply(tiny_gpt2.to(torch.bfloat16))
    randomise_ia3(model)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    ids, mask = batch(model)
    assert logits(model, ids, mask).dtype == torch.bfloat16
