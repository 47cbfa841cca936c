"""8-bit and 4-bit bases (bitsandbytes on CPU), and the 4-bit CPU trap (issue 4).

The gradient tests compare against a float32 reference whose linear weights are the dequantized weights of
the quantized model, with the same LoRA weights and value head: the two must give the same LoRA gradients
(cosine >= 0.999) after the model has generated, i.e. after a no-grad eval forward.
"""

import os
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from stand_ins import LORA_TARGETS, MAKE_BASE, TEXTS, batch, make_reward_adapter, make_tokenizer
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from marl_utils.infra.errors import MarlInputError
from marl_utils.model.multi_adapter_model import AutoModelForCausalLMWithValueHead
from marl_utils.model.quantization import disable_cpu_inference_packing, quantized_linear_layers

bnb = pytest.importorskip("bitsandbytes")
torch.set_num_threads(1)
KINDS = ["llama", "gpt2"]
BITS = {"8bit": dict(load_in_8bit=True), "4bit": dict(load_in_4bit=True)}
# 4-bit: bitsandbytes computes with dequantized weights; 8-bit (LLM.int8) also rounds the activations to int8
REWARD_TOLERANCE = {"8bit": dict(atol=5e-2, rtol=0.1), "4bit": dict(atol=1e-4, rtol=0)}
LAYER_CLASS = {"8bit": bnb.nn.Linear8bitLt, "4bit": bnb.nn.Linear4bit}
# the body's linear layers per block: Llama q,k,v,o,gate,up,down; GPT-2 c_attn, c_proj, c_fc, c_proj
LINEARS_PER_BLOCK = {"llama": 7, "gpt2": 4}
HAS_AVX512_BF16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory):
    """Hidden 64: bitsandbytes' 4-bit blocks are 64 wide, and the CPU repacking needs whole blocks."""
    root = tmp_path_factory.mktemp("quantized_stand_ins")
    made = {}
    for kind in KINDS:
        base = MAKE_BASE[kind](root / kind, hidden=64)
        made[kind] = types.SimpleNamespace(kind=kind, base=str(base),
                                           adapter=str(make_reward_adapter(base, root / f"{kind}_rm")))
    return made


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def lora(kind):
    # init_lora_weights=False: random B as well as A, so every LoRA matrix has a non-trivial gradient
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS[kind], task_type="CAUSAL_LM",
                      init_lora_weights=False)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind", KINDS)
def test_seed_quantized_snippet(stand_ins, tokenizer, kind, bits):
    """The seed's 4-bit/8-bit snippet: quantized body, float32 adapters and heads, rewards as in fp32."""
    s = stand_ins[kind]
    model_name, rm_adapter_id = s.base, s.adapter
    lora_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_name, peft_config=lora_config,
                                                              reward_adapter=rm_adapter_id, **BITS[bits])
    layers = quantized_linear_layers(model)
    assert len(layers) == 2 * LINEARS_PER_BLOCK[kind] and all(isinstance(m, LAYER_CLASS[bits]) for m in layers)
    assert not isinstance(model.pretrained_model.get_base_model().lm_head, LAYER_CLASS[bits])
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert {n.split(".")[-2] for n, p in model.named_parameters() if "lora_" in n} == {"default", "reward_adapter"}
    heads = [*model.v_head.parameters(), *model.reward_head.parameters()]
    assert adapters and all(p.dtype == torch.float32 for p in adapters + heads)
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    if bits == "4bit":
        assert all(m.support_avx512bf16_for_cpu is False for m in layers)

    inputs = batch(tokenizer, TEXTS[:4], "left")
    rewards = model.compute_reward_score(**inputs)
    assert rewards.shape == (4,) and torch.isfinite(rewards).all()
    # the reward adapter runs on the quantized body: the same scores as on its dequantized float32 copy
    expected = dequantized_reference(model, model_name, kind, rm_adapter_id, lora_config).compute_reward_score(**inputs)
    torch.testing.assert_close(rewards, expected, **REWARD_TOLERANCE[bits])


