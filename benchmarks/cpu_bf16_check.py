"""Does a bf16 frozen base change what LoRA learns and forgets? And how much faster is its step?

    python benchmarks/cpu_bf16_check.py [--steps 60] [--seeds 0 1 2]

The same LoRA recipe as notebook 02 (r=8 on q,v, alpha 16, lr 2e-4, batch 8) trains on the reviews
twice per seed: once on an fp32 base in fp32, once on a bf16 base under bf16 autocast (what the
workbook does on a CPU with bf16 arithmetic or a GPU). Each is measured against the base in its own
precision: test accuracy with its 95 % Wilson interval, fact probes kept, KL(base || tuned) on prose,
median seconds per step and training memory. Printed, never asserted. On a CPU without bf16
arithmetic (see ``models.cpu_has_bf16``) bf16 is emulated: the accuracy check holds, the speed does not.
"""
import argparse
import os

import torch

from peft_lab import data, lora, measure, models, train


def run_one(precision: str, base, tok, task, steps: int, seed: int) -> dict:
    os.environ[models.PRECISION_ENV] = precision
    tuned = lora.apply(models.frozen_copy(base), rank=8, alpha=16, targets=["q_proj", "v_proj"])
    run = train.fit(tuned, tok, task, steps=steps, lr=2e-4, seed=seed, log=False, progress=False)
    acc = measure.accuracy(tuned, tok, task, "test")
    forgot = measure.forgetting(base, tuned, tok)
    correct = round(acc["accuracy"] * acc["n"])
    low, high = measure.wilson(correct, acc["n"])
    mem = measure.memory_table(run)
    return {"precision": precision, "seed": seed, "accuracy": acc["accuracy"], "low": low, "high": high,
            "kept": forgot["kept_greedy"], "kl": forgot["kl"], "s/step": run.seconds_per_step,
            "train MiB": mem["weights+grads+optimizer MiB"] + mem["weight casts MiB"] + mem["activations MiB"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    os.environ[models.PRECISION_ENV] = "fp32"
    base32, tok = models.load()
    base16 = models.frozen_copy(base32).to(torch.bfloat16)
    task = data.load_task("reviews")
    print(f"bf16 arithmetic on this CPU: {models.cpu_has_bf16()}; {args.steps} steps per run")
    print(f"{'precision':<9} {'seed':>4} {'test acc [95 % CI]':>24} {'probes kept':>11} {'KL':>8} {'s/step':>7} {'train MiB':>9}")
    rows = []
    for seed in args.seeds:
        for precision, base in (("fp32", base32), ("bf16", base16)):
            r = run_one(precision, base, tok, task, args.steps, seed)
            rows.append(r)
            print(f"{r['precision']:<9} {seed:>4} {r['accuracy']:>8.1%} [{r['low']:.1%}, {r['high']:.1%}] "
                  f"{r['kept']:>11.1%} {r['kl']:>8.4f} {r['s/step']:>7.2f} {r['train MiB']:>9.0f}")
    for precision in ("fp32", "bf16"):
        mine = [r for r in rows if r["precision"] == precision]
        print(f"{precision}: mean s/step {sum(r['s/step'] for r in mine) / len(mine):.2f}")


if __name__ == "__main__":
    main()
