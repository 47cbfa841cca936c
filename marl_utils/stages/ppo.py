"""Stage 3: PPO with the reward adapter on the one base (`marl ppo`; notebook 03 does it cell by cell).

`train_ppo` loads the stage-1 model with a new policy adapter and the stage-2 reward adapter into ONE
`AutoModelForCausalLMWithValueHead` (`ppo_parts.build_ppo_parts`), runs the PPO loop on review prompts and saves
the policy to `OUT/ppo/`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..infra.atomic import atomic_dir
from ..infra.profiles import Profile
from ..infra.runs import prepare_run_dir, read_metrics, stage_dir
from .ppo_parts import build_ppo_parts, check_ppo_settings, ensure_earlier_stages


@dataclass
class PPOResult:
    """What stage 3 produced: the saved policy, eval before/after, per-step history, samples."""

    model_dir: Path
    metrics: dict
    history: list = field(default_factory=list)


def train_ppo(profile: Profile, output_dir=None, dataset=None, *, seed: int = 0, force: bool = False,
              steps: int | None = None, resume: bool = False, progress: bool = True) -> PPOResult:
    """Run stage 3 into `OUT/ppo/` (building stages 1-2 first if they are missing)."""
    from ..data.gold_reward import gold_metrics, gold_scorer_for
    from ..ppo.trainer import PPOTrainer
    from ..infra.run_cost import measure_cost

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
    gold = gold_scorer_for(dataset or profile.dataset)  # the corpus grammar's true sentiment; None on other data
    before = trainer.evaluate(eval_prompts, gold_reward=gold)
    with measure_cost(model.device) as cost:  # the training alone, as `marl grpo` measures its own
        trainer.train(prompts, eval_prompts=eval_prompts, output_dir=stage_dir(out, "ppo_checkpoints"),
                      resume=resume, progress=progress)
    after = trainer.evaluate(eval_prompts, gold_reward=gold)
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
        **gold_metrics(before, after, dataset or profile.dataset),
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
              f"-> {metrics['eval_reward_after']:.2f}{_gold_text(metrics)}, KL {metrics['kl_final']:.1f} nats per "
              f"response, {metrics['response_tokens_mean']:.1f} tokens per response\n  saved in {final}")
        if metrics["learning_note"]:
            print(f"NOTE: {metrics['learning_note']}")
    trainer.accelerator.wait_for_everyone()
    return PPOResult(final, metrics, trainer.history)


def _gold_text(metrics: dict) -> str:
    if metrics.get("eval_gold_after") is None:
        return " (no gold reward for this data)"
    return f" (gold {metrics['eval_gold_before']:.2f} -> {metrics['eval_gold_after']:.2f})"


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
