"""Three critics side by side: the choices, one PPO run of each, its summary row and curves (notebook 06).

| label                | `from_pretrained(...)` arguments                    | the value function reads            |
|----------------------|-----------------------------------------------------|-------------------------------------|
| `shared head`        | `critic="head"`                                     | the policy's last hidden state      |
| `critic adapter`     | `critic="adapter"`                                  | a fresh critic LoRA adapter's       |
| `critic from reward` | `critic="adapter", critic_init="reward_adapter"`    | a critic started as the reward model |
| control (seed study) | `critic="adapter", critic_peft_config=<the reward adapter's LoRA shape>` | a fresh critic that size |

Notebook 06 runs the three on the same prompts with the same seed and shows the table and curves made
here; `scripts/critic_seeds.py` repeats that for several seeds (`run_critics`, `seed_table`). The runs train
side by side, one step of each in turn (`train_side_by_side`), so that a busy machine slows all of them alike.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from ..infra.errors import MarlInputError

CRITICS: dict[str, dict] = {
    "shared head": {"critic": "head"},
    "critic adapter": {"critic": "adapter"},
    "critic from reward": {"critic": "adapter", "critic_init": "reward_adapter"},
}

# A control for the seed study: a FRESH critic adapter with the reward adapter's LoRA shape (rank, target modules).
# The copied critic has that shape too, so against this control its head start is the copy, not the capacity.
CONTROLS: dict[str, dict] = {
    "fresh critic, reward's shape": {"critic": "adapter", "critic_peft_config": "the reward adapter's LoRA shape"},
}

CURVES = (("env/score_mean", "reward (score)"), ("ppo/loss/value", "value loss"),
          ("ppo/val/explained_variance", "explained variance"), ("objective/kl", "KL to reference (nats per response)"))


def critic_kwargs(label: str, reward_dir=None) -> dict:
    """The `from_pretrained` arguments of critic `label` (a key of `CRITICS`, or of `CONTROLS` with `reward_dir`)."""
    if label in CRITICS:
        return dict(CRITICS[label])
    if label in CONTROLS:
        if reward_dir is None:
            raise MarlInputError(f"critic {label!r} takes its LoRA shape from the reward adapter: pass reward_dir")
        return {**CONTROLS[label], "critic_peft_config": reward_shaped_lora(reward_dir)}
    raise MarlInputError(f"unknown critic {label!r}; choose one of {list(CRITICS) + list(CONTROLS)}")


def reward_shaped_lora(reward_dir):
    """A causal-LM LoraConfig with the rank, alpha and target modules of the reward adapter in `reward_dir`."""
    from peft import LoraConfig

    saved = LoraConfig.from_pretrained(str(reward_dir))
    targets = saved.target_modules
    return LoraConfig(r=saved.r, lora_alpha=saved.lora_alpha, lora_dropout=saved.lora_dropout, bias=saved.bias,
                      target_modules=sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
                      task_type="CAUSAL_LM")


def critic_bytes(model) -> int:
    """Bytes the active policy's value function adds to the model: its value head, plus its critic LoRA if any.

    The shared head costs one Linear(hidden, 1); a critic adapter also costs its LoRA matrices (and Adam keeps
    two more float32 copies of every trainable byte, not counted here).
    """
    from .notebook_helpers import footprint

    parts = footprint(model)
    extra = parts.get(f"lora/{model.critic_adapter}", 0) if model.critic_adapter else 0
    return parts.get(f"value_head/{model.active_adapter}", 0) + extra


def base_bytes(model) -> int:
    """Bytes of the shared base (float and quantized parts): what every role on it shares."""
    from .notebook_helpers import footprint

    parts = footprint(model)
    return parts.get("base/float", 0) + parts.get("base/quantized", 0)


def window_mean(history: list[dict], key: str, n: int, which: str = "first") -> float:
    """Mean of `key` over the first (or last) `n` steps of a trainer's history that record it."""
    if n < 1:
        raise MarlInputError(f"window of {n} steps: use at least 1")
    if which not in ("first", "last"):
        raise MarlInputError(f"which={which!r}: use 'first' or 'last'")
    values = [float(row[key]) for row in history if key in row]
    if not values:
        raise MarlInputError(f"no step of this history records {key!r}; train first (trainer.train) or check the key")
    picked = values[:n] if which == "first" else values[-n:]
    return sum(picked) / len(picked)


