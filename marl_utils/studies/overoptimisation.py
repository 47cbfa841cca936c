"""Over-optimisation (notebook 08): PPO against a proxy reward, watched by a gold reward, plotted against sqrt(KL).

Gao, Schulman and Hilton (2022, "Scaling laws for reward model overoptimization") trained policies against
reward models of several sizes and scored them with a much larger "gold" reward model. Plotted against
d = sqrt(KL(policy || initial policy)), the proxy score keeps rising while the gold score rises, peaks and falls;
the weaker the proxy, the earlier the peak. Here the proxy is a reward adapter trained on few preference pairs
and the gold is the corpus grammar's own sentiment of the text (`gold_reward.py`), which no training can fool.

`weak_reward_adapter` trains (or reuses) a reward adapter on the first `pairs` training pairs, `leash_config` is
the profile's PPO with a fixed KL coefficient (the leash), `train_watched` runs PPO while recording, per step,
proxy, gold, KL and a few rollouts, and `plot_against_sqrt_kl` draws the figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..infra.errors import MarlInputError
from .parity import GoldRecorder


def weak_reward_adapter(profile, out, pairs: int, *, progress: bool = False) -> Path:
    """A reward adapter trained on `pairs` preference pairs (plus their prefix pairs), in OUT/overoptimisation/.

    Trained once and reused: stage 2 with `reward_train_pairs=pairs`, from the stage-1 model in OUT/sft/.
    """
    from ..stages.reward import train_reward_adapter
    from ..infra.runs import stage_dir

    if pairs < 2:
        raise MarlInputError(f"a reward adapter from {pairs} pairs: use at least 2 (the profile's own uses "
                             f"{profile.reward_train_pairs})")
    sft_dir = stage_dir(out, "sft")
    if not sft_dir.exists():
        raise MarlInputError(f"{sft_dir} is missing: run stage 1 first (ensure_earlier_stages)")
    folder = Path(out) / "overoptimisation" / f"reward_{pairs}_pairs"
    result = train_reward_adapter(profile.replace(reward_train_pairs=pairs), folder, sft_dir=sft_dir, progress=progress)
    return Path(result.adapter_dir)


def leash_config(profile, kl_coef: float, steps: int, seed: int = 0):
    """The profile's PPOConfig with the KL coefficient fixed at `kl_coef` (no adaptive controller), `steps` steps
    of `overopt_batch_size` rollouts in minibatches of `overopt_mini_batch_size`."""
    from ..stages.ppo_parts import ppo_config

    if kl_coef < 0:
        raise MarlInputError(f"kl_coef={kl_coef}: the KL penalty's weight must be >= 0 (0: no leash)")
    return replace(ppo_config(profile, seed=seed, steps=steps), init_kl_coef=kl_coef, adap_kl_ctrl=False,
                   batch_size=profile.overopt_batch_size, mini_batch_size=profile.overopt_mini_batch_size)


@dataclass
class WatchedRun:
    """A PPO run's per-step proxy, gold and KL, and a few rollouts (token ids and gold) of every step."""

    label: str
    proxy: list = field(default_factory=list)
    gold: list = field(default_factory=list)
    kl: list = field(default_factory=list)
    rollouts: list = field(default_factory=list)
    """Per step: [(query ids, response ids, gold), ...] for the first `keep` rollouts of the batch."""

    @property
    def sqrt_kl(self) -> list[float]:
        return [math.sqrt(max(k, 0.0)) for k in self.kl]


def train_watched(trainer, prompts, gold_fn, label: str, *, keep: int = 4, progress: bool = True,
                  callback=None) -> WatchedRun:
    """Train `trainer` for its config's steps; record proxy (`env/score_mean`), gold and KL of every step.

    The gold score joins each history entry as `env/gold_mean` before `callback(trainer, entry)` (e.g. a
    `LiveCurves` board) sees it.
    """
    recorder = GoldRecorder(trainer, gold_fn)
    run = WatchedRun(label)

    def watch(trainer, entry):
        queries, responses = recorder.last
        texts = recorder.texts(queries[:keep], responses[:keep])
        recorder(trainer, entry)
        run.proxy.append(float(entry["env/score_mean"]))
        run.gold.append(float(entry["env/gold_mean"]))
        run.kl.append(float(entry["objective/kl"]))
        run.rollouts.append([(q.cpu(), r.cpu(), g) for q, r, g in zip(queries, responses, gold_fn(texts))])
        if callback is not None:
            callback(trainer, entry)

    trainer.train(prompts, callback=watch, progress=progress)
    return run


def smoothed(values, window: int) -> list[float]:
    """Centred moving average (shorter at the ends): per-step means of 64 rollouts are noisy."""
    half = window // 2
    return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
            for i in range(len(values))]


def gold_peak(run: WatchedRun, window: int = 5) -> dict:
    """Where the smoothed gold score peaks: the step (1-based), and smoothed proxy, gold and sqrt(KL) at the start,
    the peak and the end. `gold_drop` is peak minus end (> 0: the gold fell after its peak)."""
    if not run.gold:
        raise MarlInputError(f"run {run.label!r} has no steps; train it first")
    gold, proxy, d = smoothed(run.gold, window), smoothed(run.proxy, window), smoothed(run.sqrt_kl, window)
    peak = max(range(len(gold)), key=gold.__getitem__)
    return {"label": run.label, "steps": len(gold), "peak step": peak + 1,
            "proxy start": proxy[0], "proxy peak": proxy[peak], "proxy end": proxy[-1],
            "gold start": gold[0], "gold peak": gold[peak], "gold end": gold[-1],
            "sqrt KL peak": d[peak], "sqrt KL end": d[-1], "gold drop": gold[peak] - gold[-1]}


def plot_against_sqrt_kl(runs, *, window: int = 5, save_to=None, title: str | None = None):
    """Proxy (left) and gold (right) score against sqrt(KL), one colour per run; a dot marks the gold peak."""
    import matplotlib.pyplot as plt

    from ..display.plots import _save

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, run in zip(colors, runs):
        d = smoothed(run.sqrt_kl, window)
        axes[0].plot(d, smoothed(run.proxy, window), color=color, label=run.label)
        axes[1].plot(d, smoothed(run.gold, window), color=color, label=run.label)
        peak = gold_peak(run, window)
        axes[1].plot([peak["sqrt KL peak"]], [peak["gold peak"]], "o", color=color)
    for ax, name in zip(axes, ("proxy reward (what PPO maximises)", "gold reward (the grammar's sentiment)")):
        ax.set_xlabel("sqrt(KL to the reference), sqrt(nats)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if save_to:
        _save(fig, save_to)
    return fig
