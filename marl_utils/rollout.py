"""The forward passes of a PPO step over the rollout tokens, at the response positions only (notebook 03).

A PPO step reads the same token ids three times without gradients: the policy (old logprobs, values), the
reference (every adapter off) and, inside `train()`, the reward adapter. On one multi-adapter model those
are the same base weights with different LoRA adapters switched in, so peft can run them as ONE batched
forward with a per-row adapter (the policy's name, "__base__" for the reference, the reward adapter's name;
adapter_rows.py routes the rows). `fused_rollout` does that; `separate_rollout` runs them one after another
(needed for a separate `ref_model`, where peft cannot run a layer per row, and the simple path to read).

Every row of a rollout batch ends with its response (left padding), so every response token sits in the
last `R = response_width` columns. Logits, log-softmax and entropy are computed there only: the vocabulary
projection over the prompt positions is work no PPO quantity needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapter_rows import BASE, adapter_rows, causal_lm_rows, fixed_rows, per_row_problem
from .forward_modes import eval_mode
from .ppo_core import entropy_from_log_probs, log_probs_and_picked


@dataclass
class Rollout:
    """Per-token tensors of a batch at its response positions, [B,R] each (mask: 1 at response tokens)."""

    logprobs: torch.Tensor      # log pi_old(a_t), the sampler's policy
    values: torch.Tensor        # V(s_t) of the rollout
    ref_logprobs: torch.Tensor  # log pi_ref(a_t): adapters disabled
    entropy: torch.Tensor       # entropy of pi_old at each position
    mask: torch.Tensor
    scores: torch.Tensor | None = None  # [B] reward-adapter scores, when the reward pass was fused in


def response_view(batch: dict) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(R, response_mask [B,R], target ids [B,R]) of a rollout batch: the columns where responses live."""
    width = batch["response_width"]
    return width, batch["response_mask"][:, -width:], batch["input_ids"][:, -width:]


def logprobs_at_responses(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """logits [b,R+1,V] of the last R+1 positions -> (logprobs [b,R], log-softmax of logits / T [b,R,V])."""
    logits = logits[:, :-1].float()  # the logits at t predict token t+1
    if temperature != 1.0:
        logits = logits / temperature
    log_probs, picked = log_probs_and_picked(logits, targets)
    return picked, log_probs


def policy_forward(model, batch: dict, rows, temperature: float, with_values: bool = True,
                   with_entropy: bool = False):
    """(logprobs [b,R], values [b,R] or None, entropy [b,R] or None) of `rows` under `model`'s active policy.

    `model` is the multi-adapter model, or its DDP-wrapped copy for training forwards.
    """
    width, _, targets = response_view(batch)
    out = model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
                position_ids=batch["position_ids"][rows], logits_to_keep=width + 1)
    logits = out[0] if isinstance(out, tuple) else out.logits
    logprobs, log_probs = logprobs_at_responses(logits, targets[rows], temperature)
    values = out[2][:, -width - 1:-1] if with_values else None
    return logprobs, values, entropy_from_log_probs(log_probs) if with_entropy else None


@torch.no_grad()
def reference_forward(model, batch: dict, rows, temperature: float, ref_model=None) -> torch.Tensor:
    """[b,R] logprobs of the reference: `ref_model` if given, else `model` with every adapter disabled."""
    width, _, targets = response_view(batch)
    inputs = dict(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
                  position_ids=batch["position_ids"][rows], use_cache=False, logits_to_keep=width + 1)
    if ref_model is not None:
        with eval_mode(ref_model):  # a separate reference model: no dropout, nothing to train
            out = ref_model(**inputs)
    else:
        with model.reference() as reference:
            out = reference(**inputs)
    logits = out[0] if isinstance(out, tuple) else out.logits
    return logprobs_at_responses(logits, targets[rows], temperature)[0]


@torch.no_grad()
def separate_rollout(model, policy, batch: dict, chunk: int, temperature: float, ref_model=None) -> Rollout:
    """Policy and reference forwards one after another, `chunk` rows at a time."""
    _, mask, _ = response_view(batch)
    parts = []
    for rows in torch.arange(mask.shape[0], device=mask.device).split(chunk):
        logprobs, values, entropy = policy_forward(policy, batch, rows, temperature, with_entropy=True)
        ref_logprobs = reference_forward(model, batch, rows, temperature, ref_model)
        parts.append((logprobs, values, ref_logprobs, entropy))
    logprobs, values, ref_logprobs, entropy = (torch.cat(p) for p in zip(*parts))
    return Rollout(logprobs, values, ref_logprobs, entropy, mask)


