"""PPO on one multi-adapter model: rollout, reward adapter, KL to the disabled base, clipped updates (notebook 03).

The step reads top to bottom like CleanRL's `ppo.py`:

    responses = trainer.generate(queries)                       # sample from the policy adapter
    scores = trainer.score(queries, responses)                  # reward adapter, at the last real token
    stats = trainer.step(queries, responses, scores)            # one PPO step:
        # 1. no-grad forward over the generated ids: old logprobs and values (policy), ref logprobs (adapters
        #    off), fused into one batched forward where peft allows (rollout.py)
        # 2. per-token rewards -beta * KL_t, plus the score at the last response token
        # 3. GAE advantages and returns, advantages whitened over the response tokens of all processes
        # 4. ppo_epochs over shuffled minibatches: clipped policy loss + vf_coef * clipped value loss
        # 5. KL controller update, statistics (masked means only)
    trainer.log_stats(stats, rewards=scores)                    # -> trainer.history (and trackers)

`train()` loops that with a progress bar, evaluation and checkpoints; there the reward pass joins the fused
rollout forward. Devices: every public method takes token tensors on any device and works on the
trainer's device (`trainer.device`); responses, scores and batches come back on that device. Precision:
every forward of a step (generation, rollout, reference, reward, training) runs under the same autocast,
so at step 0 policy == reference exactly. Dropout is off in the rollout and training forwards (so the
first epoch starts at ratio 1) by setting its probabilities to 0, not by eval mode, which would also turn
HF gradient checkpointing off (forward_modes.py).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from .errors import MarlInputError
from .forward_modes import eval_mode, train_mode_without_dropout
from .ppo_accelerator import build_accelerator, has_accelerator  # noqa: F401 - has_accelerator: public here too
from .ppo_config import PPOConfig
from .ppo_core import (AdaptiveKLController, FixedKLController, RunningMoments, build_rollout_batch, compute_gae,
                       compute_rewards, cut_after_eos, distinct_n, global_masked_moments, left_pad, masked_mean,
                       masked_whiten, policy_loss, value_loss)
from .ppo_eval import evaluate_policy
from .ppo_inputs import check_context, check_step_inputs, check_token_lists, check_trainer_inputs, generation_kwargs
from .ppo_optimizer import UpdateStepper
from .rollout import can_fuse, fused_rollout, policy_forward, separate_rollout


class PPOTrainer:
    """PPO for a policy LoRA adapter + value head, referenced by the disabled base, scored by the reward adapter.

    The trainer trains the policy adapter that is active when it is built (for a second policy on the same
    model, `set_policy_adapter` it and build a second trainer). `ref_model` (optional) replaces the disabled
    base as the reference. `step()` returns, all floats (means over the batch of every process; token means
    over response tokens only):
      objective/kl, objective/kl_coef, objective/non_score_reward   KL to the reference in nats per sequence,
          beta, and -beta * KL; objective/entropy: policy entropy per response token
      env/score_mean, env/score_std          raw reward-adapter scores (over all processes)
      env/reward_mean, env/reward_std        the scores PPO optimised (after penalties and clipping)
      env/short_response_frac, env/eos_frac  anti-collapse guard hits, responses that ended with EOS
      ppo/loss/{policy,value,total}, ppo/policy/{approxkl,clipfrac,ratio_mean}, ppo/val/{clipfrac,mean,
          explained_variance}, ppo/returns/mean, ppo/epochs (fewer than ppo_epochs after an early stop)
      ppo/policy/approxkl_first              of the first minibatch of the first epoch: ~0, else the training
          forward differs from the rollout (dropout, padding, temperature, precision)
      ppo/response_tokens_mean, ppo/distinct_2   collapse shows here first: short, repetitive responses
      time/ppo/{rollout_forward,optimize,total}  seconds; train() adds time/rollout/generate, and there the
          rollout forward includes the reward pass (fused into it where peft allows)
    """

    def __init__(self, config: PPOConfig, model, tokenizer, dataset=None, data_collator=None, optimizer=None,
                 ref_model=None):
        from accelerate.utils import set_seed

        check_trainer_inputs(config, model, tokenizer)
        self.config, self.tokenizer, self.ref_model = config, tokenizer, ref_model
        self.pad_token_id, self.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.accelerator = build_accelerator(config)  # processes, device, precision (ppo_accelerator.py)
        set_seed(config.seed + self.accelerator.process_index)  # each process samples its own rollouts
        self.prompt_generator = torch.Generator().manual_seed(config.seed)  # the same on every process

        self.model = model  # the plain model: generate, reference, compute_reward_score, save_pretrained
        self.policy_adapter_name = model.active_adapter
        if not any(p.requires_grad for p in model.trainable_parameters()):
            raise MarlInputError("the model has nothing to train: it was loaded with is_trainable=False (for "
                                 "inference); load it with from_pretrained(..., is_trainable=True)")
        if optimizer is None:
            # two parameter groups: a value head (and critic adapter) trained from scratch may want another rate
            optimizer = torch.optim.Adam([
                {"params": model.policy_parameters(), "lr": config.learning_rate},
                {"params": model.value_parameters(), "lr": config.value_head_learning_rate or config.learning_rate}])
        base = model.pretrained_model.get_base_model()
        placed = bool(getattr(base, "hf_device_map", None)) or getattr(base, "hf_quantizer", None) is not None
        # the prepared model is DDP-wrapped under several processes; it is only used for training forwards
        self.policy = self.accelerator.prepare_model(model, device_placement=not placed)
        self.optimizer = optimizer  # a plain torch optimizer, stepped by UpdateStepper (ppo_optimizer.py)
        self.stepper = UpdateStepper(self.accelerator, optimizer, model.trainable_parameters, config.max_grad_norm)
        if ref_model is not None:
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        self.fuse_rollout = self._choose_fused_rollout()
        self.kl_ctl = (AdaptiveKLController(config.init_kl_coef, config.target_kl, config.horizon)
                       if config.adap_kl_ctrl else FixedKLController(config.init_kl_coef))
        self.score_moments = RunningMoments()  # for config.normalize_scores
        self.dataset, self.dataloader = dataset, None
        if dataset is not None:
            loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
                                                 collate_fn=data_collator or _collate_dicts)
            self.dataloader = self.accelerator.prepare(loader)
        if config.log_with:
            self.accelerator.init_trackers("marl_ppo", config=config.to_dict())
        self.step_count, self.history, self._progress = 0, [], None
        self.prompts_digest = None  # of the prompts train() ran on, kept in checkpoints

    @property
    def device(self) -> torch.device:
        """Where the trainer works and where its outputs (responses, scores) live."""
        return self.accelerator.device

    @property
    def forward_rows(self) -> int:
        """Rows per no-grad forward (PPOConfig.forward_batch_size, default mini_batch_size)."""
        return self.config.forward_batch_size or self.config.mini_batch_size

    def _choose_fused_rollout(self) -> bool:
        """One batched forward for policy + reference (+ reward) rows, or separate passes: see rollout.py.

        Fused unless a separate `ref_model` is the reference (then there is nothing to share) or the fused
        forward would not give the separate passes' numbers (`rollout.can_fuse`). `PPOConfig.fused_rollout`
        turns it off, or insists on it.
        """
        wanted = self.config.fused_rollout
        why_not = "a separate ref_model is the reference" if self.ref_model is not None else can_fuse(self.model)
        if wanted and why_not:
            raise MarlInputError(f"PPOConfig.fused_rollout=True cannot be kept: {why_not}; use fused_rollout=None "
                                 "(the trainer decides) or False")
        return why_not is None if wanted is None else wanted

    def _activate_policy(self):
        # another trainer on the same model (notebook 05) may have switched adapters since our last call
        if self.model.active_adapter != self.policy_adapter_name:
            self.model.set_policy_adapter(self.policy_adapter_name)

    def _all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over processes (the tensor itself in one process): global token counts and moments."""
        return self.accelerator.reduce(tensor, "sum") if self.accelerator.num_processes > 1 else tensor

    # ------------------------------------------------------------------------------------------ rollout
    @torch.no_grad()
    def generate(self, query_tensors, batch_size: int = 4, return_prompt: bool = False, **gen_kwargs):
        """Sample a response for each prompt (list of 1-D token tensors in, list of 1-D tensors out).

        Prompts (on any device) are left-padded in chunks of `batch_size` (mask from lengths, so pad == eos is
        fine); each response, on the trainer's device, is cut after its first EOS (EOS kept). A single 1-D
        tensor in gives a single tensor out.
        """
        single = torch.is_tensor(query_tensors) and query_tensors.dim() == 1
        queries = [query_tensors] if single else list(query_tensors)
        check_token_lists(queries, "query_tensors")
        kwargs = generation_kwargs(self.config, gen_kwargs, self.pad_token_id, self.eos_token_id)
        longest = max(map(len, queries), default=0)
        check_context(self.model, longest + (kwargs.get("max_new_tokens") or 0), "a prompt plus max_new_tokens")
        self._activate_policy()
        outputs = []
        with eval_mode(self.model), self.accelerator.autocast():
            for start in range(0, len(queries), batch_size):
                chunk = [q.to(self.device) for q in queries[start:start + batch_size]]
                input_ids, attention_mask = left_pad(chunk, self.pad_token_id)
                generated = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
                for query, row in zip(chunk, generated[:, input_ids.shape[1]:]):
                    response = cut_after_eos(row, self.eos_token_id)
                    outputs.append(torch.cat([query, response]) if return_prompt else response)
        return outputs[0] if single else outputs

    @torch.no_grad()
    def score(self, queries, responses) -> torch.Tensor:
        """[B] float32 reward-adapter scores of query + response (any device in, the trainer's device out)."""
        self._activate_policy()
        scores = []
        with self.accelerator.autocast():
            for start in range(0, len(queries), self.forward_rows):
                end = start + self.forward_rows
                batch = build_rollout_batch(queries[start:end], responses[start:end], self.pad_token_id,
                                            device=self.device)
                scores.append(self.model.compute_reward_score(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], ppo_adapter_name=self.policy_adapter_name))
        return torch.cat(scores).float()

    def rollout_forward(self, batch: dict, with_reward: bool = False):
        """Step 1 of `step`: old logprobs, values and reference logprobs at the response positions ([B,R]).

        `with_reward` also scores the rows with the reward adapter in the same fused forward (train() uses it).
        """
        chunk = self.forward_rows
        with torch.no_grad(), self.accelerator.autocast():
            if self.fuse_rollout:
                with eval_mode(self.model):  # peft runs per-row adapters in eval mode only; dropout is off there
                    return fused_rollout(self.model, batch, chunk, self.config.temperature, with_reward)
            with train_mode_without_dropout(self.model):  # the mode of the training forward (see forward_modes)
                rollout = separate_rollout(self.model, self.policy, batch, chunk, self.config.temperature,
                                           self.ref_model)
        if with_reward:
            rollout.scores = self.score_batch(batch)
        return rollout

    @torch.no_grad()
    def score_batch(self, batch: dict) -> torch.Tensor:
        """[B] reward-adapter scores of a rollout batch (the rows as `build_rollout_batch` laid them out)."""
        scores = []
        with self.accelerator.autocast():
            rows_all = torch.arange(batch["input_ids"].shape[0], device=self.device)
            for rows in rows_all.split(self.forward_rows):
                scores.append(self.model.compute_reward_score(
                    input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
                    position_ids=batch["position_ids"][rows], ppo_adapter_name=self.policy_adapter_name))
        return torch.cat(scores).float()

    # ------------------------------------------------------------------------------------------ PPO step
    def shape_scores(self, responses, scores: torch.Tensor):
        """Scores PPO optimises: raw score (optionally normalised) + anti-collapse / missing-EOS penalties, clipped.

        All of it is off by default (PPOConfig); the profiles turn the short-response penalty on. A reward hack
        seen in practice: the policy learns one short stock sentence plus EOS, which the reward adapter likes
        and the KL penalty barely notices (few tokens, few nats). Responses shorter than `min_response_tokens`
        pay `short_response_penalty`. This is unbiased, unlike forcing length with min_new_tokens, which would
        sample from a distribution other than the policy's.
        """
        if self.config.normalize_scores:
            self.score_moments.update(self.accelerator.gather(scores))  # all processes' scores
            scores = (scores - self.score_moments.mean) / self.score_moments.std
        lengths = torch.tensor([len(r) for r in responses], device=scores.device)
        short = lengths < self.config.min_response_tokens
        shaped = scores + self.config.short_response_penalty * short
        ends_with_eos = torch.tensor([self.eos_token_id is not None and len(r) > 0 and int(r[-1]) == self.eos_token_id
                                      for r in responses], device=scores.device)
        if self.config.missing_eos_penalty is not None:
            shaped = shaped + self.config.missing_eos_penalty * ~ends_with_eos
        if self.config.score_clip is not None:
            shaped = shaped.clamp(-self.config.score_clip, self.config.score_clip)
        return shaped, {"env/short_response_frac": short.float().mean().item(),
                        "env/eos_frac": ends_with_eos.float().mean().item()}

    def step(self, queries, responses, scores) -> dict:
        """One PPO step on batch_size rollouts (tensors on any device): returns the statistics (floats)."""
        raw_scores = check_step_inputs(self.model, queries, responses, scores, self.config.batch_size, self.device)
        responses = [cut_after_eos(r, self.eos_token_id) for r in responses]  # anything after EOS is padding
        self._activate_policy()
        t_start = time.perf_counter()
        batch = build_rollout_batch(queries, responses, self.pad_token_id, device=self.device)
        rollout = self.rollout_forward(batch)  # 1. old logprobs, values, reference logprobs
        return self._step_on_rollout(batch, rollout, raw_scores, responses, t_start)

    def _step_on_rollout(self, batch, rollout, raw_scores, responses, t_start) -> dict:
        cfg, accelerator = self.config, self.accelerator
        mask = rollout.mask
        state_before = self.stepper.snapshot(self.score_moments.state_dict())  # put back if the step fails
        scores, stats = self.shape_scores(responses, raw_scores)
        # 2. per-token rewards; 3. advantages (whitened with the moments of all processes' tokens)
        kl_coef = self.kl_ctl.value
        rewards, kl = compute_rewards(scores, rollout.logprobs, rollout.ref_logprobs, mask, kl_coef, cfg.kl_estimator)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce_sum=self._all_reduce_sum)
        advantages, returns = compute_gae(rewards, rollout.values, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask, all_reduce_sum=self._all_reduce_sum)
        t_rollout = time.perf_counter()

        # 4. PPO epochs over shuffled minibatches
        try:
            epoch_stats, first_approxkl, epochs_run = self._ppo_epochs(batch, rollout, advantages, returns)
        except FloatingPointError:
            self.score_moments.load_state_dict(self.stepper.restore(state_before))
            raise
        t_optimize = time.perf_counter()

        # 5. statistics (masked means: padding never counts) and the KL controller
        means = torch.stack(epoch_stats).mean(0).tolist()
        kl_per_sequence = kl.sum(-1)
        lengths = torch.tensor([float(len(r)) for r in responses])
        all_scores = accelerator.gather(raw_scores) if accelerator.num_processes > 1 else raw_scores
        _, var_returns = global_masked_moments(returns, mask, self._all_reduce_sum)
        _, var_residual = global_masked_moments(returns - rollout.values, mask, self._all_reduce_sum)
        stats.update({
            "objective/kl": kl_per_sequence.mean().item(),
            "objective/kl_coef": kl_coef,
            "objective/entropy": masked_mean(rollout.entropy, mask).item(),
            "objective/non_score_reward": (-kl_coef * kl_per_sequence).mean().item(),
            "ppo/loss/policy": means[0], "ppo/loss/value": means[1], "ppo/loss/total": means[2],
            "ppo/policy/approxkl": means[3], "ppo/policy/clipfrac": means[4], "ppo/val/clipfrac": means[5],
            "ppo/policy/ratio_mean": means[6],
            "ppo/policy/approxkl_first": first_approxkl,
            "ppo/val/mean": masked_mean(rollout.values, mask).item(),
            "ppo/val/explained_variance": (1 - var_residual / var_returns.clamp(min=1e-8)).item(),
            "ppo/returns/mean": masked_mean(returns, mask).item(),
            "ppo/epochs": float(epochs_run),
            "env/reward_mean": scores.mean().item(), "env/reward_std": scores.std().item() if len(scores) > 1 else 0.0,
            "env/score_mean": all_scores.mean().item(),
            "env/score_std": all_scores.std().item() if len(all_scores) > 1 else 0.0,
            "ppo/response_tokens_mean": lengths.mean().item(),
            "ppo/distinct_2": distinct_n(responses, 2),
        })
        stats = self._reduce(stats)
        self.kl_ctl.update(stats["objective/kl"], cfg.batch_size * accelerator.num_processes)
        self.step_count += 1
        stats.update({"time/ppo/rollout_forward": t_rollout - t_start, "time/ppo/optimize": t_optimize - t_rollout,
                      "time/ppo/total": time.perf_counter() - t_start})
        return stats

    def _ppo_epochs(self, batch, rollout, advantages, returns):
        """ppo_epochs passes over shuffled minibatches; one optimizer step per backward batch of
        mini_batch_size * gradient_accumulation_steps rollouts. Returns (per-minibatch stats, first approx KL,
        epochs run)."""
        cfg, accelerator = self.config, self.accelerator
        mask = rollout.mask
        epoch_stats, first_approxkl, epochs_run = [], None, 0
        # with a critic adapter every training forward runs [policy rows; critic rows] (critic.py); the context
        # spans the backward passes too, which recompute layers under gradient checkpointing
        critic_rows = self.model.critic_rows() if self.model.critic_adapter else contextlib.nullcontext()
        with train_mode_without_dropout(self.model), accelerator.autocast(), critic_rows:
            for epoch in range(cfg.ppo_epochs):
                order = torch.randperm(cfg.batch_size).to(self.device)
                per_epoch = []
                for group in order.split(cfg.backward_batch_size):
                    group_tokens = self._all_reduce_sum(mask[group].sum()).clamp(min=1)
                    minibatches = group.split(cfg.mini_batch_size)
                    for i, rows in enumerate(minibatches):
                        # DDP averages gradients over processes at the last backward of the group only
                        sync = i == len(minibatches) - 1
                        with contextlib.nullcontext() if sync else accelerator.no_sync(self.policy):
                            new_logprobs, new_values, _ = policy_forward(self.policy, batch, rows, cfg.temperature)
                            m = mask[rows]
                            pg_loss, pg_stats = policy_loss(new_logprobs, rollout.logprobs[rows], advantages[rows], m,
                                                            cfg.cliprange)
                            vf_loss, vf_stats = value_loss(new_values, rollout.values[rows], returns[rows], m,
                                                           cfg.cliprange_value)
                            loss = pg_loss + cfg.vf_coef * vf_loss
                            self.stepper.check_finite(loss)
                            # Token-weighted: the group's minibatches, over all processes, sum to the masked mean
                            # over the group's tokens, exactly what one big minibatch would give (DDP divides the
                            # summed gradients by the number of processes, hence the factor).
                            weight = m.sum() / group_tokens * accelerator.num_processes
                            self.stepper.backward(loss * weight)
                        if first_approxkl is None:
                            first_approxkl = pg_stats["approxkl"].item()
                        per_epoch.append(torch.stack([
                            pg_loss.detach(), vf_loss.detach(), loss.detach(), pg_stats["approxkl"],
                            pg_stats["clipfrac"], vf_stats["clipfrac"], pg_stats["ratio_mean"]]).float())
                    self.stepper.step()
                epoch_stats += per_epoch
                epochs_run = epoch + 1
                if cfg.early_stopping:
                    # decided on the mean over processes: DDP processes must run the same number of backwards
                    epoch_kl = accelerator.reduce(torch.stack(per_epoch)[:, 3].mean(), "mean")
                    if epoch_kl > cfg.target_kl_early_stop:
                        break
        return epoch_stats, first_approxkl, epochs_run

    def _reduce(self, stats: dict) -> dict:
        """Average the statistics over processes (a no-op in a single process)."""
        if self.accelerator.num_processes == 1:
            return stats
        keys = sorted(stats)
        values = self.accelerator.reduce(torch.tensor([stats[k] for k in keys], device=self.device), "mean")
        return dict(zip(keys, values.tolist()))

    def log_stats(self, stats: dict, batch=None, rewards=None, extra: dict | None = None) -> dict:
        """Record one step in `history` (and the progress bar / tracker); returns the recorded entry.

        `extra` (e.g. the eval/* numbers of this step) joins the entry before it goes to the trackers.
        """
        entry = {"step": self.step_count, **stats, **(extra or {})}
        if rewards is not None and "env/reward_mean" not in stats:
            entry["env/reward_mean"] = float(torch.as_tensor(rewards, dtype=torch.float32).mean())
        if isinstance(batch, dict) and batch.get("response"):
            entry["sample/query"] = str(batch.get("query", [""])[0])
            entry["sample/response"] = str(batch["response"][0])
        self.history.append(entry)
        if self._progress is not None:
            self._progress.set_postfix(reward=f"{entry.get('env/score_mean', float('nan')):.2f}",
                                       kl=f"{entry.get('objective/kl', float('nan')):.2f}",
                                       len=f"{entry.get('ppo/response_tokens_mean', float('nan')):.1f}")
        if self.config.log_with:
            self.accelerator.log({k: v for k, v in entry.items() if isinstance(v, (int, float))}, step=self.step_count)
        return entry

    # ------------------------------------------------------------------------------------------ the loop
    def train(self, prompts=None, steps=None, eval_prompts=None, callback=None, progress: bool = True,
              output_dir=None, resume: bool = False) -> list:
        """Run PPO until `step_count` reaches `steps` (default config.steps): rollout -> reward -> step.

        `prompts` (1-D token tensors; default: the dataset's "input_ids") is the whole prompt set: under
        several processes each trains on its own shard (every world_size-th prompt). Each step samples
        batch_size prompts of the shard with the trainer's seeded generator. Every config.eval_every steps
        `evaluate(eval_prompts)` is added to the step's history entry as eval/*; with `output_dir`, a
        checkpoint goes to OUT/checkpoints every config.save_every steps and at the end, and `resume=True`
        continues from the latest one there (refused if it ran with other settings or prompts).
        `callback(trainer, entry)` runs after each step; returning True stops training. Returns `history`.
        """
        from .progress import progress_bar

        from .checkpoint import latest_checkpoint, load_checkpoint, prompts_fingerprint, save_checkpoint

        cfg = self.config
        prompts = self._training_prompts(prompts)
        self.prompts_digest = prompts_fingerprint(prompts)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
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
                load_checkpoint(self, found)
            elif self.accelerator.is_main_process:
                print(f"no checkpoint under {output_dir}: starting from step {self.step_count}")
        saved_at, started_at, t_start = self.step_count, self.step_count, time.perf_counter()
        show = progress and self.accelerator.is_main_process
        # leave=False: the bar (a widget in Jupyter) goes away when done and a line of text stays, so a saved
        # notebook reopens without "Error displaying widget"
        bar = progress_bar(total=total, initial=min(self.step_count, total), desc="PPO", disable=not show, leave=False)
        self._progress = bar
        try:
            while self.step_count < total:
                entry = self._train_step(prompts, eval_prompts)
                if checkpoints is not None and cfg.save_every and self.step_count % cfg.save_every == 0:
                    save_checkpoint(self, checkpoints)
                    saved_at = self.step_count
                bar.update(1)
                if callback is not None and callback(self, entry) is True:
                    break
            if checkpoints is not None and saved_at != self.step_count:
                save_checkpoint(self, checkpoints)
        finally:
            bar.close()
            self._progress = None
        if show and self.step_count > started_at:
            print(self._summary_line(started_at, time.perf_counter() - t_start))
        return self.history

    def _summary_line(self, started_at: int, seconds: float) -> str:
        """One line for the end of train(): steps, time, and how reward and KL moved."""
        first, last = self.history[-min(self.step_count - started_at, len(self.history))], self.history[-1]
        return (f"PPO: steps {started_at + 1}-{self.step_count} in {seconds:.0f} s "
                f"({seconds / (self.step_count - started_at):.2f} s/step); reward {first['env/score_mean']:.2f} -> "
                f"{last['env/score_mean']:.2f}, KL {last['objective/kl']:.2f} nats, "
                f"{last['ppo/response_tokens_mean']:.1f} tokens per response")

    def _train_step(self, prompts, eval_prompts) -> dict:
        """One iteration of train(): sample prompts, generate, score (fused into the rollout forward), step."""
        cfg = self.config
        t_start = time.perf_counter()
        if len(prompts) >= cfg.batch_size:
            picks = torch.randperm(len(prompts), generator=self.prompt_generator)[:cfg.batch_size]
        else:
            picks = torch.randint(len(prompts), (cfg.batch_size,), generator=self.prompt_generator)
        queries = [prompts[i] for i in picks.tolist()]
        responses = self.generate(queries, batch_size=cfg.generation_batch_size or cfg.batch_size)
        t_generate = time.perf_counter()
        batch = build_rollout_batch(queries, responses, self.pad_token_id, device=self.device)
        rollout = self.rollout_forward(batch, with_reward=True)
        scores = rollout.scores
        check_step_inputs(self.model, queries, responses, scores, cfg.batch_size, self.device)  # finite scores
        stats = self._step_on_rollout(batch, rollout, scores, responses, t_generate)
        # here the reward pass is part of time/ppo/rollout_forward (one fused forward, or right after it)
        stats["time/rollout/generate"] = t_generate - t_start
        extra = {}
        if eval_prompts is not None and cfg.eval_every and self.step_count % cfg.eval_every == 0:
            result = self.evaluate(eval_prompts)
            extra = {f"eval/{k}": v for k, v in result.items() if k != "samples"}
        return self.log_stats(stats, rewards=scores, extra=extra)

    def _training_prompts(self, prompts):
        if prompts is None:
            if self.dataset is None:
                raise MarlInputError("train() needs prompts: pass a list of 1-D token tensors, or build the trainer "
                                     "with dataset= (a dataset with an 'input_ids' column)")
            if isinstance(self.dataset, (list, tuple)):
                prompts = [row["input_ids"] if isinstance(row, dict) else row for row in self.dataset]
            else:  # a datasets.Dataset (or any mapping of columns)
                prompts = self.dataset["input_ids"]
        prompts = [p if torch.is_tensor(p) else torch.tensor(p, dtype=torch.long) for p in prompts]
        if not prompts:
            raise MarlInputError("train() got no prompts")
        check_token_lists(prompts, "prompts")
        return prompts

    def evaluate(self, prompts, seed: int | None = None, num_samples: int = 8) -> dict:
        """Sample once per held-out prompt with a fixed seed: mean reward, KL, length, diversity (ppo_eval.py)."""
        return evaluate_policy(self, prompts, seed=seed, num_samples=num_samples)

    def save_checkpoint(self, checkpoints_dir):
        """Write a checkpoint to checkpoints_dir/step-NNNNNN and point checkpoints_dir/latest at it."""
        from .checkpoint import save_checkpoint

        return save_checkpoint(self, checkpoints_dir)

    def resume(self, path):
        """Restore the latest checkpoint under `path` (a run's output_dir, its checkpoints/, or one step-* folder)."""
        from .checkpoint import load_checkpoint

        return load_checkpoint(self, path)


def _collate_dicts(rows):
    """List of dataset rows (dicts) -> dict of lists: tensors stay separate, prompts differ in length."""
    if isinstance(rows[0], dict):
        return {key: [row[key] for row in rows] for key in rows[0]}
    return list(rows)
