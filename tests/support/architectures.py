"""Tiny random-config stand-ins for the causal-LM families users bring, for the architecture matrix.

Import from any test in this folder: `from architectures import FAMILIES, build_family`.

Each `Family` is a small config (2 layers, hidden 32, vocabulary 128) that keeps what makes that family
different at the value its released checkpoints use: Gemma-2's logit softcaps, Granite's `logits_scaling`
and multipliers, Cohere's `logit_scale`, OPT-350m's projected embeddings, GPT-2's missing pad id. A feature
that only matters past a length (sliding windows, rows with no RoPE) is set so that it matters at the few
tokens a test uses. `build_family` saves the base with the output layer scaled so that raw logits have a
standard deviation of about 8: with the default init (0.02) logits are ~0.1, every policy is near uniform,
and skipping a softcap or a scale would change the logprobs by less than the test tolerances.

`build_reward_adapter` writes what stage 2 writes (a peft SEQ_CLS LoRA adapter with its `score` head) and
`plain_reward_model` loads it back the way plain transformers + peft would, the reference for our scores.
Granite, Cohere, Cohere2 and LFM2 have no `*ForSequenceClassification` class in transformers: for them both
use a class made here from transformers' own `GenericForSequenceClassification` (what most
`*ForSequenceClassification` classes of decoder-only models are built from), independently of the one stage 2
makes (`marl_utils.model.sequence_classifier`), which the matrix compares with it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stand_ins import make_tokenizer

VOCAB = 128
HIDDEN = 32
LOGIT_STD = 8.0
# Sizes every family shares (each family renames them to its own config fields).
LLAMA_SIZES = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64)


@dataclass(frozen=True)
class Family:
    """A causal-LM family: its config class name, model class name, tiny config and what is special about it."""

    name: str
    config_class: str
    model_class: str
    config: dict
    feature: str                 # what this row exercises, at which value (README table)
    pad_is_eos: bool = False     # the tokenizer pads with EOS (as users set it for GPT-2, Qwen2.5, Phi-3)
    config_pad: bool = True      # the base config records a pad_token_id (GPT-2's and Qwen2.5's do not)
    logit_post_processing: bool = False  # the causal LM changes lm_head's output before returning logits
    lora_targets: str | tuple = "all-linear"  # of the policy, critic and reward adapters
    notes: dict = field(default_factory=dict)


FAMILIES = [
    Family("llama", "LlamaConfig", "LlamaForCausalLM", dict(LLAMA_SIZES, rope_theta=500000.0),
           "grouped-query attention (2 KV heads of 4), untied lm_head (Llama 3)"),
    Family("gpt2", "GPT2Config", "GPT2LMHeadModel",
           dict(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64),
           "Conv1D layers, learned positions, dropout 0.1, no pad_token_id in the config: pad = EOS (gpt2 on the Hub)",
           pad_is_eos=True, config_pad=False),
    Family("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM",
           dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=True),
           "fused query_key_value, RoPE on 25% of each head, parallel residual (Pythia)"),
    Family("opt", "OPTConfig", "OPTForCausalLM",
           dict(hidden_size=HIDDEN, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                word_embed_proj_dim=16, do_layer_norm_before=False),
           "embeddings of 16 projected to hidden 32 and back, post-norm, learned positions offset 2 (opt-350m)"),
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", dict(LLAMA_SIZES, tie_word_embeddings=True),
           "q/k/v bias, tied embeddings, no pad_token_id in the config: pad = EOS (Qwen2.5-0.5B)",
           pad_is_eos=True, config_pad=False),
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", dict(LLAMA_SIZES, head_dim=16, tie_word_embeddings=True),
           "q/k RMSNorm, head_dim 16 != hidden/heads 8, tied embeddings (Qwen3-0.6B)"),
    Family("mistral", "MistralConfig", "MistralForCausalLM", dict(LLAMA_SIZES, sliding_window=4),
           "sliding-window attention, window 4 < the test rows (Mistral-7B-v0.1: 4096)"),
    Family("phi3", "Phi3Config", "Phi3ForCausalLM", dict(LLAMA_SIZES, resid_pdrop=0.1),
           "fused qkv_proj and gate_up_proj, pad_token_id == eos_token_id in the config (Phi-3-mini)",
           pad_is_eos=True),
    Family("gemma", "GemmaConfig", "GemmaForCausalLM", dict(LLAMA_SIZES, head_dim=8),
           "embeddings scaled by sqrt(hidden), RMSNorm (1 + w), GeGLU, tied embeddings (gemma-2b)"),
    Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM",
           dict(LLAMA_SIZES, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
           "final_logit_softcapping=30, attn_logit_softcapping=50, alternating sliding window 4 (gemma-2-2b: 4096)",
           logit_post_processing=True),
    Family("gemma3_text", "Gemma3TextConfig", "Gemma3ForCausalLM",
           dict(LLAMA_SIZES, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                layer_types=["sliding_attention", "full_attention"]),
           "q/k RMSNorm, local/global layers (sliding window 4, gemma-3-1b: 512), no softcap (as released)"),
    Family("granite", "GraniteConfig", "GraniteForCausalLM",
           dict(LLAMA_SIZES, tie_word_embeddings=True, logits_scaling=8.0, embedding_multiplier=12.0,
                residual_multiplier=0.22, attention_multiplier=0.015625),
           "logits_scaling=8, embedding_multiplier=12, residual_multiplier=0.22, attention_multiplier=1/64 "
           "(granite-3.0-2b-base); no GraniteForSequenceClassification",
           logit_post_processing=True),
    Family("cohere", "CohereConfig", "CohereForCausalLM", dict(LLAMA_SIZES, logit_scale=0.0625),
           "logit_scale=0.0625, parallel attention + MLP, LayerNorm, tied embeddings (c4ai-command-r-v01); "
           "no CohereForSequenceClassification",
           logit_post_processing=True),
    Family("olmo2", "Olmo2Config", "Olmo2ForCausalLM", dict(LLAMA_SIZES),
           "norms after attention and MLP (not before), q/k RMSNorm over all heads (OLMo-2-1B)"),
    Family("smollm3", "SmolLM3Config", "SmolLM3ForCausalLM", dict(LLAMA_SIZES, no_rope_layers=[1, 0]),
           "a layer without RoPE (SmolLM3-3B: every 4th), tied embeddings"),
    Family("phi", "PhiConfig", "PhiForCausalLM",
           dict(LLAMA_SIZES, num_attention_heads=2, num_key_value_heads=2, partial_rotary_factor=0.4, resid_pdrop=0.1),
           "RoPE on 40% of each head, parallel attention + MLP, `dense`/`fc1`/`fc2` layers, dropout 0.1 (phi-2)"),
    Family("falcon", "FalconConfig", "FalconForCausalLM",
           dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, multi_query=True, parallel_attn=True,
                new_decoder_architecture=False, bias=False),
           "multi-query attention (1 KV head), parallel attention + MLP, fused query_key_value (falcon-7b)"),
    Family("gpt_bigcode", "GPTBigCodeConfig", "GPTBigCodeForCausalLM",
           dict(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64, multi_query=True),
           "multi-query attention, attention dropout 0.1 kept as a float `attn_dropout` (starcoderbase, santacoder)"),
    Family("bloom", "BloomConfig", "BloomForCausalLM", dict(hidden_size=HIDDEN, n_layer=2, n_head=4),
           "ALiBi (no position ids: positions from the attention mask), embedding LayerNorm (bloom-560m)"),
    Family("cohere2", "Cohere2Config", "Cohere2ForCausalLM",
           dict(LLAMA_SIZES, logit_scale=0.25, sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
           "logit_scale=0.25, local/global layers (sliding window 4, c4ai-command-r7b: 4096); "
           "no Cohere2ForSequenceClassification",
           logit_post_processing=True),
    Family("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
           dict(LLAMA_SIZES, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
           "mixture of experts (top-2 of 4), LoRA on attention only: peft cannot route its LoRA on expert "
           "parameters per row (Qwen3-30B-A3B: top-8 of 128)",
           lora_targets=("q_proj", "k_proj", "v_proj", "o_proj")),
    Family("lfm2", "Lfm2Config", "Lfm2ForCausalLM",
           dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, layer_types=["conv", "full_attention"]),
           "a short-convolution layer next to attention (LFM2-350M: 10 conv, 6 attention); no "
           "Lfm2ForSequenceClassification"),
]
BY_NAME = {family.name: family for family in FAMILIES}


def tokenizer_for(family: Family):
    """The stand-in word-level tokenizer (pad 0, eos 1, unk 2), padding with EOS where the family's users do."""
    tokenizer = make_tokenizer()
    if family.pad_is_eos:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def make_config(family: Family):
    import transformers

    tokenizer = tokenizer_for(family)
    ids = dict(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id if family.config_pad else None)
    config = getattr(transformers, family.config_class)(vocab_size=VOCAB, **ids, **family.config)
    if family.name == "gemma2":
        config._attn_implementation = "eager"  # sdpa cannot softcap attention; transformers says eager for Gemma-2
    return config


