"""Tests for funcppo.envs: the protocol helpers, the registry and CartPole against gymnasium."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import optree
import pytest
import torch
from gymnasium.envs.classic_control.cartpole import CartPoleEnv
from hypothesis import given, settings
from hypothesis import strategies as st

from funcppo.core import random
from funcppo.envs import (
    CARTPOLE_SPEC,
    ENVS,
    CartPole,
    CartPoleState,
    Env,
    StepResult,
    full_masks,
    make_env,
    where_done,
)
from funcppo.envs.cartpole import MAX_STEPS, cartpole_dynamics, cartpole_terminated
from funcppo.envs.lifecycle_spec import lifecycle_spec

SETTINGS = settings(max_examples=50, deadline=None)
# Box the random test states are drawn from: (x, x_dot, theta, theta_dot), past both thresholds.
STATE_BOX = torch.tensor([2.6, 3.0, 0.25, 3.5])


def random_states(seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (2.0 * torch.rand(n, 4, generator=g) - 1.0) * STATE_BOX


GYM_ENV = CartPoleEnv()
GYM_ENV.reset(seed=0)


def gym_step(state: torch.Tensor, action: int):
    """Reference: gymnasium's own step from ``state`` (float32 [4]) in float64."""
    env = GYM_ENV
    env.state, env.steps_beyond_terminated = state.double().numpy().copy(), None
    obs, reward, terminated, _, _ = env.step(action)
    return torch.from_numpy(np.asarray(env.state)), torch.from_numpy(obs), reward, terminated


def act(a: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"action": a}


def state_of(physics: torch.Tensor, steps: int = 0) -> CartPoleState:
    return CartPoleState(physics, torch.full((physics.shape[0],), steps, dtype=torch.int64))


def policy_bits(key: torch.Tensor, n: int) -> torch.Tensor:
    return random.bits(key, (n,)) & 1


def balance(physics: torch.Tensor) -> torch.Tensor:
    """A linear controller that keeps the pole up for 500 steps: push toward the fall."""
    x, x_dot, theta, theta_dot = physics.unbind(-1)
    return (theta + 0.5 * theta_dot + 0.01 * x + 0.1 * x_dot > 0).long()


def test_step_matches_gymnasium_batch():
    # float32 state already matches gymnasium's float64 step to ~2e-7, hence STATE_DTYPE.
    n = 400
    physics = random_states(0, n)
    actions = torch.arange(n) % 2
    out = CartPole(n).step(state_of(physics), act(actions), random.key(0))
    for i in range(n):
        ref_state, ref_obs, reward, terminated = gym_step(physics[i], int(actions[i]))
        torch.testing.assert_close(out.final_obs[i].double(), ref_state, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.final_obs[i], ref_obs, rtol=0, atol=1e-6)
        assert out.reward[i].item() == reward == 1.0
        assert out.terminated[i].item() == terminated
        if not terminated:
            torch.testing.assert_close(out.obs[i], ref_obs, rtol=0, atol=1e-6)
    assert 0 < out.terminated.sum() < n


@SETTINGS
@given(
    st.lists(st.floats(-1.0, 1.0), min_size=4, max_size=4),
    st.integers(0, 1),
)
def test_step_matches_gymnasium_property(unit, action):
    physics = (torch.tensor(unit, dtype=torch.float32) * STATE_BOX).unsqueeze(0)
    out = CartPole(1).step(state_of(physics), act(torch.tensor([action])), random.key(1))
    ref_state, _, reward, terminated = gym_step(physics[0], action)
    torch.testing.assert_close(out.final_obs[0].double(), ref_state, rtol=0, atol=1e-6)
    assert out.terminated[0].item() == terminated
    assert out.reward[0].item() == reward


