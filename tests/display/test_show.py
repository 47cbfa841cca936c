"""What the notebooks print for a person (marl_utils.display.show) and how progress is drawn (marl_utils.infra.progress)."""

import re

import pytest

from marl_utils.infra.profiles import PROFILES
from marl_utils.display.show import (evaluation_table, megabytes, readable_table, samples_table, settings_table, share,
                             tiny_text_note)


def test_settings_table_gives_each_setting_a_one_line_meaning():
    frame = settings_table(PROFILES["tiny"], ["ppo_init_kl_coef", "ppo_epochs", "sft_learning_rate",
                                              "reward_prefix_tokens"]).data
    meanings = dict(zip(frame["setting"], frame["meaning"]))
    assert meanings["ppo_init_kl_coef"].startswith("Initial beta of the per-token KL penalty")   # PPOConfig's words
    assert meanings["ppo_epochs"].startswith("Passes over the batch")
    assert meanings["sft_learning_rate"].startswith("Peak AdamW learning rate")
    assert all(m and "\n" not in m and m.endswith((".", ")")) for m in meanings.values()), meanings
    values = dict(zip(frame["setting"], frame["value"]))
    assert values["ppo_init_kl_coef"] == "0.15" and values["reward_prefix_tokens"] == "12, 24, 32"


def test_settings_table_reads_trl_help_text():
    from trl import SFTConfig

    from marl_utils.display.show import field_meanings

    meanings = field_meanings(SFTConfig)   # transformers/TRL document a field in its `help` metadata
    assert meanings["learning_rate"].startswith("The initial learning rate") and meanings["packing"]


def test_tables_are_left_aligned_and_keep_long_text_whole():
    long_text = "a review that goes on " * 20 + "(score 1.8)"
    html = readable_table({"text": [long_text], "score": [1.23456]}, caption="held-out evaluation").to_html()
    assert long_text in html and "..." not in html   # wrapped by the browser, never cut
    body_cells = re.search(r"_row0_col0[^{]*\{([^}]*)\}", html).group(1)   # the CSS rule of the table's cells
    assert "text-align: left" in body_cells and "white-space: pre-wrap" in body_cells
    assert "1.23" in html and "1.23456" not in html
    assert "held-out evaluation" in html


def test_samples_of_a_small_model_say_why_the_words_look_broken():
    assert "0.8M parameters" in samples_table({"after": ["boredteran"]}, parameters=800_000).to_html()
    assert tiny_text_note(parameters=124_000_000) is None   # GPT-2 writes English: no note
    caption = samples_table({"after": ["fine"]}, parameters=124_000_000, caption="held-out prompts").caption
    assert caption == "held-out prompts"


def test_evaluation_table_says_the_numbers_are_held_out():
    styler = evaluation_table({"before": {"reward_mean": -0.0679, "kl_mean": 0.0, "samples": []}}, prompts=128)
    assert styler.data.columns.tolist() == ["reward (score)", "KL to reference (nats per response)"]
    assert "128 held-out prompts" in styler.caption and "training batches" in styler.caption


def test_sizes_and_shares_read_as_a_person_writes_them():
    assert megabytes(3363456) == 3.36 and megabytes(41216) == 0.0412
    assert share(3363456, 3363456) == "100%" and share(41216, 3363456) == "1.2%" and share(3e5, 1e6) == "30%"


def test_no_library_bars_restores_what_was_on():
    import datasets
    from transformers.utils import logging as hf_logging

    from marl_utils.infra.progress import no_library_bars

    with no_library_bars():
        assert datasets.are_progress_bars_disabled() and not hf_logging.is_progress_bar_enabled()
    assert not datasets.are_progress_bars_disabled() and hf_logging.is_progress_bar_enabled()


def test_text_bar_hook_leaves_someone_elses_hook_alone():
    from transformers.utils import logging as hf_logging

    from marl_utils.infra.progress import _text_bar_hook, text_bars_in_notebooks

    def theirs(factory, args, kwargs):
        return factory(*args, **kwargs)

    previous = hf_logging.set_tqdm_hook(theirs)
    try:
        text_bars_in_notebooks()
        assert hf_logging.set_tqdm_hook(None) is theirs
        text_bars_in_notebooks()
        assert hf_logging.set_tqdm_hook(None) is _text_bar_hook
    finally:
        hf_logging.set_tqdm_hook(previous)


@pytest.mark.parametrize("in_kernel", [False, True])
def test_progress_bar_is_text_on_stdout_only_in_a_kernel(monkeypatch, capsys, in_kernel):
    import marl_utils.infra.progress as progress

    monkeypatch.setattr(progress, "in_jupyter_kernel", lambda: in_kernel)
    for _ in progress.progress_bar(range(2), desc="PPO"):
        pass
    out, err = capsys.readouterr()
    assert ("PPO: 100%" in out) == in_kernel and ("PPO: 100%" in err) != in_kernel
