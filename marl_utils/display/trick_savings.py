"""What one base for four roles saves, in measured numbers and one figure (notebook 03).

`MEASURED` holds the memory bench of docs/performance.md ("Memory"): `marl bench --base-size mid --compare marl
--steps 2` on the 2-core CPU, each layout in its own process, a 46M-parameter Llama-style base (random weights) with LoRA on
every linear layer, batch 32. "separate" is the classic RLHF layout: policy, reference, reward model and
value model as four models. `live_parameter_bytes` adds the same comparison for the model a notebook holds.
"""

from __future__ import annotations

MEASURED = {
    # layout: (parameter MB, model RSS MB: peak RSS of the process minus its RSS after the imports)
    "four separate models, fp32": (742.1, 1124),
    "one base, fp32": (192.1, 572),
    "one base, 8-bit": (58.2, 697),
    "one base, 4-bit": (39.5, 667),
}
MEASURED_COMMAND = "marl bench --base-size mid --compare marl --steps 2"


def live_parameter_bytes(model) -> dict[str, int]:
    """Parameter bytes of `model` (one base, four roles) and of four separate models built from its parts.

    Separate: a policy (base + policy LoRA), a value model (base + value head; the classic set-up gives it a
    trunk of its own), a reference (base) and a reward model (base + reward LoRA + score head).
    """
    from .notebook_helpers import footprint

    parts = footprint(model)
    base = parts.get("base/quantized", 0) + parts.get("base/float", 0)
    extras = sum(v for k, v in parts.items() if not k.startswith("base/"))
    return {"one base": base + extras, "four separate models": 4 * base + extras}


def plot_savings(measured: dict = MEASURED, *, save_to=None):
    """Two bar panels, parameter MB and model RSS MB, each bar labelled with its ratio to the separate models."""
    from .plots import _plt, _save

    plt = _plt()
    labels = list(measured)
    separate = measured[labels[0]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    colors = ["tab:gray", "tab:blue", "tab:cyan", "tab:green"][:len(labels)]
    for ax, column, title in zip(axes, (0, 1), ("parameters (MB)", "memory of the model in a PPO run (MB)")):
        heights = [measured[label][column] for label in labels]
        ax.bar(range(len(labels)), heights, color=colors)
        for i, height in enumerate(heights):
            ax.annotate(f"{height:.0f}\n{height / separate[column]:.2f}x", (i, height), ha="center", va="bottom",
                        fontsize=8)
        ax.set_xticks(range(len(labels)), [label.replace(", ", "\n") for label in labels], fontsize=8)
        ax.set_ylim(top=max(heights) * 1.25)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"policy, value, reference and reward: one 46M base vs four copies ({MEASURED_COMMAND})",
                 fontsize=9)
    fig.tight_layout()
    if save_to:
        _save(fig, save_to)
    return fig
