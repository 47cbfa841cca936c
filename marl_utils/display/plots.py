"""Plots shared by the notebooks and `marl run` (one call each, so notebooks stay about the algorithm)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from ..infra.errors import MarlInputError


def _save(fig, save_to) -> Path:
    """Write a PNG under a temporary name, then rename: a killed run leaves the old plot or the new, never half."""
    path = Path(save_to)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)  # the format follows the suffix, which the temporary name keeps
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a plot is for everyone to read
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _plt():
    import matplotlib

    if not _in_notebook():
        matplotlib.use("Agg")  # `marl run` on a headless machine writes PNGs only
    import matplotlib.pyplot as plt

    return plt


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        return get_ipython() is not None and "IPKernelApp" in get_ipython().config
    except Exception:
        return False


def _smooth(values, window: int):
    if window <= 1 or len(values) < window:
        return values
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def set_count_axis(ax, key: str) -> None:
    """Token counts start their y axis at 0: zoomed in, 19.6 of 20 tokens would look like a collapse."""
    if "tokens" in key:
        ax.set_ylim(bottom=0)


def plot_curves(history: list[dict], keys, *, x_key: str | None = None, titles=None, smooth: int = 1,
                save_to: str | Path | None = None, suptitle: str | None = None, columns: int | None = None):
    """One small panel per metric in `keys`, from a list of per-step dicts (a trainer's history).

    `columns`: panels per row (default: all in one row); further panels wrap onto more rows.
    """
    plt = _plt()
    keys = list(keys)
    columns = min(columns or len(keys), len(keys))
    n_rows = -(-len(keys) // columns)
    fig, axes = plt.subplots(n_rows, columns, figsize=(4.2 * columns, 3.2 * n_rows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key, title in zip(axes.flat, keys, titles or keys):
        rows = [r for r in history if key in r]
        xs = [r[x_key] if x_key else i for i, r in enumerate(rows)]
        ys = [float(r[key]) for r in rows]
        ax.plot(xs, ys, alpha=0.35 if smooth > 1 else 1.0, color="tab:blue")
        if smooth > 1:
            ax.plot(xs, _smooth(ys, smooth), color="tab:blue")
        set_count_axis(ax, key)
        ax.set_title(title)
        ax.set_xlabel(x_key or "step")
        ax.grid(alpha=0.3)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    if save_to:
        _save(fig, save_to)
    return fig


PPO_DIAGNOSTICS = {
    "objective/kl": "KL to reference (nats per response), beta",
    "ppo/policy/approxkl": "approx KL (old vs new policy)",
    "ppo/policy/clipfrac": "clip fraction",
    "objective/entropy": "entropy (nats/token)",
    "ppo/val/explained_variance": "explained variance",
    "ppo/loss/value": "value loss",
}
"""The numbers PPO practitioners watch, per step of a trainer's history (CleanRL logs the same)."""


def plot_ppo_diagnostics(history: list[dict], *, smooth: int = 3, target_kl: float | None = None, save_to=None):
    """The health of the PPO update itself (notebook 03), one panel each for `PPO_DIAGNOSTICS`.

    The KL panel also draws `target_kl` (dashed) and beta, the KL controller's answer to the KL, on its right
    axis. Approx KL and clip fraction say how far each update moved the policy (both climbing step after step
    means updates too large for the clip); entropy falling fast means the policy is narrowing onto a few
    phrases; explained variance near 1 means the value head predicts the returns, at or below 0 that it does
    no better than a constant; the value loss should fall as it learns.
    """
    keys = [*PPO_DIAGNOSTICS, "objective/kl_coef"]
    missing = [key for key in keys if not any(key in row for row in history)]
    if missing:
        raise MarlInputError(f"plot_ppo_diagnostics: the history has no {missing}; pass a PPOTrainer's `history` "
                             "(after trainer.train or trainer.log_stats)")
    x_key = "step" if all("step" in row for row in history) else None  # the trainer's step count, as in train()
    fig = plot_curves(history, list(PPO_DIAGNOSTICS), titles=list(PPO_DIAGNOSTICS.values()), smooth=smooth,
                      columns=3, x_key=x_key)
    kl_ax = fig.axes[0]
    if target_kl is not None:
        kl_ax.axhline(target_kl, color="grey", linestyle="--", linewidth=1, label=f"target KL {target_kl:g}")
    rows = [r for r in history if "objective/kl_coef" in r]
    beta_ax = kl_ax.twinx()
    beta_ax.plot([r[x_key] if x_key else i for i, r in enumerate(rows)], [r["objective/kl_coef"] for r in rows],
                 color="tab:red", label="beta (right axis)")
    beta_ax.set_ylim(bottom=0)
    beta_ax.tick_params(axis="y", colors="tab:red")
    lines = kl_ax.get_legend_handles_labels()
    kl_ax.legend(lines[0] + beta_ax.get_legend_handles_labels()[0], lines[1] + ["beta (right axis)"], fontsize=8)
    fig.tight_layout()
    if save_to:
        _save(fig, save_to)
    return fig


def plot_score_histograms(pos_scores, neg_scores, *, title="reward scores of held-out reviews", save_to=None):
    """Overlaid histograms of reward scores for positive and negative reviews."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    lo = min(min(pos_scores), min(neg_scores))
    hi = max(max(pos_scores), max(neg_scores))
    bins = [lo + (hi - lo) * i / 30 for i in range(31)]
    ax.hist(neg_scores, bins=bins, alpha=0.6, label="negative reviews", color="tab:red")
    ax.hist(pos_scores, bins=bins, alpha=0.6, label="positive reviews", color="tab:green")
    ax.set_xlabel("score")
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    if save_to:
        _save(fig, save_to)
    return fig


def plot_bars(labels, values, *, ylabel: str, title: str, save_to=None, fmt="{:.1f}"):
    """A labelled bar chart (memory per layout, seconds per step...)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(labels)), 3.4))
    bars = ax.bar(range(len(labels)), values, color="tab:blue")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    for bar, v in zip(bars, values):
        ax.annotate(fmt.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=8)
    fig.tight_layout()
    if save_to:
        _save(fig, save_to)
    return fig
