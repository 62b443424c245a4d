"""Freezing choices: exactly the named part is trainable."""
import pytest

from peft_lab import freeze


# What each choice trains, written independently of freeze.py: name patterns per architecture.
EXPECTED = {
    "llama": {"attention": r"model\.layers\.\d+\.self_attn\.", "mlp": r"model\.layers\.\d+\.mlp\.",
              "norms": r".*norm\.weight$", "embeddings": r"model\.embed_tokens\.", "head": r"model\.embed_tokens\.",
              "last_n": r"(model\.layers\.1\.|model\.norm\.)", "full": r".*"},
    "gpt2": {"attention": r"transformer\.h\.\d+\.attn\.", "mlp": r"transformer\.h\.\d+\.mlp\.",
             "norms": r"transformer\.(h\.\d+\.)?ln_", "embeddings": r"transformer\.(wte|wpe)\.",
             "head": r"transformer\.wte\.", "last_n": r"(transformer\.h\.1\.|transformer\.ln_f\.)", "full": r".*"},
}


@pytest.mark.parametrize("choice", list(freeze.CHOICES))
def test_every_choice_trains_exactly_the_named_part(tiny_model, choice):
    import re

    pattern = EXPECTED[tiny_model.config.model_type][choice]
    freeze.apply(tiny_model, choice, n=1, verbose=False)
    names = [n for n, _ in tiny_model.named_parameters()]  # tied weights appear once, under their first name
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    expected = {n for n in names if re.match(pattern, n)}
    assert trainable == expected and trainable, f"{choice}: {sorted(trainable ^ expected)}"


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
    out = capsys.readouterr().out
    trainable = sum(p.numel() for p in tiny_gpt2.parameters() if p.requires_grad)
    assert "norms" in out and f"{trainable:,}" in out
