"""Profiles: the same code path at two sizes (the "baby GPT" idea from nanoGPT).

`tiny` runs fully offline on a laptop CPU in minutes: a small Llama-style model built from config,
a tokenizer trained on the shipped corpus, the corpus in `data/`. `gpt2-imdb` uses `gpt2` and
`stanfordnlp/imdb` from the Hub with the sizes of the public gpt2-sentiment example and wants a GPU.
Only numbers differ between profiles; no function branches on the profile's name.

`MARL_PROFILE` picks one; without it, `tiny` is chosen on a machine without CUDA and `gpt2-imdb`
with it, and `resolve_profile` says which and why.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from .errors import MarlInputError

TINY_BASE = "tiny"
"""`base_model` value meaning: build the tiny Llama-style base locally (see `marl_utils.tiny_base`)."""


@dataclass(frozen=True)
class Profile:
    """All sizes of one run. Introduced in notebook 01; every stage reads its own section."""

    name: str
    base_model: str
    """Hub id or local folder of the causal LM to start from, or "tiny" to build one offline."""
    dataset: str
    """`load_imdb` source: "offline", a Hub id, or a local file/folder."""
    description: str = ""

    # Stage 1: SFT
    sft_max_length: int = 128
    sft_epochs: float = 1.0
    sft_max_steps: int = -1
    sft_batch_size: int = 16
    sft_learning_rate: float = 2e-3
    sft_max_train_examples: int | None = None
    sft_eval_examples: int = 200
    sft_max_perplexity: float = 4.0
    """The bar notebook 01 asserts: held-out perplexity after SFT must be below it."""

    # Stage 2: reward adapter
    reward_max_length: int = 128
    reward_prefix_tokens: tuple[int, ...] = (12, 24, 32)
    """Prefix lengths of the truncated pairs added to training: PPO scores short texts."""
    reward_eval_prefix_tokens: int = 24
    reward_lora_r: int = 16
    reward_lora_alpha: int = 32
    reward_epochs: float = 1.0
    reward_max_steps: int = -1
    reward_batch_size: int = 16
    reward_learning_rate: float = 3e-3
    reward_train_pairs: int = 2000
    reward_eval_pairs: int = 400
    reward_min_accuracy: float = 0.95
    reward_min_prefix_accuracy: float = 0.85

    # Stage 3: PPO
    ppo_lora_r: int = 16
    ppo_lora_alpha: int = 32
    ppo_steps: int = 50
    ppo_batch_size: int = 64
    ppo_mini_batch_size: int = 16
    ppo_epochs: int = 4
    ppo_learning_rate: float = 2e-3
    ppo_init_kl_coef: float = 0.15
    ppo_target_kl: float = 8.0
    """The adaptive KL controller steers beta towards this many nats per sequence."""
    ppo_kl_horizon: float = 1000.0
    """Rollouts over which the controller corrects beta: ~3000 rollouts in a tiny run, so 10000 would barely move it."""
    ppo_prompt_tokens: tuple[int, int] = (2, 6)
    ppo_max_new_tokens: int = 20
    ppo_eval_prompts: int = 128
    ppo_save_every: int = 10
    """Write a PPO checkpoint every this many steps (and at the end): `marl ppo --resume` continues from it."""
    ppo_min_reward_gain: float = 1.5
    """Bars notebook 03 asserts: eval reward gain at least this, final KL (nats/sequence) at most ppo_max_kl."""
    ppo_max_kl: float = 15.0

    lora_target_modules: tuple[str, ...] | None = None
    """None lets peft pick the usual attention projections for the architecture."""
    tiny_model: dict = field(default_factory=dict)
    """Sizes of the locally built base when `base_model == "tiny"`."""

    def replace(self, **changes) -> "Profile":
        """A copy with some fields changed (e.g. a smaller `ppo_steps` in a quick test)."""
        return dataclasses.replace(self, **changes)


PROFILES: dict[str, Profile] = {
    "tiny": Profile(
        name="tiny",
        base_model=TINY_BASE,
        dataset="offline",
        description="offline, CPU, minutes: tiny Llama-style base + shipped synthetic IMDB corpus",
        tiny_model=dict(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256),
    ),
    "gpt2-imdb": Profile(
        name="gpt2-imdb",
        base_model="gpt2",
        dataset="stanfordnlp/imdb",
        description="GPU: gpt2 + stanfordnlp/imdb from the Hub, sizes of the public gpt2-sentiment example",
        sft_max_length=256,
        sft_epochs=1.0,
        sft_batch_size=16,
        sft_learning_rate=5e-5,
        sft_max_train_examples=None,
        sft_eval_examples=500,
        sft_max_perplexity=40.0,
        reward_max_length=256,
        reward_epochs=1.0,
        reward_batch_size=16,
        reward_learning_rate=1e-4,
        reward_train_pairs=10000,
        reward_eval_pairs=1000,
        reward_min_accuracy=0.85,
        reward_min_prefix_accuracy=0.70,
        ppo_steps=194,
        ppo_batch_size=128,
        ppo_mini_batch_size=128,
        ppo_epochs=4,
        ppo_learning_rate=1.41e-5,
        ppo_init_kl_coef=0.2,
        ppo_target_kl=6.0,
        ppo_kl_horizon=10000.0,
        ppo_prompt_tokens=(2, 8),
        ppo_max_new_tokens=16,
        ppo_eval_prompts=16,
        ppo_min_reward_gain=1.0,
        ppo_max_kl=15.0,
    ),
}


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # torch is a dependency, but a broken CUDA install must not stop the CPU path
        return False


def resolve_profile(name: str | None = None, *, verbose: bool = True) -> Profile:
    """Return the profile named `name`, else `$MARL_PROFILE`, else the default for this machine."""
    reason = "given explicitly"
    if not name:
        name = os.environ.get("MARL_PROFILE") or None
        reason = "from MARL_PROFILE"
    if not name:
        name = "gpt2-imdb" if _cuda_available() else "tiny"
        reason = "default: CUDA is available" if name == "gpt2-imdb" else "default: no CUDA on this machine"
    if name not in PROFILES:
        raise MarlInputError(
            f"unknown profile {name!r}; choose one of {sorted(PROFILES)} "
            "(via --profile or the MARL_PROFILE environment variable)"
        )
    profile = PROFILES[name]
    if verbose:
        print(f"profile: {profile.name} ({reason}) - {profile.description}")
    return profile
