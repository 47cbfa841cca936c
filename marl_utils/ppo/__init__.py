"""PPO on the one base: the config, the maths of a step, the rollout, the trainer, its optimiser, checkpoints
and held-out evaluation (notebook 03). The update itself is `trainer.PPOTrainer.step`; the maths is in `maths`.
"""
