"""The architecture matrix: every causal-LM family a user is likely to bring gives a correct PPO step.

One tiny random model per family (tests/support/architectures.py: distinctive features at their released values,
logits scaled so that skipping a softcap or a logit scale shows), each with a stage-2-style reward adapter,
LoRA on every linear layer (attention only for the MoE), float32. For each family:

- the reward adapter scores like plain transformers + peft load it (the sequence classifier + adapter), and
  like stage 2's own classifier (which it makes for families transformers has none for: Granite, Cohere);
- with `critic="head"` and `critic="adapter"`, fused and separate rollout, a fresh policy's first PPO step
  has `objective/kl == 0` exactly and `approxkl_first < 1e-6` (rollout, reference and training forwards
  compute one function);
- with trained-looking adapters (random LoRA B everywhere), the fused rollout gives the separate passes'
  logprobs, reference logprobs, values, entropy and scores (<= 1e-5), and both give the logprobs (and the
  entropy) of the logits `generate` sampled from.

The whole file takes about 75 s of one CPU core (22 families).
"""

import os
import types
import warnings

import pytest
import torch
from architectures import (FAMILIES, VOCAB, build_family, build_reward_adapter, lora_config, plain_reward_model,
                           randomize_lora, tokenizer_for)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from marl_utils.model.multi_adapter_model import AutoModelForCausalLMWithValueHead
from marl_utils.ppo.trainer import PPOTrainer
from marl_utils.ppo.config import PPOConfig
from marl_utils.ppo.maths import build_rollout_batch, left_pad
from marl_utils.stages.reward import load_reward_model

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

CRITICS = ["head", "adapter"]
ROLLOUTS = {"fused": True, "separate": False}
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", params=FAMILIES, ids=[family.name for family in FAMILIES])
def family(request, tmp_path_factory):
    """A family's tiny base and reward adapter on disk (built once per family for all its tests)."""
    spec = request.param
    root = tmp_path_factory.mktemp(spec.name)
    base = build_family(spec, root / "base")
    adapter = build_reward_adapter(spec, base, root / "reward_adapter")
    return types.SimpleNamespace(spec=spec, base=str(base), adapter=str(adapter), tok=tokenizer_for(spec))


def load(family, critic: str):
    torch.manual_seed(0)
    return AutoModelForCausalLMWithValueHead.from_pretrained(family.base, peft_config=lora_config(family.spec),
                                                             reward_adapter=family.adapter, critic=critic)


def trainer_for(model, family, fused: bool) -> PPOTrainer:
    config = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=4, fused_rollout=fused)
    return PPOTrainer(config, model, family.tok)


def rollouts(family):
    """Four prompts and responses of different lengths (left padding), one response ending with EOS."""
    generator = torch.Generator().manual_seed(0)
    queries = [torch.randint(3, VOCAB, (n,), generator=generator) for n in (3, 5, 2, 4)]
    responses = [torch.randint(3, VOCAB, (n,), generator=generator) for n in (4, 2, 3, 4)]
    responses[1] = torch.cat([responses[1], torch.tensor([family.tok.eos_token_id])])
    return queries, responses


def trained_looking(model, seed: int = 1):
    """Every adapter and head differs from its neighbours, so a row routed to the wrong one shows."""
    randomize_lora(model.pretrained_model, model.active_adapter, seed)
    if model.critic_adapter:
        randomize_lora(model.pretrained_model, model.critic_adapter, seed + 1)
    with torch.no_grad():
        model.v_head.linear.weight.copy_(torch.randn(model.v_head.linear.weight.shape,
                                                     generator=torch.Generator().manual_seed(seed + 2)))
    return model


