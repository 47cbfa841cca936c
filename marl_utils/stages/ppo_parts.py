"""The PPO parts, built one way for every caller: the model (policy + value head + reward adapter on ONE base),
tokenizer, `PPOConfig` and prompts from a profile (`marl ppo`, `marl grpo`, notebooks 03-07).

Stages 1-2 are trained first where they are missing (`ensure_earlier_stages`), and bad settings are refused
before any training starts (`check_ppo_settings`).
"""

from __future__ import annotations

from pathlib import Path

from ..infra.errors import MarlInputError
from ..infra.profiles import TINY_BASE, Profile
from ..infra.runs import stage_dir


def policy_lora_config(profile: Profile):
    from peft import LoraConfig

    return LoraConfig(r=profile.ppo_lora_r, lora_alpha=profile.ppo_lora_alpha, lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM",
                      target_modules=list(profile.lora_target_modules) if profile.lora_target_modules else None)


def ppo_config(profile: Profile, seed: int = 0, steps: int | None = None):
    """The profile's PPO sizes as a `PPOConfig`."""
    from ..ppo.config import PPOConfig

    return PPOConfig(
        seed=seed,
        steps=steps or profile.ppo_steps,
        learning_rate=profile.ppo_learning_rate,
        batch_size=profile.ppo_batch_size,
        mini_batch_size=profile.ppo_mini_batch_size,
        ppo_epochs=profile.ppo_epochs,
        init_kl_coef=profile.ppo_init_kl_coef,
        target_kl=profile.ppo_target_kl,
        horizon=profile.ppo_kl_horizon,
        max_new_tokens=profile.ppo_max_new_tokens,
        # the anti-collapse guard (PPOConfig); capped so that a test may shrink ppo_max_new_tokens alone
        min_response_tokens=min(profile.ppo_min_response_tokens, profile.ppo_max_new_tokens),
        value_head_learning_rate=profile.ppo_value_head_learning_rate,
        save_every=profile.ppo_save_every,
    )


def context_size(profile: Profile, out: Path) -> int | None:
    """The base's context length when it can be read without loading weights or going online, else None."""
    sft = stage_dir(out, "sft")
    if not (sft / "config.json").exists() and profile.base_model == TINY_BASE:
        return profile.tiny_model.get("max_position_embeddings")  # the tiny base is built with these sizes
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(sft if (sft / "config.json").exists() else profile.base_model,
                                            local_files_only=True)
    except (OSError, ValueError):  # not cached yet: build_ppo_parts checks the prompts again once it has the model
        return None
    return getattr(config, "max_position_embeddings", None)


def check_ppo_settings(profile: Profile, out: Path, seed: int = 0, steps: int | None = None) -> None:
    """Reject PPO sizes that cannot work before stages 1-2 train, not after them."""
    try:
        ppo_config(profile, seed, steps)  # PPOConfig checks batch vs minibatch sizes and every other number
    except MarlInputError as err:
        raise MarlInputError(f"profile {profile.name!r}: {err} (the profile's ppo_* fields)") from None
    lo, hi = profile.ppo_prompt_tokens
    if lo < 1 or hi < lo:
        raise MarlInputError(f"ppo_prompt_tokens=({lo}, {hi}) is invalid; need 1 <= min <= max")
    context = context_size(profile, out)
    if context is not None and hi + profile.ppo_max_new_tokens > context:
        raise MarlInputError(f"prompts of up to {hi} tokens plus {profile.ppo_max_new_tokens} new tokens do not fit "
                             f"the model's context of {context} tokens; lower the profile's ppo_prompt_tokens or "
                             "ppo_max_new_tokens")


def ensure_earlier_stages(profile: Profile, out: Path, dataset=None, seed: int = 0, progress: bool = True):
    """Return (sft_dir, reward_dir), training whichever is missing."""
    from .reward import train_reward_adapter
    from .sft import train_sft

    sft = train_sft(profile, out, dataset, seed=seed, progress=progress)
    reward = train_reward_adapter(profile, out, dataset, seed=seed, progress=progress)
    return sft, reward


def build_ppo_parts(profile: Profile, out: Path, dataset=None, seed: int = 0, quantization: str | None = None,
                    steps: int | None = None, policy_adapter_name: str = "default", **model_options):
    """Model (policy + value head + reward adapter on one base), tokenizer, config and prompts.

    Notebooks 03-07 and `marl ppo` start from these parts, so they sample from the same prompts. `model_options`
    go to `AutoModelForCausalLMWithValueHead.from_pretrained` (notebook 06: `critic="adapter"`, ...); the same
    `seed` gives the same fresh policy adapter whatever they are.
    """
    import torch
    from transformers import AutoTokenizer

    from ..model.multi_adapter_model import AutoModelForCausalLMWithValueHead

    sft_dir, reward_dir = stage_dir(out, "sft"), stage_dir(out, "reward_adapter")
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        str(sft_dir), peft_config=policy_lora_config(profile), reward_adapter=str(reward_dir),
        load_in_8bit=quantization == "8bit", load_in_4bit=quantization == "4bit",
        policy_adapter_name=policy_adapter_name, **model_options,
    )
    prompts, eval_prompts = ppo_prompts(profile, tokenizer, dataset, seed, steps,
                                        max_context=getattr(model.config, "max_position_embeddings", None))
    return model, tokenizer, ppo_config(profile, seed, steps), prompts, eval_prompts


def ppo_prompts(profile: Profile, tokenizer, dataset=None, seed: int = 0, steps: int | None = None,
                max_context: int | None = None):
    """(training prompts, held-out prompts): review openings cut at `profile.ppo_prompt_tokens` tokens.

    The training pool holds 4 batches' worth of prompts per step (at least 256; fewer if the dataset runs out), so
    a run rarely sees a prompt twice; the held-out prompts come from the test split.
    """
    from ..data.loading import load_imdb
    from ..data.prompts import load_prompts

    data = load_imdb(dataset or profile.dataset, seed=seed)
    lo, hi = profile.ppo_prompt_tokens
    prompts = load_prompts(data["train"]["text"], tokenizer, min_tokens=lo, max_tokens=hi, seed=seed,
                           n=max(4 * profile.ppo_batch_size * (steps or profile.ppo_steps), 256),
                           max_context=max_context)
    eval_prompts = load_prompts(data["test"]["text"], tokenizer, min_tokens=lo, max_tokens=hi, seed=seed + 1,
                                n=profile.ppo_eval_prompts, max_context=max_context)
    return prompts, eval_prompts
