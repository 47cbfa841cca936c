"""The layouts `marl bench` compares, the models they load, and the PPO step it times on them (see `command.py`).

- MARL: ONE base in an `AutoModelForCausalLMWithValueHead`: policy LoRA + value head, the reference is the
  base with adapters off, the reward model is the frozen reward LoRA + its score head.
- separate: the usual four networks, each a full copy of the base weights: the policy (base + LoRA), a
  reference copy, a reward model (the reward LoRA merged into a sequence classifier) and a value model
  (base + a value head; only the head trains, the cheapest choice for this layout).

Both answer the same four questions (generate, reward score, reference logprobs, policy logprobs+values),
so `timed_ppo_step` runs the very same PPO work on each (the sizes of `STEP_SHAPES`) and only the model
layout differs. The MARL layout as the project's PPOTrainer runs it is timed in `bench_ratio.py`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from pathlib import Path

import torch

from ..infra.atomic import atomic_dir
from .floor import StepShape, autocast, gae, ppo_loss, response_logprobs, synchronize
from ..model.multi_adapter_model import AutoModelForCausalLMWithValueHead, position_ids_from_mask
from ..infra.profiles import PROFILES
from ..model.quantization import disable_cpu_inference_packing, quantization_config_from_flags
from ..model.reward_adapter import read_shapes

SPEC_FILE = "bench_spec.json"
PRECISIONS = {"fp32": {}, "8bit": dict(load_in_8bit=True), "4bit": dict(load_in_4bit=True)}
"""The seed's flags per precision, passed as a user passes them."""
UNQUANTIZED_DTYPE = torch.bfloat16
"""dtype of what bitsandbytes leaves unquantized (embeddings, norms) in the 8-bit and 4-bit layouts.

Real checkpoints ship in bfloat16/float16, so that is what these layers hold in a real 8/4-bit load (and
transformers 4.x, the seed's stack, forced float16 with load_in_8bit/4bit). Our random base is saved in
float32, so the bench asks for bfloat16 explicitly. LoRA adapters and heads stay float32 regardless.
"""
BASE_SIZES = {
    "tiny": dict(PROFILES["tiny"].tiny_model),
    # ~46M parameters: weights dominate the resident set, as in real models. Tied embeddings (one table for
    # input and output) keep the part bitsandbytes never quantizes at 9% of the weights.
    "mid": dict(vocab_size=8192, hidden_size=512, intermediate_size=2048, num_hidden_layers=10,
                num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256),
    # ~210M parameters (840 MB in fp32): large enough that even the raw peak RSS, with the ~400 MB of
    # imported code every process carries, is dominated by weights.
    "large": dict(vocab_size=8192, hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                  num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256),
    # GPT-2 small's architecture and sizes (124M parameters, tied 50257-token table), random weights, built
    # from GPT2Config: the GPU check's base, which needs no Hub.
    "gpt2": dict(architecture="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
}
STEP_SHAPES = {
    "tiny": StepShape(batch=8, new_tokens=8, ppo_epochs=2, minibatches=2),
    # issue 13's setting: batch 32, 20 new tokens, 4 PPO epochs x 4 minibatches
    "mid": StepShape(batch=32, new_tokens=20, ppo_epochs=4, minibatches=4),
    "large": StepShape(batch=32, new_tokens=20, ppo_epochs=4, minibatches=4),
    # gpt2-sentiment's batch and response length; 4 x 4 minibatches of 32 as on mid
    "gpt2": StepShape(batch=128, new_tokens=16, ppo_epochs=4, minibatches=4),
}
BENCH_LORA = {"r": 8, "alpha": 16, "target_modules": "all-linear"}
"""Policy and reward adapters: LoRA r8 on every linear layer but the LM head (issue 13's setting)."""
QUANTIZED_NOTE = ("8/4-bit layouts: the seed's load_in_8bit/load_in_4bit on the linear layers; embeddings and norms "
                  "(never quantized by bitsandbytes) in bfloat16, as real checkpoints ship; adapters and heads float32")
RANDOM_WEIGHTS_NOTE = ("random weights (base, policy and reward adapters): the bench measures memory and time, "
                       "not quality")


# ---------------------------------------------------------------------------- the models measured
def _random_base(tokenizer, sizes: dict, seed: int):
    if sizes.get("architecture") == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(**{k: v for k, v in sizes.items() if k != "architecture"},
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                            bos_token_id=tokenizer.bos_token_id)
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        return model
    from ..data.tiny_base import build_tiny_llama

    return build_tiny_llama(tokenizer, seed=seed, **sizes)


def build_bench_base(out_dir: Path, sizes: dict, texts, seed: int = 0) -> None:
    """A random-init base of `sizes` (Llama-style, or GPT-2) and a BPE tokenizer trained on `texts`, saved atomically.

    The corpus has fewer distinct words than `vocab_size`; the model keeps the full vocabulary anyway,
    because the embedding's share of the weights (and of the LM head's work) is what a real model has.
    """
    from ..data.tiny_base import train_tokenizer

    tokenizer = train_tokenizer(texts, vocab_size=sizes["vocab_size"])
    model = _random_base(tokenizer, sizes, seed)
    with atomic_dir(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        (tmp / SPEC_FILE).write_text(json.dumps({"sizes": sizes, "seed": seed}, sort_keys=True))


def build_bench_reward(base_dir: Path, adapter_dir: Path, merged_dir: Path, lora: dict, seed: int = 0) -> None:
    """A random stage-2-style reward adapter (peft SEQ_CLS LoRA + score head) and the same model merged.

    MARL loads the adapter onto its one base; the separate layout loads the merged sequence classifier,
    a full copy, as a standalone reward model would be.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    classifier = _quiet_load(AutoModelForSequenceClassification.from_pretrained, base_dir, num_labels=1,
                             dtype=torch.float32)
    config = LoraConfig(task_type="SEQ_CLS", r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                        target_modules=lora["target_modules"])
    model = _quiet_load(get_peft_model, classifier, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # peft starts LoRA B at zero (a no-op adapter); random B makes the merged weights really differ
            if "lora_B" in name or name.endswith("score.modules_to_save.default.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    with atomic_dir(adapter_dir) as tmp:
        model.save_pretrained(tmp)
        (tmp / SPEC_FILE).write_text(json.dumps({"lora": lora, "seed": seed}, sort_keys=True))
    with atomic_dir(merged_dir) as tmp:
        model.merge_and_unload().save_pretrained(tmp)


def _spec_is(folder: Path, spec: dict) -> bool:
    file = folder / SPEC_FILE
    return file.exists() and json.loads(file.read_text()) == json.loads(json.dumps(spec, sort_keys=True))


def prepare_bench_models(bench_dir, base_size: str, lora: dict, batch: int = 8, seed: int = 0) -> dict:
    """Build (or reuse) the base, reward adapter and merged reward model; return what a layout process needs."""
    from transformers import AutoTokenizer

    from ..data.loading import load_imdb

    sizes = BASE_SIZES[base_size]
    bench_dir = Path(bench_dir)
    base_dir = bench_dir / f"base-{base_size}"
    adapter_dir = bench_dir / f"base-{base_size}-reward-adapter"
    merged_dir = bench_dir / f"base-{base_size}-reward-merged"
    reviews = load_imdb()
    if not _spec_is(base_dir, {"sizes": sizes, "seed": seed}):
        build_bench_base(base_dir, sizes, reviews["train"]["text"][:2000], seed)
        shutil.rmtree(adapter_dir, ignore_errors=True)  # built on the old base: stale
    if not _spec_is(adapter_dir, {"lora": lora, "seed": seed}) or not (merged_dir / "config.json").exists():
        build_bench_reward(base_dir, adapter_dir, merged_dir, lora, seed)

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    texts = reviews["test"]["text"]
    texts = [texts[i % len(texts)] for i in range(batch)]
    # prompts of 4..8 tokens, so the batch is left-padded as PPO rollouts are
    prompts = [tokenizer(text)["input_ids"][:4 + i % 5] for i, text in enumerate(texts)]
    shapes = read_shapes(base_dir / "model.safetensors")  # the file header: tied weights are stored once
    return {"base": str(base_dir), "reward_adapter": str(adapter_dir), "reward_merged": str(merged_dir),
            "pad_id": tokenizer.pad_token_id, "prompts": prompts, "lora": lora, "sizes": sizes,
            "base_params": sum(math.prod(shape) for shape in shapes.values())}


def left_padded(prompts, pad_id: int):
    """(ids [B, P], mask [B, P]) of token lists, padded on the left as PPO rollouts are."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


# ---------------------------------------------------------------------------- the two layouts
def _generate(model, prompt_ids, prompt_mask, new_tokens: int, pad_id: int):
    # Plain sampling (top_k=0, top_p=1) as PPO rollouts use; min_new_tokens keeps every step's work the same
    # size in both layouts (a timing choice: training must not force lengths, it biases the KL).
    return model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, top_k=0, top_p=1.0,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id)


class MarlLayout:
    """One base: policy adapter + value head, reference = adapters off, reward = reward adapter + score head."""

    def __init__(self, model: AutoModelForCausalLMWithValueHead, pad_id: int):
        self.model, self.pad_id = model, pad_id

    @property
    def device(self) -> torch.device:
        return self.model.device

    def modules(self) -> dict:
        return {"model": self.model}

    def generate(self, prompt_ids, prompt_mask, new_tokens):
        return _generate(self.model, prompt_ids, prompt_mask, new_tokens, self.pad_id)

    def reward_scores(self, sequences, mask):
        return self.model.compute_reward_score(input_ids=sequences, attention_mask=mask)

    def ref_logprobs(self, sequences, mask, n_response):
        return response_logprobs(self.model.reference_logits(sequences, mask), sequences, n_response)

    def policy_logprobs_and_values(self, sequences, mask, n_response):
        logits, _, values = self.model(input_ids=sequences, attention_mask=mask)
        return response_logprobs(logits, sequences, n_response), values[:, -n_response - 1:-1]

    def trainable_parameters(self):
        return self.model.trainable_parameters()


class SeparateLayout:
    """Four networks: policy (base + LoRA), reference copy, reward model (merged), value model (base + head)."""

    def __init__(self, policy, ref, reward, value, pad_id: int):
        self.policy, self.ref, self.reward, self.value, self.pad_id = policy, ref, reward, value, pad_id

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    def modules(self) -> dict:
        return {"policy": self.policy, "ref": self.ref, "reward": self.reward, "value": self.value}

    def generate(self, prompt_ids, prompt_mask, new_tokens):
        return _generate(self.policy, prompt_ids, prompt_mask, new_tokens, self.pad_id)

    def reward_scores(self, sequences, mask):
        # the sequence classifier pools at the last non-pad token itself (it reads config.pad_token_id)
        out = self.reward(input_ids=sequences, attention_mask=mask, position_ids=position_ids_from_mask(mask))
        return out.logits[:, 0].float()

    def ref_logprobs(self, sequences, mask, n_response):
        logits = self.ref(input_ids=sequences, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                          use_cache=False).logits
        return response_logprobs(logits, sequences, n_response)

    def policy_logprobs_and_values(self, sequences, mask, n_response):
        positions = position_ids_from_mask(mask)
        logits = self.policy(input_ids=sequences, attention_mask=mask, position_ids=positions, use_cache=False).logits
        hidden = self.value.base_model(input_ids=sequences, attention_mask=mask, position_ids=positions,
                                       use_cache=False).last_hidden_state  # [B, T, H]
        values = self.value.score(hidden.to(self.value.score.weight.dtype)).squeeze(-1).float()  # [B, T]
        return response_logprobs(logits, sequences, n_response), values[:, -n_response - 1:-1]

    def trainable_parameters(self):
        return [p for p in self.policy.parameters() if p.requires_grad] + list(self.value.score.parameters())


def release_checkpoint_pages(model) -> None:
    """Copy the unquantized tensors of a quantized model into process memory.

    transformers memory-maps the safetensors file. After on-the-fly quantization only the embeddings and
    norms still point into that mapping, but they keep the WHOLE file mapped, so the float32 pages read while
    quantizing would stay in the resident set for the whole run. A GPU would hold only the quantized weights.
    """
    quantized = tuple(type(p) for p in model.parameters() if type(p).__module__.startswith("bitsandbytes"))
    copies = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for tensor in store.values():
                if tensor is None or isinstance(tensor, quantized) or tensor.device.type != "cpu":
                    continue
                key = tensor.untyped_storage().data_ptr()
                copy = copies.setdefault(key, tensor.data.clone())  # tied weights stay tied
                tensor.data = copy


def _quiet_load(loader, *args, **kwargs):
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized score weights": expected for the value model
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return loader(*args, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)


def policy_lora_config(lora: dict):
    """The policy adapter, the same in both layouts."""
    from peft import LoraConfig

    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=lora["target_modules"])