def test_reward_adapter_scores_like_the_plain_classifier(family):
    """compute_reward_score == the stage-2 classifier as plain transformers + peft load it (right-padded rows
    ending with EOS, as TRL's RewardTrainer feeds them; with pad == EOS the score is read before the EOS)."""
    tok = family.tok
    rows = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 3, 7)]
    rows = [torch.cat([row, torch.tensor([tok.eos_token_id])]) for row in rows]
    width = max(map(len, rows))
    input_ids = torch.stack([torch.cat([r, torch.full((width - len(r),), tok.pad_token_id)]) for r in rows])
    attention_mask = torch.stack([(torch.arange(width) < len(r)).long() for r in rows])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = plain_reward_model(family.spec, family.base, family.adapter)(
            input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1)
    ours = load(family, "head").compute_reward_score(input_ids=input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(ours, expected, **TOL)
    # stage 2's own classifier (also for families transformers has none for) is that reward model too
    stage2 = load_reward_model(family.base, family.tok, family.adapter).eval()
    torch.testing.assert_close(stage2(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1),
                               expected, **TOL)


@pytest.mark.parametrize("rollout", ROLLOUTS)
@pytest.mark.parametrize("critic", CRITICS)
def test_first_step_of_a_fresh_policy_has_zero_kl(family, critic, rollout, request):
    model = load(family, critic)
    trainer = trainer_for(model, family, ROLLOUTS[rollout])
    queries, responses = rollouts(family)
    stats = trainer.step(queries, responses, trainer.score(queries, responses))
    assert stats["objective/kl"] == 0.0  # policy == reference, fp32: exactly
    assert abs(stats["ppo/policy/approxkl_first"]) < 1e-6  # the training forward is the rollout's function


@pytest.mark.parametrize("critic", CRITICS)
def test_fused_rollout_equals_the_separate_passes(family, critic, request):
    model = trained_looking(load(family, critic))
    trainer = trainer_for(model, family, None)
    batch = build_rollout_batch(*rollouts(family), family.tok.pad_token_id)
    out = {}
    for fused in (True, False):
        trainer.fuse_rollout = fused
        out[fused] = trainer.rollout_forward(batch, with_reward=True)
    fused, separate = out[True], out[False]
    mask = fused.mask.bool()
    for name in ("logprobs", "ref_logprobs", "values", "entropy"):
        torch.testing.assert_close(getattr(fused, name)[mask], getattr(separate, name)[mask], **TOL, msg=name)
    torch.testing.assert_close(fused.scores, separate.scores, **TOL)
    assert (fused.logprobs - fused.ref_logprobs)[mask].abs().max() > 1e-2  # policy and reference really differ
    assert (fused.scores - fused.scores[0]).abs().max() > 1e-2  # the scores depend on the rows


def sampled_with_logprobs(model, family, queries):
    """Sampled responses of the policy, and the logprob of each response token and the entropy at each step
    under the logits generate sampled from."""
    tok = family.tok
    input_ids, attention_mask = left_pad(queries, tok.pad_token_id)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=True,
                             top_k=0, top_p=1.0, output_logits=True, return_dict_in_generate=True,
                             min_new_tokens=4, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    responses = out.sequences[:, input_ids.shape[1]:]
    # [B,4,V]: the model's logits before any processor (min_new_tokens only keeps every response 4 tokens long)
    log_probs = torch.stack(out.logits, 1).float().log_softmax(-1)
    return list(responses), types.SimpleNamespace(
        logprobs=log_probs.gather(-1, responses.unsqueeze(-1)).squeeze(-1),
        entropy=-(log_probs.exp() * log_probs).sum(-1))


@pytest.mark.parametrize("critic", CRITICS)
def test_rollout_logprobs_are_those_generate_sampled_from(family, critic, request):
    """Whatever the causal LM does between its last hidden state and its logits (softcap, logit scale),
    PPO's old logprobs are the logprobs of the distribution `generate` sampled from, in both rollout paths."""
    model = trained_looking(load(family, critic)).eval()
    trainer = trainer_for(model, family, None)
    queries, _ = rollouts(family)
    responses, expected = sampled_with_logprobs(model, family, queries)
    batch = build_rollout_batch(queries, responses, family.tok.pad_token_id)
    for fused in (True, False):
        trainer.fuse_rollout = fused
        got = trainer.rollout_forward(batch)
        path = "fused" if fused else "separate"
        # the sampled tokens' logprobs, and the entropy, which sees the whole distribution (a softcap changes
        # the tail more than the sampled, likely tokens)
        torch.testing.assert_close(got.logprobs, expected.logprobs, atol=1e-4, rtol=1e-5,
                                   msg=lambda m: f"{path} rollout, logprobs: {m}")
        torch.testing.assert_close(got.entropy, expected.entropy, atol=1e-4, rtol=1e-5,
                                   msg=lambda m: f"{path} rollout, entropy: {m}")
    if family.spec.logit_post_processing:  # the check has teeth: lm_head alone would give other logprobs
        causal_lm = model.pretrained_model.get_base_model()
        with torch.no_grad():
            out = causal_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            position_ids=batch["position_ids"], output_hidden_states=True)
            raw = causal_lm.get_output_embeddings()(out.hidden_states[-1])
        assert (raw.log_softmax(-1) - out.logits.log_softmax(-1)).abs().max() > 1.0


def test_stage2_refuses_a_family_it_cannot_make_a_classifier_for():
    """CodeGen has no *ForSequenceClassification and keeps its body as `transformer`: refused, by name."""
    from transformers import CodeGenConfig

    from marl_utils.infra.errors import MarlInputError
    from marl_utils.model.sequence_classifier import sequence_classifier_class

    with pytest.raises(MarlInputError, match="'codegen' has no sequence classifier in transformers"):
        sequence_classifier_class(CodeGenConfig())


def test_a_family_without_a_causal_lm_is_refused_by_name_before_loading(tmp_path):
    """An encoder-decoder (T5) has no AutoModelForCausalLM class: a clear error naming it, from its config alone."""
    from transformers import T5Config

    from marl_utils.infra.errors import MarlInputError

    T5Config(d_model=32, num_layers=1, num_heads=2, d_kv=8, d_ff=32, vocab_size=VOCAB).save_pretrained(tmp_path)
    with pytest.raises(MarlInputError, match="is a 't5' model, which transformers has no causal LM class for"):
        AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path), peft_config=lora_config(FAMILIES[0]))
