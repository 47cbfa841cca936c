"""PPO on one multi-adapter model: rollout, reward adapter, KL to the disabled base, clipped updates (notebook 03).

The step reads top to bottom like CleanRL's `ppo.py`:

    responses = trainer.generate(queries)                       # sample from the policy adapter
    scores = trainer.score(queries, responses)                  # reward adapter, at the last real token
    stats = trainer.step(queries, responses, scores)            # one PPO step:
        # 1. forward over the generated ids: old logprobs and values (policy), ref logprobs (adapters off)
        # 2. per-token rewards -beta * KL_t, plus the score at the last response token
        # 3. GAE advantages and returns, advantages whitened over the batch's response tokens
        # 4. ppo_epochs over shuffled minibatches: clipped policy loss + vf_coef * clipped value loss
        # 5. KL controller update, statistics (masked means only)
    trainer.log_stats(stats, batch, scores)         # -> trainer.history

`train()` loops that with a progress bar, evaluation and checkpoints. Every forward pass runs with the
model in eval mode: dropout (in the base, the LoRA layers and the value head) would make the training
forward differ from the rollout forward, so the first epoch would not start at ratio 1. Gradients flow
in eval mode all the same.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from pathlib import Path

import torch

from .errors import MarlInputError
from .ppo_config import PPOConfig
from .ppo_core import (AdaptiveKLController, FixedKLController, RunningMoments, build_rollout_batch, compute_gae,
                       compute_rewards, cut_after_eos, distinct_n, entropy_from_logits, explained_variance, kl_penalty,
                       left_pad, logprobs_from_logits, masked_mean, masked_whiten, policy_loss, value_loss)
from .ppo_inputs import check_context, check_step_inputs, check_token_lists, generation_kwargs


@contextlib.contextmanager
def eval_mode(model):
    """Dropout off for the duration (every submodule), then each module's mode as it was."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


