"""NF4 from scratch against bitsandbytes: the 16 levels, the 4-bit codes, their packing and the block scales bit for
bit; double quantisation of the scales rounded to the nearest 8-bit code (bitsandbytes' CPU search is not always the
nearest: where the two differ, ours is never farther from the value); and what it costs in bytes."""
import pytest
import torch

from peft_lab import nf4

F = pytest.importorskip("bitsandbytes.functional")


def _weights(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)  # heavy-tailed, like trained weights, with a few outliers per block
    return (torch.distributions.StudentT(4.0).sample((rows, cols)) * 0.02) if seed % 2 else torch.randn(rows, cols, generator=g) * 0.05


def test_the_levels_and_the_dynamic_map_are_bitsandbytes_own():
    assert torch.equal(nf4.nf4_levels(), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.dynamic_map(), F.create_dynamic_map())
    levels = nf4.nf4_levels()
    assert len(levels) == 16 and levels[7] == 0 and levels[0] == -1 and levels[-1] == 1   # an exact zero, 8 positive


@pytest.mark.parametrize("shape, seed", [((576, 576), 0), ((192, 576), 1), ((1536, 576), 2), ((7, 9), 3)])
def test_codes_packing_and_scales_equal_bitsandbytes(shape, seed):
    w = _weights(*shape, seed)
    packed, state = F.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=False)
    ours = nf4.quantize(w, double_quant=False)
    assert torch.equal(ours.packed, packed.reshape(-1))      # codes and their order in each byte
    assert torch.equal(ours.absmax, state.absmax)            # one fp32 scale per block of 64
    assert torch.equal(nf4.dequantize(ours), F.dequantize_4bit(packed, state))
    assert torch.equal(nf4.unpack(nf4.pack(torch.tensor([1, 15, 7], dtype=torch.uint8)), 3), torch.tensor([1, 15, 7], dtype=torch.uint8))
    assert nf4.pack(torch.tensor([1, 15], dtype=torch.uint8)).item() == 0x1F   # the first code in the high half


@pytest.mark.parametrize("shape, seed", [((576, 576), 4), ((1536, 576), 5)])
def test_double_quantisation_rounds_each_scale_to_its_nearest_code(shape, seed):
    w = _weights(*shape, seed)
    packed, state = F.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    ours = nf4.quantize(w, double_quant=True)
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert ours.offset == float(state.offset) and torch.equal(ours.stats_absmax, state.state2.absmax)
    _, scales = nf4._blockwise(w, nf4.BLOCK, nf4.nf4_levels())
    centred = scales - ours.offset
    per = torch.repeat_interleave(ours.stats_absmax, nf4.STATS_BLOCK)[: len(scales)]
    x, code = centred / per, nf4.dynamic_map()
    differ = ours.absmax != state.absmax
    assert differ.float().mean() < 0.01   # a few scales in a thousand
    assert bool(((x - code[ours.absmax.long()]).abs() <= (x - code[state.absmax.long()]).abs())[differ].all())
    same_blocks = (nf4.dequantize(ours).reshape(-1, 64) == F.dequantize_4bit(packed, state).reshape(-1, 64)).all(1)
    assert torch.equal(same_blocks, ~differ)   # every block whose scale code agrees dequantises bit for bit


def test_bytes_per_weight():
    w = torch.randn(1024, 1024)
    plain, double = nf4.quantize(w, double_quant=False), nf4.quantize(w, double_quant=True)
    assert plain.nbytes / w.numel() == pytest.approx(0.5 + 4 / 64)              # 0.5625 B
    assert double.nbytes / w.numel() == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), abs=1e-5)   # about 0.516 B
    error = (nf4.dequantize(double) - w).abs().mean() / w.abs().mean()
    assert 0.05 < error < 0.15   # about a tenth of a typical weight's size: what 16 levels can do


def test_a_model_stored_in_nf4_computes_with_its_dequantised_weights(tiny_llama):
    from peft_lab import models

    ids = torch.randint(4, 40, (2, 7))
    stored = nf4.quantize_model(models.frozen_copy(tiny_llama))
    reference = models.frozen_copy(tiny_llama)
    for name, layer in stored.named_modules():
        if isinstance(layer, nf4.Linear4bit):
            reference.get_submodule(name).weight.data = layer.dequantized_weight()
    with torch.no_grad():
        assert torch.equal(stored(input_ids=ids).logits, reference(input_ids=ids).logits)
        close = tiny_llama(input_ids=ids).logits
    assert not any(p.requires_grad for p in stored.parameters())
    assert not any(isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] != "lm_head" for n, m in stored.named_modules())
    assert nf4.stored_bytes(stored) < nf4.stored_bytes(tiny_llama)
    assert (stored(input_ids=ids).logits - close).abs().max() < 1.0   # 4 bits move the logits, not far
    with pytest.raises(ValueError, match="no nn.Linear"):
        nf4.quantize_model(stored)


def test_a_4bit_layer_matches_bitsandbytes_linear4bit():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64)
    theirs = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=False)
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu")                      # bitsandbytes quantises when the layer moves to its device
    ours = nf4.Linear4bit(linear, double_quant=False)
    assert theirs.weight.dtype == torch.uint8 and torch.equal(theirs.weight.data.reshape(-1), ours.packed)
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs.train()(x), atol=1e-6)   # train(): its plain dequantise-and-matmul path


def test_lora_over_a_4bit_base_is_qlora(tiny_llama, tokenizer, task, tmp_path):
    from peft_lab import models, train
    from peft_lab.methods import dora, ia3, lora

    ids = torch.randint(4, 40, (2, 7))
    quantized = nf4.quantize_model(models.frozen_copy(tiny_llama))
    with torch.no_grad():
        before = quantized(input_ids=ids).logits
    codes = {n: b.clone() for n, b in quantized.named_buffers()}
    tuned = lora.apply(quantized, rank=2, targets="all-linear")
    with torch.no_grad():
        assert torch.equal(tuned(input_ids=ids).logits, before)   # B = 0: the 4-bit model, unchanged
    assert all(isinstance(layer.base, nf4.Linear4bit) for layer in lora.lora_layers(tuned).values())
    trained = [n for n, p in tuned.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    train.fit(tuned, tokenizer, task, steps=3, lr=1e-2, log=False, progress=False)
    assert all(torch.equal(b, codes[n]) for n, b in tuned.named_buffers() if n in codes)   # the 4-bit base never moves
    with torch.no_grad():
        after = tuned(input_ids=ids).logits
    assert not torch.equal(after, before)
    with pytest.raises(ValueError, match="4-bit"):
        lora.merge(tuned)
    lora.save(tuned, tmp_path)
    other = lora.load(nf4.quantize_model(models.frozen_copy(tiny_llama)), tmp_path)
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids).logits, after)
    back = lora.remove(tuned)
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, before)
    for method in (dora, ia3):
        with pytest.raises(TypeError, match="4-bit"):
            method.apply(nf4.quantize_model(models.frozen_copy(tiny_llama)))
