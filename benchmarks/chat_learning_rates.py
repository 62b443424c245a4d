"""The trial behind notebook 08's learning rates: each method trained on the chat task at a few learning rates,
graded on the *validation* conversations (never the test ones), one seed. Prints one line per run.

    python benchmarks/chat_learning_rates.py [--steps 20] [--val 48]

Notebook 08 starts from notebook 05's best rate for each method on the review topics and keeps it unless this trial
finds it too slow for a generated answer; the rates tried are those below. Nothing here is asserted.
"""
import argparse

import torch

from peft_lab import chat, models, recipes, train

TRIED = {"full": (3e-5, 1e-4), "lora-all": (1e-3, 3e-3), "prefix": (1e-2, 3e-2), "prompt": (1e-2, 3e-2, 1e-1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--val", type=int, default=48, help="how many validation conversations to grade")
    args = parser.parse_args()
    base, tok = models.load()
    task, val = chat.task(), chat.load("val")[:args.val]
    print(f"{args.steps} steps of 8, seed 0, graded on {len(val)} validation conversations")
    for recipe, rates in TRIED.items():
        for lr in rates:
            torch.manual_seed(0)
            tuned = recipes.BUILD[recipe](base, tok, task.name)
            run = train.fit(tuned, tok, task, steps=args.steps, lr=lr, max_length=192, log=False, progress=False)
            graded = chat.evaluate(tuned, tok, val)
            print(f"{recipes.NAMES[recipe]:>22}  lr {lr:<6g} exact {graded['accuracy']:6.1%}  well-formed "
                  f"{graded['format']:6.1%}  last loss {run.losses[-1]:.3f}  {run.seconds_per_step:.2f} s/step", flush=True)
            del tuned


if __name__ == "__main__":
    main()
