"""Stage 3 as a command, and the whole pipeline (`marl ppo`, `marl run`).

`train_ppo` is what notebook 03 does cell by cell, in one call: load the stage-1 model with a new
policy adapter and the stage-2 reward adapter into ONE `AutoModelForCausalLMWithValueHead`, then run
the PPO loop on review prompts and save the policy to `OUT/ppo/`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_dir, atomic_write_json
from .errors import MarlInputError
from .profiles import TINY_BASE, Profile
from .runs import prepare_run_dir, read_metrics, stage_dir


@dataclass
class PPOResult:
    """What stage 3 produced: the saved policy, eval before/after, per-step history, samples."""

    model_dir: Path
    metrics: dict
    history: list = field(default_factory=list)


def policy_lora_config(profile: Profile):
    from peft import LoraConfig

    return LoraConfig(r=profile.ppo_lora_r, lora_alpha=profile.ppo_lora_alpha, lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM",
                      target_modules=list(profile.lora_target_modules) if profile.lora_target_modules else None)


def ppo_config(profile: Profile, seed: int = 0, steps: int | None = None):
    """The profile's PPO sizes as a `PPOConfig`."""
    from .ppo_config import PPOConfig

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
                    steps: int | None = None):
    """Model (policy + value head + reward adapter on one base), tokenizer, config and prompts."""
    import torch
    from transformers import AutoTokenizer

    from .data import load_imdb
    from .modeling import AutoModelForCausalLMWithValueHead
    from .prompts import load_prompts

    sft_dir, reward_dir = stage_dir(out, "sft"), stage_dir(out, "reward_adapter")
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        str(sft_dir), peft_config=policy_lora_config(profile), reward_adapter=str(reward_dir),
        load_in_8bit=quantization == "8bit", load_in_4bit=quantization == "4bit",
    )
    data = load_imdb(dataset or profile.dataset, seed=seed)
    lo, hi = profile.ppo_prompt_tokens
    context = getattr(model.config, "max_position_embeddings", None)
    prompts = load_prompts(data["train"]["text"], tokenizer, min_tokens=lo, max_tokens=hi, seed=seed,
                           n=max(4 * profile.ppo_batch_size * (steps or profile.ppo_steps), 256),
                           max_context=context)
    eval_prompts = load_prompts(data["test"]["text"], tokenizer, min_tokens=lo, max_tokens=hi, seed=seed + 1,
                                n=profile.ppo_eval_prompts, max_context=context)
    return model, tokenizer, ppo_config(profile, seed, steps), prompts, eval_prompts


def train_ppo(profile: Profile, output_dir=None, dataset=None, *, seed: int = 0, force: bool = False,
              steps: int | None = None, resume: bool = False, progress: bool = True) -> PPOResult:
    """Run stage 3 into `OUT/ppo/` (building stages 1-2 first if they are missing)."""
    from .ppo import PPOTrainer
    from .run_cost import measure_cost

    out = prepare_run_dir(output_dir, profile)
    final = stage_dir(out, "ppo")
    if final.exists() and not force and not resume:
        print(f"stage 3 (PPO) already done: {final}")
        metrics = read_metrics(final)
        return PPOResult(final, metrics, metrics.get("history", []))
    check_ppo_settings(profile, out, seed, steps)
    ensure_earlier_stages(profile, out, dataset, seed, progress)

    start = time.perf_counter()
    model, tokenizer, config, prompts, eval_prompts = build_ppo_parts(profile, out, dataset, seed, steps=steps)
    trainer = PPOTrainer(config, model=model, tokenizer=tokenizer)
    before = trainer.evaluate(eval_prompts)
    with measure_cost(model.device) as cost:  # the training alone, as `marl grpo` measures its own
        trainer.train(prompts, eval_prompts=eval_prompts, output_dir=stage_dir(out, "ppo_checkpoints"),
                      resume=resume, progress=progress)
    after = trainer.evaluate(eval_prompts)
    metrics = {
        "profile": profile.name,
        "algo": "ppo",
        "seconds": round(time.perf_counter() - start, 2),
        "train_seconds": cost["seconds"],
        "peak_memory_mb": cost["peak_memory_mb"],
        "steps": trainer.step_count,
        "max_new_tokens": config.max_new_tokens,
        "eval_reward_before": before["reward_mean"],
        "eval_reward_after": after["reward_mean"],
        "kl_final": after["kl_mean"],
        "response_tokens_mean": after["response_tokens_mean"],
        "distinct_2_before": before.get("distinct_2"),
        "distinct_2_after": after.get("distinct_2"),
        "samples_before": before.get("samples", [])[:8],
        "samples_after": after.get("samples", [])[:8],
        "history": trainer.history,
    }
    metrics["learning_note"] = ppo_learning_note(profile, metrics, read_metrics(stage_dir(out, "reward_adapter")))
    if trainer.accelerator.is_main_process:  # under torchrun every process gets here; two writers would collide
        with atomic_dir(final) as tmp:
            trainer.model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
        print(f"stage 3 (PPO) done in {metrics['seconds']:.0f} s: held-out eval reward {metrics['eval_reward_before']:.2f} "
              f"-> {metrics['eval_reward_after']:.2f}, KL {metrics['kl_final']:.1f} nats per response, "
              f"{metrics['response_tokens_mean']:.1f} tokens per response\n  saved in {final}")
        if metrics["learning_note"]:
            print(f"NOTE: {metrics['learning_note']}")
    trainer.accelerator.wait_for_everyone()
    return PPOResult(final, metrics, trainer.history)


