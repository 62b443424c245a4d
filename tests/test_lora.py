"""LoRA from scratch (peft_lab.lora): properties, and equivalence with Hugging Face peft.

Every test builds tiny models from configs (tests/conftest.py); nothing touches the network.
"""
import copy
import json

import pytest
import torch
from torch.testing import assert_close
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import make_tiny_gpt2, make_tiny_llama
from peft_lab import lora, models

try:  # only the equivalence tests need peft; the others run without it
    from peft import LoraConfig, PeftModel, get_peft_model
except ImportError:
    LoraConfig = PeftModel = get_peft_model = None
needs_peft = pytest.mark.skipif(get_peft_model is None, reason="HF peft is not installed")

TARGETS = {"gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]}


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


def randomise_B(model, seed=1):
    """B starts at zero; give it values so that the LoRA path actually does something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.3)


def peft_twin(base, ours, targets, rslora=False):
    """HF peft's LoRA on a copy of the untouched base, with our A and B copied in."""
    info = ours.peft_lab_info
    config = LoraConfig(r=info["rank"], lora_alpha=info["alpha"], target_modules=targets, lora_dropout=0.0,
                        init_lora_weights=False, fan_in_fan_out=kind(base) == "gpt2", use_rslora=rslora,
                        task_type="CAUSAL_LM")
    twin = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, layer in lora.lora_layers(ours).items():
            theirs = twin.base_model.model.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(layer.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(layer.lora_B.weight)
    return twin.eval()


def adapted(base, rank=4, alpha=8, targets=None, **kw):
    """(pristine copy of base, base with LoRA applied and a non-zero B)."""
    pristine = copy.deepcopy(base)
    model = lora.apply(base, rank=rank, alpha=alpha, targets=targets or TARGETS[kind(base)], **kw)
    randomise_B(model)
    return pristine, model.eval()


# ---- equivalence with HF peft ----------------------------------------------------------------

@needs_peft
@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
def test_logits_match_peft_unmerged_and_merged(tiny_model, rslora):
    pristine, ours = adapted(tiny_model, rslora=rslora)
    twin = peft_twin(pristine, ours, TARGETS[kind(ours)], rslora=rslora)
    ids, mask = batch(ours)
    base_logits = logits(pristine, ids, mask)
    ours_logits = logits(ours, ids, mask)
    assert (ours_logits - base_logits).abs().max() > 1e-3  # the adapter really changes the output
    assert_close(ours_logits, logits(twin, ids, mask), atol=1e-5, rtol=0)

    lora.merge(ours)
    twin.merge_adapter()
    assert_close(logits(ours, ids, mask), logits(twin, ids, mask), atol=1e-5, rtol=0)
    assert_close(logits(ours, ids, mask), ours_logits, atol=1e-5, rtol=0)  # merged == unmerged


@needs_peft
def test_gradients_match_peft(tiny_model):
    pristine, ours = adapted(tiny_model)
    twin = peft_twin(pristine, ours, TARGETS[kind(ours)])
    ids, mask = batch(ours)
    labels = ids.masked_fill(mask == 0, -100)
    ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    twin(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for name, layer in lora.lora_layers(ours).items():
        theirs = twin.base_model.model.get_submodule(name)
        assert_close(layer.lora_A.weight.grad, theirs.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4)
        assert_close(layer.lora_B.weight.grad, theirs.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4)
        assert layer.lora_A.weight.grad.abs().sum() > 0


@needs_peft
def test_all_linear_matches_peft_and_excludes_head(tiny_model):
    pristine = copy.deepcopy(tiny_model)
    ours = lora.apply(tiny_model, rank=2, alpha=4, targets="all-linear")
    names = set(lora.lora_layers(ours))
    assert "lm_head" not in names and not any(n.endswith("lm_head") for n in names)
    expected = {"gpt2": 2 * 4, "llama": 2 * 7}[kind(ours)]  # c_attn, attn.c_proj, c_fc, mlp.c_proj / 7 projections
    assert len(names) == expected
    twin = get_peft_model(pristine, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear",
                                               fan_in_fan_out=kind(ours) == "gpt2", task_type="CAUSAL_LM"))
    theirs = {n for n, m in twin.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert names == theirs


# ---- adapters on disk, both ways ---------------------------------------------------------------

@needs_peft
def test_our_adapter_loads_in_peft(tiny_model, tmp_path):
    pristine, ours = adapted(tiny_model, rslora=True)
    lora.save(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["use_rslora"] is True
    twin = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path).eval()
    ids, mask = batch(ours)
    assert_close(logits(twin, ids, mask), logits(ours, ids, mask), atol=1e-5, rtol=0)
    # ... and back into a fresh base with our own load
    again = lora.load(copy.deepcopy(pristine), tmp_path).eval()
    assert torch.equal(logits(again, ids, mask), logits(ours, ids, mask))


@needs_peft
def test_peft_adapter_loads_here(tiny_model, tmp_path):
    pristine = copy.deepcopy(tiny_model)
    targets = TARGETS[kind(tiny_model)]
    # init_lora_weights=False leaves B random too, so the adapter changes the output
    twin = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=16, target_modules=targets,
                                                 init_lora_weights=False, fan_in_fan_out=kind(tiny_model) == "gpt2",
                                                 task_type="CAUSAL_LM")).eval()
    twin.save_pretrained(tmp_path)
    ours = lora.load(copy.deepcopy(pristine), tmp_path).eval()
    assert ours.peft_lab_info["rank"] == 4 and ours.peft_lab_info["alpha"] == 16
    ids, mask = batch(ours)
    assert_close(logits(ours, ids, mask), logits(twin, ids, mask), atol=1e-5, rtol=0)


# ---- properties ----------------------------------------------------------------------------------

def test_zero_B_leaves_outputs_unchanged(tiny_model):
    ids, mask = batch(tiny_model)
    before = logits(tiny_model, ids, mask)
    lora.apply(tiny_model, targets="all-linear", init="gaussian")
    assert torch.equal(logits(tiny_model, ids, mask), before)


def test_trainable_parameters_are_exactly_lora(tiny_llama):
    model = lora.apply(tiny_llama, rank=4, alpha=8, targets=["q_proj", "v_proj"])
    layers = lora.lora_layers(model)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    expected = {id(p) for l in layers.values() for p in (l.lora_A.weight, l.lora_B.weight)}
    assert trainable == expected and len(layers) == 4
    info = model.peft_lab_info
    assert info["method"] == "lora" and info["targets"] == ["q_proj", "v_proj"]
    # q: 4 * (32 + 32), v (GQA, 2 kv heads of 8): 4 * (32 + 16), per layer, 2 layers
    assert info["trainable_parameters"] == 2 * (4 * 64 + 4 * 48)
    assert info["scaling"] == 2.0


def test_merge_then_unmerge_restores_weights(tiny_model):
    _, model = adapted(tiny_model)
    before = {n: l.base.weight.clone() for n, l in lora.lora_layers(model).items()}
    lora.merge(model)
    changed = [not torch.equal(l.base.weight, before[n]) for n, l in lora.lora_layers(model).items()]
    assert all(changed)
    lora.unmerge(model)
    for name, layer in lora.lora_layers(model).items():
        assert_close(layer.base.weight, before[name], atol=1e-6, rtol=0)
        assert not layer.merged


def test_training_leaves_frozen_weights_and_remove_restores_originals(tiny_model):
    originals = {n: m for n, m in tiny_model.named_modules() if n.endswith(tuple(TARGETS[kind(tiny_model)]))}
    snapshot = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    model = lora.apply(tiny_model, rank=4, alpha=8, targets=TARGETS[kind(tiny_model)], dropout=0.1).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    ids, mask = batch(model)
    for _ in range(3):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(l.lora_B.weight.abs().sum() > 0 for l in lora.lora_layers(model).values())  # it trained
    frozen = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert frozen.keys() == snapshot.keys()
    assert all(torch.equal(frozen[k], snapshot[k]) for k in snapshot)

    lora.remove(model)
    assert not lora.lora_layers(model) and not hasattr(model, "peft_lab_info")
    for name, module in originals.items():
        assert model.get_submodule(name) is module
    after = model.state_dict()
    assert after.keys() == snapshot.keys() and all(torch.equal(after[k], snapshot[k]) for k in snapshot)
    assert all(p.requires_grad for p in model.parameters())  # trainable again, as before apply


def test_remove_refuses_merged_model(tiny_gpt2):
    _, model = adapted(tiny_gpt2)
    lora.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        lora.remove(model)
    lora.unmerge(model)
    lora.remove(model)
    assert not lora.lora_layers(model)


def test_generate_uses_the_adapter(tiny_llama):
    pristine, model = adapted(tiny_llama)
    ids, _ = batch(model)
    out = model.generate(ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 10) and torch.equal(out[:, :7], ids[:1])
    # greedy from the adapted model's own logits, token by token: generate must have used the adapter
    seq = ids[:1]
    with torch.no_grad():
        for _ in range(3):
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1:].argmax(-1)], dim=1)
        base_logits = pristine(input_ids=ids[:1]).logits[:, -1]
        adapted_logits = model(input_ids=ids[:1]).logits[:, -1]
    assert torch.equal(out, seq)
    assert not torch.allclose(base_logits, adapted_logits, atol=1e-3), "the adapter did not change the model"


