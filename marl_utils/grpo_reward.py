"""The stage-2 reward adapter as a reward function for TRL's GRPOTrainer and RLOOTrainer (notebook 07).

TRL scores completions with reward functions, callables it calls as

    reward_func(prompts=[str], completions=[str], completion_ids=[[int]], **dataset_columns) -> [float]

or with a separate sequence-classification model. Neither puts the reward model on the policy's own
base. `reward_adapter_reward(model, tokenizer)` is such a callable built on the ONE multi-adapter model:
each call switches the same peft model that TRL trains to the frozen reward adapter, scores without
gradients at the last real token, and switches back (`compute_reward_score` does all of that and restores
every `requires_grad` flag and train/eval mode, also if the forward raises).

What it scores are the token ids TRL sampled: the prompt tokenized exactly as TRL tokenizes it for
generation, followed by `completion_ids` (cut after EOS by TRL, EOS kept). Decoding the completion and
tokenizing the text again could give other ids than the ones the policy is trained on.
"""

from __future__ import annotations

import torch

from .errors import MarlInputError
from .ppo_core import build_rollout_batch

MARL_MODEL_HINT = ("build it from the marl_utils.AutoModelForCausalLMWithValueHead that holds the reward adapter "
                   "(from_pretrained(sft_dir, peft_config=..., reward_adapter=reward_dir)) and give TRL that "
                   "model's `pretrained_model`")


def unwrap_model(model):
    """The module inside DDP / DeepSpeed (`.module`) and torch.compile (`._orig_mod`) wrappers, however nested."""
    while True:
        inner = getattr(model, "module", None)
        if isinstance(inner, torch.nn.Module):
            model = inner
            continue
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module):
            model = inner
            continue
        return model


def marl_model_of(model):
    """The multi-adapter model behind `model` (itself, or inside wrappers), or a clear error."""
    inner = unwrap_model(model)
    if hasattr(inner, "compute_reward_score") and hasattr(inner, "pretrained_model"):
        return inner
    if hasattr(inner, "peft_config"):
        raise MarlInputError(f"got a {type(inner).__name__}: a peft model alone has no reward score head (it lives on "
                             f"the multi-adapter model next to the peft model); {MARL_MODEL_HINT}")
    raise MarlInputError(f"the reward function needs the multi-adapter model, got {type(inner).__name__}; "
                         f"{MARL_MODEL_HINT}")


def _token_tensor(ids, device) -> torch.Tensor:
    ids = ids if torch.is_tensor(ids) else torch.tensor(list(ids), dtype=torch.long)
    return ids.to(device=device, dtype=torch.long).flatten()


