"""Memory of a training step, in one place: what a step holds (weights, gradients, optimizer state, weight
casts, the activations autograd saves), measured on a real step, the process peak, and the textbook arithmetic
that predicts the static part.

Explained in notebook 00_setup_and_baseline, section 6. ``train.fit`` measures with it; ``measure`` and the
notebooks read its tables; ``planner`` predicts the same parts for models that are never loaded.
"""
from __future__ import annotations

import contextlib
import threading

import torch

def _storage_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr())


HALF = (torch.bfloat16, torch.float16)
# the parts of a step's memory, as ``fit`` measures them and the planner predicts them
MEMORY_PARTS = ("weights", "gradients", "optimizer", "weight_casts", "activations")


@contextlib.contextmanager
def count_saved_activations(params, cast_dtype: torch.dtype | None = None):
    """Count the bytes autograd saves for backward; parameters (frozen or not) are excluded: they are weights.

    Under autocast a layer's fp32 weight is cast to half precision, and the cast copy is saved for
    the backward pass. That copy is a new tensor, but it is a *weight*, not an activation: a saved
    ``cast_dtype`` tensor equal to an fp32 weight cast to ``cast_dtype`` (or to its transpose) is
    counted as a weight cast, on its own line. Saved tensors often share memory (views, one tensor
    saved by two operations); each underlying storage is counted once.
    """
    param_storages = {_storage_key(p) for p in params}
    by_shape = {}
    if cast_dtype in HALF:
        for p in params:
            if p.dtype == torch.float32 and p.dim() == 2:
                by_shape.setdefault(tuple(p.shape), []).append(p)
                by_shape.setdefault(tuple(p.shape)[::-1], []).append(p)
    seen, candidates = {}, {}

    def pack(t):
        key = _storage_key(t)
        if key not in param_storages and key not in seen and key not in candidates:
            if t.dtype == cast_dtype and tuple(t.shape) in by_shape:
                candidates[key] = t  # decided after the forward pass, when the comparison cannot disturb it
            else:
                seen[key] = t.untyped_storage().nbytes()
        return t

    def is_weight_cast(t) -> bool:
        # Bookkeeping, not model arithmetic, so it runs past any TorchFunctionMode: the tests' pretend
        # accelerator (accelerator_check.py) cannot see the weight casts autocast makes inside torch, and would
        # take ``t`` for a host tensor meeting the model's weights. On a real device both are on the same one.
        with torch.no_grad(), torch._C.DisableTorchFunction():
            return any(torch.equal(t, w.detach().to(cast_dtype)) or torch.equal(t, w.detach().t().to(cast_dtype))
                       for w in by_shape[tuple(t.shape)] if w.numel() == t.numel())

    result = {"bytes": 0, "weight_cast_bytes": 0}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    casts = 0
    for key, t in candidates.items():
        if is_weight_cast(t):
            casts += t.untyped_storage().nbytes()
        else:
            seen[key] = t.untyped_storage().nbytes()
    result["bytes"] = sum(seen.values())
    result["weight_cast_bytes"] = casts


class PeakMemory:
    """The process peak while the block runs: CUDA's allocator peak, or the sampled resident set size."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        import psutil

        return psutil.Process().memory_info().rss

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(0.005)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def optimizer_state_bytes(optimizer) -> int:
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))



def numbers_by_dtype(tensors) -> dict:
    """How many numbers are stored in each dtype, e.g. {"bfloat16": 134_515_008, "float32": 460_800}."""
    counts = {}
    for t in tensors:
        name = str(t.dtype).replace("torch.", "")
        counts[name] = counts.get(name, 0) + t.numel()
    return counts



# --- the textbook arithmetic -----------------------------------------------------------------------

# 4-bit: QLoRA's NF4 with double quantisation (Dettmers et al. 2023, section 3): half a byte a number, one 8-bit
# scale per block of 64, and one fp32 scale per 256 of those: 0.5 + 1/64 + 4/(64 x 256), about 0.516 B. (Without
# double quantisation, one fp32 scale per 64: 0.5625 B.)
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "4-bit": 0.5 + 1 / 64 + 4 / (64 * 256)}
# a base stored in NF4 as nf4.py does it, counted per weight it stands for (the run's ``weight_dtypes``)
BYTES.update({"nf4 double-quantised": BYTES["4-bit"], "nf4": 0.5 + 4 / 64})
BYTES_PER_TRAINED = 4 + 8  # an fp32 gradient and AdamW's two fp32 moments, per trainable number


def predicted_memory(total: int, trainable: int) -> dict:
    """Textbook MiB of weights + gradients + AdamW for each way of storing the frozen base.

    Trained numbers are always fp32 (4 bytes) with a 4-byte gradient and 8 bytes of AdamW state.
    The frozen rest costs 4 bytes a number in fp32, 2 in bf16, and about 0.516 in 4-bit NF4 (QLoRA: half
    a byte plus a scale per block of 64). Full fine-tuning has no frozen rest: its 16 bytes per number
    do not shrink with a half-precision base (the master weights stay fp32). Explained in notebook 00, section 6.
    """
    frozen = total - trainable
    return {f"frozen base in {name}": (BYTES[name] * frozen + (4 + BYTES_PER_TRAINED) * trainable) / 2 ** 20
            for name in ("float32", "bfloat16", "4-bit")}


def memory_table(run) -> dict:
    """A run's memory breakdown in MiB, with the textbook prediction beside the measurement.

    Textbook: each stored number costs its dtype's bytes (4 in fp32, 2 in bf16/fp16), plus, per
    *trainable* number, a 4-byte gradient and AdamW's two 4-byte moments. Full fine-tuning in fp32:
    16 bytes per parameter plus activations. Under autocast, the half-precision copies of the
    weights that a step makes are shown as "weight casts", not as activations.
    """
    m = run.memory if hasattr(run, "memory") else run["memory"]
    trainable = run.trainable_params if hasattr(run, "trainable_params") else run["trainable_params"]
    total = run.total_params if hasattr(run, "total_params") else run["total_params"]
    mib = 2 ** 20
    stored = m.get("weight_dtypes") or {"float32": total}
    predicted = (sum(BYTES[d] * n for d, n in stored.items()) + BYTES_PER_TRAINED * trainable) / mib
    optimizer = m.get("optimizer") or 0
    measured_static = (m["weights"] + m["gradients"] + optimizer) / mib
    return {
        "weights MiB": m["weights"] / mib,
        "gradients MiB": m["gradients"] / mib,
        "optimizer MiB": optimizer / mib,
        "weight casts MiB": m.get("weight_casts", 0) / mib,
        "activations MiB": m["activations"] / mib,
        "weights+grads+optimizer MiB": measured_static,
        "textbook prediction MiB": predicted,
        "process peak MiB": m["process_peak"] / mib,
    }
