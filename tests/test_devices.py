"""Placement: every entry point builds its tensors on the device of the key it is given.

Most of these run on PyTorch's meta device, which holds shapes but no data and refuses to mix
devices in one op, as CUDA does: a tensor created without ``device=`` (so on the CPU) next to
the key's tensors fails here, on a machine without a GPU. Whole episodes (an evaluation plays
hundreds of steps) are slow on meta and left to the tests that take the test device; code that
reads values on the host (the update's input checks, metrics) cannot run on meta at all, and
the last test runs a short training on the test device instead (``FUNCPPO_TEST_DEVICE``,
conftest.py).
"""

import optree
import pytest
import torch
from torch.func import vmap

from funcppo.core import random as jr
from funcppo.core.config import PPOConfig
from funcppo.core.networks import init_hidden, policy_apply
from funcppo.core.normalize import init_reward_scale, init_running_stats
from funcppo.core.spec import ActionSpec
from funcppo.envs import make_env
from funcppo.training.state import init_train_state
from funcppo.training.synthetic import synthetic_batch
from funcppo.training.train import (
    TrainConfig,
    contiguous_outputs,
    init_runner,
    make_env_step,
    make_rollout,
    make_train,
)

META = torch.device("meta")
SPEC = ActionSpec(
    {"op": 3, "a": 5, "b": 4, "c": 6}, "op", [(), ("a",), ("a", "b", "c")], op_conditioned=("a",)
)


def elsewhere(tree, device: torch.device) -> list[str]:
    """The paths of ``tree``'s tensors that are not on ``device``, with the device they are on."""
    paths, leaves, _ = optree.tree_flatten_with_path(tree)
    return [
        f"{path}: {leaf.device}"
        for path, leaf in zip(paths, leaves, strict=True)
        if isinstance(leaf, torch.Tensor) and leaf.device != device
    ]


@pytest.mark.parametrize("recurrent", [False, True])
def test_state_and_synthetic_batch_follow_the_key(recurrent):
    config = PPOConfig(
        obs_dim=6, spec=SPEC, torso_sizes=(8,), recurrent=recurrent, lstm_size=8, bptt_len=4
    )
    state = init_train_state(jr.key(0, META), config)
    states = init_train_state(jr.split(jr.key(0, META), 2), config, learning_rate=1e-3)
    batch = synthetic_batch(config, state.params, jr.key(1, META), 8, 3)
    hidden, start = init_hidden(config, 3, META), batch.episode_start[0]
    out = policy_apply(state.params, config, batch.obs[0], hidden, start)
    assert elsewhere((state, states, batch, out), META) == []
    assert elsewhere((init_running_stats((6,), META), init_reward_scale(3, META)), META) == []


@pytest.mark.parametrize(
    ("env_name", "recurrent", "normalize_obs"),
    [("cartpole", False, False), ("cartpole-pomdp", True, True), ("lifecycle", False, True)],
)
def test_runner_and_rollout_follow_the_key(env_name, recurrent, normalize_obs):
    env = make_env(env_name, 2)
    ppo = PPOConfig(
        obs_dim=env.obs_dim,
        spec=env.spec,
        compile=False,
        torso_sizes=(8,),
        recurrent=recurrent,
        lstm_size=8,
    )
    config = TrainConfig(
        env=env_name, ppo=ppo, num_envs=2, num_steps=4, total_steps=8, normalize_obs=normalize_obs
    )
    keys = jr.split(jr.key(0, META), 2)
    init = contiguous_outputs(vmap(lambda key: init_runner(config, env, key)))
    rollout = make_rollout(vmap(make_env_step(config, env)), 4, 1, False, "inductor")
    rs = init(keys)
    rs, batch = rollout(rs)
    assert elsewhere((rs, batch), META) == []


def test_a_training_run_keeps_its_state_and_history_on_the_keys_device(device):
    env = make_env("cartpole", 2)
    ppo = PPOConfig(obs_dim=env.obs_dim, spec=env.spec, compile=False, torso_sizes=(8,))
    config = TrainConfig(env="cartpole", ppo=ppo, num_envs=2, num_steps=8, total_steps=32)
    state, history = make_train(config, num_seeds=2)(jr.split(jr.key(0, device), 2))
    assert history["loss"].shape == (2, 2)
    assert elsewhere((state, history), device) == []
