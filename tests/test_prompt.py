"""Tests for peft_lab.prompt: soft prompt tuning on tiny GPT-2 and tiny Llama.

The reference is HF peft's prompt tuning with our prompt copied in: same logits for the real tokens
and the same loss, with and without right padding.

The conftest models are initialised with std 0.02, so small that their next token hardly depends on
the context (greedy decoding just repeats the last token, whatever the prompt). Tests about what the
prompt *does* (equivalence, generation) therefore use the same configs initialised with std 0.2
("sharp" models), where a prompt visibly changes the output; test_sharp_models_listen_to_the_prompt
checks that, so those tests cannot pass by accident.
"""
import copy

import pytest
import torch
from conftest import make_tiny_gpt2, make_tiny_llama

from peft_lab import prompt

P = 5
TEXT = "review sentiment positive negative"


@pytest.fixture(params=["gpt2", "llama"])
def sharp_model(request):
    """Tiny GPT-2 / tiny Llama from conftest's configs, initialised with std 0.2 instead of 0.02."""
    config = (make_tiny_gpt2() if request.param == "gpt2" else make_tiny_llama()).config
    config.initializer_range = 0.2
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config).eval()


def _batch():
    """Two rows, the second right-padded; labels -100 on the pads (row 0, position 0 labelled too)."""
    ids = torch.tensor([[4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0, 0]])
    mask = (ids != 0).long()
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _peft_twin(model, tuned):
    from peft import PromptTuningConfig, get_peft_model

    twin = get_peft_model(copy.deepcopy(model),
                          PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tuned.num_virtual_tokens))
    with torch.no_grad():
        twin.prompt_encoder["default"].embedding.weight.copy_(tuned.prompt)
    return twin.eval()


def _greedy_without_cache(model, soft_prompt, ids, steps):
    """Reference: re-run the whole [soft_prompt; embeddings(tokens)] every step, no cache at all."""
    tokens = ids
    emb = model.get_input_embeddings()
    for _ in range(steps):
        x = torch.cat([soft_prompt.unsqueeze(0).expand(len(tokens), -1, -1), emb(tokens)], dim=1)
        logits = model(inputs_embeds=x, use_cache=False).logits
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


@torch.no_grad()
@pytest.mark.parametrize("padded", [False, True])
def test_matches_hf_peft(sharp_model, padded):
    model = sharp_model
    torch.manual_seed(1)
    tuned = prompt.apply(model, num_virtual_tokens=P, init="random")
    twin = _peft_twin(model, tuned)
    ids, mask, labels = _batch()
    if not padded:
        ids, mask, labels = ids[:1], None, ids[:1]

    ours = tuned(input_ids=ids, attention_mask=mask, labels=labels)
    ref = twin(input_ids=ids, attention_mask=mask, labels=labels)

    assert ours.logits.shape == (ids.shape[0], ids.shape[1], model.config.vocab_size)
    assert ours["logits"] is ours.logits  # the output object stays consistent after stripping
    real = ref.logits[:, P:]
    if padded:  # only positions that are real tokens carry meaning
        real, mine = real[mask.bool()], ours.logits[mask.bool()]
    else:
        mine = ours.logits
    torch.testing.assert_close(mine, real, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.loss, ref.loss, atol=1e-5, rtol=0)


def test_training_moves_only_the_prompt(tiny_model):
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    tuned = prompt.apply(tiny_model, num_virtual_tokens=P, init="vocab")
    trainable = [p for p in tuned.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is tuned.prompt
    assert tuned.prompt.shape == (P, tiny_model.get_input_embeddings().weight.shape[1])
    start = tuned.prompt.detach().clone()

    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids, mask, labels = _batch()
    for _ in range(3):
        loss = tuned(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k]), f"base weight {k} changed"
    assert not torch.equal(tuned.prompt.detach(), start)
    assert tuned.peft_lab_info == {"method": "prompt", "num_virtual_tokens": P, "init": "vocab"}


@torch.no_grad()
@pytest.mark.filterwarnings("ignore:Position ids are not supported")  # peft drops generate's position ids
def test_generate_with_cache_matches_without_cache_and_hf_peft(sharp_model):
    model = sharp_model
    torch.manual_seed(2)
    tuned = prompt.apply(model, num_virtual_tokens=P, init="random")
    ids = torch.tensor([[4, 5, 6, 7], [8, 9, 10, 11]])

    ours = tuned.generate(ids, max_new_tokens=8, eos_token_id=[])
    assert ours.shape == (2, 12) and torch.equal(ours[:, :4], ids)
    assert torch.equal(ours, _greedy_without_cache(model, tuned.prompt, ids, 8))

    # HF peft's generate (with its cache) agrees too, stopping at eos the same way.
    twin = _peft_twin(model, tuned)
    ref = twin.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert torch.equal(tuned.generate(ids, max_new_tokens=8), ref)


@torch.no_grad()
def test_sharp_models_listen_to_the_prompt(sharp_model):
    """A soft prompt of real word embeddings changes the greedy continuation and the next-token
    distribution (seeded; every seed 0-9 changes the output on both models, so this is no fluke)."""
    ids = torch.tensor([[4, 5, 6, 7]])
    emb = sharp_model.get_input_embeddings().weight
    torch.manual_seed(3)
    tuned = prompt.apply(sharp_model, num_virtual_tokens=P, init="vocab")

    without = _greedy_without_cache(sharp_model, emb[:0], ids, 6)  # empty prompt: the base model
    assert torch.equal(without, sharp_model.generate(ids, max_new_tokens=6, do_sample=False,
                                                     eos_token_id=None, pad_token_id=0))
    with_prompt = tuned.generate(ids, max_new_tokens=6, eos_token_id=[])
    assert not torch.equal(without, with_prompt)
    p0 = torch.softmax(sharp_model(ids).logits[0, -1], -1)
    p1 = torch.softmax(tuned(ids).logits[0, -1], -1)
    assert (p0 - p1).abs().sum() > 0.3  # total variation x 2: a large move, not rounding


