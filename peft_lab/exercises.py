"""Checks for the exercises where the learner writes a method's core code.

Each check runs the learner's function and the package's own code on a tiny Llama built from a config
(random weights, grouped-query attention: 4 query heads share 2 key/value heads), compares the two,
and prints a verdict that names the mistake it sees ("the scaling is missing", "the query head count
was used", ...). A check never raises: notebooks run top to bottom under the tests, and a function
still to be written (its body ``...``, ``pass`` or ``raise NotImplementedError``) gets "not written
yet". It returns a :class:`Verdict`, true when the function passed, so that tests can assert on it.

The tiny model is built under a forked random generator, so a check leaves the notebook's random
numbers as they were. Tensors are created on the model's device, which keeps the checks valid under
the pretend accelerator of ``accelerator_check``.

Explained in notebook 01_full_finetuning_and_freezing, section 6; 02_lora, section 9; 03_prefix_tuning,
section 12; 04_prompt_tuning, section 10.
"""
from __future__ import annotations

import ast
import copy
import functools
import inspect
import re
import textwrap
from dataclasses import dataclass

import torch
from torch import nn

from . import chat, nf4
from .methods import freeze, lora, prefix, prompt

TINY = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
ATOL = 1e-5


@dataclass
class Verdict:
    """What a check found: ``passed`` and the message it printed. True when the function passed."""

    name: str
    passed: bool
    message: str

    def __bool__(self) -> bool:
        return self.passed


def _say(name: str, passed: bool, message: str) -> Verdict:
    print(f"{name}: {message}")
    return Verdict(name, passed, message)


def _not_yet(name: str, mistake: str) -> Verdict:
    return _say(name, False, f"not yet - {mistake}")


def _not_written(name: str, fn) -> Verdict:
    return _say(name, False, f"not written yet - write the body of {getattr(fn, '__name__', 'your function')} "
                             "and run this cell again.")


# --- reading the learner's function ---------------------------------------------------------------

def _is_placeholder(stmt: ast.stmt) -> bool:
    """``pass``, ``...``, a docstring or ``raise NotImplementedError``: lines that write nothing yet."""
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
        return stmt.value.value is Ellipsis or isinstance(stmt.value.value, str)
    if isinstance(stmt, ast.Raise) and stmt.exc is not None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def unwritten(fn) -> bool:
    """Is ``fn`` still a stub? Read from its source; functions without source count as written."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return False
    func = tree.body[0] if tree.body else None
    if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return False
    return all(_is_placeholder(stmt) for stmt in func.body)


class _Raised(Exception):
    """The learner's function raised: carries the verdict to print."""


def _call(name: str, fn, *args, shape_hint: str = ""):
    """Call the learner's function; its exceptions become a hint instead of a crash (``shape_hint`` is
    added when the error is about shapes or sizes)."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise _Raised(_not_written(name, fn)) from None
    except Exception as e:  # noqa: BLE001 - any mistake in the learner's code is shown, never raised
        hint = f" - {shape_hint}" if shape_hint and re.search(r"shape|size", str(e)) else ""
        raise _Raised(_not_yet(name, f"your function raised {type(e).__name__}: {e}{hint}")) from None


def _guarded(check):
    """Run a check; a stub gets "not written yet", an exception inside the learner's code a hint."""
    @functools.wraps(check)
    def run(fn) -> Verdict:
        name = check.__name__.removeprefix("check_").replace("_", " ")
        if not callable(fn):
            return _not_yet(name, f"pass the function itself (got {type(fn).__name__}), e.g. check(my_function)")
        if unwritten(fn):
            return _not_written(name, fn)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return check(name, fn)
        except _Raised as raised:
            return raised.args[0]
        except Exception as e:  # noqa: BLE001 - an answer of an unexpected kind (dtype, device) is a hint too
            return _not_yet(name, f"your answer could not be run through the check: {type(e).__name__}: {e}")
    del run.__wrapped__  # help() should show run's signature, check(fn), not the inner (name, fn)
    return run


