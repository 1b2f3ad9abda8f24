"""make_evaluate: whole episodes under a trained policy, vmapped against a loop, compiled
against eager, and against the training loop's own episode bookkeeping."""

import optree
import pytest
import torch

from funcppo.accel.precompile import fingerprint
from funcppo.core import random as jr
from funcppo.core.config import PPOConfig
from funcppo.envs import make_env
from funcppo.training.evaluate import make_evaluate
from funcppo.training.state import init_train_state
from funcppo.training.train import TrainConfig, init_runner, make_env_step


def config(env_name: str = "cartpole", num_envs: int = 3, **ppo_changes) -> TrainConfig:
    env = make_env(env_name, num_envs)
    ppo = PPOConfig(
        obs_dim=env.obs_dim, spec=env.spec, compile=False, torso_sizes=(8, 8), **ppo_changes
    )
    return TrainConfig(env=env_name, ppo=ppo, num_envs=num_envs, num_steps=8, total_steps=64)


def test_first_episode_return_matches_the_training_loops_bookkeeping():
    # One env: the first episode's return is what the rollout's own counters hold when the
    # first episode has finished (a different code path: sums over finished episodes).
    cfg = config("lifecycle", num_envs=1)
    env = cfg.make_env()
    state = init_train_state(jr.key(4), cfg.ppo)
    key = jr.key(9)
    rs = init_runner(cfg, env, key)._replace(train=state)
    env_step = make_env_step(cfg, env)
    while float(rs.finished_count) == 0:
        rs, _ = env_step(state.params, rs)
    assert float(rs.finished_count) == 1
    got = make_evaluate(cfg)(state, key)
    assert got.shape == (1,)
    assert torch.allclose(got, rs.finished_return.reshape(1))


def test_cartpole_returns_are_episode_lengths_and_every_env_ends():
    cfg = config(num_envs=4)
    state = init_train_state(jr.key(0), cfg.ppo)
    returns = make_evaluate(cfg)(state, jr.key(1))
    # CartPole pays 1 per step, so a return is a whole number of steps in [1, 500].
    assert torch.equal(returns, returns.round())
    assert bool(((returns >= 1) & (returns <= 500)).all())
    assert torch.equal(returns, make_evaluate(cfg)(state, jr.key(1)))


def test_vmapped_seeds_match_a_loop_over_seeds(device):
    cfg = config("lifecycle")
    keys = jr.split(jr.key(2, device), 2)
    states = init_train_state(keys, cfg.ppo)
    eval_keys = jr.split(jr.key(3, device), 2)
    together = make_evaluate(cfg, num_seeds=2)(states, eval_keys)
    alone = make_evaluate(cfg)
    assert together.shape == (2, 3)
    for i in range(2):
        state_i = optree.tree_map(lambda x, i=i: x[i], states)
        assert torch.allclose(together[i], alone(state_i, eval_keys[i]), atol=1e-5)


@pytest.mark.slow
def test_compiled_matches_eager(device):
    cfg = config(num_envs=2)
    state = init_train_state(jr.key(5, device), cfg.ppo)
    eager = make_evaluate(cfg)(state, jr.key(6, device))
    compiled_cfg = cfg.replace(ppo=cfg.ppo.replace(compile=True))
    compiled = make_evaluate(compiled_cfg, backend="aot_eager")(state, jr.key(6, device))
    assert torch.equal(eager, compiled)


@pytest.mark.parametrize("bad", [torch.zeros(3, dtype=torch.int64), torch.zeros(2)])
def test_a_bad_key_is_named(bad):
    with pytest.raises(ValueError, match=r"key: expected an int64 tensor of shape \[2\]"):
        make_evaluate(config())(init_train_state(jr.key(0), config().ppo), bad)


@pytest.mark.parametrize("recurrent", [False, True])
def test_chunked_rollouts_give_the_same_returns(recurrent):
    # Lifecycle's episodes last at most 150 steps: 40-step chunks play 160, in 4 rollouts
    # whose runner state (and LSTM state) carries over.
    changes = {"recurrent": True, "lstm_size": 8, "bptt_len": 4} if recurrent else {}
    cfg = config("lifecycle", **changes)
    keys = jr.split(jr.key(7), 2)
    states = init_train_state(keys, cfg.ppo)
    eval_keys = jr.split(jr.key(8), 2)
    whole = make_evaluate(cfg, num_seeds=2)(states, eval_keys)
    chunked = make_evaluate(cfg, num_seeds=2, chunk_steps=40)(states, eval_keys)
    assert torch.equal(whole, chunked)


def test_evaluation_and_training_steps_share_a_fingerprint_without_a_normaliser():
    # What lets a compiled evaluation with chunk_steps=num_steps load training's precompiled
    # rollout: the two env steps close over the same values. With a normaliser, training
    # merges observations into the statistics and evaluation does not, so they differ.
    for normalize in (False, True):
        cfg = config().replace(normalize_obs=normalize)
        env = cfg.make_env()
        train_step = fingerprint(make_env_step(cfg, env))
        eval_step = fingerprint(make_env_step(cfg, env, learn_obs_stats=False))
        assert train_step is not None and eval_step is not None
        assert (train_step == eval_step) is not normalize


@pytest.mark.parametrize("bad", [0, 2.5, True])
def test_a_bad_chunk_is_named(bad):
    with pytest.raises(ValueError, match="chunk_steps: expected an int >= 1 or None"):
        make_evaluate(config(), chunk_steps=bad)
