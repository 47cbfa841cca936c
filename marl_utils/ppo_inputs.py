"""What PPOTrainer checks before it samples or updates: sampling settings, lengths, and step() inputs.

Every check raises `MarlInputError` with what was wrong and how to fix it, before any weight changes, so a
bad call never leaves a half-done update behind.
"""

from __future__ import annotations

import warnings

import torch

from .errors import MarlInputError

# Sampling settings that change the distribution tokens are drawn from, so that it is no longer the policy
# whose logprobs PPO uses: the KL estimate becomes biased (often negative) and the ratio is off.
BIASED_SAMPLING = {"top_k": (0, None), "top_p": (1.0, None), "min_length": (0, None), "min_new_tokens": (0, None),
                   "repetition_penalty": (1.0, None), "no_repeat_ngram_size": (0, None), "typical_p": (1.0, None)}


def check_trainer_inputs(config, model, tokenizer) -> None:
    """What PPOTrainer needs before it builds anything: our config, a tokenizer with a pad token, our model."""
    from .ppo_config import PPOConfig

    if not isinstance(config, PPOConfig):
        raise MarlInputError(f"config must be a marl_utils.PPOConfig, got {type(config).__name__}")
    if tokenizer.pad_token_id is None:
        raise MarlInputError("the tokenizer has no pad token: set one before building the trainer, e.g. "
                             "tokenizer.pad_token = tokenizer.eos_token (safe: masks are built from lengths)")
    if tokenizer.eos_token_id is None:
        warnings.warn("the tokenizer has no eos token: responses always run to max_new_tokens", stacklevel=3)
    for method in ("compute_reward_score", "trainable_parameters", "reference"):
        if not hasattr(model, method):
            raise MarlInputError(f"model must be a marl_utils.AutoModelForCausalLMWithValueHead (it lacks "
                                 f"{method}); got {type(model).__name__}")


def check_reward_model(reward_model) -> None:
    """A separate reward model must give one score per row and know its pad id (where it pools), or None."""
    if reward_model is None:
        return
    config = getattr(reward_model, "config", None)
    if config is None or getattr(config, "num_labels", None) != 1:
        raise MarlInputError(f"reward_model must be a sequence classifier with one output (num_labels=1), got "
                             f"{type(reward_model).__name__} with num_labels={getattr(config, 'num_labels', None)}; "
                             "load it with AutoModelForSequenceClassification.from_pretrained(..., num_labels=1)")
    if getattr(config, "pad_token_id", None) is None:
        raise MarlInputError("reward_model.config.pad_token_id is None: the classifier reads its score at the last "
                             "non-pad token and cannot find it; set reward_model.config.pad_token_id = "
                             "tokenizer.pad_token_id")


def generation_kwargs(config, gen_kwargs: dict, pad_token_id: int, eos_token_id: int) -> dict:
    """Plain sampling at the config's temperature, with the caller's overrides (warned about when biased)."""
    biased = {k: v for k, v in gen_kwargs.items() if k in BIASED_SAMPLING and v not in BIASED_SAMPLING[k]}
    if biased:
        warnings.warn(f"generation settings {biased} change the sampling distribution away from the policy: "
                      "the KL estimate and the PPO ratio become biased. Plain sampling (top_k=0, top_p=1.0, no "
                      "min length) is what PPO assumes; use min_response_tokens for short responses instead",
                      stacklevel=3)
    if gen_kwargs.get("temperature", config.temperature) != config.temperature:
        raise MarlInputError(f"temperature={gen_kwargs['temperature']} differs from PPOConfig.temperature="
                             f"{config.temperature}: logprobs use the config's value, so set it there")
    kwargs = dict(do_sample=True, top_k=0, top_p=1.0, typical_p=1.0, min_new_tokens=0,
                  repetition_penalty=1.0, no_repeat_ngram_size=0, temperature=config.temperature,
                  max_new_tokens=config.max_new_tokens, pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    kwargs.update(gen_kwargs)
    return kwargs


def check_context(model, length: int, what: str) -> None:
    # Past its context a learned-position model (GPT-2) fails with a bare IndexError; say why instead.
    context = getattr(model.config, "max_position_embeddings", None)
    if isinstance(context, int) and length > context:
        raise MarlInputError(f"{what} is {length} tokens, longer than the model's context of {context} tokens; "
                             "use shorter prompts (load_prompts(max_tokens=...)) or a smaller "
                             "PPOConfig.max_new_tokens")


def check_token_lists(sequences, name: str) -> None:
    for i, seq in enumerate(sequences):
        if not torch.is_tensor(seq) or seq.dim() != 1:
            shape = tuple(seq.shape) if torch.is_tensor(seq) else type(seq).__name__
            raise MarlInputError(f"{name}[{i}] must be a 1-D tensor of token ids, got {shape}; pass a list with "
                                 "one unpadded tensor per rollout")
        if len(seq) == 0:
            raise MarlInputError(f"{name}[{i}] is empty; every prompt and every response needs at least one token")


def check_step_inputs(model, queries, responses, scores, batch_size: int, device) -> torch.Tensor:
    """The scores of one PPO step as a float32 [B] tensor, after checking all three lists fit together."""
    for name, value in (("queries", queries), ("responses", responses)):
        if not isinstance(value, (list, tuple)):
            raise MarlInputError(f"{name} must be a list of 1-D token tensors, got {type(value).__name__}")
    if torch.is_tensor(scores):
        if scores.dim() != 1:
            raise MarlInputError(f"scores has shape {tuple(scores.shape)}: pass one scalar score per response, "
                                 f"as a list or a 1-D tensor of length {len(responses)}")
        scores = list(scores)
    if not isinstance(scores, (list, tuple)):
        raise MarlInputError(f"scores must be a list of scalars or a 1-D tensor, got {type(scores).__name__}")
    if not len(queries) == len(responses) == len(scores) == batch_size:
        raise MarlInputError(f"step() got {len(queries)} queries, {len(responses)} responses and {len(scores)} "
                             f"scores; each must be a list of PPOConfig.batch_size={batch_size}")
    check_token_lists(queries, "queries")
    check_token_lists(responses, "responses")
    check_context(model, max(len(q) + len(r) for q, r in zip(queries, responses)), "a query plus its response")
    values = []
    for i, score in enumerate(scores):
        if torch.is_tensor(score) and score.numel() != 1:
            raise MarlInputError(f"scores[{i}] has shape {tuple(score.shape)}: each score must be one scalar "
                                 "(the reward of the whole response)")
        values.append(float(score))
    scores = torch.tensor(values, dtype=torch.float32, device=device)
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise MarlInputError(f"scores {bad} are not finite ({[values[i] for i in bad]}); no update was made. "
                             "Check the reward model (or clip its output with PPOConfig.score_clip)")
    return scores
