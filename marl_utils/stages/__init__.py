"""The three stages as library calls and commands: SFT (1), reward adapter (2), PPO or GRPO/RLOO (3), and the
pipeline that runs them in order (`marl run`).
"""
