"""QLoRA with the everyday tools, compared with the package's own: transformers' ``BitsAndBytesConfig`` loads the
base in 4 bits through bitsandbytes, peft reads the adapter ``qlora.save`` wrote, adds a fresh LoRA with
``get_peft_model`` after ``prepare_model_for_kbit_training``, and merges with ``merge_and_unload``.

Each step prints a line of numbers; where a library is missing, or cannot run here, the line says so and the rest
goes on. Explained in notebook 07_qlora_and_memory, section 9.
"""
from __future__ import annotations

import contextlib
import tempfile
import warnings

import torch

from . import data as data_mod
from . import models, nf4
from .methods import lora, qlora


def _logits(model, batch):
    with torch.no_grad(), models.autocast(data_mod.device_of(model)):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def _bytes(model) -> int:
    """Bytes of a model's weights: parameters and buffers, plus, for bitsandbytes' 4-bit layers, the block scales
    and code tables it keeps beside the packed weight (its ``quant_state``, which is neither)."""
    total = nf4.stored_bytes(model)
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        parts = [state.absmax, state.code] + ([state.state2.absmax, state.state2.code] if state.nested else [])
        parts += [state.offset] if torch.is_tensor(getattr(state, "offset", None)) else []
        total += sum(t.numel() * t.element_size() for t in parts if t is not None)
    return total