def seconds_per_step(history: list[dict]) -> float:
    """Median wall seconds of one training step: generation plus the PPO step (rollout forward and updates).

    The median, because on a shared machine one slow step says more about the neighbours than about the critic.
    """
    times = [row["time/rollout/generate"] + row["time/ppo/total"] for row in history
             if "time/rollout/generate" in row and "time/ppo/total" in row]
    if not times:
        raise MarlInputError("no step of this history has timings; it must come from trainer.train()")
    return statistics.median(times)


@dataclass
class CriticRun:
    """One PPO run with one critic: its history, held-out evaluation before/after, and what the critic costs."""

    label: str
    history: list
    before: dict
    after: dict
    critic_bytes: int
    base_bytes: int
    seed: int = 0
    seconds: float = 0.0


def summarize(run: CriticRun, window: int = 10) -> dict:
    """One table row: eval reward before/after/gain, final KL, value loss and explained variance over the first
    and last `window` steps, seconds per step, and the critic's bytes (absolute and as a share of the base)."""
    h = run.history
    return {
        "critic": run.label,
        "seed": run.seed,
        "eval reward before": run.before["reward_mean"],
        "eval reward after": run.after["reward_mean"],
        "reward gain": run.after["reward_mean"] - run.before["reward_mean"],
        "final KL": run.after["kl_mean"],
        "value loss first": window_mean(h, "ppo/loss/value", window, "first"),
        "value loss last": window_mean(h, "ppo/loss/value", window, "last"),
        "expl. var. first": window_mean(h, "ppo/val/explained_variance", window, "first"),
        "expl. var. last": window_mean(h, "ppo/val/explained_variance", window, "last"),
        "s/step": seconds_per_step(h),
        "critic KiB": run.critic_bytes / 1024,
        "critic / base": run.critic_bytes / run.base_bytes if run.base_bytes else math.nan,
    }


