"""Critic-free RL on the one base: TRL's GRPOTrainer and RLOOTrainer, scored by the reward adapter (notebook 07).

    model = AutoModelForCausalLMWithValueHead.from_pretrained(sft_dir, peft_config=lora, reward_adapter=reward_dir)
    trainer = build_trainer("grpo", model, tokenizer, prompts, grpo_settings(profile))   # or "rloo"
    trainer.train()                       # TRL's loop; the policy LoRA is the only thing that changes

Policy = the LoRA TRL trains, reference = the base with every adapter disabled, reward = the frozen stage-2
adapter (`grpo_reward.py`). No value head: GRPO's baseline is the mean of the prompt's group of completions,
RLOO's the mean of the OTHER completions of the group. Where TRL 1.16's defaults differ from that:
- Given a PeftModel and beta > 0 (RLOO: any beta), TRL adds an adapter "ref", a copy of "default", as the
  reference: the base only while the policy is fresh, and one more adapter in memory. `build_trainer`
  deletes it; TRL then uses `disable_adapter()`, the plain base (the reward adapter is off there too).
- Gradient checkpointing and bf16 are on by default; both off here (under bf16, TRL's generate and the
  reward forward would run in another precision than the training forward: one precision per step).
- TRL's optimizer takes every parameter with requires_grad; `build_trainer` checks that is the policy LoRA.
- TRL's logprob forwards pass no position ids; `build_trainer` makes them follow the mask, as in generate().
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..infra.errors import MarlInputError
from .reward_function import reward_adapter_reward

ALGOS = ("grpo", "rloo")


@dataclass(frozen=True)
class GRPOSettings:
    """Sizes of a GRPO / RLOO run on one profile; `grpo_settings(profile)` fills it (printed in notebook 07)."""

    steps: int
    """Generation rounds. Each samples `rollouts_per_step` completions, as one PPO step does."""
    rollouts_per_step: int
    """Completions per round: rollouts_per_step / num_generations prompts, each sampled num_generations times."""
    num_generations: int
    """Group size G: completions per prompt. GRPO's baseline is the group mean, RLOO's the mean of the G-1 others."""
    mini_batch_size: int
    """Completions per optimizer step (PPO: mini_batch_size)."""
    num_iterations: int
    """Passes over each round's completions (PPO: ppo_epochs). Above 1 the clipped ratio starts to matter."""
    learning_rate: float
    """Adam learning rate of the policy LoRA, constant (no decay), like PPOTrainer's."""
    grpo_beta: float
    """GRPO: weight of the per-token KL to the reference (k3 estimator) in the loss."""
    rloo_beta: float
    """RLOO: the reward is score - beta * KL of the whole sequence (k1, summed), as in PPO's per-token penalty."""
    max_new_tokens: int
    """Completion length cap (PPO: max_new_tokens), so all three sample the same number of tokens."""
    min_reward_gain: float
    """Bar notebook 07 asserts: held-out reward gain after training at least this."""
    max_kl: float
    """Bar notebook 07 asserts: held-out KL to the reference (nats per sequence) at most this."""
    temperature: float = 1.0
    epsilon: float = 0.2
    """Ratio clip, as PPO's cliprange."""

    @property
    def prompts_per_step(self) -> int:
        return self.rollouts_per_step // self.num_generations

    @property
    def optimizer_steps_per_round(self) -> int:
        return self.rollouts_per_step // self.mini_batch_size * self.num_iterations

    @property
    def optimizer_steps(self) -> int:
        """TRL's max_steps: it counts optimizer steps, not generation rounds."""
        return self.steps * self.optimizer_steps_per_round

    def to_dict(self) -> dict:
        return asdict(self)


def default_group_size(rollouts_per_step: int) -> int:
    """8 completions per prompt (a common GRPO choice), or the largest of 4 and 2 that divides the round."""
    return next((g for g in (8, 4, 2) if rollouts_per_step % g == 0), 8)


