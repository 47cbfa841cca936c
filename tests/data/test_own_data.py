"""Your own data and your own base (issue 12, item 9): budgets that scale with the data, `--base-model`, and a
run that learned nothing saying so, at the end of the stage and in summary.json. All at toy sizes."""

import json
import random
from pathlib import Path

import pandas as pd
import pytest
from stand_ins import make_tiny_gpt2, make_tokenizer

from marl_utils.cli import main
from marl_utils.data.loading import load_imdb
from marl_utils.stages.ppo import ppo_learning_note
from marl_utils.infra.profiles import PROFILES
from marl_utils.stages.reward import reward_epochs, reward_learning_note
from marl_utils.stages.sft import count_tokens, sft_epochs, sft_learning_note

from small_profiles import SMALL, TOY

SHORT_REVIEWS = Path(__file__).resolve().parents[2] / "data" / "short_reviews.csv"


# ---------------------------------------------------------------------------------------------- the file itself
def test_short_reviews_file_is_balanced_varied_and_loads():
    df = pd.read_csv(SHORT_REVIEWS, keep_default_na=False)
    assert list(df.columns) == ["text", "label"] and len(df) == 1000
    assert df["label"].value_counts().to_dict() == {0: 500, 1: 500}
    assert df["text"].is_unique
    words = {w for t in df["text"] for w in t.lower().replace(",", " ").replace(".", " ").split()}
    assert len(words) > 1000, "varied vocabulary, not a template"
    ds = load_imdb(SHORT_REVIEWS)
    assert len(ds["train"]) == 800 and len(ds["test"]) == 200


# ---------------------------------------------------------------------------------------------- budgets
def test_budgets_give_a_small_file_more_epochs_than_the_shipped_corpus():
    tiny = PROFILES["tiny"]
    tokenizer = make_tokenizer()  # a word-level tokenizer: counts words and punctuation, like ~1 BPE token each
    corpus_tokens = count_tokens(tokenizer, load_imdb()["train"]["text"], tiny.sft_max_length)
    short_tokens = count_tokens(tokenizer, load_imdb(SHORT_REVIEWS)["train"]["text"], tiny.sft_max_length)
    assert corpus_tokens > tiny.sft_token_budget > 10 * short_tokens
    assert sft_epochs(tiny, corpus_tokens) == 1.0, "the shipped corpus keeps its single epoch"
    assert sft_epochs(tiny, short_tokens) == tiny.sft_max_epochs > 1.0
    assert sft_epochs(tiny, 50_000) == tiny.sft_token_budget / 50_000 == 5.0
    # reward: the corpus gives 2,000 + 2,000 pairs, the 800-row file 400 + 400
    assert reward_epochs(tiny, 4000) == 1.0 and reward_epochs(tiny, 800) == pytest.approx(5.0)
    assert reward_epochs(tiny, 100) == tiny.reward_max_epochs
    assert sft_epochs(tiny.replace(sft_token_budget=None), short_tokens) == tiny.sft_epochs


def test_the_trainers_run_the_budgeted_epochs(tmp_path):
    """End to end: the epochs computed from the budget are the epochs SFTTrainer and RewardTrainer ran."""
    from marl_utils.stages.reward import train_reward_adapter
    from marl_utils.stages.sft import train_sft

    profile = SMALL.replace(sft_max_steps=-1, sft_max_train_examples=64, sft_token_budget=1500, sft_max_epochs=20,
                            reward_max_steps=-1, reward_train_pairs=16, reward_pair_budget=96, reward_max_epochs=10)
    sft = train_sft(profile, tmp_path / "run", str(SHORT_REVIEWS), progress=False)
    m = sft.metrics
    assert m["train_examples"] == 64 and 1 < m["epochs"] < 20
    assert m["epochs"] == pytest.approx(1500 / m["train_tokens"], rel=0.1)
    reward = train_reward_adapter(profile, tmp_path / "run", str(SHORT_REVIEWS), progress=False)
    assert reward.metrics["train_pairs"] == 32 and reward.metrics["epochs"] == pytest.approx(3.0)


# ---------------------------------------------------------------------------------------------- --base-model
@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory):
    return make_tiny_gpt2(tmp_path_factory.mktemp("base") / "gpt2")


@pytest.fixture(scope="module")
def toy_gpt2_run(gpt2_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt2_run") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PROFILES, "tiny", TOY)
        assert main(["run", "--profile", "tiny", "--base-model", str(gpt2_base), "--output-dir", str(out)]) == 0
    return out


def test_base_model_flag_runs_the_whole_pipeline_from_that_base(gpt2_base, toy_gpt2_run, monkeypatch, capsys):
    monkeypatch.setitem(PROFILES, "tiny", TOY)
    out = toy_gpt2_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base_model"] == str(gpt2_base.resolve())
    assert not (out / "base").exists(), "no tiny base is built when --base-model is given"
    assert json.loads((out / "sft" / "config.json").read_text())["model_type"] == "gpt2"
    adapter = json.loads((out / "reward_adapter" / "adapter_config.json").read_text())
    assert any(m.endswith("c_attn") for m in adapter["target_modules"])
    assert (out / "ppo" / "metrics.json").exists()
    # the same folder with another base is refused: its stages were trained from this one
    capsys.readouterr()
    assert main(["sft", "--profile", "tiny", "--output-dir", str(out)]) == 2
    assert "holds stages trained from base model" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["sft", "reward", "ppo", "grpo", "run"])
