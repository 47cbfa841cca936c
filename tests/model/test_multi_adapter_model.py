"""The multi-adapter model (issue 4), on tiny local Llama and GPT-2 stand-ins in float32."""

import json
import os
import shutil
import types

import pytest
import torch
from peft import LoraConfig, PeftModel
from stand_ins import (LORA_TARGETS, MAKE_BASE, TEXTS, batch, make_reward_adapter, make_tokenizer,
                       plain_reward_model)
from transformers import AutoModelForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from marl_utils.infra.errors import MarlInputError
from marl_utils.model.multi_adapter_model import AutoModelForCausalLMWithValueHead, ValueHead, last_token_index

torch.set_num_threads(1)
KINDS = ["llama", "gpt2"]
Model = AutoModelForCausalLMWithValueHead


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory):
    """One tiny base + stage-2 reward adapter per architecture, built once per session."""
    root = tmp_path_factory.mktemp("stand_ins")
    made = {}
    for kind in KINDS:
        base = MAKE_BASE[kind](root / kind)
        made[kind] = types.SimpleNamespace(kind=kind, base=str(base), root=root,
                                           adapter=str(make_reward_adapter(base, root / f"{kind}_rm")))
    return made


@pytest.fixture(params=KINDS)
def s(request, stand_ins):
    return stand_ins[request.param]


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def lora(kind, **kw):
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS[kind],
                      task_type="CAUSAL_LM", **kw)


def load(s, **kw):
    kw.setdefault("peft_config", lora(s.kind))
    kw.setdefault("reward_adapter", s.adapter)
    return Model.from_pretrained(s.base, **kw)


def randomize_policy(model, name=None, seed=0):
    """peft starts LoRA B at zero (policy == reference); random values make the adapter visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.policy_parameters(name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for p in model.v_heads[name or model.active_adapter].parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def snapshot(model):
    return (model.active_adapter, model.pretrained_model.active_adapter, trainable_names(model),
            [m.training for m in model.modules()])


def test_seed_quickstart(s, tokenizer):
    """The seed's Quickstart, local folders in place of hub ids."""
    model_name, rm_adapter_id = s.base, s.adapter
    lora_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_name, peft_config=lora_config,
                                                              reward_adapter=rm_adapter_id)
    inputs = batch(tokenizer, TEXTS[:4], "left")
    rewards = model.compute_reward_score(**inputs)
    assert rewards.shape == (4,) and rewards.dtype == torch.float32 and rewards.unique().numel() == 4
    assert isinstance(model.pretrained_model, PeftModel)
    assert model.policy_adapter_names == ["default"] and model.active_adapter == "default"
    assert model.reward_adapter_name == "reward_adapter"
    assert isinstance(model.v_head, ValueHead) and model.v_head.linear.weight.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    lm_logits, loss, values = model(**inputs)
    assert lm_logits.shape == (4, inputs["input_ids"].shape[1], len(tokenizer)) and loss is None
    assert values.shape == inputs["input_ids"].shape and values.dtype == torch.float32


def test_seed_advanced_adapter_name(s, tokenizer):
    """The seed's `ppo_adapter_name` snippet: after scoring, the named policy is active (and trainable)."""
    model = load(s)
    adapter_name_policy_1 = "policy_1"
    model.add_policy_adapter(adapter_name_policy_1, lora(s.kind))
    inputs = batch(tokenizer, TEXTS[:3])
    before = model.compute_reward_score(**inputs)
    rewards = model.compute_reward_score(**inputs, ppo_adapter_name=adapter_name_policy_1)
    assert model.active_adapter == "policy_1" == model.pretrained_model.active_adapter
    assert torch.equal(rewards, before)  # the reward does not depend on which policy is active
    assert {id(p) for p in model.parameters() if p.requires_grad} == \
        {id(p) for p in model.policy_parameters("policy_1")} | {id(p) for p in model.v_heads["policy_1"].parameters()}