def grpo_settings(profile, **overrides) -> GRPOSettings:
    """GRPO / RLOO sizes from a profile: its grpo_* fields where it has them, else its PPO sizes.

    Same rounds, rollouts per round, minibatch and completion length as PPO, so the three runs sample the
    same number of tokens; `overrides` replace single fields (e.g. steps=2 in a quick test).
    """
    def pick(name, default):
        return getattr(profile, name, default)

    rollouts = pick("grpo_batch_size", profile.ppo_batch_size)
    settings = GRPOSettings(
        steps=pick("grpo_steps", profile.ppo_steps),
        rollouts_per_step=rollouts,
        num_generations=pick("grpo_num_generations", default_group_size(rollouts)),
        mini_batch_size=pick("grpo_mini_batch_size", profile.ppo_mini_batch_size),
        num_iterations=pick("grpo_num_iterations", 1),
        learning_rate=pick("grpo_learning_rate", profile.ppo_learning_rate),
        grpo_beta=profile.grpo_beta,
        rloo_beta=profile.rloo_beta,
        max_new_tokens=profile.ppo_max_new_tokens,
        min_reward_gain=profile.grpo_min_reward_gain,
        max_kl=profile.grpo_max_kl,
    )
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    check_settings(settings)
    return settings


def check_settings(s: GRPOSettings) -> None:
    """Reject sizes TRL would refuse (or silently bend) before anything loads."""
    for name in ("steps", "rollouts_per_step", "num_generations", "mini_batch_size", "num_iterations",
                 "max_new_tokens"):
        value = getattr(s, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise MarlInputError(f"GRPO setting {name}={value!r} must be a positive integer")
    if s.num_generations < 2:
        raise MarlInputError(f"num_generations={s.num_generations}: group-relative advantages need at least 2 "
                             "completions per prompt (one alone is its own baseline, advantage 0)")
    if s.rollouts_per_step % s.num_generations:
        raise MarlInputError(f"rollouts_per_step={s.rollouts_per_step} is not a multiple of num_generations="
                             f"{s.num_generations}: every prompt needs a whole group of completions")
    if s.rollouts_per_step % s.mini_batch_size:
        raise MarlInputError(f"rollouts_per_step={s.rollouts_per_step} is not a multiple of mini_batch_size="
                             f"{s.mini_batch_size}: every optimizer step must see a whole minibatch")
    for name in ("learning_rate", "temperature"):
        if not getattr(s, name) > 0:
            raise MarlInputError(f"GRPO setting {name}={getattr(s, name)!r} must be positive")
    for name in ("grpo_beta", "rloo_beta"):
        if not getattr(s, name) > 0:
            raise MarlInputError(f"GRPO setting {name}={getattr(s, name)!r} must be > 0: with beta = 0 nothing "
                                 "keeps the policy near the reference (the adapter-disabled base)")


def check_stage3(profile, algo: str, steps: int | None = None, resume: bool = False) -> GRPOSettings:
    """`marl run --algo grpo|rloo` / `marl grpo`: refuse what cannot work before stages 1-2 train."""
    if algo not in ALGOS:
        raise MarlInputError(f"algo={algo!r} is unknown; use one of {ALGOS} (PPO: `marl ppo`)")
    if resume:
        raise MarlInputError(f"--resume continues PPO from its checkpoints; a {algo.upper()} run keeps none (it is "
                             "as short as PPO's): run it again, with --force to replace a finished one")
    try:
        return grpo_settings(profile, steps=steps)
    except MarlInputError as err:
        raise MarlInputError(f"profile {profile.name!r}: {err} (GRPO sizes follow its ppo_* fields)") from None


def trl_args(algo: str, settings: GRPOSettings, work_dir, seed: int = 0):
    """TRL's GRPOConfig / RLOOConfig for these settings, with its defaults overridden where they are wrong here."""
    from trl import GRPOConfig, RLOOConfig

    cuda = torch.cuda.is_available()
    common = dict(
        output_dir=str(work_dir), seed=seed, max_steps=settings.optimizer_steps,
        per_device_train_batch_size=settings.mini_batch_size, gradient_accumulation_steps=1,
        generation_batch_size=settings.rollouts_per_step, num_generations=settings.num_generations,
        num_iterations=settings.num_iterations, epsilon=settings.epsilon,
        max_completion_length=settings.max_new_tokens,
        temperature=settings.temperature, top_p=1.0, top_k=0, repetition_penalty=1.0,  # plain sampling
        learning_rate=settings.learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=0.0,  # PPOTrainer does not clip either (0 = off in transformers' Trainer)
        disable_dropout=True,  # the rollout logprobs must equal the first training forward's
        bf16=False, fp16=False, use_cpu=not cuda,
        activation_checkpointing=False,  # the new name: TRL's gradient_checkpointing=True default is off
        logging_steps=settings.optimizer_steps_per_round,  # one log entry per generation round
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
    )
    if algo == "grpo":
        return GRPOConfig(**common, beta=settings.grpo_beta, scale_rewards="group", loss_type="dapo")
    return RLOOConfig(**common, beta=settings.rloo_beta, normalize_advantages=False)


def prompt_dataset(prompts, tokenizer):
    """A datasets.Dataset with TRL's "prompt" column: token prompts (1-D tensors) decoded to text."""
    from datasets import Dataset

    if not prompts:
        raise MarlInputError("no training prompts: pass a list of 1-D token tensors (load_prompts)")
    return Dataset.from_dict({"prompt": [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]})


@contextlib.contextmanager
def quiet_trl():
    """Silence exactly the notices TRL and transformers print for settings this module chose on purpose."""
    from transformers.utils import logging as hf_logging

    from ..infra.progress import no_library_bars

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "model_init_kwargs ignored"-style info lines about an instantiated model
    with warnings.catch_warnings(), no_library_bars():  # TRL's dataset preparation (map) shows bars
        # TRL 1.16 reads model.is_gradient_checkpointing around every generate; transformers 5 deprecated that
        # name. It is TRL's call, not the learner's, and says nothing about this run.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)


def use_base_as_reference(model) -> None:
    """Drop TRL's "ref" copy of the policy adapter: the reference becomes the base with every adapter disabled."""
    peft_model = model.pretrained_model
    if "ref" in peft_model.peft_config:
        peft_model.delete_adapter("ref")
    model.set_policy_adapter(model.active_adapter)  # peft's add/delete move requires_grad flags; put them back


def positions_follow_the_mask(peft_model) -> None:
    """Give every forward of the peft model position ids from its attention mask when the caller passes none.

    TRL samples with generate(), which numbers left-padded prompts from their first real token, but computes
    old, reference and training logprobs with `model(input_ids, attention_mask)` alone, which numbers from the
    first pad. Rotary positions (Llama) only see differences, so nothing changes there; learned absolute
    positions (GPT-2) would be scored at other positions than they were sampled at.
    """
    from ..model.multi_adapter_model import position_ids_from_mask

    def add_positions(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if kwargs.get("position_ids") is None and not args and torch.is_tensor(mask) and mask.dim() == 2 \
                and kwargs.get("past_key_values") is None:
            kwargs["position_ids"] = position_ids_from_mask(mask)
        return args, kwargs

    if getattr(peft_model, "_marl_position_hook", None) is None:
        peft_model._marl_position_hook = peft_model.register_forward_pre_hook(add_positions, with_kwargs=True)


def check_only_policy_trains(model) -> None:
    """What TRL's optimizer will take (every parameter with requires_grad) must be the policy LoRA, nothing else."""
    policy = {id(p) for p in model.policy_parameters()}
    trainable = [(name, id(p) in policy) for name, p in model.pretrained_model.named_parameters() if p.requires_grad]
    extra = [name for name, is_policy in trainable if not is_policy]
    if extra or not trainable:
        raise MarlInputError(f"TRL would train {extra[:3] or 'nothing'} besides the policy adapter "
                             f"{model.active_adapter!r}; the reward adapter and the base must stay frozen. Load the "
                             "model with from_pretrained(..., is_trainable=True) and do not unfreeze other weights")


def build_trainer(algo: str, model, tokenizer, prompts, settings: GRPOSettings, *, seed: int = 0, work_dir=None,
                  progress: bool = True, callbacks=()):
    """TRL's GRPOTrainer ("grpo") or RLOOTrainer ("rloo") on the one base, scored by its reward adapter.

    `model`: an `AutoModelForCausalLMWithValueHead` with a fresh policy adapter and the reward adapter;
    `prompts`: 1-D token tensors. TRL trains `model.pretrained_model` (the peft model) in place.
    """
    from trl import GRPOTrainer, RLOOTrainer

    if algo not in ALGOS:
        raise MarlInputError(f"algo={algo!r} is unknown; use one of {ALGOS} (PPO is marl_utils.PPOTrainer)")
    reward = reward_adapter_reward(model, tokenizer)  # refuses a model without reward adapter, up front
    if tokenizer.padding_side != "left":
        raise MarlInputError("the tokenizer pads on the right; set tokenizer.padding_side = 'left' so batched "
                             "generation continues every prompt from its last real token")
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix=f"marl-{algo}-"))
    args = trl_args(algo, settings, work_dir, seed)
    dataset = prompt_dataset(prompts, tokenizer)
    trainer_class = GRPOTrainer if algo == "grpo" else RLOOTrainer
    model.set_policy_adapter(model.active_adapter)
    with quiet_trl():
        trainer = trainer_class(model=model.pretrained_model, reward_funcs=[reward], args=args,
                                train_dataset=dataset, processing_class=tokenizer, callbacks=list(callbacks))
    reward.check_trains(trainer.model)
    use_base_as_reference(model)
    positions_follow_the_mask(model.pretrained_model)
    check_only_policy_trains(model)
    replace_progress_bar(trainer, algo, progress)
    return trainer