def dequantized_reference(model, base_dir, kind, reward_adapter=None, lora_config=None):
    """A float32 copy of `model`: dequantized body weights, the same LoRA weights and value heads."""
    fp32 = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    targets = dict(fp32.named_modules())
    for name, module in model.pretrained_model.get_base_model().named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            # the row scales move from the weight to the layer's state at its first forward
            scales = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
            weight = bnb.functional.int8_vectorwise_dequant(module.weight.data, scales)
        else:
            continue
        target = targets[name.removesuffix(".base_layer")]
        weight = weight.float() if isinstance(target, nn.Linear) else weight.float().T  # GPT-2 Conv1D: [in, out]
        assert weight.shape == target.weight.shape
        target.weight.data.copy_(weight)
    reference = AutoModelForCausalLMWithValueHead.from_pretrained(fp32, peft_config=lora_config or lora(kind),
                                                                  reward_adapter=reward_adapter)
    own = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".reward_adapter." in name and reward_adapter is None:
                continue
            if "lora_" in name or name.startswith("v_heads."):
                own[name].copy_(param)
    return reference


def gradients(model, inputs, train: bool) -> torch.Tensor:
    """All LoRA + value-head gradients of one PPO-like loss, as one vector (a missing gradient counts as 0)."""
    model.train(train)
    model.zero_grad()
    torch.manual_seed(0)  # the same dropout masks in both models (GPT-2 has dropout)
    lm_logits, _, values = model(**inputs)
    (lm_logits.log_softmax(-1).max(-1).values.mean() + values.pow(2).mean()).backward()
    params = model.trainable_parameters()
    assert len(params) > 0
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


def after_inference(model, inputs):
    """What a PPO rollout does before the training step: generate, reward, reference (all no-grad, eval)."""
    model.eval()
    model.generate(**inputs, max_new_tokens=4, do_sample=False)
    if model.reward_adapter_name is not None:
        model.compute_reward_score(**inputs)
    model.reference_logits(**inputs)


@pytest.mark.parametrize("train", [True, False], ids=["train_mode", "eval_mode"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind", KINDS)
def test_lora_gradients_after_generate_match_dequantized_reference(stand_ins, tokenizer, kind, bits, train):
    s = stand_ins[kind]
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(s.base, peft_config=lora(kind), reward_adapter=s.adapter,
                                                              **BITS[bits])
    reference = dequantized_reference(model, s.base, kind)
    inputs = batch(tokenizer, TEXTS[:3], "left")
    after_inference(model, inputs)
    got, expected = gradients(model, inputs, train), gradients(reference, inputs, train)
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=0).item()
    assert cosine >= 0.999, cosine
    assert expected.norm() > 0


@pytest.mark.skipif(not HAS_AVX512_BF16, reason="the 4-bit CPU trap needs a CPU with avx512_bf16")
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_trap_is_real_without_the_fix(stand_ins, tokenizer, kind):
    """Undo the fix: after generate(), 4-bit LoRA gradients are wrong, missing, or backward fails."""
    s = stand_ins[kind]
    model = AutoModelForCausalLMWithValueHead.from_pretrained(s.base, peft_config=lora(kind), load_in_4bit=True)
    reference = dequantized_reference(model, s.base, kind)
    for layer in quantized_linear_layers(model):
        layer.support_avx512bf16_for_cpu = True  # bitsandbytes' default on this CPU
    inputs = batch(tokenizer, TEXTS[:3], "left")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "autograd kernel was not registered"
        after_inference(model, inputs)
        try:
            got = gradients(model, inputs, train=True)
        except RuntimeError:
            return  # broken loudly (GPT-2's biases)
    cosine = torch.nn.functional.cosine_similarity(got, gradients(reference, inputs, train=True), dim=0).item()
    assert cosine < 0.9, cosine


def test_already_repacked_model_object_is_unpacked(stand_ins, tokenizer):
    """A 4-bit model that generated before reaching us (repacked, if this CPU repacks) is made trainable again."""
    s = stand_ins["llama"]
    base = AutoModelForCausalLM.from_pretrained(s.base, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    inputs = batch(tokenizer, TEXTS[:3], "left")
    with torch.no_grad():
        base.eval().generate(**inputs, max_new_tokens=2, do_sample=False)
    repacked = any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in quantized_linear_layers(base))
    assert repacked == HAS_AVX512_BF16
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AutoModelForCausalLMWithValueHead.from_pretrained(base, peft_config=lora("llama"))
    assert any("already been repacked" in str(w.message) for w in caught) == repacked
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in quantized_linear_layers(model))
    reference = dequantized_reference(model, s.base, "llama")
    after_inference(model, inputs)
    got, expected = gradients(model, inputs, True), gradients(reference, inputs, True)
    assert torch.nn.functional.cosine_similarity(got, expected, dim=0).item() >= 0.999


