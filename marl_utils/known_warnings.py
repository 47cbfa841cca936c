"""The library warnings a learner did not cause and cannot act on, filtered in this one place (all notebooks).

Each filter matches one exact message of a pinned dependency, with the reason it is safe to hide. Anything
else still shows: a new warning after an upgrade is news, not noise.
"""

from __future__ import annotations

import warnings

KNOWN = [
    # peft 0.21's PeftModel.__init__ reads `model.is_gradient_checkpointing`, which transformers 5 deprecated in
    # favour of `is_activation_checkpointing`; nothing the user calls, and peft will follow.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated and will be removed in v6"),
]


def silence_known_library_warnings() -> None:
    """Install the filters (idempotent: `warnings.filterwarnings` moves a repeated filter to the front)."""
    for category, message in KNOWN:
        warnings.filterwarnings("ignore", message=message, category=category)
