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
"""`base_model` value meaning: build the tiny Llama-style base locally (see `marl_utils.data.tiny_base`)."""


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
    """Tokens per training review; longer reviews are cut."""
    sft_epochs: float = 1.0
    """Fewest passes over the training reviews (more when `sft_token_budget` asks for them)."""
    sft_token_budget: int | None = 250_000
    """Training tokens SFT should see: epochs = budget / tokens in the data, between `sft_epochs` and
    `sft_max_epochs`. The shipped corpus has ~290k tokens (one epoch, as always); 1,000 short sentences
    (~15k tokens) get several. None: always `sft_epochs`."""
    sft_max_epochs: float = 8.0
    """Most passes the token budget may ask for (a small dataset read 50 times is learnt by heart)."""
    sft_max_steps: int = -1
    sft_batch_size: int = 16
    """Reviews per optimizer step."""
    sft_learning_rate: float = 2e-3
    """Peak AdamW learning rate of SFT (full fine-tuning of the base)."""
    sft_max_train_examples: int | None = None
    sft_eval_examples: int = 200
    """Held-out reviews for the perplexity before and after SFT (the same texts both times)."""
    sft_max_perplexity: float = 4.0
    """Bar of notebook 01: held-out perplexity after SFT must be below it."""
    sft_min_perplexity_drop: float = 0.1
    """Bar of notebook 01: perplexity after / before must be below it. A base trained from scratch starts
    near the vocabulary size (~1,900 here), so SFT must cut it at least 10x."""
    sft_no_learning_ratio: float = 0.5
    """If perplexity after / before is above this, stage 1 says it learned almost nothing (and why) at its
    end and in summary.json. Unlike the bar above, meant to hold for any dataset."""

    # Stage 2: reward adapter
    reward_max_length: int = 128
    reward_prefix_tokens: tuple[int, ...] = (12, 24, 32)
    """Prefix lengths of the truncated pairs added to training: PPO scores short texts."""
    reward_eval_prefix_tokens: int = 24
    reward_lora_r: int = 16
    """Rank of the reward adapter's LoRA matrices."""
    reward_lora_alpha: int = 32
    reward_lora_embeddings: bool = True
    """Also give the input embeddings a LoRA in the reward adapter (besides every linear layer). A base trained
    from scratch on little text has word vectors that barely encode sentiment ("dull" and "superb" follow the
    same words), and LoRA on the linear layers alone cannot move them: on data/short_reviews.csv, held-out
    accuracy 0.49 without, 0.79 with. A pretrained base (gpt2) does not need it."""
    reward_epochs: float = 1.0
    """Fewest passes over the training pairs (more when `reward_pair_budget` asks for them)."""
    reward_pair_budget: int | None = 4000
    """Pairs (full-review and prefix pairs together) the reward adapter should see: epochs = budget / pairs
    in the data, between `reward_epochs` and `reward_max_epochs`. The shipped corpus gives 2,000 + 2,000
    pairs (one epoch, as always); 1,000 short sentences give 400 + 400. None: always `reward_epochs`."""
    reward_max_epochs: float = 10.0
    """Most passes the pair budget may ask for."""
    reward_max_steps: int = -1
    reward_batch_size: int = 16
    """Preference pairs (chosen, rejected) per optimizer step."""
    reward_learning_rate: float = 3e-3
    """Peak AdamW learning rate of the reward adapter and its score head."""
    reward_train_pairs: int = 2000
    """Full-review preference pairs (a positive review chosen over a negative one) to train on."""
    reward_eval_pairs: int = 400
    """Held-out pairs for the accuracy after training and for the untrained baseline (the same pairs)."""
    reward_min_accuracy: float = 0.95
    """Bar of notebook 02: held-out pair accuracy on full reviews."""
    reward_min_prefix_accuracy: float = 0.85
    """Bar of notebook 02: held-out pair accuracy on `reward_eval_prefix_tokens`-token prefixes."""
    reward_no_learning_accuracy: float = 0.55
    """If held-out pair accuracy is below this (chance is 0.5), stage 2 says it learned almost nothing (and
    why) at its end and in summary.json; meant to hold for any dataset."""

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
    ppo_min_response_tokens: int = 15
    """PPOConfig.min_response_tokens: shorter responses get the short-response penalty (the anti-collapse
    guard). Tiny: 3/4 of the 20 new tokens. Capped at `ppo_max_new_tokens` when a test shrinks that."""
    ppo_value_head_learning_rate: float | None = None
    """PPOConfig.value_head_learning_rate (the value head's own Adam group); None = `ppo_learning_rate`."""
    ppo_min_reward_gain: float = 1.25
    """Bars notebook 03 asserts: eval reward gain at least this, final KL (nats per response) at most ppo_max_kl. (tiny:
    +2.01 with notebook 03's own 2,000 prompts; with the prompt pool of build_ppo_parts the notebook measured
    +1.57 and the same settings in scripts/kl_role.py +1.34, so 1.5 left no room)"""
    ppo_max_kl: float = 15.0
    ppo_min_kl: float = 1.0
    """... and at least this (notebooks 03-05): a `reference()` that stopped disabling the adapters would make the
    "reference" the policy itself, KL exactly 0, and every other check would still pass."""
    ppo_quantized_min_reward_gain: float = 0.75
    """Bars of notebook 04 for the 8-bit and the 4-bit base: eval reward gain at least this, ... (tiny, measured
    on the 2-core machine: +1.70 8-bit, +1.61 4-bit with notebook 04's own 2,000 prompts; +1.36 8-bit, +0.96
    4-bit with the prompt pool of build_ppo_parts that notebooks 03-07 share: one run each, so the spread
    between prompt samples is that large; bitsandbytes' CPU kernels also differ between CPUs. Still above
    ppo_no_learning_gain, as the gpt2-imdb bar)"""
    ppo_quantized_max_kl: float = 20.0
    """... and final KL (nats per response) at most this (quantization noise makes the policy drift further)."""
    ppo_multi_min_gain: float = 1.0
    """Bars of notebook 05: the policy trained on +score gains at least this much eval score, ..."""
    ppo_multi_max_neg_change: float = -0.5
    """... the policy trained on -score changes its eval score by at most this (pushing down is harder here), ..."""
    ppo_multi_min_separation: float = 2.5
    """... and after training the two policies' eval scores are at least this far apart."""
    ppo_no_learning_gain: float = 0.5
    """If the eval reward gain is below this, stage 3 says it learned almost nothing (and why) at its end and
    in summary.json; meant to hold for any dataset."""

    # Notebook 06: three critics side by side (shared head, critic adapter, critic from the reward adapter)
    critic_ppo_steps: int = 30
    """PPO steps of each of the three runs of notebook 06 (and scripts/critic_seeds.py): three runs must fit
    the notebook's CI budget of 4 minutes on 2 cores."""
    critic_window: int = 10
    """Steps averaged for the "first" and "last" value loss and explained variance of notebook 06."""
    critic_min_reward_gain: float = 0.75
    """Bar of notebook 06: every critic's eval reward gain is at least this (tiny, 3 seeds x 30 steps on the shared
    prompts, `scripts/critic_seeds.py`: shared head 0.98 to 1.39, the critic adapters 1.17 to 1.82), ..."""
    critic_max_kl: float = 20.0
    """... its final KL (nats per response) at most this (tiny: 8.2 to 15.3, the shared head highest), ..."""
    critic_min_early_ev_lead: float = 0.15
    """... and over the first `critic_window` steps, the critic started from the reward adapter explains at least
    this much more of the returns' variance than the fresh critic adapter: it already knows what scores well
    (tiny, 3 seeds: 0.32 to 0.43 more)."""
    critic_max_memory_share: float = 0.25
    """Bar of notebook 06: a critic adapter (LoRA + value head) adds at most this share of the base's bytes. The
    tiny base has ~0.8M weights, so the copied critic, shaped like the reward adapter (r=16 on every linear
    layer and the input embeddings), is 18% of it (a fresh one, r=16 on q/v: 3%); on gpt2 ~2%."""

    # Notebook 07 / `marl grpo`: TRL's GRPOTrainer and RLOOTrainer with the reward adapter on the same base. Their
    # sizes (rounds, completions per round, minibatch, completion length) are PPO's, so all three sample the
    # same number of tokens (marl_utils.grpo.trainers.grpo_settings).
    grpo_beta: float = 0.06
    """GRPO's weight of the per-token KL (k3) to the adapter-disabled base (tiny, 3 seeds: ~9.6 nats of KL, gain
    2.24 +- 0.20; 0.04 reached KL 15.1 on one stage set)."""
    rloo_beta: float = 0.1
    """RLOO's weight of the sequence KL (k1) in its reward (tiny: 7.2 nats, gain 2.08 +- 0.08; 0.15 held the
    KL near 6 nats and gained less)."""
    grpo_min_reward_gain: float = 1.0
    """Bar of notebook 07: GRPO's and RLOO's eval reward gain at least this. Tiny, on the prompts that PPO also uses
    (build_ppo_parts), one run from fresh stages: GRPO +1.28, RLOO +1.45, PPO +1.34 (KL 7.0 / 8.1 / 12.7); 3 seeds on
    the earlier, separate prompt pool gave 1.8 to 2.45."""
    grpo_max_kl: float = 15.0
    """... and their final KL to the reference (nats per sequence) at most this."""

    # Issue 21: does one base learn like separate models (scripts/parity.py), and over-optimisation (notebook 08)
    parity_ppo_steps: int = 12
    """PPO steps of each run of scripts/parity.py (6 layouts x 5 seeds = 30 runs). With the three fields below, a
    run is ~1/5 of `ppo_steps` x `ppo_batch_size`, so the sweep fits a shared 2-core machine; proxy and gold
    reward still clearly rise (tiny: see the README table)."""
    parity_batch_size: int = 32
    """Rollouts per PPO step in scripts/parity.py (every layout the same)."""
    parity_mini_batch_size: int = 8
    """Minibatch of scripts/parity.py: 4 minibatches x `ppo_epochs` Adam steps per PPO step, as many as the
    profile's own PPO takes (64 / 16), on half the rollouts."""
    parity_eval_prompts: int = 64
    """Held-out prompts of each run's evaluation before and after (proxy, gold, KL, distinct-2)."""

    # Notebook 08: over-optimisation. A reward adapter trained on few pairs is the proxy; PPO chases it on a loose
    # KL leash and on a tight one, watched by the gold reward (the corpus grammar's sentiment, tiny only).
    overopt_reward_pairs: int = 50
    """Preference pairs (plus their prefix pairs) the weak reward adapter of notebook 08 trains on."""
    overopt_ppo_steps: int = 40
    """PPO steps of each of notebook 08's two runs."""
    overopt_batch_size: int = 32
    """Rollouts per PPO step in notebook 08 (half the profile's batch: twice the steps in the same time)."""
    overopt_mini_batch_size: int = 8
    """Minibatch of notebook 08: as many Adam steps per PPO step as the profile's own PPO takes."""
    overopt_loose_kl_coef: float = 0.0
    """The loose leash: fixed KL coefficient (beta) of the run that over-optimises."""
    overopt_leash_kl_coef: float = 0.1
    """The leash: fixed KL coefficient of the second run (tiny, seed 0: it slowed the drift, sqrt(KL) 6.1 instead of
    8.2 after 40 steps, and still passed its gold peak; 0.3 held KL near 13 nats and nothing rose)."""
    overopt_window: int = 7
    """Steps of the centred mean drawn and used to find the gold peak (a step's mean of 32 rollouts is noisy)."""
    overopt_min_proxy_gain: float = 1.0
    """Bar of notebook 08: on the loose leash the (smoothed) proxy ends at least this far above where it started, ..."""
    overopt_min_gold_drop: float = 0.25
    """... while the (smoothed) gold reward ends at least this far below its own peak (tiny, seed 0: proxy +0.06 ->
    +2.11, gold -0.16 -> peak +0.62 at step 18 -> +0.10; the bars leave room for another CPU's rounding)."""

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
        description="GPU: gpt2 + stanfordnlp/imdb from the Hub, sizes of the public gpt2-sentiment example with "
                    "LoRA learning rates; runtime on a 16 GB T4: not yet measured",
        sft_max_length=256,
        sft_epochs=1.0,
        sft_token_budget=None,  # 25,000 reviews: one epoch is plenty for a pretrained base
        sft_batch_size=16,
        sft_learning_rate=5e-5,
        sft_max_train_examples=None,
        sft_eval_examples=500,
        sft_max_perplexity=40.0,
        # gpt2 already models English: one epoch of fine-tuning on IMDB lowers its perplexity by a fraction,
        # not 10x as for a base trained from scratch. An estimate until a GPU run measures it.
        sft_min_perplexity_drop=0.9,
        sft_no_learning_ratio=0.98,  # a pretrained base whose perplexity does not move at all learned nothing
        reward_max_length=256,
        reward_lora_embeddings=False,
        reward_epochs=1.0,
        reward_pair_budget=None,
        reward_batch_size=16,
        reward_learning_rate=1e-4,
        reward_train_pairs=10000,
        reward_eval_pairs=1000,
        reward_min_accuracy=0.85,
        reward_min_prefix_accuracy=0.70,
        # PPO. Batch, epochs and the KL controller from the gpt2-sentiment example (TRL 0.x, one V100).
        ppo_steps=194,
        ppo_batch_size=128,
        # Minibatch 32 (gpt2-sentiment: 128): 16 Adam steps per PPO step instead of 4, and "LoRA Without
        # Regret" (Schulman et al., Thinking Machines 2025) finds LoRA less tolerant of large batches than full
        # fine-tuning. Memory on a 16 GB T4, fp32, estimated: weights 124M x 4 B = 0.5 GB (one copy: reference
        # = adapters off, reward = an adapter); LoRA + value head + Adam ~10 MB; generation of 128 rollouts of
        # <= 8 + 16 tokens, KV cache 2 x 12 layers x 128 x 24 x 768 x 4 B = 0.23 GB; one training minibatch of
        # 32 x 24 tokens, activations ~34 x s x b x h bytes per layer in 16-bit (Korthikanti et al. 2022),
        # x2 in fp32 = 40 MB x 12 layers = 0.5 GB, logits 32 x 24 x 50257 x 4 B = 0.15 GB (x3 with log-softmax
        # and its gradient). About 2 GB in all: batch 128 in one minibatch would fit too (~5 GB).
        ppo_mini_batch_size=32,
        ppo_epochs=4,
        # gpt2-sentiment's 1.41e-5 is for FULL fine-tuning; "LoRA Without Regret" finds LoRA's best learning
        # rate ~10x full fine-tuning's in its sweeps (supervised and RL).
        ppo_learning_rate=1.41e-4,
        # The value head is a fresh Linear(768, 1) but needs no rate of its own: with 16 Adam steps per PPO
        # step at 1.41e-4, its output can move by ~0.1 per step, enough to track scores of a few units.
        ppo_value_head_learning_rate=None,
        ppo_init_kl_coef=0.2,
        ppo_target_kl=6.0,
        ppo_kl_horizon=10000.0,
        ppo_prompt_tokens=(2, 8),
        ppo_max_new_tokens=16,
        ppo_min_response_tokens=12,  # 3/4 of the 16 new tokens, as in tiny
        ppo_eval_prompts=128,  # 16 prompts give a mean score with a std of ~0.5: too noisy for a bar of 1.0
        # Bars of notebooks 03-05 for a pretrained gpt2 with a LoRA reward model: estimates until a GPU run
        # measures them (the score scale of our reward adapter on gpt2 has not been measured either).
        ppo_min_reward_gain=1.0,
        ppo_max_kl=15.0,
        ppo_quantized_min_reward_gain=0.75,
        ppo_quantized_max_kl=20.0,
        ppo_multi_min_gain=0.75,
        ppo_multi_max_neg_change=-0.5,
        ppo_multi_min_separation=1.5,
        ppo_no_learning_gain=0.25,
        # Notebook 06: estimates until a GPU run measures them. 3 x 100 steps of batch 128 (about 3 hours on a
        # T4, estimated from notebook 03's 194 steps). A fresh critic LoRA (r=16 on c_attn) is ~0.5% of gpt2, the
        # copy of the reward adapter (r=16 on every linear layer) ~1.9%.
        critic_ppo_steps=100,
        critic_window=10,
        critic_min_reward_gain=0.5,
        critic_max_kl=15.0,
        critic_min_early_ev_lead=0.05,
        critic_max_memory_share=0.03,
        # Notebook 07: estimates until a GPU run measures them (TRL's GRPO default beta was 0.04 before it became 0)
        grpo_beta=0.04,
        rloo_beta=0.05,
        grpo_min_reward_gain=1.0,
        grpo_max_kl=15.0,
        # an estimate: 100 steps of the profile's own batch, 30 runs of half notebook 03's run (~1.5 days on a T4)
        parity_ppo_steps=100,
        parity_batch_size=128,
        parity_mini_batch_size=32,
        parity_eval_prompts=128,
        # Notebook 08 needs the gold reward, which only the offline corpus has (on real IMDB nothing knows the true
        # sentiment): with this profile the notebook stops after its configuration cell, so the overopt_* fields
        # keep the tiny values.
    ),
}


def with_base_model(profile: Profile, base_model: str) -> Profile:
    """`profile` starting from another causal LM (`--base-model`): a local folder or a Hub id; sizes unchanged.

    A folder must hold a model saved with `save_pretrained`; a Hub id is checked when stage 1 loads it.
    """
    from pathlib import Path

    path = Path(base_model).expanduser()
    looks_like_path = path.is_absolute() or base_model.startswith((".", "~")) or base_model.count("/") > 1
    if path.is_dir():
        if not (path / "config.json").exists():
            raise MarlInputError(f"--base-model {base_model}: the folder has no config.json, so it is not a saved "
                                 "model; pass a folder written by save_pretrained (model and tokenizer) or a Hub id")
        base_model = str(path.resolve())
    elif path.exists() or looks_like_path:
        raise MarlInputError(f"--base-model {base_model}: no such model folder; pass a folder written by "
                             "save_pretrained (model and tokenizer) or a Hub id like gpt2")
    return profile.replace(base_model=base_model)


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
