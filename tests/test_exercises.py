"""The code-writing exercises: every solution in solutions/ passes its check, the typical wrong answers are
refused with a message that names the mistake, and an unwritten stub or a crashing function never raises."""
import importlib.util
from pathlib import Path

import pytest
import torch

from peft_lab import exercises

SOLUTIONS = Path(__file__).resolve().parent.parent / "solutions"


def solution(filename: str):
    spec = importlib.util.spec_from_file_location(filename.removesuffix(".py"), SOLUTIONS / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refused(check, fn, capsys, *words):
    """The check refuses ``fn``, prints what it returns, and its message holds every one of ``words``."""
    verdict = check(fn)
    printed = capsys.readouterr().out
    assert not verdict and verdict.message in printed
    for word in words:
        assert word in verdict.message, verdict.message
    return verdict


# --- every solution passes ---------------------------------------------------------------------------

@pytest.mark.parametrize("filename, check, function", [
    ("01_freeze_attention_only.py", exercises.check_freeze_attention_only, "freeze_attention_only"),
    ("02_lora.py", exercises.check_lora_forward, "lora_forward"),
    ("02_lora.py", exercises.check_lora_merge, "lora_merge"),
    ("03_prefix.py", exercises.check_prefix_for_layer, "prefix_for_layer"),
    ("04_prompt.py", exercises.check_join_prompt, "join_prompt"),
    ("07_nf4.py", exercises.check_nf4_levels, "nf4_levels_mine"),
    ("07_nf4.py", exercises.check_nf4_quantize, "quantize_mine"),
    ("08_answer_labels.py", exercises.check_answer_labels, "answer_labels_mine"),
])
def test_the_solution_passes(filename, check, function, capsys):
    verdict = check(getattr(solution(filename), function))
    assert verdict, verdict.message
    assert verdict.message.startswith("correct") and verdict.message in capsys.readouterr().out


def test_every_solution_file_is_checked_here():
    checked = {"01_freeze_attention_only.py", "02_lora.py", "03_prefix.py", "04_prompt.py", "07_nf4.py",
               "08_answer_labels.py"}
    assert {p.name for p in SOLUTIONS.glob("*.py")} == checked


# --- stubs and crashes never raise ----------------------------------------------------------------------

def stub_ellipsis(layer, x):
    ...


def stub_raise(layer, x):
    """Return base(x) + scaling * B(A(x))."""
    raise NotImplementedError  # your code here


def stub_pass(model):
    pass


@pytest.mark.parametrize("check, stub", [
    (exercises.check_lora_forward, stub_ellipsis), (exercises.check_lora_merge, stub_raise),
    (exercises.check_freeze_attention_only, stub_pass), (exercises.check_prefix_for_layer, stub_ellipsis),
    (exercises.check_join_prompt, stub_raise),
])
def test_an_unwritten_stub_is_not_written_yet(check, stub, capsys):
    verdict = check(stub)
    assert not verdict and "not written yet" in capsys.readouterr().out


def test_not_implemented_raised_later_counts_as_not_written(capsys):
    def half_done(layer, x):
        y = layer.base(x)
        raise NotImplementedError("the update")
    assert "not written yet" in exercises.check_lora_forward(half_done).message


def test_an_exception_in_the_learners_code_is_a_hint_not_a_crash(capsys):
    def typo(layer, x):
        return layer.lora_C(x)
    verdict = refused(exercises.check_lora_forward, typo, capsys, "your function raised AttributeError")
    assert "lora_C" in verdict.message


def test_something_that_is_not_a_function_is_refused(capsys):
    refused(exercises.check_lora_merge, 42, capsys, "pass the function itself")


def test_a_check_leaves_the_global_random_numbers_alone():
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    exercises.check_lora_merge(solution("02_lora.py").lora_merge)
    assert torch.equal(torch.rand(3), expected)


# --- 02: LoRA, the typical wrong answers ----------------------------------------------------------------

def forward_without_scaling(layer, x):
    return layer.base(x) + layer.lora_B(layer.lora_A(x))


def forward_scaling_squared(layer, x):
    return layer.base(x) + layer.scaling ** 2 * layer.lora_B(layer.lora_A(x))


def forward_scaling_inverted(layer, x):
    return layer.base(x) + layer.rank / layer.alpha * layer.lora_B(layer.lora_A(x))


def forward_transposed(layer, x):
    return layer.base(x) + layer.scaling * x @ (layer.lora_B.weight @ layer.lora_A.weight)


def forward_without_base(layer, x):
    return layer.scaling * layer.lora_B(layer.lora_A(x))


def forward_forgot_return(layer, x):
    layer.base(x) + layer.scaling * layer.lora_B(layer.lora_A(x))


@pytest.mark.parametrize("wrong, words", [
    (forward_without_scaling, ["scaling is missing"]),
    (forward_scaling_squared, ["scaling is squared"]),
    (forward_scaling_inverted, ["scaling is inverted"]),
    (forward_transposed, ["transposed"]),
    (forward_without_base, ["frozen part is missing"]),
    (forward_forgot_return, ["forget `return`"]),
])
def test_lora_forward_names_the_mistake(wrong, words, capsys):
    refused(exercises.check_lora_forward, wrong, capsys, *words)


def merge_without_scaling(layer):
    return layer.base.weight + layer.lora_B.weight @ layer.lora_A.weight


def merge_scaling_squared(layer):
    return layer.base.weight + layer.scaling ** 2 * layer.lora_B.weight @ layer.lora_A.weight


def merge_transposed(layer):
    return layer.base.weight + layer.scaling * (layer.lora_B.weight @ layer.lora_A.weight).T


def merge_update_only(layer):
    return layer.scaling * layer.lora_B.weight @ layer.lora_A.weight


def merge_wrong_order(layer):
    return layer.base.weight + layer.scaling * layer.lora_A.weight.T @ layer.lora_B.weight.T


@pytest.mark.parametrize("wrong, words", [
    (merge_without_scaling, ["scaling is missing"]),
    (merge_scaling_squared, ["scaling is squared"]),
    (merge_transposed, ["transposed"]),
    (merge_update_only, ["frozen part is missing"]),
    (merge_wrong_order, ["transposed"]),
])
def test_lora_merge_names_the_mistake(wrong, words, capsys):
    refused(exercises.check_lora_merge, wrong, capsys, *words)


# --- 01: freezing, attention only --------------------------------------------------------------------------

def unfreezes_but_never_freezes(model):
    for name, p in model.named_parameters():
        if "self_attn" in name:
            p.requires_grad_(True)


def freezes_but_never_unfreezes(model):
    for name, p in model.named_parameters():
        if "self_attn" not in name:
            p.requires_grad_(False)


def only_query_and_value(model):
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        if name.endswith(("q_proj.weight", "v_proj.weight")):
            p.requires_grad_(True)


def attention_and_norms(model):
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        if "self_attn" in name or "norm" in name:
            p.requires_grad_(True)


@pytest.mark.parametrize("wrong, words", [
    (unfreezes_but_never_freezes, ["frozen layer was left trainable", "every parameter trainable", "embed_tokens"]),
    (freezes_but_never_unfreezes, ["should train was left frozen", "every parameter frozen"]),
    (only_query_and_value, ["should train was left frozen", "k_proj", "o_proj"]),
    (attention_and_norms, ["left trainable", "norm"]),
])
def test_freezing_names_the_layers_that_are_wrong(wrong, words, capsys):
    refused(exercises.check_freeze_attention_only, wrong, capsys, *words)


def test_freezing_may_return_the_model_or_nothing(capsys):
    def returns_nothing(model):
        solution("01_freeze_attention_only.py").freeze_attention_only(model)
    assert exercises.check_freeze_attention_only(returns_nothing)


# --- 03: the prefix in the cache's shape -------------------------------------------------------------------

def _heads(config, query=False):
    heads = config.num_attention_heads if query else config.num_key_value_heads
    return heads, config.hidden_size // config.num_attention_heads


def prefix_with_query_heads(prefix, layer, config, batch_size):
    P = prefix.shape[2]
    rows = [prefix[layer, i].reshape(P, config.num_attention_heads, -1).transpose(0, 1) for i in (0, 1)]
    return tuple(r.unsqueeze(0).expand(batch_size, -1, -1, -1) for r in rows)


def prefix_without_transpose(prefix, layer, config, batch_size):
    heads, dim = _heads(config)
    P = prefix.shape[2]
    rows = [prefix[layer, i].reshape(heads, P, dim) for i in (0, 1)]
    return tuple(r.unsqueeze(0).expand(batch_size, -1, -1, -1) for r in rows)


def prefix_without_batch(prefix, layer, config, batch_size):
    heads, dim = _heads(config)
    P = prefix.shape[2]
    return tuple(prefix[layer, i].view(P, heads, dim).transpose(0, 1) for i in (0, 1))


def prefix_swapped(prefix, layer, config, batch_size):
    keys, values = solution("03_prefix.py").prefix_for_layer(prefix, layer, config, batch_size)
    return values, keys


def prefix_first_layer_always(prefix, layer, config, batch_size):
    return solution("03_prefix.py").prefix_for_layer(prefix, 0, config, batch_size)


def prefix_view_with_query_heads(prefix, layer, config, batch_size):
    heads, dim = _heads(config, query=True)   # 4 heads of 8 do not fit a row of 2 x 8: reshape fails
    P = prefix.shape[2]
    return tuple(prefix[layer, i].view(P, heads, dim).transpose(0, 1) for i in (0, 1))


@pytest.mark.parametrize("wrong, words", [
    (prefix_with_query_heads, ["query head count", "num_key_value_heads"]),
    (prefix_without_transpose, ["wrong places"]),
    (prefix_without_batch, ["no batch axis"]),
    (prefix_swapped, ["swapped"]),
    (prefix_first_layer_always, ["layer 1", "layer 0"]),
    (prefix_view_with_query_heads, ["your function raised RuntimeError", "num_key_value_heads"]),
])
def test_prefix_names_the_mistake(wrong, words, capsys):
    refused(exercises.check_prefix_for_layer, wrong, capsys, *words)


# --- 04: the soft prompt in front ---------------------------------------------------------------------------

def _prompt_rows(prompt, embeds):
    return prompt.expand(embeds.shape[0], -1, -1)


def prompt_mask_not_extended(prompt, embeds, attention_mask, labels):
    P = prompt.shape[0]
    return (torch.cat([_prompt_rows(prompt, embeds), embeds], 1), attention_mask,
            torch.cat([labels.new_full((labels.shape[0], P), -100), labels], 1))


def prompt_labels_not_masked(prompt, embeds, attention_mask, labels):
    P = prompt.shape[0]
    return (torch.cat([_prompt_rows(prompt, embeds), embeds], 1),
            torch.cat([attention_mask.new_ones(attention_mask.shape[0], P), attention_mask], 1), labels)


def prompt_labels_zero(prompt, embeds, attention_mask, labels):
    inputs, mask, _ = solution("04_prompt.py").join_prompt(prompt, embeds, attention_mask, labels)
    return inputs, mask, torch.cat([labels.new_zeros(labels.shape[0], prompt.shape[0]), labels], 1)


def prompt_mask_zeros(prompt, embeds, attention_mask, labels):
    inputs, _, new_labels = solution("04_prompt.py").join_prompt(prompt, embeds, attention_mask, labels)
    return inputs, torch.cat([attention_mask.new_zeros(attention_mask.shape[0], prompt.shape[0]), attention_mask], 1), new_labels


def prompt_behind(prompt, embeds, attention_mask, labels):
    _, mask, new_labels = solution("04_prompt.py").join_prompt(prompt, embeds, attention_mask, labels)
    return torch.cat([embeds, _prompt_rows(prompt, embeds)], 1), mask, new_labels


def prompt_not_joined(prompt, embeds, attention_mask, labels):
    _, mask, new_labels = solution("04_prompt.py").join_prompt(prompt, embeds, attention_mask, labels)
    return embeds, mask, new_labels


def prompt_returns_two(prompt, embeds, attention_mask, labels):
    return solution("04_prompt.py").join_prompt(prompt, embeds, attention_mask, labels)[:2]


@pytest.mark.parametrize("wrong, words", [
    (prompt_mask_not_extended, ["mask is not extended"]),
    (prompt_labels_not_masked, ["labels are not masked"]),
    (prompt_labels_zero, ["labels are not masked", "-100"]),
    (prompt_mask_zeros, ["mask hides the prompt"]),
    (prompt_behind, ["behind the input"]),
    (prompt_not_joined, ["prompt was not joined"]),
    (prompt_returns_two, ["return three tensors"]),
])
def test_prompt_names_the_mistake(wrong, words, capsys):
    refused(exercises.check_join_prompt, wrong, capsys, *words)


def test_checks_run_under_the_pretend_accelerator(capsys):
    """The notebooks' tests run with PEFT_LAB_CHECK_DEVICES=1: the checks' own tensors must pass there too."""
    from peft_lab import accelerator_check

    accelerator_check.enable()
    try:
        assert exercises.check_join_prompt(solution("04_prompt.py").join_prompt)
        assert exercises.check_prefix_for_layer(solution("03_prefix.py").prefix_for_layer)
        assert exercises.check_lora_forward(solution("02_lora.py").lora_forward)
        assert exercises.check_freeze_attention_only(solution("01_freeze_attention_only.py").freeze_attention_only)
        assert "not written yet" in exercises.check_lora_merge(stub_raise).message
    finally:
        accelerator_check.disable()


# --- train.fit leaves a line saying what ran (readable where the notebook is not run) ---------------------

def test_an_answer_the_check_cannot_use_is_a_hint_not_a_crash(capsys):
    def float_labels(prompt, embeds, attention_mask, labels):
        inputs, mask, new_labels = solution("04_prompt.py").join_prompt(prompt, embeds, attention_mask, labels)
        return inputs, mask, new_labels.float()
    verdict = exercises.check_join_prompt(float_labels)
    assert not verdict and "not yet" in capsys.readouterr().out


# --- 07: NF4's usual mistakes are named ------------------------------------------------------------------

def _levels_without_zero():
    import torch
    q = torch.special.ndtri(torch.linspace(0.9677083, 0.5, 9)[:-1].double()).float()
    levels = torch.cat([q, -q]).sort().values      # 8 a side, symmetric: no exact 0
    return levels / levels.max()


def _levels_swapped():
    return -solution("07_nf4.py").nf4_levels_mine().flip(0)


def _levels_unscaled():
    return solution("07_nf4.py").nf4_levels_mine() * 1.848


@pytest.mark.parametrize("wrong, words", [
    (_levels_without_zero, ("no exact 0",)),
    (_levels_swapped, ("sides are swapped",)),
    (_levels_unscaled, ("largest magnitude",)),
])
def test_nf4_level_mistakes_are_named(wrong, words, capsys):
    refused(exercises.check_nf4_levels, wrong, capsys, *words)


def _per_tensor(weight, levels):
    absmax = weight.abs().max()
    codes = torch.bucketize((weight / absmax).reshape(-1), (levels[:-1] + levels[1:]) / 2).to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2], absmax.reshape(1)


