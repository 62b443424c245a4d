"""What prefix and prompt tuning share (peft_lab/methods/virtual_tokens.py), checked on both.

* the reparametrised prefix (an MLP makes it) against HF peft's ``prefix_projection=True``;
* ``remove``: the base model back, ``requires_grad`` as before ``apply``, weights bit-identical;
* save / load in HF peft's layout, both ways: peft reads our folders, we read peft's;
* one decoding loop: eos and pad handling, the length bound P + T + N - 1;
* clear errors for damaged, missing or foreign files.
"""
import copy
import json
import warnings

import pytest
import torch
from conftest import make_tiny_gpt2

from peft_lab import prefix, prompt
from peft_lab.methods import virtual_tokens

P = 4
IDS = torch.tensor([[4, 5, 6, 7, 8, 9], [10, 11, 12, 13, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])  # right padding
REAL = MASK.bool()
METHODS = {"prefix": prefix, "prompt": prompt}


def _apply(method, model, **settings):
    return METHODS[method].apply(model, num_virtual_tokens=P, **settings)


def _scramble(tuned, seed=0):
    """Give every trainable tensor visible random values, so that equal outputs mean equal numbers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _logits(model):
    """Logits of the real tokens; peft's prompt tuning also returns its P virtual positions, in front."""
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits[:, -IDS.shape[1]:]


def _peft_config(method, **extra):
    from peft import PrefixTuningConfig, PromptTuningConfig

    cls = PrefixTuningConfig if method == "prefix" else PromptTuningConfig
    return cls(task_type="CAUSAL_LM", num_virtual_tokens=P, **extra)


def _peft_twin(method, model, **extra):
    """HF peft's version of the method around a copy of ``model``, with random (visible) numbers."""
    from peft import get_peft_model

    twin = get_peft_model(copy.deepcopy(model), _peft_config(method, **extra)).eval()
    _scramble(twin, seed=1)
    return twin


# --- the reparametrised prefix against HF peft -------------------------------------------------------
def test_reparametrised_prefix_matches_hf_peft(tiny_model):
    twin = _peft_twin("prefix", tiny_model, prefix_projection=True, encoder_hidden_size=16)
    theirs = twin.prompt_encoder["default"]
    tuned = prefix.apply(tiny_model, num_virtual_tokens=P, reparametrize=True, hidden=16)
    ours = tuned.encoder
    assert ours.embedding.weight.shape == theirs.embedding.weight.shape  # (P, kv_width)
    with torch.no_grad():  # peft's `transform` is our `mlp`: Linear -> tanh -> Linear
        ours.embedding.weight.copy_(theirs.embedding.weight)
        for i in (0, 2):
            ours.mlp[i].weight.copy_(theirs.transform[i].weight)
            ours.mlp[i].bias.copy_(theirs.transform[i].bias)
    torch.testing.assert_close(_logits(tuned)[REAL], _logits(twin)[REAL], atol=1e-5, rtol=0)
    with torch.no_grad():
        loss = tuned(input_ids=IDS, attention_mask=MASK, labels=IDS.masked_fill(MASK == 0, -100)).loss
        ref = twin(input_ids=IDS, attention_mask=MASK, labels=IDS.masked_fill(MASK == 0, -100)).loss
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(tuned.fold())[REAL], _logits(twin)[REAL], atol=1e-5, rtol=0)


