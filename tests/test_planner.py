"""The memory planner: configs, exact static bytes, activations against a real step on tiny models."""
import pytest
import torch
import torch.nn.functional as F

from peft_lab import models, planner, train
from peft_lab.methods import lora, prefix, prompt

# A tiny Llama with every width different (h, I, q width, kv width), so a wrong term shows.
TINY = {"model_type": "llama", "hidden_size": 48, "intermediate_size": 112, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300,
        "tie_word_embeddings": True}
TINY_QWEN = {**TINY, "model_type": "qwen2", "tie_word_embeddings": False}
SETTINGS = [("full", {}), ("lora", {"targets": ("q_proj", "v_proj")}), ("lora", {"targets": "all-linear"}),
            ("prefix", {}), ("prompt", {})]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def unique_params(model):
    return list({id(p): p for p in model.parameters()}.values())


def tuned_copy(base, method, precision="fp32", targets=("q_proj", "v_proj"), rank=4, virtual_tokens=5):
    if method == "full":
        return models.fresh_copy(base)
    frozen = models.frozen_copy(base).to(DTYPES[precision])
    if method == "lora":
        return lora.apply(frozen, rank=rank, targets=targets)
    return (prefix if method == "prefix" else prompt).apply(frozen, num_virtual_tokens=virtual_tokens)


def test_configs_load_and_count_like_a_built_model():
    assert {"smollm2-135m", "smollm2-360m", "qwen2.5-7b", "llama3-8b"} <= set(planner.configs())
    for name in planner.configs():
        cfg = planner.load_config(name)
        assert planner.parameter_count(cfg) > 0
    for cfg in (TINY, TINY_QWEN):
        model = planner.build_model(cfg)
        assert planner.parameter_count(cfg) == sum(p.numel() for p in unique_params(model))


def test_smollm2_135m_config_matches_the_published_size():
    # 134,515,008 parameters: SmolLM2-135M's own count, a check that the JSON numbers are right
    assert planner.parameter_count("smollm2-135m") == 134_515_008


