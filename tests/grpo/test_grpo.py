"""TRL's GRPOTrainer / RLOOTrainer on the one base, scored by the reward adapter (issue 15, notebook 07)."""

import json
import os

import pytest
import torch
from peft import LoraConfig
from stand_ins import LORA_TARGETS, TEXTS, make_reward_adapter, make_tiny_llama, make_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from marl_utils.infra.errors import MarlInputError
from marl_utils.grpo.trainers import GRPOSettings, build_trainer, grpo_settings, quiet_trl, round_history
from marl_utils.grpo.reward_function import reward_adapter_reward
from marl_utils.model.multi_adapter_model import AutoModelForCausalLMWithValueHead

torch.set_num_threads(1)
# A few rounds of 8 completions (2 prompts x 4), 6 new tokens: every TRL code path, in seconds.
SMALL = GRPOSettings(steps=2, rollouts_per_step=8, num_generations=4, mini_batch_size=4, num_iterations=2,
                     learning_rate=5e-2, grpo_beta=0.05, rloo_beta=0.05, max_new_tokens=6, min_reward_gain=0.0,
                     max_kl=100.0)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    base = make_tiny_llama(root / "llama")
    other = make_tiny_llama(root / "other", seed=1)
    return {"base": str(base), "adapter": str(make_reward_adapter(base, root / "rm")), "other": str(other)}


@pytest.fixture
def tokenizer():
    tok = make_tokenizer()
    tok.padding_side = "left"
    return tok


def load(parts, base="base", reward=True):
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS["llama"], task_type="CAUSAL_LM")
    return AutoModelForCausalLMWithValueHead.from_pretrained(parts[base], peft_config=lora,
                                                             reward_adapter=parts["adapter"] if reward else None)


def prompts(tokenizer, n=8):
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"][:3] for text in TEXTS]
    return [torch.tensor(ids[i % len(ids)]) for i in range(n)]


def frozen_weights(model):
    """Every tensor TRL must leave alone: the base, the reward LoRA and the score head."""
    state = {k: v.clone() for k, v in model.pretrained_model.state_dict().items() if ".default." not in k}
    state.update({f"reward_head.{k}": v.clone() for k, v in model.reward_head.state_dict().items()})
    return state


def policy_weights(model):
    return [p.detach().clone() for p in model.policy_parameters()]


def trainable(peft_model):
    return {name for name, p in peft_model.named_parameters() if p.requires_grad}


class Recorder:
    """Wraps the reward function TRL calls and notes the model's state around each call."""

    __name__ = "recorder"

    def __init__(self, reward):
        self.reward, self.calls = reward, []

    def __call__(self, **kwargs):
        peft_model = self.reward.peft_model
        modes = [m.training for m in peft_model.modules()]
        scores = self.reward(**kwargs)
        self.calls.append({"active": peft_model.active_adapter, "trainable": trainable(peft_model),
                           "modes_kept": modes == [m.training for m in peft_model.modules()],
                           "training": peft_model.training, "n": len(scores)})
        return scores


def test_scores_equal_compute_reward_score_row_by_row(parts, tokenizer):
    model = load(parts)
    reward = reward_adapter_reward(model, tokenizer, batch_size=3)  # several chunks, ragged lengths
    texts = ["the movie was", "boring dull", "i loved this movie a"]
    completions = [[5, 6, 7, 1], [8], [9, 10]]
    scores = reward(prompts=texts, completions=["x"] * 3, completion_ids=completions)
    for text, completion, score in zip(texts, completions, scores):
        ids = torch.tensor([tokenizer(text)["input_ids"] + completion])
        assert score == pytest.approx(model.compute_reward_score(ids).item(), abs=1e-5)
    assert len(set(round(s, 4) for s in scores)) == 3, "the stand-in adapter must tell these rows apart"


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_reward_call_restores_adapter_flags_and_mode(parts, tokenizer, mode):
    model = load(parts)
    peft_model = model.pretrained_model
    getattr(peft_model, mode)()
    flags, modes = trainable(peft_model), [m.training for m in peft_model.modules()]
    assert flags == {n for n, _ in peft_model.named_parameters() if ".default." in n and "lora_" in n}
    reward_adapter_reward(model, tokenizer)(prompts=["the movie"], completions=["x"], completion_ids=[[5, 6]])
    assert peft_model.active_adapter == "default"
    assert trainable(peft_model) == flags
    assert [m.training for m in peft_model.modules()] == modes


def test_the_reference_is_the_plain_base_with_the_reward_adapter_off_too(parts):
    from transformers import AutoModelForCausalLM

    model = load(parts)
    plain = AutoModelForCausalLM.from_pretrained(parts["base"]).eval()
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    peft_model = model.pretrained_model.eval()
    peft_model.set_adapter("reward_adapter")  # even with the reward LoRA switched on, disabling means all off
    with torch.no_grad(), peft_model.disable_adapter():
        disabled = peft_model(input_ids=ids).logits
    with torch.no_grad():
        reward_on = peft_model(input_ids=ids).logits
    model.set_policy_adapter("default")
    assert torch.equal(disabled, plain(input_ids=ids).logits)
    assert not torch.allclose(reward_on, disabled), "the reward LoRA must matter when it is on"


