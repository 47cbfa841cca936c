"""Faults an outside review of the PPO code found around the (correct) maths, one test per fix.

pad == EOS reward pooling, DDP-global whitening and token means, NaN-safe masks, requires_grad after the
reference, exact-or-refused resume, failed steps without half updates, two trainers with their own
gradient accumulation, eval/* in the trackers, and the seed's peft `add_adapter` route to a second policy.
"""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from stand_ins import LORA_TARGETS, make_reward_adapter, make_tiny_llama, make_tokenizer, plain_reward_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from marl_utils.ppo import maths as ppo_core
from marl_utils.infra.errors import MarlInputError
from marl_utils.model.multi_adapter_model import AutoModelForCausalLMWithValueHead
from marl_utils.ppo.trainer import PPOTrainer, has_accelerator
from marl_utils.ppo.config import PPOConfig

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
HERE = Path(__file__).resolve().parents[1] / "support"


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    base = make_tiny_llama(root / "llama")
    return types.SimpleNamespace(kind="llama", base=str(base), adapter=str(make_reward_adapter(base, root / "rm")))


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def lora(**kw):
    return LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS["llama"], task_type="CAUSAL_LM", **kw)


def make_model(s, seed=0, **kw):
    torch.manual_seed(seed)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(s.base, peft_config=lora(), reward_adapter=s.adapter, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.policy_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


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


def trainable_copy(model):
    return [p.detach().clone() for p in model.trainable_parameters()]


# ------------------------------------------------------------------------ 1. reward pooling when pad == EOS
@pytest.fixture(scope="module", params=["config_pad_is_eos", "config_without_pad"])
def pad_is_eos(request, tmp_path_factory):
    """A reward adapter trained with pad == EOS (what TRL's RewardTrainer does on a tokenizer without a pad token),
    its tokenizer saved with it; on a base whose config says pad == EOS, or, as on the Hub, has no pad id."""
    from transformers import AutoConfig, AutoTokenizer

    root = tmp_path_factory.mktemp(request.param)
    base = make_tiny_llama(root / "base")
    config = AutoConfig.from_pretrained(base)
    config.pad_token_id = config.eos_token_id if request.param == "config_pad_is_eos" else None
    config.save_pretrained(base)
    adapter = make_reward_adapter(base, root / "rm", save_tokenizer=False)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(adapter)
    return types.SimpleNamespace(kind="llama", base=str(base), adapter=str(adapter), config_pad=config.pad_token_id)


@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_equal_to_eos_reads_where_hf_sequence_classification_reads(pad_is_eos, tok, side):
    eos = tok.eos_token_id
    texts = ["the movie was great", "bad plot", "i loved this movie a lot it was fun"]
    rows = [torch.cat([ids(tok, t), torch.tensor([eos])]) for t in texts]  # reviews end with EOS, as in stage 2
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), eos)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        input_ids[i, span], attention_mask[i, span] = row, 1
    model = AutoModelForCausalLMWithValueHead.from_pretrained(pad_is_eos.base, peft_config=lora(),
                                                              reward_adapter=pad_is_eos.adapter)
    assert model.config.pad_token_id == pad_is_eos.config_pad  # the base's files as they were
    ours = model.compute_reward_score(input_ids=input_ids, attention_mask=attention_mask)
    trained = plain_reward_model(pad_is_eos.base, pad_is_eos.adapter)
    trained.config.pad_token_id = eos  # the reward model as it was trained: padded with EOS
    with torch.no_grad():
        hf = trained(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
    torch.testing.assert_close(ours, hf, atol=1e-5, rtol=1e-5)
    # and that is NOT the score at the trailing EOS, where a pad-distinct-from-EOS model would read
    at_eos = model.compute_reward_score(input_ids=input_ids, attention_mask=attention_mask, per_token=True)
    last = (attention_mask.shape[1] - 1 - attention_mask.flip(-1).argmax(-1))
    assert not torch.allclose(at_eos[torch.arange(3), last], hf, atol=1e-4)


# ------------------------------------------------------------------------ 2. DDP: global whitening and means
def test_two_processes_equal_one_process_on_the_union_batch(stand_in, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(HERE)}
    worker = HERE / "dist_union_worker.py"
    runs = {"ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
            "union": [sys.executable]}
    for name, prefix in runs.items():
        extra = ["--union"] if name == "union" else []
        done = subprocess.run([*prefix, str(worker), stand_in.base, stand_in.adapter, str(tmp_path / name), *extra],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    ddp, union = (torch.load(tmp_path / n / "weights.pt") for n in runs)
    assert ddp.keys() == union.keys() and ddp
    for key in ddp:
        torch.testing.assert_close(ddp[key], union[key], atol=2e-6, rtol=1e-5, msg=key)
    ddp_stats, union_stats = (json.loads((tmp_path / n / "stats.json").read_text()) for n in runs)
    for key in ["env/score_std", "env/score_mean", "objective/kl", "ppo/val/explained_variance"]:
        assert ddp_stats[key] == pytest.approx(union_stats[key], abs=1e-5), key


def test_train_shards_the_prompts_over_processes(stand_in, tok, monkeypatch):
    """Each process trains on every world_size-th prompt (here: pretend to be rank 1 of 2)."""
    trainer = PPOTrainer(config(steps=1), make_model(stand_in), tok)
    seen = []
    monkeypatch.setattr(type(trainer.accelerator), "process_index", property(lambda self: 1))
    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: 2))
    monkeypatch.setattr("marl_utils.ppo.training_loop.train_step",
                        lambda trainer, shard, _: (seen.append(shard), setattr(trainer, "step_count", 1)))
    trainer.train(prompts(tok), progress=False)
    assert [p.tolist() for p in seen[0]] == [p.tolist() for p in prompts(tok)[1::2]]


