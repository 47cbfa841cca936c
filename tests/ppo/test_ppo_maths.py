"""The PPO maths (marl_utils.ppo.maths), each formula against a slow obvious version (CleanRL style)."""

import math

import pytest
import torch

from marl_utils.infra.errors import MarlInputError
from marl_utils.ppo.config import PPOConfig
from marl_utils.ppo.maths import (AdaptiveKLController, FixedKLController, RunningMoments, compute_gae,
                                 compute_rewards, entropy_from_logits, explained_variance, kl_penalty,
                                 last_masked_index, logprobs_from_logits, masked_mean, masked_var, masked_whiten,
                                 policy_loss, value_loss)

torch.set_num_threads(1)


def padded_mask():
    """Left padding (prompt + pad masked) in row 0, right padding in row 1, a full row 2."""
    return torch.tensor([[0, 0, 0, 1, 1, 1, 1],
                         [0, 1, 1, 1, 0, 0, 0],
                         [1, 1, 1, 1, 1, 1, 1]], dtype=torch.float32)


def gae_loop(rewards, values, gamma, lam):
    """Textbook GAE on one episode, plain Python floats."""
    n = len(rewards)
    advantages = [0.0] * n
    last = 0.0
    for t in reversed(range(n)):
        next_value = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        advantages[t] = last
    return advantages


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_python_loop_under_padding(gamma, lam):
    g = torch.Generator().manual_seed(0)
    mask = padded_mask()
    rewards = torch.randn(mask.shape, generator=g) * mask
    values = torch.randn(mask.shape, generator=g)  # junk at padding must not leak in
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    for row in range(mask.shape[0]):
        keep = mask[row].bool()
        expected = gae_loop(rewards[row][keep].tolist(), values[row][keep].tolist(), gamma, lam)
        torch.testing.assert_close(advantages[row][keep], torch.tensor(expected), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(returns[row][keep], torch.tensor(expected) + values[row][keep])
        assert advantages[row][~keep].abs().sum() == 0 and returns[row][~keep].abs().sum() == 0


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    mask = padded_mask()
    rewards = torch.arange(21, dtype=torch.float32).reshape(3, 7) * mask
    values = torch.full(mask.shape, 0.5)
    advantages, returns = compute_gae(rewards, values, mask, 1.0, 1.0)
    to_go = (rewards.flip(-1).cumsum(-1).flip(-1)) * mask
    torch.testing.assert_close(returns, to_go)
    torch.testing.assert_close(advantages, (to_go - values) * mask)


def test_masked_mean_and_var_ignore_padding():
    mask = padded_mask()
    values = torch.randn(mask.shape)
    values_with_junk = values + 1000.0 * (1 - mask)
    kept = values[mask.bool()]
    torch.testing.assert_close(masked_mean(values_with_junk, mask), kept.mean())
    torch.testing.assert_close(masked_var(values_with_junk, mask), kept.var())
    torch.testing.assert_close(masked_var(values_with_junk, mask, unbiased=False), kept.var(unbiased=False))
    row_means = masked_mean(values_with_junk, mask, dim=1)
    for row in range(3):
        torch.testing.assert_close(row_means[row], values[row][mask[row].bool()].mean())


def test_masked_whiten_equals_unmasked_on_kept_values():
    mask = padded_mask()
    values = torch.randn(mask.shape) * 3 + 2 + 1000.0 * (1 - mask)
    kept = values[mask.bool()]
    whitened = masked_whiten(values, mask)
    expected = (kept - kept.mean()) / torch.sqrt(kept.var() + 1e-8)
    torch.testing.assert_close(whitened[mask.bool()], expected)
    assert whitened[~mask.bool()].abs().sum() == 0
    rescaled = masked_whiten(values, mask, shift_mean=False)
    torch.testing.assert_close(rescaled[mask.bool()], expected + kept.mean())


def test_logprobs_and_entropy_match_distribution():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, generator=g)
    labels = torch.randint(0, 5, (2, 3), generator=g)
    dist = torch.distributions.Categorical(logits=logits)
    torch.testing.assert_close(logprobs_from_logits(logits, labels), dist.log_prob(labels))
    torch.testing.assert_close(entropy_from_logits(logits), dist.entropy())


