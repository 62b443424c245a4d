"""Prefix tuning (peft_lab.prefix) on the tiny GPT-2 and the tiny Llama with grouped-query attention."""
import copy

import pytest
import torch

from peft_lab import prefix

P = 4
IDS = torch.tensor([[4, 5, 6, 7, 8, 9], [10, 11, 12, 13, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])  # right padding


def set_prefix(tuned, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tuned.prefix.copy_(torch.randn(tuned.prefix_shape, generator=g) * scale)


def greedy_without_cache(step_fn, ids, n):
    """Reference decoder: re-run the whole sequence every step, take the argmax of the last position."""
    for _ in range(n):
        with torch.no_grad():
            next_id = step_fn(ids).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, next_id[:, None]], dim=1)
    return ids


# --- shape, freezing, the common face ---------------------------------------------------------------
def test_shapes_freezing_and_info(tiny_model):
    tuned = prefix.apply(tiny_model, num_virtual_tokens=P)
    kv_heads = getattr(tiny_model.config, "num_key_value_heads", None) or tiny_model.config.num_attention_heads
    shapes = prefix.prefix_shapes(tuned, batch_size=3)
    assert len(shapes) == tiny_model.config.num_hidden_layers
    assert all(row["keys"] == row["values"] == (3, kv_heads, P, 8) for row in shapes)
    if tiny_model.config.model_type == "llama":
        assert kv_heads == 2 < tuned.num_heads == 4  # GQA: the prefix has the key/value head count
    trainable = [p for p in tuned.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is tuned.prefix
    assert not any(p.requires_grad for p in tiny_model.parameters())
    assert prefix.count_prefix_parameters(tuned) == trainable[0].numel()
    assert tuned.peft_lab_info == {"method": "prefix", "num_virtual_tokens": P, "reparametrize": False,
                                   "init": "random"}
    out = tuned(input_ids=IDS, attention_mask=MASK, labels=IDS.masked_fill(MASK == 0, -100))
    assert out.logits.shape == (2, IDS.shape[1], tiny_model.config.vocab_size)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


# --- equivalence with HF peft -----------------------------------------------------------------------
@pytest.mark.parametrize("use_mask", [False, True])
def test_matches_hf_peft(tiny_model, use_mask):
    from peft import PrefixTuningConfig, get_peft_model

    reference = get_peft_model(copy.deepcopy(tiny_model),
                               PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)).eval()
    tuned = prefix.apply(tiny_model, num_virtual_tokens=P)
    # peft keeps one embedding row per virtual token: (P, layers * 2 * kv_heads * head_dim), read as
    # (P, layers, 2 [key, value], kv_heads, head_dim). Ours is (layers, 2, kv_heads, P, head_dim).
    weight = reference.prompt_encoder["default"].embedding.weight
    assert weight.shape == (P, tuned.num_layers * 2 * tuned.num_kv_heads * tuned.head_dim)
    with torch.no_grad():
        tuned.prefix.copy_(weight.view(P, tuned.num_layers, 2, tuned.num_kv_heads, tuned.head_dim)
                           .permute(1, 2, 3, 0, 4))
    mask = MASK if use_mask else None
    ids = IDS if use_mask else IDS[:1]
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        ours = tuned(input_ids=ids, attention_mask=mask, labels=labels)
        theirs = reference(input_ids=ids, attention_mask=mask, labels=labels)
    real = (mask if mask is not None else torch.ones_like(ids)).bool()
    torch.testing.assert_close(ours.logits[real], theirs.logits[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)


# --- training touches only the prefix ---------------------------------------------------------------
def test_training_changes_only_the_prefix(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    tuned = prefix.apply(tiny_model, num_virtual_tokens=P)
    start = tuned.prefix.detach().clone()
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    tuned.train()
    for _ in range(3):
        loss = tuned(input_ids=IDS, attention_mask=MASK, labels=IDS.masked_fill(MASK == 0, -100)).loss
        optimizer.zero_grad()
        loss.backward()
        assert tuned.prefix.grad is not None and tuned.prefix.grad.abs().sum() > 0
        # every layer's keys and values receive gradient, not just the first layer's
        assert (tuned.prefix.grad.flatten(2).abs().sum(-1) > 0).all()
        optimizer.step()
    assert not torch.equal(tuned.prefix.detach(), start)
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --- generation -------------------------------------------------------------------------------------
def test_generate_with_cache_equals_without(tiny_model):
    base_greedy = greedy_without_cache(lambda x: tiny_model(input_ids=x), IDS[:1], 8)
    tuned = prefix.apply(tiny_model, num_virtual_tokens=P)
    set_prefix(tuned, scale=3.0)  # a large prefix, so it visibly steers the output
    cached = tuned.generate(IDS[:1], max_new_tokens=8, eos_token_id=[])
    uncached = greedy_without_cache(lambda x: tuned(input_ids=x), IDS[:1], 8)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, base_greedy)  # the prefix was present and mattered
    # a batch of unpadded prompts gives the same rows as one prompt at a time
    batch = torch.tensor([[4, 5, 6, 7], [10, 11, 12, 13]])
    both = tuned.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=5, eos_token_id=[])
    for row in range(2):
        assert torch.equal(both[row], tuned.generate(batch[row:row + 1], max_new_tokens=5, eos_token_id=[])[0])


