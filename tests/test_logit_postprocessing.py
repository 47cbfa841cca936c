"""PPO's logprobs are those of the model's own forward (what `generate` samples from), also for families that
post-process their logits: Gemma-2's `final_logit_softcapping`, Granite's `logits_scaling`, Cohere's
`logit_scale`, at the values released checkpoints use, with logits large enough that skipping them shows."""

import os

import pytest
import torch
from peft import LoraConfig
from stand_ins import _save, make_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from marl_utils.modeling import AutoModelForCausalLMWithValueHead
from marl_utils.ppo import PPOTrainer
from marl_utils.ppo_config import PPOConfig
from marl_utils.ppo_core import build_rollout_batch

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128)
# family -> (config class, its logit post-processing at a released checkpoint's value)
FAMILIES = {
    "gemma2": ("Gemma2Config", dict(final_logit_softcapping=30.0, head_dim=8, query_pre_attn_scalar=8,
                                    sliding_window=16, tie_word_embeddings=False)),
    "granite": ("GraniteConfig", dict(logits_scaling=8.0)),  # granite-3.0-2b-base
    "cohere": ("CohereConfig", dict(logit_scale=0.0625)),    # c4ai-command-r
}
LOGIT_SCALE_UP = 400.0  # random init gives logits ~0.1: scale lm_head up so that softcap/scaling really matter


def make_family_base(family, out_dir):
    import transformers

    tok = make_tokenizer()
    config_class, special = FAMILIES[family]
    config = getattr(transformers, config_class)(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                                 eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                                                 **SIZES, **special)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(LOGIT_SCALE_UP)
    return _save(model, tok, out_dir)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("logits")
    return {family: str(make_family_base(family, root / family)) for family in FAMILIES}


def queries_and_responses(tok):
    ids = lambda t: torch.tensor(tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    queries = [ids(t) for t in ["the movie", "i loved this", "bad", "a wonderful film with great"]]
    responses = [ids(t) for t in ["was great", "movie a lot it was fun", "plot", "music"]]
    responses[2] = torch.cat([responses[2], torch.tensor([tok.eos_token_id])])
    return queries, responses


def own_forward_logprobs(model, batch):
    """[B,R] logprobs of the response tokens from the causal LM's own forward (policy adapter active)."""
    width = batch["response_width"]
    with torch.no_grad():
        logits = model.pretrained_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        position_ids=batch["position_ids"], use_cache=False).logits.float()
    log_probs = torch.log_softmax(logits[:, -width - 1:-1], -1)
    return log_probs.gather(-1, batch["input_ids"][:, -width:].unsqueeze(-1)).squeeze(-1)


def test_the_stand_ins_logits_are_large_enough_to_show_the_post_processing(bases):
    """Without its post-processing each family's logprobs differ by nats: the checks below have teeth."""
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    queries, responses = queries_and_responses(tok)
    batch = build_rollout_batch(queries, responses, tok.pad_token_id)
    for family, base in bases.items():
        model = AutoModelForCausalLM.from_pretrained(base).eval()
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"], output_hidden_states=True)
            raw = model.get_output_embeddings()(out.hidden_states[-1])
        gap = (torch.log_softmax(raw, -1) - torch.log_softmax(out.logits, -1)).abs().max().item()
        assert gap > 1.0, (family, gap)


@pytest.mark.parametrize("critic", ["head", "adapter"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_rollout_logprobs_are_the_models_own_and_step_0_kl_is_zero(bases, family, critic):
    tok = make_tokenizer()
    queries, responses = queries_and_responses(tok)
    batch = build_rollout_batch(queries, responses, tok.pad_token_id)
    mask = batch["response_mask"][:, -batch["response_width"]:].bool()
    for fused in (True, False):
        torch.manual_seed(0)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        model = AutoModelForCausalLMWithValueHead.from_pretrained(bases[family], peft_config=lora, critic=critic)
        trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1, learning_rate=1e-3,
                                       fused_rollout=fused), model, tok)
        rollout = trainer.rollout_forward(batch)
        own = own_forward_logprobs(model, batch)
        torch.testing.assert_close(rollout.logprobs[mask], own[mask], atol=1e-5, rtol=1e-5,
                                   msg=f"{family} critic={critic} fused={fused}")
        stats = trainer.step(queries, responses, torch.tensor([1.0, -1.0, 0.5, 0.0]))
        assert stats["objective/kl"] == 0.0, (family, critic, fused, stats["objective/kl"])
        assert abs(stats["ppo/policy/approxkl_first"]) < 1e-6, (family, critic, fused, stats)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rollout_logprobs_are_those_generate_sampled_from(bases, family):
    """generate's own logits (KV cache, one token at a time) against the fused rollout forward over the whole row.

    (critic="adapter" runs the same rollout code; its training forward is pinned by approxkl_first above.)"""
    tok = make_tokenizer()
    queries, _ = queries_and_responses(tok)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(bases[family], peft_config=lora)
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=4), model, tok)
    assert trainer.fuse_rollout
    for query in queries:
        with torch.no_grad():
            out = model.generate(input_ids=query[None], attention_mask=torch.ones(1, len(query), dtype=torch.long),
                                 do_sample=True, top_k=0, top_p=1.0, max_new_tokens=6, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        response = out.sequences[0, len(query):]
        sampled_from = torch.stack([torch.log_softmax(step[0].float(), -1)[token]
                                    for step, token in zip(out.logits, response)])
        rollout = trainer.rollout_forward(build_rollout_batch([query], [response], tok.pad_token_id))
        torch.testing.assert_close(rollout.logprobs[0][rollout.mask[0].bool()], sampled_from[:len(response)],
                                   atol=1e-4, rtol=0, msg=family)
