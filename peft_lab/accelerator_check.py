"""A pretend accelerator on the CPU, so a machine without a GPU catches device mistakes.

On a GPU, a cell that feeds the model a tensor still living on the CPU stops with "Expected all
tensors to be on the same device". On a CPU-only machine (a laptop, the CI) the same cell runs
fine, because everything is on the CPU anyway - so the mistake ships, and the first learner on Colab
trips over it. This module makes the mistake visible without a GPU:

    host (CPU) tensors              "accelerator" tensors (tagged)
    ------------------              ------------------------------
    tokenizer output                model parameters and buffers
    torch.tensor([...])             x.to(device), x.cuda(), data.encode(..., device=...)
    x.cpu(), x.to("cpu")            anything computed from a tagged tensor

Every tensor is either a host tensor or tagged as living on the accelerator, exactly as it would
be on a GPU. An operation that mixes the two (an embedding lookup of host token ids in accelerator
weights, ``torch.cat`` of a host and an accelerator tensor, ...) raises the same error a GPU would.
Like on a real GPU, a 0-dimensional host tensor may join accelerator tensors, copies across devices
are allowed, and ``.numpy()`` needs ``.cpu()`` first.

It is a ``TorchFunctionMode``, switched on by ``notebook.setup()`` when ``PEFT_LAB_CHECK_DEVICES=1``
(the test suite sets it, so every notebook runs under it in CI). Python-level bookkeeping on every
torch call makes it slow: for checking, never for measuring.
"""
from __future__ import annotations

import os

import torch
from torch.overrides import TorchFunctionMode

ENV = "PEFT_LAB_CHECK_DEVICES"
_TAG = "_peft_lab_on_accelerator"
T = torch.Tensor

# Creating a tensor: it lands on the accelerator only when a device is named (``device=...``).
_FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
              torch.rand, torch.randn, torch.randint, torch.randperm, torch.linspace, torch.eye, torch.empty_strided}
# Methods that make a new tensor on the device of ``self`` unless told otherwise.
_NEW_LIKE = {T.new_zeros, T.new_ones, T.new_empty, T.new_full, T.new_tensor}
# Operations a GPU allows across devices: copying in, assigning, indexing with host indices.
_CROSS_DEVICE_OK = {T.copy_, T.__setitem__, T.__getitem__, T.index_put_, T.__deepcopy__, T.set_,
                    torch._has_compatible_shallow_copy_type}  # a type check inside Module.to, no arithmetic
# Operations a GPU refuses on an accelerator tensor.
_HOST_ONLY = {T.numpy, T.__array__}


_PARAMETER = torch.nn.Parameter


def on_accelerator(t: torch.Tensor) -> bool:
    """Does ``t`` live on the (pretend) accelerator? Parameters always do: the model lives there."""
    # ``type(t) is`` rather than isinstance: Parameter's isinstance hook is slow, and this runs on every op
    return type(t) is _PARAMETER or getattr(t, _TAG, False)


def _is_host_name(device) -> bool:
    """``"cpu"`` written out means the host; a ``torch.device`` is taken as the model's device."""
    return isinstance(device, str) and device.startswith("cpu")


def _tensors(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (b for b in a if isinstance(b, torch.Tensor))


def _placed(t, accelerator: bool):
    """``t`` tagged as living on the accelerator or not; a new object if the tag changes, as a real move would."""
    if type(t) is _PARAMETER or on_accelerator(t) == accelerator:
        return t
    moved = t.view_as(t)
    if accelerator:
        setattr(moved, _TAG, True)
    return moved


def _tag_all(out):
    if isinstance(out, torch.Tensor):
        if type(out) is not _PARAMETER:
            setattr(out, _TAG, True)
    elif isinstance(out, (list, tuple)):
        for o in out:
            _tag_all(o)
    return out


def _target_of_to(self, args, kwargs):
    """Where ``self.to(...)`` sends a tensor: True accelerator, False host, None unchanged."""
    for a in (*args, kwargs.get("device")):
        if isinstance(a, torch.Tensor):
            return on_accelerator(a)
        if isinstance(a, (str, torch.device)):
            return not _is_host_name(a)
    return None


class SimulatedAccelerator(TorchFunctionMode):
    """Tags tensors as host or accelerator and refuses to mix them, as a GPU would."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is T.to:
            target = _target_of_to(args[0], args[1:], kwargs)
            accelerator = on_accelerator(args[0]) if target is None else target
            out = func(*args, **kwargs)
            if out is not args[0]:  # a new tensor (another dtype): it lives where it was sent
                return _tag_all(out) if accelerator else out
            return _placed(out, accelerator)  # the same object: a real move would make a new one
        if func is T.cpu:
            return _placed(func(*args, **kwargs), False)
        if func is T.cuda:
            return _placed(args[0], True)
        if func in _FACTORIES:
            out = func(*args, **kwargs)
            device = kwargs.get("device")
            return _tag_all(out) if device is not None and not _is_host_name(device) else out
        if func in _NEW_LIKE:
            out = func(*args, **kwargs)
            device = kwargs.get("device")
            accelerator = on_accelerator(args[0]) if device is None else not _is_host_name(device)
            return _tag_all(out) if accelerator else out
        tensors = list(_tensors(args, kwargs))
        marked = [t for t in tensors if on_accelerator(t)]
        if marked and func in _HOST_ONLY:
            raise TypeError("can't convert an accelerator tensor to numpy (simulated accelerator, "
                            f"{ENV}=1). Use Tensor.cpu() to copy the tensor to host memory first.")
        host = [t for t in tensors if not on_accelerator(t) and t.dim() > 0]
        if marked and host and func not in _CROSS_DEVICE_OK:
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found at least two devices: the "
                f"accelerator and cpu (simulated accelerator, {ENV}=1; in {getattr(func, '__name__', func)}). "
                "A host tensor met the model's tensors: on a GPU this fails. Put inputs on the model's device, "
                "e.g. data.encode(..., device=model.device), data.token_ids(tok, text, device=model.device) "
                "or x.to(model.device).")
        out = func(*args, **kwargs)
        return _tag_all(out) if marked else out


_active: SimulatedAccelerator | None = None


def enable() -> None:
    """Switch the check on for this process (idempotent). Tensors made before stay host tensors."""
    global _active
    if _active is None:
        _active = SimulatedAccelerator()
        _active.__enter__()


def disable() -> None:
    global _active
    if _active is not None:
        _active.__exit__(None, None, None)
        _active = None


def requested() -> bool:
    """True when ``PEFT_LAB_CHECK_DEVICES=1``: run with the pretend accelerator."""
    return os.environ.get(ENV, "0").strip().lower() in {"1", "true", "yes", "on"}