# ------------------------------------------------------------------------ 3. masks select, never multiply
def test_nan_at_padding_cannot_poison_the_batch():
    torch.manual_seed(0)
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1.0]])
    values, logprobs, old = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    poisoned = lambda t: torch.where(mask.bool(), t, torch.tensor(float("nan")))  # noqa: E731
    scores = torch.tensor([1.0, -1.0])

    def everything(values, logprobs, old):
        rewards, kl = ppo_core.compute_rewards(scores, logprobs, old, mask, 0.1)
        advantages, returns = ppo_core.compute_gae(rewards, values, mask)
        whitened = ppo_core.masked_whiten(advantages, mask)
        pg, _ = ppo_core.policy_loss(logprobs, old, whitened, mask)
        vf, _ = ppo_core.value_loss(values, values.detach(), returns, mask)
        return [kl, advantages, returns, whitened, pg, vf, ppo_core.masked_mean(values, mask),
                ppo_core.masked_var(values, mask), ppo_core.explained_variance(values, returns, mask)]

    clean = everything(torch.where(mask.bool(), values, 0.0), torch.where(mask.bool(), logprobs, 0.0),
                       torch.where(mask.bool(), old, 0.0))
    dirty = everything(poisoned(values), poisoned(logprobs), poisoned(old))
    for a, b in zip(clean, dirty):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------ 4. requires_grad after the reference
def test_reference_restores_every_requires_grad_flag(stand_in, tmp_path):
    model = make_model(stand_in)
    model.add_policy_adapter("policy_1", lora())  # a frozen (inactive) adapter next to the trainable one
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad(), model.reference():
        pass
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags

    model.save_pretrained(tmp_path / "saved")
    frozen = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / "saved"), is_trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    with torch.no_grad(), frozen.reference():
        pass
    frozen.reference_logits(torch.tensor([[3, 4, 5]]))
    assert not any(p.requires_grad for p in frozen.parameters())  # peft re-enabling made them trainable


def test_the_trainers_reference_pass_leaves_flags_alone(stand_in, tok):
    model = make_model(stand_in)
    model.add_policy_adapter("policy_1", lora())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    PPOTrainer(config(fused_rollout=False), model, tok).step(*rollouts(tok))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


# ------------------------------------------------------------------------ 5. resume exactly or refuse
def test_resume_with_other_settings_or_prompts_is_refused(stand_in, tok, tmp_path):
    first = PPOTrainer(config(steps=1), make_model(stand_in), tok)
    first.train(prompts(tok), output_dir=tmp_path, progress=False)
    other_lr = PPOTrainer(config(steps=2, learning_rate=5e-3), make_model(stand_in), tok)
    with pytest.raises(MarlInputError, match=r"learning_rate: 0.01 in the checkpoint, 0.005 now"):
        other_lr.train(prompts(tok), output_dir=tmp_path, resume=True, progress=False)
    assert other_lr.step_count == 0
    other_prompts = PPOTrainer(config(steps=2), make_model(stand_in), tok)
    with pytest.raises(MarlInputError, match="another prompt set"):
        other_prompts.train(prompts(tok)[:4], output_dir=tmp_path, resume=True, progress=False)
    longer = PPOTrainer(config(steps=2), make_model(stand_in), tok)  # more steps: allowed
    longer.train(prompts(tok), output_dir=tmp_path, resume=True, progress=False)
    assert longer.step_count == 2


