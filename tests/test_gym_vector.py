"""gym_vector and gym_acting: S seeds on one vector env of S x E envs are S single agents (a
loop of PPOAgents, to 1e-5), compiled acting is eager acting, async envs are sync ones, masks
are never broken, and the command line runs seeds vmapped on sync and async envs.
"""

import json

import gymnasium as gym
import numpy as np
import optree
import pytest
import torch

from funcppo.accel.compiling import CompileSettings
from funcppo.agent.agent import PPOAgent
from funcppo.agent.gym_acting import init_act_carry, make_acting
from funcppo.agent.gym_adapter import GymAdapter
from funcppo.agent.gym_vector import SeedsAgent
from funcppo.core import random as jr
from funcppo.core.config import PPOConfig
from funcppo.core.spec import ActionSpec
from funcppo.training.state import init_train_state

SAME = gym.vector.AutoresetMode.SAME_STEP
SMALL = {"torso_sizes": (16,), "compile": False, "update_epochs": 2, "num_minibatches": 2}


def cartpole(n, seed, mode="sync"):
    vec = gym.make_vec(
        "CartPole-v1", num_envs=n, vectorization_mode=mode, vector_kwargs={"autoreset_mode": SAME}
    )
    return GymAdapter(vec, seed=seed)


def seed_list(seeds, num_envs):
    """Each seed's envs seeded as a single agent's vector env reset with that seed."""
    return [s + j for s in seeds for j in range(num_envs)]


def assert_trees_close(a, b, tol=1e-5):
    for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True):
        if x.dtype in (torch.int64, torch.bool):
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def test_vmapped_seeds_are_a_loop_of_single_agents():
    seeds, e, t, updates = [3, 7], 2, 16, 3
    kw = {"normalize_obs": True, "normalize_reward": True}
    config = PPOConfig(obs_dim=4, spec=cartpole(1, 0).spec, **SMALL)
    lrs = [1e-3, 3e-3]
    agents = SeedsAgent(config, e, t, seeds=seeds, hparams={"learning_rate": lrs}, **kw)
    env = cartpole(len(seeds) * e, seed_list(seeds, e))
    history = []
    for u in range(updates):
        agents.collect(env)
        history.append(agents.update(clip_coef=0.1 * (u + 1)))
    for i, seed in enumerate(seeds):
        single = PPOAgent(config.replace(learning_rate=lrs[i]), e, t, seed=seed, **kw)
        own = cartpole(e, seed)
        for u in range(updates):
            single.collect(own)
            metrics = single.update(clip_coef=0.1 * (u + 1))
            assert metrics["episodes"] == history[u]["episodes"][i]
            assert metrics["loss"] == pytest.approx(history[u]["loss"][i], rel=1e-4, abs=1e-5)
        mine = agents.seed_agent(i)
        assert_trees_close(mine.state, single.state)
        for name in ("obs_stats", "reward_scale", "episode_return", "episode_start"):
            torch.testing.assert_close(getattr(mine, name), getattr(single, name))


def test_next_step_autoreset_with_one_seed_is_the_single_agent():
    # One seed waits for its own columns only, as PPOAgent does: the same run.
    config = PPOConfig(obs_dim=4, spec=cartpole(1, 0).spec, **SMALL)
    envs = [GymAdapter(gym.make_vec("CartPole-v1", num_envs=2), seed=5) for _ in range(2)]
    agents, single = SeedsAgent(config, 2, 32, seeds=[5]), PPOAgent(config, 2, 32, seed=5)
    for _ in range(2):
        agents.collect(envs[0])
        single.collect(envs[1])
        mine = agents.update()
        theirs = single.update()
        assert mine["discarded_steps"] == [theirs["discarded_steps"]]
    assert_trees_close(agents.seed_agent(0).state, single.state)


def factored_config(**kw):
    spec = ActionSpec(
        {"op": 3, "x": 4, "y": 5}, "op", [["x"], ["x", "y"], []], op_conditioned=["y"]
    )
    return PPOConfig(obs_dim=6, spec=spec, **(SMALL | kw))


def random_inputs(config, s, e, gen):
    """Observations, masks with at least one valid action per row, and an env's answer."""
    obs = torch.randn(s, e, config.obs_dim, generator=gen) * 3
    masks = {}
    for name, size in config.spec.heads:
        shape = (
            (s, e, config.spec.n_ops, size) if name in config.spec.op_conditioned else (s, e, size)
        )
        m = torch.rand(*shape, generator=gen) < 0.6
        m[..., 0] = True
        masks[name] = m
    flag = torch.rand(s, e, generator=gen) < 0.3
    step = (torch.randn(s, e, generator=gen), flag, ~flag & (torch.rand(s, e, generator=gen) < 0.3),
            torch.randn(s, e, config.obs_dim, generator=gen), torch.rand(s, e, generator=gen) < 0.9,
            flag, torch.rand(s, e, generator=gen) < 0.9)  # fmt: skip
    return obs, masks, step


