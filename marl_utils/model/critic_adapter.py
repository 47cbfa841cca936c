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
the same per-layer mechanism (`LoraLayer.forward(..., adapter_names=...)`), and must stay active through
the backward pass when HF gradient checkpointing recomputes layers there.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

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


def lora_layers(peft_model) -> list:
    from peft.tuners.lora import LoraLayer

    return [module for module in peft_model.modules() if isinstance(module, LoraLayer)]


@contextlib.contextmanager
def critic_rows(model, policy_name: str, critic_name: str):
    """Inside, every LoRA layer treats the first half of its batch as policy rows, the second as critic rows."""
    def inject(module, args, kwargs):
        rows = (args[0] if args else next(iter(kwargs.values()))).shape[0]
        kwargs["adapter_names"] = [policy_name] * (rows // 2) + [critic_name] * (rows - rows // 2)
        return args, kwargs

    layers = lora_layers(model.pretrained_model)
    handles = [layer.register_forward_pre_hook(inject, with_kwargs=True) for layer in layers]
    model._critic_rows_active = True
    try:
        yield
    finally:
        model._critic_rows_active = False
        for handle in handles:
            handle.remove()


def uses_gradient_checkpointing(model) -> bool:
    return any(getattr(module, "gradient_checkpointing", False) for module in model.pretrained_model.modules())


def policy_logits_and_critic_values(model, input_ids, attention_mask, position_ids, logits_to_keep: int = 0):
    """(policy logits [B,K,V] float32, critic values [B,T] float32): one forward over the rows stacked twice."""
    causal_lm = model.pretrained_model.get_base_model()
    body, lm_head = causal_lm.base_model, causal_lm.get_output_embeddings()
    rows = input_ids.shape[0]
    stack = lambda t: None if t is None else torch.cat([t, t])  # noqa: E731
    context = contextlib.nullcontext()
    if not model._critic_rows_active:
        if uses_gradient_checkpointing(model) and torch.is_grad_enabled() and model.training:
            from ..infra.errors import MarlInputError

            raise MarlInputError("with critic='adapter' and gradient checkpointing, run forward AND backward inside "
                                 "`with model.critic_rows():` (the recomputation in backward needs it); PPOTrainer "
                                 "does this itself")
        context = critic_rows(model, model.active_adapter, model.critic_adapter_names[model.active_adapter])
    with context:
        hidden = body(input_ids=stack(input_ids), attention_mask=stack(attention_mask),
                      position_ids=stack(position_ids), use_cache=False).last_hidden_state
    policy_hidden = hidden[:rows] if not logits_to_keep else hidden[:rows, -logits_to_keep:]
    values = model.v_head(hidden[rows:])
    return lm_head(policy_hidden).float(), values


def copy_reward_head_into(value_head, reward_head) -> None:
    """Start a value head from the reward model's score head (weight, and bias where it has one)."""
    with torch.no_grad():
        value_head.linear.weight.copy_(reward_head.weight.float())
        if value_head.linear.bias is not None:
            value_head.linear.bias.copy_(reward_head.bias.float() if reward_head.bias is not None
                                         else torch.zeros_like(value_head.linear.bias))