def fused_roles(model, with_reward: bool = True) -> list:
    """Adapter of each block of rows in the fused forward: policy, reference ("__base__"), (reward), (critic)."""
    return [model.active_adapter, BASE] + ([model.reward_adapter_name] if with_reward and model.reward_adapter_name
                                           else []) + ([model.critic_adapter] if model.critic_adapter else [])


def can_fuse(model) -> str | None:
    """None when the fused forward gives the numbers of the separate passes, else why it cannot.

    Every layer must run each role's adapter on its own rows (`per_row_problem` asks peft: DoRA, layer types
    and modules_to_save wrappers without per-row support say no). LLM.int8 (8-bit bases) multiplies the
    activation columns that hold an outlier anywhere in the batch in 16-bit, so a row's result depends on the
    other rows: a batch of three roles would not compute what each role computes alone (logprobs ~1e-3 off).
    """
    from .quantization import quantized_linear_layers

    if any(getattr(getattr(layer, "state", None), "threshold", 0) > 0 for layer in quantized_linear_layers(model)
           if type(layer).__name__ == "Linear8bitLt"):
        return "an 8-bit (LLM.int8) base computes each row depending on the batch's outlier columns"
    return per_row_problem(model.pretrained_model, fused_roles(model))


@torch.no_grad()
def fused_rollout(model, batch: dict, chunk: int, temperature: float, with_reward: bool = False) -> Rollout:
    """Policy, reference (and reward) rows of each chunk in ONE forward of the base, one adapter per row.

    The decoder body runs once over [policy rows; reference rows; (reward rows); (critic rows)]; the model's
    own output layer (with its logit post-processing) then runs on the policy and reference rows' last R+1
    positions only, the value head on the policy rows (or on the critic rows when the critic is an adapter
    of its own), the reward head on the reward rows' scoring position. Run it in eval mode (dropout off), so
    the numbers are those of the separate passes (tests compare them).
    """
    peft_model = model.pretrained_model
    causal_lm = peft_model.get_base_model()
    width, mask, targets = response_view(batch)
    critic = model.critic_adapter  # None: the value head reads the policy rows
    roles = fused_roles(model, with_reward)
    parts = []
    for rows in torch.arange(mask.shape[0], device=mask.device).split(chunk):
        n = len(rows)
        ids, attention, positions = (batch[k][rows].repeat(len(roles), 1)
                                     for k in ("input_ids", "attention_mask", "position_ids"))
        with adapter_rows(peft_model, fixed_rows([name for name in roles for _ in range(n)])):
            # logits of the policy + reference rows at the response positions; hidden [len(roles)*n, W, H]
            logits, hidden = causal_lm_rows(causal_lm, 2 * n, width + 1, input_ids=ids, attention_mask=attention,
                                            position_ids=positions)
        logprobs, log_probs = logprobs_at_responses(logits[:n], targets[rows], temperature)
        ref_logprobs, _ = logprobs_at_responses(logits[n:2 * n], targets[rows], temperature)
        value_rows = hidden[-n:] if critic else hidden[:n]
        values = model.v_head(value_rows[:, -width - 1:-1])
        scores = None
        if with_reward:
            reward_hidden = hidden[2 * n:3 * n]
            at = model.reward_token_index(ids[2 * n:3 * n], attention[2 * n:3 * n])
            picked = reward_hidden[torch.arange(n, device=at.device), at]  # [n,H]
            scores = model.reward_head(picked.to(model.reward_head.weight.dtype)).squeeze(-1).float()
        parts.append((logprobs, values, ref_logprobs, entropy_from_log_probs(log_probs), scores))
    logprobs, values, ref_logprobs, entropy, scores = zip(*parts)
    return Rollout(torch.cat(logprobs), torch.cat(values), torch.cat(ref_logprobs), torch.cat(entropy), mask,
                   torch.cat(scores) if with_reward else None)
