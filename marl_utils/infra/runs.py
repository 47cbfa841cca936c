"""The run folder: one folder per run, one sub-folder per stage.

    OUT/run.json            which profile made this folder (guards against mixing profiles)
    OUT/base/               the tiny profile's locally built base model + tokenizer
    OUT/sft/                stage 1: causal LM + tokenizer (loadable with from_pretrained)
    OUT/reward_adapter/     stage 2: peft adapter with its score head
    OUT/ppo/                stage 3: policy adapter(s) + value head
    OUT/plots/, OUT/summary.json

Every stage folder is written atomically, so "the folder exists" means "the stage finished", and a
later stage (or notebook) can reuse it instead of training again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .atomic import atomic_write_json
from .errors import MarlInputError
from .profiles import Profile

REPO_ROOT = Path(__file__).resolve().parents[2]


def default_output_dir(profile: Profile) -> Path:
    """`$MARL_OUTPUT_DIR`, else `runs/<profile>` in the repository (git-ignored), else in the cwd.

    Notebooks run with their own folder as cwd; resolving against the repository keeps the
    notebooks and the `marl` command sharing one cache of finished stages.
    """
    if os.environ.get("MARL_OUTPUT_DIR"):
        return Path(os.environ["MARL_OUTPUT_DIR"]).expanduser() / profile.name
    root = REPO_ROOT if (REPO_ROOT / "pyproject.toml").exists() else Path.cwd()
    return root / "runs" / profile.name


def prepare_run_dir(out_dir: str | os.PathLike | None, profile: Profile) -> Path:
    """Create (or reopen) a run folder for `profile`; refuse one made by another profile."""
    out = Path(out_dir) if out_dir else default_output_dir(profile)
    if out.exists() and not out.is_dir():
        raise MarlInputError(f"output folder {out} is a file; pass a folder path with --output-dir")
    info_path = out / "run.json"
    if info_path.exists():
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError) as exc:
            raise MarlInputError(f"{info_path} is unreadable ({exc}); delete it or use another --output-dir") from exc
        if info.get("profile") != profile.name:
            raise MarlInputError(
                f"output folder {out} holds artifacts of profile {info.get('profile')!r}, not {profile.name!r}; "
                "use another --output-dir (stages of different profiles must not be mixed)"
            )
        if info.get("base_model", profile.base_model) != profile.base_model:  # older run.json files lack it
            raise MarlInputError(
                f"output folder {out} holds stages trained from base model {info['base_model']!r}, not "
                f"{profile.base_model!r}; use another --output-dir for --base-model {profile.base_model}"
            )
    else:
        has_stages = out.exists() and any((out / s).exists() for s in ("sft", "reward_adapter", "ppo"))
        if has_stages:
            raise MarlInputError(
                f"output folder {out} already holds stage folders but no run.json, so their profile is unknown; "
                "use another --output-dir or delete the folder"
            )
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(info_path, {"profile": profile.name, "base_model": profile.base_model})
    return out


def stage_dir(out: str | os.PathLike, stage: str) -> Path:
    return Path(out) / stage


def read_metrics(stage_path: str | os.PathLike) -> dict:
    path = Path(stage_path) / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}
