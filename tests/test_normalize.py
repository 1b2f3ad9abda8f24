"""normalize: running moments against a closed form, gymnasium's wrappers and a naive loop of
SB3's VecNormalize reward scaling; non-finite rows skipped; vmapped against a loop."""

import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import vmap

from funcppo.core.normalize import (
    NORMALIZE_EPS,
    STATS_INIT_COUNT,
    init_reward_scale,
    init_running_stats,
    normalize_obs,
    scale_reward,
    update_reward_scale,
    update_running_stats,
)


def closed_form(rows: np.ndarray):
    """Moments of the rows pooled with the initial pseudo-sample (count c0, mean 0, var 1)."""
    c0, n = STATS_INIT_COUNT, rows.shape[0]
    mean = rows.sum(0) / (c0 + n)
    second = (c0 * 1.0 + np.square(rows).sum(0)) / (c0 + n)
    return mean, second - mean**2, c0 + n


def test_merging_batches_matches_the_pooled_closed_form():
    rng = np.random.default_rng(0)
    batches = [rng.normal(2.0, 3.0, size=(k, 3)) for k in (1, 5, 17, 2)]
    stats = init_running_stats((3,))
    for b in batches:
        stats = update_running_stats(stats, torch.from_numpy(b))
    mean, var, count = closed_form(np.concatenate(batches))
    np.testing.assert_allclose(stats.mean.numpy(), mean, rtol=1e-10)
    np.testing.assert_allclose(stats.var.numpy(), var, rtol=1e-9)
    assert float(stats.count) == pytest.approx(count)


def test_hand_worked_values():
    stats = update_running_stats(init_running_stats(()), torch.tensor([1.0, 3.0]))
    # delta = 2, total = 2.0001: mean = 2 * 2 / 2.0001, M2 = 1e-4 + 2 + 4 * 1e-4 * 2 / 2.0001
    assert float(stats.mean) == pytest.approx(4 / 2.0001, rel=1e-12)
    assert float(stats.var) == pytest.approx((1e-4 + 2 + 8e-4 / 2.0001) / 2.0001, rel=1e-12)
    z = normalize_obs(stats, torch.tensor(5.0, dtype=torch.float64))
    assert float(z) == pytest.approx((5 - 4 / 2.0001) / math.sqrt(float(stats.var) + 1e-8), 1e-6)


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    seed=st.integers(0, 2**31 - 1),
)
def test_any_split_gives_the_same_moments(sizes, seed):
    rows = torch.from_numpy(np.random.default_rng(seed).normal(size=(sum(sizes), 2)) * 5)
    whole = update_running_stats(init_running_stats((2,)), rows)
    parts = init_running_stats((2,))
    for chunk in rows.split(sizes):
        parts = update_running_stats(parts, chunk)
    torch.testing.assert_close(parts.mean, whole.mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(parts.var, whole.var, rtol=1e-9, atol=1e-12)
    assert bool((parts.var >= 0).all())


class Scripted(gym.Env):
    """Emits the given observations and rewards, never terminates."""

    def __init__(self, obs, rewards):
        self.obs, self.rewards, self.t = obs, rewards, 0
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, obs.shape[1:], np.float64)
        self.action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self.obs[0], {}

    def step(self, action):
        self.t += 1
        return self.obs[self.t], float(self.rewards[self.t - 1]), False, False, {}


def test_obs_normalisation_matches_gymnasium_normalize_observation():
    rng = np.random.default_rng(1)
    obs = rng.normal(1.0, 4.0, size=(40, 3))
    env = gym.wrappers.NormalizeObservation(Scripted(obs, np.zeros(40)))
    got = [env.reset()[0]] + [env.step(0)[0] for _ in range(39)]
    stats, ours = init_running_stats((3,)), []
    for row in torch.from_numpy(obs).float():
        stats = update_running_stats(stats, row[None])
        ours.append(normalize_obs(stats, row[None])[0])
    np.testing.assert_allclose(torch.stack(ours).numpy(), np.stack(got), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.var.numpy(), env.obs_rms.var, rtol=1e-6)