# --- remove ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_remove_gives_the_base_back(tiny_model, method):
    for i, p in enumerate(tiny_model.parameters()):  # a base that was partly trainable before apply
        p.requires_grad_(i % 3 == 0)
    grads_before = {n: p.requires_grad for n, p in tiny_model.named_parameters()}
    weights_before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    tuned = _apply(method, tiny_model)
    assert not any(p.requires_grad for p in tiny_model.parameters())
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-1)
    for _ in range(2):
        tuned(input_ids=IDS, attention_mask=MASK, labels=IDS.masked_fill(MASK == 0, -100)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    base = METHODS[method].remove(tuned)
    assert base is tiny_model
    assert {n: p.requires_grad for n, p in base.named_parameters()} == grads_before
    assert all(torch.equal(weights_before[k], v) for k, v in base.state_dict().items())
    with pytest.raises(ValueError, match="prefix- or prompt-tuned"):
        METHODS[method].remove(base)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_remove_after_load_restores_a_trainable_base(tiny_model, method, tmp_path):
    METHODS[method].save(_apply(method, copy.deepcopy(tiny_model)), tmp_path)
    fresh = copy.deepcopy(tiny_model).requires_grad_(True)
    loaded = METHODS[method].load(fresh, tmp_path)
    assert not any(p.requires_grad for p in fresh.parameters())
    assert all(p.requires_grad for p in loaded.remove().parameters())


# --- save / load in HF peft's layout, both ways -------------------------------------------------------
SETTINGS = [("prefix", {}), ("prefix", {"reparametrize": True, "hidden": 16}), ("prompt", {})]


@pytest.mark.parametrize("method,settings", SETTINGS, ids=["prefix", "prefix-mlp", "prompt"])
def test_peft_reads_what_we_save(tiny_model, tmp_path, method, settings):
    from peft import PeftModel

    fresh = copy.deepcopy(tiny_model)
    tuned = _apply(method, tiny_model, **settings)
    _scramble(tuned)
    folder = METHODS[method].save(tuned, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "unexpected keyword" or shape complaint from peft
        theirs = PeftModel.from_pretrained(fresh, folder).eval()
    torch.testing.assert_close(_logits(theirs)[REAL], _logits(tuned)[REAL], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,settings", SETTINGS, ids=["prefix", "prefix-mlp", "prompt"])
def test_we_read_what_peft_saves_and_write_the_same(tiny_model, tmp_path, method, settings):
    from safetensors import safe_open

    extra = {"prefix_projection": True, "encoder_hidden_size": 16} if settings else {}
    twin = _peft_twin(method, tiny_model, **extra)
    twin.save_pretrained(tmp_path / "theirs")
    loaded = METHODS[method].load(copy.deepcopy(tiny_model), tmp_path / "theirs")
    torch.testing.assert_close(_logits(loaded)[REAL], _logits(twin)[REAL], atol=1e-5, rtol=0)
    if method == "prefix":
        assert loaded.encoder is None  # peft saves the MLP's output, so it comes back folded
        assert loaded.peft_lab_info["reparametrize"] is loaded.peft_lab_info["folded"] is bool(settings)

    # our save of the same model writes what peft wrote: the same config values, the same tensor
    METHODS[method].save(loaded, tmp_path / "ours")
    read = {name: json.loads((tmp_path / name / "adapter_config.json").read_text()) for name in ("theirs", "ours")}
    assert set(read["ours"]) <= set(read["theirs"])  # no key peft does not know
    for key in ("peft_type", "task_type", "num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads",
                "num_transformer_submodules", "inference_mode", "prefix_projection", "encoder_hidden_size"):
        assert read["ours"].get(key) == read["theirs"].get(key), key
    tensors = {}
    for name in ("theirs", "ours"):
        with safe_open(str(tmp_path / name / "adapter_model.safetensors"), "pt") as f:
            tensors[name] = {key: f.get_tensor(key) for key in f.keys()}
    assert list(tensors["ours"]) == list(tensors["theirs"]) == ["prompt_embeddings"]
    torch.testing.assert_close(tensors["ours"]["prompt_embeddings"], tensors["theirs"]["prompt_embeddings"],
                               atol=1e-6, rtol=0)


def test_peft_file_for_another_base_is_refused(tiny_gpt2, tiny_llama, tmp_path):
    _peft_twin("prefix", tiny_llama).save_pretrained(tmp_path)  # no description of the base: peft's config speaks
    with pytest.raises(ValueError, match="different base model.*num_attention_heads: saved 2, this model 4"):
        prefix.load(tiny_gpt2, tmp_path)


# --- one decoding loop --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_finished_rows_are_padded_and_generation_stops(tiny_model, method):
    tuned = _apply(method, tiny_model)
    _scramble(tuned)
    batch, n, pad = IDS[:, :4], 6, 1
    free = tuned.generate(batch, max_new_tokens=n, eos_token_id=[])[:, 4:]
    eos = int(free[0, 1])  # row 0 finishes at its 2nd new token at the latest
    got = tuned.generate(batch, attention_mask=torch.ones_like(batch, dtype=torch.bool), max_new_tokens=n,
                         eos_token_id=eos, pad_token_id=pad)[:, 4:]
    expected = free.clone()
    stops = []
    for row in range(2):
        hits = (free[row] == eos).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else n
        expected[row, stop:] = pad
        stops.append(stop)
    assert torch.equal(got, expected[:, :max(stops)])  # the loop ends once every row has finished


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_length_bound_is_positions_actually_read(method):
    # GPT-2 has 128 positions. Generating N tokens reads P + T + N - 1 of them (the last new token is
    # returned, never fed back), so N = 128 - P - T + 1 fits exactly and one more does not.
    tuned = _apply(method, make_tiny_gpt2())
    ids = IDS[:1, :4]
    most = 128 - P - 4 + 1
    assert tuned.generate(ids, max_new_tokens=most, eos_token_id=[]).shape == (1, 4 + most)
    with pytest.raises(ValueError, match="position embeddings"):
        tuned.generate(ids, max_new_tokens=most + 1, eos_token_id=[])
    assert torch.equal(tuned.generate(ids, max_new_tokens=0), ids)


# --- clear errors for damaged, missing and foreign files ---------------------------------------------
@pytest.fixture
def saved_prefix(tiny_gpt2, tmp_path):
    folder = prefix.save(prefix.apply(copy.deepcopy(tiny_gpt2), num_virtual_tokens=P), tmp_path / "prefix")
    return tiny_gpt2, folder


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_weights_file_is_a_value_error(saved_prefix, damage):
    model, folder = saved_prefix
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100] if damage == "truncated" else b"\x07" * 8 + data[8:])
    with pytest.raises(ValueError, match="damaged or cut short.*Save the prefix again"):
        prefix.load(model, folder)


def test_damaged_or_edited_config_is_a_value_error(saved_prefix):
    model, folder = saved_prefix
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "num_virtual_tokens": P + 1}))
    with pytest.raises(ValueError, match=r"shape \(4, 128\).*need \(5, 128\)"):
        prefix.load(model, folder)
    config_file.write_text(json.dumps(config)[:-5])
    with pytest.raises(ValueError, match="not valid JSON"):
        prefix.load(model, folder)


