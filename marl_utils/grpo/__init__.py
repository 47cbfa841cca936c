"""Critic-free RL on the one base: TRL's GRPOTrainer and RLOOTrainer, scored by the reward adapter (notebook 07).
"""
