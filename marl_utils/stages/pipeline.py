"""The whole pipeline, `marl run`: stage 1 (SFT), stage 2 (reward adapter), stage 3 (PPO, or GRPO/RLOO), plots
and `OUT/summary.json`. It only runs the stages in order; each stage lives in its own module.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..infra.atomic import atomic_write_json
from ..infra.profiles import Profile
from ..infra.runs import prepare_run_dir, stage_dir
from .ppo import train_ppo
from .ppo_parts import check_ppo_settings


def save_plots(out: Path, sft_metrics: dict, reward_metrics: dict, ppo_metrics: dict) -> list[Path]:
    """PNG curves of all three stages into `OUT/plots/`."""
    from ..display.plots import plot_curves

    plots = stage_dir(out, "plots")
    paths = [plots / "sft_loss.png", plots / "reward_loss.png", plots / "ppo.png"]
    plot_curves(sft_metrics.get("log_history", []), ["loss"], x_key="step", titles=["SFT loss"], save_to=paths[0])
    plot_curves(reward_metrics.get("log_history", []), ["loss", "accuracy"], x_key="step",
                titles=["reward pairwise loss", "reward pair accuracy"], save_to=paths[1])
    plot_curves(ppo_metrics.get("history", []), ["env/score_mean", "objective/kl", "ppo/response_tokens_mean"],
                titles=["reward (score)", "KL to reference (nats per response)", "response length (tokens)"],
                save_to=paths[2], smooth=3)
    return paths


def run_pipeline(profile: Profile, output_dir=None, dataset=None, *, seed: int = 0, force: bool = False,
                 steps: int | None = None, resume: bool = False, progress: bool = True, algo: str = "ppo") -> dict:
    """`marl run`: SFT -> reward adapter -> PPO (`algo="grpo"`/`"rloo"`: TRL's trainer), plots, `OUT/summary.json`."""
    from .reward import train_reward_adapter
    from .sft import train_sft

    out = prepare_run_dir(output_dir, profile)
    check_ppo_settings(profile, out, seed, steps)
    if algo != "ppo":
        from ..grpo.trainers import check_stage3

        check_stage3(profile, algo, steps, resume)  # before stage 1 trains
    if dataset:
        from ..data.loading import load_imdb

        load_imdb(dataset, seed=seed)  # fail on a bad dataset now, not after stage 1
    sft = train_sft(profile, out, dataset, seed=seed, force=force, progress=progress)
    reward = train_reward_adapter(profile, out, dataset, seed=seed, force=force, progress=progress)
    if algo == "ppo":
        ppo = train_ppo(profile, out, dataset, seed=seed, force=force, steps=steps, resume=resume, progress=progress)
    else:
        from .grpo import train_grpo

        ppo = train_grpo(profile, out, dataset, algo=algo, seed=seed, force=force, steps=steps, progress=progress)
    save_plots(out, sft.metrics, reward.metrics, ppo.metrics)
    notes = [m["learning_note"] for m in (sft.metrics, reward.metrics, ppo.metrics) if m.get("learning_note")]
    summary = {
        "profile": profile.name,
        "base_model": profile.base_model,
        "seed": seed,
        "algo": algo,
        "learned": not notes,
        "notes": notes,  # one sentence per stage that learned almost nothing: the likely cause and the fix
        "stages": {
            "sft": {k: sft.metrics.get(k) for k in ["seconds", "eval_perplexity", "eval_perplexity_before", "epochs"]},
            "reward": {k: reward.metrics.get(k) for k in ["seconds", "epochs", "eval_accuracy", "untrained_accuracy",
                                                          "eval_prefix_accuracy", "untrained_prefix_accuracy"]},
            algo: {k: ppo.metrics.get(k) for k in ["seconds", "steps", "max_new_tokens", "eval_reward_before",
                                                    "eval_reward_after", "kl_final", "response_tokens_mean",
                                                    "distinct_2_before", "distinct_2_after"]},
        },
    }
    atomic_write_json(out / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    for note in notes:  # again after the long JSON, where the eye lands at the end of a run
        print(f"NOTE: {note}")
    return summary
