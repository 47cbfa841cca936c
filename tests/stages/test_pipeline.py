"""`marl run` end to end at toy sizes: the run folder layout, summary.json, plots, reuse, determinism."""

import json

import pytest

from marl_utils.cli import main
from marl_utils.infra.profiles import PROFILES

from small_profiles import SMALL, TOY


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    import pytest as _pytest

    out = tmp_path_factory.mktemp("marl-run")
    with _pytest.MonkeyPatch.context() as mp:
        mp.setitem(PROFILES, "tiny", TOY)
        assert main(["run", "--profile", "tiny", "--output-dir", str(out)]) == 0
    return out


def test_run_writes_every_stage_plots_and_summary(toy_run):
    for stage in ["sft", "reward_adapter", "ppo"]:
        assert (toy_run / stage).is_dir()
    for png in ["sft_loss.png", "reward_loss.png", "ppo.png"]:
        assert (toy_run / "plots" / png).stat().st_size > 1000
    summary = json.loads((toy_run / "summary.json").read_text())
    assert summary["profile"] == "tiny"
    assert set(summary["stages"]["sft"]) >= {"seconds", "eval_perplexity"}
    assert set(summary["stages"]["reward"]) >= {"seconds", "eval_accuracy", "untrained_accuracy"}
    ppo = summary["stages"]["ppo"]
    assert set(ppo) >= {"seconds", "steps", "max_new_tokens", "eval_reward_before", "eval_reward_after", "kl_final",
                        "response_tokens_mean"}
    assert ppo["steps"] == 2 and ppo["max_new_tokens"] == 6
    assert 0 < ppo["response_tokens_mean"] <= 6


def test_saved_policy_reloads_with_the_reward_adapter(toy_run):
    import torch

    from marl_utils import AutoModelForCausalLMWithValueHead

    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(toy_run / "ppo"),
                                                              reward_adapter=str(toy_run / "reward_adapter"))
    ids = torch.tensor([[5, 6, 7, 8]])
    assert model.compute_reward_score(ids).shape == (1,)
    assert model(ids)[2].shape == (1, 4)


def test_second_run_reuses_finished_stages(toy_run, monkeypatch):
    stamp = (toy_run / "ppo" / "metrics.json").stat().st_mtime_ns
    monkeypatch.setitem(PROFILES, "tiny", TOY)
    assert main(["run", "--profile", "tiny", "--output-dir", str(toy_run)]) == 0
    assert (toy_run / "ppo" / "metrics.json").stat().st_mtime_ns == stamp


def test_same_seed_same_summary(toy_run, tmp_path, monkeypatch):
    monkeypatch.setitem(PROFILES, "tiny", TOY)
    assert main(["run", "--profile", "tiny", "--output-dir", str(tmp_path / "again")]) == 0

    def strip_times(summary):
        return {stage: {k: v for k, v in values.items() if k != "seconds"}
                for stage, values in summary["stages"].items()}

    first = json.loads((toy_run / "summary.json").read_text())
    second = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert strip_times(first) == strip_times(second)
