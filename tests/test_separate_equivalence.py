"""One base vs separate models under the same PPOTrainer, fp32: the same PPO step for step (issue 21, item 2)."""

import os

import pytest
import torch
from peft import LoraConfig
from stand_ins import make_reward_adapter, make_tiny_llama, make_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from marl_utils.errors import MarlInputError
from marl_utils.ppo import PPOTrainer
from marl_utils.ppo_config import PPOConfig
from marl_utils.separate_layout import (build_one_base_trainer, build_separate_trainer, compare_step_by_step,
                                        merged_reward_model)

torch.set_num_threads(1)
STEPS = 5
WORDS = ["the movie was", "i loved this", "the plot was boring", "a wonderful film", "terrible acting and",
         "it was fun", "the film was", "boring dull and"]
# Tolerances. Measured here (2 cores, float32): logprobs <= 1.5e-6, reference logprobs 0, scores <= 1.5e-6,
# trained weights 3.5e-5. Not 0 because the layouts order the same sums differently: the merged classifier
# multiplies by (W + s*BA) once where the reward adapter adds W x and s*B(A x) (the scores differ by ~1 ulp
# of a score near 1), and the one base runs policy, reference and reward rows in one batched forward. The
# weights differ more than the scores because of Adam: it divides each gradient by its own RMS, so on the
# few weights whose gradient is a near-cancelling sum (here 3 of 128 elements of one LoRA A, gradients
# ~1e-6) a 1e-3 relative difference of the gradient becomes a 1e-3 * lr difference of the update. With SGD
# instead of Adam the weights agree to 3e-8. A real difference (a reference with the policy LoRA on, a
# reward read at another token, an unmerged adapter, one more update) moves these by >= 1e-2 (weights: ~lr).
LOGPROB_TOL = SCORE_TOL = 1e-5
LEARNING_RATE = 3e-2
PARAM_TOL = 1e-2 * LEARNING_RATE


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("separate_eq")
    sft = make_tiny_llama(root / "sft", hidden=32, layers=2)
    adapter = make_reward_adapter(sft, root / "rm", target_modules=["q_proj", "v_proj", "up_proj"])
    tok = make_tokenizer(padding_side="left")
    prompts = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"]) for t in WORDS]
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    config = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=LEARNING_RATE, max_new_tokens=6,
                       steps=STEPS, min_response_tokens=0, seed=7)
    return sft, adapter, tok, prompts, lora, config


def test_one_base_and_separate_models_compute_the_same_ppo(parts):
    sft, adapter, tok, prompts, lora, config = parts
    one = build_one_base_trainer(config, sft, adapter, tok, lora, seed=0)
    sep = build_separate_trainer(config, sft, adapter, tok, lora, seed=0, start_from=one)
    assert sep.ref_model is not None and sep.reward_model is not None and sep.model.reward_adapter_name is None
    rows = compare_step_by_step(one, sep, prompts, steps=STEPS)
    print("\n" + "\n".join(str(r) for r in rows))
    assert len(rows) == STEPS
    for row in rows:
        assert row["same_tokens"], row  # the same samples every step: nothing drifted enough to flip a token
        assert row["logprobs"] <= LOGPROB_TOL and row["ref_logprobs"] <= LOGPROB_TOL, row
        assert row["scores"] <= SCORE_TOL, row
        assert row["params"] <= PARAM_TOL, row
    # training moved the policy, so agreement is not the trivial one of two untouched models
    assert any(p.abs().max() > 0 for name, p in one.model.named_parameters() if "lora_B" in name and p.requires_grad)


def test_merged_reward_model_scores_what_the_adapter_scores(parts):
    sft, adapter, tok, prompts, lora, config = parts
    one = build_one_base_trainer(config, sft, adapter, tok, lora)
    sep = PPOTrainer(config, model=one.model, tokenizer=tok, reward_model=merged_reward_model(sft, adapter))
    responses = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"]) for t in WORDS[::-1]]
    a, b = one.score(prompts, responses), sep.score(prompts, responses)
    assert (a - b).abs().max() <= SCORE_TOL and a.std() > 1e-3  # the scores vary, and agree


def test_reward_model_must_be_a_one_output_classifier(parts):
    sft, adapter, tok, prompts, lora, config = parts
    one = build_one_base_trainer(config, sft, adapter, tok, lora)
    reward = merged_reward_model(sft, adapter)
    reward.config.num_labels = 2
    with pytest.raises(MarlInputError, match="num_labels=1"):
        PPOTrainer(config, model=one.model, tokenizer=tok, reward_model=reward)
    reward.config.num_labels, reward.config.pad_token_id = 1, None
    with pytest.raises(MarlInputError, match="pad_token_id"):
        PPOTrainer(config, model=one.model, tokenizer=tok, reward_model=reward)