def tiny_llama() -> nn.Module:
    """A two-block Llama with random weights: 4 query heads, 2 key/value heads of width 8, hidden size 32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def _close(a, b) -> bool:
    return torch.is_tensor(a) and a.shape == b.shape and torch.allclose(a.detach().float(), b.float(), atol=ATOL)


def _pair(out, count: int):
    return isinstance(out, (tuple, list)) and len(out) == count and all(torch.is_tensor(t) for t in out)


def _short(names) -> str:
    """Parameter names with the block number folded ("model.layers.*.mlp.up_proj.weight"), at most four."""
    folded = sorted({re.sub(r"\.layers\.\d+\.", ".layers.*.", n) for n in names})
    return ", ".join(folded[:4]) + (f" and {len(folded) - 4} more" if len(folded) > 4 else "")


# --- 01: freezing, attention only ------------------------------------------------------------------

ATTENTION = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")


@_guarded
def check_freeze_attention_only(name, fn):
    """``fn(model)`` must leave exactly the q/k/v/o projection weights trainable, whatever the model's
    ``requires_grad`` was before (checked from all-trainable and from all-frozen); it may return the
    model or nothing. Compared with ``freeze.apply(model, "attention")``."""
    wanted = {n for n, p in freeze.apply(tiny_llama(), "attention", verbose=False).named_parameters() if p.requires_grad}
    for start, before in (("every parameter trainable", True), ("every parameter frozen", False)):
        model = tiny_llama().requires_grad_(before)
        out = _call(name, fn, model)
        model = out if isinstance(out, nn.Module) else model
        trains = {n for n, p in model.named_parameters() if p.requires_grad}
        if trains - wanted:
            return _not_yet(name, f"a frozen layer was left trainable (starting from {start}): {_short(trains - wanted)}. "
                                  "Freeze every parameter first, then unfreeze the attention projections.")
        if wanted - trains:
            return _not_yet(name, f"a layer that should train was left frozen (starting from {start}): "
                                  f"{_short(wanted - trains)}. Set requires_grad=True on all four projections "
                                  "q_proj, k_proj, v_proj and o_proj.")
    return _say(name, True, f"correct - exactly the {len(wanted)} attention projection weights train, "
                            "as freeze.apply(model, 'attention') leaves them.")


# --- 02: LoRA forward and merge --------------------------------------------------------------------

def _lora_layers():
    """A square (q_proj, 32 x 32) and a narrow (v_proj, 16 x 32) LoRA layer; B nonzero, scaling 12 / 4 = 3."""
    model = lora.apply(tiny_llama(), rank=4, alpha=12, targets=["q_proj", "v_proj"])
    layers = lora.lora_layers(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.weight.normal_(0, 0.5)  # B = 0 would hide every mistake in the update
    return [layers["model.layers.0.self_attn.q_proj"], layers["model.layers.0.self_attn.v_proj"]]


def _lora_mistakes(layer, base_part, product, product_t):
    """Typical wrong answers, each as the tensor it gives: ``product`` is the update without scaling,
    ``product_t`` the same with B A transposed (equal to ``product`` on a non-square layer, where a
    transposed product fails on its shape instead)."""
    s = layer.scaling
    return {
        "the scaling is missing: multiply B A by alpha / r (layer.scaling)": base_part + product,
        "the scaling is squared: multiply by layer.scaling once": base_part + s * s * product,
        "the scaling is inverted: it is alpha / r (layer.scaling), not r / alpha": base_part + product / s,
        "the product is transposed: the update B @ A is out x in, like W (applied to x as x @ (B @ A).T)": base_part + s * product_t,
        "the frozen part is missing: add the base layer's own output (or weight)": s * product,
    }


def _name_mistake(name, answer, expected, mistakes, what):
    if not torch.is_tensor(answer):
        return _not_yet(name, f"return a tensor ({what}), got {type(answer).__name__}"
                              + (" - did you forget `return`?" if answer is None else ""))
    if answer.shape != expected.shape:
        return _not_yet(name, f"{what} has shape {tuple(answer.shape)}, expected {tuple(expected.shape)}; "
                              "check which side of the product each matrix goes (A is r x in, B is out x r)")
    for mistake, tensor in mistakes.items():
        if tensor.shape == expected.shape and not _close(expected, tensor) and _close(answer, tensor):
            return _not_yet(name, mistake)
    if not _close(answer, expected):
        diff = (answer.detach().float() - expected.float()).abs().max().item()
        return _not_yet(name, f"{what} differs from the package's by up to {diff:.3g}")
    return None


@_guarded
def check_lora_forward(name, fn):
    """``fn(layer, x)`` must return what ``LoRALinear.forward`` returns: base(x) + scaling * B(A(x))."""
    for layer in _lora_layers():
        x = torch.randn(3, 5, layer.lora_A.in_features, device=layer.lora_A.weight.device)
        with torch.no_grad():
            expected = layer(x)
            base_part = layer.base(x)
            BA = layer.lora_B.weight @ layer.lora_A.weight
            product, product_t = x @ BA.T, (x @ BA if BA.shape[0] == BA.shape[1] else x @ BA.T)
        with torch.no_grad():
            answer = _call(name, fn, copy.deepcopy(layer), x)
        wrong = _name_mistake(name, answer, expected, _lora_mistakes(layer, base_part, product, product_t), "the output")
        if wrong is not None:
            return wrong
    return _say(name, True, "correct - same output as LoRALinear.forward on a square and a narrow layer.")


@_guarded
def check_lora_merge(name, fn):
    """``fn(layer)`` must return the weight after merging: W + scaling * B @ A, laid out like W (out x in)."""
    for layer in _lora_layers():
        merged = copy.deepcopy(layer)
        merged.merge()  # the package's merge, on a copy
        expected = merged.base.weight.detach()
        with torch.no_grad():
            W = layer.base.weight
            BA = layer.lora_B.weight @ layer.lora_A.weight
            answer = _call(name, fn, copy.deepcopy(layer))
            mistakes = _lora_mistakes(layer, W, BA, BA.T if BA.shape[0] == BA.shape[1] else BA)
        wrong = _name_mistake(name, answer, expected, mistakes, "the merged weight")
        if wrong is not None:
            return wrong
    return _say(name, True, "correct - the same weight as LoRALinear.merge writes, on a square and a narrow layer.")


# --- 03: the prefix in the shape the cache wants ----------------------------------------------------

PREFIX_P, PREFIX_BATCH = 5, 3  # different from every head count and size of the tiny model, so shapes tell


@_guarded
def check_prefix_for_layer(name, fn):
    """``fn(prefix, layer, config, batch_size)`` reads one layer's keys and values from ``prefix``, laid out
    (layers, 2 [keys, values], P, kv_width), and returns ``(keys, values)``, each (batch, kv_heads, P,
    head_dim): what ``PrefixTuned.prefix_cache`` puts in that layer's cache."""
    model = tiny_llama()
    tuned = prefix.apply(model, PREFIX_P)
    with torch.no_grad():
        tuned.prefix.normal_()
    full = tuned.prefix.detach()  # (layers, 2, kv_heads, P, head_dim)
    L, _, H, P, D = full.shape
    given = full.permute(0, 1, 3, 2, 4).reshape(L, 2, P, H * D)  # each position's heads side by side
    cache = tuned.prefix_cache(PREFIX_BATCH)
    q_heads = model.config.num_attention_heads
    for layer in range(L):
        keys, values = cache.layers[layer].keys, cache.layers[layer].values
        out = _call(name, fn, given.clone(), layer, copy.deepcopy(model.config), PREFIX_BATCH, shape_hint=(
            f"a row of kv_width = {H * D} numbers holds config.num_key_value_heads = {H} heads of head_dim = {D} "
            f"(the query head count, {q_heads}, is for the queries only)"))
        if not _pair(out, 2):
            return _not_yet(name, "return a pair (keys, values) of tensors"
                                  + (" - did you forget `return`?" if out is None else ""))
        for what, answer, expected in (("keys", out[0], keys), ("values", out[1], values)):
            if answer.shape != expected.shape:
                return _not_yet(name, _prefix_shape_mistake(what, tuple(answer.shape), tuple(expected.shape), q_heads))
        if _close(out[0], values) and _close(out[1], keys):
            return _not_yet(name, "keys and values are swapped: prefix[layer, 0] holds the keys, prefix[layer, 1] the values")
        for what, answer, expected, part in (("keys", out[0], keys, 0), ("values", out[1], values, 1)):
            if _close(answer, expected):
                continue
            flat = given[layer, part]
            if _close(answer, flat.reshape(H, P, D).expand(PREFIX_BATCH, -1, -1, -1)):
                return _not_yet(name, f"the {what} have the right shape but the numbers are in the wrong places: a row "
                                      "of kv_width holds one position's heads side by side, so view it as "
                                      "(P, kv_heads, head_dim) first, then move the head axis in front of P")
            other = [lyr for lyr in range(L) if lyr != layer and _close(answer, (cache.layers[lyr].keys, cache.layers[lyr].values)[part])]
            if other:
                return _not_yet(name, f"for layer {layer} you returned layer {other[0]}'s {what}: index the prefix with `layer`")
            return _not_yet(name, f"the {what} of layer {layer} differ from what the package puts in the cache")
    return _say(name, True, f"correct - every layer's keys and values match the package's cache, shape {tuple(keys.shape)} "
                            "(batch, key/value heads, P, head_dim).")


