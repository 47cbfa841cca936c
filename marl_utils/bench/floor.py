"""The compute floor of one PPO step: the same work in plain torch + peft, and nothing else (`marl bench`).

This is the code anyone would write for PPO on one base with peft, at the sizes of one PPO step, and no
more: one base, a trainable policy LoRA ("policy") with a linear value head, the frozen reward LoRA
("reward") with its score head, the reference = the base with adapters disabled. No marl_utils code runs
here, so `marl bench` can print the project's PPOTrainer as a ratio to it (issue 13):

    generate   one `generate` over the whole batch with the policy adapter (plain sampling)
    score      reward adapter: the body's last hidden state -> score head at the last token (no grad)
    rollout    policy forward (logprobs + values) and reference forward, both over the same ids (no grad);
               KL-penalised rewards, GAE, whitened advantages
    optimise   ppo_epochs x minibatches: forward, clipped policy + value loss, backward, Adam step

Log-probabilities are taken at the response positions only (the only ones PPO uses); the logits are the
model's own (all positions, as `forward` returns them). Every response has exactly `new_tokens` tokens
(`min_new_tokens`), so the floor and the trainer do the same amount of work in every step.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class StepShape:
    """The sizes of one PPO step: rollouts, response length, epochs and minibatches per epoch."""

    batch: int
    new_tokens: int
    ppo_epochs: int
    minibatches: int

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"StepShape.{name}={value!r} must be a positive integer")
        if self.batch % self.minibatches:
            raise ValueError(f"batch={self.batch} does not split into {self.minibatches} equal minibatches")

    @property
    def mini_batch_size(self) -> int:
        return self.batch // self.minibatches

    def as_dict(self) -> dict:
        return {**asdict(self), "mini_batch_size": self.mini_batch_size}


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock read after it counts that work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    """bf16 autocast over every pass (weights stay float32), or nothing for fp32."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def response_logprobs(logits: torch.Tensor, ids: torch.Tensor, n_response: int) -> torch.Tensor:
    """[B, R] log-probabilities of the last R tokens; token t is predicted by the logits at t - 1."""
    logits = logits[:, -n_response - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, -n_response:, None]).squeeze(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """(advantages, returns) [B, R] by generalised advantage estimation; the episode ends after token R."""
    advantages, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        last = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * last
        advantages[:, t] = last
    return advantages, advantages + values


def ppo_loss(logprobs, old_logprobs, values, old_values, advantages, returns, clip: float = 0.2,
             vf_coef: float = 0.1) -> torch.Tensor:
    """Clipped policy loss + vf_coef * clipped value loss, means over the response tokens."""
    ratio = torch.exp(logprobs - old_logprobs)
    policy = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)).mean()
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    value = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2).mean()
    return policy + vf_coef * value


def _score_head_from_file(adapter_dir: Path) -> nn.Linear:
    # peft's load_adapter into a causal LM leaves the classifier head of a SEQ_CLS adapter in the file
    from safetensors.torch import load_file

    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    weight = next(v for k, v in tensors.items() if k.endswith(("score.modules_to_save.default.weight",
                                                                "score.weight")))
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        head.weight.copy_(weight.float())
    return head.requires_grad_(False)


class Floor:
    """One base in peft with the policy and reward adapters and two linear heads; `step()` times one PPO step."""

    def __init__(self, base_dir, reward_adapter_dir, lora_config, device, precision: str = "fp32",
                 pad_id: int = 0, learning_rate: float = 1e-5, kl_coef: float = 0.05):
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        self.device, self.precision, self.pad_id, self.kl_coef = torch.device(device), precision, pad_id, kl_coef
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GPT-2's Conv1D fan_in_fan_out note
            self.model = get_peft_model(base, lora_config, adapter_name="policy")
            self.model.load_adapter(str(reward_adapter_dir), adapter_name="reward", is_trainable=False)
        self.model.set_adapter("policy")
        self.model.to(self.device).eval()  # no dropout anywhere: rollout and training forwards agree
        hidden = base.config.hidden_size
        self.value_head = nn.Linear(hidden, 1).to(self.device)
        self.score_head = _score_head_from_file(Path(reward_adapter_dir)).to(self.device)
        self.policy_params = [p for n, p in self.model.named_parameters() if "lora_" in n and ".policy." in n]
        self.optimizer = torch.optim.Adam(self.policy_params + list(self.value_head.parameters()), lr=learning_rate)

    def _clock(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def _policy_forward(self, ids, mask, positions, n_response):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True,
                         use_cache=False)
        values = self.value_head(out.hidden_states[-1][:, -n_response - 1:-1].float()).squeeze(-1)
        return response_logprobs(out.logits, ids, n_response), values

    def reward_scores(self, ids, mask, positions) -> torch.Tensor:
        """[B] scores at the last column (every row ends with a real token: prompts are left-padded)."""
        self.model.set_adapter("reward", inference_mode=True)  # frozen: peft would make it trainable
        try:
            body = self.model.get_base_model().base_model  # the transformer without the LM head
            hidden = body(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        finally:
            self.model.set_adapter("policy")
        return self.score_head(hidden[:, -1].float()).squeeze(-1)

    def step(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, shape: StepShape) -> dict:
        """One PPO step on left-padded prompts [B, P]; seconds per phase and in total (the phases tile it)."""
        prompt_ids, prompt_mask = prompt_ids.to(self.device), prompt_mask.to(self.device)
        start = self._clock()
        with torch.no_grad(), autocast(self.device, self.precision):
            ids = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, top_k=0,
                                      top_p=1.0, max_new_tokens=shape.new_tokens, min_new_tokens=shape.new_tokens,
                                      pad_token_id=self.pad_id)  # [B, P + R]
        generated = self._clock()
        n_response = ids.shape[1] - prompt_ids.shape[1]
        mask = torch.cat([prompt_mask, torch.ones_like(ids[:, prompt_ids.shape[1]:])], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row starts at position 0
        with torch.no_grad(), autocast(self.device, self.precision):
            scores = self.reward_scores(ids, mask, positions)
        scored = self._clock()
        with torch.no_grad(), autocast(self.device, self.precision):
            old_logprobs, old_values = self._policy_forward(ids, mask, positions, n_response)
            with self.model.disable_adapter():
                ref_logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                        use_cache=False).logits
            ref_logprobs = response_logprobs(ref_logits, ids, n_response)
        rewards = -self.kl_coef * (old_logprobs - ref_logprobs)
        rewards[:, -1] += scores
        advantages, returns = gae(rewards, old_values)
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        rolled_out = self._clock()
        for _ in range(shape.ppo_epochs):
            for rows in torch.randperm(shape.batch, device=self.device).split(shape.mini_batch_size):
                with autocast(self.device, self.precision):
                    logprobs, values = self._policy_forward(ids[rows], mask[rows], positions[rows], n_response)
                loss = ppo_loss(logprobs, old_logprobs[rows], values, old_values[rows], advantages[rows],
                                returns[rows])
                loss.backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        optimised = self._clock()
        return {"generate": generated - start, "score": scored - generated, "rollout": rolled_out - scored,
                "optimise": optimised - rolled_out, "total": optimised - start,
                "response_tokens": float(n_response)}