def test_gaussian_init_std(tiny_llama):
    model = lora.apply(tiny_llama, rank=4, targets="all-linear", init="gaussian")
    A = torch.cat([l.lora_A.weight.flatten() for l in lora.lora_layers(model).values()])
    assert abs(A.std().item() - 1 / 4) < 0.02


# ---- clear errors ----------------------------------------------------------------------------------

def test_unknown_target_lists_existing_names(tiny_llama, tiny_gpt2):
    with pytest.raises(ValueError, match=r"q_proj.*v_proj"):
        lora.apply(tiny_llama, targets=["query"])
    with pytest.raises(ValueError, match="c_attn"):
        lora.apply(tiny_gpt2, targets=["q_proj", "v_proj"])
    assert lora.linear_module_names(tiny_gpt2) == ["c_attn", "c_fc", "c_proj", "lm_head"]


def test_double_apply_refused(tiny_llama):
    lora.apply(tiny_llama, targets=["q_proj"])
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.apply(tiny_llama, targets=["q_proj"])
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.apply(tiny_llama, targets="all-linear")


def test_wrong_rank_load_refused(tiny_gpt2, tmp_path):
    pristine, model = adapted(tiny_gpt2, rank=4)
    lora.save(model, tmp_path)
    other = lora.apply(copy.deepcopy(pristine), rank=8, targets=TARGETS["gpt2"])
    with pytest.raises(ValueError, match="rank"):
        lora.load(other, tmp_path)
    # a config that claims another rank than its weights hold
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    fresh = copy.deepcopy(pristine)
    with pytest.raises(ValueError, match="Rank differs"):
        lora.load(fresh, tmp_path)
    assert not lora.lora_layers(fresh)  # a failed load leaves the model as it was


