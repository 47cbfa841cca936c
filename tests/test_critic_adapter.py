"""The critic as its own LoRA adapter on the one base (`critic="adapter"`), and started from the reward adapter.

The policy loss moves only the policy adapter, the value loss only the critic adapter and its value head;
the reward adapter and the base never change; save/load, resume, the fused rollout, 4-bit bases and DDP
keep working.
"""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict
from stand_ins import LORA_TARGETS, MAKE_BASE, make_reward_adapter, make_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from marl_utils.errors import MarlInputError
from marl_utils.modeling import AutoModelForCausalLMWithValueHead
from marl_utils.ppo import PPOTrainer
from marl_utils.ppo_config import PPOConfig
from marl_utils.ppo_core import build_rollout_batch

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    root = tmp_path_factory.mktemp("critic")
    made = {}
    for kind in ("llama", "gpt2"):
        base = MAKE_BASE[kind](root / kind)
        made[kind] = types.SimpleNamespace(kind=kind, base=str(base),
                                           adapter=str(make_reward_adapter(base, root / f"{kind}_rm",
                                                                           target_modules=LORA_TARGETS[kind])))
    return made


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def lora(kind, r=4):
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=LORA_TARGETS[kind], task_type="CAUSAL_LM")


def make_model(s, **kw):
    torch.manual_seed(0)
    kw.setdefault("critic", "adapter")
    return AutoModelForCausalLMWithValueHead.from_pretrained(s.base, peft_config=lora(s.kind), reward_adapter=s.adapter,
                                                             **kw)


def config(**kw):
    return PPOConfig(**{**dict(batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-2, max_new_tokens=5,
                               steps=2), **kw})


def ids(tok, text):
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"])


def rollouts(tok):
    queries = [ids(tok, t) for t in ["the movie", "i loved this", "bad", "a wonderful film with great"]]
    responses = [ids(tok, t) for t in ["was great", "movie a lot it was fun", "plot", "music"]]
    return queries, responses, torch.tensor([1.0, -0.5, 2.0, 0.3])


def prompts(tok):
    return [ids(tok, t) for t in ["the movie", "i loved this movie a", "bad", "a wonderful film with", "it was"]]


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_only_policy_critic_and_value_head_change_in_training(stand_ins, tok, kind):
    model = make_model(stand_ins[kind])
    assert model.critic == "adapter" and model.critic_adapter == "default_critic"
    batch = build_rollout_batch(*rollouts(tok)[:2], tok.pad_token_id)
    probe = {k: batch[k] for k in ("input_ids", "attention_mask")}
    reward_before, ref_before = model.compute_reward_score(**probe), model.reference_logits(**probe)
    before = snapshot(model)
    PPOTrainer(config(), model, tok).train(prompts(tok), progress=False)
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any(".default_critic." in n for n in changed) and any(".default." in n and "lora_" in n for n in changed)
    assert any(n.startswith("v_heads.default.") for n in changed)
    allowed = {n for n in before if ".default_critic." in n or ("lora_" in n and ".default." in n)
               or n.startswith("v_heads.default.")}
    assert changed <= allowed
    assert torch.equal(model.compute_reward_score(**probe), reward_before)  # reward adapter untouched
    assert torch.equal(model.reference_logits(**probe), ref_before)  # base untouched


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_no_gradient_crosses_between_policy_and_critic(stand_ins, tok, checkpointing):
    """Through the trainer's own training forward: one stacked [policy; critic] pass, backward inside critic_rows
    (where gradient checkpointing recomputes the layers)."""
    from marl_utils.forward_modes import train_mode_without_dropout
    from marl_utils.rollout import policy_forward

    model = make_model(stand_ins["llama"])
    with torch.no_grad():
        for p in model.critic_parameters():
            p.normal_(0, 0.1)  # a critic that differs from the policy
    if checkpointing:
        model.pretrained_model.get_base_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = PPOTrainer(config(), model, tok)
    batch = build_rollout_batch(*rollouts(tok)[:2], tok.pad_token_id)
    rows = torch.arange(4)
    body_rows = []
    body = model.pretrained_model.get_base_model().model
    hook = body.register_forward_pre_hook(lambda module, args, kwargs: body_rows.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)

    def grads(loss_of):
        model.zero_grad(set_to_none=True)
        with train_mode_without_dropout(model), model.critic_rows():
            logprobs, values, _ = policy_forward(trainer.policy, batch, rows, 1.0)
            loss_of(logprobs, values).backward()
        norm = lambda ps: sum(float(p.grad.abs().sum()) for p in ps if p.grad is not None)  # noqa: E731
        return norm(model.policy_parameters()), norm(model.critic_parameters() + list(model.v_head.parameters()))

    policy_grad, critic_grad = grads(lambda logprobs, values: logprobs.mean())
    assert policy_grad > 0 and critic_grad == 0
    policy_grad, critic_grad = grads(lambda logprobs, values: (values ** 2).mean())
    assert policy_grad == 0 and critic_grad > 0
    hook.remove()
    assert body_rows and set(body_rows) == {8}  # every pass (and recomputation) ran the 4 rows stacked twice


