"""Profiles shrunk for tests: SMALL trains stages 1-2 in seconds, TOY adds a two-step PPO stage."""

from marl_utils.infra.profiles import PROFILES

SMALL = PROFILES["tiny"].replace(
    sft_max_steps=12, sft_learning_rate=1e-2, sft_batch_size=8, sft_max_train_examples=200, sft_eval_examples=16, sft_max_length=64,
    reward_max_steps=6, reward_batch_size=8, reward_train_pairs=40, reward_eval_pairs=16, reward_max_length=64,
    tiny_model=dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128),
)

TOY = SMALL.replace(ppo_steps=2, ppo_batch_size=4, ppo_mini_batch_size=2, ppo_epochs=1, ppo_max_new_tokens=6,
                    ppo_eval_prompts=4, ppo_prompt_tokens=(2, 4))

# A first notebook cell that shrinks the tiny profile in the kernel (the widget test, the site build's test): the
# notebooks' own code path at seconds per stage instead of minutes.
SHRUNK_TINY_CELL = """
import marl_utils.infra.profiles as _profiles
_profiles.PROFILES["tiny"] = _profiles.PROFILES["tiny"].replace(
    sft_max_steps=4, sft_batch_size=8, sft_max_train_examples=64, sft_eval_examples=8, sft_max_length=48,
    reward_max_steps=3, reward_batch_size=8, reward_train_pairs=24, reward_eval_pairs=8, reward_max_length=48,
    ppo_steps=2, critic_ppo_steps=2, critic_window=1, ppo_batch_size=8, ppo_mini_batch_size=4, ppo_epochs=1,
    ppo_eval_prompts=8, ppo_max_new_tokens=6, ppo_min_response_tokens=3, ppo_save_every=100,
    tiny_model=dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128))
"""
