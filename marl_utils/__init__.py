"""marl_utils: helpers for Multi-Adapter RL (one base model as policy, reference and reward model)."""

__version__ = "0.1.0"