def load_layout(layout: str, precision: str, paths: dict, device="cpu"):
    """Build `layout` ("marl", "critic" or "separate") in `precision` from the folders `prepare_bench_models` made.

    `device` places the float32 layouts (the quantized ones are loaded where bitsandbytes puts them: CPU here).
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    flags = PRECISIONS[precision]
    dtype = UNQUANTIZED_DTYPE if flags else torch.float32
    lora_config = policy_lora_config(paths["lora"])
    pad_id = paths["pad_id"]
    if layout in ("marl", "critic"):  # critic: the value head on a critic LoRA adapter of its own (notebook 06)
        model = _quiet_load(AutoModelForCausalLMWithValueHead.from_pretrained, paths["base"],
                            peft_config=lora_config, reward_adapter=paths["reward_adapter"], dtype=dtype,
                            critic="adapter" if layout == "critic" else "head", **flags)
        if flags:
            release_checkpoint_pages(model)
        else:
            model.to(device)
        return MarlLayout(model.eval(), pad_id)

    def load(cls, folder, **kwargs):
        bnb = quantization_config_from_flags(**flags)
        model = _quiet_load(cls.from_pretrained, folder, quantization_config=bnb, dtype=dtype, **kwargs)
        if bnb is not None:
            release_checkpoint_pages(model)
        # The policy trains through its 4-bit layers, so it must not be repacked for inference (quantization.py);
        # the frozen copies keep the same kernels too, so both layouts time the same 4-bit code.
        disable_cpu_inference_packing(model)
        if bnb is None:
            model.to(device)
        return model.eval().requires_grad_(False)

    policy = _quiet_load(get_peft_model, load(AutoModelForCausalLM, paths["base"]), lora_config)
    ref = load(AutoModelForCausalLM, paths["base"])
    reward = load(AutoModelForSequenceClassification, paths["reward_merged"], num_labels=1)
    value = load(AutoModelForSequenceClassification, paths["base"], num_labels=1)
    value.score.float().requires_grad_(True)  # the value head: float32 and trainable, like MARL's ValueHead
    return SeparateLayout(policy.eval(), ref, reward, value, pad_id)



# ---------------------------------------------------------------------------- the timed PPO step
def timed_ppo_step(layout, prompt_ids, prompt_mask, shape: StepShape, optimizer, precision: str = "fp32",
                   kl_coef: float = 0.05) -> dict:
    """One PPO step of `shape` on `layout`; seconds of each phase and in total (the phases tile the step).

    generate: sampling `new_tokens` per prompt with the policy. score: the reward score. rollout: reference
    logprobs and the rollout's own logprobs and values, all without gradients, then rewards and GAE.
    optimise: ppo_epochs x minibatches of forward with gradients, PPO loss, backward, optimizer step.
    """
    device = layout.device
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)

    def clock():
        synchronize(device)
        return time.perf_counter()

    start = clock()
    with torch.no_grad(), autocast(device, precision):
        sequences = layout.generate(prompt_ids, prompt_mask, shape.new_tokens)  # [B, P + R]
    generated = clock()
    n_response = sequences.shape[1] - prompt_ids.shape[1]
    mask = torch.cat([prompt_mask, torch.ones_like(sequences[:, prompt_ids.shape[1]:])], dim=1)
    with torch.no_grad(), autocast(device, precision):
        scores = layout.reward_scores(sequences, mask).float()  # [B]
    scored = clock()
    with torch.no_grad(), autocast(device, precision):
        ref_logprobs = layout.ref_logprobs(sequences, mask, n_response)  # [B, R]
        old_logprobs, old_values = layout.policy_logprobs_and_values(sequences, mask, n_response)
    rewards = -kl_coef * (old_logprobs - ref_logprobs)  # [B, R]: KL penalty per token, score at the end
    rewards[:, -1] += scores
    advantages, returns = gae(rewards, old_values.float())
    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    rolled_out = clock()
    for _ in range(shape.ppo_epochs):
        for rows in torch.randperm(shape.batch, device=device).split(shape.mini_batch_size):
            with autocast(device, precision):
                logprobs, values = layout.policy_logprobs_and_values(sequences[rows], mask[rows], n_response)
            loss = ppo_loss(logprobs, old_logprobs[rows], values.float(), old_values[rows], advantages[rows],
                            returns[rows])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    optimised = clock()
    return {"generate": generated - start, "score": scored - generated, "rollout": rolled_out - scored,
            "optimise": optimised - rolled_out, "total": optimised - start, "response_tokens": float(n_response)}
