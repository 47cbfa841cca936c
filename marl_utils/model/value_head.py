"""The value head: V(s_t) for every token position, read off the policy's last hidden state (notebook 03).

PPO's critic shares the policy's body, so the value function costs one `Linear(hidden, 1)` per policy
adapter. It is kept AND computed in float32 whatever the base's dtype and whatever autocast is on (a
quantized or half-precision base, or a bf16 step, would otherwise make the value regression noisy: under
bf16 autocast a plain Linear rounds a score of 3.14159 to 3.140625). The reward adapter's score head is the
same `Float32Linear`.
"""

from __future__ import annotations

import torch
from torch import nn


def hidden_and_vocab_size(config) -> tuple[int, int]:
    """(width of the last hidden state, vocabulary size) of a causal LM config: what lm_head, the value head and
    the reward model's score head read. Llama says `hidden_size`, GPT-2 `n_embd`; OPT-350m projects its hidden
    states (1024) down to `word_embed_proj_dim` (512) before lm_head, and its score head reads those."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = next((getattr(text_config, name) for name in ("word_embed_proj_dim", "hidden_size", "n_embd", "d_model")
                   if getattr(text_config, name, None) is not None), None)
    if hidden is None:
        raise ValueError(f"cannot find the hidden size in the config of {type(config).__name__}")
    return int(hidden), int(text_config.vocab_size)


class Float32Linear(nn.Linear):
    """A Linear that computes in float32 even inside a bf16/fp16 autocast region (its input is cast up)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.to(self.weight.dtype))


class ValueHead(nn.Module):
    """Dropout(p) then Linear(hidden, 1) in float32: hidden states [B, T, H] -> values [B, T]."""

    def __init__(self, hidden_size: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = Float32Linear(hidden_size, 1, dtype=torch.float32)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states.to(self.linear.weight.dtype)
        return self.linear(self.dropout(hidden_states)).squeeze(-1)
