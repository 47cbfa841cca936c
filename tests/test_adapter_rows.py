"""Per-row adapters (one batched forward, one adapter per row): hooks that cannot leak, and every adapter
configuration either fused correctly, run in separate passes (said once), or refused clearly.

Configurations users bring: DoRA (policy or reward adapter), LoRA on lm_head, modules_to_save copies of a
Linear (lm_head), an Embedding or a norm, each with critic="head" and critic="adapter"."""

import contextlib
import os
import types

import pytest
import torch
from peft import LoraConfig
from stand_ins import make_reward_adapter, make_tiny_llama, make_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from marl_utils.adapter_rows import routed_layers
from marl_utils.errors import MarlInputError
from marl_utils.modeling import AutoModelForCausalLMWithValueHead
from marl_utils.ppo import PPOTrainer
from marl_utils.ppo_config import PPOConfig
from marl_utils.ppo_core import build_rollout_batch

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    root = tmp_path_factory.mktemp("rows")
    base = make_tiny_llama(root / "base")
    return types.SimpleNamespace(base=str(base), adapter=str(make_reward_adapter(base, root / "rm")),
                                 dora_adapter=str(make_reward_adapter(base, root / "rm_dora", use_dora=True)))


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def perturb(params, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def build(s, reward=None, fresh=False, **lora_and_model):
    model_kw = {k: lora_and_model.pop(k) for k in ("critic",) if k in lora_and_model}
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **{"target_modules": QV, **lora_and_model})
    model = AutoModelForCausalLMWithValueHead.from_pretrained(s.base, peft_config=lora,
                                                              reward_adapter=reward or s.adapter, **model_kw)
    if not fresh:  # the policy (and critic) differ from the reference and from each other
        perturb(model.policy_parameters(), 1)
        perturb(model.critic_parameters(), 2)
    return model


def data(tok):
    ids = lambda t: torch.tensor(tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    queries = [ids(t) for t in ["the movie", "i loved this", "bad", "a wonderful film with great"]]
    responses = [ids(t) for t in ["was great", "movie a lot it was fun", "plot", "music"]]
    return queries, responses, build_rollout_batch(queries, responses, tok.pad_token_id)


def trainer_for(model, tok):
    return PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1, learning_rate=1e-3), model, tok)


def assert_fused_equals_separate(trainer, batch):
    out = {}
    for fused in (True, False):
        trainer.fuse_rollout = fused
        out[fused] = trainer.rollout_forward(batch, with_reward=True)
    mask = out[True].mask.bool()
    for name in ("logprobs", "values", "ref_logprobs", "entropy"):
        torch.testing.assert_close(getattr(out[True], name)[mask], getattr(out[False], name)[mask], atol=1e-5,
                                   rtol=1e-5, msg=name)
    torch.testing.assert_close(out[True].scores, out[False].scores, atol=1e-5, rtol=1e-5)


def no_hooks_left(model):
    return all(not layer._forward_pre_hooks for layer in routed_layers(model.pretrained_model))


