"""The picture of the idea: one base model, four roles, adapters switched on and off (README, notebook 03).

    from marl_utils.display.roles_diagram import draw_roles_diagram
    draw_roles_diagram(save_to="notebooks/figures/roles.png")   # what scripts/make_figures.py does

Each column is one role. Every column stands on the SAME frozen base (one copy of the weights, drawn once
across the bottom); what differs is which LoRA adapter is switched in and which head reads the last hidden
state. Orange parts train in PPO, blue parts are frozen, the dashed box is "no adapter at all".
"""

from __future__ import annotations

__all__ = ["ROLES", "draw_roles_diagram"]

TRAINABLE, FROZEN, OFF = "#f4a259", "#8ab6d6", "white"

ROLES = [
    # (role, adapter box, head box, what comes out, the call)
    (r"policy  $\pi_\theta$", ("policy LoRA \"default\"", TRAINABLE), ("LM head", FROZEN),
     "token logprobs", "logits, _, values = model(ids)"),
    (r"value  $V(s)$", ("policy LoRA \"default\"", TRAINABLE), ("value head", TRAINABLE),
     "one value per token", ""),
    (r"reference  $\pi_{ref}$", ("adapters\ndisabled", OFF), ("LM head", FROZEN),
     "reference logprobs", "with model.reference():"),
    (r"reward  $r_\phi$", ("reward LoRA\n(stage 2)", FROZEN), ("score head", FROZEN),
     "one score per text", "model.compute_reward_score(ids)"),
]
"""What the diagram shows, column by column; tests check that every role is drawn."""


def draw_roles_diagram(save_to=None):
    """Draw the four roles on one base as a matplotlib Figure (not pyplot: nothing is shown twice); optionally
    save it as a PNG (atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig = Figure(figsize=(10, 4.6))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 4.6)
    ax.axis("off")

    def box(x, y, w, h, text, color, dashed=False, size=9, weight="normal"):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", facecolor=color,
                                    edgecolor="#333333", linestyle="--" if dashed else "-", linewidth=1.2))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, weight=weight)

    def arrow(x, y0, y1):
        ax.add_patch(FancyArrowPatch((x, y0), (x, y1), arrowstyle="-|>", mutation_scale=10, color="#333333"))

    box(0.3, 0.35, 9.4, 0.75, "ONE base model (the stage-1 SFT model): frozen weights, one copy in memory\n"
        "float32, or 8-bit / 4-bit with bitsandbytes", FROZEN, size=10, weight="bold")
    width, gap = 2.15, 0.27
    for i, (role, (adapter, adapter_color), (head, head_color), output, call) in enumerate(ROLES):
        x = 0.3 + i * (width + gap)
        middle = x + width / 2
        if i == 0:  # policy and value: ONE forward through the policy adapter feeds both heads
            box(x, 1.45, 2 * width + gap, 0.7, adapter + "\none forward feeds both heads", adapter_color)
        elif i > 1:
            box(x, 1.45, width, 0.7, adapter, adapter_color, dashed=adapter_color == OFF)
        arrow(middle, 1.12, 1.43)
        box(x + 0.3, 2.5, width - 0.6, 0.45, head, head_color)
        arrow(middle, 2.17, 2.48)
        arrow(middle, 2.97, 3.25)
        ax.text(middle, 3.35, output, ha="center", va="bottom", fontsize=9, style="italic")
        ax.text(middle, 3.75, role, ha="center", va="bottom", fontsize=12, weight="bold")
        # the call that gives the role (policy and value come out of the same call, written once across both)
        call_x = middle + (width + gap) / 2 if i == 0 else middle
        ax.text(call_x, 4.2, call, ha="center", va="bottom", fontsize=8, family="monospace", color="#444444")
    ax.text(0.3, 0.08, "orange: trained by PPO    blue: frozen    dashed: no adapter, the plain base is the "
            "reference (no second copy)", fontsize=8.5, color="#333333")
    if save_to is not None:
        from .plots import _save

        _save(fig, save_to)
    return fig