@contextlib.contextmanager
def _quiet_renames():
    """peft calls transformers' gradient-checkpointing names that transformers 5 renamed, and each call warns of the
    rename: a notice to peft, not to the learner, so it is hushed here (every other warning still shows)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(is_gradient_checkpointing|gradient_checkpointing_enable)",
                                category=FutureWarning)
        yield


def _checkpointing_on(model) -> bool:
    """Whether gradient checkpointing is on in some module (what transformers' flag reads, under either name)."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def _difference(a, b, mask) -> tuple:
    """(largest logit difference, share of positions with the same most likely next token)."""
    return float((a - b)[mask].abs().max()), float((a[mask].argmax(-1) == b[mask].argmax(-1)).float().mean())


def _compare(label: str, theirs, ours, mask) -> str:
    diff, same = _difference(theirs, ours, mask)
    return f"{label}: largest logit difference {diff:.3f}; the same most likely next token at {same:.0%} of positions"


def qlora_with_bitsandbytes(base, four_bit, ours, tokenizer, examples, task) -> dict:
    """Load ``base``'s model in 4 bits with bitsandbytes and compare it with ``four_bit`` (``nf4.quantize_model`` of
    the same base); attach the adapter of ``ours`` (``qlora.apply`` over a copy of ``four_bit``, trained) with peft
    and compare the logits on ``examples`` of ``task``; then what
    ``prepare_model_for_kbit_training``, ``get_peft_model`` and ``merge_and_unload`` do. Returns ``{"lines": [...]}``
    and the numbers behind them."""
    try:
        import bitsandbytes  # noqa: F401
        from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    except ImportError as err:
        return {"lines": [f"{err.name} is not installed: pip install bitsandbytes peft to run this section "
                          "(the rest of the notebook needs neither)."]}
    lines, out = [], {}
    device = data_mod.device_of(base)
    dtype = next(base.parameters()).dtype
    source = models.resolve(getattr(base, "peft_lab_name", None))
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=dtype)

    def load_4bit():
        model = AutoModelForCausalLM.from_pretrained(source, quantization_config=config, dtype=dtype,
                                                     device_map={"": str(device)})
        model.config.pad_token_id = tokenizer.pad_token_id
        return model.eval()

    try:
        theirs = load_4bit()
    except Exception as err:  # noqa: BLE001 - a library that cannot run here is a line, not a crash
        return {"lines": [f"transformers could not load the model in 4 bits here ({type(err).__name__}: {err}); "
                          "on Colab's GPU it can."]}
    mine = nf4.layers_4bit(four_bit)
    same_codes = total = 0
    for name, module in theirs.named_modules():
        if name in mine and hasattr(module.weight, "quant_state"):
            total += 1
            same_codes += torch.equal(module.weight.data.reshape(-1).cpu(), mine[name].packed.reshape(-1).cpu())
    out["same_codes"], out["layers"] = same_codes, total
    lines.append(f"BitsAndBytesConfig(load_in_4bit=True, nf4, double quantisation): {total} layers in 4 bits; their "
                 f"4-bit codes equal nf4.py's in {same_codes} of {total}")
    out["bytes_theirs"], out["bytes_ours"] = _bytes(theirs), nf4.stored_bytes(four_bit)
    lines.append(f"weights in memory: bitsandbytes {out['bytes_theirs'] / 2 ** 20:.1f} MiB, nf4.py "
                 f"{out['bytes_ours'] / 2 ** 20:.1f} MiB")

    batch = data_mod.encode(examples, task, tokenizer, device=ours)
    mask = batch["attention_mask"].bool()
    lines.append(_compare("the two 4-bit models, no adapter", _logits(theirs, batch), _logits(four_bit, batch), mask))
    with tempfile.TemporaryDirectory() as folder:
        qlora.save(ours, folder)
        with _quiet_renames():
            with_adapter = PeftModel.from_pretrained(theirs, folder).eval()
        ours_logits, peft_logits = _logits(ours, batch), _logits(with_adapter, batch)
        lines.append(_compare("our trained adapter loaded by peft onto bitsandbytes' model, against ours", peft_logits,
                              ours_logits, mask))
        merged = with_adapter.merge_and_unload()
        ours_merged = qlora.merged_copy(ours, "requantized", original=base)
        out["peft_merge"] = _difference(_logits(merged, batch), peft_logits, mask)
        out["our_merge"] = _difference(_logits(ours_merged, batch), ours_logits, mask)
        lines.append(f"merging into 4 bits (dequantise, add B A, quantise again) moves the logits by up to "
                     f"{out['peft_merge'][0]:.3f} with peft's merge_and_unload (the same next token at "
                     f"{out['peft_merge'][1]:.0%}), by up to {out['our_merge'][0]:.3f} with qlora.merged_copy(..., "
                     f"'requantized') ({out['our_merge'][1]:.0%})")
        name = next(iter(lora.lora_layers(ours)))
        import bitsandbytes.functional as bnb_functional
        layer = merged.get_submodule(name)
        theirs_weight = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        ours_weight = ours_merged.get_submodule(name).dequantized_weight().float()
        out["merged_weight_gap"] = float((theirs_weight - ours_weight).abs().max() / ours_weight.abs().max())
        lines.append(f"{name} after the merge: peft's weight and ours differ by up to {out['merged_weight_gap']:.1%} of "
                     "the largest weight" + (" - peft's merge over bitsandbytes did not reproduce dequantise, add and "
                     "quantise again on this machine; check it on yours before shipping a merged 4-bit model"
                     if out["merged_weight_gap"] > 0.05 else ""))
        del merged, ours_merged, with_adapter, theirs

    fresh = load_4bit()  # loaded again: merge_and_unload changed the first in place, and prepare changes this one
    before = _bytes(fresh)
    with _quiet_renames():
        fresh = prepare_model_for_kbit_training(fresh, use_gradient_checkpointing=True)
    after = _bytes(fresh)
    promoted = sorted({str(p.dtype).replace("torch.", "") for p in fresh.parameters() if p.dtype == torch.float32})
    lines.append(f"prepare_model_for_kbit_training: weights {before / 2 ** 20:.1f} -> {after / 2 ** 20:.1f} MiB (the "
                 f"parameters that are not 4-bit, embeddings and norms, now in {', '.join(promoted) or 'their dtype'}); "
                 f"gradient checkpointing on: {_checkpointing_on(fresh)}")
    with _quiet_renames():
        peft_model = get_peft_model(fresh, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0, task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    ours_trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    lines.append(f"get_peft_model(LoRA r=8 on q, v): {trainable:,} trainable numbers; qlora.apply: {ours_trainable:,}")
    out.update(before_prepare=before, after_prepare=after, trainable=trainable, ours_trainable=ours_trainable)
    del peft_model, fresh
    return {"lines": lines, **out}


def nf4_against_bitsandbytes(model, limit: int | None = None) -> dict:
    """Every linear layer of ``model`` (the first ``limit``) quantised by ``nf4.py`` and by bitsandbytes'
    ``quantize_4bit`` on the CPU, compared bit for bit: without double quantisation the packed codes, the fp32 scales
    and the dequantised weights; with it, the 8-bit scale codes (and, where they differ, which side is nearer the
    true scale) and the blocks that dequantise to the same bits. None when bitsandbytes is not installed.

    The comparison is arithmetic on CPU copies, never model inputs, so it runs past any TorchFunctionMode (the
    tests' pretend accelerator would take bitsandbytes' internal tables for accelerator tensors)."""
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        return None
    linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    linears = linears[:limit] if limit else linears
    counts = dict(layers=len(linears), same_codes=0, same_scales=0, same_weights=0, scale_codes_differ=0,
                  scale_codes=0, ours_farther=0, same_blocks=0, blocks=0)
    with torch.no_grad(), torch._C.DisableTorchFunction():
        code_map = nf4.dynamic_map()
        for m in linears:
            weight = m.weight.detach().cpu()
            packed, state = bnb_functional.quantize_4bit(weight, quant_type="nf4", blocksize=nf4.BLOCK,
                                                         compress_statistics=False)
            ours = nf4.quantize(weight, double_quant=False)
            counts["same_codes"] += torch.equal(ours.packed, packed.reshape(-1))
            counts["same_scales"] += torch.equal(ours.absmax, state.absmax)
            counts["same_weights"] += torch.equal(nf4.dequantize(ours), bnb_functional.dequantize_4bit(packed, state))
            packed, state = bnb_functional.quantize_4bit(weight, quant_type="nf4", blocksize=nf4.BLOCK,
                                                         compress_statistics=True)
            ours = nf4.quantize(weight, double_quant=True)
            theirs_codes = state.absmax.reshape(-1)
            differ = ours.absmax != theirs_codes
            counts["scale_codes_differ"] += int(differ.sum())
            counts["scale_codes"] += differ.numel()
            # the centred scale each 8-bit code stands for, in units of its block of 256's own scale
            true = nf4._blockwise(weight, nf4.BLOCK, nf4.nf4_levels())[1] - ours.offset
            x = true / torch.repeat_interleave(ours.stats_absmax, nf4.STATS_BLOCK)[: true.numel()]
            counts["ours_farther"] += int(((code_map[ours.absmax.long()] - x).abs()
                                           > (code_map[theirs_codes.long()] - x).abs()).sum())
            equal_rows = (nf4.dequantize(ours).reshape(-1, nf4.BLOCK)
                          == bnb_functional.dequantize_4bit(packed, state).reshape(-1, nf4.BLOCK)).all(1)
            counts["same_blocks"] += int(equal_rows.sum())
            counts["blocks"] += equal_rows.numel()
    return counts


def chat_with_peft_and_trainer(base, tokenizer, conversations: list, steps: int, lr: float, seed: int = 0,
                               batch_size: int = 8) -> dict:
    """Instruction tuning the everyday way (notebook 08_chat_tuning, section 7): peft's LoRA (r = 8, alpha = 16 on
    every linear layer, as ``recipes.lora_all``) over a frozen copy of ``base``, trained by transformers' ``Trainer``
    for ``steps`` steps of ``batch_size`` ``conversations`` at a constant ``lr``, with ``chat.encode``'s answer-only
    labels (padded by ``DataCollatorForSeq2Seq``). Before training, the loss Hugging Face computes from ``labels=`` is
    compared with ``chat.chat_loss`` and ``train.text_loss`` on the same batch. Returns the three losses, the
    Trainer's losses step by step, and the trained peft model (``model``)."""
    try:
        from peft import LoraConfig, get_peft_model
        from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainingArguments
    except ImportError as err:
        return {"lines": [f"{err.name} is not installed: pip install peft to run this section."]}
    from . import chat, train

    torch.manual_seed(seed)
    with _quiet_renames():
        peft_model = get_peft_model(models.frozen_copy(base), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                                         target_modules="all-linear",
                                                                         task_type="CAUSAL_LM"))
    batch = chat.encode(tokenizer, conversations[:batch_size], device=peft_model)
    with torch.no_grad(), models.autocast(data_mod.device_of(peft_model)):
        losses = {"Hugging Face, labels=": float(peft_model(**batch).loss),
                  "chat.chat_loss": float(chat.chat_loss(peft_model, batch)),
                  "train.text_loss": float(train.text_loss(peft_model, batch))}
    rows = []
    for conv in conversations:
        ids, labels = chat.row(tokenizer, conv["messages"])
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    device = data_mod.device_of(base)
    half = models.compute_dtype(device)
    with tempfile.TemporaryDirectory() as folder:
        args = TrainingArguments(output_dir=folder, max_steps=steps, per_device_train_batch_size=batch_size,
                                 learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                                 logging_steps=1, save_strategy="no", report_to=[], seed=seed, disable_tqdm=True,
                                 bf16=half == torch.bfloat16, fp16=half == torch.float16,
                                 use_cpu=device.type == "cpu", dataloader_num_workers=0)
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=chat.IGNORE)
        trainer = Trainer(model=peft_model, args=args, train_dataset=rows, data_collator=collator)
        trainer.remove_callback(PrinterCallback)  # the losses are returned, not printed step by step
        trainer.train()
    trained = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    peft_model.eval()
    return {"losses": losses, "trainer_losses": trained, "model": peft_model,
            "trainable": sum(p.numel() for p in peft_model.parameters() if p.requires_grad)}