def seed_table(rows: list[dict]) -> list[dict]:
    """Rows of `summarize` for several seeds -> one row per critic: (mean, sd) of every number, and the seeds."""
    if not rows:
        raise MarlInputError("seed_table got no rows; pass the summarize() rows of at least one run")
    table = []
    for label in dict.fromkeys(row["critic"] for row in rows):  # first-seen order
        runs = [row for row in rows if row["critic"] == label]
        out = {"critic": label, "seeds": len(runs)}
        for key in runs[0]:
            if key in ("critic", "seed"):
                continue
            values = [float(row[key]) for row in runs]
            out[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        table.append(out)
    return table


def format_seed_table(table: list[dict], columns=None) -> str:
    """A markdown table of `seed_table` output, numbers as mean±sd."""
    columns = list(columns or [k for k in table[0] if k not in ("critic", "seeds")])
    lines = ["| critic | seeds | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for row in table:
        cells = [_mean_sd(*row[c], digits=3 if "s/step" in c else 2) for c in columns]
        lines.append(f"| {row['critic']} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_sd(mean: float, sd: float, digits: int = 2) -> str:
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def build_trainer(label: str, sft_dir, reward_dir, lora_config, config):
    """A PPOTrainer on the one base loaded with critic `label`; the model's initialisation is seeded with
    `config.seed`, so the three critics built with one config start from the same policy adapter."""
    import torch
    from transformers import AutoTokenizer

    from ..model.multi_adapter_model import AutoModelForCausalLMWithValueHead
    from ..ppo.trainer import PPOTrainer

    kwargs = critic_kwargs(label, reward_dir)  # fails before anything loads
    tokenizer = AutoTokenizer.from_pretrained(str(sft_dir))
    tokenizer.padding_side = "left"
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(sft_dir), peft_config=lora_config,
                                                              reward_adapter=str(reward_dir), **kwargs)
    return PPOTrainer(config, model=model, tokenizer=tokenizer)


def run_critics(labels, sft_dir, reward_dir, lora_config, config, prompts, eval_prompts, *,
                progress: bool = False) -> dict:
    """label -> CriticRun: each critic evaluated, trained `config.steps` steps side by side, evaluated again."""
    labels = list(labels)
    for label in labels:
        critic_kwargs(label, reward_dir)
    start = time.perf_counter()
    trainers = {label: build_trainer(label, sft_dir, reward_dir, lora_config, config) for label in labels}
    before = {label: trainer.evaluate(eval_prompts) for label, trainer in trainers.items()}
    train_side_by_side(trainers, prompts, config.steps, progress=progress)
    seconds = time.perf_counter() - start
    return {label: CriticRun(label, trainer.history, before[label], trainer.evaluate(eval_prompts),
                             critic_bytes(trainer.model), base_bytes(trainer.model), seed=config.seed, seconds=seconds)
            for label, trainer in trainers.items()}


def train_side_by_side(trainers: dict, prompts, steps: int, *, eval_prompts=None, progress: bool = True) -> dict:
    """Train fresh PPOTrainers in turn, one step each, until each has `steps` steps; returns label -> history.

    In turn, because a shared machine's load changes from minute to minute: every critic's steps then see the
    same load, so their seconds per step compare. Each trainer keeps random streams of its own, seeded as its
    constructor seeds them, so each run is exactly the run the trainer would make alone (tested).
    """
    from ..infra.progress import progress_bar

    if steps < 1:
        raise MarlInputError(f"steps={steps}: train at least 1 step")
    started = [label for label, trainer in trainers.items() if trainer.step_count]
    if started:
        raise MarlInputError(f"trainers {started} have already trained; train_side_by_side needs fresh trainers (it "
                             "seeds each as its constructor does)")
    outside = _rng_state()
    streams = {}
    for label, trainer in trainers.items():
        _seed_everything(trainer.config.seed + trainer.accelerator.process_index)
        streams[label] = _rng_state()
    bar = progress_bar(range(steps), desc="PPO, " + " | ".join(trainers), disable=not progress)
    try:
        for _ in bar:
            for label, trainer in trainers.items():
                _set_rng_state(streams[label])
                trainer.train(prompts, steps=trainer.step_count + 1, eval_prompts=eval_prompts, progress=False)
                streams[label] = _rng_state()
            bar.set_postfix_str(" | ".join(f"{t.history[-1]['env/score_mean']:+.2f}" for t in trainers.values()))
    finally:
        bar.close()
        _set_rng_state(outside)
    return {label: trainer.history for label, trainer in trainers.items()}


def _seed_everything(seed: int) -> None:
    from accelerate.utils import set_seed

    set_seed(seed)


def _rng_state() -> dict:
    """Every random stream a PPO step may draw from: torch (CPU and CUDA), Python's and numpy's."""
    import random

    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "random": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def plot_critics(histories: dict, *, smooth: int = 3, save_to=None, title: str | None = None):
    """Reward, value loss, explained variance and KL of several runs on one figure (`histories`: label -> history).

    Explained variance is drawn between -1 and 1: a fresh critic starts far below 0, which would squash the
    part of the curve where the critics differ.
    """
    import matplotlib.pyplot as plt

    from .plots import _smooth as smooth_curve

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.0 * len(CURVES), 3.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, name) in zip(axes[0], CURVES):
        for color, (label, history) in zip(colors, histories.items()):
            ys = [float(row[key]) for row in history if key in row]
            ax.plot(ys, color=color, alpha=0.25)
            ax.plot(smooth_curve(ys, smooth), color=color, label=label)
        if key == "ppo/val/explained_variance":
            ax.set_ylim(-1.0, 1.0)
        ax.set_title(name)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if save_to:
        save_png(fig, save_to)
    return fig


def save_png(fig, path) -> Path:
    """Write `fig` as a PNG atomically, readable by everyone (plotting's writer: temporary file, one rename)."""
    from .plots import _save

    return _save(fig, path)