def _prefix_shape_mistake(what: str, got: tuple, wanted: tuple, q_heads: int) -> str:
    batch, kv_heads, P, head_dim = wanted
    if len(got) == 4 and got[1] == q_heads != kv_heads:
        return (f"the query head count was used instead of the key/value head count: the {what} have {got[1]} heads, "
                f"the cache holds config.num_key_value_heads = {kv_heads} (grouped-query attention)")
    if len(got) == 3:
        return f"the {what} have no batch axis: shape {got}; the cache wants (batch, kv_heads, P, head_dim) = {wanted}"
    return f"the {what} have shape {got}; the cache wants (batch, kv_heads, P, head_dim) = {wanted}"


# --- 04: the soft prompt in front of the input ------------------------------------------------------

PROMPT_P = 3


def _prompt_inputs(model):
    """Two rows of five tokens, the second padded on the right (mask 0, label -100 there)."""
    device = model.get_input_embeddings().weight.device
    ids = torch.randint(4, TINY["vocab_size"], (2, 5), device=device)
    mask = torch.ones(2, 5, dtype=torch.long, device=device)
    mask[1, 3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


@_guarded
def check_join_prompt(name, fn):
    """``fn(prompt, embeds, attention_mask, labels)`` returns ``(inputs_embeds, attention_mask, labels)`` for
    P virtual + T real positions: the prompt in front of the embeddings, P ones in front of the mask, P
    values of -100 in front of the labels. Compared with ``PromptTuned.forward`` on the tiny model."""
    model = tiny_llama()
    tuned = prompt.apply(model, PROMPT_P)
    ids, mask, labels = _prompt_inputs(model)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        want_embeds, want_mask = tuned.embed_with_prompt(ids), tuned.extend_mask(mask)
        want_labels = torch.cat([labels.new_full((labels.shape[0], PROMPT_P), -100), labels], dim=1)
        out = _call(name, fn, tuned.prompt.detach().clone(), embeds.clone(), mask.clone(), labels.clone())
    if not _pair(out, 3):
        return _not_yet(name, "return three tensors (inputs_embeds, attention_mask, labels)"
                              + (" - did you forget `return`?" if out is None else ""))
    got_embeds, got_mask, got_labels = out
    for check, args in ((_embeds_mistake, (got_embeds, want_embeds, embeds, tuned.prompt.detach())),
                        (_mask_mistake, (got_mask, want_mask, mask)),
                        (_labels_mistake, (got_labels, want_labels, labels))):
        mistake = check(*args)
        if mistake:
            return _not_yet(name, mistake)
    with torch.no_grad():  # the proof: the frozen model's loss on your inputs is the prompt-tuned model's loss
        yours = model(inputs_embeds=got_embeds, attention_mask=got_mask, labels=got_labels).loss
        package = tuned(input_ids=ids, attention_mask=mask, labels=labels).loss
    if not _close(yours, package):
        return _not_yet(name, f"the model's loss on your inputs is {yours.item():.4f}, the package's {package.item():.4f}")
    return _say(name, True, f"correct - the model's loss on your inputs equals PromptTuned's ({package.item():.4f}).")


def _embeds_mistake(got, want, embeds, soft):
    if not torch.is_tensor(got):
        return "inputs_embeds must be a tensor"
    if got.shape == embeds.shape:
        return f"the prompt was not joined: inputs_embeds still has T = {embeds.shape[1]} positions, it needs P + T"
    if got.shape != want.shape:
        return (f"inputs_embeds has shape {tuple(got.shape)}, expected (batch, P + T, d) = {tuple(want.shape)}; "
                "expand the (P, d) prompt to every row of the batch before joining")
    behind = torch.cat([embeds, soft.to(embeds.dtype).expand(embeds.shape[0], -1, -1)], dim=1)
    if _close(got, behind):
        return "the prompt is behind the input: it goes in front (torch.cat([prompt, embeds], dim=1))"
    if not _close(got, want):
        return "inputs_embeds holds other numbers than [prompt; embeddings]"
    return None


def _mask_mistake(got, want, mask):
    if not torch.is_tensor(got):
        return "attention_mask must be a tensor"
    if got.shape == mask.shape:
        return f"the mask is not extended: it still covers T = {mask.shape[1]} positions; put P ones in front"
    if got.shape != want.shape:
        return f"attention_mask has shape {tuple(got.shape)}, expected (batch, P + T) = {tuple(want.shape)}"
    if torch.equal(got[:, PROMPT_P:].long(), mask.long()) and not bool((got[:, :PROMPT_P] == 1).all()):
        return "the mask hides the prompt: its first P entries must be ones, so every token may look at the prompt"
    if not torch.equal(got.long(), want.long()):
        return "the mask's ones go in front (the prompt's P positions), the input's own mask after them, unchanged"
    return None


def _labels_mistake(got, want, labels):
    if not torch.is_tensor(got):
        return "labels must be a tensor"
    if got.shape == labels.shape:
        return (f"the labels are not masked: they still cover T = {labels.shape[1]} positions; put P values of -100 "
                "in front, so nothing is predicted at the prompt")
    if got.shape != want.shape:
        return f"labels has shape {tuple(got.shape)}, expected (batch, P + T) = {tuple(want.shape)}"
    if torch.equal(got[:, PROMPT_P:], labels) and not bool((got[:, :PROMPT_P] == -100).all()):
        return "the labels are not masked at the prompt: its P positions need -100, the value the loss ignores"
    if not torch.equal(got, want):
        return "the labels must be P values of -100 in front of the input's own labels, unchanged"
    return None


# --- answers computed here, out of the learner's sight (notebooks 01-04's counting exercises) -------------------
# Each check builds what the question asks about and counts it itself, so the notebook cell holds only the
# learner's answer: the expected value is never in plain view.

def _answer(name: str, answer, expected) -> Verdict:
    """``notebook.check`` (it prints the verdict), returned as a ``Verdict``; floats within 0.1 %."""
    from . import notebook

    tol = 1e-3 if isinstance(expected, float) else 1e-6
    notebook.check(name, answer, expected, tol=tol)
    if answer is None or answer is ...:
        return Verdict(name, False, "not answered")
    try:
        passed = (abs(float(answer) - expected) <= tol * max(1.0, abs(expected)) if isinstance(expected, float)
                  else notebook._same_form(answer, expected))
    except (TypeError, ValueError):
        passed = False
    return Verdict(name, bool(passed), "")


def check_last4_memory(answer, base) -> Verdict:
    """01 (b): MiB of weights + gradients + AdamW for training the last four blocks (textbook formula)."""
    from . import measure, models

    counts = freeze.count(freeze.apply(models.frozen_copy(base), "last_n", n=4, verbose=False))
    return _answer("memory of last-4 training", answer,
                   float(measure.predicted_memory(counts["total"], counts["trainable"])["frozen base in float32"]))


def check_lora_parameter_count(answer, base) -> Verdict:
    """02 (a): parameters LoRA trains with r = 16 on k_proj and v_proj."""
    from . import models

    model = lora.apply(models.frozen_copy(base), rank=16, targets=["k_proj", "v_proj"])
    return _answer("LoRA parameters (r=16, k and v)", answer, freeze.count(model)["trainable"])


def check_prefix_parameter_count(answer, frozen) -> Verdict:
    """03 (a): numbers held by a folded prefix of P = 20."""
    return _answer("parameters of a P=20 prefix", answer, prefix.count_prefix_parameters(prefix.apply(frozen, 20)))


def check_mlp_parameter_count(answer, frozen) -> Verdict:
    """03 (c): parameters trained through the reparametrisation MLP (hidden 512) for P = 16."""
    trained = sum(p.numel() for p in prefix.apply(frozen, 16, reparametrize=True).parameters() if p.requires_grad)
    return _answer("parameters of the reparametrisation MLP", answer, trained)


def check_prefix_keys_shape(answer, tuned) -> Verdict:
    """03 (b): the shape of one layer's prefix keys for a batch of 4."""
    return _answer("shape of one layer's prefix keys", answer, tuple(prefix.prefix_shapes(tuned, batch_size=4)[0]["keys"]))


def check_last_virtual_token(answer, tokenizer, text: str, positions: int = 30) -> Verdict:
    """04 (c): the token the last of ``positions`` virtual tokens starts as, with the text init."""
    expected = tokenizer.convert_ids_to_tokens(prompt.text_init_ids(tokenizer, text, positions))[-1]
    return _answer(f"token of virtual position {positions}", answer, expected)


# --- predict, then measure (one per method notebook) ----------------------------------------------------------

NO_DIFFERENCE = "no measurable difference"


def _measured(result: dict, metric: str):
    """A result's ``metric``, or its accuracy (an ``accuracy`` result names no other metric)."""
    return result[metric] if metric in result else result["accuracy"]


def measured_winner(results: dict, metric: str = "accuracy", lowest: bool = False) -> str:
    """Which of ``results`` (choice -> a measured result: an ``accuracy`` result or a run's metrics) has the highest
    (or, ``lowest=True``, the lowest) ``metric`` by a measurable margin over every other choice; otherwise
    "no measurable difference". The verdict comes from ``stats.compare`` (paired where the items are shared)."""
    from . import stats

    top = (min if lowest else max)(results, key=lambda k: _measured(results[k], metric))
    beaten = "lower" if lowest else "higher"
    if all(stats.compare(results[top], results[k], metric) == beaten for k in results if k != top):
        return top
    return NO_DIFFERENCE


def check_prediction(name: str, prediction, results: dict, metric: str = "accuracy", lowest: bool = False) -> Verdict:
    """Compare the learner's ``prediction``, written down before the experiment ran, with what it measured:
    one of ``results``' keys, or "no measurable difference" (see ``measured_winner``)."""
    choices = [str(k) for k in results] + [NO_DIFFERENCE]
    if prediction is None or prediction is ...:
        return _say(name, False, f"no prediction written - next time, write one of {choices} before the experiment "
                                 f"runs. This run measured: {measured_winner(results, metric, lowest)}.")
    if str(prediction) not in choices:
        return _say(name, False, f"not yet - predict one of {choices} (you wrote {prediction!r})")
    measured = measured_winner({str(k): v for k, v in results.items()}, metric, lowest)
    numbers = ", ".join(f"{k}: {_measured(v, metric):.4g}" for k, v in results.items())
    if str(prediction) == measured:
        return _say(name, True, f"your prediction {prediction!r} is what this run measured ({numbers}).")
    return _say(name, False, f"you predicted {prediction!r}; this run measured {measured!r} ({numbers}). Which "
                             "assumption would have predicted that?")


# --- 07: NF4 written by hand ------------------------------------------------------------------------------------

@_guarded
def check_nf4_levels(name, fn):
    """``fn()`` must return NF4's 16 levels, sorted: 8 normal quantiles on the positive side, 7 on the negative, an
    exact 0, scaled so that the largest is 1 (``nf4.nf4_levels``)."""
    expected = nf4.nf4_levels()
    answer = _call(name, fn)
    if not torch.is_tensor(answer):
        return _not_yet(name, f"return a tensor of 16 levels (got {type(answer).__name__})")
    answer = answer.detach().float().reshape(-1).cpu()
    if answer.numel() != 16:
        return _not_yet(name, f"4 bits give 16 levels, your tensor has {answer.numel()}")
    if not bool((answer == 0).any()):
        return _not_yet(name, "no exact 0 among the levels: a zero weight (and padding) would not come back as zero. "
                              "Take 8 quantiles on the positive side, 7 on the negative, and 0 itself.")
    if not bool((answer[1:] >= answer[:-1]).all()):
        return _not_yet(name, "sort the levels in ascending order: a code is an index into the sorted levels.")
    if abs(float(answer.abs().max()) - 1) > 1e-6:
        return _not_yet(name, f"the largest magnitude is {float(answer.abs().max()):.4g}: divide by it, so the levels "
                              "span [-1, 1] like the weights divided by their block's absmax.")
    if torch.allclose(answer, -expected.flip(0), atol=1e-6):
        return _not_yet(name, "the sides are swapped: NF4 takes 8 quantiles on the positive side and 7 on the negative.")
    if not torch.allclose(answer, expected, atol=1e-6):
        worst = int((answer - expected).abs().argmax())
        return _not_yet(name, f"level {worst} is {float(answer[worst]):.5f}, NF4's is {float(expected[worst]):.5f}: "
                              "use the normal quantiles at torch.linspace(0.9677083, 0.5, 9)[:-1] (positive side) and "
                              "torch.linspace(0.9677083, 0.5, 8)[:-1] (negative side).")
    return _say(name, True, "correct - the same 16 levels as nf4.nf4_levels() (and bitsandbytes).")


@_guarded
def check_nf4_quantize(name, fn):
    """``fn(weight, levels)`` must return ``(packed, absmax)``: one scale per block of 64 consecutive weights (its
    largest magnitude), each weight's code the nearest level to weight / scale, two codes a byte, the first in the
    high half (``nf4.quantize(weight, double_quant=False)``)."""
    weight = torch.randn(6, 128)
    weight[0, :5] = 0.0                      # exact zeros must stay zero
    weight[3] *= 20                           # a block of large weights: a scale per tensor would squash the rest
    expected = nf4.quantize(weight, double_quant=False)
    answer = _call(name, fn, weight.clone(), nf4.nf4_levels())
    if not (isinstance(answer, (tuple, list)) and len(answer) == 2 and all(torch.is_tensor(t) for t in answer)):
        return _not_yet(name, "return two tensors: (packed codes, absmax per block)")
    packed, absmax = (t.detach().cpu() for t in answer)
    blocks = weight.numel() // nf4.BLOCK
    if absmax.numel() == 1:
        return _not_yet(name, f"one scale for the whole tensor: NF4 keeps one per block of {nf4.BLOCK} weights "
                              f"({blocks} here), so one large weight does not squash every other to the zero level.")
    if absmax.numel() != blocks:
        return _not_yet(name, f"{absmax.numel()} scales: NF4 keeps one per block of {nf4.BLOCK} consecutive weights of "
                              f"the flattened weight ({blocks} here; weight.reshape(-1, {nf4.BLOCK})).")
    if not torch.allclose(absmax.float().reshape(-1), expected.absmax, rtol=1e-6):
        return _not_yet(name, "each block's scale is its largest magnitude: .abs().amax(dim=1) over the block.")
    if packed.numel() == weight.numel():
        return _not_yet(name, "one code a byte: pack two 4-bit codes into each byte (uint8).")
    if packed.numel() != expected.packed.numel():
        return _not_yet(name, f"{packed.numel()} bytes: two codes a byte makes {expected.packed.numel()} for "
                              f"{weight.numel()} weights.")
    packed = packed.to(torch.uint8).reshape(-1)
    if torch.equal(packed, expected.packed):
        return _say(name, True, "correct - the same bytes as nf4.quantize (and bitsandbytes' quantize_4bit).")
    swapped = (expected.packed << 4) | (expected.packed >> 4)
    if torch.equal(packed, swapped):
        return _not_yet(name, "the codes are packed in the wrong order: the first code of each pair goes in the high "
                              "half of the byte, (codes[0::2] << 4) | codes[1::2].")
    codes, wanted = nf4.unpack(packed, weight.numel()), nf4.unpack(expected.packed, weight.numel())
    zeros = (weight.reshape(-1) == 0)
    if not torch.equal(codes[zeros], wanted[zeros]):
        return _not_yet(name, f"a zero weight got code {int(codes[zeros][0])}, not the code of the level 0 "
                              f"({nf4.ZERO_CODE}): is each code the index of the nearest of the levels passed in "
                              "(torch.bucketize over the midpoints between them)?")
    share = float((codes != wanted).float().mean())
    return _not_yet(name, f"{share:.0%} of the codes differ: each code is the index of the level nearest to "
                          "weight / its block's absmax (the midpoints between neighbouring levels decide).")


# --- 08: the answer-only labels of instruction tuning -----------------------------------------------------------

@_guarded
def check_answer_labels(name, fn):
    """``fn(ids, prompt_len, end_id)`` must return the labels of one conversation: -100 on the prompt's tokens, the
    answer's tokens themselves up to and with the first end-of-turn token after the prompt, -100 after it
    (``chat.answer_labels``). Checked on conversations with text after the end of the turn and a second turn."""
    cases = [([11, 12, 13, 14, 20, 21, 22, 2, 9], 4, 2),             # prompt of 4, answer of 3, end, a newline
             ([11, 12, 20, 2, 9, 11, 12, 30, 2], 2, 2),              # a second turn after the first answer
             ([11, 12, 13, 20, 21, 22, 23, 2], 3, 2)]                # the end-of-turn token is the last token
    for ids, prompt_len, end_id in cases:
        expected = chat.answer_labels(ids, prompt_len, end_id)
        answer = _call(name, fn, list(ids), prompt_len, end_id)
        if torch.is_tensor(answer):
            answer = answer.tolist()
        if not isinstance(answer, (list, tuple)) or len(answer) != len(ids):
            return _not_yet(name, f"return one label for each of the {len(ids)} tokens (got "
                                  f"{len(answer) if isinstance(answer, (list, tuple)) else type(answer).__name__})")
        answer = [int(a) for a in answer]
        if answer == expected:
            continue
        if answer[:-1] == expected[1:] or answer[1:] == expected[:-1]:
            return _not_yet(name, "the labels are shifted by one: give each token its own id as label; the loss "
                                  "(and Hugging Face's labels=) shifts them, scoring the logits at t against the "
                                  "label at t + 1.")
        kept = [i for i, a in enumerate(answer) if a != chat.IGNORE]
        if any(i < prompt_len for i in kept):
            return _not_yet(name, "the prompt is scored: its tokens must be -100, or the model spends its training on "
                                  "predicting the question (and the system prompt) instead of the answer.")
        end_at = next(i for i in range(prompt_len, len(ids)) if ids[i] == end_id)
        with_end = answer[:end_at] + [expected[end_at]] + answer[end_at + 1:]
        if answer[end_at] == chat.IGNORE and with_end == expected:
            return _not_yet(name, "the end-of-turn token is left out: keep it, or the model never learns to stop "
                                  "and runs on past the record.")
        if any(i > end_at for i in kept):
            return _not_yet(name, "tokens after the end of the turn are scored: stop at the first end-of-turn "
                                  "token after the prompt and leave the rest -100.")
        return _not_yet(name, f"for ids {ids} with a prompt of {prompt_len} tokens the labels should keep the answer "
                              "and its end-of-turn token and be -100 elsewhere.")
    return _say(name, True, "correct - the same labels as chat.answer_labels.")
