"""Notebook 08's helpers (marl_utils.studies.overoptimisation): the leash config, the peak, the watched run, bad input."""

import math
import os

import pytest
import torch
from peft import LoraConfig
from stand_ins import LORA_TARGETS, make_reward_adapter, make_tiny_llama, make_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from marl_utils.infra.errors import MarlInputError
from marl_utils.model.multi_adapter_model import AutoModelForCausalLMWithValueHead
from marl_utils.studies.overoptimisation import (WatchedRun, gold_peak, leash_config, plot_against_sqrt_kl, smoothed,
                                         train_watched, weak_reward_adapter)
from marl_utils.ppo.trainer import PPOTrainer
from marl_utils.ppo.config import PPOConfig
from marl_utils.infra.profiles import PROFILES

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def test_the_leash_is_a_fixed_kl_coefficient_on_the_profiles_ppo():
    profile = PROFILES["tiny"]
    config = leash_config(profile, 0.02, steps=7, seed=3)
    assert (config.init_kl_coef, config.adap_kl_ctrl, config.steps, config.seed) == (0.02, False, 7, 3)
    assert (config.batch_size, config.mini_batch_size) == (profile.overopt_batch_size, profile.overopt_mini_batch_size)
    assert (config.learning_rate, config.ppo_epochs) == (profile.ppo_learning_rate, profile.ppo_epochs)
    with pytest.raises(MarlInputError, match="must be >= 0"):
        leash_config(profile, -0.1, steps=7)


def test_the_peak_of_a_gold_curve_that_rises_and_falls():
    steps = 30
    run = WatchedRun("made up", proxy=[0.1 * i for i in range(steps)],
                     gold=[-(i - 10) ** 2 / 50 for i in range(steps)], kl=[0.5 * i for i in range(steps)])
    peak = gold_peak(run, window=3)
    assert peak["peak step"] == 11 and peak["steps"] == steps
    assert peak["gold drop"] == pytest.approx(peak["gold peak"] - peak["gold end"]) and peak["gold drop"] > 5
    assert peak["sqrt KL peak"] == pytest.approx(math.sqrt(5.0), abs=0.05)
    assert peak["proxy end"] > peak["proxy peak"] > peak["proxy start"]
    rising = WatchedRun("rising", proxy=[0.0] * 5, gold=[float(i) for i in range(5)], kl=[1.0] * 5)
    assert gold_peak(rising, window=1)["gold drop"] == 0 and gold_peak(rising, window=1)["peak step"] == 5
    with pytest.raises(MarlInputError, match="has no steps"):
        gold_peak(WatchedRun("empty"))
    assert smoothed([0.0, 3.0, 0.0, 3.0], 3) == [1.5, 1.0, 2.0, 1.5]
    assert plot_against_sqrt_kl([run, rising], window=3).axes[1].get_xlabel().startswith("sqrt(KL")


def test_a_weak_reward_adapter_needs_pairs_and_stage_1(tmp_path):
    with pytest.raises(MarlInputError, match="use at least 2"):
        weak_reward_adapter(PROFILES["tiny"], tmp_path, 1)
    with pytest.raises(MarlInputError, match="run stage 1 first"):
        weak_reward_adapter(PROFILES["tiny"], tmp_path, 50)


def test_a_watched_run_records_proxy_gold_kl_and_rollouts_of_every_step(tmp_path):
    base = make_tiny_llama(tmp_path / "base", hidden=32)
    rm = make_reward_adapter(base, tmp_path / "rm")
    tokenizer = make_tokenizer(padding_side="left")
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS["llama"], task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(base), peft_config=lora, reward_adapter=str(rm))
    config = PPOConfig(seed=0, steps=3, batch_size=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=4,
                       min_response_tokens=1, init_kl_coef=0.0, adap_kl_ctrl=False)
    trainer = PPOTrainer(config, model=model, tokenizer=tokenizer)
    seen = []
    run = train_watched(trainer, [torch.tensor([5, 6, 7]), torch.tensor([8, 9])],
                        lambda texts: [float(len(t)) for t in texts], "test", keep=2, progress=False,
                        callback=lambda trainer, entry: seen.append(dict(entry)))
    assert len(run.proxy) == len(run.gold) == len(run.kl) == len(run.rollouts) == len(seen) == 3
    assert run.proxy == [entry["env/score_mean"] for entry in trainer.history]
    assert run.gold == [entry["env/gold_mean"] for entry in seen]  # the callback saw the gold score
    assert run.kl == [entry["objective/kl"] for entry in trainer.history] and run.kl[0] == 0.0
    assert all(len(step) == 2 for step in run.rollouts)
    query, response, gold = run.rollouts[-1][0]
    assert gold == float(len(tokenizer.decode(torch.cat([query, response]), skip_special_tokens=True)))