def test_dynamics_hand_worked():
    # theta = 0: sin = 0, cos = 1, so temp = F / 1.1 = +-100/11,
    # theta_acc = -temp / (0.5 (4/3 - 0.1/1.1)) = -temp * 66/41 = -+600/41,
    # x_acc = temp - 0.05 theta_acc / 1.1 = +-400/41. Velocities change by tau * acc.
    physics = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, 1.0, 0.0, 2.0]], dtype=torch.float64)
    nxt = cartpole_dynamics(physics, torch.tensor([1, 0]))
    expected = torch.tensor(
        [
            [0.0, 8 / 41, 0.0, -12 / 41],
            [0.5 + 0.02 * 1.0, 1.0 - 8 / 41, 0.0 + 0.02 * 2.0, 2.0 + 12 / 41],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(nxt, expected, rtol=0, atol=1e-12)


def test_terminated_thresholds():
    theta_max = 12 * 2 * math.pi / 360
    # Rows: (state before, ends?) -- termination is judged on the state after the step.
    cases = [
        ([2.39, 1.0, 0.0, 0.0], True),  # x' = 2.41
        ([-2.39, -1.0, 0.0, 0.0], True),
        ([2.39, 0.0, 0.0, 0.0], False),  # x' = 2.39
        ([0.0, 0.0, 0.2, 0.5], True),  # theta' = 0.21 > 0.2094
        ([0.0, 0.0, -0.2, -0.5], True),
        ([0.0, 0.0, 0.2, 0.0], False),  # theta' = 0.2
    ]
    physics = torch.tensor([c for c, _ in cases])
    out = CartPole(len(cases)).step(
        state_of(physics, 7), act(torch.ones(6, dtype=torch.int64)), random.key(2)
    )
    assert out.terminated.tolist() == [e for _, e in cases]
    assert not out.truncated.any()
    assert out.reward.tolist() == [1.0] * 6
    done = out.terminated.unsqueeze(-1)
    # Done envs restart: fresh obs in the init box, counter 0; final_obs keeps the last state.
    assert torch.where(done, out.obs.abs() <= 0.05, True).all()
    assert out.env_state.steps.tolist() == [0 if e else 8 for _, e in cases]
    torch.testing.assert_close(
        out.final_obs, cartpole_dynamics(physics, torch.ones(6, dtype=torch.int64))
    )
    torch.testing.assert_close(torch.where(done, out.final_obs, out.obs), out.final_obs)
    edge = torch.tensor([[2.4, 0.0, theta_max - 1e-4, 0.0], [2.4001, 0.0, 0.0, 0.0]])
    assert cartpole_terminated(edge).tolist() == [False, True]


def test_truncation_at_500_with_final_obs_and_auto_reset():
    assert gym.spec("CartPole-v1").max_episode_steps == MAX_STEPS == CartPole(1).max_steps
    env = CartPole(4)
    state = env.reset(random.key(3)).env_state
    for t in range(MAX_STEPS):
        prev = state.physics
        out = env.step(state, act(balance(prev)), random.fold_in(random.key(4), t))
        state = out.env_state
        assert not out.terminated.any()
        assert out.truncated.all() == (t == MAX_STEPS - 1)
    torch.testing.assert_close(out.final_obs, cartpole_dynamics(prev, balance(prev)))
    fresh = env.reset(random.fold_in(random.key(4), MAX_STEPS - 1))
    torch.testing.assert_close(out.obs, fresh.obs, rtol=0, atol=0)
    assert out.env_state.steps.tolist() == [0] * 4
    assert not torch.equal(out.obs, out.final_obs)

    # gymnasium's TimeLimit truncates the same controller at the same step.
    genv = gym.make("CartPole-v1")
    obs, _ = genv.reset(seed=0)
    for t in range(MAX_STEPS):
        obs, _, terminated, truncated, _ = genv.step(int(balance(torch.from_numpy(obs))))
        assert not terminated
        assert truncated == (t == MAX_STEPS - 1)


def rollout(env, key, steps):
    """Random-policy rollout; returns stacked (obs, reward, terminated, truncated, final_obs)."""
    reset_key, loop_key = random.split(key)
    res = env.reset(reset_key)
    state, trace = res.env_state, []
    for t in range(steps):
        k_act, k_step = random.split(random.fold_in(loop_key, t))
        out = env.step(state, act(policy_bits(k_act, env.num_envs)), k_step)
        state = out.env_state
        trace.append(
            torch.cat([out.obs, out.final_obs, out.terminated[:, None], out.truncated[:, None]], -1)
        )
    return torch.stack(trace)


def test_same_key_same_trajectory():
    env = CartPole(8, max_steps=20)
    a = rollout(env, random.key(5), 60)
    b = rollout(env, random.key(5), 60)
    c = rollout(env, random.key(6), 60)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a[..., -2].sum() > 0 and a[..., -1].sum() > 0  # both kinds of reset happened


def test_vmap_over_seeds_equals_loop(device):
    env = CartPole(5, max_steps=6)
    keys = torch.stack([random.key(s, device) for s in (7, 8, 9)])
    res = torch.func.vmap(env.reset)(keys)
    assert res.obs.shape == (3, 5, 4) and res.masks["action"].shape == (3, 5, 2)
    states = res.env_state
    loop_states = [env.reset(k).env_state for k in keys]
    vstep, truncations = torch.func.vmap(env.step), 0
    for t in range(10):
        step_keys = torch.stack([random.fold_in(k, t) for k in keys])
        actions = torch.stack([policy_bits(k, 5) for k in step_keys])
        out = vstep(states, act(actions), step_keys)
        states = out.env_state
        for s in range(3):
            ref = env.step(loop_states[s], act(actions[s]), step_keys[s])
            loop_states[s] = ref.env_state
            for got, want in zip(optree.tree_leaves(out), optree.tree_leaves(ref), strict=True):
                torch.testing.assert_close(got[s], want, rtol=0, atol=0)
        truncations += out.truncated.sum()
    assert torch.equal(states.steps, torch.stack([s.steps for s in loop_states]))
    assert truncations > 0


@pytest.mark.slow
def test_compile_step_equals_eager():
    env = CartPole(6)
    physics = random_states(10, 6)
    state = CartPoleState(physics, torch.tensor([0, 3, 498, 499, 10, 100]))
    actions = act(torch.tensor([0, 1, 1, 0, 1, 0]))
    torch._dynamo.reset()
    compiled = torch.compile(env.step, fullgraph=True)
    got, want = compiled(state, actions, random.key(11)), env.step(state, actions, random.key(11))
    assert isinstance(got, StepResult)
    for name in ("obs", "reward", "final_obs"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=1e-6)
    torch.testing.assert_close(got.env_state.physics, want.env_state.physics, rtol=0, atol=1e-6)
    for name in ("terminated", "truncated"):
        assert torch.equal(getattr(got, name), getattr(want, name))
    assert torch.equal(got.env_state.steps, want.env_state.steps)
    assert torch.equal(got.masks["action"], want.masks["action"])
    assert want.truncated[3] and (want.terminated | want.truncated).any()


def test_partial_obs_is_x_theta_slice():
    full, part = CartPole(8), CartPole(8, partial=True)
    assert (full.obs_dim, part.obs_dim) == (4, 2)
    rf, rp = full.reset(random.key(12)), part.reset(random.key(12))
    torch.testing.assert_close(rp.obs, rf.obs[:, [0, 2]], rtol=0, atol=0)
    physics = random_states(13, 8)
    a = act(torch.arange(8) % 2)
    of = full.step(state_of(physics), a, random.key(14))
    op = part.step(state_of(physics), a, random.key(14))
    torch.testing.assert_close(op.obs, of.obs[:, [0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(op.final_obs, of.final_obs[:, [0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(op.env_state.physics, of.env_state.physics, rtol=0, atol=0)


def test_random_policy_episode_length_matches_gymnasium():
    env, steps = CartPole(16), 1000
    lengths, running = [], torch.zeros(16, dtype=torch.int64)
    state = env.reset(random.key(15)).env_state
    for t in range(steps):
        k_act, k_step = random.split(random.fold_in(random.key(16), t))
        out = env.step(state, act(policy_bits(k_act, 16)), k_step)
        state, running = out.env_state, running + 1
        done = out.terminated | out.truncated
        lengths += running[done].tolist()
        running = torch.where(done, 0, running)
    rng, genv, gym_lengths = np.random.default_rng(0), gym.make("CartPole-v1"), []
    genv.reset(seed=0)
    length = 0
    for _ in range(16 * steps):
        _, _, terminated, truncated, _ = genv.step(int(rng.integers(2)))
        length += 1
        if terminated or truncated:
            gym_lengths.append(length)
            genv.reset()
            length = 0
    ours, theirs = np.mean(lengths), np.mean(gym_lengths)
    # About 700 episodes each with std ~12: standard error ~0.45 per mean, so 2.5 is ~4 sigma.
    assert 15 < theirs < 30
    assert abs(ours - theirs) < 2.5, (ours, theirs)


@SETTINGS
@given(st.integers(0, 2**40), st.integers(1, 9))
def test_reset_draws_the_init_box(seed, n):
    res = CartPole(n).reset(random.key(seed))
    assert res.obs.shape == (n, 4) and res.obs.dtype == torch.float32
    assert (res.obs.abs() < 0.05).all()
    assert torch.equal(res.env_state.steps, torch.zeros(n, dtype=torch.int64))
    assert res.masks["action"].all() and res.masks["action"].shape == (n, 2)


def test_reset_is_uniform_on_init_box():
    # U(-0.05, 0.05): mean 0, variance 0.05^2 / 3; 4096 draws per column put the sample
    # mean within 0.003 (~7 standard errors) and the extremes within 0.002 of the bounds.
    obs = CartPole(4096).reset(random.key(17)).obs
    assert (obs.mean(0).abs() < 0.003).all()
    torch.testing.assert_close(obs.var(0), torch.full((4,), 0.05**2 / 3), rtol=0.1, atol=0)
    assert (obs.min(0).values < -0.048).all() and (obs.max(0).values > 0.048).all()


@SETTINGS
@given(st.integers(0, 2**20), st.integers(1, 6))
def test_where_done_matches_loop(seed, n):
    g = torch.Generator().manual_seed(seed)
    done = torch.rand(n, generator=g) < 0.5
    fresh = state_of(torch.randn(n, 4, generator=g), 0)
    cur = state_of(torch.randn(n, 4, generator=g), 5)
    got = where_done(done, fresh, cur)
    for i in range(n):
        src = fresh if done[i] else cur
        assert torch.equal(got.physics[i], src.physics[i])
        assert got.steps[i] == src.steps[i]


def test_full_masks_shapes():
    masks = full_masks(lifecycle_spec(3), 5)
    assert masks["slot"].shape == (5, 6, 3) and masks["op"].shape == (5, 6)
    assert all(m.dtype == torch.bool and m.all() for m in masks.values())


def test_registry_and_protocol():
    assert set(ENVS) >= {"cartpole", "cartpole-pomdp"}
    env, pomdp = make_env("cartpole", 3), make_env("cartpole-pomdp", 3)
    assert env == CartPole(3) and pomdp == CartPole(3, partial=True)
    assert hash(env) == hash(CartPole(3)) and isinstance(env, Env)
    assert env.spec == CARTPOLE_SPEC and env.spec.heads == (("action", 2),)
    with pytest.raises(ValueError, match=r"name: .*'cartpole'.*'cartpole-pomdp'.*got 'pong'"):
        make_env("pong", 3)
    with pytest.raises(ValueError, match="num_envs"):
        CartPole(0)


@pytest.mark.parametrize(
    "actions",
    [
        {"action": torch.zeros(3, dtype=torch.int32)},
        {"action": torch.zeros(4, dtype=torch.int64)},
        {"move": torch.zeros(3, dtype=torch.int64)},
    ],
)
def test_step_rejects_bad_actions(actions):
    env = CartPole(3)
    state = env.reset(random.key(0)).env_state
    with pytest.raises(ValueError, match="actions"):
        env.step(state, actions, random.key(1))