def test_missing_and_foreign_folders(saved_prefix, tmp_path):
    model, folder = saved_prefix
    with pytest.raises(ValueError, match="PREFIX_TUNING adapter, not a prompt"):
        prompt.load(copy.deepcopy(model), folder)
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM"}))
    (tmp_path / "lora" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="LORA adapter, not a prefix"):
        prefix.load(model, tmp_path / "lora")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no saved prefix"):
        prefix.load(model, folder)
    with pytest.raises(FileNotFoundError, match="no saved prompt"):
        prompt.load(model, tmp_path / "nothing here")
    with pytest.raises(ValueError, match="prefix- or prompt-tuned"):
        virtual_tokens.save(model, tmp_path / "plain")


# --- device-clean: what the shared code makes lives on the model's device -----------------------------
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_shared_code_is_device_clean(method, tmp_path):
    from conftest import make_tiny_llama

    from peft_lab import accelerator_check

    accelerator_check.enable()  # the pretend accelerator: host tensors meeting the model's fail, as on a GPU
    try:
        model = make_tiny_llama().requires_grad_(False).to(torch.device("cpu"))  # now "on the accelerator"
        ids, mask = IDS.to(torch.device("cpu")), MASK.to(torch.device("cpu"))
        tuned = _apply(method, model)
        tuned(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        tuned.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=3, eos_token_id=[3, 5], pad_token_id=0)
        loaded = METHODS[method].load(METHODS[method].remove(tuned), METHODS[method].save(tuned, tmp_path))
        loaded.generate(ids[:1], max_new_tokens=2, do_sample=True, top_k=3)
        assert accelerator_check.on_accelerator(loaded(input_ids=ids, attention_mask=mask).logits)
    finally:
        accelerator_check.disable()