def test_every_stage_command_takes_base_model(command, gpt2_base, tmp_path, monkeypatch):
    seen = {}

    def record(profile, *args, **kwargs):
        seen["base_model"] = profile.base_model

    import marl_utils.stages.grpo as grpo
    import marl_utils.stages.pipeline as pipeline
    import marl_utils.stages.ppo as ppo_stage
    import marl_utils.stages.reward as reward
    import marl_utils.stages.sft as sft

    monkeypatch.setattr(grpo, "train_grpo", record)
    monkeypatch.setattr(sft, "train_sft", record)
    monkeypatch.setattr(reward, "train_reward_adapter", record)
    monkeypatch.setattr(ppo_stage, "run_ppo_stage", record)
    monkeypatch.setattr(pipeline, "run_pipeline", record)
    assert main([command, "--profile", "tiny", "--base-model", str(gpt2_base), "--output-dir", str(tmp_path)]) == 0
    assert seen["base_model"] == str(gpt2_base.resolve())


# ---------------------------------------------------------------------------------------------- learned nothing
def test_random_labels_give_chance_accuracy_and_a_note(tmp_path, capsys):
    """Real review texts with coin-flip labels: nothing to learn, so stage 2 must say so when it ends."""
    from marl_utils.stages.reward import train_reward_adapter

    rows = load_imdb()["train"].select(range(4000)).to_pandas()  # 800 test rows: 400 held-out pairs
    rows["label"] = [random.Random(i).randint(0, 1) for i in range(len(rows))]
    rows.to_csv(tmp_path / "random.csv", index=False)
    profile = SMALL.replace(reward_eval_pairs=400, reward_train_pairs=200, reward_max_steps=30)
    reward = train_reward_adapter(profile, tmp_path / "out", str(tmp_path / "random.csv"), progress=False)
    m = reward.metrics
    assert abs(m["eval_accuracy"] - 0.5) < 0.05 and m["eval_pairs"] == 400
    assert m["learning_note"].startswith("the reward adapter learned almost nothing")
    assert f"NOTE: {m['learning_note']}" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "reward_adapter" / "metrics.json").read_text())
    assert saved["learning_note"] == m["learning_note"]


def test_summary_lists_the_notes_of_the_stages(toy_gpt2_run):
    """`marl run` collects every stage's note into summary.json; 2 PPO steps at toy sizes cannot gain 0.5."""
    out = toy_gpt2_run
    stage_notes = [json.loads((out / stage / "metrics.json").read_text()).get("learning_note")
                   for stage in ("sft", "reward_adapter", "ppo")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["notes"] == [n for n in stage_notes if n] and summary["learned"] is False
    assert stage_notes[2].startswith("PPO learned almost nothing")


def test_notes_name_the_likely_cause_and_the_fix():
    tiny = PROFILES["tiny"]
    base = {"eval_perplexity_before": 1900.0, "train_tokens": 12000, "epochs": 8.0}
    assert sft_learning_note(tiny, {**base, "eval_perplexity": 3.0}) is None
    note = sft_learning_note(tiny, {**base, "eval_perplexity": 1200.0})
    assert "0.63x" in note and "from scratch" in note and "--base-model" in note

    rows = {"train_pairs": 800, "epochs": 5.0}
    assert reward_learning_note(tiny, {**rows, "eval_accuracy": 0.9, "log_history": []}) is None
    memorised = reward_learning_note(tiny, {**rows, "eval_accuracy": 0.51, "log_history": [{"accuracy": 0.97}]})
    assert "check the labels" in memorised and "by heart" in memorised
    unfitted = reward_learning_note(tiny, {**rows, "eval_accuracy": 0.52, "log_history": [{"accuracy": 0.55}]})
    assert "too little training" in unfitted and "reward_pair_budget" in unfitted

    ppo = {"eval_reward_before": 0.11, "eval_reward_after": 0.32, "steps": 50}
    assert ppo_learning_note(tiny, {**ppo, "eval_reward_after": 2.2}, {"eval_accuracy": 0.98}) is None
    weak_judge = ppo_learning_note(tiny, ppo, {"eval_accuracy": 0.59})
    assert "+0.21" in weak_judge and "0.59" in weak_judge and "stage 2" in weak_judge
    assert "--steps" in ppo_learning_note(tiny, ppo, {"eval_accuracy": 0.99})