def test_generate_stops_at_eos_and_samples(tiny_model):
    tuned = prefix.apply(tiny_model, num_virtual_tokens=P)
    set_prefix(tuned, scale=3.0)
    greedy = tuned.generate(IDS[:1], max_new_tokens=6, eos_token_id=[])
    first_new = int(greedy[0, IDS.shape[1]])
    stopped = tuned.generate(IDS[:1], max_new_tokens=6, eos_token_id=first_new)
    assert stopped.shape[1] == IDS.shape[1] + 1  # stopped right after the "eos"
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    s1 = tuned.generate(IDS[:1], max_new_tokens=6, do_sample=True, temperature=0.7, top_k=5, generator=g1)
    s2 = tuned.generate(IDS[:1], max_new_tokens=6, do_sample=True, temperature=0.7, top_k=5, generator=g2)
    assert torch.equal(s1, s2) and s1.shape[1] <= IDS.shape[1] + 6
    # sampling really samples: hot and unrestricted, some seed leaves the greedy path (fails if do_sample were ignored)
    samples = [tuned.generate(IDS[:1], max_new_tokens=6, do_sample=True, temperature=5.0, eos_token_id=[],
                              generator=torch.Generator().manual_seed(seed)) for seed in range(5)]
    assert any(not torch.equal(s, greedy) for s in samples)


# --- reparametrisation and initialisation -----------------------------------------------------------
def test_reparametrised_and_folded_agree(tiny_model):
    tuned = prefix.apply(tiny_model, num_virtual_tokens=P, reparametrize=True, hidden=16)
    trainable = [p for p in tuned.parameters() if p.requires_grad]
    assert len(trainable) == 5 and tuned.prefix is None  # embedding + two Linear layers (weights, biases)
    tuned(input_ids=IDS, labels=IDS).loss.backward()
    assert tuned.encoder.embedding.weight.grad.abs().sum() > 0
    with torch.no_grad():
        unfolded = tuned(input_ids=IDS, attention_mask=MASK).logits
    tuned.fold()
    assert tuned.encoder is None and [p for p in tuned.parameters() if p.requires_grad] == [tuned.prefix]
    assert tuned.prefix.shape == tuned.prefix_shape
    with torch.no_grad():
        folded = tuned(input_ids=IDS, attention_mask=MASK).logits
    torch.testing.assert_close(folded, unfolded, atol=1e-6, rtol=0)


@pytest.mark.parametrize("reparametrize", [False, True])
def test_text_init_reads_like_the_text(tiny_model, tokenizer, reparametrize):
    # With a text of >= P tokens, the untrained prefix is that text's first P keys/values at positions
    # 0..P-1, and the real tokens sit at P.. : exactly the base model reading "text + input".
    text = "the film was great but the food was bad"
    text_ids = tokenizer(text, return_tensors="pt").input_ids[:, :P]
    with torch.no_grad():
        expected = tiny_model(input_ids=torch.cat([text_ids, IDS[:1]], dim=1)).logits[:, P:]
    tuned = prefix.apply(tiny_model, num_virtual_tokens=P, reparametrize=reparametrize, hidden=16,
                         init="text", init_text=text, tokenizer=tokenizer)
    assert tuned.peft_lab_info["init"] == "text"
    with torch.no_grad():
        got = tuned(input_ids=IDS[:1]).logits
    torch.testing.assert_close(got, expected, atol=1e-4 if reparametrize else 1e-5, rtol=0)
    # a text shorter than P is repeated to fill P positions, with a warning that says what to do
    with pytest.warns(UserWarning, match="num_virtual_tokens=2"):
        short = prefix.text_prefix(tiny_model, tokenizer, "the film", 5)
    assert short.shape[3] == 5 and torch.equal(short[:, :, :, 2], short[:, :, :, 0])


