"""Profiles, the run folder and the CLI's one-line errors."""

import json

import pytest

from marl_utils import profiles
from marl_utils.cli import main
from marl_utils.errors import MarlInputError
from marl_utils.profiles import PROFILES, resolve_profile
from marl_utils.runs import prepare_run_dir


def test_env_var_selects_profile(monkeypatch):
    monkeypatch.setenv("MARL_PROFILE", "gpt2-imdb")
    assert resolve_profile(verbose=False).name == "gpt2-imdb"
    assert resolve_profile("tiny", verbose=False).name == "tiny"


@pytest.mark.parametrize("cuda, expected", [(False, "tiny"), (True, "gpt2-imdb")])
def test_default_depends_on_cuda_and_says_why(monkeypatch, capsys, cuda, expected):
    monkeypatch.delenv("MARL_PROFILE", raising=False)
    monkeypatch.setattr(profiles, "_cuda_available", lambda: cuda)
    assert resolve_profile().name == expected
    assert "CUDA" in capsys.readouterr().out


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(MarlInputError, match=r"unknown profile 'huge'.*gpt2-imdb.*tiny"):
        resolve_profile("huge", verbose=False)


def test_profiles_differ_in_sizes_only():
    tiny, gpu = PROFILES["tiny"], PROFILES["gpt2-imdb"]
    assert tiny.base_model == "tiny" and tiny.dataset == "offline"
    assert gpu.base_model == "gpt2" and gpu.dataset == "stanfordnlp/imdb"
    assert gpu.ppo_batch_size > tiny.ppo_batch_size


def test_cli_unknown_profile_one_line_error(capsys):
    assert main(["sft", "--profile", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown profile 'nope'") and "\n" not in err


def test_run_dir_refuses_another_profiles_artifacts(tmp_path):
    out = prepare_run_dir(tmp_path / "run", PROFILES["tiny"])
    assert json.loads((out / "run.json").read_text())["profile"] == "tiny"
    assert prepare_run_dir(out, PROFILES["tiny"]) == out  # reopening with the same profile is fine
    with pytest.raises(MarlInputError, match=r"holds artifacts of profile 'tiny', not 'gpt2-imdb'"):
        prepare_run_dir(out, PROFILES["gpt2-imdb"])


def test_run_dir_refuses_unknown_stage_folders(tmp_path):
    (tmp_path / "sft").mkdir()
    with pytest.raises(MarlInputError, match="no run.json"):
        prepare_run_dir(tmp_path, PROFILES["tiny"])
