"""The optimiser side of a PPO update: backward, one optimizer step, and all-or-nothing steps (notebook 03).

`UpdateStepper` wraps a plain torch optimizer (not Accelerate's wrapper, which decides whether to step from
the process-wide accumulation state, see ppo_accelerator.py): the loss is scaled for fp16 where Accelerate
made a GradScaler, gradients are unscaled before clipping, and `snapshot` / `restore` put the trainable
weights, the optimizer state, the GradScaler's scale and the score statistics back when a step fails
half-way (a non-finite loss after some minibatches were already applied), so a failed step leaves no
half-applied update behind.
"""

from __future__ import annotations

import copy

import torch


class UpdateStepper:
    """backward / step / snapshot / restore for the parameters `params()` returns."""

    def __init__(self, accelerator, optimizer, params, max_grad_norm: float | None = None):
        self.accelerator, self.optimizer = accelerator, optimizer
        self.params, self.max_grad_norm = params, max_grad_norm

    def check_finite(self, loss: torch.Tensor) -> None:
        """Stop before a non-finite loss reaches the weights (decided on every process together under DDP)."""
        bad = (~torch.isfinite(loss.detach())).float()
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, "sum")
        if bad.item() > 0:
            raise FloatingPointError("the PPO loss is not finite; no update of this step was kept (the adapter, "
                                     "value head and optimizer are as before the step). Lower learning_rate or set "
                                     "max_grad_norm / score_clip")

    def backward(self, loss: torch.Tensor) -> None:
        scaler = self.accelerator.scaler  # fp16 only: scale the loss so small gradients survive in half precision
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def step(self) -> None:
        """One optimizer step on the accumulated gradients (clipped to max_grad_norm), then zero them."""
        scaler = self.accelerator.scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params(), self.max_grad_norm)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def scaler_state(self) -> dict | None:
        """The fp16 GradScaler's scale and growth counter (None without one): part of an exact resume."""
        scaler = self.accelerator.scaler
        return scaler.state_dict() if scaler is not None else None

    def load_scaler_state(self, state: dict | None) -> None:
        scaler = self.accelerator.scaler
        if scaler is not None and state:  # an empty state comes from a disabled scaler: nothing to restore
            scaler.load_state_dict(state)

    def snapshot(self, extra_state: dict) -> dict:
        """Copies of what a step changes: trainable weights, optimizer and GradScaler state, and `extra_state`."""
        return {"params": [p.detach().clone() for p in self.params()],
                "optimizer": copy.deepcopy(self.optimizer.state_dict()), "scaler": self.scaler_state(),
                "extra": copy.deepcopy(extra_state)}

    def restore(self, snapshot: dict) -> dict:
        """Put weights and optimizer back as they were at `snapshot`; returns its extra_state."""
        with torch.no_grad():
            for param, saved in zip(self.params(), snapshot["params"]):
                param.copy_(saved)
        self.optimizer.load_state_dict(snapshot["optimizer"])
        self.optimizer.zero_grad(set_to_none=True)
        self.load_scaler_state(snapshot["scaler"])
        return snapshot["extra"]
