"""The model: ONE base as policy (LoRA), value function (value head or critic adapter), reference (adapters
disabled) and reward model (a frozen LoRA adapter with its score head); loading, quantization, forward modes,
precision (notebooks 03-06).
"""
