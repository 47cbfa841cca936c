"""The critic as its own LoRA adapter on the one base, next to the policy (notebook 06).

With `critic="head"` (the default, as in TRL's old MARL) the value function is a head on the POLICY's last
hidden state: the value loss also trains the policy adapter, a shared trunk. With `critic="adapter"` each
policy adapter P gets a critic adapter `P_critic` of its own on the same frozen base, and the value head reads
the critic's last hidden state; `critic_init="reward_adapter"` starts the critic from a copy of the reward
adapter (LoRA weights and score head), which already knows what makes a review score well.

One training forward serves both: the minibatch's rows are stacked twice, [policy rows; critic rows], and
each LoRA layer adds the policy adapter to the first half and the critic adapter to the second (peft's
per-row `adapter_names`). The policy loss reads logits of the first half, the value loss values of the
second, so no gradient crosses between them, and DDP sees one forward and one backward per minibatch.
peft refuses per-row adapters in training mode in its own entry point; `critic_rows` injects them with
the same per-layer mechanism (adapter_rows.py), also into `modules_to_save` copies (the critic's rows use the
critic's copy, so the value loss never reaches the policy's), and must stay active through the backward pass
when HF gradient checkpointing recomputes layers there. Only policy rows reach the output layer: a LoRA on
`lm_head` gives policy logits from the policy's lm_head. Where peft cannot route a layer per row (DoRA, a
modules_to_save copy of a norm), critic="adapter" is refused when the model is built.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .adapter_rows import adapter_rows, causal_lm_rows, per_row_problem

CRITIC_SUFFIX = "_critic"


def critic_adapter_name(policy_name: str) -> str:
    """The critic adapter of policy `policy_name` (e.g. "default" -> "default_critic")."""
    return policy_name + CRITIC_SUFFIX


def adapter_parameters(peft_model, name: str) -> list:
    """Every parameter of adapter `name` in a peft model (LoRA matrices, and modules_to_save copies)."""
    params, seen = [], set()
    for module in peft_model.modules():
        containers = [getattr(module, attr, None) for attr in getattr(module, "adapter_layer_names", ())]
        saved = getattr(module, "modules_to_save", None)  # peft's ModulesToSaveWrapper
        if isinstance(saved, nn.ModuleDict):
            containers.append(saved)
        for container in containers:
            if container is None or name not in container:
                continue
            item = container[name]
            for param in item.parameters() if isinstance(item, nn.Module) else [item]:
                if id(param) not in seen:
                    seen.add(id(param))
                    params.append(param)
    return params


@contextlib.contextmanager
def critic_rows(model, policy_name: str, critic_name: str):
    """Inside, every LoRA layer and modules_to_save copy treats the first half of its batch as policy rows, the
    second as critic rows; the output layer sees policy rows only (`policy_logits_and_critic_values`)."""
    def names_for(rows, is_output):
        if is_output:
            return [policy_name] * rows
        return [policy_name] * (rows // 2) + [critic_name] * (rows - rows // 2)

    model._critic_rows_active = True
    try:
        with adapter_rows(model.pretrained_model, names_for):
            yield
    finally:
        model._critic_rows_active = False


def critic_problem(model) -> str | None:
    """None when the stacked [policy; critic] forward can route every layer per row, else why not."""
    if not model.critic_adapter_names:
        return None
    for policy, critic in model.critic_adapter_names.items():
        why = per_row_problem(model.pretrained_model, [policy, critic])
        if why:
            return why
    return None


def check_critic_supported(model) -> None:
    """critic='adapter' needs per-row adapters in training; refuse clearly where peft cannot give them."""
    why = critic_problem(model)
    if why:
        from .errors import MarlInputError

        raise MarlInputError(f"critic='adapter' runs policy and critic rows in one forward, one adapter per row, and "
                             f"that cannot work with this model: {why}. Use critic='head', or LoraConfigs without "
                             "use_dora and without modules_to_save on non-Linear layers for the policy and critic")


def uses_gradient_checkpointing(model) -> bool:
    return any(getattr(module, "gradient_checkpointing", False) for module in model.pretrained_model.modules())


def policy_logits_and_critic_values(model, input_ids, attention_mask, position_ids, logits_to_keep: int = 0):
    """(policy logits [B,K,V] float32, critic values [B,T] float32): one forward over the rows stacked twice."""
    causal_lm = model.pretrained_model.get_base_model()
    rows = input_ids.shape[0]
    stack = lambda t: None if t is None else torch.cat([t, t])  # noqa: E731
    context = contextlib.nullcontext()
    if not model._critic_rows_active:
        if uses_gradient_checkpointing(model) and torch.is_grad_enabled() and model.training:
            from .errors import MarlInputError

            raise MarlInputError("with critic='adapter' and gradient checkpointing, run forward AND backward inside "
                                 "`with model.critic_rows():` (the recomputation in backward needs it); PPOTrainer "
                                 "does this itself")
        context = critic_rows(model, model.active_adapter, model.critic_adapter_names[model.active_adapter])
    with context:  # the model's own output layer on the policy rows: its logit post-processing included
        logits, hidden = causal_lm_rows(causal_lm, rows, logits_to_keep, input_ids=stack(input_ids),
                                        attention_mask=stack(attention_mask), position_ids=stack(position_ids))
    values = model.v_head(hidden[rows:])
    return logits.float(), values


def copy_reward_head_into(value_head, reward_head) -> None:
    """Start a value head from the reward model's score head (weight, and bias where it has one)."""
    with torch.no_grad():
        value_head.linear.weight.copy_(reward_head.weight.float())
        if value_head.linear.bias is not None:
            value_head.linear.bias.copy_(reward_head.bias.float() if reward_head.bias is not None
                                         else torch.zeros_like(value_head.linear.bias))
