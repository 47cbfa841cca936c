"""Held-out evaluation of a PPO policy: reward, KL to the reference, length, diversity, samples (notebook 03).

`reward_mean` is the reward adapter's score, the quantity PPO optimised. With `gold_reward` (a function of
decoded texts, e.g. `gold_reward.gold_scorer_for(profile.dataset)`, available for the offline corpus only),
`gold_mean` is the true sentiment of the same prompt + response texts, which PPO never saw.
The same prompts and the same sampling seed before and after training make the two numbers comparable; the
trainer's own RNG streams are left untouched, so evaluating does not change the training run.
"""

from __future__ import annotations

import torch

from ..model.forward_modes import train_mode_without_dropout
from .maths import build_rollout_batch, distinct_n, kl_penalty
from .rollout import policy_forward, reference_forward, response_view
from .training_loop import training_prompts


def decode_text(tokenizer, ids) -> str:
    """Decoded tokens without a broken character at the end: a sampled response may stop inside a multi-byte
    UTF-8 character (a byte-level BPE token is part of one), which decodes to U+FFFD; that tail is dropped."""
    return tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


@torch.no_grad()
def evaluate_policy(trainer, prompts, seed: int | None = None, num_samples: int = 8, gold_reward=None) -> dict:
    """Sample once per prompt with `seed` (default config.seed); KL in nats per sequence (config.kl_estimator).

    `gold_reward(texts) -> scores` adds `gold_mean` / `gold_std` (and a "gold" per sample), scored on the
    decoded prompt + response, the text the reward adapter scores; without it those keys are absent.
    """
    cfg = trainer.config
    prompts = training_prompts(trainer, prompts)
    with torch.random.fork_rng(devices=[trainer.device] if trainer.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed if seed is None else seed)
        responses = trainer.generate(prompts, batch_size=cfg.generation_batch_size or cfg.batch_size)
    scores = trainer.score(prompts, responses)
    kls = []
    with train_mode_without_dropout(trainer.model), trainer.autocast():
        for start in range(0, len(prompts), trainer.forward_rows):
            chunk = slice(start, start + trainer.forward_rows)
            batch = build_rollout_batch(prompts[chunk], responses[chunk], trainer.pad_token_id, device=trainer.device)
            rows = torch.arange(batch["input_ids"].shape[0], device=trainer.device)
            logprobs, _, _ = policy_forward(trainer.model, batch, rows, cfg.temperature, with_values=False)
            ref_logprobs = reference_forward(trainer.model, batch, rows, cfg.temperature, trainer.ref_model)
            _, mask, _ = response_view(batch)
            kls.append(torch.where(mask.bool(), kl_penalty(logprobs, ref_logprobs, cfg.kl_estimator), 0.0).sum(-1))
    lengths = torch.tensor([float(len(r)) for r in responses])
    eos = trainer.eos_token_id
    gold = None
    if gold_reward is not None:
        texts = [decode_text(trainer.tokenizer, torch.cat([p.to(r.device), r])) for p, r in zip(prompts, responses)]
        gold = torch.tensor([float(g) for g in gold_reward(texts)])
    result = {
        "reward_mean": scores.mean().item(), "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
        "kl_mean": torch.cat(kls).mean().item(), "response_tokens_mean": lengths.mean().item(),
        "distinct_2": distinct_n(responses, 2),
        "eos_frac": float(sum(eos is not None and int(r[-1]) == eos for r in responses) / len(responses)),
        "samples": [{"prompt": decode_text(trainer.tokenizer, p), "response": decode_text(trainer.tokenizer, r),
                     "score": float(s)} for p, r, s in zip(prompts[:num_samples], responses, scores.tolist())],
    }
    if gold is not None:
        result["gold_mean"] = gold.mean().item()
        result["gold_std"] = gold.std().item() if len(gold) > 1 else 0.0
        for sample, g in zip(result["samples"], gold.tolist()):
            sample["gold"] = g
    return result
