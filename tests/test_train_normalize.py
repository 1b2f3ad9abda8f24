"""Observation normalisation inside ``make_train`` (``TrainConfig.normalize_obs``)."""

from __future__ import annotations

import json

import numpy as np
import optree
import pytest
import torch

from funcppo.cli.main import main
from funcppo.core import random as jr
from funcppo.core.config import PPOConfig
from funcppo.core.constants import NORMALIZE_EPS, STATS_INIT_COUNT
from funcppo.envs import make_env
from funcppo.training.checkpoint import load_checkpoint, save_checkpoint
from funcppo.training.evaluate import make_evaluate
from funcppo.training.train import TrainConfig, init_runner, make_env_step, make_train


def config(**changes) -> TrainConfig:
    env = make_env("cartpole-pomdp", 3)
    ppo = PPOConfig(obs_dim=env.obs_dim, spec=env.spec, compile=False, torso_sizes=(8,))
    base = dict(env="cartpole-pomdp", ppo=ppo, num_envs=3, num_steps=8, total_steps=48)
    return TrainConfig(**(base | {"normalize_obs": True} | changes))


def naive_stats(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean and population variance of the rows together with the prior (0, 1, count c0)."""
    c0, n = STATS_INIT_COUNT, len(rows)
    mean = rows.sum(0) / (c0 + n)
    m2 = c0 * (1.0 + mean**2) + ((rows - mean) ** 2).sum(0)
    return mean, m2 / (c0 + n), c0 + n


def test_env_step_merges_each_observation_then_normalises_it():
    # SB3 VecNormalize's order: each observation enters the statistics, then the policy sees it
    # normalised with them; a naive mean and variance over every row so far is the reference.
    cfg = config(clip_obs=1.5)
    env = cfg.make_env()
    step = make_env_step(cfg, env)
    rs = init_runner(cfg, env, jr.key(4))
    seen, largest = [], 0.0
    for _ in range(30):
        raw = rs.obs.double().numpy()
        seen.append(raw)
        rs, transition = step(rs.train.params, rs)
        mean, var, count = naive_stats(np.concatenate(seen))
        np.testing.assert_allclose(rs.obs_stats.mean.numpy(), mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(rs.obs_stats.var.numpy(), var, rtol=1e-9)
        assert float(rs.obs_stats.count) == pytest.approx(count, rel=1e-12)
        want = np.clip((raw - mean) / np.sqrt(var + NORMALIZE_EPS), -1.5, 1.5)
        np.testing.assert_allclose(transition.obs.numpy(), want, rtol=1e-5, atol=1e-6)
        largest = max(largest, float(transition.obs.abs().max()))
    assert largest == pytest.approx(1.5)  # the clip was reached, and held


def test_evaluation_reads_the_statistics_without_merging():
    cfg = config()
    env = cfg.make_env()
    rs = init_runner(cfg, env, jr.key(1))
    step = make_env_step(cfg, env, learn_obs_stats=False)
    after, transition = step(rs.train.params, rs)
    for a, b in zip(after.obs_stats, rs.obs_stats, strict=True):
        assert torch.equal(a, b)
    # The initial statistics (mean 0, variance 1) leave the observation as it is.
    assert torch.allclose(transition.obs, rs.obs, atol=1e-6)


def test_train_keeps_the_statistics_in_the_state_and_evaluate_uses_them():
    cfg = config()
    state, _ = make_train(cfg, num_seeds=2)(jr.split(jr.key(0), 2))
    steps = cfg.num_updates * cfg.num_envs * cfg.num_steps
    assert state.obs_stats.count.tolist() == pytest.approx([STATS_INIT_COUNT + steps] * 2)
    assert state.obs_stats.mean.shape == (2, 2)
    evaluate = make_evaluate(cfg, num_seeds=2)
    returns = evaluate(state, jr.split(jr.key(9), 2))
    assert returns.shape == (2, cfg.num_envs)
    plain = make_evaluate(cfg.replace(normalize_obs=False), num_seeds=2)
    with pytest.raises(ValueError, match=r"train_state.obs_stats: expected no observation stat"):
        plain(state, jr.split(jr.key(9), 2))
    with pytest.raises(ValueError, match=r"train_state.obs_stats: expected observation stat"):
        evaluate(state._replace(obs_stats=()), jr.split(jr.key(9), 2))


def test_checkpoint_keeps_the_statistics(tmp_path):
    cfg = config()
    state, _ = make_train(cfg, num_seeds=2)(jr.split(jr.key(2), 2))
    save_checkpoint(tmp_path / "c.pt", state, cfg.ppo)
    loaded, _, _ = load_checkpoint(tmp_path / "c.pt")
    for want, got in zip(optree.tree_leaves(state), optree.tree_leaves(loaded), strict=True):
        assert torch.equal(want, got)
    assert isinstance(loaded.obs_stats.mean, torch.Tensor)


def test_data_parallel_refuses_normalisation():
    class OneProcess:  # make_train reads only the rank before it refuses
        rank = 0

    with pytest.raises(ValueError, match=r"config\.normalize_obs: expected False with data_par"):
        make_train(config(), data_parallel=OneProcess())


@pytest.mark.slow
def test_cli_flag_and_preset(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--env", "cartpole", "--seeds", "1", "--total-steps", "256", "--no-compile"]
    assert main([*args, "--num-envs", "2", "--num-steps", "64", "--out", str(out)]) == 0
    assert load_checkpoint(out / "checkpoint.pt")[0].obs_stats == ()
    again = ["--total-steps", "512", "--normalize-obs", "--out", str(out), "--overwrite"]
    assert main([*args, *again]) == 0
    state, _, _ = load_checkpoint(out / "checkpoint.pt")
    assert float(state.obs_stats.count[0]) == pytest.approx(STATS_INIT_COUNT + 4 * 128)
    assert json.loads((out / "evaluation.json").read_text())["episode_return"][0] > 0
