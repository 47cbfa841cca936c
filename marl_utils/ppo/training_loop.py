"""The PPO training loop: sample prompts, generate, score inside the rollout forward, step; evaluation, checkpoints
and a progress bar around it (`PPOTrainer.train`, notebook 03). The step itself is `PPOTrainer.step`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..infra.errors import MarlInputError
from ..infra.progress import progress_bar
from .checkpoint import latest_checkpoint, load_checkpoint, prompts_fingerprint, save_checkpoint
from .inputs import check_step_inputs, check_token_lists
from .maths import build_rollout_batch


def run_training(trainer, prompts=None, steps=None, eval_prompts=None, callback=None, progress: bool = True,
                 output_dir=None, resume: bool = False) -> list:
    """`PPOTrainer.train`: the loop, its checkpoints, evaluation and progress bar (see that docstring)."""
    cfg = trainer.config
    prompts = training_prompts(trainer, prompts)
    trainer.prompts_digest = prompts_fingerprint(prompts)
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    if world > 1:
        if len(prompts) < world:
            raise MarlInputError(f"{len(prompts)} prompts cannot be shared by {world} processes; pass more prompts")
        prompts = prompts[rank::world]
    total = cfg.steps if steps is None else steps
    checkpoints = None if output_dir is None else Path(output_dir) / "checkpoints"
    if resume:
        if output_dir is None:
            raise MarlInputError("train(resume=True) needs the output_dir of the run to resume")
        found = latest_checkpoint(output_dir)
        if found is not None:
            load_checkpoint(trainer, found)
        elif trainer.accelerator.is_main_process:
            print(f"no checkpoint under {output_dir}: starting from step {trainer.step_count}")
    saved_at, started_at, t_start = trainer.step_count, trainer.step_count, time.perf_counter()
    show = progress and trainer.accelerator.is_main_process
    # leave=False: the bar (a widget in Jupyter) goes away when done and a line of text stays, so a saved
    # notebook reopens without "Error displaying widget"
    bar = progress_bar(total=total, initial=min(trainer.step_count, total), desc="PPO", disable=not show, leave=False)
    trainer._progress = bar
    try:
        while trainer.step_count < total:
            entry = train_step(trainer, prompts, eval_prompts)
            if checkpoints is not None and cfg.save_every and trainer.step_count % cfg.save_every == 0:
                save_checkpoint(trainer, checkpoints)
                saved_at = trainer.step_count
            bar.update(1)
            if callback is not None and callback(trainer, entry) is True:
                break
        if checkpoints is not None and saved_at != trainer.step_count:
            save_checkpoint(trainer, checkpoints)
    finally:
        bar.close()
        trainer._progress = None
    if show and trainer.step_count > started_at:
        print(summary_line(trainer, started_at, time.perf_counter() - t_start))
    return trainer.history

def summary_line(trainer, started_at: int, seconds: float) -> str:
    """One line for the end of train(): steps, time, and how reward and KL moved."""
    first, last = trainer.history[-min(trainer.step_count - started_at, len(trainer.history))], trainer.history[-1]
    return (f"PPO: steps {started_at + 1}-{trainer.step_count} in {seconds:.0f} s "
            f"({seconds / (trainer.step_count - started_at):.2f} s/step); reward {first['env/score_mean']:.2f} -> "
            f"{last['env/score_mean']:.2f}, KL {last['objective/kl']:.2f} nats, "
            f"{last['ppo/response_tokens_mean']:.1f} tokens per response")

def train_step(trainer, prompts, eval_prompts) -> dict:
    """One iteration of train(): sample prompts, generate, score (fused into the rollout forward), step."""
    cfg = trainer.config
    t_start = time.perf_counter()
    if len(prompts) >= cfg.batch_size:
        picks = torch.randperm(len(prompts), generator=trainer.prompt_generator)[:cfg.batch_size]
    else:
        picks = torch.randint(len(prompts), (cfg.batch_size,), generator=trainer.prompt_generator)
    queries = [prompts[i] for i in picks.tolist()]
    responses = trainer.generate(queries, batch_size=cfg.generation_batch_size or cfg.batch_size)
    t_generate = time.perf_counter()
    batch = build_rollout_batch(queries, responses, trainer.pad_token_id, device=trainer.device)
    rollout = trainer.rollout_forward(batch, with_reward=True)
    scores = rollout.scores
    check_step_inputs(trainer.model, queries, responses, scores, cfg.batch_size, trainer.device)  # finite scores
    stats = trainer._step_on_rollout(batch, rollout, scores, responses, t_generate)
    # here the reward pass is part of time/ppo/rollout_forward (one fused forward, or right after it)
    stats["time/rollout/generate"] = t_generate - t_start
    extra = {}
    if eval_prompts is not None and cfg.eval_every and trainer.step_count % cfg.eval_every == 0:
        result = trainer.evaluate(eval_prompts)
        extra = {f"eval/{k}": v for k, v in result.items() if k != "samples"}
    return trainer.log_stats(stats, rewards=scores, extra=extra)

def training_prompts(trainer, prompts):
    if prompts is None:
        if trainer.dataset is None:
            raise MarlInputError("train() needs prompts: pass a list of 1-D token tensors, or build the trainer "
                                 "with dataset= (a dataset with an 'input_ids' column)")
        if isinstance(trainer.dataset, (list, tuple)):
            prompts = [row["input_ids"] if isinstance(row, dict) else row for row in trainer.dataset]
        else:  # a datasets.Dataset (or any mapping of columns)
            prompts = trainer.dataset["input_ids"]
    prompts = [p if torch.is_tensor(p) else torch.tensor(p, dtype=torch.long) for p in prompts]
    if not prompts:
        raise MarlInputError("train() got no prompts")
    check_token_lists(prompts, "prompts")
    return prompts
