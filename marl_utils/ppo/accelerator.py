"""The Accelerator a PPOTrainer runs on: processes, device and precision, set up once (notebook 03, README).

Three decisions live here. Several processes on a CPU-only machine (torchrun with gloo) need `cpu=True`,
or each process would train an unsynchronised copy. The precision comes from `PPOConfig.mixed_precision`
(precision.py), and a process holds one: Accelerate keeps it in process-wide state. And no gradient-
accumulation plugin: Accelerate keeps accumulation state in ONE object shared by every Accelerator of the
process, so two trainers with different settings (notebook 05) would rescale each other's gradients; the
trainer accumulates itself.

Precision is process-wide in Accelerate too, and a transformers/TRL Trainer (stage 1, stage 2) resets it
whenever its arguments are built. A PPOTrainer asks for its own precision explicitly (precision.py) and,
where another trainer left another one, resets Accelerate's precision state as those Trainers do. Its
forwards then run under its own autocast (`PPOTrainer.autocast`), so a later trainer cannot change them.
`prepare_model` would also replace `model.forward` in place with an autocast wrapper, changing the user's
own `model(...)` calls afterwards; `prepare_model_keeping_forward` undoes that.
"""

from __future__ import annotations

import os

import torch

from ..infra.errors import MarlInputError
from ..model.precision import resolve_mixed_precision, warn_if_slow

MODEL_FORWARD_WRAPPER_ATTRIBUTES = ("forward", "_original_forward")  # set on the instance by prepare_model


def has_accelerator() -> bool:
    """A GPU-like device torch can train on (CUDA, XPU, MPS); checked without `torch.accelerator` (torch >= 2.6)."""
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return True
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def build_accelerator(config):
    """An `accelerate.Accelerator` for `config` (a PPOConfig), or a clear error for what PPOTrainer cannot run."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    cpu_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accelerator()
    mixed = resolve_mixed_precision(config.mixed_precision, use_cuda=torch.cuda.is_available() and not cpu_processes)
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mixed):
        # another trainer of this process (TRL's RewardTrainer: bf16 by default) set another precision; the
        # transformers Trainer resets this state the same way. Processes and devices (PartialState) stay.
        AcceleratorState._reset_state(reset_partial_state=False)
    try:
        accelerator = Accelerator(log_with=config.log_with, project_dir=config.logging_dir, cpu=cpu_processes,
                                  mixed_precision=mixed)
    except ValueError as err:
        if "already been initialized" not in str(err):
            raise
        raise MarlInputError(f"another trainer (or Accelerator) in this process was set up for other devices ({err}); "
                             "one process uses one device setting (precision may differ): build this trainer on the "
                             "same devices, or restart the kernel") from None
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # model and optimizer are prepared apart (the model also serves generate, reference and reward), so
        # there is no DeepSpeed engine, and backward() would fail after the first rollout
        raise MarlInputError("PPOTrainer runs data-parallel (DDP), not under DeepSpeed: launch it without a "
                             "DeepSpeed config (`accelerate config`: multi-GPU, DeepSpeed no). With LoRA on a "
                             "frozen base the state ZeRO-2 would shard is only the adapter, value head and Adam")
    warn_if_slow(accelerator.mixed_precision, accelerator.device.type == "cuda")
    return accelerator


def prepare_model_keeping_forward(accelerator, model, **kwargs):
    """`accelerator.prepare_model`, with `model.forward` left as it was (the trainer autocasts its own passes).

    Under bf16/fp16, Accelerate stores an autocast wrapper as the instance attribute `model.forward` (and the
    original as `_original_forward`); dropping both brings back the class's forward for every caller.
    """
    before = {name: model.__dict__[name] for name in MODEL_FORWARD_WRAPPER_ATTRIBUTES if name in model.__dict__}
    prepared = accelerator.prepare_model(model, **kwargs)
    for name in MODEL_FORWARD_WRAPPER_ATTRIBUTES:
        model.__dict__.pop(name, None)
    model.__dict__.update(before)
    return prepared


def leave_process_group() -> None:
    """End this process's part in a torchrun job before the interpreter exits: wait for the other ranks, then
    destroy the process group. A gloo worker that exits with the group still alive can abort at exit
    ("terminate called without an active exception", SIGABRT) after its work is done. No-op in one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