def test_wrong_base_load_refused(tiny_gpt2, tmp_path):
    _, model = adapted(tiny_gpt2)
    lora.save(model, tmp_path)
    with pytest.raises(ValueError, match="c_attn"):  # another architecture: no such modules
        lora.load(make_tiny_llama(), tmp_path)
    wider = GPT2LMHeadModel(GPT2Config(vocab_size=51, n_positions=128, n_embd=48, n_layer=2, n_head=4))
    with pytest.raises(ValueError, match="hidden size"):
        lora.load(wider, tmp_path)
    assert not lora.lora_layers(wider)
    deeper = GPT2LMHeadModel(GPT2Config(vocab_size=51, n_positions=128, n_embd=32, n_layer=3, n_head=4))
    with pytest.raises(ValueError, match=r"transformer\.h\.2"):
        lora.load(deeper, tmp_path)


def test_update_size_is_the_mean_norm_of_the_learned_updates(tiny_llama):
    model = lora.apply(models.frozen_copy(tiny_llama), rank=2, alpha=4, targets=["q_proj"])
    assert lora.update_size(model) == 0.0   # B starts at zero: nothing learned yet
    layers = list(lora.lora_layers(model).values())
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.weight.fill_(0.1)
    expected = sum(float((2.0 * layer.lora_B.weight @ layer.lora_A.weight).detach().norm()) for layer in layers) / len(layers)
    assert lora.update_size(model) == pytest.approx(expected)
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora.update_size(tiny_llama)