def test_kl_estimators_on_known_values():
    logprobs = torch.tensor([math.log(0.5), math.log(0.2)])
    ref_logprobs = torch.tensor([math.log(0.25), math.log(0.4)])
    # k1 = log(p/q); k3 = q/p - 1 - log(q/p) with q = ref, p = policy
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "k1"), torch.tensor([math.log(2), math.log(0.5)]))
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "k3"),
                               torch.tensor([0.5 - 1 - math.log(0.5), 2 - 1 - math.log(2)]))
    assert (kl_penalty(logprobs, ref_logprobs, "k3") >= 0).all()
    with pytest.raises(MarlInputError, match="k2"):
        kl_penalty(logprobs, ref_logprobs, "k2")


def test_kl_estimators_are_unbiased_for_the_true_kl():
    g = torch.Generator().manual_seed(2)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    samples = torch.multinomial(p, 200_000, replacement=True, generator=g)
    true_kl = (p * (p / q).log()).sum()
    for estimator in ["k1", "k3"]:
        estimate = kl_penalty(p.log()[samples], q.log()[samples], estimator).mean()
        assert abs(estimate - true_kl) < 0.01, estimator


def test_rewards_put_score_at_last_response_token_under_padding():
    mask = padded_mask()
    g = torch.Generator().manual_seed(3)
    logprobs, ref_logprobs = torch.randn(mask.shape, generator=g), torch.randn(mask.shape, generator=g)
    scores = torch.tensor([1.0, -2.0, 3.0])
    rewards, kl = compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, (logprobs - ref_logprobs) * mask)
    expected = -0.1 * kl
    for row, last in enumerate([6, 3, 6]):
        expected[row, last] += scores[row]
    torch.testing.assert_close(rewards, expected)
    assert rewards[~mask.bool()].abs().sum() == 0
    assert last_masked_index(mask).tolist() == [6, 3, 6]


def test_policy_loss_clips_and_stops_gradient():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    old = torch.zeros(1, 4)
    advantages = torch.tensor([[1.0, 1.0, -1.0, 5.0]])
    # token 0: ratio 1.5 > 1.2 with A > 0 -> clipped, no gradient; token 1: ratio 1.1 inside the range;
    # token 2: ratio 1.5 with A < 0 -> unclipped term is the max, gradient flows; token 3: padding.
    new = torch.log(torch.tensor([[1.5, 1.1, 1.5, 9.0]])).requires_grad_()
    loss, stats = policy_loss(new, old, advantages, mask, cliprange=0.2)
    loss.backward()
    ratio = torch.tensor([1.5, 1.1, 1.5])
    expected = torch.tensor([-1.0 * 1.2, -1.0 * 1.1, 1.0 * 1.5]).mean()
    torch.testing.assert_close(loss, expected)
    assert new.grad[0, 0] == 0 and new.grad[0, 3] == 0
    torch.testing.assert_close(new.grad[0, 1], -ratio[1] / 3)
    torch.testing.assert_close(new.grad[0, 2], ratio[2] / 3)
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(1 / 3))
    expected_kl = ((ratio - 1) - ratio.log()).mean()
    torch.testing.assert_close(stats["approxkl"], expected_kl)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    mask = padded_mask()
    advantages = torch.randn(mask.shape)
    logprobs = torch.randn(mask.shape)
    loss, stats = policy_loss(logprobs, logprobs, advantages, mask, 0.2)
    torch.testing.assert_close(loss, -masked_mean(advantages, mask))
    assert stats["approxkl"] == 0 and stats["clipfrac"] == 0