@pytest.mark.parametrize("critic", ["head", "adapter"])
def test_an_exception_inside_the_fused_forward_leaves_no_adapter_routing_behind(s, tok, critic):
    model = build(s, critic=critic)
    trainer = trainer_for(model, tok)
    assert trainer.fuse_rollout
    _, _, batch = data(tok)
    before = trainer.score_batch(batch)
    values_before = trainer.rollout_forward(batch).values
    layer = model.pretrained_model.get_base_model().model.layers[1]

    def out_of_memory(*_):
        raise RuntimeError("CUDA out of memory (injected)")

    handle = layer.register_forward_hook(out_of_memory)
    with pytest.raises(RuntimeError, match="injected"):
        trainer.rollout_forward(batch, with_reward=True)
    handle.remove()
    assert no_hooks_left(model)
    # the fused forward of 2 rows x 3-4 roles had 6-8 rows; score rows of that count too, where a leaked
    # routing would not crash but silently run rows through the wrong adapters
    for rows in (batch["input_ids"].shape[0], 6, 8):
        ids = batch["input_ids"][torch.arange(rows) % 4]
        mask = batch["attention_mask"][torch.arange(rows) % 4]
        torch.testing.assert_close(model.compute_reward_score(input_ids=ids, attention_mask=mask),
                                   before[torch.arange(rows) % 4], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(trainer.rollout_forward(batch).values, values_before, atol=0, rtol=0)


# configurations the fused forward runs (and must equal the separate passes), critic="head" and "adapter"
FUSED = {
    "lora_on_lm_head": dict(target_modules=QV + ["lm_head"]),
    "modules_to_save_lm_head": dict(modules_to_save=["lm_head"]),
    "modules_to_save_embeddings": dict(modules_to_save=["embed_tokens"]),
}


@pytest.mark.parametrize("critic", ["head", "adapter"])
@pytest.mark.parametrize("config", list(FUSED))
def test_lm_head_lora_and_modules_to_save_are_fused_per_row(s, tok, config, critic):
    model = build(s, critic=critic, **FUSED[config])
    trainer = trainer_for(model, tok)
    assert trainer.fuse_rollout
    queries, responses, batch = data(tok)
    assert_fused_equals_separate(trainer, batch)
    trainer.fuse_rollout = True
    stats = trainer.step(queries, responses, torch.tensor([1.0, -1.0, 0.5, 0.0]))
    assert abs(stats["ppo/policy/approxkl_first"]) < 1e-6, stats  # rollout == training forward
    assert_every_trained_parameter_gets_a_gradient(model, batch)


def assert_every_trained_parameter_gets_a_gradient(model, batch):
    """DDP (find_unused_parameters=False) fails on a trainable parameter that no loss reaches."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    model.zero_grad(set_to_none=True)
    model.train()
    with model.critic_rows() if model.critic_adapter else contextlib.nullcontext():
        logits, _, values = model(**inputs)
        (logits.logsumexp(-1).mean() + values.mean()).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in model.trainable_parameters()}
    assert all(p.grad is not None for p in trainable)
    model.zero_grad(set_to_none=True)


def test_a_fresh_policy_with_lora_on_lm_head_and_a_critic_adapter_has_zero_kl(s, tok):
    model = build(s, critic="adapter", fresh=True, target_modules=QV + ["lm_head"])
    perturb(model.critic_parameters(), 2)  # the critic's lm_head LoRA must not reach the policy rows
    queries, responses, _ = data(tok)
    stats = trainer_for(model, tok).step(queries, responses, torch.tensor([1.0, -1.0, 0.5, 0.0]))
    assert stats["objective/kl"] == 0.0 and abs(stats["ppo/policy/approxkl_first"]) < 1e-6, stats


def test_the_critics_rows_use_the_critics_modules_to_save_copy_and_no_gradient_crosses(s, tok):
    model = build(s, critic="adapter", modules_to_save=["embed_tokens"])
    _, _, batch = data(tok)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    policy_copy = model.policy_parameters()
    model.train()
    with model.critic_rows():
        _, _, values = model(**inputs)
        values.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in policy_copy)  # value loss: critic side only
    assert any(p.grad is not None and p.grad.any() for p in model.critic_parameters())
    model.zero_grad(set_to_none=True)
    with torch.no_grad():  # the critic's copy really is used: change it and the values change
        before = model(**inputs)[2]
        for p in model.critic_parameters():
            if p.dim() == 2 and p.shape[0] == model.config.vocab_size:
                p.mul_(2.0)
        assert (model(**inputs)[2] - before).abs().max() > 1e-3


# configurations peft cannot run per row: separate passes for critic="head" (said in one line)...
SEPARATE = {
    "dora_policy": (dict(use_dora=True), None),
    "dora_reward_adapter": ({}, "dora_adapter"),
    "modules_to_save_norm": (dict(modules_to_save=["norm"]), None),
}


@pytest.mark.parametrize("config", list(SEPARATE))
def test_what_peft_cannot_run_per_row_falls_back_to_separate_passes(s, tok, capsys, config):
    lora_kw, reward = SEPARATE[config]
    model = build(s, reward=getattr(s, reward) if reward else None, **lora_kw)
    capsys.readouterr()
    trainer = trainer_for(model, tok)
    said = [line for line in capsys.readouterr().out.splitlines() if "not fused" in line]
    assert not trainer.fuse_rollout and len(said) == 1, said
    assert ("DoRA" in said[0]) if "dora" in config else ("norm" in said[0] and "RMSNorm" in said[0]), said
    queries, responses, batch = data(tok)
    rollout = trainer.rollout_forward(batch, with_reward=True)
    torch.testing.assert_close(rollout.scores, trainer.score_batch(batch))
    stats = trainer.step(queries, responses, rollout.scores)
    assert abs(stats["ppo/policy/approxkl_first"]) < 1e-6, stats
    with pytest.raises(MarlInputError, match="fused_rollout=True cannot be kept"):
        PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, fused_rollout=True), model, tok)


# ...and refused at from_pretrained for critic="adapter", whose training forward needs per-row adapters
@pytest.mark.parametrize("lora_kw,expected", [(dict(use_dora=True), "uses DoRA"),
                                              (dict(modules_to_save=["norm"]), "LlamaRMSNorm")])
def test_critic_adapter_is_refused_where_peft_cannot_route_per_row(s, lora_kw, expected):
    with pytest.raises(MarlInputError, match=f"critic='adapter'.*{expected}.*Use critic='head'"):
        build(s, critic="adapter", **lora_kw)


@pytest.mark.parametrize("critic", ["head", "adapter"])
def test_a_causal_lm_that_calls_its_decoder_directly_is_fused_too(tmp_path, tok, critic):
    """OPTForCausalLM runs `model.decoder`, not `model`: the rows are cut where the output layer reads them."""
    from stand_ins import _save
    from transformers import AutoModelForCausalLM, OPTConfig

    config = OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                       word_embed_proj_dim=32, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       bos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    base = _save(AutoModelForCausalLM.from_config(config), tok, tmp_path / "opt")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=QV, task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(base), peft_config=lora, critic=critic)
    perturb(model.policy_parameters(), 1)
    perturb(model.critic_parameters(), 2)
    trainer = trainer_for(model, tok)
    queries, responses, batch = data(tok)
    out = {}
    for fused in (True, False):
        trainer.fuse_rollout = fused
        out[fused] = trainer.rollout_forward(batch)
    mask = out[True].mask.bool()
    for name in ("logprobs", "values", "ref_logprobs"):
        torch.testing.assert_close(getattr(out[True], name)[mask], getattr(out[False], name)[mask], atol=1e-5,
                                   rtol=1e-5, msg=name)
    stats = trainer.step(queries, responses, torch.tensor([1.0, -1.0, 0.5, 0.0]))
    assert abs(stats["ppo/policy/approxkl_first"]) < 1e-6, stats


def test_layer_types_peft_cannot_run_per_row_are_named():
    """peft's own per-layer check decides: a LoRA on nn.MultiheadAttention has no per-row forward."""
    from peft import get_peft_model

    from marl_utils.adapter_rows import per_row_problem

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
            self.proj = torch.nn.Linear(8, 8)

    linear_only = get_peft_model(Block(), LoraConfig(r=2, target_modules=["proj"]))
    assert per_row_problem(linear_only, ["default", "__base__"]) is None
    with_attention = get_peft_model(Block(), LoraConfig(r=2, target_modules=["attn", "proj"]))
    why = per_row_problem(with_attention, ["default", "__base__"])
    assert why is not None and why.startswith("base_model.model.attn") and "MultiheadAttention" in why, why