class PPOTrainer:
    """PPO for a policy LoRA adapter + value head, referenced by the disabled base, scored by the reward adapter.

    The trainer trains the policy adapter that is active when it is built (for a second policy on the same
    model, `set_policy_adapter` it and build a second trainer). `ref_model` (optional) replaces the disabled
    base as the reference. `step()` returns, all floats (means over the batch; token means over response
    tokens only):
      objective/kl, objective/kl_coef, objective/non_score_reward   KL to the reference in nats per sequence,
          beta, and -beta * KL; objective/entropy: policy entropy per response token
      env/score_mean, env/score_std          raw reward-adapter scores
      env/reward_mean, env/reward_std        the scores PPO optimised (after penalties and clipping)
      env/short_response_frac, env/eos_frac  anti-collapse guard hits, responses that ended with EOS
      ppo/loss/{policy,value,total}, ppo/policy/{approxkl,clipfrac,ratio_mean}, ppo/val/{clipfrac,mean,
          explained_variance}, ppo/returns/mean, ppo/epochs (fewer than ppo_epochs after an early stop)
      ppo/policy/approxkl_first              of the first minibatch of the first epoch: ~0, else the training
          forward differs from the rollout (dropout, padding, temperature)
      ppo/response_tokens_mean, ppo/distinct_2   collapse shows here first: short, repetitive responses
      time/ppo/{rollout_forward,optimize,total}  seconds (train() adds time/rollout/{generate,score})
    """

    def __init__(self, config: PPOConfig, model, tokenizer, dataset=None, data_collator=None, optimizer=None,
                 ref_model=None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, GradientAccumulationPlugin, set_seed

        if not isinstance(config, PPOConfig):
            raise MarlInputError(f"config must be a marl_utils.PPOConfig, got {type(config).__name__}")
        if tokenizer.pad_token_id is None:
            raise MarlInputError("the tokenizer has no pad token: set one before building the trainer, e.g. "
                                 "tokenizer.pad_token = tokenizer.eos_token (safe: masks are built from lengths)")
        if tokenizer.eos_token_id is None:
            warnings.warn("the tokenizer has no eos token: responses always run to max_new_tokens")
        for method in ("compute_reward_score", "trainable_parameters", "reference"):
            if not hasattr(model, method):
                raise MarlInputError(f"model must be a marl_utils.AutoModelForCausalLMWithValueHead (it lacks "
                                     f"{method}); got {type(model).__name__}")
        self.config, self.tokenizer, self.ref_model = config, tokenizer, ref_model
        self.pad_token_id, self.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        # sync_with_dataloader=False: the end of a user's dataloader must not cut an accumulation group short
        plugin = GradientAccumulationPlugin(num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False)
        # Accelerate only runs several CPU processes (gloo) when told cpu=True; torchrun alone would give
        # independent, unsynchronised copies on a machine without an accelerator.
        cpu_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()
        self.accelerator = Accelerator(gradient_accumulation_plugin=plugin, log_with=config.log_with,
                                       project_dir=config.logging_dir, cpu=cpu_processes)
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            # model and optimizer are prepared apart (the model also serves generate, reference and reward), so
            # there is no DeepSpeed engine, and backward() would fail after the first rollout
            raise MarlInputError("PPOTrainer runs data-parallel (DDP), not under DeepSpeed: launch it without a "
                                 "DeepSpeed config (`accelerate config`: multi-GPU, DeepSpeed no). With LoRA on a "
                                 "frozen base the state ZeRO-2 would shard is only the adapter, value head and Adam")
        set_seed(config.seed + self.accelerator.process_index)  # each process samples its own rollouts
        self.prompt_generator = torch.Generator().manual_seed(config.seed + self.accelerator.process_index)

        self.model = model  # the plain model: generate, reference, compute_reward_score, save_pretrained
        self.policy_adapter_name = model.active_adapter
        if not any(p.requires_grad for p in model.trainable_parameters()):
            raise MarlInputError("the model has nothing to train: it was loaded with is_trainable=False (for "
                                 "inference); load it with from_pretrained(..., is_trainable=True)")
        if optimizer is None:
            # two parameter groups: a value head trained from scratch may want another rate than the LoRA
            optimizer = torch.optim.Adam([
                {"params": model.policy_parameters(), "lr": config.learning_rate},
                {"params": list(model.v_head.parameters()),
                 "lr": config.value_head_learning_rate or config.learning_rate}])
        base = model.pretrained_model.get_base_model()
        placed = bool(getattr(base, "hf_device_map", None)) or getattr(base, "hf_quantizer", None) is not None
        # the prepared model is DDP-wrapped under several processes; it is only used for training forwards
        self.policy = self.accelerator.prepare_model(model, device_placement=not placed)
        self.optimizer = self.accelerator.prepare_optimizer(optimizer)
        if ref_model is not None:
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
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

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def _activate_policy(self):
        # another trainer on the same model (notebook 05) may have switched adapters since our last call
        if self.model.active_adapter != self.policy_adapter_name:
            self.model.set_policy_adapter(self.policy_adapter_name)

    # ------------------------------------------------------------------------------------------ rollout
    @torch.no_grad()
    def generate(self, query_tensors, batch_size: int = 4, return_prompt: bool = False, **gen_kwargs):
        """Sample a response for each prompt (list of 1-D token tensors in, list of 1-D tensors out).

        Prompts are left-padded in chunks of `batch_size` (mask from lengths, so pad == eos is fine); each
        response is cut after its first EOS (EOS kept). A single 1-D tensor in gives a single tensor out.
        """
        single = torch.is_tensor(query_tensors) and query_tensors.dim() == 1
        queries = [query_tensors] if single else list(query_tensors)
        check_token_lists(queries, "query_tensors")
        kwargs = generation_kwargs(self.config, gen_kwargs, self.pad_token_id, self.eos_token_id)
        longest = max(map(len, queries), default=0)
        check_context(self.model, longest + (kwargs.get("max_new_tokens") or 0), "a prompt plus max_new_tokens")
        self._activate_policy()
        outputs = []
        with eval_mode(self.model):
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
        """[B] reward-adapter scores of query + response, read at each row's last real token."""
        self._activate_policy()
        scores = []
        for start in range(0, len(queries), self.config.mini_batch_size):
            end = start + self.config.mini_batch_size
            batch = build_rollout_batch([q.to(self.device) for q in queries[start:end]],
                                        [r.to(self.device) for r in responses[start:end]], self.pad_token_id)
            scores.append(self.model.compute_reward_score(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], ppo_adapter_name=self.policy_adapter_name))
        return torch.cat(scores).float()

    def _forward(self, model, batch, rows, with_values: bool = True):
        """(logprobs, values, logits / T) of `rows` of the batch, all over positions 0..W-2 ([b,W-1], [b,W-1,V])."""
        input_ids = batch["input_ids"][rows]
        inputs = dict(input_ids=input_ids, attention_mask=batch["attention_mask"][rows],
                      position_ids=batch["position_ids"][rows])
        out = model(**inputs)
        logits = out[0] if isinstance(out, tuple) else out.logits
        logits = logits[:, :-1].float() / self.config.temperature  # logits at t predict token t+1
        values = out[2][:, :-1] if with_values else None
        return logprobs_from_logits(logits, input_ids[:, 1:]), values, logits

    @torch.no_grad()
    def _reference_logprobs(self, batch, rows) -> torch.Tensor:
        if self.ref_model is not None:
            with eval_mode(self.ref_model):
                logprobs, _, _ = self._forward(self.ref_model, batch, rows, with_values=False)
            return logprobs
        with self.model.reference() as reference:
            logprobs, _, _ = self._forward(reference, batch, rows, with_values=False)
        return logprobs

    # ------------------------------------------------------------------------------------------ PPO step
    def shape_scores(self, responses, scores: torch.Tensor):
        """Scores PPO optimises: raw score (optionally normalised) + anti-collapse / missing-EOS penalties, clipped.

        A reward hack seen in practice: the policy learns one short stock sentence plus EOS, which the reward
        adapter likes and the KL penalty barely notices (few tokens, few nats). Responses shorter than
        `min_response_tokens` tokens pay `short_response_penalty`. This is unbiased, unlike forcing length
        with min_new_tokens, which would sample from a distribution other than the policy's.
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
        """One PPO step on batch_size rollouts: returns the statistics (floats) of the step."""
        cfg, accelerator = self.config, self.accelerator
        raw_scores = check_step_inputs(self.model, queries, responses, scores, cfg.batch_size, self.device)
        responses = [cut_after_eos(r, self.eos_token_id) for r in responses]  # anything after EOS is padding
        self._activate_policy()
        t_start = time.perf_counter()
        scores, stats = self.shape_scores(responses, raw_scores)
        batch = build_rollout_batch([q.to(self.device) for q in queries], [r.to(self.device) for r in responses],
                                    self.pad_token_id)
        mask = batch["response_mask"]
        rows_all = torch.arange(cfg.batch_size, device=self.device)
        minibatches = list(rows_all.split(cfg.mini_batch_size))

        # 1. rollout forward: old logprobs, values and the reference's logprobs over the generated ids
        with torch.no_grad(), eval_mode(self.model):
            logprobs, values, entropy = [], [], []
            for rows in minibatches:  # [b,W-1] each; the [b,W,V] logits are dropped right away
                rollout_logprobs, rollout_values, logits = self._forward(self.policy, batch, rows)
                logprobs.append(rollout_logprobs)
                values.append(rollout_values)
                entropy.append(entropy_from_logits(logits))
            logprobs, values, entropy = torch.cat(logprobs), torch.cat(values), torch.cat(entropy)
            ref_logprobs = torch.cat([self._reference_logprobs(batch, rows) for rows in minibatches])
        # 2. per-token rewards; 3. advantages
        kl_coef = self.kl_ctl.value
        rewards, kl = compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, cfg.kl_estimator)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = compute_gae(rewards, values, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask)
        t_rollout = time.perf_counter()

        # 4. PPO epochs over shuffled minibatches, one optimizer step per backward batch
        epoch_stats, first_approxkl, epochs_run = [], None, 0
        with eval_mode(self.model):
            for epoch in range(cfg.ppo_epochs):
                order = torch.randperm(cfg.batch_size).to(self.device)
                per_epoch = []
                for group in order.split(cfg.backward_batch_size):
                    group_tokens = mask[group].sum().clamp(min=1)
                    for rows in group.split(cfg.mini_batch_size):
                        with accelerator.accumulate(self.policy):
                            new_logprobs, new_values, _ = self._forward(self.policy, batch, rows)
                            m = mask[rows]
                            pg_loss, pg_stats = policy_loss(new_logprobs, logprobs[rows], advantages[rows], m,
                                                            cfg.cliprange)
                            vf_loss, vf_stats = value_loss(new_values, values[rows], returns[rows], m,
                                                           cfg.cliprange_value)
                            loss = pg_loss + cfg.vf_coef * vf_loss
                            if not torch.isfinite(loss):
                                raise FloatingPointError("the PPO loss is not finite; the update was stopped. Lower "
                                                         "learning_rate or set max_grad_norm / score_clip")
                            # Token-weighted: the group's minibatches sum to its masked mean, exactly what one
                            # big minibatch would give (accelerate divides by the accumulation steps, undo it).
                            weight = m.sum() / group_tokens * cfg.gradient_accumulation_steps
                            accelerator.backward(loss * weight)
                            if accelerator.sync_gradients and cfg.max_grad_norm is not None:
                                accelerator.clip_grad_norm_(self.model.trainable_parameters(), cfg.max_grad_norm)
                            self.optimizer.step()
                            self.optimizer.zero_grad()
                        if first_approxkl is None:
                            first_approxkl = pg_stats["approxkl"].item()
                        per_epoch.append(torch.stack([
                            pg_loss.detach(), vf_loss.detach(), loss.detach(), pg_stats["approxkl"],
                            pg_stats["clipfrac"], vf_stats["clipfrac"], pg_stats["ratio_mean"]]))
                epoch_stats += per_epoch
                epochs_run = epoch + 1
                if cfg.early_stopping:
                    # decided on the mean over processes: DDP processes must run the same number of backwards
                    epoch_kl = accelerator.reduce(torch.stack(per_epoch)[:, 3].mean(), "mean")
                    if epoch_kl > cfg.target_kl_early_stop:
                        break
        t_optimize = time.perf_counter()

        # 5. statistics (masked means: padding never counts) and the KL controller
        means = torch.stack(epoch_stats).mean(0).tolist()
        kl_per_sequence = kl.sum(-1)
        lengths = torch.tensor([float(len(r)) for r in responses])
        stats.update({
            "objective/kl": kl_per_sequence.mean().item(),
            "objective/kl_coef": kl_coef,
            "objective/entropy": masked_mean(entropy, mask).item(),
            "objective/non_score_reward": (-kl_coef * kl_per_sequence).mean().item(),
            "ppo/loss/policy": means[0], "ppo/loss/value": means[1], "ppo/loss/total": means[2],
            "ppo/policy/approxkl": means[3], "ppo/policy/clipfrac": means[4], "ppo/val/clipfrac": means[5],
            "ppo/policy/ratio_mean": means[6],
            "ppo/policy/approxkl_first": first_approxkl,
            "ppo/val/mean": masked_mean(values, mask).item(),
            "ppo/val/explained_variance": explained_variance(values, returns, mask).item(),
            "ppo/returns/mean": masked_mean(returns, mask).item(),
            "ppo/epochs": float(epochs_run),
            "env/reward_mean": scores.mean().item(), "env/reward_std": scores.std().item() if len(scores) > 1 else 0.0,
            "env/score_mean": raw_scores.mean().item(),
            "env/score_std": raw_scores.std().item() if len(raw_scores) > 1 else 0.0,
            "ppo/response_tokens_mean": lengths.mean().item(),
            "ppo/distinct_2": distinct_n(responses, 2),
        })
        stats = self._reduce(stats)
        self.kl_ctl.update(stats["objective/kl"], cfg.batch_size * accelerator.num_processes)
        self.step_count += 1
        stats.update({"time/ppo/rollout_forward": t_rollout - t_start, "time/ppo/optimize": t_optimize - t_rollout,
                      "time/ppo/total": time.perf_counter() - t_start})
        return stats

    def _reduce(self, stats: dict) -> dict:
        """Average the statistics over processes (a no-op in a single process)."""
        if self.accelerator.num_processes == 1:
            return stats
        keys = sorted(stats)
        values = self.accelerator.reduce(torch.tensor([stats[k] for k in keys], device=self.device), "mean")
        return dict(zip(keys, values.tolist()))

    def log_stats(self, stats: dict, batch=None, rewards=None) -> dict:
        """Record one step in `history` (and the progress bar / tracker); returns the recorded entry."""
        entry = {"step": self.step_count, **stats}
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

        Each step samples batch_size prompts (1-D token tensors; default: the dataset's "input_ids") with the
        trainer's seeded generator. Every config.eval_every steps `evaluate(eval_prompts)` is added to the
        step's history entry as eval/*; with `output_dir`, a checkpoint goes to OUT/checkpoints every
        config.save_every steps and at the end, and `resume=True` continues from the latest one there.
        `callback(trainer, entry)` runs after each step; returning True stops training. Returns `history`.
        """
        from tqdm.auto import tqdm

        from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

        cfg = self.config
        prompts = self._training_prompts(prompts)
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
        saved_at = self.step_count
        bar = tqdm(total=total, initial=min(self.step_count, total), desc="PPO",
                   disable=not progress or not self.accelerator.is_main_process)
        self._progress = bar
        try:
            while self.step_count < total:
                t_start = time.perf_counter()
                if len(prompts) >= cfg.batch_size:
                    picks = torch.randperm(len(prompts), generator=self.prompt_generator)[:cfg.batch_size]
                else:
                    picks = torch.randint(len(prompts), (cfg.batch_size,), generator=self.prompt_generator)
                queries = [prompts[i] for i in picks.tolist()]
                responses = self.generate(queries, batch_size=cfg.mini_batch_size)
                t_generate = time.perf_counter()
                scores = self.score(queries, responses)
                t_score = time.perf_counter()
                stats = self.step(queries, responses, scores)
                stats["time/rollout/generate"], stats["time/rollout/score"] = t_generate - t_start, t_score - t_generate
                entry = self.log_stats(stats, rewards=scores)
                if eval_prompts is not None and cfg.eval_every and self.step_count % cfg.eval_every == 0:
                    result = self.evaluate(eval_prompts)
                    entry.update({f"eval/{k}": v for k, v in result.items() if k != "samples"})
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
        return self.history

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

    @torch.no_grad()
    def evaluate(self, prompts, seed: int | None = None, num_samples: int = 8) -> dict:
        """Sample once per held-out prompt with a fixed seed; mean reward, KL, length and diversity.

        The seed (default config.seed) fixes the sampling noise, so before/after numbers are comparable;
        the trainer's own RNG streams are left untouched. KL is in nats per sequence (config.kl_estimator).
        """
        cfg = self.config
        prompts = self._training_prompts(prompts)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(cfg.seed if seed is None else seed)
            responses = self.generate(prompts, batch_size=cfg.mini_batch_size)
        scores = self.score(prompts, responses)
        kls = []
        with eval_mode(self.model):
            for start in range(0, len(prompts), cfg.mini_batch_size):
                chunk = slice(start, start + cfg.mini_batch_size)
                batch = build_rollout_batch([p.to(self.device) for p in prompts[chunk]],
                                            [r.to(self.device) for r in responses[chunk]], self.pad_token_id)
                rows = torch.arange(batch["input_ids"].shape[0], device=self.device)
                logprobs, _, _ = self._forward(self.model, batch, rows, with_values=False)
                ref_logprobs = self._reference_logprobs(batch, rows)
                kls.append((kl_penalty(logprobs, ref_logprobs, cfg.kl_estimator) * batch["response_mask"]).sum(-1))
        lengths = torch.tensor([float(len(r)) for r in responses])
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        return {
            "reward_mean": scores.mean().item(), "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
            "kl_mean": torch.cat(kls).mean().item(), "response_tokens_mean": lengths.mean().item(),
            "distinct_2": distinct_n(responses, 2),
            "eos_frac": float(sum(self.eos_token_id is not None and int(r[-1]) == self.eos_token_id
                                  for r in responses) / len(responses)),
            "samples": [{"prompt": decode(p), "response": decode(r), "score": float(s)}
                        for p, r, s in zip(prompts[:num_samples], responses, scores.tolist())],
        }

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