@torch.no_grad()
def scale_output_layer(model, target_std: float = LOGIT_STD, seed: int = 0) -> None:
    """Scale lm_head (the embeddings too, where tied) until raw logits lm_head(h) have std ~target_std."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 12), generator=generator)
    head = model.get_output_embeddings()
    raw = []
    handle = head.register_forward_hook(lambda module, args, out: raw.append(out))  # before any post-processing
    try:
        for _ in range(3):  # tied embeddings change the hidden state too; a few rounds settle it
            raw.clear()
            model(input_ids=ids)
            head.weight.mul_(target_std / raw[-1].std().item())
    finally:
        handle.remove()


def build_family(family: Family, out_dir, seed: int = 0) -> Path:
    """Save a random tiny `family` causal LM and its tokenizer to `out_dir` (logits scaled, see module doc)."""
    import transformers

    out_dir = Path(out_dir)
    tokenizer = tokenizer_for(family)
    torch.manual_seed(seed)
    model = getattr(transformers, family.model_class)(make_config(family)).eval()
    scale_output_layer(model, seed=seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def sequence_classifier_class(family: Family):
    """transformers' sequence classifier of the family, or one made like it where transformers has none."""
    import transformers
    from transformers import AutoModelForSequenceClassification
    from transformers.modeling_layers import GenericForSequenceClassification

    config_class = getattr(transformers, family.config_class)
    if config_class in AutoModelForSequenceClassification._model_mapping:
        return AutoModelForSequenceClassification
    pretrained = getattr(transformers, family.model_class).__mro__[1]  # e.g. GranitePreTrainedModel
    return type(family.model_class.replace("ForCausalLM", "ForSequenceClassification"),
                (GenericForSequenceClassification, pretrained), {})


