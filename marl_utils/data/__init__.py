"""Data: the offline review corpus, loading IMDB-shaped datasets, PPO prompts, the tiny base (notebook 01).
"""
