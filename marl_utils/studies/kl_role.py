"""What the KL penalty and the anti-collapse guard are for, shown by taking them away (notebook 03).

`run_variants` trains the notebook's PPO set-up several times from the same start, each run with one knob
changed (no KL penalty; no short-response penalty), and keeps per-step curves, the
eval numbers before and after, and a few samples of each. `scripts/kl_role.py` runs it once on the tiny
profile and commits the result (a JSON file and a figure), so the notebook shows the outcome without
spending minutes of CI on runs whose only purpose is to go wrong.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..infra.errors import MarlInputError

VARIANTS = {
    "as in this notebook": {},
    "no KL penalty": {"init_kl_coef": 0.0, "adap_kl_ctrl": False},
    "no anti-collapse guard": {"min_response_tokens": 0},
}
"""Run name -> the PPOConfig fields it changes (exercises 1 and 2 of notebook 03)."""

CURVES = {"env/score_mean": "reward-adapter score", "objective/kl": "KL to the reference (nats/response)",
          "ppo/response_tokens_mean": "response length (tokens)", "ppo/distinct_2": "distinct-2"}
"""The four panels of the figure: what a reward hack changes first."""


def run_variants(profile, out, variants=VARIANTS, steps: int | None = None, num_samples: int = 6) -> dict:
    """Train one fresh policy per variant on the same prompts and seed; returns {name: result}.

    A result holds `changes`, `history` (the CURVES keys per step), `before`/`after` eval numbers and
    `samples` (prompt, response, score) after training, all plain JSON types.
    """
    from ..stages.ppo_parts import build_ppo_parts
    from ..ppo.trainer import PPOTrainer

    unknown = {name: sorted(set(changes) - {f.name for f in dataclasses.fields(_config_class())})
               for name, changes in variants.items()}
    unknown = {name: keys for name, keys in unknown.items() if keys}
    if unknown:
        raise MarlInputError(f"run_variants: {unknown} are not PPOConfig fields; see marl_utils/ppo/config.py")
    results = {}
    for name, changes in variants.items():
        model, tokenizer, config, prompts, eval_prompts = build_ppo_parts(profile, Path(out), steps=steps)
        config = dataclasses.replace(config, **changes)
        trainer = PPOTrainer(config, model=model, tokenizer=tokenizer)
        before = trainer.evaluate(eval_prompts, num_samples=num_samples)
        trainer.train(prompts, progress=False)
        after = trainer.evaluate(eval_prompts, num_samples=num_samples)
        results[name] = {
            "changes": changes,
            "history": [{k: row[k] for k in CURVES} for row in trainer.history],
            "before": {k: v for k, v in before.items() if k != "samples"},
            "after": {k: v for k, v in after.items() if k != "samples"},
            "samples": [{k: s[k] for k in ("prompt", "response", "score")} for s in after["samples"]],
        }
    return results


def _config_class():
    from ..ppo.config import PPOConfig

    return PPOConfig


def save_results(results: dict, path) -> Path:
    from ..infra.atomic import atomic_write_json

    path = Path(path)
    atomic_write_json(path, results)
    return path


RESULTS = Path(__file__).resolve().parents[2] / "notebooks" / "figures" / "03_kl_role.json"
"""Where `scripts/kl_role.py` writes the runs and notebook 03 reads them."""


def load_results(path=RESULTS) -> dict:
    path = Path(path)
    if not path.exists():
        raise MarlInputError(f"{path} does not exist; make it with `python scripts/kl_role.py`")
    return json.loads(path.read_text())


def plot_kl_role(results: dict, *, target_kl: float | None = None, save_to=None):
    """One panel per CURVES key, one line per variant (smoothed over 3 steps); target_kl as a dashed line."""
    from ..display.plots import _plt, _save, _smooth, set_count_axis

    plt = _plt()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4))
    for ax, (key, title) in zip(axes, CURVES.items()):
        for name, result in results.items():
            ys = [row[key] for row in result["history"]]
            ax.plot(range(1, len(ys) + 1), _smooth(ys, 3), label=name)
        if key == "objective/kl" and target_kl is not None:
            ax.axhline(target_kl, color="grey", linestyle="--", linewidth=1, label="target KL")
        set_count_axis(ax, key)
        ax.set_title(title)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    if save_to:
        _save(fig, save_to)
    return fig


def samples_table(results: dict, n: int = 4):
    """Rows = held-out prompts, columns = each variant's response after training (score in brackets)."""
    import pandas as pd

    from ..display.notebook_helpers import readable

    first = next(iter(results.values()))
    table = {"prompt": [s["prompt"] for s in first["samples"][:n]]}
    for name, result in results.items():
        table[name] = [f"{readable(s['response'])} [{s['score']:+.1f}]" for s in result["samples"][:n]]
    return pd.DataFrame(table)


def outcome_table(results: dict):
    """Eval numbers after training, one row per variant: what each knob changed."""
    import pandas as pd

    keys = ["reward_mean", "kl_mean", "response_tokens_mean", "distinct_2"]
    rows = {name: {k: r["after"].get(k) for k in keys} for name, r in results.items()}
    return pd.DataFrame(rows).T.round(2)
