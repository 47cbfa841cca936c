"""The fused no-grad rollout forward (one batched forward, one adapter per row) gives the numbers of the
separate passes: policy logprobs and values, reference logprobs (adapters disabled), entropy, and the
reward adapter's scores, on left-padded rows, with pad == EOS, and on 8-bit and 4-bit bases."""

import os
import types

import pytest
import torch
from peft import LoraConfig
from stand_ins import LORA_TARGETS, MAKE_BASE, make_reward_adapter, make_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from marl_utils.model.multi_adapter_model import AutoModelForCausalLMWithValueHead
from marl_utils.ppo.trainer import PPOTrainer
from marl_utils.ppo.config import PPOConfig
from marl_utils.ppo.maths import build_rollout_batch

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("fused")
    made = {}
    for kind in ("llama", "gpt2"):
        base = MAKE_BASE[kind](root / kind)
        made[kind] = types.SimpleNamespace(kind=kind, base=str(base),
                                           adapter=str(make_reward_adapter(base, root / f"{kind}_rm")))
    embed_base = MAKE_BASE["llama"](root / "embed")  # stage 2 also adapts the input embeddings (LoRA on them)
    made["embed"] = types.SimpleNamespace(kind="llama", base=str(embed_base), adapter=str(make_reward_adapter(
        embed_base, root / "embed_rm", target_modules=["q_proj", "v_proj", "embed_tokens"])))
    pad_is_eos = MAKE_BASE["llama"](root / "pad_is_eos")
    config = AutoConfig.from_pretrained(pad_is_eos)
    config.pad_token_id = config.eos_token_id
    config.save_pretrained(pad_is_eos)
    made["pad_is_eos"] = types.SimpleNamespace(kind="llama", base=str(pad_is_eos), adapter=str(
        make_reward_adapter(pad_is_eos, root / "pad_is_eos_rm")))
    return made


def model_for(s, **kw):
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[s.kind], task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(s.base, peft_config=lora, reward_adapter=s.adapter, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.policy_parameters():  # the policy differs from the reference
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def rollout_batch(tok, eos_last=True):
    ids = lambda t: torch.tensor(tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    queries = [ids(t) for t in ["the movie", "i loved this", "bad", "a wonderful film with great"]]
    responses = [ids(t) for t in ["was great", "movie a lot it was fun", "plot", "music"]]
    if eos_last:
        responses[2] = torch.cat([responses[2], torch.tensor([tok.eos_token_id])])
    return build_rollout_batch(queries, responses, tok.pad_token_id)


def both_paths(model, tok, batch, mini_batch_size=2):
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=mini_batch_size, max_new_tokens=6), model, tok)
    out = {}
    for fused in (True, False):
        trainer.fuse_rollout = fused
        out[fused] = trainer.rollout_forward(batch, with_reward=True)
    return out[True], out[False], trainer


def assert_same(fused, separate, atol=1e-6):
    for name in ("logprobs", "values", "ref_logprobs", "entropy", "scores"):
        a, b = getattr(fused, name), getattr(separate, name)
        mask = fused.mask.bool() if a.dim() == 2 else torch.ones_like(a, dtype=torch.bool)
        torch.testing.assert_close(a[mask], b[mask], atol=atol, rtol=1e-5, msg=name)
    assert torch.equal(fused.mask, separate.mask)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "embed"])
def test_fused_equals_separate_on_left_padded_rows(bases, kind):
    tok = make_tokenizer()
    batch = rollout_batch(tok)
    assert (batch["attention_mask"] == 0).any()  # rows really are left-padded
    fused, separate, trainer = both_paths(model_for(bases[kind]), tok, batch)
    assert_same(fused, separate)
    torch.testing.assert_close(fused.scores, trainer.score_batch(batch), atol=1e-6, rtol=1e-5)
    assert (fused.logprobs - fused.ref_logprobs).abs().max() > 1e-3  # policy and reference really differ


def test_fused_equals_separate_when_pad_is_eos(bases):
    tok = make_tokenizer()
    tok.pad_token = tok.eos_token
    batch = rollout_batch(tok)
    fused, separate, _ = both_paths(model_for(bases["pad_is_eos"]), tok, batch)
    assert_same(fused, separate)


def test_fused_equals_separate_on_a_4bit_base(bases):
    pytest.importorskip("bitsandbytes")
    tok = make_tokenizer()
    fused, separate, _ = both_paths(model_for(bases["llama"], load_in_4bit=True), tok, rollout_batch(tok))
    assert_same(fused, separate)


def test_an_8bit_base_keeps_the_separate_passes(bases):
    """LLM.int8 computes outlier columns of the whole batch in 16-bit: a fused batch changes a row's numbers."""
    pytest.importorskip("bitsandbytes")
    tok = make_tokenizer()
    model = model_for(bases["llama"], load_in_8bit=True)
    assert not PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2), model, tok).fuse_rollout
    fused, separate, _ = both_paths(model, tok, rollout_batch(tok))
    assert (fused.logprobs - separate.logprobs)[fused.mask.bool()].abs().max() > 1e-6  # why: they differ


def test_fresh_policy_gives_exactly_zero_kl_in_the_fused_forward(bases):
    tok = make_tokenizer()
    torch.manual_seed(0)
    s = bases["llama"]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS["llama"], task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(s.base, peft_config=lora, reward_adapter=s.adapter)
    fused, _, _ = both_paths(model, tok, rollout_batch(tok), mini_batch_size=4)
    assert torch.equal(fused.logprobs[fused.mask.bool()], fused.ref_logprobs[fused.mask.bool()])
