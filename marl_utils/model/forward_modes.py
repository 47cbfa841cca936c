"""The modes PPO runs its forward passes in: dropout off, and eval mode only where it costs nothing (notebook 03).

PPO needs the rollout forward (old logprobs, values) and the first training forward to compute the same
function, or the first epoch would not start at ratio 1. Dropout breaks that, so it must be off. Eval mode
would switch it off too, but eval mode also switches off HF gradient checkpointing (it only runs when
`module.training`), so a user who enables checkpointing to fit a bigger base would silently save nothing.
`dropout_disabled` therefore sets every dropout probability to 0 for the duration and leaves the modes
alone; `eval_mode` is kept for generation and scoring, which need no gradients at all.

One dropout may stay on in PPO's training forward: the value head's own (`value_head_dropout`, off by
default), passed as `keep`. It sits after the trunk and feeds the value loss only, so the policy's logprobs,
and the ratio that starts the first epoch at 1, are untouched; the rollout's old values are computed
without it, as regression targets should be.
"""

from __future__ import annotations

import contextlib

from torch import nn

# Attention layers apply dropout functionally with a float read from the module (Llama, Mistral, Qwen2:
# `self.attention_dropout`; GPT-BigCode (StarCoder 1, SantaCoder): `self.attn_dropout`; some others:
# `self.dropout`); GPT-2 reads the p of an nn.Dropout module.
FLOAT_DROPOUT_ATTRIBUTES = ("attention_dropout", "dropout", "attn_dropout", "attn_dropout_p")


@contextlib.contextmanager
def dropout_disabled(model: nn.Module, keep: nn.Module | None = None):
    """Every dropout probability of `model` is 0 inside the block, except within `keep`; modes stay as they are."""
    kept = {id(module) for module in keep.modules()} if keep is not None else set()
    saved = []
    for module in model.modules():
        if id(module) in kept:
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd):
            saved.append((module, "p", module.p))
            module.p = 0.0
        for name in FLOAT_DROPOUT_ATTRIBUTES:
            value = module.__dict__.get(name)
            if isinstance(value, float) and value != 0.0:
                saved.append((module, name, value))
                setattr(module, name, 0.0)
    try:
        yield model
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


@contextlib.contextmanager
def train_mode_without_dropout(model: nn.Module, keep: nn.Module | None = None):
    """Train mode (so gradient checkpointing runs) with dropout off (but in `keep`); every module's mode restored."""
    modes = [(module, module.training) for module in model.modules()]
    model.train()
    try:
        with dropout_disabled(model, keep):
            yield model
    finally:
        for module, mode in modes:
            module.training = mode


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode for the duration (every submodule), then each module's mode as it was."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode
