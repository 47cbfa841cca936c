"""One base model as policy, value function, reference and reward model (notebooks 03-05).

| role      | what it is on the one peft model                                          |
|-----------|---------------------------------------------------------------------------|
| policy    | a trainable LoRA adapter ("default"; more can be added by name)           |
| value     | a float32 `ValueHead` per policy adapter, on the policy's last hidden state (`critic="head"`) |
|           | or on the last hidden state of its own critic LoRA adapter (`critic="adapter"`, critic.py)   |
| reference | the same base with every adapter disabled (`model.reference()`)          |
| reward    | the frozen stage-2 LoRA adapter plus its score head (`compute_reward_score`) |

Usage (the seed's Quickstart, with `marl_utils` in place of `trl` and local folders for hub ids):

```python
from peft import LoraConfig
from marl_utils.modeling import AutoModelForCausalLMWithValueHead

lora_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
model = AutoModelForCausalLMWithValueHead.from_pretrained(
    "out/tiny/sft",                            # the stage-1 model (or a hub id)
    peft_config=lora_config,                   # the PPO adapter
    reward_adapter="out/tiny/reward_adapter",  # the stage-2 adapter (or a hub id)
    load_in_8bit=True,                         # optional; or load_in_4bit=True
)
inputs = tokenizer(texts, return_tensors="pt", padding=True)
rewards = model.compute_reward_score(**inputs)                            # [B]: one score per text
lm_logits, loss, values = model(**inputs)                                 # values: [B, T]
model.add_policy_adapter("policy_1", lora_config)
rewards = model.compute_reward_score(**inputs, ppo_adapter_name="policy_1")  # then policy_1 is active
with torch.no_grad(), model.reference():                                  # adapters off
    ref_logits = model.pretrained_model(**inputs).logits
model.save_pretrained("out/tiny/ppo")  # policy adapters + value heads; reload with from_pretrained
```

Where the historic TRL class was a trap, this one differs on purpose: the reward is read at the last
NON-PAD token of each row (not at index -1), the adapter, `requires_grad` flags and train/eval mode are
restored after scoring even when the forward raises, `ppo_adapter_name` is honoured, and 4-bit bases stay
trainable on CPUs with avx512_bf16 (see `quantization.py`). `from_pretrained` returns the model in eval
mode (like transformers); call `model.train()` before a training step.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_dir
from .critic import (adapter_parameters, check_critic_supported, critic_adapter_name, critic_rows,
                     policy_logits_and_critic_values)
from .errors import MarlInputError
from .model_loading import (MODEL_FILE, VALUE_HEADS_FILE, check_adapter_name, lora_config_for_causal_lm,
                            load_model)
from .reward_adapter import eos_ids
from .value_head import ValueHead, hidden_and_vocab_size

__all__ = ["AutoModelForCausalLMWithValueHead", "ValueHead", "position_ids_from_mask", "last_token_index"]



def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: [0,0,1,1] -> [0,0,0,1]; a padded row then matches itself unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the last attended token of each row, for left and right padding alike."""
    width = attention_mask.shape[-1]
    return width - 1 - attention_mask.long().flip(-1).argmax(-1)


def last_non_pad_index(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """[B] index of the rightmost token whose id is not `pad_token_id`: where HF's *ForSequenceClassification
    reads its score. With pad == EOS that is the token BEFORE a trailing EOS, where such a head was trained."""
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1)