def test_text_init_of_exactly_p_tokens_does_not_warn(tiny_model, tokenizer):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prefix.text_prefix(tiny_model, tokenizer, "the film was great", 4)


# --- save / load ------------------------------------------------------------------------------------
@pytest.mark.parametrize("reparametrize", [False, True])
def test_save_load_round_trip(tiny_model, tmp_path, reparametrize):
    fresh = copy.deepcopy(tiny_model)
    tuned = prefix.apply(tiny_model, num_virtual_tokens=P, reparametrize=reparametrize, hidden=16)
    assert prefix.save(tuned, tmp_path) == tmp_path
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))  # HF peft's layout: (P, layers * 2 * kv_width)
    assert list(saved) == ["prompt_embeddings"] and saved["prompt_embeddings"].shape == (P, prefix.count_prefix_parameters(tuned) // P)
    with torch.no_grad():  # folded only: the prefix itself, never the MLP
        torch.testing.assert_close(saved["prompt_embeddings"], tuned.prefix_tensor().permute(3, 0, 1, 2, 4).reshape(P, -1))
    loaded = prefix.load(fresh, tmp_path)
    assert loaded.peft_lab_info["reparametrize"] is reparametrize
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS, attention_mask=MASK).logits,
                                   tuned(input_ids=IDS, attention_mask=MASK).logits, atol=1e-6, rtol=0)


def test_load_on_wrong_base_is_refused(tiny_gpt2, tiny_llama, tmp_path):
    from transformers import GPT2LMHeadModel

    prefix.save(prefix.apply(tiny_gpt2, num_virtual_tokens=P), tmp_path)
    with pytest.raises(ValueError, match="different base model.*model_type"):
        prefix.load(tiny_llama, tmp_path)
    cfg = copy.deepcopy(tiny_gpt2.config)
    cfg.n_layer = 3
    with pytest.raises(ValueError, match="num_hidden_layers: saved 2, this model 3"):
        prefix.load(GPT2LMHeadModel(cfg), tmp_path)
    with pytest.raises(FileNotFoundError, match="no saved prefix"):
        prefix.load(tiny_llama, tmp_path / "missing")


# --- refusals and clear errors ----------------------------------------------------------------------
def _enable_checkpointing(model):
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def test_gradient_checkpointing_is_refused(tiny_model):
    checkpointed = copy.deepcopy(tiny_model)
    _enable_checkpointing(checkpointed)
    with pytest.raises(ValueError, match="checkpointing"):
        prefix.apply(checkpointed, num_virtual_tokens=P)
    tuned = prefix.apply(tiny_model, num_virtual_tokens=P)
    _enable_checkpointing(tiny_model)  # switched on after apply: caught at forward and generate
    with pytest.raises(ValueError, match="checkpointing"):
        tuned(input_ids=IDS)
    with pytest.raises(ValueError, match="checkpointing"):
        tuned.generate(IDS[:1], max_new_tokens=2)


def test_bad_input_gets_clear_errors(tiny_gpt2, tokenizer):
    with pytest.raises(ValueError, match="unknown init"):
        prefix.apply(copy.deepcopy(tiny_gpt2), init="vocab")
    with pytest.raises(ValueError, match="init_text"):
        prefix.apply(copy.deepcopy(tiny_gpt2), init="text")
    tuned = prefix.apply(tiny_gpt2, num_virtual_tokens=P)
    with pytest.raises(ValueError, match="unpadded"):
        tuned.generate(IDS, attention_mask=MASK, max_new_tokens=2)
    with pytest.raises(ValueError, match="position embeddings"):
        tuned(input_ids=torch.ones(1, 126, dtype=torch.long))  # 4 + 126 > 128 positions
    with pytest.raises(ValueError, match="owns the key/value cache"):
        tuned(input_ids=IDS, past_key_values=tuned.prefix_cache(2))


# --- the notebook's attention picture ---------------------------------------------------------------
def test_attention_weights_show_the_prefix(tiny_model):
    tuned = prefix.apply(tiny_model, num_virtual_tokens=P)
    before = tiny_model.config._attn_implementation
    w = prefix.attention_weights(tuned, IDS[:1], layer=1, head=3)
    T = IDS.shape[1]
    assert w.shape == (T, P + T)
    torch.testing.assert_close(w.sum(-1), torch.ones(T), atol=1e-5, rtol=0)
    assert (w[:, :P] > 0).all()  # every real token sees every prefix slot
    assert torch.equal(w[:, P:], w[:, P:].tril())  # and only earlier real tokens (causal)
    assert tiny_model.config._attn_implementation == before  # switched back after the call