def test_reward_scaling_matches_gymnasium_normalize_reward_without_episode_ends():
    rng = np.random.default_rng(2)
    rewards = rng.normal(0.5, 2.0, size=60)
    env = gym.wrappers.NormalizeReward(Scripted(np.zeros((61, 1)), rewards), gamma=0.9)
    env.reset()
    got = [env.step(0)[1] for _ in range(60)]
    state, ours = init_reward_scale(1), []
    for r in torch.from_numpy(rewards):
        state = update_reward_scale(state, r[None], torch.tensor([False]), 0.9)
        ours.append(float(scale_reward(state, r[None])[0]))
    np.testing.assert_allclose(ours, got, rtol=1e-10)


def test_reward_scaling_matches_a_naive_vecnormalize_loop_with_resets():
    rng = np.random.default_rng(3)
    steps, envs, gamma, clip = 30, 3, 0.95, 2.0
    rewards = rng.normal(0.0, 3.0, size=(steps, envs))
    dones = rng.random((steps, envs)) < 0.15
    # SB3 VecNormalize, written out: returns = returns * gamma + r; update; scale; reset on done.
    returns, seen, expected = np.zeros(envs), [], []
    for t in range(steps):
        returns = returns * gamma + rewards[t]
        seen.extend(returns.tolist())
        _, var, _ = closed_form(np.array(seen))
        expected.append(np.clip(rewards[t] / np.sqrt(var + NORMALIZE_EPS), -clip, clip))
        returns[dones[t]] = 0.0
    state, ours = init_reward_scale(envs), []
    for t in range(steps):
        r = torch.from_numpy(rewards[t])
        state = update_reward_scale(state, r, torch.from_numpy(dones[t]), gamma)
        ours.append(scale_reward(state, r, clip).numpy())
    np.testing.assert_allclose(np.stack(ours), np.stack(expected), rtol=1e-9)


def test_non_finite_rows_and_weightless_rows_stay_out_and_pass_through():
    rows = torch.tensor([[1.0, 2.0], [math.nan, 0.0], [3.0, math.inf], [5.0, 6.0], [7.0, 8.0]])
    weight = torch.tensor([True, True, True, True, False])
    stats = update_running_stats(init_running_stats((2,)), rows, weight)
    clean = update_running_stats(init_running_stats((2,)), rows[[0, 3]])
    assert torch.equal(stats.mean, clean.mean) and torch.equal(stats.var, clean.var)
    assert float(stats.count) == float(clean.count)
    out = normalize_obs(stats, rows, clip=1.0)
    assert math.isnan(out[1, 0]) and out[2, 1] == math.inf and bool((out[[0, 3]].abs() <= 1).all())
    # No finite row: nothing changes.
    none = update_running_stats(stats, torch.full((2, 2), math.nan))
    assert torch.equal(none.mean, stats.mean) and torch.equal(none.var, stats.var)

    state = init_reward_scale(3)
    r = torch.tensor([1.0, math.nan, -math.inf])
    state = update_reward_scale(state, r, torch.tensor([False, False, False]), 0.99)
    assert state.returns.tolist()[1:] == [0.0, 0.0] and float(state.stats.count) == pytest.approx(
        1 + STATS_INIT_COUNT
    )
    scaled = scale_reward(state, r, clip=5.0)
    assert math.isnan(scaled[1]) and scaled[2] == -math.inf


def test_vmapped_over_seeds_matches_a_loop():
    rows = torch.randn(3, 6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    stats = vmap(lambda _: init_running_stats((2,)))(torch.zeros(3))
    batched = vmap(update_running_stats)(stats, rows)
    for i in range(3):
        one = update_running_stats(init_running_stats((2,)), rows[i])
        torch.testing.assert_close(batched.mean[i], one.mean, rtol=0, atol=1e-15)
        torch.testing.assert_close(batched.var[i], one.var, rtol=0, atol=1e-15)


def test_wrong_shape_names_the_argument():
    with pytest.raises(ValueError, match=r"x: expected \[N, 3\] rows, got \(4, 2\)"):
        update_running_stats(init_running_stats((3,)), torch.zeros(4, 2))