# Slow with either backend: tracing the vmapped act and observe takes seconds. Inductor's code
# generation once, on the LSTM (its graph holds the MLP's and more): the suite's time is tight.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "recurrent"), [("aot_eager", False), ("aot_eager", True), ("inductor", True)]
)
def test_compiled_acting_is_eager_acting(backend, recurrent):
    s, e = 2, 3
    config = factored_config(recurrent=recurrent, lstm_size=8)
    # Inductor's Python wrapper: the C++ one generates the same kernels and compiles slower.
    settings = CompileSettings.for_device("cpu").replace(backend=backend, cpp_wrapper=False)
    eager = make_acting(config, num_seeds=s, clip_obs=5.0)
    compiled = make_acting(config, num_seeds=s, clip_obs=5.0, compile=True, compiler=settings)
    state = init_train_state(torch.stack([jr.key(1), jr.key(2)]), config)
    one = init_act_carry(config, e, True, True)
    carry = optree.tree_map(lambda x: torch.stack([x] * s), one)
    gen = torch.Generator().manual_seed(0)
    gamma = torch.full((s,), 0.99, dtype=torch.float64)
    carries = {"eager": carry, "compiled": carry}
    for _ in range(3):  # the carry changes between steps: no recompile, the same values
        obs, masks, step = random_inputs(config, s, e, gen)
        room = torch.rand(s, e, generator=gen) < 0.8
        out = {}
        for name, acting in (("eager", eager), ("compiled", compiled)):
            c, acted, actions = acting.act(state.params, state.key, carries[name], obs, masks, room)
            c, row = acting.observe(state.params, gamma, c, acted, step, room)
            carries[name], out[name] = c, (actions, row)
        assert_trees_close(out["eager"], out["compiled"])
    assert_trees_close(carries["eager"], carries["compiled"])


def test_async_vector_env_is_the_sync_one():
    config = PPOConfig(obs_dim=4, spec=cartpole(1, 0).spec, **SMALL)
    states = []
    for mode in ("sync", "async"):
        env = cartpole(4, seed_list([0, 1], 2), mode)
        agents = SeedsAgent(config, 2, 16, seeds=[0, 1])
        agents.learn(env, 64)
        env.env.close()
        states.append(agents.state)
    assert_trees_close(*states, tol=0.0)


class Referee(gym.Wrapper):
    """Counts the actions that the env's own ``action_masks`` forbade when they were taken."""

    def __init__(self, env):
        super().__init__(env)
        self.broken, self.taken = 0, 0

    def action_masks(self):
        return self.env.unwrapped.action_masks()

    def step(self, action):
        allowed = np.asarray(self.action_masks())
        offsets = np.cumsum([0, *np.atleast_1d(self.action_space.nvec)[:-1]]) if isinstance(
            self.action_space, gym.spaces.MultiDiscrete) else np.zeros(1, dtype=int)  # fmt: skip
        self.broken += int((~allowed[offsets + np.atleast_1d(action)]).any())
        self.taken += 1
        return self.env.step(action)


@pytest.mark.parametrize("kind", ["discrete", "multidiscrete"])
def test_masked_sb3_contrib_envs_never_get_an_invalid_action(kind):
    from sb3_contrib.common.envs import InvalidActionEnvDiscrete, InvalidActionEnvMultiDiscrete

    def make():
        if kind == "discrete":
            return Referee(InvalidActionEnvDiscrete(dim=6, ep_length=20, n_invalid_actions=4))
        return Referee(InvalidActionEnvMultiDiscrete([3, 4], ep_length=20, n_invalid_actions=3))

    vec = gym.vector.SyncVectorEnv([make for _ in range(4)], autoreset_mode=SAME)
    env = GymAdapter(vec, seed=seed_list([0, 1], 2))
    config = PPOConfig(obs_dim=env.obs_dim, spec=env.spec, **SMALL)
    SeedsAgent(config, 2, 16, seeds=[0, 1]).learn(env, 64)
    assert sum(e.taken for e in vec.envs) == 4 * 32
    assert sum(e.broken for e in vec.envs) == 0


def test_cli_runs_seeds_on_one_async_vector_env(tmp_path, capsys):
    from funcppo.cli.main import main

    argv = ["train", "--env", "gym:CartPole-v1", "--seeds", "2", "--num-envs", "2"]
    argv += ["--num-steps", "32", "--total-steps", "128", "--no-compile", "--out", str(tmp_path)]
    assert main([*argv, "--vector", "async", "--sweep", "learning_rate=1e-3,3e-3"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[-1]["env_steps"] == 128
    assert lines[0]["learning_rate"] == pytest.approx([1e-3, 3e-3])
    assert "| learning_rate=0.003 |" in capsys.readouterr().out
    env = cartpole(2, 0)
    for i in range(2):
        agent = PPOAgent(PPOConfig(obs_dim=4, spec=env.spec, compile=False), 2, 32)
        agent.load(tmp_path / f"checkpoint-{i}.pt")
        assert int(agent.state.step) == 2