def load_sequence_classifier(family: Family, base_dir):
    """The base as a 1-output sequence classifier, pad id as TRL's RewardTrainer sets it (the tokenizer's)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its fresh `score` head is expected
    try:
        model = sequence_classifier_class(family).from_pretrained(base_dir, num_labels=1, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer_for(family).pad_token_id
    return model


def build_reward_adapter(family: Family, base_dir, out_dir, seed: int = 0, r: int = 4) -> Path:
    """A stage-2-style reward adapter (peft SEQ_CLS LoRA + score head), random LoRA B and head."""
    from peft import LoraConfig, get_peft_model

    classifier = load_sequence_classifier(family, base_dir)
    config = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r, lora_dropout=0.0,
                        target_modules=_targets(family))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2's Conv1D "fan_in_fan_out" notice
        model = get_peft_model(classifier, config)
    randomize_lora(model, "default", seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("score.modules_to_save.default.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer_for(family).save_pretrained(out_dir)  # as RewardTrainer saves its processing class
    return out_dir


def _targets(family: Family):
    return family.lora_targets if isinstance(family.lora_targets, str) else list(family.lora_targets)


def lora_config(family: Family, r: int = 4):
    """The LoRA config of the family's policy (and critic) adapter."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=_targets(family), task_type="CAUSAL_LM")


def plain_reward_model(family: Family, base_dir, adapter_dir):
    """The stage-2 reward model as plain transformers + peft load it: classifier + adapter, eval, float32."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_sequence_classifier(family, base_dir), str(adapter_dir)).eval()


@torch.no_grad()
def randomize_lora(peft_model, adapter_name: str, seed: int, scale: float = 0.3) -> None:
    """Random LoRA B of one adapter (peft starts B at zero: the adapter would change nothing)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if f"lora_B.{adapter_name}." in name + ".":
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
