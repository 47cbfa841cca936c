"""A tensor that acts as if it lived on another device, so device mistakes show up on a CPU-only machine.

A notebook on a GPU runtime mixes tensors of two devices: prompts tokenized on the CPU, a model (and what it
generates) on CUDA. Every op that combines them fails there ("Expected all tensors to be on the same
device"), but on CI's CPU-only machines everything is on the CPU and nothing fails. `on_other_device(t)`
marks a CPU tensor as "elsewhere": ops among such tensors work (and stay elsewhere), an op that mixes one
with an ordinary tensor of more than zero dimensions raises like CUDA would, and only an explicit move
(`.to(device)` / `.cpu()`) brings it back. So `f(on_other_device(x))` passes exactly when `f` moves its
inputs to the model's device before using them, as the device contract in docs/api.md says it must.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_map

MOVES = {torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda}
# Ops that read a tensor's metadata or copy its values to the host: fine across devices
HOST_READS = {torch.Tensor.__len__, torch.Tensor.dim, torch.Tensor.size, torch.Tensor.numel, torch.Tensor.tolist,
              torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__bool__,
              torch.Tensor.__index__, torch.Tensor.__format__, torch.Tensor.__repr__}


class ForeignDeviceError(RuntimeError):
    pass


class OtherDeviceTensor(torch.Tensor):
    """See the module docstring; build one with `on_other_device`."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MOVES and _moves_device(func, args, kwargs):
            with torch._C.DisableTorchFunctionSubclass():
                moved = func(*args, **kwargs)  # the same object when nothing had to be copied
            return moved.as_subclass(torch.Tensor)  # a plain tensor on the target (CPU) device
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        # CUDA accepts 0-dim CPU tensors as scalars in its ops, and CPU index tensors into a CUDA tensor
        ordinary = [t for t in tensors if not isinstance(t, OtherDeviceTensor)
                    and (t.dim() > 0 or isinstance(t, torch.nn.Parameter))]
        indexing_foreign = func is torch.Tensor.__getitem__ and isinstance(args[0], OtherDeviceTensor)
        if (func not in HOST_READS and not indexing_foreign and ordinary
                and any(isinstance(t, OtherDeviceTensor) for t in tensors)):
            name = getattr(func, "__name__", str(func))
            raise ForeignDeviceError(f"Expected all tensors to be on the same device: {name} mixes a tensor on the "
                                     "other device with one on the model's device")
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if func in HOST_READS:
            return out
        return tree_map(lambda t: t.as_subclass(OtherDeviceTensor) if type(t) is torch.Tensor else t, out)


def _moves_device(func, args, kwargs) -> bool:
    """`.cpu()`/`.cuda()`, or `.to(...)` with a device (or a tensor of the target device); `.to(dtype)` stays."""
    if func is not torch.Tensor.to:
        return True
    if "device" in kwargs:
        return True
    return any(isinstance(a, (torch.device, str)) or (isinstance(a, torch.Tensor) and not isinstance(
        a, OtherDeviceTensor)) for a in args[1:])


def on_other_device(tensor):
    """`tensor` (or every tensor of a list / dict) marked as living on another device than the model's."""
    if isinstance(tensor, dict):
        return {k: on_other_device(v) for k, v in tensor.items()}
    if isinstance(tensor, (list, tuple)):
        return type(tensor)(on_other_device(t) for t in tensor)
    return tensor.detach().clone().as_subclass(OtherDeviceTensor) if isinstance(tensor, torch.Tensor) else tensor


def is_on_model_device(value) -> bool:
    """True when no tensor in `value` (nested lists/dicts/tuples) is still on the other device."""
    flat, _ = tree_flatten(value)
    return not any(isinstance(t, OtherDeviceTensor) for t in flat)
