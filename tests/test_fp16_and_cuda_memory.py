"""The branches a CPU never takes by itself: fp16 training with loss scaling (a free T4), where a step whose
gradients overflow is skipped, and the CUDA branch of the peak-memory measurement. Both are run here on the CPU
with the device's answers faked."""
import torch

from peft_lab import memory, models, train
from peft_lab.methods import lora


def test_fp16_loss_scaling_skips_an_overflowing_step_and_counts_it(tiny_llama, tokenizer, task, monkeypatch):
    monkeypatch.setattr(models, "compute_dtype", lambda device: torch.float16)   # what a T4 computes in
    tuned = lora.apply(models.frozen_copy(tiny_llama), rank=2, targets=["q_proj"])
    trained = [p for p in tuned.parameters() if p.requires_grad]
    calls = {"n": 0}

    def overflow_once(grad):   # the first backward pass overflows, as fp16 gradients can at a large loss scale
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 1 else grad

    trained[0].register_hook(overflow_once)
    after_each_step = []
    run = train.fit(tuned, tokenizer, task, steps=3, lr=1e-2, log=False, progress=False,
                    on_step=lambda record: after_each_step.append([p.detach().clone() for p in trained]))
    start = [torch.zeros_like(p) if "lora_B" in n else None for n, p in tuned.named_parameters() if p.requires_grad]
    assert run.config["skipped_steps"] == 1
    assert all(torch.equal(p, s) for p, s in zip(after_each_step[0], start) if s is not None)  # B still zero: skipped
    assert any(not torch.equal(a, b) for a, b in zip(after_each_step[0], after_each_step[1]))  # the next step updated
    moments = 2 * sum(p.numel() * 4 for p in trained)   # AdamW's two fp32 moments, plus a step counter a tensor
    assert moments <= run.memory["optimizer"] <= moments + 8 * len(trained)  # read once AdamW made its state
    assert run.memory["weight_casts"] > 0   # fp16 copies of the frozen weights, under autocast


def test_no_step_is_skipped_without_loss_scaling(tiny_llama, tokenizer, task):
    tuned = lora.apply(models.frozen_copy(tiny_llama), rank=2, targets=["q_proj"])
    run = train.fit(tuned, tokenizer, task, steps=2, lr=1e-2, log=False, progress=False)
    assert "skipped_steps" not in run.config


def test_the_cuda_peak_is_the_allocators_peak_after_a_reset(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 123_456_789)
    with memory.PeakMemory(torch.device("cuda")) as peak:
        calls.append("work")
    assert peak.peak == 123_456_789
    assert calls == ["sync", "reset", "work", "sync"]   # the peak of this block alone, after the work finished


def test_the_cpu_peak_is_sampled_from_the_resident_set(monkeypatch):
    sizes = iter([100, 300, 200] + [150] * 10_000)
    monkeypatch.setattr(memory.PeakMemory, "_rss", lambda self: next(sizes))
    with memory.PeakMemory("cpu") as peak:
        import time
        time.sleep(0.05)
    assert peak.peak == 300
