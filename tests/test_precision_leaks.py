"""A trainer computes in the precision it asked for, and nothing else (issue 19, item 5).

Accelerate keeps one precision per process and every transformers/TRL Trainer resets it (TRL's RewardConfig
defaults to bf16), so stage 2 then PPO in one kernel used to run PPO in bf16 although it asked for fp32.
Building a bf16 PPOTrainer used to replace `model.forward` with an autocast wrapper. The value and score
heads rounded to bf16 under autocast. The fp16 GradScaler's scale was in neither a checkpoint nor the
rollback snapshot. And `value_head_dropout` never acted in PPO.
"""

import os
import types

import pytest
import torch
from peft import LoraConfig
from stand_ins import (LORA_TARGETS, make_hub_like_base, make_padless_tokenizer, make_reward_adapter,
                       make_tiny_llama, make_tokenizer, train_reward_adapter_with_trl)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from marl_utils import ppo_core
from marl_utils.modeling import AutoModelForCausalLMWithValueHead
from marl_utils.ppo import PPOTrainer
from marl_utils.ppo_config import PPOConfig
from marl_utils.ppo_core import build_rollout_batch
from marl_utils.value_head import Float32Linear, ValueHead

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    base = make_tiny_llama(root / "llama")
    return types.SimpleNamespace(base=str(base), adapter=str(make_reward_adapter(base, root / "rm")), root=root)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def make_model(s, **kw):
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS["llama"], task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(s.base, peft_config=lora, reward_adapter=s.adapter, **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.policy_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def config(**kw):
    return PPOConfig(**{**dict(batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-2, max_new_tokens=4,
                               steps=2), **kw})


def ids(tok, text):
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"])


def rollouts(tok):
    queries = [ids(tok, t) for t in ["the movie", "i loved this", "bad", "a wonderful film with great"]]
    responses = [ids(tok, t) for t in ["was great", "movie a lot it was fun", "plot", "music"]]
    return queries, responses, torch.tensor([1.0, -0.5, 2.0, 0.3])


def prompts(tok):
    return [ids(tok, t) for t in ["the movie", "i loved this movie a", "bad", "a wonderful film with", "it was"]]


def autocast_seen(model):
    """Record (autocast on, its dtype) at every forward of the base's body."""
    seen = []
    body = model.pretrained_model.get_base_model().model
    hook = body.register_forward_pre_hook(
        lambda *_: seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))))
    return seen, hook


# ------------------------------------------------------------------------ precision between trainers
@pytest.mark.parametrize("asked", [None, "no"])
def test_ppo_after_a_bf16_reward_stage_runs_in_the_precision_it_asked_for(tmp_path, asked):
    base = make_hub_like_base(tmp_path / "base")
    tokenizer = make_padless_tokenizer()
    adapter = train_reward_adapter_with_trl(base, tokenizer, tmp_path / "rm")  # RewardConfig's default: bf16
    from accelerate.state import AcceleratorState

    assert AcceleratorState().mixed_precision == "bf16"  # what stage 2 left in the process
    s = types.SimpleNamespace(base=str(base), adapter=str(adapter))
    model = make_model(s)
    trainer = PPOTrainer(config(mixed_precision=asked), model, tokenizer)
    assert trainer.mixed_precision == "no"
    seen, hook = autocast_seen(model)
    queries, responses, scores = rollouts(tokenizer)
    trainer.step(queries, responses, trainer.score(queries, responses))
    hook.remove()
    assert seen and not any(on for on, _ in seen)  # every forward of the step in float32
    assert "forward" not in model.__dict__


def test_a_later_trainer_does_not_change_an_earlier_ones_precision(stand_in, tok, tmp_path):
    model = make_model(stand_in)
    trainer = PPOTrainer(config(mixed_precision="bf16", ppo_epochs=1), model, tok)
    train_reward_adapter_with_trl(stand_in.base, make_tokenizer(), tmp_path / "rm", bf16=False, steps=1)
    from accelerate.state import AcceleratorState

    assert AcceleratorState().mixed_precision == "no"  # the later Trainer reset the process's precision
    # and as stage 2 on a GPU (fp16) would leave it: Accelerate's own autocast would now pick float16
    AcceleratorState._shared_state["_mixed_precision"] = "fp16"
    seen, hook = autocast_seen(model)
    queries, responses, scores = rollouts(tok)
    trainer.step(queries, responses, scores)
    hook.remove()
    assert seen and all(on and dtype == torch.bfloat16 for on, dtype in seen)


