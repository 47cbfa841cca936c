"""Loading the base model: full precision, 8-bit or 4-bit (bitsandbytes), and the 4-bit CPU trap (notebook 04).

transformers 5 dropped `from_pretrained(load_in_8bit=True)`; the seed's flags are translated here into a
`BitsAndBytesConfig`. Only the base is quantized: LoRA adapters, the value head and the score head stay
float32 (peft casts adapters up; our heads are plain float32 `nn.Linear`).

The 4-bit CPU trap (bitsandbytes 0.50, CPUs with the avx512_bf16 flag): the first no-grad forward in eval
mode (e.g. `generate()`, reference or reward scoring) repacks every `Linear4bit` weight into an
inference-only layout, in place. Later forwards with gradients then run an op without an autograd kernel,
so LoRA gradients come back missing or wrong, silently (a PPO run blew up to KL 68). Each `Linear4bit`
decides this with its `support_avx512bf16_for_cpu` attribute; `disable_cpu_inference_packing` turns it
off, which keeps the weights in the layout the training kernels expect. The inference is a little slower.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import torch

from ..infra.errors import MarlInputError
from ..infra.progress import no_library_bars

PIP_HINT = "`pip install bitsandbytes`"
HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "trust_remote_code", "subfolder")


def require_bitsandbytes(why: str):
    """Import bitsandbytes or fail with a message that says how to get it."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise MarlInputError(f"{why} needs the bitsandbytes package, which is not installed: {PIP_HINT} "
                             "(or load the base in full precision)") from err
    return bitsandbytes


def is_bitsandbytes_config(quantization_config) -> bool:
    """True for a `BitsAndBytesConfig` (or its dict form); other methods (GPTQ, AWQ...) pass through."""
    if isinstance(quantization_config, dict):
        method = quantization_config.get("quant_method", "bitsandbytes")
        return str(method).startswith("bitsandbytes") or "load_in_4bit" in quantization_config
    return type(quantization_config).__name__ == "BitsAndBytesConfig"


def quantization_config_from_flags(load_in_8bit: bool = False, load_in_4bit: bool = False,
                                   quantization_config=None):
    """The seed's `load_in_8bit` / `load_in_4bit` flags as a `BitsAndBytesConfig` (or None: full precision)."""
    if load_in_8bit and load_in_4bit:
        raise MarlInputError("load_in_8bit=True and load_in_4bit=True were both given; pick one "
                             "(4-bit saves more memory, 8-bit is closer to full precision)")
    if quantization_config is not None and (load_in_8bit or load_in_4bit):
        raise MarlInputError("pass either load_in_8bit/load_in_4bit or quantization_config, not both "
                             "(quantization_config=BitsAndBytesConfig(...) gives full control)")
    if quantization_config is not None:
        if is_bitsandbytes_config(quantization_config):
            require_bitsandbytes("quantization_config=BitsAndBytesConfig(...)")
        return quantization_config
    if not (load_in_8bit or load_in_4bit):
        return None
    require_bitsandbytes("load_in_8bit=True" if load_in_8bit else "load_in_4bit=True")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)


def quantized_linear_layers(model) -> list:
    """The bitsandbytes `Linear8bitLt` / `Linear4bit` modules of `model` (none if bitsandbytes never loaded)."""
    bnb = sys.modules.get("bitsandbytes")  # a model cannot hold bnb layers unless bnb was imported
    if bnb is None:
        return []
    kinds = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    return [module for module in model.modules() if isinstance(module, kinds)]


def disable_cpu_inference_packing(model) -> int:
    """Keep every `Linear4bit` of `model` trainable on CPUs with avx512_bf16; returns how many were set.

    A layer that was already repacked (a model object that has run `generate()` before reaching us) is
    unpacked again with bitsandbytes' own inverse; its block scales went through bfloat16 on the way, so a
    fresh load from disk is exact where this is only close, and we say so.
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return 0
    count, repacked = 0, 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        count += 1
        quant_state = getattr(module.weight, "quant_state", None)
        if getattr(quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, quant_state)
            module.quant_state = module.weight.quant_state
            repacked += 1
    if repacked:
        warnings.warn(f"{repacked} 4-bit layers had already been repacked for CPU inference (the model ran a "
                      "no-grad forward in eval mode before); they were unpacked for training, with block scales "
                      "rounded to bfloat16. Load the base from its folder for exact 4-bit weights.", stacklevel=3)
    return count


def load_base_config(name, kwargs: dict):
    """The base's config alone (cheap): enough to check a reward adapter before any weights load."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, **{k: kwargs[k] for k in HUB_KWARGS if k in kwargs})
    except (OSError, ValueError) as err:
        where = "folder does not exist" if not os.path.exists(str(name)) else "folder has no usable config.json"
        raise MarlInputError(f"base model {name!r}: the {where} (and it is not a reachable hub id); pass the stage-1 "
                             "model folder (`OUT/sft/`) or a hub id like 'gpt2'") from err


class OnceFilter(logging.Filter):
    """Let each distinct message through once.

    bitsandbytes logs "MatMul8bitLt: inputs will be cast from torch.float32 to float16" on EVERY 8-bit
    matmul of a float32 model: millions of lines in one PPO run, which bury a notebook's output and slow it.
    """

    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.msg, record.args)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def quiet_repeated_bnb_warnings() -> None:
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, OnceFilter) for f in bnb_logger.filters):
        bnb_logger.addFilter(OnceFilter())


def load_base(name, bnb_config, kwargs: dict):
    """`AutoModelForCausalLM.from_pretrained`, quantized when `bnb_config` is given."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(kwargs)
    if bnb_config is not None:
        quiet_repeated_bnb_warnings()
        kwargs["quantization_config"] = bnb_config
        if torch.cuda.is_available() and "device_map" not in kwargs:
            # bitsandbytes quantizes on the device the weights load to: one GPU per process.
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    with no_library_bars():  # "Loading weights 29/29" says nothing to the learner (and was a widget in Jupyter)
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
