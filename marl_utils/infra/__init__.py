"""Infrastructure every layer may use: one error type, atomic writes, profiles, run folders, warning filters.

The lowest layer: it imports nothing else from marl_utils.
"""
