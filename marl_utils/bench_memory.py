"""Memory accounting of `marl bench`: bytes the models hold, and the resident set of this process.

- `resident_bytes`: parameters, buffers and bitsandbytes quantization state, each storage counted ONCE;
- `rss_bytes` / `peak_rss_bytes`: the kernel's VmRSS / VmHWM (/proc/self/status). `getrusage(...).ru_maxrss`
  is only the fallback: a process started from a bigger one inherits that one's peak in ru_maxrss.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


# ---------------------------------------------------------------------------- resident bytes of modules
def _tensors_in(obj, depth: int = 4):
    """Tensors held by a bitsandbytes object (QuantState, MatmulLtState) or a container of them."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth <= 0 or isinstance(obj, (torch.nn.Module, str, bytes, int, float, bool, type(None))):
        return
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors_in(item, depth - 1)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors_in(item, depth - 1)
    elif type(obj).__module__.startswith("bitsandbytes") and hasattr(obj, "__dict__"):
        for item in vars(obj).values():
            yield from _tensors_in(item, depth - 1)


def resident_tensors(*modules):
    """Every tensor the modules keep in memory: parameters, buffers and quantization state.

    bitsandbytes keeps the packed weight as the parameter (int8, or two 4-bit values per uint8) and its scales
    beside it: `Int8Params.SCB`, `Params4bit.quant_state.absmax` (and the nested state of double
    quantization), `Linear8bitLt.state`. Those are reached through the parameter's and the module's attributes.
    """
    for module in modules:
        for sub in module.modules():
            for tensor in list(sub._parameters.values()) + list(sub._buffers.values()):
                if tensor is None:
                    continue
                yield tensor
                yield from _tensors_in(vars(tensor) if hasattr(tensor, "__dict__") else None)
            for name, value in vars(sub).items():
                if not name.startswith("_"):
                    yield from _tensors_in(value, depth=2) if not isinstance(value, torch.Tensor) else [value]


def storage_bytes(tensors) -> int:
    """Bytes of memory behind `tensors`, each storage counted ONCE (keyed by `untyped_storage().data_ptr()`).

    Tied weights, views and anything else that shares memory (a reference model that IS the base) count once.
    """
    sizes = {}
    for tensor in tensors:
        if tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            sizes[storage.data_ptr()] = storage.nbytes()
    return sum(sizes.values())


def resident_bytes(*modules) -> int:
    """Bytes the modules hold in memory (parameters, buffers, quantization state), shared storage once."""
    return storage_bytes(resident_tensors(*modules))


def quantized_bytes(*modules) -> int:
    """The part of `resident_bytes` in bitsandbytes layers (packed weights + scales); the rest stays float."""
    layers = [m for module in modules for m in module.modules() if type(m).__module__.startswith("bitsandbytes")]
    return resident_bytes(*layers)


def adapter_bytes(*modules) -> int:
    """Bytes of the LoRA matrices and the small heads (value heads, score heads): what is not base weight."""
    def is_adapter_or_head(name: str) -> bool:
        return "lora_" in name or name.startswith(("v_heads.", "reward_head.")) or name.endswith(("score.weight",
                                                                                                  "score.bias"))

    tensors = [p for module in modules for name, p in module.named_parameters() if is_adapter_or_head(name)]
    return storage_bytes(tensors)


def release_checkpoint_pages(model) -> None:
    """Copy the unquantized tensors of a quantized model into process memory.

    transformers memory-maps the safetensors file. After on-the-fly quantization only the embeddings and
    norms still point into that mapping, but they keep the WHOLE file mapped, so the float32 pages read while
    quantizing would stay in the resident set for the whole run. A GPU would hold only the quantized weights.
    """
    quantized = tuple(type(p) for p in model.parameters() if type(p).__module__.startswith("bitsandbytes"))
    copies = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for tensor in store.values():
                if tensor is None or isinstance(tensor, quantized) or tensor.device.type != "cpu":
                    continue
                key = tensor.untyped_storage().data_ptr()
                copy = copies.setdefault(key, tensor.data.clone())  # tied weights stay tied
                tensor.data = copy


# ---------------------------------------------------------------------------- resident set of this process
def _status_kb(field: str):
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes():
    """This process's resident set now (None where /proc is missing)."""
    return _status_kb("VmRSS")


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM, else ru_maxrss (kB on Linux, bytes on macOS)."""
    peak = _status_kb("VmHWM")
    if peak is not None:
        return peak
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def return_free_heap() -> None:
    """Hand memory freed by loading back to the OS (glibc keeps freed heap otherwise; a no-op elsewhere).

    On-the-fly quantization frees about the float32 model's size in temporaries; without this they would
    stay in the resident set of a quantized layout for the whole run although nothing uses them.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Restart the high-water mark at the current resident set (Linux: `5` into /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
