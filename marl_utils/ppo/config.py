"""Every PPO knob in one dataclass, one docstring per field (notebook 03).

Defaults follow `shared/docs/ppo_checklist.md` (gamma 1.0, lambda 0.95, clip 0.2, value clip 0.2,
vf_coef 0.1, plain sampling). Where the public gpt2-sentiment example (gpt2-imdb policy, distilbert-imdb
reward, one V100) used a value, the docstring says so: that run is the reference point of the tutorial.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..infra.errors import MarlInputError

KL_ESTIMATORS = ("k1", "k3")
MIXED_PRECISION = (None, "no", "bf16", "fp16", "auto")


@dataclass
class PPOConfig:
    """Hyperparameters of `PPOTrainer`. Printed in notebook 03's config cell."""

    seed: int = 0
    """Seed of the global RNGs, the prompt sampler and evaluation sampling (plus the process index under DDP)."""

    learning_rate: float = 1.41e-5
    """Adam learning rate of the policy LoRA (gpt2-sentiment: 1.41e-5 for FULL fine-tuning; LoRA wants ~10x that)."""
    value_head_learning_rate: float | None = None
    """Learning rate of the value head (its own Adam parameter group; a head trained from scratch may want a
    larger one than the LoRA); None = `learning_rate`."""
    batch_size: int = 128
    """Rollouts (prompt + response) per PPO step and process (gpt2-sentiment: 128)."""
    mini_batch_size: int = 128
    """Rollouts per forward/backward pass (gpt2-sentiment: 128)."""
    gradient_accumulation_steps: int = 1
    """Forward/backward passes per optimizer step; an update sees mini_batch_size * this rollouts (example: 1)."""
    ppo_epochs: int = 4
    """Passes over the batch, reshuffled each time, per PPO step (gpt2-sentiment: 4)."""

    gamma: float = 1.0
    """Discount. 1.0: a response is a short episode and the score arrives at its end."""
    lam: float = 0.95
    """GAE lambda: bias/variance trade-off of the advantages."""
    cliprange: float = 0.2
    """Policy ratio clip: the update may move each token's probability ratio at most this far from 1."""
    cliprange_value: float = 0.2
    """Value clip: new values may move at most this far from the rollout values before the loss stops caring."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    max_grad_norm: float | None = None
    """Clip the gradient norm of the trainable parameters to this; None turns clipping off (gpt2-sentiment: off)."""

    init_kl_coef: float = 0.2
    """Initial beta of the per-token KL penalty -beta * KL_t (gpt2-sentiment: 0.2)."""
    adap_kl_ctrl: bool = True
    """Adapt beta towards `target_kl` (Ziegler et al. 2019); False keeps beta fixed (gpt2-sentiment: True)."""
    target_kl: float = 6.0
    """Target KL to the reference in nats per sequence for the adaptive controller (gpt2-sentiment: 6)."""
    horizon: float = 10000.0
    """Adaptive controller horizon in rollouts: larger means beta moves more slowly (gpt2-sentiment: 10000)."""
    kl_estimator: str = "k1"
    """Per-token KL estimator in the reward: "k1" = logp - ref_logp (unbiased), "k3" = (r - 1) - log r (>= 0).
    k3 penalises small per-token drift only to second order, so the policy drifts further (see `kl_penalty`)."""

    early_stopping: bool = False
    """Stop the PPO epochs of a step once an epoch's mean policy approx KL exceeds `target_kl_early_stop`."""
    target_kl_early_stop: float = 1.0
    """Policy approx KL per token (old vs new policy, not vs the reference) that ends the epochs early."""

    fused_rollout: bool | None = None
    """Run the no-grad policy, reference (and, in train(), reward) forwards of a step as one batched forward with
    a per-row adapter (peft `adapter_names`); None = whenever possible (no separate ref_model), False = apart."""
    forward_batch_size: int | None = None
    """Rollouts per no-grad forward (rollout, reference, reward, evaluation); None = mini_batch_size: no more rows
    than a training minibatch, so it fits wherever training fits (the fused forward runs this many rows per
    role). On the tiny profile the whole batch at once was no faster (fused rollout 150 vs 155 ms CPU)."""
    generation_batch_size: int | None = None
    """Prompts per generate() call in train() and evaluate(); None = batch_size (one call per step)."""

    temperature: float = 1.0
    """Sampling temperature. Every logprob (rollout, reference, training) is computed from logits / temperature."""
    max_new_tokens: int = 16
    """Response length cap in tokens (gpt2-sentiment sampled 4-16)."""
    min_response_tokens: int = 0
    """Responses shorter than this many tokens get `short_response_penalty` (the anti-collapse guard); 0 = off.
    Off by default like every score shaping here; the profiles turn it on (3/4 of max_new_tokens)."""
    short_response_penalty: float = -2.0
    """Added to the score of a response shorter than `min_response_tokens` (only when that is > 0)."""
    missing_eos_penalty: float | None = None
    """Added to the score of a response that ends without EOS (cut by max_new_tokens); None = off."""
    normalize_scores: bool = False
    """Standardise scores with the running mean and std of all scores so far (before penalties and clipping)."""
    score_clip: float | None = None
    """Clip scores to [-score_clip, score_clip] before they enter the rewards; None = off."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards over the batch's response tokens before GAE."""

    steps: int = 20
    """PPO steps that `train()` runs in total (a resumed run ends at the same count; gpt2-sentiment: 194)."""
    eval_every: int = 0
    """Evaluate on the held-out prompts every this many steps inside `train()`; 0 = only when called."""
    save_every: int = 0
    """Write a checkpoint every this many steps when `train()` has an output_dir; 0 = only at the end."""
    mixed_precision: str | None = None
    """"no", "bf16", "fp16", or "auto" (bf16 where the hardware computes it fast: CUDA with bf16, CPUs with
    AMX/avx512_bf16; else fp32); None = the launcher's setting (ACCELERATE_MIXED_PRECISION, which `accelerate
    launch` sets from `accelerate config`), else fp32: never what an earlier trainer of the process (TRL's
    RewardConfig defaults to bf16) left in Accelerate's state. Whatever it is, generation, rollout, reference,
    reward and training forwards all run under it."""
    log_with: str | None = None
    """Also log stats to an Accelerate tracker ("tensorboard", "wandb", ...); None = history and progress bar only."""
    logging_dir: str | None = None
    """Folder for trackers that write files (tensorboard)."""

    def __post_init__(self):
        positive = ["batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs", "max_new_tokens"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MarlInputError(f"PPOConfig.{name}={value!r} must be a positive integer")
        backward_batch = self.mini_batch_size * self.gradient_accumulation_steps
        if self.batch_size % backward_batch:
            lower = max(backward_batch, self.batch_size // backward_batch * backward_batch)
            raise MarlInputError(
                f"PPOConfig.batch_size={self.batch_size} is not a multiple of mini_batch_size * "
                f"gradient_accumulation_steps = {self.mini_batch_size} * {self.gradient_accumulation_steps} = "
                f"{backward_batch}; every optimizer step must see whole minibatches. Use batch_size={lower} or "
                f"{lower + backward_batch}, or a smaller mini_batch_size / gradient_accumulation_steps")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise MarlInputError(f"PPOConfig.kl_estimator={self.kl_estimator!r} is unknown; use one of {KL_ESTIMATORS}")
        for name in ["learning_rate", "temperature", "target_kl", "horizon", "target_kl_early_stop"]:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise MarlInputError(f"PPOConfig.{name}={value!r} must be a positive number")
        for name in ["cliprange", "cliprange_value", "vf_coef", "init_kl_coef"]:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise MarlInputError(f"PPOConfig.{name}={value!r} must be a number >= 0")
        for name in ["gamma", "lam"]:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise MarlInputError(f"PPOConfig.{name}={value!r} must be in [0, 1]")
        for name in ["max_grad_norm", "score_clip"]:
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise MarlInputError(f"PPOConfig.{name}={value!r} must be a positive number or None (off)")
        if not (isinstance(self.min_response_tokens, int) and not isinstance(self.min_response_tokens, bool)
                and 0 <= self.min_response_tokens <= self.max_new_tokens):
            raise MarlInputError(f"PPOConfig.min_response_tokens={self.min_response_tokens!r} must be an integer in "
                                 f"[0, max_new_tokens={self.max_new_tokens}] (0 = off)")
        if self.value_head_learning_rate is not None and not (
                isinstance(self.value_head_learning_rate, (int, float)) and math.isfinite(self.value_head_learning_rate)
                and self.value_head_learning_rate > 0):
            raise MarlInputError(f"PPOConfig.value_head_learning_rate={self.value_head_learning_rate!r} must be a "
                                 "positive number, or None to use learning_rate")
        if self.mixed_precision not in MIXED_PRECISION:
            raise MarlInputError(f"PPOConfig.mixed_precision={self.mixed_precision!r} is unknown; use one of "
                                 f"{MIXED_PRECISION}")
        for name in ["generation_batch_size", "forward_batch_size"]:
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise MarlInputError(f"PPOConfig.{name}={value!r} must be a positive integer or None")
        for name in ["steps", "eval_every", "save_every"]:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise MarlInputError(f"PPOConfig.{name}={value!r} must be an integer >= 0")

    @property
    def backward_batch_size(self) -> int:
        """Rollouts behind one optimizer step: mini_batch_size * gradient_accumulation_steps."""
        return self.mini_batch_size * self.gradient_accumulation_steps

    def to_dict(self) -> dict:
        """Plain dict of all fields (for trackers and checkpoints)."""
        return asdict(self)
