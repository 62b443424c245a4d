"""Freezing choices: exactly the named part is trainable."""
import pytest

from peft_lab import freeze


@pytest.mark.parametrize("choice", list(freeze.CHOICES))
def test_every_choice_leaves_some_but_only_the_chosen_parameters_trainable(tiny_model, choice):
    freeze.apply(tiny_model, choice, n=1, verbose=False)
    counts = freeze.count(tiny_model)
    assert 0 < counts["trainable"] <= counts["total"]
    if choice == "full":
        assert counts["trainable"] == counts["total"]
    else:
        assert counts["trainable"] < counts["total"]


def test_last_n_trains_exactly_the_last_blocks_and_final_norm(tiny_llama):
    freeze.apply(tiny_llama, "last_n", n=1, verbose=False)
    trainable = {name for name, p in tiny_llama.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("model.layers.1.") or name == "model.norm.weight" for name in trainable)


def test_attention_choice_matches_the_formula(tiny_llama):
    cfg = tiny_llama.config
    d, kv = cfg.hidden_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    freeze.apply(tiny_llama, "attention", verbose=False)
    assert freeze.count(tiny_llama)["trainable"] == cfg.num_hidden_layers * (2 * d * d + 2 * d * kv)


def test_head_and_embeddings_are_one_tensor_when_tied(tiny_llama):
    freeze.apply(tiny_llama, "head", verbose=False)
    assert tiny_llama.model.embed_tokens.weight.requires_grad
    assert freeze.count(tiny_llama)["trainable"] == tiny_llama.model.embed_tokens.weight.numel()


def test_unknown_choice_lists_the_valid_ones(tiny_llama):
    with pytest.raises(ValueError, match="Valid choices: full.*last_n.*attention"):
        freeze.apply(tiny_llama, "everything")


def test_last_n_out_of_range(tiny_llama):
    with pytest.raises(ValueError, match="between 1 and 2"):
        freeze.apply(tiny_llama, "last_n", n=5)


def test_apply_prints_the_count(tiny_gpt2, capsys):
    freeze.apply(tiny_gpt2, "norms")
    assert "norms" in capsys.readouterr().out