@pytest.mark.parametrize("side", ["left", "right"])
def test_reward_equals_plain_peft_sequence_classifier(s, tokenizer, side):
    model = load(s)
    reference = plain_reward_model(s.base, s.adapter)
    with torch.no_grad():
        expected = torch.cat([reference(input_ids=torch.tensor([tokenizer(t)["input_ids"]])).logits[:, 0]
                              for t in TEXTS])
    inputs = batch(tokenizer, TEXTS, side)
    assert (inputs["attention_mask"] == 0).any()  # the batch really is padded
    torch.testing.assert_close(model.compute_reward_score(**inputs), expected, atol=1e-5, rtol=0)
    if side == "right":
        with torch.no_grad():  # plain peft's own batched scoring (right padding needs no position ids)
            torch.testing.assert_close(reference(**inputs).logits[:, 0], expected, atol=1e-5, rtol=0)
        # the historic per-token output read at [:, -1] is wrong here: it reads pad positions
        last_column = model.compute_reward_score(**inputs, per_token=True)[:, -1]
        assert not torch.allclose(last_column, expected, atol=1e-3)


def test_per_token_scores_are_prefix_scores(s, tokenizer):
    model = load(s)
    inputs = batch(tokenizer, TEXTS[:3], "right")
    per_token = model.compute_reward_score(**inputs, per_token=True)
    assert per_token.shape == inputs["input_ids"].shape and per_token.dtype == torch.float32
    last = last_token_index(inputs["attention_mask"])
    torch.testing.assert_close(per_token[torch.arange(3), last], model.compute_reward_score(**inputs))
    ids = inputs["input_ids"][0, : last[0] + 1]
    prefix_scores = torch.cat([model.compute_reward_score(ids[None, : t + 1]) for t in range(len(ids))])
    torch.testing.assert_close(per_token[0, : len(ids)], prefix_scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("train", [True, False])
def test_scoring_restores_adapter_grads_and_mode(s, tokenizer, train):
    model = load(s)
    model.train(train)
    model.pretrained_model.get_base_model().lm_head.eval()  # a mixed mode must survive too
    model.policy_parameters()[0].requires_grad_(False)  # so must a user's own choice of what trains
    before = snapshot(model)
    model.compute_reward_score(**batch(tokenizer, TEXTS[:2]))
    model.reference_logits(**batch(tokenizer, TEXTS[:2]))
    assert snapshot(model) == before
    assert not any(p.requires_grad for n, p in model.named_parameters() if "reward_adapter" in n)
    assert not model.reward_head.weight.requires_grad


def test_scoring_restores_state_when_forward_raises(s, tokenizer, monkeypatch):
    model = load(s)
    model.add_policy_adapter("policy_1", lora(s.kind))
    model.train()
    before = snapshot(model)

    def boom(*args, **kwargs):
        raise RuntimeError("reward forward failed")

    body = model.pretrained_model.get_base_model().base_model
    monkeypatch.setattr(body, "forward", boom)
    with pytest.raises(RuntimeError, match="reward forward failed"):
        model.compute_reward_score(**batch(tokenizer, TEXTS[:2]), ppo_adapter_name="policy_1")
    assert snapshot(model) == before
    monkeypatch.undo()
    monkeypatch.setattr(model.reward_head, "forward", boom)
    with pytest.raises(RuntimeError):
        model.compute_reward_score(**batch(tokenizer, TEXTS[:2]))
    assert snapshot(model) == before


def test_only_policy_lora_and_value_head_get_gradients(s, tokenizer):
    model = load(s)
    randomize_policy(model)
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert ("lora_" in name and ".default." in name) or name.startswith("v_heads.default."), name
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    model.train()
    inputs = batch(tokenizer, TEXTS[:3], "left")
    lm_logits, _, values = model(**inputs)
    model.compute_reward_score(**inputs)  # between forward and backward, as in a PPO step
    (lm_logits.logsumexp(-1).mean() + values.mean()).backward()
    got_grad = {id(p) for p in model.parameters() if p.grad is not None}
    assert got_grad == trainable


def test_reference_equals_plain_base_exactly(s, tokenizer):
    model = load(s)
    randomize_policy(model)
    plain = AutoModelForCausalLM.from_pretrained(s.base, dtype=torch.float32).eval()
    inputs = batch(tokenizer, TEXTS[:3], "left")
    position_ids = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = plain(**inputs, position_ids=position_ids).logits
        with model.reference():
            got = model.pretrained_model(**inputs, position_ids=position_ids).logits
        policy = model(**inputs)[0]
    assert torch.equal(got, expected)
    reference = model.reference_logits(**inputs)
    assert torch.equal(reference, expected) and not reference.requires_grad
    assert not torch.allclose(policy, expected, atol=1e-3)  # the policy adapter is on outside reference()


def test_forward_is_left_padding_safe_and_passes_labels(s, tokenizer):
    model = load(s)
    randomize_policy(model)
    inputs = batch(tokenizer, [TEXTS[0], TEXTS[5]], "left")
    logits, loss, values = model(**inputs)
    short = 1  # the shorter text sits at the right edge of the batch, after its left padding
    n = int(inputs["attention_mask"][short].sum())
    assert n < inputs["input_ids"].shape[1]
    alone_logits, _, alone_values = model(input_ids=inputs["input_ids"][short:short + 1, -n:])
    torch.testing.assert_close(logits[short, -n:], alone_logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(values[short, -n:], alone_values[0], atol=1e-5, rtol=0)
    with torch.no_grad():  # values come from the body's final (normed) hidden state, the one the LM head reads
        hidden = model.pretrained_model.get_base_model().base_model(
            **inputs, position_ids=(inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)).last_hidden_state
    torch.testing.assert_close(values, model.v_head.linear(hidden).squeeze(-1))
    _, loss, _ = model(**batch(tokenizer, TEXTS[:2]), labels=batch(tokenizer, TEXTS[:2])["input_ids"])
    assert loss is not None and loss.ndim == 0


def test_generate_uses_the_active_policy(s, tokenizer):
    model = load(s)
    randomize_policy(model)
    prompt = torch.tensor([tokenizer(TEXTS[0])["input_ids"][:3]])
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                         do_sample=False, min_new_tokens=5)
    ids = prompt
    with torch.no_grad():
        for _ in range(5):  # greedy decoding by hand with the policy's logits (EOS barred, as by min_new_tokens)
            logits = model(input_ids=ids)[0][:, -1]
            logits[:, tokenizer.eos_token_id] = -float("inf")
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_several_policies(s, tokenizer):
    model = load(s)
    randomize_policy(model, seed=1)
    model.add_policy_adapter("policy_1", lora(s.kind))
    assert model.active_adapter == "default"
    assert not any(p.requires_grad for p in model.policy_parameters("policy_1"))  # frozen until selected
    randomize_policy(model, "policy_1", seed=2)
    inputs = batch(tokenizer, TEXTS[:2])
    default_out = model(**inputs)
    model.set_policy_adapter("policy_1")
    assert model.v_head is model.v_heads["policy_1"] and model.policy_adapter_names == ["default", "policy_1"]
    policy_1_out = model(**inputs)
    assert not torch.allclose(default_out[0], policy_1_out[0]) and not torch.allclose(default_out[2], policy_1_out[2])
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.parameters() if p.requires_grad}
    assert not {id(p) for p in model.policy_parameters("default")} & {id(p) for p in model.policy_parameters()}
    with pytest.raises(MarlInputError, match=r"no policy adapter named 'policy_9'.*\['default', 'policy_1'\]"):
        model.set_policy_adapter("policy_9")
    with pytest.raises(MarlInputError, match="no policy adapter named 'policy_9'"):
        model.compute_reward_score(**inputs, ppo_adapter_name="policy_9")
    with pytest.raises(MarlInputError, match="frozen reward adapter"):
        model.compute_reward_score(**inputs, ppo_adapter_name="reward_adapter")
    with pytest.raises(MarlInputError, match="already exists"):
        model.add_policy_adapter("policy_1", lora(s.kind))
    assert model.active_adapter == "policy_1"  # the failed calls changed nothing


