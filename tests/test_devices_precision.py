"""The device contract, one precision per step, and dropout off without eval mode (Colab/GPU issue).

- Devices: every public function takes tensors on any device and works on the model's device. On this
  CPU-only machine a second device is simulated by `foreign_device.on_other_device` (ops that mix it with
  the model's tensors raise as CUDA does), so a missing `.to(device)` fails here, not only on a GPU.
- Precision: with bf16 autocast, generation, rollout, reference, reward and training forwards all run in
  it, so at step 0 (fresh adapter: policy == reference) the KL is exactly 0 and the first ratio is 1.
- Gradient checkpointing keeps working in a PPO step: dropout is switched off by probability, not by eval
  mode (HF checkpointing only runs in train mode), and the gradients equal those without checkpointing.
"""

import os
import types

import pytest
import torch
from foreign_device import ForeignDeviceError, is_on_model_device, on_other_device
from peft import LoraConfig
from stand_ins import LORA_TARGETS, MAKE_BASE, make_reward_adapter, make_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from marl_utils.modeling import AutoModelForCausalLMWithValueHead
from marl_utils.ppo import PPOTrainer
from marl_utils.ppo_config import PPOConfig
from marl_utils.ppo_core import build_rollout_batch

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:mixed precision bf16 is on")


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    root = tmp_path_factory.mktemp("device_stand_ins")
    base = MAKE_BASE["llama"](root / "llama", attention_dropout=0.1)
    return types.SimpleNamespace(kind="llama", base=str(base), adapter=str(make_reward_adapter(base, root / "rm")))


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def make_model(s, fresh=True, dropout=0.0):
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=LORA_TARGETS[s.kind],
                      task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(s.base, peft_config=lora, reward_adapter=s.adapter)
    if not fresh:  # a policy that differs from the reference
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.policy_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def config(**kw):
    return PPOConfig(**{**dict(batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-2, max_new_tokens=5,
                               steps=1, seed=0), **kw})


def ids(tok, text):
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"])


def rollouts(tok):
    queries = [ids(tok, t) for t in ["the movie", "i loved this", "bad", "a wonderful film with great"]]
    responses = [ids(tok, t) for t in ["was great", "movie a lot it was fun", "plot", "music"]]
    return queries, responses, torch.tensor([1.0, -0.5, 2.0, 0.3])


# ------------------------------------------------------------------------------------------------ devices
def test_the_simulated_device_catches_what_cuda_would():
    """The notebook-03 bug: prompts on the CPU, generated tokens on the GPU, concatenated."""
    queries, responses = [torch.tensor([3, 4])], on_other_device([torch.tensor([5, 6])])
    with pytest.raises(ForeignDeviceError):
        torch.cat([queries[0], responses[0]])
    batch = build_rollout_batch(queries, responses, pad_token_id=0, device="cpu")  # moved first: fine
    assert batch["input_ids"].tolist() == [[3, 4, 5, 6]] and is_on_model_device(batch)


def test_build_rollout_batch_takes_rows_from_two_devices(tok):
    queries, responses, _ = rollouts(tok)
    mixed = build_rollout_batch(queries, on_other_device(responses), tok.pad_token_id, device="cpu")
    plain = build_rollout_batch(queries, responses, tok.pad_token_id)
    assert is_on_model_device(mixed)
    for key in ("input_ids", "attention_mask", "position_ids", "response_mask"):
        assert torch.equal(mixed[key], plain[key])


