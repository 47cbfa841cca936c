"""GRPO / RLOO as stage 3 (`marl grpo`, `marl run --algo grpo|rloo`) and the PPO-vs-GRPO-vs-RLOO run that notebook
07 compares: the same model parts, prompts and held-out evaluation as `train_ppo`, so metrics compare one to one.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..grpo.trainers import build_trainer, check_stage3, grpo_settings, quiet_trl, round_history
from ..infra.run_cost import measure_cost


@dataclass
class GRPOResult:
    """What a GRPO / RLOO stage produced: the saved policy, eval before/after, one history entry per round."""

    model_dir: Path
    metrics: dict
    history: list = field(default_factory=list)


def evaluator(profile, model, tokenizer, seed: int = 0, steps: int | None = None):
    """A PPOTrainer: PPO's trainer, and for GRPO / RLOO the held-out evaluation (same prompts, seed, measures)."""
    from .ppo_parts import ppo_config
    from ..ppo.trainer import PPOTrainer

    return PPOTrainer(ppo_config(profile, seed, steps), model=model, tokenizer=tokenizer)


def run_on_one_base(algo: str, profile, out, dataset=None, *, seed: int = 0, steps: int | None = None,
                    progress: bool = True) -> dict:
    """One PPO / GRPO / RLOO run, measured the same way for all three (notebook 07's comparison).

    Fresh parts (`build_ppo_parts`: stage-1 model, new policy LoRA, reward adapter), held-out evaluation before
    and after, and only the training in between timed and its peak memory taken. Stages 1-2 must exist in `out`.
    Returns the model and tokenizer (trained in place), `metrics` (json-ready, PPO's names) and the trainer.
    """
    from ..data.gold_reward import gold_metrics, gold_scorer_for
    from .ppo_parts import build_ppo_parts

    settings = check_stage3(profile, algo, steps) if algo != "ppo" else grpo_settings(profile, steps=steps)
    model, tokenizer, _, prompts, eval_prompts = build_ppo_parts(profile, out, dataset, seed, steps=settings.steps)
    evaluation = evaluator(profile, model, tokenizer, seed, steps)
    gold = gold_scorer_for(dataset or profile.dataset)  # None unless the data is the offline corpus
    before = evaluation.evaluate(eval_prompts, gold_reward=gold)
    if algo == "ppo":
        trainer = evaluation
        with measure_cost(model.device) as cost:
            trainer.train(prompts, progress=progress)
        history, per_step = trainer.history, evaluation.config.batch_size
    else:
        with tempfile.TemporaryDirectory(prefix=f"marl-{algo}-") as work_dir:
            trainer = build_trainer(algo, model, tokenizer, prompts, settings, seed=seed, work_dir=work_dir,
                                    progress=progress)
            with quiet_trl(), measure_cost(model.device) as cost:
                trainer.train()
        history, per_step = round_history(trainer, settings), settings.rollouts_per_step
    after = evaluation.evaluate(eval_prompts, gold_reward=gold)
    metrics = run_metrics(algo, before, after, cost, history, per_step, settings.max_new_tokens)
    metrics.update(gold_metrics(before, after, dataset or profile.dataset))
    metrics.update(profile=profile.name, seed=seed,
                   settings=settings.to_dict() if algo != "ppo" else evaluation.config.to_dict())
    return {"model": model, "tokenizer": tokenizer, "trainer": trainer, "metrics": metrics}


def run_metrics(algo: str, before: dict, after: dict, cost: dict, history: list, rollouts_per_step: int,
                max_new_tokens: int) -> dict:
    """The numbers of one run under train_ppo's names, from its evaluations, `measure_cost` and history."""
    return {
        "algo": algo, "train_seconds": cost["seconds"], "peak_memory_mb": cost["peak_memory_mb"],
        "steps": len(history), "max_new_tokens": max_new_tokens, "rollouts": len(history) * rollouts_per_step,
        "generated_tokens": round(sum(h["ppo/response_tokens_mean"] for h in history) * rollouts_per_step),
        "eval_reward_before": before["reward_mean"], "eval_reward_after": after["reward_mean"],
        "kl_final": after["kl_mean"], "response_tokens_mean": after["response_tokens_mean"],
        "distinct_2_before": before["distinct_2"], "distinct_2_after": after["distinct_2"],
        "samples_before": before["samples"], "samples_after": after["samples"], "history": history,
    }


def train_grpo(profile, output_dir=None, dataset=None, *, algo: str = "grpo", seed: int = 0, force: bool = False,
               steps: int | None = None, progress: bool = True) -> GRPOResult:
    """`marl grpo`: GRPO (or RLOO) on the one base into `OUT/grpo/` (`OUT/rloo/`), building stages 1-2 if missing.

    Same model parts, prompts and held-out evaluation as `train_ppo`, so the metrics compare one to one.
    """
    from ..infra.atomic import atomic_dir
    from .ppo_parts import check_ppo_settings, ensure_earlier_stages
    from ..infra.runs import prepare_run_dir, read_metrics, stage_dir

    check_stage3(profile, algo, steps)
    out = prepare_run_dir(output_dir, profile)
    final = stage_dir(out, algo)
    if final.exists() and not force:
        print(f"stage 3 ({algo.upper()}) already done: {final}")
        metrics = read_metrics(final)
        return GRPOResult(final, metrics, metrics.get("history", []))
    check_ppo_settings(profile, out, seed)  # prompt lengths and context: the same prompts as PPO
    ensure_earlier_stages(profile, out, dataset, seed, progress)
    start = time.perf_counter()
    run = run_on_one_base(algo, profile, out, dataset, seed=seed, steps=steps, progress=progress)
    metrics = {**run["metrics"], "seconds": round(time.perf_counter() - start, 2)}
    with atomic_dir(final) as tmp:
        run["model"].save_pretrained(tmp)  # the policy adapter (+ its untouched value head), for from_pretrained
        run["tokenizer"].save_pretrained(tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    print(f"stage 3 ({algo.upper()}) done in {metrics['seconds']:.0f} s: held-out eval reward "
          f"{metrics['eval_reward_before']:.2f} -> {metrics['eval_reward_after']:.2f}, KL {metrics['kl_final']:.1f} "
          f"nats per response, {metrics['response_tokens_mean']:.1f} tokens per response\n  saved in {final}")
    return GRPOResult(final, metrics, metrics["history"])