def test_value_head_dropout(s, tokenizer):
    model = load(s, value_head_dropout=0.5)
    model.add_policy_adapter("policy_1", lora(s.kind))
    assert model.v_heads["default"].dropout.p == model.v_heads["policy_1"].dropout.p == 0.5
    inputs = batch(tokenizer, TEXTS[:2])
    assert torch.equal(model(**inputs)[2], model(**inputs)[2])  # eval mode: no dropout
    model.train()
    assert not torch.equal(model(**inputs)[2], model(**inputs)[2])
    with pytest.raises(MarlInputError, match=r"value_head_dropout=1.5 must be in \[0, 1\)"):
        load(s, value_head_dropout=1.5)


def test_default_target_modules_from_peft(s):
    model = load(s, peft_config=LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"))
    assert len(model.policy_parameters()) > 0


def test_model_object_and_peft_model_inputs(s, tokenizer):
    plain = AutoModelForCausalLM.from_pretrained(s.base, dtype=torch.float32)
    model = Model.from_pretrained(plain, peft_config=lora(s.kind), reward_adapter=s.adapter)
    inputs = batch(tokenizer, TEXTS[:2])
    torch.testing.assert_close(model.compute_reward_score(**inputs), load(s).compute_reward_score(**inputs))
    from peft import get_peft_model

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(s.base), lora(s.kind), adapter_name="mine")
    wrapped = Model.from_pretrained(peft_model, reward_adapter=s.adapter)  # an existing PeftModel keeps its adapter
    assert wrapped.policy_adapter_names == ["mine"] and wrapped.pretrained_model is peft_model
    torch.testing.assert_close(wrapped.compute_reward_score(**inputs), model.compute_reward_score(**inputs))


