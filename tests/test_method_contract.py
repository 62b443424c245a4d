"""The method contract (peft_lab/methods/base.py), checked for every method in the registry.

apply -> one training step -> only the method's tensors moved, the base bit-identical -> save/load gives
the same logits -> remove gives the original model back with requires_grad as before. A method added
to ``methods.REGISTRY`` is checked here at once.
"""
import pytest
import torch

from peft_lab import freeze, methods, models, train
from peft_lab.methods import base as contract
from tests.conftest import base_for, make_tiny_gpt2, make_tiny_llama, make_tiny_task

SETTINGS = {  # small settings per method; anything not named here runs with its defaults
    "lora": {"rank": 2},
    "dora": {"rank": 2},
    "prefix": {"num_virtual_tokens": 3},
    "prompt": {"num_virtual_tokens": 3},
}
LLAMA_ONLY = {"lora": {"targets": ["q_proj", "v_proj"]}, "dora": {"targets": ["q_proj", "v_proj"]},
              "qlora": {"rank": 2, "targets": ["q_proj", "v_proj"]}}
GPT2 = {"lora": {"targets": ["c_attn"]}, "dora": {"targets": ["c_attn"]}}
NOT_ON_GPT2 = {"qlora": "the NF4 storage here stores nn.Linear layers; GPT-2's are Conv1D"}


def _settings(name, arch):
    return {**SETTINGS.get(name, {}), **(LLAMA_ONLY if arch == "llama" else GPT2).get(name, {})}


def _model(arch, name=None):
    model = base_for(name, make_tiny_llama() if arch == "llama" else make_tiny_gpt2())  # QLoRA's: stored in 4 bits
    # a mixed requires_grad pattern, so "as before" means something
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 2 == 0)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("name", methods.names())
def test_every_method_keeps_the_contract(name, arch, tokenizer, tmp_path, monkeypatch):
    if arch == "gpt2" and name in NOT_ON_GPT2:
        pytest.skip(NOT_ON_GPT2[name])
    monkeypatch.setenv("PEFT_LAB_RUNLOG", str(tmp_path / "runs.jsonl"))
    module = methods.get(name)
    assert contract.missing_functions(module) == []
    model = _model(arch, name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = torch.tensor([[4, 5, 6, 7, 8]])

    tuned = module.apply(model, **_settings(name, arch))
    assert contract.info(tuned)["method"] == name
    logits = _logits(tuned, ids)
    assert logits.shape == (1, 5, model.config.vocab_size), "logits must cover the real tokens only"

    trained_before = {n: p.detach().clone() for n, p in tuned.named_parameters() if p.requires_grad}
    assert trained_before, "apply must leave something trainable"
    train.fit(tuned, tokenizer, make_tiny_task(), steps=2, lr=1e-2, batch_size=2, progress=False, log=False)
    moved = [n for n, p in tuned.named_parameters() if p.requires_grad and not torch.equal(p, trained_before[n])]
    assert moved, "a training step must move the method's tensors"
    # the base weights, under their original names (a wrapped layer keeps its weight as ``<layer>.base.weight``)
    base_now = {n.replace(".base.", "."): v for n, v in model.state_dict().items()}
    for k, v in before.items():
        assert torch.equal(base_now[k], v), f"the base weight {k} changed"

    folder = module.save(tuned, tmp_path / "adapter")
    assert folder.exists() and any(folder.iterdir())
    fresh = _model(arch, name)
    fresh.load_state_dict(before)
    reloaded = module.load(fresh, folder)
    assert torch.allclose(_logits(reloaded, ids), _logits(tuned, ids), atol=1e-6)
    generated = tuned.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 7) and torch.equal(generated[:, :5], ids)

    original = module.remove(tuned)
    assert all(torch.equal(original.state_dict()[k], v) for k, v in before.items())
    assert {n: p.requires_grad for n, p in original.named_parameters()} == grad_before
    assert torch.equal(_logits(original, ids), _logits(_reference(arch, before, name), ids))


def _reference(arch, state, name=None):
    model = _model(arch, name)
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("name", methods.names())
def test_load_from_an_empty_folder_says_so(name, tmp_path):
    with pytest.raises(FileNotFoundError):
        methods.get(name).load(base_for(name, make_tiny_llama()), tmp_path / "nothing here")


@pytest.mark.parametrize("choice", ["full", "last_n", "attention", "norms"])
def test_freezing_trains_exactly_its_choice(choice, tiny_llama, tokenizer):
    base_before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}  # taken before anything trains
    model = freeze.apply(models.fresh_copy(tiny_llama), choice, n=1, verbose=False)
    chosen = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train.fit(model, tokenizer, make_tiny_task(), steps=2, lr=1e-2, batch_size=2, progress=False, log=False)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved <= chosen and moved, f"{choice}: moved {sorted(moved - chosen)} outside the choice"
    assert all(torch.equal(base_before[k], v) for k, v in tiny_llama.state_dict().items()), "the base model changed"