def test_value_loss_clipping():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    old = torch.zeros(1, 4)
    returns = torch.tensor([[1.0, -1.0, 0.1, 0.0]])
    # value 0: moved to 0.5 towards return 1 -> clipped at 0.2, error 0.64 > 0.25: clipped term, no gradient
    # value 1: moved to 0.5 away from return -1 -> unclipped error 2.25 > clipped 1.44: gradient flows
    # value 2: inside the range; value 3: padding
    new = torch.tensor([[0.5, 0.5, 0.1, 7.0]], requires_grad=True)
    loss, stats = value_loss(new, old, returns, mask, cliprange_value=0.2)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(0.5 * (0.64 + 2.25 + 0.0) / 3))
    assert new.grad[0, 0] == 0 and new.grad[0, 3] == 0
    torch.testing.assert_close(new.grad[0, 1], torch.tensor(0.5 * 2 * 1.5 / 3))
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(1 / 3))


def test_explained_variance():
    mask = padded_mask()
    returns = torch.randn(mask.shape)
    torch.testing.assert_close(explained_variance(returns, returns, mask), torch.tensor(1.0))
    constant = torch.full(mask.shape, 3.0)
    torch.testing.assert_close(explained_variance(constant, returns, mask), torch.tensor(0.0), atol=1e-5, rtol=0)


def test_running_moments_equal_moments_of_everything_seen():
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(n, generator=g) * 3 + 1 for n in (5, 1, 12)]
    moments = RunningMoments()
    for batch in batches:
        moments.update(batch)
    everything = torch.cat(batches)
    assert moments.count == 18
    assert moments.mean == pytest.approx(everything.mean().item(), abs=1e-5)
    assert moments.std == pytest.approx(everything.std(unbiased=False).item(), abs=1e-5)
    copy = RunningMoments()
    copy.load_state_dict(moments.state_dict())
    assert copy.state_dict() == moments.state_dict()


def test_adaptive_kl_controller_moves_beta_towards_target():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=1000)
    ctl.update(12.0, n_steps=100)  # KL too high: error clipped at +0.2
    torch.testing.assert_close(ctl.value, 0.2 * (1 + 0.2 * 100 / 1000))
    high = ctl.value
    ctl.update(3.0, n_steps=100)  # KL too low: beta shrinks
    assert ctl.value < high
    copy = AdaptiveKLController(1.0, 1.0, 1.0)
    copy.load_state_dict(ctl.state_dict())
    assert (copy.value, copy.target, copy.horizon) == (ctl.value, 6.0, 1000.0)
    fixed = FixedKLController(0.3)
    fixed.update(100.0, 100)
    assert fixed.value == 0.3


def test_config_batch_size_must_be_whole_minibatches():
    with pytest.raises(MarlInputError, match=r"batch_size=10.*2 \* 2 = 4.*batch_size=8 or 12"):
        PPOConfig(batch_size=10, mini_batch_size=2, gradient_accumulation_steps=2)
    PPOConfig(batch_size=8, mini_batch_size=2, gradient_accumulation_steps=2)


@pytest.mark.parametrize("field,value,message", [
    ("mini_batch_size", 0, "mini_batch_size=0 must be a positive integer"),
    ("kl_estimator", "k2", "kl_estimator='k2' is unknown"),
    ("temperature", 0.0, "temperature=0.0 must be a positive number"),
    ("lam", 1.5, r"lam=1.5 must be in \[0, 1\]"),
    ("min_response_tokens", 40, "min_response_tokens=40 must be an integer in"),
    ("max_grad_norm", -1.0, "max_grad_norm=-1.0 must be a positive number or None"),
])
def test_config_rejects_bad_values(field, value, message):
    kwargs = dict(batch_size=4, mini_batch_size=4, max_new_tokens=16)
    kwargs[field] = value
    with pytest.raises(MarlInputError, match=message):
        PPOConfig(**kwargs)


def test_config_score_shaping_is_off_by_default():
    config = PPOConfig()
    assert config.min_response_tokens == 0 and config.missing_eos_penalty is None and config.score_clip is None
    assert not config.normalize_scores and not config.whiten_rewards