def test_save_and_load_round_trip(s, tokenizer, tmp_path):
    model = load(s)
    randomize_policy(model, seed=3)
    model.add_policy_adapter("policy_1", lora(s.kind))
    randomize_policy(model, "policy_1", seed=4)
    model.save_pretrained(tmp_path / "ppo")
    info = json.loads((tmp_path / "ppo" / "marl_model.json").read_text())
    assert info["policy_adapter_names"] == ["default", "policy_1"]
    assert (tmp_path / "ppo" / "policy_1" / "adapter_config.json").exists()  # peft's layout

    loaded = Model.from_pretrained(tmp_path / "ppo", reward_adapter=s.adapter)
    assert loaded.policy_adapter_names == ["default", "policy_1"] and loaded.active_adapter == "default"
    for name in ["default", "policy_1"]:
        for a, b in zip(model.policy_parameters(name), loaded.policy_parameters(name), strict=True):
            assert torch.equal(a, b)
        for a, b in zip(model.v_heads[name].parameters(), loaded.v_heads[name].parameters(), strict=True):
            assert torch.equal(a, b)
    inputs = batch(tokenizer, TEXTS[:3], "left")
    for name in ["default", "policy_1"]:
        model.set_policy_adapter(name)
        loaded.set_policy_adapter(name)
        (l1, _, v1), (l2, _, v2) = model(**inputs), loaded(**inputs)
        assert torch.equal(l1, l2) and torch.equal(v1, v2)
    assert torch.equal(model.compute_reward_score(**inputs), loaded.compute_reward_score(**inputs))
    assert trainable_names(loaded) == trainable_names(model)

    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "ppo", moved)
    (moved / "marl_model.json").write_text(json.dumps({**info, "base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(MarlInputError, match="folder does not exist.*edit base_model_name_or_path there"):
        Model.from_pretrained(moved)

    frozen = Model.from_pretrained(tmp_path / "ppo", reward_adapter=s.adapter, is_trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    frozen.compute_reward_score(**inputs)
    assert not any(p.requires_grad for p in frozen.parameters())
    loaded.set_policy_adapter("default")
    assert torch.equal(frozen(**inputs)[2], loaded(**inputs)[2])


# ------------------------------------------------------------------------------------------ bad input
def forbid_weight_loading(monkeypatch):
    """Make any weight loading fail loudly, to show that the checks run before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.fixture
def no_weight_loading(monkeypatch):
    forbid_weight_loading(monkeypatch)


def test_missing_reward_folder(s, tmp_path, no_weight_loading):
    with pytest.raises(MarlInputError, match="reward adapter folder .*nope does not exist"):
        load(s, reward_adapter=str(tmp_path / "nope"))


def test_reward_folder_that_is_not_an_adapter(s, tmp_path, no_weight_loading):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MarlInputError, match="not a peft adapter folder: adapter_config.json is missing"):
        load(s, reward_adapter=str(tmp_path / "empty"))
    with pytest.raises(MarlInputError, match="is a full model folder"):
        load(s, reward_adapter=s.base)
    shutil.copytree(s.adapter, tmp_path / "ia3")
    config = json.loads((tmp_path / "ia3" / "adapter_config.json").read_text())
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(MarlInputError, match="is a IA3 adapter; only LoRA"):
        load(s, reward_adapter=str(tmp_path / "ia3"))


def test_adapter_without_score_head(s, tmp_path, monkeypatch):
    policy = load(s, reward_adapter=None)
    policy.pretrained_model.save_pretrained(tmp_path / "policy_only")  # a causal-LM LoRA: no head
    forbid_weight_loading(monkeypatch)
    with pytest.raises(MarlInputError, match="has no score head"):
        load(s, reward_adapter=str(tmp_path / "policy_only"))


def test_adapter_trained_on_another_base_size(s, tmp_path, monkeypatch):
    wide = MAKE_BASE[s.kind](tmp_path / "wide", hidden=48)
    make_reward_adapter(wide, tmp_path / "wide_rm")
    forbid_weight_loading(monkeypatch)
    with pytest.raises(MarlInputError, match="trained on a base with hidden size 48, but this base has hidden size 32"):
        load(s, reward_adapter=str(tmp_path / "wide_rm"))


def test_adapter_trained_on_another_vocabulary(s, tokenizer, tmp_path, monkeypatch):
    embedding = {"llama": "embed_tokens", "gpt2": "wte"}[s.kind]
    big = MAKE_BASE[s.kind](tmp_path / "big_vocab", vocab_size=len(tokenizer) + 10)
    make_reward_adapter(big, tmp_path / "big_rm", target_modules=LORA_TARGETS[s.kind] + [embedding])
    shutil.copytree(s.adapter, tmp_path / "big_tokenizer")  # same weights, a tokenizer with more tokens
    big_tokenizer = make_tokenizer(TEXTS + ["some words this base never saw"])
    big_tokenizer.save_pretrained(tmp_path / "big_tokenizer")
    forbid_weight_loading(monkeypatch)
    with pytest.raises(MarlInputError, match=f"vocabulary of {len(tokenizer) + 10} tokens, but this base has "
                                             f"{len(tokenizer)}"):
        load(s, reward_adapter=str(tmp_path / "big_rm"))
    assert len(big_tokenizer) > len(tokenizer)
    with pytest.raises(MarlInputError, match=f"tokenizer saved with the reward adapter .* has {len(big_tokenizer)} "
                                             f"tokens, but this base's vocabulary has {len(tokenizer)}"):
        load(s, reward_adapter=str(tmp_path / "big_tokenizer"))


def test_adapter_with_other_layer_sizes(s, tmp_path):
    """Same hidden size, different MLP width: caught by the per-layer shape check, before adapter weights load."""
    mlp = {"llama": (dict(intermediate_size=48), ["up_proj"]), "gpt2": (dict(n_inner=48), ["c_fc"])}[s.kind]
    other = MAKE_BASE[s.kind](tmp_path / "narrow", **mlp[0])
    make_reward_adapter(other, tmp_path / "narrow_rm", target_modules=mlp[1])
    with pytest.raises(MarlInputError, match=r"does not fit this base: .*lora_B \[48, 4\] vs layer \(32 -> \d+\)"):
        load(s, reward_adapter=str(tmp_path / "narrow_rm"))


def test_adapter_from_another_base_path_warns(s, tmp_path):
    shutil.copytree(s.base, tmp_path / "copy")
    make_reward_adapter(tmp_path / "copy", tmp_path / "copy_rm")
    with pytest.warns(UserWarning, match="base_model_name_or_path=.*copy"):
        model = load(s, reward_adapter=str(tmp_path / "copy_rm"))
    assert model.reward_adapter_name == "reward_adapter"


def test_reward_adapter_without_peft_config(s, no_weight_loading):
    with pytest.raises(MarlInputError, match="peft_config is required.*reward_adapter is given"):
        Model.from_pretrained(s.base, reward_adapter=s.adapter)


def test_other_bad_inputs(s, tokenizer, tmp_path, no_weight_loading):
    with pytest.raises(MarlInputError, match="base model .*missing.* folder does not exist"):
        Model.from_pretrained(str(tmp_path / "missing"), peft_config=lora(s.kind))
    with pytest.raises(MarlInputError, match="is a peft adapter, not a model"):
        Model.from_pretrained(s.adapter, peft_config=lora(s.kind))
    with pytest.raises(MarlInputError, match="task_type='SEQ_CLS'; a policy adapter needs task_type='CAUSAL_LM'"):
        load(s, peft_config=LoraConfig(r=4, task_type="SEQ_CLS"))
    with pytest.raises(MarlInputError, match="must be a peft LoraConfig"):
        load(s, peft_config={"r": 4})
    with pytest.raises(MarlInputError, match="already exists"):
        load(s, reward_adapter_name="default")


def test_scoring_bad_inputs(s, tokenizer):
    inputs = batch(tokenizer, TEXTS[:2])
    with pytest.raises(MarlInputError, match="no reward adapter"):
        load(s, reward_adapter=None).compute_reward_score(**inputs)
    inputs["attention_mask"][1] = 0
    with pytest.raises(MarlInputError, match=r"rows \[1\] of attention_mask are all zeros"):
        load(s).compute_reward_score(**inputs)
