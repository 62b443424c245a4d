"""The exercises whose expected values are computed out of the learner's sight (counts, shapes, memory), and the
predict-then-measure exercises: a prediction is checked against the verdict the measured numbers give."""

from peft_lab import exercises
from peft_lab.methods import prefix


def _acc(right, n=200, items="same"):
    flags = [1] * right + [0] * (n - right)
    return {"accuracy": right / n, "n": n, "correct": "".join(map(str, flags)), "items": items}


def test_the_measured_winner_needs_a_measurable_margin():
    clear = {"1": _acc(100), "4": _acc(150), "16": _acc(105)}
    assert exercises.measured_winner(clear) == "4"
    close = {"1": _acc(148), "4": _acc(150), "16": _acc(100)}   # 4 leads 1 by two items: not measurable
    assert exercises.measured_winner(close) == exercises.NO_DIFFERENCE
    kl = {"a": {"kl": 0.1, "kl_low": 0.09, "kl_high": 0.11}, "b": {"kl": 0.5, "kl_low": 0.45, "kl_high": 0.55}}
    assert exercises.measured_winner(kl, "kl", lowest=True) == "a"
    assert exercises.measured_winner(kl, "kl") == "b"


def test_a_prediction_is_checked_against_the_measurement(capsys):
    results = {1: _acc(100), 4: _acc(150), 16: _acc(105)}
    assert exercises.check_prediction("rank", 4, results)
    assert "is what this run measured" in capsys.readouterr().out
    assert not exercises.check_prediction("rank", "no measurable difference", results)
    assert "this run measured '4'" in capsys.readouterr().out
    assert not exercises.check_prediction("rank", ..., results)
    out = capsys.readouterr().out
    assert "no prediction written" in out and "This run measured: 4." in out
    assert not exercises.check_prediction("rank", 8, results)
    assert "predict one of ['1', '4', '16', 'no measurable difference']" in capsys.readouterr().out
    tie = {"random": _acc(150), "text": _acc(149)}
    assert exercises.check_prediction("init", "no measurable difference", tie)


def _lora_count(model, rank, names):
    return sum(rank * (m.in_features + m.out_features) for n, m in model.named_modules() if n.split(".")[-1] in names)


def test_counting_exercises_compute_their_answers_out_of_sight(tiny_llama, capsys):
    right = _lora_count(tiny_llama, 16, ("k_proj", "v_proj"))
    assert exercises.check_lora_parameter_count(right, tiny_llama)
    assert not exercises.check_lora_parameter_count(right + 1, tiny_llama)
    assert not exercises.check_lora_parameter_count(..., tiny_llama)
    cfg = tiny_llama.config
    kv_width = cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    assert exercises.check_prefix_parameter_count(20 * cfg.num_hidden_layers * 2 * kv_width, tiny_llama)
    assert not exercises.check_prefix_parameter_count(20 * cfg.num_hidden_layers * 2 * cfg.hidden_size, tiny_llama)  # query width
    L, h = cfg.num_hidden_layers, 512
    assert exercises.check_mlp_parameter_count(16 * kv_width + kv_width * h + h + h * L * 2 * kv_width + L * 2 * kv_width, tiny_llama)
    tuned = prefix.apply(tiny_llama, 5)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert exercises.check_prefix_keys_shape([4, cfg.num_key_value_heads, 5, head_dim], tuned)
    assert not exercises.check_prefix_keys_shape((4, cfg.num_attention_heads, 5, head_dim), tuned)  # query heads
    from transformers import LlamaForCausalLM

    five = LlamaForCausalLM(cfg.__class__(**{**cfg.to_dict(), "num_hidden_layers": 5}))
    total = sum(p.numel() for p in five.parameters())
    trainable = sum(p.numel() for n, p in five.named_parameters()
                    if n.startswith(tuple(f"model.layers.{i}." for i in (1, 2, 3, 4))) or n == "model.norm.weight")
    assert exercises.check_last4_memory((4 * total + 12 * trainable) / 2 ** 20, five)
    assert not exercises.check_last4_memory(16 * total / 2 ** 20, five)   # every weight trained
    out = capsys.readouterr().out
    assert out.count("correct") >= 5 and "not yet - try again" in out


def test_the_token_exercise_accepts_either_spelling(tokenizer, capsys):
    from peft_lab.methods import prompt

    text = "good bad film"
    last = tokenizer.convert_ids_to_tokens(prompt.text_init_ids(tokenizer, text, 7))[-1]
    assert exercises.check_last_virtual_token(last, tokenizer, text, 7)
    assert exercises.check_last_virtual_token(last.replace("Ġ", " "), tokenizer, text, 7)
    assert not exercises.check_last_virtual_token("nothing", tokenizer, text, 7)