def replace_progress_bar(trainer, algo: str, progress: bool) -> None:
    """transformers prints every log dict; show one bar with reward, KL and length instead, as PPOTrainer does."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

    class RoundBar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            from ..infra.progress import progress_bar

            self.bar = progress_bar(total=state.max_steps, desc=algo.upper(), disable=not progress)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                self.bar.set_postfix(reward=f"{logs['reward']:.2f}", kl=f"{logs.get('kl', float('nan')):.3f}",
                                     len=f"{logs.get('completions/mean_length', float('nan')):.1f}")

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(RoundBar())


def round_history(trainer, settings: GRPOSettings) -> list:
    """One entry per generation round from TRL's log, under the names PPOTrainer's history uses for the same things.

    env/score_mean: mean reward-adapter score; objective/kl: KL to the reference in nats per sequence (TRL logs
    it per token: GRPO's k3 of the current policy, RLOO's k1 of the rollout policy; times the mean length);
    ppo/response_tokens_mean: completion length. `rollouts`: completions sampled so far.
    """
    history = []
    for entry in trainer.state.log_history:
        if "reward" not in entry:
            continue
        length = entry.get("completions/mean_length", float("nan"))
        history.append({
            "step": len(history) + 1, "rollouts": (len(history) + 1) * settings.rollouts_per_step,
            "env/score_mean": entry.get("rewards/reward_adapter/mean", entry["reward"]),
            "env/score_std": entry.get("rewards/reward_adapter/std", entry.get("reward_std")),
            "objective/kl": entry.get("kl", 0.0) * length, "objective/kl_per_token": entry.get("kl", 0.0),
            "ppo/response_tokens_mean": length, "objective/entropy": entry.get("entropy"),
            "loss": entry.get("loss"), "clip_ratio": entry.get("clip_ratio/region_mean"),
            "frac_reward_zero_std": entry.get("frac_reward_zero_std"),
        })
    return history