def _wrong_order(weight, levels):
    packed, absmax = solution("07_nf4.py").quantize_mine(weight, levels)
    return (packed << 4) | (packed >> 4), absmax


def _unpacked(weight, levels):
    blocks = weight.reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1)
    codes = torch.bucketize((blocks / absmax[:, None]).reshape(-1), (levels[:-1] + levels[1:]) / 2).to(torch.uint8)
    return codes, absmax


def _rows_as_blocks(weight, levels):
    absmax = weight.abs().amax(dim=1)               # one scale per row instead of per 64 weights
    codes = torch.bucketize((weight / absmax[:, None]).reshape(-1), (levels[:-1] + levels[1:]) / 2).to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2], absmax


def _evenly_rounded(weight, levels):
    blocks = weight.reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1)
    codes = ((blocks / absmax[:, None] + 1) / 2 * 15).round().to(torch.uint8).reshape(-1)  # not the NF4 levels
    return (codes[0::2] << 4) | codes[1::2], absmax


@pytest.mark.parametrize("wrong, words", [
    (_evenly_rounded, ("nearest of the levels",)),
    (_per_tensor, ("one scale for the whole tensor",)),
    (_wrong_order, ("wrong order", "high half")),
    (_unpacked, ("one code a byte",)),
    (_rows_as_blocks, ("one per block of 64",)),
])
def test_nf4_quantiser_mistakes_are_named(wrong, words, capsys):
    refused(exercises.check_nf4_quantize, wrong, capsys, *words)


# --- 08: the answer-only labels, the typical wrong answers ------------------------------------------------------

def _prompt_scored(ids, prompt_len, end_id):
    return list(ids)                                             # every token its own label, the question included


def _no_end_of_turn(ids, prompt_len, end_id):
    labels = solution("08_answer_labels.py").answer_labels_mine(ids, prompt_len, end_id)
    labels[ids.index(end_id, prompt_len)] = -100                 # the answer alone: the model never learns to stop
    return labels


def _shifted(ids, prompt_len, end_id):
    right = solution("08_answer_labels.py").answer_labels_mine(ids, prompt_len, end_id)
    return right[1:] + [-100]                                    # label t is token t + 1: the loss shifts again


def _runs_on(ids, prompt_len, end_id):
    return [-100] * prompt_len + list(ids[prompt_len:])          # scores everything after the prompt


@pytest.mark.parametrize("wrong, words", [
    (_prompt_scored, ("prompt is scored",)),
    (_no_end_of_turn, ("end-of-turn token is left out",)),
    (_shifted, ("shifted by one",)),
    (_runs_on, ("after the end of the turn",)),
])
def test_answer_label_mistakes_are_named(wrong, words, capsys):
    refused(exercises.check_answer_labels, wrong, capsys, *words)