class AutoModelForCausalLMWithValueHead(nn.Module):
    """A causal LM wrapped in peft: LoRA policy adapter(s) with value heads, reference and reward adapter."""

    def __init__(self, pretrained_model, policy_adapter_names, *, reward_adapter_name=None, reward_head=None,
                 value_head_dropout: float = 0.0, is_trainable: bool = True, active_adapter=None,
                 critic_adapter_names: dict | None = None, reward_pad_token_id=None, reward_eos_token_ids=()):
        super().__init__()
        self.pretrained_model = pretrained_model  # peft.PeftModel over the causal LM
        self.policy_adapter_names = list(policy_adapter_names)
        # policy name -> its critic adapter; empty with critic="head" (value head on the policy's hidden state)
        self.critic_adapter_names = dict(critic_adapter_names or {})
        self._critic_rows_active = False
        self.reward_adapter_name = reward_adapter_name
        self.reward_head = reward_head  # frozen float32 Linear(hidden, 1), or None
        # the pad id (and EOS) the reward adapter was trained with, from the tokenizer saved with it; None: unknown,
        # then a PPOTrainer fills in its tokenizer's, else the base config's counts (`reward_token_index`)
        self.reward_pad_token_id, self.reward_eos_token_ids = reward_pad_token_id, tuple(reward_eos_token_ids)
        self.value_head_dropout = value_head_dropout
        self.is_trainable = is_trainable
        hidden, _ = hidden_and_vocab_size(self.config)
        device = self._head_device()
        self.v_heads = nn.ModuleDict({name: ValueHead(hidden, value_head_dropout).to(device)
                                      for name in self.policy_adapter_names})
        self._active_policy = active_adapter or self.policy_adapter_names[0]
        self.set_policy_adapter(self._active_policy)

    @property
    def config(self):
        """The base model's config."""
        return self.pretrained_model.get_base_model().config

    @property
    def v_head(self) -> ValueHead:
        """The value head of the active policy adapter."""
        return self.v_heads[self._active_policy]

    @property
    def critic(self) -> str:
        """"head": values from the policy's last hidden state; "adapter": from a critic adapter of its own."""
        return "adapter" if self.critic_adapter_names else "head"

    @property
    def critic_adapter(self) -> str | None:
        """The critic adapter of the active policy (None with critic="head")."""
        return self.critic_adapter_names.get(self._active_policy)

    def critic_rows(self):
        """Context: forwards (and the backward that may recompute them) run policy rows + critic rows stacked.

        PPOTrainer holds it over its PPO epochs; a direct `model(...)` call enters it for itself.
        """
        return critic_rows(self, self._active_policy, self.critic_adapter)

    @property
    def active_adapter(self) -> str:
        """The active policy adapter (also while the reward adapter is briefly switched on for scoring)."""
        return self._active_policy

    @property
    def device(self) -> torch.device:
        return self._head_device()

    def _head_device(self) -> torch.device:
        # Heads read the last hidden state, which lives where the output layer lives (also with device_map).
        output = self.pretrained_model.get_base_model().get_output_embeddings()
        return next((output if output is not None else self.pretrained_model).parameters()).device

    # ---------------------------------------------------------------- policy forward / generation
    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep: int = 0, **kwargs):
        """(lm_logits [B,T,V] float32, loss or None, values [B,T] float32) with the active policy adapter.

        Inputs may live on any device; outputs are on the model's device. `logits_to_keep=K > 0` computes the
        logits of the last K positions only ([B,K,V]): PPO needs them at the response tokens alone, which
        end every left-padded row, and the vocabulary projection is the largest matmul of a small model.
        """
        input_ids, attention_mask, position_ids = self._on_input_device(input_ids, attention_mask, position_ids)
        if position_ids is None and attention_mask is not None:
            position_ids = position_ids_from_mask(attention_mask)
        kwargs.pop("return_dict", None)
        kwargs.pop("output_hidden_states", None)
        kwargs.setdefault("use_cache", False)  # a training forward needs no KV cache
        if self.critic_adapter is not None:
            return self._forward_with_critic_adapter(input_ids, attention_mask, position_ids, logits_to_keep, kwargs)
        if logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        out = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    output_hidden_states=True, return_dict=True, **kwargs)
        values = self.v_head(out.hidden_states[-1])  # last hidden state (after the final norm)
        return out.logits.float(), out.loss, values

    def _forward_with_critic_adapter(self, input_ids, attention_mask, position_ids, logits_to_keep, kwargs):
        labels = kwargs.pop("labels", None)
        logits, values = policy_logits_and_critic_values(self, input_ids, attention_mask, position_ids, logits_to_keep)
        loss = None
        if labels is not None:  # the language-model loss of the policy rows, as the causal LM computes it
            targets = labels.to(logits.device)[:, -logits.shape[1]:][:, 1:]
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss, values

    def _on_input_device(self, *tensors):
        """Move token tensors to where the embeddings are (None stays None): callers may pass CPU tensors."""
        device = self.pretrained_model.get_base_model().get_input_embeddings().weight.device
        return tuple(t.to(device) if torch.is_tensor(t) else t for t in tensors)  # a no-op when already there

    def generate(self, *args, **kwargs):
        """`generate` of the peft model: samples with the active policy adapter."""
        return self.pretrained_model.generate(*args, **kwargs)

    # ---------------------------------------------------------------- reference policy
    @contextlib.contextmanager
    def reference(self):
        """All adapters disabled: the peft model is the plain base (the reference policy). Use with no_grad.

        peft re-enables adapters on exit by re-activating them, which makes the active adapter trainable
        again (even one loaded with is_trainable=False); every requires_grad flag is restored here.
        """
        with self._preserved_state(), self.pretrained_model.disable_adapter():
            yield self.pretrained_model

    @torch.no_grad()
    def reference_logits(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """[B,T,V] float32 logits of the reference policy, in eval mode (no dropout), no gradients."""
        input_ids, attention_mask, position_ids = self._on_input_device(input_ids, attention_mask, position_ids)
        if position_ids is None and attention_mask is not None:
            position_ids = position_ids_from_mask(attention_mask)
        with self._preserved_state(), self.reference():
            self.eval()
            out = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask,
                                        position_ids=position_ids, use_cache=False)
        return out.logits.float()

    # ---------------------------------------------------------------- reward model
    @torch.no_grad()
    def compute_reward_score(self, input_ids, attention_mask=None, ppo_adapter_name=None, per_token=False, **kwargs):
        """[B] float32 reward of each row, read at its last real token (left or right padding).

        "Last real token" is where the reward head was trained to be read: the last attended token; or, when
        the pad id the reward adapter was trained with is an EOS (TRL's RewardTrainer sets pad = EOS on
        tokenizers without a pad token), the last token that is not pad, as HF's *ForSequenceClassification
        reads it (the token before a trailing EOS); that pad id is `reward_pad_token_id`. Runs the reward
        adapter and its score head in eval mode without gradients. Inputs may live on any device; the scores
        are on the model's device. Afterwards the policy adapter `ppo_adapter_name` (default: the one active
        before) is active, and every `requires_grad` flag and train/eval mode is as before, also if the
        forward raises. `per_token=True` returns the [B,T] scores of every position instead (position t
        scores the prefix up to t; pad positions are junk).
        """
        if self.reward_adapter_name is None:
            raise MarlInputError("this model has no reward adapter: pass reward_adapter=<stage-2 folder or hub id> to "
                                 "AutoModelForCausalLMWithValueHead.from_pretrained")
        policy_after = self._check_policy_name(ppo_adapter_name) if ppo_adapter_name is not None else self._active_policy
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = kwargs.pop("position_ids", None)
        input_ids, attention_mask, position_ids = self._on_input_device(input_ids, attention_mask, position_ids)
        empty = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
        if empty:
            raise MarlInputError(f"rows {empty} of attention_mask are all zeros: there is no token to score")
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        with self._preserved_state():
            self.eval()
            self.pretrained_model.set_adapter(self.reward_adapter_name, inference_mode=True)
            hidden = self._last_hidden_state(input_ids, attention_mask, position_ids, **kwargs)  # [B,T,H]
            scores = self.reward_head(hidden.to(self.reward_head.weight.dtype)).squeeze(-1)  # [B,T]
        if policy_after != self._active_policy:
            self.set_policy_adapter(policy_after)
        if per_token:
            return scores
        return scores.gather(-1, self.reward_token_index(input_ids, attention_mask).unsqueeze(-1)).squeeze(-1)

    def reward_token_index(self, input_ids, attention_mask) -> torch.Tensor:
        """[B] position whose hidden state the reward head reads (see `compute_reward_score`). The pad id is the
        adapter's training pad, `reward_pad_token_id`; only when that is unknown the base config's, which on
        the Hub often has none (gpt2, Qwen2.5) although the reward trainer padded with EOS."""
        pad = self.reward_pad_token_id if self.reward_pad_token_id is not None else self.config.pad_token_id
        if pad is not None and pad in eos_ids(self.config.eos_token_id) | eos_ids(self.reward_eos_token_ids):
            return last_non_pad_index(input_ids, pad)
        return last_token_index(attention_mask)

    def _last_hidden_state(self, input_ids, attention_mask, position_ids, **kwargs) -> torch.Tensor:
        # The body alone, as AutoModelForSequenceClassification runs it: no [B,T,V] logits to compute.
        causal_lm = self.pretrained_model.get_base_model()
        body = causal_lm.base_model
        kwargs.setdefault("use_cache", False)
        if body is causal_lm:
            out = causal_lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            output_hidden_states=True, return_dict=True, **kwargs)
            return out.hidden_states[-1]
        return body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    return_dict=True, **kwargs).last_hidden_state

    @contextlib.contextmanager
    def _preserved_state(self):
        """Restore the active peft adapter, every requires_grad flag and every module's mode on exit.

        peft's `set_adapter` makes the adapter it activates trainable and freezes the others; without this,
        one reward call would leave the reward adapter trainable and the policy frozen.
        """
        grads = [(p, p.requires_grad) for p in self.parameters()]
        modes = [(m, m.training) for m in self.modules()]
        try:
            yield
        finally:
            if self.pretrained_model.active_adapter != self._active_policy:
                self.pretrained_model.set_adapter(self._active_policy, inference_mode=not self.is_trainable)
            for param, flag in grads:
                param.requires_grad_(flag)
            for module, mode in modes:
                module.training = mode

    # ---------------------------------------------------------------- several policies
    def _check_policy_name(self, name) -> str:
        if name not in self.policy_adapter_names and self._is_foreign_lora(name):
            self._adopt_policy_adapter(name)  # added with peft's own add_adapter, as the seed shows
        if name not in self.policy_adapter_names:
            extra = " (that is the frozen reward adapter)" if name == self.reward_adapter_name else ""
            raise MarlInputError(f"no policy adapter named {name!r}{extra}; policy adapters: {self.policy_adapter_names}. "
                                 "Add one with model.add_policy_adapter(name, lora_config)")
        return name

    def _is_foreign_lora(self, name) -> bool:
        config = self.pretrained_model.peft_config.get(name) if isinstance(name, str) else None
        return (config is not None and name != self.reward_adapter_name
                and name not in self.critic_adapter_names.values()
                and str(getattr(config.peft_type, "value", config.peft_type)) == "LORA")

    def _adopt_policy_adapter(self, name: str) -> None:
        """A LoRA adapter added to `pretrained_model` with peft's `add_adapter` becomes a policy with a value head."""
        self._register_policy(name, self.pretrained_model.peft_config[name])

    def add_policy_adapter(self, name: str, lora_config, critic_peft_config=None) -> None:
        """A further policy adapter (with its own value head, and critic adapter with critic="adapter") on the same
        base; not active until selected."""
        check_adapter_name(name, set(self.pretrained_model.peft_config))
        lora_config = lora_config_for_causal_lm(lora_config, "lora_config")
        self.pretrained_model.add_adapter(name, lora_config)
        self._register_policy(name, lora_config, critic_peft_config)
        self.set_policy_adapter(self._active_policy)  # the new one stays frozen until it is selected
        check_critic_supported(self)

    def _register_policy(self, name: str, lora_config, critic_peft_config=None) -> None:
        self.policy_adapter_names.append(name)
        hidden, _ = hidden_and_vocab_size(self.config)
        self.v_heads[name] = ValueHead(hidden, self.value_head_dropout).to(self._head_device())
        if self.critic == "adapter":  # each policy gets a critic of its own (from scratch: the policy's LoRA config)
            critic = critic_adapter_name(name)
            check_adapter_name(critic, set(self.pretrained_model.peft_config))
            self.pretrained_model.add_adapter(critic, lora_config_for_causal_lm(
                critic_peft_config or lora_config, "critic_peft_config"))
            self.critic_adapter_names[name] = critic

    def set_policy_adapter(self, name: str) -> None:
        """Make `name` the active policy: only its LoRA weights and value head (and its critic adapter) are
        trainable afterwards."""
        self._check_policy_name(name)
        self.pretrained_model.set_adapter(name, inference_mode=not self.is_trainable)
        self._active_policy = name
        for head_name, head in self.v_heads.items():
            head.requires_grad_(self.is_trainable and head_name == name)
        for param in self.critic_parameters() if self.critic_adapter else []:
            param.requires_grad_(self.is_trainable)  # not peft's active adapter, trainable all the same
        if self.reward_head is not None:
            self.reward_head.requires_grad_(False)

    def policy_parameters(self, adapter_name=None) -> list:
        """The LoRA parameters of one policy adapter (default: the active one)."""
        name = self._check_policy_name(adapter_name if adapter_name is not None else self._active_policy)
        return adapter_parameters(self.pretrained_model, name)

    def critic_parameters(self, adapter_name=None) -> list:
        """The LoRA parameters of a policy's critic adapter (default: the active policy's); [] with critic="head".

        Not its parts of the output layer (LoRA on lm_head, a modules_to_save copy of it): the value head reads
        the critic's last hidden state, before that layer, so they get no gradient (and DDP wants none such).
        """
        name = self._check_policy_name(adapter_name if adapter_name is not None else self._active_policy)
        critic = self.critic_adapter_names.get(name)
        if not critic:
            return []
        output = self.pretrained_model.get_base_model().get_output_embeddings()
        unused = {id(param) for param in output.parameters()} if output is not None else set()
        return [param for param in adapter_parameters(self.pretrained_model, critic) if id(param) not in unused]

    def value_parameters(self) -> list:
        """What the value loss trains beyond the shared trunk: the value head, and the critic adapter if any."""
        return self.critic_parameters() + list(self.v_head.parameters())

    def trainable_parameters(self) -> list:
        """What PPO optimises: the active policy's LoRA parameters, its value head and critic adapter (frozen if
        is_trainable=False)."""
        return self.policy_parameters() + self.value_parameters()

    # ---------------------------------------------------------------- saving / loading
    def save_pretrained(self, save_directory) -> None:
        """Policy adapters in peft format, value heads in safetensors, and a small json (atomic)."""
        from safetensors.torch import save_file

        base_name = self.pretrained_model.get_base_model().name_or_path
        if base_name and os.path.isdir(base_name):
            base_name = str(Path(base_name).resolve())
        info = {
            "format": "marl_utils.AutoModelForCausalLMWithValueHead", "version": 1,
            "base_model_name_or_path": base_name, "policy_adapter_names": self.policy_adapter_names,
            "active_adapter": self._active_policy, "reward_adapter_name": self.reward_adapter_name,
            "value_head_dropout": self.value_head_dropout, "critic": self.critic,
            "critic_adapter_names": self.critic_adapter_names,
        }
        heads = {key: value.detach().cpu().contiguous() for key, value in self.v_heads.state_dict().items()}
        with atomic_dir(save_directory) as tmp:
            self.pretrained_model.save_pretrained(
                str(tmp), selected_adapters=self.policy_adapter_names + list(self.critic_adapter_names.values()))
            save_file(heads, str(tmp / VALUE_HEADS_FILE))
            (tmp / MODEL_FILE).write_text(json.dumps(info, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, peft_config=None, reward_adapter=None,
                        reward_adapter_name: str = "reward_adapter", policy_adapter_name: str = "default",
                        load_in_8bit: bool = False, load_in_4bit: bool = False, quantization_config=None,
                        value_head_dropout: float = 0.0, is_trainable: bool = True, critic: str = "head",
                        critic_peft_config=None, critic_init: str | None = None, **kwargs):
        """Load the base (hub id, folder, model object, or a folder from `save_pretrained`) and its adapters.

        `critic="head"` puts the value head on the policy's last hidden state; `critic="adapter"` gives each
        policy a critic LoRA adapter of its own (config `critic_peft_config`, default: the policy's), whose
        last hidden state the value head reads; `critic_init="reward_adapter"` starts that critic (LoRA and
        head) as a copy of the reward adapter. `value_head_dropout` acts in PPO's training forward only (the
        rollout's values are computed without it). All input checks, including the reward adapter's files against
        the base's config, run before any weights load. `**kwargs` go to `AutoModelForCausalLM.from_pretrained`
        (dtype, device_map, revision...).
        """
        return load_model(cls, pretrained_model_name_or_path, peft_config=peft_config, reward_adapter=reward_adapter,
                          reward_adapter_name=reward_adapter_name, policy_adapter_name=policy_adapter_name,
                          load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit,
                          quantization_config=quantization_config, value_head_dropout=value_head_dropout,
                          is_trainable=is_trainable, critic=critic, critic_peft_config=critic_peft_config,
                          critic_init=critic_init, **kwargs)

