"""Behaviour that had no test: the text loss against transformers' own, the per-epoch reshuffle, the warm-up
schedule, and what lora.load refuses or matches in a peft config."""
import json

import pytest
import torch

from peft_lab import data, train
from peft_lab.methods import lora

from conftest import make_tiny_task


def test_text_loss_equals_the_models_own_labels_loss(tiny_llama, tokenizer):
    texts = ["the film was great and i loved this movie", "bad", "really good food at the hotel"]
    batch = data._encode_texts(texts, tokenizer, max_length=32, device=None)
    assert (batch["labels"] == -100).any()  # padding is in the batch and must not be scored
    ours = train.text_loss(tiny_llama, batch)
    theirs = tiny_llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_endless_batches_reshuffle_every_epoch_and_repeat_from_the_seed():
    task = make_tiny_task()  # 8 training examples: 2 batches of 4 an epoch

    def orders(seed, epochs=3):
        seen = []
        stream = data.endless_batches(task.train, task, _Tok(), batch_size=4, seed=seed)
        for _ in range(2 * epochs):
            seen.append(tuple(next(stream)["input_ids"][:, 0].tolist()))
        return [seen[i] + seen[i + 1] for i in range(0, len(seen), 2)]

    first = orders(seed=0)
    assert first == orders(seed=0)  # reproducible from the seed
    assert len(set(first)) > 1  # a new order in a later epoch
    assert all(sorted(epoch) == sorted(first[0]) for epoch in first)  # every epoch shows every example once


class _Tok:
    """A tokenizer that writes each example as one token: the index of its text, so batches show their order."""
    pad_token_id = 0

    def __init__(self):
        self.index = {}

    def __call__(self, text, add_special_tokens=False):
        token = self.index.setdefault(text.split("\n")[0], len(self.index) + 1)
        return type("Encoded", (), {"input_ids": [token]})()


def test_warmup_raises_the_learning_rate_linearly_then_holds(tiny_llama, tokenizer, monkeypatch):
    seen = []
    real_step = torch.optim.AdamW.step

    def record(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    tuned = lora.apply(tiny_llama, rank=2, targets=["q_proj"])
    train.fit(tuned, tokenizer, make_tiny_task(), steps=6, lr=1e-3, warmup_steps=4, batch_size=2, progress=False, log=False)
    assert seen == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def _saved_adapter(tiny_llama, folder, **config_changes):
    tuned = lora.apply(tiny_llama, rank=2, targets=["q_proj", "v_proj"])
    lora.save(tuned, folder)
    lora.remove(tuned)
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(config_changes)
    path.write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("feature, value", [("modules_to_save", ["lm_head"]), ("bias", "all"),
                                            ("layers_to_transform", [0]), ("rank_pattern", {"q_proj": 4})])
def test_lora_load_refuses_peft_features_it_does_not_implement(feature, value, tiny_llama, tmp_path):
    folder = _saved_adapter(tiny_llama, tmp_path, **{feature: value})
    with pytest.raises(ValueError, match=feature):
        lora.load(tiny_llama, folder)


def test_a_regex_target_modules_in_a_peft_config_matches_like_peft(tiny_llama, tmp_path):
    folder = _saved_adapter(tiny_llama, tmp_path, target_modules=r".*\.(q_proj|v_proj)")  # peft: a string is a regex
    tuned = lora.load(tiny_llama, folder)
    wrapped = set(lora.lora_layers(tuned))
    assert all(name.endswith(("q_proj", "v_proj")) for name in wrapped)
    assert len(wrapped) == 2 * tiny_llama.config.num_hidden_layers


def test_loading_into_layers_already_there_checks_that_they_agree(tiny_llama, tmp_path):
    trained = lora.apply(tiny_llama, rank=2, alpha=4, targets=["q_proj", "v_proj"])
    with torch.no_grad():
        for layer in lora.lora_layers(trained).values():
            layer.lora_B.weight.normal_()
    lora.save(trained, tmp_path)
    saved = {n: l.lora_B.weight.clone() for n, l in lora.lora_layers(trained).items()}
    lora.remove(trained)
    ready = lora.apply(tiny_llama, rank=2, alpha=4, targets=["q_proj", "v_proj"])  # the same settings: loads into them
    lora.load(ready, tmp_path)
    assert all(torch.equal(l.lora_B.weight, saved[n]) for n, l in lora.lora_layers(ready).items())
    lora.remove(ready)
    other = lora.apply(tiny_llama, rank=2, alpha=8, targets=["q_proj", "v_proj"])  # another alpha: refused
    with pytest.raises(ValueError, match="alpha=4.*alpha=8"):
        lora.load(other, tmp_path)


def test_the_prefix_numbers_real_tokens_after_itself_also_with_explicit_positions(tiny_llama):
    from peft_lab.methods import prefix

    tuned = prefix.apply(tiny_llama, num_virtual_tokens=3)
    with torch.no_grad():
        tuned.prefix.normal_()  # a prefix that changes the output, so a wrong position would show
        ids = torch.tensor([[5, 6, 7, 8]])
        implicit = tuned(input_ids=ids).logits
        explicit = tuned(input_ids=ids, position_ids=torch.arange(4)[None]).logits  # 0..3 are shifted to 3..6
        unshifted = tuned.model(input_ids=ids, past_key_values=tuned.prefix_cache(1), use_cache=True,
                                position_ids=torch.arange(4)[None]).logits  # what 0..3 would give unshifted
    assert torch.allclose(implicit, explicit, atol=1e-6)
    assert not torch.allclose(implicit, unshifted, atol=1e-3)
