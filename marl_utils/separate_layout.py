"""The separate-models layout run by the SAME PPOTrainer, and a step-by-step comparison with the one base (issue 21).

One base (the project's layout): policy LoRA + value head, reference = adapters off, reward = reward LoRA +
score head, all on one copy of the weights. Separate (the usual RLHF layout, as `marl bench` builds it):

    policy     its own copy of the base + the policy LoRA + the value head   (AutoModelForCausalLMWithValueHead)
    reference  a frozen copy of the base                                    (PPOTrainer's ref_model=)
    reward     the reward LoRA merged into a sequence classifier            (PPOTrainer's reward_model=)

Built from the same stage-1 folder, reward adapter and seed, the two compute the same PPO: only where the
weights live differs. `compare_step_by_step` runs both for K steps and reports, per step, the largest
difference of what each computed; in float32 they agree to rounding, not bit for bit: the merged classifier
computes (W + s*BA) x in one matmul where the adapter computes W x + s*B(A x), and the one base runs policy,
reference and reward rows in one batched forward where the separate layout runs three.
"""

from __future__ import annotations

import torch

from .bench_layouts import _quiet_load
from .modeling import AutoModelForCausalLMWithValueHead
from .ppo import PPOTrainer


def merged_reward_model(sft_dir, reward_adapter_dir, dtype=torch.float32):
    """The stage-2 reward adapter merged into a 1-output sequence classifier of the base: a standalone copy."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    classifier = _quiet_load(AutoModelForSequenceClassification.from_pretrained, str(sft_dir), num_labels=1,
                             dtype=dtype)
    merged = PeftModel.from_pretrained(classifier, str(reward_adapter_dir)).merge_and_unload()
    return merged.eval().requires_grad_(False)


def frozen_reference(sft_dir, dtype=torch.float32):
    """A frozen copy of the stage-1 model: the separate layout's reference."""
    from transformers import AutoModelForCausalLM

    return _quiet_load(AutoModelForCausalLM.from_pretrained, str(sft_dir), dtype=dtype).eval().requires_grad_(False)


def build_one_base_trainer(config, sft_dir, reward_adapter_dir, tokenizer, peft_config, seed: int = 0) -> PPOTrainer:
    """PPOTrainer on one base: the policy LoRA and the reward adapter on the same weights (the default)."""
    torch.manual_seed(seed)  # the policy LoRA's and value head's initial weights
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(sft_dir), peft_config=peft_config,
                                                              reward_adapter=str(reward_adapter_dir))
    return PPOTrainer(config, model=model, tokenizer=tokenizer)


def build_separate_trainer(config, sft_dir, reward_adapter_dir, tokenizer, peft_config, seed: int = 0,
                           start_from: PPOTrainer | None = None) -> PPOTrainer:
    """PPOTrainer on separate models: policy copy + LoRA, `ref_model=` a frozen copy, `reward_model=` the merge.

    `start_from` (a trainer of the same sizes) copies its policy LoRA and value head, so that both layouts
    start from the very same weights (peft draws a new adapter's weights from the global RNG, and the one
    base also builds its reward adapter's layers, so the same seed alone need not give the same start).
    """
    torch.manual_seed(seed)
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(str(sft_dir), peft_config=peft_config)
    if start_from is not None:
        copy_trainable_weights(start_from.model, policy)
    return PPOTrainer(config, model=policy, tokenizer=tokenizer, ref_model=frozen_reference(sft_dir),
                      reward_model=merged_reward_model(sft_dir, reward_adapter_dir))


def trainable_weights(model) -> dict[str, torch.Tensor]:
    """name -> a copy of each trainable tensor (policy LoRA + value head), named as in the model."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def copy_trainable_weights(source, target) -> None:
    """Copy `source`'s trainable weights into `target` (the same names and shapes)."""
    weights = trainable_weights(source)
    with torch.no_grad():
        for name, p in target.named_parameters():
            if p.requires_grad:
                p.copy_(weights[name])


def _recording(trainer: PPOTrainer, store: list):
    """Wrap `trainer.rollout_forward` so each step's rollout (logprobs, reference logprobs, scores) is kept."""
    inner = trainer.rollout_forward

    def rollout_forward(batch, with_reward=False):
        rollout = inner(batch, with_reward)
        store.append({"input_ids": batch["input_ids"].clone(), "rollout": rollout})
        return rollout
    return rollout_forward


def compare_step_by_step(one_base: PPOTrainer, separate: PPOTrainer, prompts, steps: int = 5) -> list[dict]:
    """Train both `steps` steps on `prompts`; per step, the max |difference| of what each computed.

    Each row: same_tokens (the sampled rollouts are identical, so the rest compares like with like),
    logprobs / ref_logprobs (at the response tokens), scores, and params (the trainable weights after the
    step). The two trainers must have been built with the same config and seed (`build_*_trainer`).
    """
    records = {"one": [], "sep": []}
    params = {"one": [], "sep": []}
    rng = torch.get_rng_state()  # sampling and minibatch order draw from the global RNG: both start from it
    for key, trainer in (("one", one_base), ("sep", separate)):
        torch.set_rng_state(rng)
        trainer.rollout_forward = _recording(trainer, records[key])
        trainer.train(prompts, steps=steps, progress=False,
                      callback=lambda t, _entry, key=key: params[key].append(trainable_weights(t.model)))
        del trainer.rollout_forward  # back to the class's method
    rows = []
    for step, (a, b, pa, pb) in enumerate(zip(records["one"], records["sep"], params["one"], params["sep"]), start=1):
        ra, rb = a["rollout"], b["rollout"]
        on = ra.mask.bool()
        same = torch.equal(a["input_ids"], b["input_ids"])
        rows.append({
            "step": step, "same_tokens": same,
            "logprobs": (ra.logprobs - rb.logprobs)[on].abs().max().item() if same else float("nan"),
            "ref_logprobs": (ra.ref_logprobs - rb.ref_logprobs)[on].abs().max().item() if same else float("nan"),
            "scores": (ra.scores - rb.scores).abs().max().item() if same else float("nan"),
            "params": max((pa[name] - pb[name]).abs().max().item() for name in pa),
        })
    return rows