def test_every_public_call_accepts_inputs_on_another_device(stand_in, tok):
    model = make_model(stand_in, fresh=False)
    trainer = PPOTrainer(config(), model, tok)
    queries, responses, scores = rollouts(tok)
    far_queries, far_responses = on_other_device(queries), on_other_device(responses)

    generated = trainer.generate(far_queries, batch_size=4)
    assert is_on_model_device(generated) and all(r.device == trainer.device for r in generated)
    got = trainer.score(far_queries, far_responses)
    assert is_on_model_device(got) and torch.equal(got, trainer.score(queries, responses))

    batch = build_rollout_batch(queries, responses, tok.pad_token_id)
    far = on_other_device({k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")})
    rewards = model.compute_reward_score(**far)
    assert is_on_model_device(rewards) and torch.equal(rewards, model.compute_reward_score(
        **{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}))
    logits, _, values = model(**far)
    assert is_on_model_device((logits, values))
    assert is_on_model_device(model.reference_logits(**far))

    stats = trainer.step(far_queries, far_responses, on_other_device(scores))
    assert all(isinstance(v, float) for v in stats.values())
    evaluation = trainer.evaluate(far_queries)
    assert isinstance(evaluation["reward_mean"], float)
    trainer.train(far_queries + far_queries, steps=2, progress=False)
    assert trainer.step_count == 2


# ------------------------------------------------------------------------------------------------ precision
@pytest.fixture
def fresh_accelerator_state():
    """One process holds one Accelerate precision; tests that change it start and end from a clean state."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("fused", [True, False], ids=["fused_rollout", "separate_rollout"])
def test_bf16_autocast_everywhere_gives_zero_kl_at_step_zero(stand_in, tok, fused, fresh_accelerator_state):
    trainer = PPOTrainer(config(mixed_precision="bf16", fused_rollout=fused, ppo_epochs=1), make_model(stand_in), tok)
    assert trainer.accelerator.mixed_precision == "bf16"
    queries, _, _ = rollouts(tok)
    responses = trainer.generate(queries, batch_size=4)
    stats = trainer.step(queries, responses, trainer.score(queries, responses))
    assert stats["objective/kl"] == 0.0  # policy == reference, computed in one precision
    assert abs(stats["ppo/policy/approxkl_first"]) < 1e-6


def test_two_trainers_in_one_process_each_keep_their_precision(stand_in, tok, fresh_accelerator_state):
    """Accelerate holds one precision per process; each trainer autocasts with its own (issue 19, item 5)."""
    trainers = [PPOTrainer(config(mixed_precision=mixed, ppo_epochs=1), make_model(stand_in), tok)
                for mixed in ("no", "bf16")]
    queries, responses, scores = rollouts(tok)
    for trainer, expected in zip(trainers, (False, True)):
        seen = []
        body = trainer.model.pretrained_model.get_base_model().model
        hook = body.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
        trainer.step(queries, responses, scores)
        hook.remove()
        assert seen and set(seen) == {expected}, trainer.mixed_precision


def test_auto_precision_follows_the_hardware(stand_in, tok, fresh_accelerator_state, monkeypatch):
    from marl_utils import precision

    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    trainer = PPOTrainer(config(mixed_precision="auto"), make_model(stand_in), tok)
    assert trainer.accelerator.mixed_precision == "no"  # emulated bf16 would be slower than fp32


# ------------------------------------------------------------------------------------------------ checkpointing
def decoder_layer_calls(model):
    """Count the calls of the first decoder layer's MLP (HF recomputes a checkpointed layer's forward in backward,
    which calls its submodules again)."""
    mlp = model.pretrained_model.get_base_model().model.layers[0].mlp
    calls = []
    mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_gradient_checkpointing_runs_in_a_ppo_step_and_changes_nothing(stand_in, tok):
    results = {}
    for checkpointing in (False, True):
        model = make_model(stand_in, fresh=False, dropout=0.1)
        if checkpointing:
            model.pretrained_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        calls = decoder_layer_calls(model)
        sgd = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
        trainer = PPOTrainer(config(ppo_epochs=1, mini_batch_size=4), model, tok, optimizer=sgd)
        trainer.step(*rollouts(tok))
        results[checkpointing] = ([p.detach().clone() for p in model.trainable_parameters()], len(calls))
    (plain, plain_calls), (checkpointed, checkpointed_calls) = results[False], results[True]
    # rollout forward + training forward, and with checkpointing the recomputation in backward
    assert checkpointed_calls == plain_calls + 1, (plain_calls, checkpointed_calls)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
