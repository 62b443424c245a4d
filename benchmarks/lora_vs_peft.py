"""Benchmark: one LoRA training step of peft_lab against Hugging Face peft, on the embedded model.

Same model (models.load()), rank 8, alpha 16, targets q_proj and v_proj, the same fixed batch of 8
reviews (about 40 tokens), AdamW. Both adapters start from the same A and B, so both compute the
same thing (the first loss is printed for both as a check). After a warm-up, the two take turns
step by step for several rounds (the order flips every round), so machine noise hits both alike.

Prints the median seconds per step and the training memory of each, and the ratios ours / peft.
Memory: weights + gradients + AdamW state (exact bytes of the tensors) + the activations autograd
saves in a step (``train.count_saved_activations``); on a GPU also CUDA's peak allocation.
A script, never a test: it prints measurements and asserts nothing about time.

Usage:  .venv/bin/python benchmarks/lora_vs_peft.py [--rounds 8]
"""
import argparse
import statistics
import time

import torch

from peft_lab import data, lora, models, train


def build(base, rank, alpha, targets):
    import peft

    ours = lora.apply(models.fresh_copy(base), rank=rank, alpha=alpha, targets=targets)
    theirs = peft.get_peft_model(models.fresh_copy(base), peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none"))
    with torch.no_grad():  # the same starting A and B in both
        for name, layer in lora.lora_layers(ours).items():
            other = theirs.base_model.model.get_submodule(name)
            other.lora_A["default"].weight.copy_(layer.lora_A.weight)
            other.lora_B["default"].weight.copy_(layer.lora_B.weight)
    return ours, theirs


def make_step(model, batch, lr, device, dtype):
    params = train.trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()

    def step(measure=False):
        started = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        # every parameter is excluded from "activations": frozen weights autograd keeps are weights, not activations
        counting = train.count_saved_activations(list(model.parameters())) if measure else _null()
        with counting as saved, torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = train.loss_on(model, batch)
        loss.backward()
        grads = train.tensor_bytes(p.grad for p in params if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        if not measure:
            return seconds, loss.item()
        unique = {id(p): p for p in model.parameters()}.values()
        mem = {"weights": train.tensor_bytes(unique), "gradients": grads,
               "optimizer": train.optimizer_state_bytes(opt), "activations": saved["bytes"]}
        if device.type == "cuda":
            mem["cuda peak"] = torch.cuda.max_memory_allocated()
        return seconds, loss.item(), mem

    return step, sum(p.numel() for p in params)


class _null:
    def __enter__(self):
        return {}

    def __exit__(self, *exc):
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds (one step of each per round)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each before timing")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()

    import peft

    base, tok = models.load()
    device = next(base.parameters()).device
    dtype = models.compute_dtype(device)
    task = data.load_task("reviews")
    # A fixed batch: the 8 training reviews whose prompts are closest to 40 tokens long.
    length = {i: len(tok(task.prompt(text), add_special_tokens=False).input_ids) for i, (text, _) in enumerate(task.train)}
    chosen = sorted(length, key=lambda i: (abs(length[i] - 40), i))[:8]
    batch = data.to_device(data.encode([task.train[i] for i in sorted(chosen)], task, tok), device)
    ours, theirs = build(base, args.rank, 16, ["q_proj", "v_proj"])
    steps = {}
    for name, model in (("ours", ours), ("peft", theirs)):
        steps[name], n_trainable = make_step(model, batch, 1e-3, device, dtype)
        print(f"{name}: {n_trainable:,} trainable parameters")
    print(f"device {device}, dtype {str(dtype).replace('torch.', '')}, peft {peft.__version__}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; batch {tuple(batch['input_ids'].shape)} (batch, tokens)")

    first = {name: step()[1] for name, step in steps.items()}  # warm-up step 1: same weights, same loss
    print(f"first-step loss: ours {first['ours']:.6f}, peft {first['peft']:.6f}")
    for _ in range(args.warmup - 1):
        for step in steps.values():
            step()
    memory = {name: step(measure=True)[2] for name, step in steps.items()}

    times = {"ours": [], "peft": []}
    order = ["ours", "peft"]
    started = time.perf_counter()
    for _ in range(args.rounds):
        for name in order:
            times[name].append(steps[name]()[0])
        order.reverse()  # ABBA: neither always goes first
    print(f"{args.rounds} rounds in {time.perf_counter() - started:.0f} s\n")

    med = {name: statistics.median(t) for name, t in times.items()}
    total = {name: sum(v for k, v in m.items() if k != "cuda peak") for name, m in memory.items()}
    rows = [("seconds per step (median)", med["ours"], med["peft"], "{:.3f}")]
    for part in ("weights", "gradients", "optimizer", "activations"):
        rows.append((f"{part} MiB", memory["ours"][part] / 2**20, memory["peft"][part] / 2**20, "{:.2f}"))
    rows.append(("training memory MiB (sum)", total["ours"] / 2**20, total["peft"] / 2**20, "{:.2f}"))
    if device.type == "cuda":
        rows.append(("CUDA peak MiB", memory["ours"]["cuda peak"] / 2**20, memory["peft"]["cuda peak"] / 2**20, "{:.1f}"))
    print(f"{'':28}{'ours':>12}{'peft':>12}{'ours/peft':>12}")
    for label, a, b, fmt in rows:
        print(f"{label:28}{fmt.format(a):>12}{fmt.format(b):>12}{(a / b if b else float('nan')):>12.3f}")
    spread = {n: (min(t), max(t)) for n, t in times.items()}
    print(f"\nstep time ranges: ours {spread['ours'][0]:.3f}-{spread['ours'][1]:.3f} s, "
          f"peft {spread['peft'][0]:.3f}-{spread['peft'][1]:.3f} s")
    print(f"goal: time ratio <= 1.05 -> {'met' if med['ours'] / med['peft'] <= 1.05 else 'NOT met'} "
          f"({med['ours'] / med['peft']:.3f}); memory ratio {total['ours'] / total['peft']:.3f}")


if __name__ == "__main__":
    main()