def test_a_failed_step_leaves_no_half_applied_update(stand_in, tok, monkeypatch):
    model = make_model(stand_in)
    trainer = PPOTrainer(config(), model, tok)
    trainer.step(*rollouts(tok))  # the optimizer has state now
    before = trainable_copy(model)
    optimizer_before = json.dumps({k: v.tolist() for k, v in trainer.optimizer.state_dict()["state"][0].items()},
                                  default=str)
    calls = []
    real_loss = ppo_core.policy_loss

    def loss_that_breaks_on_the_third_minibatch(*args, **kwargs):
        loss, stats = real_loss(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), stats

    monkeypatch.setattr("marl_utils.ppo.trainer.policy_loss", loss_that_breaks_on_the_third_minibatch)
    with pytest.raises(FloatingPointError, match="no update of this step was kept"):
        trainer.step(*rollouts(tok))
    assert len(calls) == 3  # two minibatches were applied before the NaN, and rolled back
    for a, b in zip(before, trainable_copy(model)):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in model.trainable_parameters())
    assert json.dumps({k: v.tolist() for k, v in trainer.optimizer.state_dict()["state"][0].items()},
                      default=str) == optimizer_before
    assert trainer.step_count == 1


# ------------------------------------------------------------------------ 6. two trainers, own accumulation
def test_another_trainers_accumulation_does_not_rescale_this_ones_gradients(stand_in, tok):
    def sgd_step(build_other_first: bool):
        model = make_model(stand_in)
        sgd = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
        trainer = PPOTrainer(config(mini_batch_size=4, ppo_epochs=1), model, tok, optimizer=sgd)
        if build_other_first:  # notebook 05: a second trainer with other settings on the same process
            PPOTrainer(config(mini_batch_size=1, gradient_accumulation_steps=4, ppo_epochs=1), make_model(stand_in), tok)
        trainer.step(*rollouts(tok))
        return trainable_copy(model)

    alone, beside_another = sgd_step(False), sgd_step(True)
    for a, b in zip(alone, beside_another):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


# ------------------------------------------------------------------------ 7. trackers, torch floor
def test_eval_numbers_reach_the_trackers(stand_in, tok):
    from accelerate.tracking import GeneralTracker

    class Recorder(GeneralTracker):
        name, requires_logging_directory = "recorder", False
        logged = []

        def __init__(self):
            super().__init__()

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            pass

        def log(self, values, step=None, **kwargs):
            self.logged.append(dict(values))

    recorder = Recorder()
    trainer = PPOTrainer(config(steps=2, eval_every=1, log_with=[recorder]), make_model(stand_in), tok)
    trainer.train(prompts(tok), eval_prompts=prompts(tok)[:2], progress=False)
    assert len(recorder.logged) == 2
    assert all("eval/reward_mean" in row and "objective/kl" in row for row in recorder.logged)


def test_accelerator_check_needs_no_torch_accelerator(monkeypatch):
    monkeypatch.delattr(torch, "accelerator", raising=False)  # torch < 2.6, which the dependency range allows
    assert has_accelerator() == torch.cuda.is_available()


# ------------------------------------------------------------------------ 8. the seed's peft add_adapter
def test_a_policy_added_with_peft_add_adapter_is_adopted(stand_in, tok):
    model = make_model(stand_in)
    model.pretrained_model.add_adapter("policy_1", lora())  # the seed's "advanced usage", plain peft
    batch = {"input_ids": torch.tensor([[3, 4, 5, 6]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    scores = model.compute_reward_score(**batch, ppo_adapter_name="policy_1")
    assert scores.shape == (1,)
    assert model.active_adapter == "policy_1" and "policy_1" in model.policy_adapter_names
    assert "policy_1" in model.v_heads
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.trainable_parameters()}
    stats = PPOTrainer(config(), model, tok).step(*rollouts(tok))
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # policy_1 is fresh: it equals the reference