@torch.no_grad()
def test_generate_sampling_and_errors(tiny_gpt2):
    tuned = prompt.apply(tiny_gpt2, num_virtual_tokens=P)
    ids = torch.tensor([[4, 5, 6]])
    kw = dict(max_new_tokens=5, do_sample=True, temperature=0.7, top_k=5, eos_token_id=[])
    a = tuned.generate(ids, generator=torch.Generator().manual_seed(0), **kw)
    b = tuned.generate(ids, generator=torch.Generator().manual_seed(0), **kw)
    assert a.shape == (1, 8) and torch.equal(a, b)
    top5 = set(tuned(ids).logits[0, -1].topk(5).indices.tolist())
    assert int(a[0, 3]) in top5  # top_k really limits the first choice
    # sampling really samples: hot and unrestricted, some seed leaves the greedy path (fails if do_sample were ignored)
    greedy = tuned.generate(ids, max_new_tokens=5, eos_token_id=[])
    hot = [tuned.generate(ids, max_new_tokens=5, do_sample=True, temperature=5.0, eos_token_id=[],
                          generator=torch.Generator().manual_seed(seed)) for seed in range(5)]
    assert any(not torch.equal(h, greedy) for h in hot)

    padded = torch.tensor([[4, 5, 6], [7, 8, 0]])
    with pytest.raises(ValueError, match="unpadded"):
        tuned.generate(padded, attention_mask=(padded != 0).long(), max_new_tokens=2)
    with pytest.raises(ValueError, match="num_beams"):
        tuned.generate(ids, max_new_tokens=2, num_beams=2)
    with pytest.raises(ValueError, match="position embeddings"):
        tuned(input_ids=torch.full((1, 125), 4))
    with pytest.raises(ValueError, match="position_ids"):
        tuned(input_ids=ids, position_ids=torch.arange(3)[None])


def test_inits(tiny_model, tokenizer):
    weight = tiny_model.get_input_embeddings().weight
    torch.manual_seed(0)
    rnd = prompt.apply(tiny_model, num_virtual_tokens=P, init="random").prompt
    assert rnd.dtype == torch.float32 and rnd.abs().max() <= 0.5

    vocab = prompt.apply(tiny_model, num_virtual_tokens=P, init="vocab").prompt
    for row in vocab:  # every vector is some token's embedding
        assert (weight == row).all(dim=1).any()

    text_ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(text_ids) == 4
    for n, expected_ids in [(10, text_ids * 2 + text_ids[:2]), (3, text_ids[:3])]:  # repeated / cut
        txt = prompt.apply(tiny_model, num_virtual_tokens=n, init="text", init_text=TEXT, tokenizer=tokenizer)
        assert torch.equal(txt.prompt.detach(), weight[torch.tensor(expected_ids)])
        assert txt.peft_lab_info["init"] == "text"

    with pytest.raises(ValueError, match="init_text"):
        prompt.apply(tiny_model, init="text")
    with pytest.raises(ValueError, match="choose one of"):
        prompt.apply(tiny_model, init="zeros")


def test_nearest_tokens_of_text_init(tiny_llama, tokenizer):
    tuned = prompt.apply(tiny_llama, num_virtual_tokens=6, init="text", init_text=TEXT, tokenizer=tokenizer)
    near = prompt.nearest_tokens(tuned, tokenizer, k=2)
    assert len(near) == 6 and all(len(row) == 2 for row in near)
    words = TEXT.split()
    assert [row[0][0] for row in near] == words + words[:2]
    assert all(abs(row[0][1] - 1.0) < 1e-5 and row[1][1] < row[0][1] for row in near)


@torch.no_grad()
def test_save_load_round_trip_and_wrong_base(tmp_path, tiny_model, tokenizer):
    make = make_tiny_gpt2 if tiny_model.config.model_type == "gpt2" else make_tiny_llama
    torch.manual_seed(0)
    tuned = prompt.apply(tiny_model, num_virtual_tokens=P, init="random")
    prompt.save(tuned, tmp_path / "p")
    assert sorted(f.name for f in (tmp_path / "p").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    again = prompt.load(make(), tmp_path / "p")
    assert torch.equal(again.prompt, tuned.prompt)
    assert again.peft_lab_info == tuned.peft_lab_info
    assert [p for p in again.parameters() if p.requires_grad] == [again.prompt]
    ids, mask, _ = _batch()
    assert torch.equal(again(ids, attention_mask=mask).logits, tuned(ids, attention_mask=mask).logits)

    other = make_tiny_llama() if tiny_model.config.model_type == "gpt2" else make_tiny_gpt2()
    with pytest.raises(ValueError, match="model_type"):
        prompt.load(other, tmp_path / "p")
    with pytest.raises(ValueError, match="vocab_size: saved 51, this model 60"):
        prompt.load(make(vocab_size=60), tmp_path / "p")


def test_half_precision_base_keeps_an_fp32_prompt(tiny_llama):
    model = tiny_llama.to(torch.bfloat16)
    tuned = prompt.apply(model, num_virtual_tokens=P, init="vocab")
    ids = torch.tensor([[4, 5, 6]])
    out = tuned(ids, labels=ids)
    out.loss.backward()
    assert tuned.prompt.dtype == torch.float32 and out.logits.dtype == torch.bfloat16
    assert tuned.prompt.grad is not None and tuned.prompt.grad.abs().sum() > 0
    assert tuned.generate(ids, max_new_tokens=2).shape == (1, 5)