def test_grpo_trains_only_the_policy_and_the_reference_is_the_base(parts, tokenizer):
    model = load(parts)
    frozen, policy = frozen_weights(model), policy_weights(model)
    probe = torch.tensor([[3, 4, 5, 6, 1]])
    score_before = model.compute_reward_score(probe)
    trainer = build_trainer("grpo", model, tokenizer, prompts(tokenizer), SMALL, progress=False)
    recorder = Recorder(trainer.reward_funcs[0])
    trainer.reward_funcs[0] = recorder
    assert "ref" not in model.pretrained_model.peft_config, "TRL's copy of the policy must not be the reference"
    with quiet_trl():
        trainer.train()

    after = frozen_weights(model)
    assert after.keys() == frozen.keys()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen), "base, reward LoRA and score head bit-identical"
    assert torch.equal(model.compute_reward_score(probe), score_before)
    assert any(not torch.equal(a, b) for a, b in zip(policy, policy_weights(model))), "the policy LoRA must move"
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.policy_parameters()}
    assert len(recorder.calls) == SMALL.steps and all(c["n"] == SMALL.rollouts_per_step for c in recorder.calls)
    policy_names = {n for n, _ in model.pretrained_model.named_parameters() if ".default." in n and "lora_" in n}
    for call in recorder.calls:  # what TRL expects after each reward call: policy active, training, flags as before
        assert call["active"] == "default" and call["training"] and call["modes_kept"]
        assert call["trainable"] == policy_names
    assert len(round_history(trainer, SMALL)) == SMALL.steps


@pytest.mark.parametrize("policy", ["fresh", "trained"])
def test_the_first_kl_is_measured_against_the_base(parts, tokenizer, policy):
    """A fresh LoRA is the base exactly (KL 0). With TRL's "ref" adapter, a copy of the policy, a trained policy
    would start at KL 0 too; against the adapter-disabled base it does not."""
    model = load(parts)
    if policy == "trained":
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.policy_parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    # one optimizer step in the round, so TRL's logged KL is the one before any update
    settings = GRPOSettings(**{**SMALL.to_dict(), "steps": 1, "num_iterations": 1, "mini_batch_size": 8})
    trainer = build_trainer("grpo", model, tokenizer, prompts(tokenizer), settings, progress=False)
    with quiet_trl():
        trainer.train()
    kl = round_history(trainer, settings)[0]["objective/kl"]
    assert kl == 0.0 if policy == "fresh" else kl > 0.01


def test_rloo_takes_the_same_reward_function(parts, tokenizer):
    model = load(parts)
    frozen, policy = frozen_weights(model), policy_weights(model)
    trainer = build_trainer("rloo", model, tokenizer, prompts(tokenizer), SMALL, progress=False)
    assert "ref" not in model.pretrained_model.peft_config  # RLOO adds it even at beta = 0
    with quiet_trl():
        trainer.train()
    after = frozen_weights(model)
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert any(not torch.equal(a, b) for a, b in zip(policy, policy_weights(model)))
    history = round_history(trainer, SMALL)
    assert len(history) == SMALL.steps and history[0]["objective/kl"] == 0.0


def test_no_reward_adapter_or_another_base_is_refused_before_training(parts, tokenizer):
    bare = load(parts, reward=False)
    with pytest.raises(MarlInputError, match="no reward adapter"):
        reward_adapter_reward(bare, tokenizer)
    with pytest.raises(MarlInputError, match="no reward adapter"):
        build_trainer("grpo", bare, tokenizer, prompts(tokenizer), SMALL, progress=False)
    with pytest.raises(MarlInputError, match="no reward score head"):
        reward_adapter_reward(bare.pretrained_model, tokenizer)  # a bare PeftModel: the head is not on it
    reward = reward_adapter_reward(load(parts), tokenizer)
    with pytest.warns(UserWarning, match="records base_model_name_or_path"):
        other = load(parts, base="other")  # the adapter loads on another base of its shape, with a warning
    with pytest.raises(MarlInputError, match="not the peft model holding the reward adapter"):
        reward.check_trains(other.pretrained_model)
    with pytest.raises(MarlInputError, match="conversational"):
        reward(prompts=[[{"role": "user", "content": "hi"}]], completions=["x"], completion_ids=[[5]])


