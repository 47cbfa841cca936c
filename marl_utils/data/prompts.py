"""PPO prompts: the first few tokens of real reviews (notebook 03).

Like the public gpt2-sentiment example, a prompt is a review cut after 2-8 tokens; the policy writes
the rest and the reward adapter judges it. Short prompts rarely fix the sentiment, so the policy
has room to move the reward.
"""

from __future__ import annotations

import random

from ..infra.errors import MarlInputError


def load_prompts(texts, tokenizer, *, min_tokens: int = 2, max_tokens: int = 8, n: int | None = None,
                 seed: int = 0, max_context: int | None = None):
    """Return `n` prompts (1-D LongTensors) cut from `texts` at a seeded length in [min, max] tokens.

    `max_context` is the model's context size; a prompt that leaves no room for a response is an error.
    """
    import torch

    if min_tokens < 1 or max_tokens < min_tokens:
        raise MarlInputError(f"prompt length range ({min_tokens}, {max_tokens}) is invalid; "
                             "need 1 <= min_tokens <= max_tokens")
    if max_context is not None and max_tokens >= max_context:
        raise MarlInputError(f"prompts of up to {max_tokens} tokens do not fit the model's context of "
                             f"{max_context} tokens with room for a response; lower max_tokens")
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    prompts = []
    for i in order:
        ids = tokenizer(texts[i], add_special_tokens=False)["input_ids"]
        length = rng.randint(min_tokens, max_tokens)
        if len(ids) < length:
            continue
        prompts.append(torch.tensor(ids[:length], dtype=torch.long))
        if n is not None and len(prompts) >= n:
            break
    if not prompts:
        raise MarlInputError(f"no text is at least {min_tokens} tokens long, so no prompts could be made; "
                             "check the dataset's text column")
    return prompts
