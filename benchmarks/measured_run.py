"""One measured LoRA run (60 steps of 8, then accuracy on every test review and forgetting), the old way and the
new way, on the same machine in one process: both times, their ratio, both sets of numbers, and where the time goes.

    python benchmarks/measured_run.py [--steps 60] [--rounds 1]

The old way computes the vocabulary head at every position of every row (batch x tokens x 49,152 logits) and keeps
one row of it; the new way (``train.label_logits``) runs the head only at the positions the loss or the score reads.
The old way also measured the frozen base model's probe answers and prose log-probabilities again for every run;
the new way computes them once, before the clock starts, as a notebook or the grid does for all its runs
(``measure.base_probe_scores`` and the prose cache). Both runs start from the same seed on the same batches; the
rounds alternate old/new so a busy machine slows both alike. Nothing here is asserted.
"""
import argparse
import statistics
import time

import torch

from peft_lab import data, lora, measure, models, train

NEW_LABEL_LOGITS = train.label_logits


def old_label_logits(tuned, batch: dict) -> torch.Tensor:
    """The old way: logits at every position, then one per row kept."""
    logits = tuned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, batch["last"]]


def measured_run(way: str, base, tok, task, steps: int, base_scores) -> dict:
    train.label_logits = old_label_logits if way == "old" else NEW_LABEL_LOGITS
    try:
        torch.manual_seed(0)
        tuned = lora.apply(models.frozen_copy(base), rank=8, alpha=16, targets=["q_proj", "v_proj"])
        started = time.perf_counter()
        run = train.fit(tuned, tok, task, steps=steps, lr=1e-3, seed=0, log=False, progress=False, tag="lora")
        trained = time.perf_counter()
        acc = measure.accuracy(tuned, tok, task, "test")
        scored = time.perf_counter()
        if way == "old":  # the old way measured the frozen base's probes and prose again for every run
            measure._BASE_CACHE["model"] = None
            forgot = measure.forgetting(base, tuned, tok)
        else:             # the new way reads them from the cache the notebook filled once
            forgot = measure.forgetting(base, tuned, tok, base_scores=base_scores)
        done = time.perf_counter()
    finally:
        train.label_logits = NEW_LABEL_LOGITS
    return {"training s": trained - started, "scoring s": scored - trained, "forgetting s": done - scored,
            "total s": done - started, "s/step": statistics.median(run.step_seconds[1:]),
            "activations MiB": run.memory["activations"] / 2 ** 20,
            "accuracy": acc["accuracy"], "correct": acc["correct"], "kl": forgot["kl"], "kept": forgot["kept_greedy"],
            "losses": run.losses}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    base, tok = models.load()
    task = data.load_task("reviews")
    print(f"machine: {models.machine()}; {models.precision_summary(models.pick_device())}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    base_scores = measure.base_probe_scores(base, tok, measure.probe_set())
    for ids in measure.prose_chunks(tok, data.load_prose(), measure.eval_sizes()["prose_tokens"]):  # the base's prose, once
        with models.autocast(models.pick_device()):
            measure._base_logprobs(base, torch.tensor([ids], device=base.device))
    results = {"old": [], "new": []}
    for _ in range(args.rounds):
        for way in ("old", "new"):
            results[way].append(measured_run(way, base, tok, task, args.steps, base_scores))
            r = results[way][-1]
            print(f"  {way}: {r['total s']:.1f} s (training {r['training s']:.1f}, scoring {r['scoring s']:.1f}, "
                  f"forgetting {r['forgetting s']:.1f})", flush=True)
    print(f"\n{'':<18}{'old way':>12}{'new way':>12}{'new/old':>9}")
    for key in ("total s", "training s", "s/step", "scoring s", "forgetting s", "activations MiB"):
        old = statistics.median(r[key] for r in results["old"])
        new = statistics.median(r[key] for r in results["new"])
        print(f"{key:<18}{old:>12.2f}{new:>12.2f}{new / old:>9.2f}")
    old, new = results["old"][0], results["new"][0]
    same = sum(a == b for a, b in zip(old["correct"], new["correct"]))
    print(f"\naccuracy: old {old['accuracy']:.4f}, new {new['accuracy']:.4f} (the same mark on {same} of "
          f"{len(old['correct'])} reviews)")
    print(f"KL: old {old['kl']:.5f}, new {new['kl']:.5f}; probes kept: old {old['kept']:.4f}, new {new['kept']:.4f}")
    print(f"largest loss difference over {len(old['losses'])} steps: "
          f"{max(abs(a - b) for a, b in zip(old['losses'], new['losses'])):.2e}")
    total = {w: statistics.median(r["total s"] for r in results[w]) for w in results}
    print(f"\nratio new/old of a whole measured run: {total['new'] / total['old']:.2f}")
    share = {k: statistics.median(r[k] for r in results["new"]) / total["new"] for k in ("training s", "scoring s", "forgetting s")}
    print("where the new way's time goes: " + ", ".join(f"{k[:-2]} {v:.0%}" for k, v in share.items()))


if __name__ == "__main__":
    main()