def test_disable_cpu_inference_packing_counts_layers(stand_ins):
    base = AutoModelForCausalLM.from_pretrained(stand_ins["gpt2"].base,
                                                quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    assert disable_cpu_inference_packing(base) == 2 * LINEARS_PER_BLOCK["gpt2"]
    assert disable_cpu_inference_packing(nn.Linear(2, 2)) == 0


def no_loading(monkeypatch):
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("weights loaded before the check")))


def test_both_8bit_and_4bit(stand_ins, monkeypatch):
    no_loading(monkeypatch)
    with pytest.raises(MarlInputError, match="load_in_8bit=True and load_in_4bit=True were both given; pick one"):
        AutoModelForCausalLMWithValueHead.from_pretrained(stand_ins["llama"].base, peft_config=lora("llama"),
                                                          load_in_8bit=True, load_in_4bit=True)
    with pytest.raises(MarlInputError, match="either load_in_8bit/load_in_4bit or quantization_config, not both"):
        AutoModelForCausalLMWithValueHead.from_pretrained(stand_ins["llama"].base, peft_config=lora("llama"),
                                                          load_in_4bit=True,
                                                          quantization_config=BitsAndBytesConfig(load_in_8bit=True))


@pytest.mark.parametrize("flags", [dict(load_in_8bit=True), dict(load_in_4bit=True),
                                   dict(quantization_config=BitsAndBytesConfig(load_in_4bit=True))])
def test_bitsandbytes_missing(stand_ins, monkeypatch, flags):
    no_loading(monkeypatch)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(MarlInputError, match="needs the bitsandbytes package, which is not installed: "
                                             "`pip install bitsandbytes`"):
        AutoModelForCausalLMWithValueHead.from_pretrained(stand_ins["llama"].base, peft_config=lora("llama"), **flags)


def test_quantizing_a_model_object_is_refused(stand_ins):
    plain = AutoModelForCausalLM.from_pretrained(stand_ins["llama"].base)
    with pytest.raises(MarlInputError, match="need a path or hub id"):
        AutoModelForCausalLMWithValueHead.from_pretrained(plain, peft_config=lora("llama"), load_in_8bit=True)


def test_int8_cast_warning_logged_once(stand_ins, tokenizer, caplog):
    """bitsandbytes warns about the float16 cast on every 8-bit matmul; we let it through once per message."""
    model = AutoModelForCausalLMWithValueHead.from_pretrained(stand_ins["llama"].base, peft_config=lora("llama"),
                                                              load_in_8bit=True)
    inputs = batch(tokenizer, TEXTS[:2])
    with caplog.at_level("WARNING", logger="bitsandbytes"), torch.no_grad():
        for _ in range(3):
            model(**inputs)
    casts = [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]
    assert len(casts) <= 1, f"{len(casts)} repeats of the bitsandbytes cast warning"