@pytest.mark.parametrize("cfg", [TINY, TINY_QWEN])
@pytest.mark.parametrize("method,extra", SETTINGS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_static_bytes_match_the_tensors(cfg, method, extra, precision):
    if method == "full" and precision == "bf16":
        pytest.skip("full fine-tuning keeps fp32 masters: same tensors as fp32")
    base = planner.build_model(cfg)
    tuned = tuned_copy(base, method, precision, **extra)
    trained = train.trainable_parameters(tuned)
    pred = planner.predict(cfg, method, precision, rank=4, virtual_tokens=5, **extra)
    assert pred["trainable"] == sum(p.numel() for p in trained)
    assert pred["weights"] == train.tensor_bytes(unique_params(tuned))
    assert pred["gradients"] == 4 * sum(p.numel() for p in trained)  # fp32 gradients, one per trained number
    assert pred["optimizer"] == 8 * sum(p.numel() for p in trained)  # AdamW: two fp32 moments


def measured_activations(cfg, method, precision, batch, seq_len, extra):
    """One forward/backward as train.fit runs it (label loss), counted with train.count_saved_activations."""
    base = planner.build_model(cfg)
    tuned = tuned_copy(base, method, precision, **extra)
    tuned.train()
    torch.manual_seed(1)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq_len))
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    mask[0, seq_len // 2:] = 0  # padding, as in every real batch
    batch_ = {"input_ids": ids, "attention_mask": mask, "last": mask.sum(1) - 1}
    dtype = DTYPES[precision]
    cast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else torch.autocast("cpu", enabled=False)
    with train.count_saved_activations(unique_params(tuned), dtype) as saved, cast:
        loss = F.cross_entropy(train.label_logits(tuned, batch_).float(), torch.zeros(batch, dtype=torch.long))
    loss.backward()
    return saved


@pytest.mark.parametrize("method,extra", SETTINGS)
@pytest.mark.parametrize("batch,seq_len", [(2, 8), (4, 24), (3, 40)])
def test_activations_within_ten_percent_fp32(method, extra, batch, seq_len):
    saved = measured_activations(TINY, method, "fp32", batch, seq_len, extra)
    pred = planner.predict(TINY, method, "fp32", batch, seq_len, rank=4, virtual_tokens=5, **extra)
    assert pred["activations"] == pytest.approx(saved["bytes"], rel=0.10)
    assert pred["weight_casts"] == saved["weight_cast_bytes"] == 0


@pytest.mark.parametrize("method,extra", SETTINGS)
def test_activations_and_casts_within_ten_percent_bf16(method, extra):
    saved = measured_activations(TINY, method, "bf16", 3, 24, extra)
    pred = planner.predict(TINY, method, "bf16", 3, 24, rank=4, virtual_tokens=5, **extra)
    assert pred["activations"] == pytest.approx(saved["bytes"], rel=0.10)
    assert pred["weight_casts"] == pytest.approx(saved["weight_cast_bytes"], rel=0.10, abs=1)


def test_bad_input_says_what_to_do():
    with pytest.raises(ValueError, match="Known: .*smollm2-135m"):
        planner.load_config("gpt-5")
    with pytest.raises(ValueError, match="full, lora, prefix, prompt"):
        planner.predict("smollm2-135m", "adapter")
    with pytest.raises(ValueError, match="batch must be at least 1"):
        planner.predict("smollm2-135m", "lora", batch=0)
    with pytest.raises(ValueError, match="fp32, bf16, 4-bit"):
        planner.predict("smollm2-135m", "lora", base_precision="int3")
    with pytest.raises(ValueError, match="4-bit base is for LoRA"):
        planner.predict("smollm2-135m", "full", base_precision="4-bit")
    with pytest.raises(ValueError, match="all-linear"):
        planner.predict("smollm2-135m", "lora", targets=["qproj"])
    with pytest.raises(ValueError, match="lacks vocab_size"):
        planner.predict({k: v for k, v in TINY.items() if k != "vocab_size"}, "lora")


def test_four_bit_and_the_t4_answer():
    bf16 = planner.predict("llama3-8b", "lora", "bf16", 1, 256)
    nf4 = planner.predict("llama3-8b", "lora", "4-bit", 1, 256)
    assert nf4["weights"] < 0.4 * bf16["weights"]
    assert "does not fit" in planner.answer("llama3-8b", "full", "bf16", 8, 512)
    assert "fits on a free T4" in planner.answer("smollm2-135m", "lora", "bf16", 8, 64)


def test_panel_builds_and_answers():
    pytest.importorskip("ipywidgets")
    import matplotlib

    matplotlib.use("Agg")
    from peft_lab import widgets

    panel = widgets.planner_panel()
    before = panel.answer.value
    panel.controls["model"].value = "qwen2.5-7b"
    assert panel.answer.value != before  # the answer follows the controls
    assert panel.answer.value == planner.answer("qwen2.5-7b", "lora", "bf16", 8, 512)
    panel.controls["checkpointing"].value = True
    panel.controls["loss"].value = "text"
    assert panel.answer.value == planner.answer("qwen2.5-7b", "lora", "bf16", 8, 512, checkpointing=True, loss="text")
    assert "with gradient checkpointing, whole-text loss" in panel.answer.value
    panel.controls["checkpointing"].value = False
    # the T4 as PyTorch sees it (not the 15 GiB of the label), less the CUDA context
    assert f"> the {planner.gib(planner.T4_BYTES - planner.CUDA_CONTEXT_BYTES)} GiB left" in panel.answer.value


def test_the_t4_line_is_the_memory_cuda_reports():
    assert planner.T4_BYTES == int(14.75 * 2 ** 30)
    assert planner.gib(planner.T4_BYTES) == "14.75" and planner.gib(9.4 * 2 ** 30) == "9.4"


@pytest.mark.parametrize("method", ["full", "lora", "prompt"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activations_with_a_loss_on_every_token(method, precision):
    base = planner.build_model(TINY)
    tuned = tuned_copy(base, method, precision)
    tuned.train()
    ids = torch.randint(0, TINY["vocab_size"], (3, 24))
    mask = torch.ones_like(ids)
    mask[0, 12:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    dtype = DTYPES[precision]
    cast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else torch.autocast("cpu", enabled=False)
    with train.count_saved_activations(unique_params(tuned), dtype) as saved, cast:
        loss = train.text_loss(tuned, batch)
    loss.backward()
    pred = planner.predict(TINY, method, precision, 3, 24, rank=4, virtual_tokens=5, loss="text")
    assert pred["activations"] == pytest.approx(saved["bytes"], rel=0.10)


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("padded", [True, False])
def test_checkpointed_activations_match_a_real_step(method, precision, padded):
    """With gradient checkpointing each block keeps only its input; everything outside the blocks stays."""
    from peft_lab import checkpointing

    base = planner.build_model(TINY)
    tuned = checkpointing.enable(tuned_copy(base, method, precision))
    tuned.train()
    ids = torch.randint(0, TINY["vocab_size"], (3, 24))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, 12:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    dtype = DTYPES[precision]
    cast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else torch.autocast("cpu", enabled=False)
    inputs = checkpointing._BlockInputs(tuned)
    with train.count_saved_activations(unique_params(tuned), dtype) as saved, cast:
        loss = train.text_loss(tuned, batch)
    loss.backward()
    inputs.close()
    held = saved["bytes"] + inputs.held_by_checkpoints()["closure"]   # + what the checkpoints hold outside autograd
    pred = planner.predict(TINY, method, precision, 3, 24, rank=4, loss="text", checkpointing=True, padded=padded)
    plain = planner.predict(TINY, method, precision, 3, 24, rank=4, loss="text", padded=padded)
    assert pred["activations"] == pytest.approx(held, rel=0.05)
    assert pred["activations"] < plain["activations"] and 0 < pred["recompute"] < plain["activations"]
    assert plain["recompute"] == 0


def test_rows_of_equal_length_keep_no_mask_and_no_repeated_keys():
    ids = torch.randint(0, TINY["vocab_size"], (3, 24))
    base = planner.build_model(TINY)
    tuned = tuned_copy(base, "lora", "fp32")
    tuned.train()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with train.count_saved_activations(unique_params(tuned), torch.float32) as saved:
        loss = train.text_loss(tuned, batch)
    loss.backward()
    unpadded = planner.predict(TINY, "lora", "fp32", 3, 24, rank=4, loss="text", padded=False)["activations"]
    padded = planner.predict(TINY, "lora", "fp32", 3, 24, rank=4, loss="text")["activations"]
    assert unpadded == pytest.approx(saved["bytes"], rel=0.05) and unpadded < padded


def test_checkpointing_measure_counts_each_block_input_once(tiny_llama, tokenizer):
    """fit's count already holds the inputs the checkpoint keeps; the measurement must not add them again."""
    from peft_lab import checkpointing

    c = tiny_llama.config
    cfg = {"model_type": "llama", "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
           "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
           "num_key_value_heads": c.num_key_value_heads, "vocab_size": c.vocab_size, "tie_word_embeddings": True}
    with planner._compute_precision("fp32"):
        got = checkpointing.measure(models.fresh_copy, tiny_llama, tokenizer, tokens=24, checkpointing=True,
                                    steps=3, batch_size=2)
    pred = planner.activation_bytes(cfg, "full", "fp32", 2, 24, loss="text", checkpointing=True, padded=False)
    assert got["activations MiB"] == pytest.approx(pred / 2 ** 20, rel=0.05)
    assert 0 < got["of which block inputs MiB"] < got["activations MiB"]


def test_sharding_divides_the_state_and_not_the_activations():
    one = planner.sharded("llama3-8b", "full", "bf16", 1, batch=1, seq_len=512, checkpointing=True)
    eight = planner.sharded("llama3-8b", "full", "bf16", 8, batch=1, seq_len=512, checkpointing=True)
    assert eight["sharded state"] == pytest.approx(one["sharded state"] / 8)
    assert eight["gathered blocks"] > 0 == one["gathered blocks"]
    assert eight["per_gpu"] < one["per_gpu"] / 4
    text = planner.answer("llama3-8b", "full", "bf16", 8, 512, checkpointing=True)
    assert "Sharded over" in text and "accelerate launch" in text
    assert "Sharded" not in planner.answer("smollm2-135m", "lora", "bf16", 8, 64)
    with pytest.raises(ValueError, match="gpus must be at least 1"):
        planner.sharded("llama3-8b", "full", "bf16", 0)


def test_the_cuda_context_counts_against_the_card():
    total = planner.predict("smollm2-135m", "lora", "bf16", 8, 64)["total"]
    assert "fits" in planner.answer("smollm2-135m", "lora", "bf16", 8, 64, limit=int(total + planner.CUDA_CONTEXT_BYTES))
    assert "does not fit" in planner.answer("smollm2-135m", "lora", "bf16", 8, 64,
                                            limit=int(total + planner.CUDA_CONTEXT_BYTES - 1))
