"""What one training step of each method costs on a GPU, and how busy it keeps the GPU.

    python benchmarks/gpu_step.py [--model NAME|tiny] [--batches 8 32 128] [--seq 64] [--steps 20]
                                  [--warmup 3] [--profile-steps 3] [--precision {auto,fp32,bf16}]

Methods: full fine-tuning, LoRA r=8 (alpha 16) on q_proj and v_proj, prefix tuning P=20 and prompt
tuning P=20, each at every batch size of ``--batches``. Every (method, batch) pair starts from a fresh
copy of the model and trains on one fixed synthetic batch: random token ids of shape (batch, seq), no
padding, the loss being ``train.loss_on`` (cross-entropy of a random target token after the last
position), so data loading and tokenising are not part of what is timed. AdamW (fused on CUDA).

Precision (``--precision auto``): ``models.compute_dtype(device)`` picks the half precision: bf16 on
CUDA (fp16 with loss scaling on cards without bf16), fp32 on most CPUs. Full fine-tuning keeps fp32
weights and runs under autocast in it; the PEFT methods keep the frozen base in it, their trained
tensors in fp32 (the methods make them so), also under autocast. Where it is fp32 there is no
autocast. ``--precision fp32`` forces fp32 everywhere; ``--precision bf16`` forces bf16.

One row per (method, batch):

* s/step: median wall time of the ``--steps`` timed steps after ``--warmup`` untimed ones (each step
  is synchronised on CUDA before its time is read, as ``train.fit`` does);
* tokens/s: batch x seq / (s/step); the P virtual tokens of prefix and prompt tuning are not counted;
* peak MiB: ``torch.cuda.max_memory_allocated`` over the warm-up and timed steps on CUDA (weights of
  this copy, gradients, optimizer state, activations; the CUDA context and the allocator's cache are
  not in it); on the CPU the peak resident set size of the whole process (sampled), which includes
  the base model (kept on the CPU) every copy is made from, so compare CPU rows with each other only;
* GPU ms/step and GPU busy (CUDA only, "n/a" on the CPU): ``--profile-steps`` more steps run under
  ``torch.profiler`` (after one traced step that is thrown away); GPU ms/step is the summed duration
  of everything the GPU ran in them (kernels, and the few memory copies and sets) per step, and GPU
  busy is that sum over the wall time of those profiled steps. One stream runs one kernel at a time,
  so the share is the fraction of the step the GPU worked; the rest it waited for Python and kernel
  launches. Near 1: the step is GPU-bound and a bigger batch costs proportionally more; well below
  1 (small batches, small models): the step is launch-bound, and a larger batch is almost free.
* busy*: GPU ms/step / s/step, the same share against the *unprofiled* steps. The profiler adds CPU
  time to every kernel launch, so in a launch-bound step GPU busy reads low: on an H200 with a
  SmolLM2-135M-sized model at batch 8, the profiled steps took about 1.7 times as long as the timed
  ones. Where the two columns differ, busy* is the better estimate of an ordinary step.

"OOM" in a row: that configuration ran out of memory; the next one is tried. A script, not a test:
it prints what it measured and asserts nothing. Smoke test on a CPU (seconds):

    python benchmarks/gpu_step.py --model tiny --steps 3 --batches 2
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

# torch.profiler warns once that each profile() only reports its own events: that is what we want.
warnings.filterwarnings("ignore", message=".*Profiler clears events.*")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from peft_lab import lora, models, prefix, prompt, train  # noqa: E402

# The architecture of ``--model tiny``: a 2-layer Llama with grouped-query attention (as in
# tests/conftest.py), random weights; only for checking that the script runs.
TINY_CONFIG = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                   pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=True)


def build_tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_CONFIG)).eval()
    model.peft_lab_name = "tiny"
    return model


def method_table(lora_targets):
    """name -> (weights kept in fp32?, function making the tuned model from a copy of the base)."""
    return {
        "full": (True, lambda m: m),  # fresh_copy already made every parameter trainable
        "lora r=8": (False, lambda m: lora.apply(m, rank=8, alpha=16, targets=lora_targets)),
        "prefix P=20": (False, lambda m: prefix.apply(m, num_virtual_tokens=20)),
        "prompt P=20": (False, lambda m: prompt.apply(m, num_virtual_tokens=20)),
    }


def precisions(device, choice):
    """(half dtype for frozen PEFT bases, autocast dtype or None) for ``--precision``."""
    if choice == "fp32":
        return torch.float32, None
    if choice == "bf16":
        return torch.bfloat16, torch.bfloat16
    dtype = models.compute_dtype(device)  # auto: bf16/fp16 on CUDA, fp32 on the CPU
    return dtype, (None if dtype == torch.float32 else dtype)


def synthetic_batch(batch_size, seq, vocab, device, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq), generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "last": torch.full((batch_size,), seq - 1, dtype=torch.long).to(device),
        "target": torch.randint(0, vocab, (batch_size,), generator=g).to(device),
    }


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class PeakRSS:
    """The process's peak resident set size while the block runs, sampled every 5 ms."""

    def __init__(self):
        import psutil

        self._proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(0.005)

    def __enter__(self):
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def device_seconds(prof) -> float:
    """Summed duration of all GPU-side events (kernels, memcpy, memset) the profiler recorded."""
    from torch.autograd import DeviceType

    return sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA) / 1e6