def test_model_forward_is_unchanged_after_a_bf16_trainer_is_built(stand_in, tok):
    model = make_model(stand_in).eval()
    batch = build_rollout_batch(*rollouts(tok)[:2], tok.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        before = model(**inputs)
    trainer = PPOTrainer(config(mixed_precision="bf16", ppo_epochs=1), model, tok)
    assert "forward" not in model.__dict__ and "_original_forward" not in model.__dict__
    seen, hook = autocast_seen(model)
    with torch.no_grad():
        after = model.eval()(**inputs)
    assert seen == [(False, seen[0][1])]  # the user's own call: no autocast
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
    seen.clear()
    trainer.step(*rollouts(tok))
    hook.remove()
    assert seen and all(on and dtype == torch.bfloat16 for on, dtype in seen)  # the trainer's passes keep theirs


# ------------------------------------------------------------------------ float32 heads
@pytest.mark.parametrize("make_head", [lambda: Float32Linear(4, 1), lambda: ValueHead(4).linear],
                         ids=["score_head", "value_head"])
def test_heads_compute_in_float32_under_autocast(make_head):
    head = make_head()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
        head.bias.fill_(0.0)
    hidden = torch.tensor([[3.0, 0.14159, 0.0, 5.0]])
    fp32 = head(hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = head(hidden.bfloat16())
        value = ValueHead(4)
        value.linear.load_state_dict(head.state_dict())
        values = value(hidden.bfloat16())
    assert under_autocast.dtype == torch.float32 and values.dtype == torch.float32
    assert torch.equal(under_autocast, head(hidden.bfloat16().float()))
    hidden_fp32_rounded = hidden.bfloat16().float()
    assert torch.equal(values, head(hidden_fp32_rounded).squeeze(-1))
    assert abs(fp32.item() - 3.14159) < 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head(hidden).item() == fp32.item()  # a bf16 Linear would give 3.140625


def test_reward_score_under_bf16_equals_the_float32_head_on_the_same_hidden_states(stand_in, tok):
    model = make_model(stand_in)
    batch = build_rollout_batch(*rollouts(tok)[:2], tok.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    captured = []
    hook = model.reward_head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = model.compute_reward_score(**inputs, per_token=True)
    hook.remove()
    with torch.no_grad():
        fp32 = torch.nn.functional.linear(captured[0].float(), model.reward_head.weight, model.reward_head.bias)
    assert scores.dtype == torch.float32
    assert torch.equal(scores, fp32.squeeze(-1))


# ------------------------------------------------------------------------ GradScaler state
def with_scaler(trainer):
    """A GradScaler as Accelerate makes one for fp16 (on CPU: fp16 itself needs CUDA); it doubles every step."""
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1)
    return trainer


def test_grad_scaler_state_is_in_checkpoints(stand_in, tok, tmp_path):
    whole = with_scaler(PPOTrainer(config(), make_model(stand_in), tok))
    whole.train(prompts(tok), progress=False)
    first = with_scaler(PPOTrainer(config(steps=1), make_model(stand_in), tok))
    first.train(prompts(tok), output_dir=tmp_path, progress=False)
    resumed = with_scaler(PPOTrainer(config(), make_model(stand_in), tok))
    resumed.train(prompts(tok), output_dir=tmp_path, resume=True, progress=False)
    assert whole.accelerator.scaler.get_scale() == 2.0 ** 16  # 8 optimizer steps in 2 PPO steps
    assert resumed.accelerator.scaler.state_dict() == whole.accelerator.scaler.state_dict()
    for a, b in zip(whole.model.trainable_parameters(), resumed.model.trainable_parameters()):
        assert torch.equal(a, b)


def test_a_failed_step_puts_the_grad_scaler_back(stand_in, tok, monkeypatch):
    trainer = with_scaler(PPOTrainer(config(), make_model(stand_in), tok))
    trainer.step(*rollouts(tok))
    before = trainer.accelerator.scaler.state_dict()
    calls = []
    real_loss = ppo_core.policy_loss

    def loss_that_breaks_on_the_third_minibatch(*args, **kwargs):
        loss, stats = real_loss(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), stats

    monkeypatch.setattr("marl_utils.ppo.policy_loss", loss_that_breaks_on_the_third_minibatch)
    with pytest.raises(FloatingPointError):
        trainer.step(*rollouts(tok))
    assert len(calls) == 3  # two optimizer steps (two scale doublings) were taken, then rolled back
    assert trainer.accelerator.scaler.state_dict() == before


# ------------------------------------------------------------------------ value_head_dropout
def test_value_head_dropout_acts_in_the_training_forward_only(stand_in, tok):
    model = make_model(stand_in, value_head_dropout=0.5)
    dropout = model.v_head.dropout
    states = []
    hook = dropout.register_forward_pre_hook(lambda module, args: states.append(module.training and module.p > 0))
    trainer = PPOTrainer(config(), model, tok)
    for fused in (True, False):
        trainer.fuse_rollout = fused
        states.clear()
        rollout = trainer.rollout_forward(build_rollout_batch(*rollouts(tok)[:2], tok.pad_token_id))
        assert states and not any(states)  # rollout values without dropout: deterministic targets
        again = trainer.rollout_forward(build_rollout_batch(*rollouts(tok)[:2], tok.pad_token_id))
        assert torch.equal(rollout.values, again.values)
    states.clear()
    stats = trainer.step(*rollouts(tok))
    hook.remove()
    # the rollout's forwards without it, then the PPO epochs' 4 forwards (2 epochs x 2 minibatches) with it
    assert states[-4:] == [True] * 4 and states[:-4] and not any(states[:-4])
    assert abs(stats["ppo/policy/approxkl_first"]) < 1e-6  # the policy's ratio still starts at 1