def test_values_come_from_the_critic_adapter(stand_ins, tok):
    model = make_model(stand_ins["llama"]).eval()
    batch = build_rollout_batch(*rollouts(tok)[:2], tok.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        for p in model.critic_parameters():
            p.normal_(0, 0.2)
        logits, _, values = model(**inputs)
        model.pretrained_model.set_adapter("default_critic")  # the critic alone, by hand
        hidden = model.pretrained_model(**inputs, output_hidden_states=True).hidden_states[-1]
        model.set_policy_adapter("default")
        plain_logits = model.pretrained_model(**inputs).logits
    torch.testing.assert_close(values, model.v_head(hidden), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, plain_logits.float(), atol=1e-5, rtol=1e-5)  # logits from the policy


def test_critic_started_from_the_reward_adapter(stand_ins):
    s = stand_ins["llama"]
    model = make_model(s, critic_init="reward_adapter")
    reward = get_peft_model_state_dict(model.pretrained_model, adapter_name="reward_adapter")
    critic = get_peft_model_state_dict(model.pretrained_model, adapter_name="default_critic")
    lora_keys = [k for k in reward if "lora_" in k]
    assert lora_keys and all(torch.equal(reward[k], critic[k]) for k in lora_keys)
    assert torch.equal(model.v_head.linear.weight, model.reward_head.weight)
    assert all(p.requires_grad for p in model.critic_parameters())
    assert not any(p.requires_grad for p in model.pretrained_model.parameters() if any(
        p is q for q in __import__("marl_utils.critic", fromlist=["x"]).adapter_parameters(model.pretrained_model,
                                                                                          "reward_adapter")))
    # at the start the critic's value of a text is the reward model's score of it
    batch = {"input_ids": torch.tensor([[3, 4, 5, 6, 7]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    with torch.no_grad():
        _, _, values = model.eval()(**batch)
    torch.testing.assert_close(values[0, -1], model.compute_reward_score(**batch)[0], atol=1e-5, rtol=1e-5)


def test_bad_critic_choices_are_clear_errors(stand_ins):
    s = stand_ins["llama"]
    with pytest.raises(MarlInputError, match="critic='value' is unknown"):
        make_model(s, critic="value")
    with pytest.raises(MarlInputError, match="need critic='adapter'"):
        make_model(s, critic="head", critic_init="reward_adapter")
    with pytest.raises(MarlInputError, match="pass reward_adapter= too"):
        AutoModelForCausalLMWithValueHead.from_pretrained(s.base, peft_config=lora("llama"), critic="adapter",
                                                          critic_init="reward_adapter")


def test_save_load_and_resume_with_a_critic_adapter(stand_ins, tok, tmp_path):
    s = stand_ins["llama"]
    model = make_model(s)
    trainer = PPOTrainer(config(steps=1), model, tok)
    trainer.train(prompts(tok), output_dir=tmp_path / "run", progress=False)
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / "saved"), reward_adapter=s.adapter)
    assert loaded.critic == "adapter"
    batch = build_rollout_batch(*rollouts(tok)[:2], tok.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        assert torch.equal(model.eval()(**inputs)[2], loaded.eval()(**inputs)[2])
    resumed = PPOTrainer(config(steps=2), make_model(s), tok)
    resumed.train(prompts(tok), output_dir=tmp_path / "run", resume=True, progress=False)
    assert resumed.step_count == 2
    whole = PPOTrainer(config(steps=2), make_model(s), tok)  # the same run, never interrupted
    whole.train(prompts(tok), progress=False)
    assert [h["ppo/loss/value"] for h in resumed.history] == [h["ppo/loss/value"] for h in whole.history]
    for name, param in whole.model.named_parameters():  # policy, critic adapter and value head alike
        assert torch.equal(param, dict(resumed.model.named_parameters())[name]), name
    with torch.no_grad():
        assert torch.equal(whole.model.eval()(**inputs)[2], resumed.model.eval()(**inputs)[2])
        assert not torch.equal(whole.model(**inputs)[2], model(**inputs)[2])  # the second step moved the critic
    with pytest.raises(MarlInputError, match="same critic choice"):
        PPOTrainer(config(steps=3), make_model(s, critic="head"), tok).train(
            prompts(tok), output_dir=tmp_path / "run", resume=True, progress=False)


def test_fused_rollout_with_a_critic_equals_the_separate_passes(stand_ins, tok):
    model = make_model(stand_ins["gpt2"], critic_init="reward_adapter")
    with torch.no_grad():
        for p in model.policy_parameters():
            p.add_(torch.randn_like(p) * 0.2)
    trainer = PPOTrainer(config(), model, tok)
    batch = build_rollout_batch(*rollouts(tok)[:2], tok.pad_token_id)
    out = {}
    for fused in (True, False):
        trainer.fuse_rollout = fused
        out[fused] = trainer.rollout_forward(batch, with_reward=True)
    mask = out[True].mask.bool()
    for name in ("logprobs", "values", "ref_logprobs", "entropy"):
        torch.testing.assert_close(getattr(out[True], name)[mask], getattr(out[False], name)[mask], atol=1e-6,
                                   rtol=1e-5, msg=name)
    torch.testing.assert_close(out[True].scores, out[False].scores, atol=1e-6, rtol=1e-5)


def test_each_policy_gets_its_own_critic(stand_ins, tok):
    s = stand_ins["llama"]
    model = make_model(s, policy_adapter_name="policy_pos")
    model.add_policy_adapter("policy_neg", lora("llama"))
    assert model.critic_adapter_names == {"policy_pos": "policy_pos_critic", "policy_neg": "policy_neg_critic"}
    model.set_policy_adapter("policy_neg")
    before = snapshot(model)
    PPOTrainer(config(steps=1), model, tok).train(prompts(tok), progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert not {n for n in changed if "policy_pos" in n}  # the other policy, its critic and value head: untouched
    assert any(".policy_neg." in n and "lora_" in n for n in changed)  # the trained policy learned
    assert any(".policy_neg_critic." in n for n in changed)  # so did its critic adapter
    assert any(n.startswith("v_heads.policy_neg.") for n in changed)  # and its value head


def test_a_4bit_base_trains_a_critic_adapter(stand_ins, tok):
    pytest.importorskip("bitsandbytes")
    model = make_model(stand_ins["llama"], load_in_4bit=True)
    before = [p.detach().clone() for p in model.critic_parameters()]
    stats = PPOTrainer(config(), model, tok).step(*rollouts(tok))
    assert all(v == v for v in stats.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.critic_parameters()))


def test_two_processes_with_a_critic_adapter_equal_one_on_the_union_batch(stand_ins, tmp_path):
    s = stand_ins["llama"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(HERE)}
    worker = HERE / "dist_union_worker.py"
    for name, prefix, extra in [("ddp", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          "--nproc_per_node", "2"], []), ("union", [sys.executable], ["--union"])]:
        done = subprocess.run([*prefix, str(worker), s.base, s.adapter, str(tmp_path / name), "--critic", "adapter",
                               *extra], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    ddp, union = (torch.load(tmp_path / n / "weights.pt") for n in ("ddp", "union"))
    assert any("_critic" in k for k in ddp)
    for key in ddp:
        torch.testing.assert_close(ddp[key], union[key], atol=2e-6, rtol=1e-5, msg=key)