class RewardAdapterReward:
    """A TRL reward function: scores prompt + completion with the reward adapter on the policy's own base.

    Returns one float per completion (the reward adapter's score at its last real token, exactly the number
    `model.compute_reward_score` gives for the same ids). Afterwards the policy adapter is active again and
    trainable, everything else is frozen, and every module's train/eval mode is as before (TRL reads
    `model.training` to tell a training step from an evaluation).
    """

    __name__ = "reward_adapter"  # TRL logs the function's rewards as rewards/<__name__>/mean

    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model = marl_model_of(model)
        if self.model.reward_adapter_name is None:
            raise MarlInputError("this model has no reward adapter, so there is nothing to score with: load it with "
                                 "AutoModelForCausalLMWithValueHead.from_pretrained(sft_dir, peft_config=..., "
                                 "reward_adapter=<the stage-2 folder, OUT/reward_adapter>)")
        if tokenizer.pad_token_id is None:
            raise MarlInputError("the tokenizer has no pad token: set one first, e.g. tokenizer.pad_token = "
                                 "tokenizer.eos_token (safe: masks are built from lengths)")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise MarlInputError(f"batch_size={batch_size!r} must be a positive integer (rows per reward forward)")
        self.tokenizer, self.batch_size = tokenizer, batch_size
        if self.model.reward_pad_token_id is None:  # as PPOTrainer: no tokenizer was saved with the adapter
            self.model.reward_pad_token_id = tokenizer.pad_token_id

    @property
    def peft_model(self):
        """The peft model the reward adapter lives on: the one TRL must train."""
        return self.model.pretrained_model

    def check_trains(self, trained_model) -> None:
        """Refuse to score for a trainer whose model is not the one holding this reward adapter.

        Scores from the adapter on another copy of the base would still look like numbers, but the policy TRL
        trains would not be the one they judge, and the "one base" saving would be gone.
        """
        inner = unwrap_model(trained_model)
        if hasattr(inner, "compute_reward_score"):
            inner = inner.pretrained_model
        if inner is not self.peft_model:
            raise MarlInputError(f"TRL would train a {type(inner).__name__} that is not the peft model holding the "
                                 "reward adapter (another model, or another copy of the base): the reward must come "
                                 f"from the base being trained; {MARL_MODEL_HINT}")

    def __call__(self, prompts, completions=None, completion_ids=None, **kwargs) -> list[float]:
        if completion_ids is None:
            raise MarlInputError("the reward adapter scores token ids: call it as TRL does, with completion_ids=")
        if len(prompts) != len(completion_ids):
            raise MarlInputError(f"got {len(prompts)} prompts but {len(completion_ids)} completions; TRL passes one "
                                 "prompt per completion (each prompt repeated num_generations times)")
        if any(not isinstance(p, str) for p in prompts):
            raise MarlInputError("the reward adapter scores plain-text prompts; conversational prompts (lists of "
                                 "messages) would need the chat template the reward adapter was not trained with")
        # The same call TRL's GRPOTrainer/RLOOTrainer make before generating, so these are the sampled prompt ids.
        prompt_ids = self.tokenizer(text=list(prompts))["input_ids"]
        return self.score_ids(prompt_ids, completion_ids).tolist()

    def score_ids(self, prompt_ids, completion_ids) -> torch.Tensor:
        """[N] float32 scores (on the CPU) of prompt_ids[i] + completion_ids[i], lists of token ids."""
        policy = self.peft_model.active_adapter
        if policy not in self.model.policy_adapter_names:
            raise MarlInputError(f"adapter {policy!r} is active on the peft model, not a policy adapter "
                                 f"({self.model.policy_adapter_names}); the reward call would switch to "
                                 "the wrong adapter afterwards")
        device = self.model.device
        scores = []
        for start in range(0, len(prompt_ids), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            queries = [_token_tensor(ids, device) for ids in prompt_ids[chunk]]
            responses = [_token_tensor(ids, device) for ids in completion_ids[chunk]]
            empty = [start + i for i, (q, r) in enumerate(zip(queries, responses)) if len(q) + len(r) == 0]
            if empty:
                raise MarlInputError(f"rows {empty} have neither prompt nor completion tokens: nothing to score")
            # Left padding with position ids from the mask: the batch layout PPOTrainer.score uses, so PPO, GRPO
            # and RLOO read the reward adapter the same way.
            batch = build_rollout_batch(queries, responses, self.tokenizer.pad_token_id)
            scores.append(self.model.compute_reward_score(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], ppo_adapter_name=policy))
        return torch.cat(scores).float().cpu() if scores else torch.zeros(0)


def reward_adapter_reward(model, tokenizer, batch_size: int = 64) -> RewardAdapterReward:
    """A reward function for TRL's GRPOTrainer / RLOOTrainer that scores with the model's own reward adapter.

    `model`: the `AutoModelForCausalLMWithValueHead` holding policy and reward adapter (also inside a DDP or
    torch.compile wrapper). Give TRL `model.pretrained_model` to train; `build_trainer` in `marl_utils.grpo`
    does that and checks it.
    """
    return RewardAdapterReward(model, tokenizer, batch_size=batch_size)