def run_config(base, make, keep_fp32, batch_size, args, device, half, amp):
    """Train a fresh tuned copy of ``base`` on one synthetic batch; return the row's numbers."""
    dtype = torch.float32 if keep_fp32 else half
    tuned = make(models.fresh_copy(base).to(device=device, dtype=dtype))
    params = train.trainable_parameters(tuned)
    vocab = base.get_input_embeddings().weight.shape[0]
    batch = synthetic_batch(batch_size, args.seq, vocab, device, seed=batch_size)
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=1e-5, **({"fused": True} if cuda else {}))
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp == torch.float16)
    tuned.train()

    def step():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = train.loss_on(tuned, batch)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    with (PeakRSS() if not cuda else _NoPeak()) as rss:
        for i in range(args.warmup + args.steps):
            sync(device)
            started = time.perf_counter()
            step()
            sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() if cuda else rss.peak
    row = {"trainable": sum(p.numel() for p in params), "s/step": statistics.median(times), "peak": peak,
           "gpu s/step": None, "busy": None}
    if cuda and args.profile_steps > 0:
        from torch.profiler import ProfilerActivity, profile, schedule

        # One traced warm-up step first, thrown away: the profiler's first sight of each kernel costs
        # CPU time that no later step pays, and would lower the busy share of the first configuration.
        traced = {}
        walls = []
        with profile(activities=[ProfilerActivity.CUDA],
                     schedule=schedule(wait=0, warmup=1, active=args.profile_steps, repeat=1),
                     on_trace_ready=lambda p: traced.update(gpu=device_seconds(p))) as prof:
            for i in range(1 + args.profile_steps):
                sync(device)
                started = time.perf_counter()
                step()
                sync(device)  # as in the timed steps
                if i >= 1:
                    walls.append(time.perf_counter() - started)
                prof.step()
        if "gpu" in traced:
            row["gpu s/step"] = traced["gpu"] / args.profile_steps
            row["busy"] = traced["gpu"] / sum(walls)
    tuned.eval()
    return row


class _NoPeak:
    peak = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


OOM_ERRORS = (torch.cuda.OutOfMemoryError, MemoryError)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="'tiny' (a 2-layer random Llama, for smoke tests) or anything models.load takes; "
                             "default: the embedded SmolLM2-135M")
    parser.add_argument("--batches", nargs="+", default=["8", "32", "128"],
                        help="batch sizes, e.g. --batches 8 32 128 or --batches 8,32,128")
    parser.add_argument("--seq", type=int, default=64, help="tokens per row of the synthetic batch")
    parser.add_argument("--steps", type=int, default=20, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled steps for the GPU busy share (CUDA)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated (GPT-2: c_attn)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset of: full, lora, prefix, prompt (default: all)")
    args = parser.parse_args()
    batches = [int(b) for item in args.batches for b in str(item).split(",") if b.strip()]
    if args.steps < 1 or not batches or min(batches) < 1:
        parser.error("--steps and every batch size must be at least 1")

    device = models.pick_device()
    if device.type == "mps":
        device = torch.device("cpu")  # the busy share and peak memory are measured for CUDA and the CPU only
    if args.model == "tiny":
        base = build_tiny()
    else:
        base, _ = models.load(args.model, device="cpu")  # the base stays on the CPU; each copy goes to the device
    half, amp = precisions(device, args.precision)
    methods = method_table(args.lora_targets.split(","))
    if args.methods:
        wanted = [w.strip() for w in args.methods.split(",")]
        methods = {k: v for k, v in methods.items() if k.split()[0] in wanted}

    n_params = sum(p.numel() for p in {id(p): p for p in base.parameters()}.values())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    name = lambda d: str(d).replace("torch.", "") if d is not None else "off"  # noqa: E731
    print(f"device {device} ({where}); torch {torch.__version__}")
    print(f"model {getattr(base, 'peft_lab_name', args.model)} ({n_params:,} parameters); "
          f"synthetic batches of {args.seq} tokens; {args.warmup} warm-up + {args.steps} timed steps"
          + (f" + {args.profile_steps} profiled" if device.type == "cuda" else ""))
    print(f"precision {args.precision}: full fine-tuning weights fp32, PEFT frozen base {name(half)}, "
          f"autocast {name(amp)}")
    peak_kind = "CUDA max allocated" if device.type == "cuda" else "process RSS"
    print(f"peak MiB = {peak_kind}\n")
    header = (f"{'method':<12} {'batch':>5} {'trainable':>11} {'s/step':>9} {'tokens/s':>10} {'peak MiB':>9} "
              f"{'GPU ms/step':>11} {'GPU busy':>8} {'busy*':>6}")
    print(header)
    print("-" * len(header))
    for label, (keep_fp32, make) in methods.items():
        for batch_size in batches:
            row, error = None, None
            try:
                row = run_config(base, make, keep_fp32, batch_size, args, device, half, amp)
            except OOM_ERRORS:
                error = "OOM"
            except RuntimeError as err:  # cuBLAS/cuDNN report a failed allocation as a plain RuntimeError
                if "out of memory" not in str(err).lower() and "ALLOC_FAILED" not in str(err):
                    raise
                error = "OOM"
            free(device)
            if row is None:
                print(f"{label:<12} {batch_size:>5} {error:>11}", flush=True)
                continue
            tokens = batch_size * args.seq / row["s/step"]
            gpu_ms = "n/a" if row["gpu s/step"] is None else f"{row['gpu s/step'] * 1e3:.2f}"
            busy = "n/a" if row["busy"] is None else f"{row['busy']:.0%}"
            busy_unprofiled = "n/a" if row["gpu s/step"] is None else f"{row['gpu s/step'] / row['s/step']:.0%}"
            print(f"{label:<12} {batch_size:>5} {row['trainable']:>11,} {row['s/step']:>9.4f} {tokens:>10,.0f} "
                  f"{row['peak'] / 2**20:>9.1f} {gpu_ms:>11} {busy:>8} {busy_unprofiled:>6}", flush=True)


if __name__ == "__main__":
    main()
