"""Stages 1 and 2 as real (very small) training runs, their artifacts, and their bad-input errors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from marl_utils.cli import main
from marl_utils.infra.errors import MarlInputError
from marl_utils.infra.profiles import PROFILES
from marl_utils.stages.reward import check_sft_dir, load_reward_model, score_texts, train_reward_adapter
from marl_utils.stages.sft import train_sft

from small_profiles import SMALL


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    sft = train_sft(SMALL, out, progress=False)
    reward = train_reward_adapter(SMALL, out, progress=False)
    return out, sft, reward


def test_sft_writes_a_loadable_model_and_learns(small_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, sft, _ = small_run
    assert sft.model_dir == out / "sft"
    model = AutoModelForCausalLM.from_pretrained(out / "sft")
    tokenizer = AutoTokenizer.from_pretrained(out / "sft")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.vocab_size >= len(tokenizer)
    m = json.loads((out / "sft" / "metrics.json").read_text())
    assert m["eval_perplexity"] < 0.8 * m["eval_perplexity_before"], "12 SFT steps must already cut perplexity"
    assert len(m["samples_after"]) == 4 and all(isinstance(s, str) for s in m["samples_after"])
    assert (out / "base" / "tokenizer.json").exists(), "the tiny base is saved with save_pretrained"


def test_finished_stage_is_reused_not_retrained(small_run):
    out, sft, _ = small_run
    before = (out / "sft" / "model.safetensors").stat().st_mtime_ns
    again = train_sft(SMALL, out, progress=False)
    assert (out / "sft" / "model.safetensors").stat().st_mtime_ns == before
    assert again.metrics["eval_perplexity"] == sft.metrics["eval_perplexity"]


def test_reward_adapter_folder_is_plain_peft_with_score_head(small_run):
    out, _, reward = small_run
    folder = out / "reward_adapter"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert config["base_model_name_or_path"] == str((out / "sft").resolve())
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert "base_model.model.score.weight" in keys
    assert any("lora_A" in k for k in keys)


def test_plain_peft_reproduces_the_trained_scores(small_run):
    from transformers import AutoTokenizer

    out, _, reward = small_run
    tokenizer = AutoTokenizer.from_pretrained(out / "sft")
    model = load_reward_model(str(out / "sft"), tokenizer, out / "reward_adapter")
    scores = score_texts(model, tokenizer, reward.metrics["check_texts"], max_length=SMALL.reward_max_length)
    torch.testing.assert_close(scores, torch.tensor(reward.metrics["check_scores"]), atol=1e-5, rtol=0)
    untrained = load_reward_model(str(out / "sft"), tokenizer)
    assert not torch.allclose(score_texts(untrained, tokenizer, reward.metrics["check_texts"]), scores)


def test_reward_metrics_have_baseline(small_run):
    m = small_run[2].metrics
    for key in ["eval_accuracy", "eval_prefix_accuracy", "untrained_accuracy", "untrained_prefix_accuracy"]:
        assert 0.0 <= m[key] <= 1.0
    assert m["eval_prefix_tokens"] == 24


def test_missing_or_bogus_sft_folder(tmp_path):
    with pytest.raises(MarlInputError, match=r"does not exist; run stage 1 first"):
        check_sft_dir(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(MarlInputError, match=r"is not a saved model"):
        check_sft_dir(tmp_path / "junk")
    with pytest.raises(MarlInputError, match=r"is not a saved model"):
        train_reward_adapter(SMALL, tmp_path / "run", sft_dir=tmp_path / "junk", progress=False)
    assert not (tmp_path / "run" / "reward_adapter").exists()


def test_one_label_dataset_is_rejected_before_training(tmp_path):
    csv = tmp_path / "pos.csv"
    csv.write_text("text,label\n" + "".join(f"a fine film number {i},1\n" for i in range(20)))
    with pytest.raises(MarlInputError, match="label"):
        train_reward_adapter(SMALL, tmp_path / "run", dataset=str(csv), progress=False)
    assert not (tmp_path / "run" / "sft").exists() and not (tmp_path / "run" / "reward_adapter").exists()


def _review_csv(path, n=60):
    from marl_utils.data.corpus import generate_corpus

    rows = generate_corpus(n_train=n, n_test=2)["train"]
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_cli_sft_trains_on_a_users_csv(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(PROFILES, "tiny", SMALL)
    csv = _review_csv(tmp_path / "mine.csv")
    assert main(["sft", "--profile", "tiny", "--dataset", str(csv), "--output-dir", str(tmp_path / "out")]) == 0
    m = json.loads((tmp_path / "out" / "sft" / "metrics.json").read_text())
    assert m["train_examples"] == 48, "a single file is split 80/20 into train and test"


@pytest.mark.parametrize("argv, message", [
    (["sft", "--profile", "tiny", "--dataset", "/no/such/file.csv"], "does not exist"),
    (["reward", "--profile", "tiny", "--dataset", "NOCOLS"], "column"),
])
def test_cli_bad_dataset_one_line_error_before_training(tmp_path, capsys, argv, message):
    if "NOCOLS" in argv:
        bad = tmp_path / "bad.csv"
        bad.write_text("review,stars\ngreat,5\nawful,1\n")
        argv = [str(bad) if a == "NOCOLS" else a for a in argv]
    assert main(argv + ["--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not (tmp_path / "out" / "sft").exists()


def test_gpt2_style_base_goes_through_the_hub_loading_path(tmp_path):
    """The gpt2-imdb profile loads `gpt2` by name; a GPT-2 saved to a folder takes the same code path."""
    from stand_ins import make_tiny_gpt2
    from transformers import AutoTokenizer

    base = make_tiny_gpt2(tmp_path / "gpt2")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = None  # like the real gpt2 tokenizer
    tokenizer.save_pretrained(base)
    profile = PROFILES["gpt2-imdb"].replace(
        base_model=str(base), dataset="offline", **{k: getattr(SMALL, k) for k in [
            "sft_max_steps", "sft_batch_size", "sft_max_train_examples", "sft_eval_examples", "sft_max_length",
            "reward_max_steps", "reward_batch_size", "reward_train_pairs", "reward_eval_pairs",
            "reward_max_length"]})
    sft = train_sft(profile, tmp_path / "run", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(sft.model_dir)
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    reward = train_reward_adapter(profile, tmp_path / "run", progress=False)
    config = json.loads((reward.adapter_dir / "adapter_config.json").read_text())
    assert any(m.endswith("c_attn") for m in config["target_modules"]), "GPT-2 fused attention gets LoRA"


# ---------------------------------------------------------------------------------------------- stages in steps
def test_sft_in_steps_equals_train_sft(small_run, tmp_path):
    """What notebook 01 does cell by cell gives the numbers of the one-call `train_sft`."""
    from trl import SFTTrainer

    from marl_utils.stages.sft import finish_sft, one_progress_bar, prepare_sft, sft_config

    inputs = prepare_sft(SMALL, tmp_path / "run")
    assert inputs.train_dataset.column_names == ["text"] and len(inputs.eval_texts) == SMALL.sft_eval_examples
    trainer = SFTTrainer(model=inputs.model, args=sft_config(SMALL, inputs.work_dir, epochs=inputs.epochs),
                         train_dataset=inputs.train_dataset, processing_class=inputs.tokenizer)
    one_progress_bar(trainer, enabled=False)
    trainer.train()
    result = finish_sft(inputs, trainer)
    one_call = small_run[1].metrics
    for key in ["eval_perplexity", "eval_perplexity_before", "samples_after", "train_tokens", "epochs"]:
        assert result.metrics[key] == one_call[key], key
    assert not Path(inputs.work_dir).exists()


def test_reward_in_steps_equals_train_reward_adapter(small_run, tmp_path):
    """What notebook 02 does cell by cell gives the numbers of the one-call `train_reward_adapter`."""
    from trl import RewardTrainer

    from marl_utils.stages.reward import finish_reward, prepare_reward, reward_config, reward_lora_config
    from marl_utils.stages.sft import one_progress_bar, quiet_trainer_setup

    out, _, reward = small_run
    inputs = prepare_reward(SMALL, tmp_path / "run", sft_dir=out / "sft")
    with quiet_trainer_setup():
        trainer = RewardTrainer(model=inputs.model, args=reward_config(SMALL, inputs.work_dir, epochs=inputs.epochs),
                                train_dataset=inputs.train_dataset, processing_class=inputs.tokenizer,
                                peft_config=reward_lora_config(SMALL, inputs.model))
    one_progress_bar(trainer, enabled=False)
    trainer.train()
    result = finish_reward(inputs, trainer)
    for key in ["eval_accuracy", "eval_prefix_accuracy", "untrained_accuracy", "check_scores", "epochs"]:
        assert result.metrics[key] == reward.metrics[key], key


def test_stage_logs_are_one_bar_and_a_summary_without_library_warnings(tmp_path, capsys):
    """No loss dicts on screen (the rows stay in log_history), no FutureWarnings the learner did not cause."""
    import warnings

    from marl_utils.infra.known_warnings import silence_known_library_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_library_warnings()  # what `import marl_utils` installs, the one place for such filters
        sft = train_sft(SMALL, tmp_path / "run")
        reward = train_reward_adapter(SMALL, tmp_path / "run")
    printed = capsys.readouterr()
    assert "{'loss'" not in printed.out + printed.err and "'grad_norm'" not in printed.out + printed.err
    assert "SFT: 100%" in printed.err and "reward adapter: 100%" in printed.err
    for other_bar in ["Loading weights", "Writing model shards", "Tokenizing train dataset", "Adding EOS"]:
        assert other_bar not in printed.err, other_bar
    assert len(sft.log_history) >= 1 and all("loss" in row for row in sft.log_history)
    assert reward.metrics["eval_accuracy"] >= 0.0
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "checkpointing" in m or "fan_in_fan_out" in m], messages


def test_untrained_passes_run_on_the_training_device(monkeypatch, tmp_path, small_run):
    """The measurements before training (thousands of forwards on gpt2-imdb) must not run on the CPU when the
    Trainer would use a GPU: the model moves first. `meta` stands in for the GPU here."""
    import marl_utils.stages.reward as reward_mod
    import marl_utils.stages.sft as sft_mod

    meta = torch.device("meta")
    seen = []

    def record(model):
        seen.append(next(model.parameters()).device)
        return 0.5

    monkeypatch.setattr(sft_mod, "training_device", lambda: meta)
    monkeypatch.setattr(reward_mod, "training_device", lambda: meta)
    monkeypatch.setattr(sft_mod, "perplexity", lambda model, *a, **k: record(model) and 100.0)
    monkeypatch.setattr(sft_mod, "sample_texts", lambda model, *a, **k: record(model) and ["x"])
    monkeypatch.setattr(reward_mod, "pairwise_accuracy", lambda model, *a, **k: record(model))
    sft_mod.prepare_sft(SMALL, tmp_path / "a")
    reward_mod.prepare_reward(SMALL, tmp_path / "b", sft_dir=small_run[0] / "sft")
    assert len(seen) == 4 and all(device == meta for device in seen), seen


def test_sft_and_reward_slices_see_both_labels_on_a_label_sorted_dataset(tmp_path):
    """stanfordnlp/imdb is sorted by label: the first n train rows and the eval slice must still hold both."""
    from stand_ins import make_imdb_hub_folder

    folder = make_imdb_hub_folder(tmp_path / "imdb", n_train=400, n_test=200)
    profile = SMALL.replace(sft_max_train_examples=60, sft_eval_examples=40, sft_max_steps=2, reward_max_steps=2)
    sft = train_sft(profile, tmp_path / "run", str(folder), progress=False)
    assert min(sft.metrics["train_label_counts"].values()) >= 15
    assert min(sft.metrics["eval_label_counts"].values()) >= 10
    reward = train_reward_adapter(profile, tmp_path / "run", str(folder), progress=False)
    assert reward.metrics["eval_pairs"] == profile.reward_eval_pairs
