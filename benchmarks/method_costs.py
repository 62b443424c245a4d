"""Seconds per step, tokens per second and training memory of every method, in one run.

    python benchmarks/method_costs.py [--steps 5] [--rounds 2]

Every method trains a fresh copy of the embedded model on the same seeded batches of reviews
(batch 8, about 40 tokens). Methods are run in rounds (full, LoRA, ... then again) so that a busy
machine slows them alike; the median step after warm-up is reported, and everything is printed as a
ratio to full fine-tuning. Nothing here is asserted: shared CPUs vary by +-20 %.
"""
import argparse
import statistics

from peft_lab import data, freeze, lora, measure, models, prefix, prompt, train

METHODS = {
    "full": lambda m: freeze.apply(m, "full", verbose=False),
    "last block": lambda m: freeze.apply(m, "last_n", n=1, verbose=False),
    "lora r=8 q,v": lambda m: lora.apply(m, rank=8, alpha=16),
    "prefix P=10": lambda m: prefix.apply(m, num_virtual_tokens=10),
    "prompt P=20": lambda m: prompt.apply(m, num_virtual_tokens=20),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    base, tok = models.load()
    task = data.load_task("reviews")
    times = {name: [] for name in METHODS}
    runs = {}
    for _ in range(args.rounds):
        for name, make in METHODS.items():
            # full fine-tuning and freezing train fp32 master weights; PEFT methods attach to a frozen copy
            start = models.fresh_copy(base) if name in ("full", "last block") else models.frozen_copy(base)
            tuned = make(start)
            run = train.fit(tuned, tok, task, steps=args.steps, lr=1e-5, log=False, progress=False, tag=name)
            times[name] += run.step_seconds[1:]
            runs[name] = run
            del tuned
    full = statistics.median(times["full"])
    print(f"{'method':<14} {'trainable':>12} {'s/step':>8} {'vs full':>8} {'train MiB':>10} {'activ. MiB':>10}")
    for name, run in runs.items():
        s = statistics.median(times[name])
        mem = measure.memory_table(run)
        print(f"{name:<14} {run.trainable_params:>12,} {s:>8.2f} {s / full:>8.2f} "
              f"{mem['weights+grads+optimizer MiB'] + mem['activations MiB']:>10.0f} {mem['activations MiB']:>10.0f}")


if __name__ == "__main__":
    main()