def test_trl_logprobs_of_a_left_padded_row_equal_the_unpadded_row(tmp_path, tokenizer):
    """GPT-2 has learned absolute positions: without position ids from the mask, a padded row is scored elsewhere."""
    from stand_ins import make_tiny_gpt2

    base = make_tiny_gpt2(tmp_path / "gpt2")
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS["gpt2"], task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        str(base), peft_config=lora,
        reward_adapter=str(make_reward_adapter(base, tmp_path / "rm", target_modules=["c_attn"])))
    trainer = build_trainer("grpo", model, tokenizer, prompts(tokenizer), SMALL, progress=False)
    row = torch.tensor([[5, 6, 7, 8, 9, 10]])
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(row)], dim=1)

    def logprobs(ids, attention_mask):
        with torch.no_grad():
            return trainer._get_per_token_logps_and_entropies(model.pretrained_model, ids, attention_mask, 3, 1)[0]

    unpadded = logprobs(row, torch.ones_like(row))
    assert torch.allclose(logprobs(padded, mask), unpadded, atol=1e-5)
    model.pretrained_model._marl_position_hook.remove()  # TRL's own numbering, from the first pad
    assert not torch.allclose(logprobs(padded, mask), unpadded, atol=1e-3)


def test_an_unfrozen_base_weight_is_refused(parts, tokenizer):
    model = load(parts)
    model.pretrained_model.get_base_model().model.embed_tokens.weight.requires_grad_(True)
    with pytest.raises(MarlInputError, match="TRL would train .*embed_tokens"):
        build_trainer("grpo", model, tokenizer, prompts(tokenizer), SMALL, progress=False)


def test_wrapped_models_unwrap(parts, tokenizer, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = load(parts)
    expected = reward_adapter_reward(model, tokenizer)(prompts=["the movie"], completions=["x"],
                                                       completion_ids=[[5, 6]])
    compiled = torch.compile(model)  # wraps lazily: nothing compiles until it is called
    assert reward_adapter_reward(compiled, tokenizer)(prompts=["the movie"], completions=["x"],
                                                      completion_ids=[[5, 6]]) == expected
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model.pretrained_model)  # what TRL trains under torchrun
        reward = reward_adapter_reward(DistributedDataParallel(model), tokenizer)
        reward.check_trains(wrapped)
        assert reward(prompts=["the movie"], completions=["x"], completion_ids=[[5, 6]]) == expected
    finally:
        dist.destroy_process_group()


def test_settings_follow_the_profile_and_refuse_bad_sizes():
    from marl_utils.infra.profiles import PROFILES

    tiny = PROFILES["tiny"]
    s = grpo_settings(tiny)
    assert s.rollouts_per_step == tiny.ppo_batch_size and s.max_new_tokens == tiny.ppo_max_new_tokens
    assert s.steps * s.rollouts_per_step == tiny.ppo_steps * tiny.ppo_batch_size, "same tokens as PPO"
    assert s.optimizer_steps == s.steps * s.rollouts_per_step // s.mini_batch_size * s.num_iterations
    for bad, match in [({"num_generations": 1}, "at least 2"), ({"num_generations": 7}, "multiple of num_gen"),
                       ({"mini_batch_size": 5}, "multiple of mini_batch"), ({"grpo_beta": 0.0}, "must be > 0")]:
        with pytest.raises(MarlInputError, match=match):
            grpo_settings(tiny, **bad)
    with pytest.raises(MarlInputError, match="unknown"):
        build_trainer("ppo", None, None, [], s)


def test_marl_grpo_and_run_algo_write_their_folders(tmp_path, monkeypatch):
    from small_profiles import TOY

    from marl_utils.cli import main
    from marl_utils.infra.profiles import PROFILES

    monkeypatch.setitem(PROFILES, "tiny", TOY)
    out = tmp_path / "run"
    assert main(["grpo", "--profile", "tiny", "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "grpo" / "metrics.json").read_text())
    assert metrics["algo"] == "grpo" and metrics["steps"] == TOY.ppo_steps
    assert metrics["rollouts"] == TOY.ppo_steps * TOY.ppo_batch_size and metrics["max_new_tokens"] == 6
    assert {"eval_reward_before", "eval_reward_after", "kl_final", "train_seconds", "peak_memory_mb",
            "generated_tokens", "distinct_2_after", "history", "settings"} <= set(metrics)
    assert (out / "grpo" / "marl_model.json").exists() and (out / "grpo" / "adapter_model.safetensors").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary folders left behind"
    stamp = (out / "grpo" / "metrics.json").stat().st_mtime_ns
    assert main(["grpo", "--profile", "tiny", "--output-dir", str(out)]) == 0
    assert (out / "grpo" / "metrics.json").stat().st_mtime_ns == stamp, "a finished stage is reused"
    assert main(["run", "--algo", "rloo", "--profile", "tiny", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algo"] == "rloo" and (out / "rloo" / "metrics.json").exists()
    assert not (out / "ppo").exists()
    with pytest.raises(SystemExit):
        main(["grpo", "--algo", "ppo", "--profile", "tiny", "--output-dir", str(out)])
    assert main(["run", "--algo", "grpo", "--resume", "--profile", "tiny", "--output-dir", str(out)]) == 2