def ppo_learning_note(profile: Profile, metrics: dict, reward_metrics: dict) -> str | None:
    """A sentence saying that PPO learned (almost) nothing, with the likely cause and the fix; None if it learned."""
    gain = metrics["eval_reward_after"] - metrics["eval_reward_before"]
    if gain >= profile.ppo_no_learning_gain:
        return None
    accuracy = reward_metrics.get("eval_accuracy")
    weak_judge = accuracy is not None and accuracy < profile.reward_min_accuracy
    cause = (f"the reward adapter tells reviews apart poorly (held-out pair accuracy {accuracy:.2f}, the profile's bar "
             f"is {profile.reward_min_accuracy:g}), so its scores give the policy little to climb" if weak_judge else
             f"{metrics['steps']} steps at learning rate {profile.ppo_learning_rate:g} were too few or too small")
    fix = ("make stage 2 better first (more labelled reviews, a larger reward_pair_budget, or a pretrained base "
           "with --base-model)" if weak_judge else "more steps (--steps) or a larger ppo_learning_rate")
    return (f"PPO learned almost nothing: eval reward {metrics['eval_reward_before']:+.2f} -> "
            f"{metrics['eval_reward_after']:+.2f} (gain {gain:+.2f}, the profile expects at least "
            f"{profile.ppo_no_learning_gain:g}). Likely cause: {cause}. Fix: {fix}.")


def run_ppo_stage(profile, output_dir=None, dataset=None, **kwargs):
    return train_ppo(profile, output_dir, dataset, **kwargs)


def save_plots(out: Path, sft_metrics: dict, reward_metrics: dict, ppo_metrics: dict) -> list[Path]:
    """PNG curves of all three stages into `OUT/plots/`."""
    from .plotting import plot_curves

    plots = stage_dir(out, "plots")
    paths = [plots / "sft_loss.png", plots / "reward_loss.png", plots / "ppo.png"]
    plot_curves(sft_metrics.get("log_history", []), ["loss"], x_key="step", titles=["SFT loss"], save_to=paths[0])
    plot_curves(reward_metrics.get("log_history", []), ["loss", "accuracy"], x_key="step",
                titles=["reward pairwise loss", "reward pair accuracy"], save_to=paths[1])
    plot_curves(ppo_metrics.get("history", []), ["env/score_mean", "objective/kl", "ppo/response_tokens_mean"],
                titles=["reward (score)", "KL to reference (nats per response)", "response length (tokens)"],
                save_to=paths[2], smooth=3)
    return paths


def run_pipeline(profile: Profile, output_dir=None, dataset=None, *, seed: int = 0, force: bool = False,
                 steps: int | None = None, resume: bool = False, progress: bool = True, algo: str = "ppo") -> dict:
    """`marl run`: SFT -> reward adapter -> PPO (`algo="grpo"`/`"rloo"`: TRL's trainer), plots, `OUT/summary.json`."""
    from .reward import train_reward_adapter
    from .sft import train_sft

    out = prepare_run_dir(output_dir, profile)
    check_ppo_settings(profile, out, seed, steps)
    if algo != "ppo":
        from .grpo import check_stage3

        check_stage3(profile, algo, steps, resume)  # before stage 1 trains
    if dataset:
        from .data import load_imdb

        load_imdb(dataset, seed=seed)  # fail on a bad dataset now, not after stage 1
    sft = train_sft(profile, out, dataset, seed=seed, force=force, progress=progress)
    reward = train_reward_adapter(profile, out, dataset, seed=seed, force=force, progress=progress)
    if algo == "ppo":
        ppo = train_ppo(profile, out, dataset, seed=seed, force=force, steps=steps, resume=resume, progress=progress)
    else:
        from .grpo_stage import train_grpo

        ppo = train_grpo(profile, out, dataset, algo=algo, seed=seed, force=force, steps=steps, progress=progress)
    save_plots(out, sft.metrics, reward.metrics, ppo.metrics)
    notes = [m["learning_note"] for m in (sft.metrics, reward.metrics, ppo.metrics) if m.get("learning_note")]
    summary = {
        "profile": profile.name,
        "base_model": profile.base_model,
        "seed": seed,
        "algo": algo,
        "learned": not notes,
        "notes": notes,  # one sentence per stage that learned almost nothing: the likely cause and the fix
        "stages": {
            "sft": {k: sft.metrics.get(k) for k in ["seconds", "eval_perplexity", "eval_perplexity_before", "epochs"]},
            "reward": {k: reward.metrics.get(k) for k in ["seconds", "epochs", "eval_accuracy", "untrained_accuracy",
                                                          "eval_prefix_accuracy", "untrained_prefix_accuracy"]},
            algo: {k: ppo.metrics.get(k) for k in ["seconds", "steps", "max_new_tokens", "eval_reward_before",
                                                    "eval_reward_after", "kl_final", "response_tokens_mean",
                                                    "distinct_2_before", "distinct_2_after"]},
        },
    }
    atomic_write_json(out / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    for note in notes:  # again after the long JSON, where the eye lands at the end of a run
        print(f"NOTE: {note}")
    return summary
