"""gym_evaluate: whole episodes shared out among a vector env's envs as SB3 shares them, returns
worked by hand on a tiny env, masks honoured, the same episodes and returns as SB3's and
sb3-contrib's own evaluate_policy for the same deterministic policy, and a recurrent policy's
rows kept apart."""

import gymnasium as gym
import numpy as np
import optree
import pytest
import torch

from funcppo.agent.agent import PPOAgent
from funcppo.agent.gym_adapter import GymAdapter, env_action, head_masks
from funcppo.agent.gym_evaluate import episode_targets, evaluate_policy
from funcppo.core.config import PPOConfig

NEXT, SAME = gym.vector.AutoresetMode.NEXT_STEP, gym.vector.AutoresetMode.SAME_STEP
SMALL = {"torso_sizes": (8,), "compile": False}


class Only(gym.Env):
    """Env ``i`` allows only action ``i`` (``info["action_mask"]``); an episode lasts ``2 + i``
    steps, each rewarded ``action + 1``, and ends terminated: by hand, a return of
    ``(i + 1) * (2 + i)``. An action the mask forbids is counted in ``invalid``."""

    def __init__(self, i):
        self.i, self.invalid = i, 0
        self.observation_space = gym.spaces.Discrete(8)
        self.action_space = gym.spaces.Discrete(3)

    def _info(self):
        return {"action_mask": np.arange(3) == self.i}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self.t, self._info()

    def step(self, action):
        self.invalid += int(action != self.i)
        self.t += 1
        return self.t, float(action + 1), self.t == 2 + self.i, False, self._info()


def agent_for(env, num_envs=1, **kw):
    adapter = env if isinstance(env, GymAdapter) else GymAdapter(env)
    config = PPOConfig(obs_dim=adapter.obs_dim, spec=adapter.spec, **(SMALL | kw))
    return PPOAgent(config, num_envs, 8, seed=0)


def test_episodes_are_shared_out_as_sb3_shares_them():
    assert episode_targets(5, 3).tolist() == [1, 2, 2]
    assert episode_targets(10, 4).tolist() == [2, 2, 3, 3]
    assert episode_targets(2, 4).tolist() == [0, 0, 1, 1]
    for n, k in [(7, 3), (1, 5), (12, 12), (13, 2)]:
        targets = episode_targets(n, k)
        assert targets.sum() == n and targets.max() - targets.min() <= 1


@pytest.mark.parametrize("mode", [NEXT, SAME])
def test_returns_by_hand_on_a_tiny_env_with_masks(mode):
    vec = gym.vector.SyncVectorEnv([lambda i=i: Only(i) for i in range(3)], autoreset_mode=mode)
    agent = agent_for(vec)
    returns, lengths = evaluate_policy(agent, vec, 5, return_episode_rewards=True)
    # Env 0 plays one episode, envs 1 and 2 two each, in the order they end: env 0 at step 2,
    # env 1 at 3, env 2 at 4, env 1 again 3 steps later, env 2 again 4 steps later.
    assert returns == [2.0, 6.0, 12.0, 6.0, 12.0]
    assert lengths == [2, 3, 4, 3, 4]
    assert [env.invalid for env in vec.envs] == [0, 0, 0]
    mean, std = evaluate_policy(agent, vec, 5)
    assert mean == pytest.approx(7.6) and std == pytest.approx(np.std([2, 6, 12, 6, 12]))
    # A single env plays every episode; stochastic actions are masked too.
    single = Only(1)
    assert evaluate_policy(agent, single, 3, False, return_episode_rewards=True) == (
        [6.0, 6.0, 6.0],
        [3, 3, 3],
    )
    assert single.invalid == 0


def test_a_truncated_episode_counts_whole():
    env = gym.wrappers.TimeLimit(gym.make("CartPole-v1").unwrapped, max_episode_steps=5)
    agent = agent_for(env)
    returns, lengths = evaluate_policy(agent, env, 3, return_episode_rewards=True, seed=0)
    # The untrained policy keeps the pole up for 5 steps from CartPole's near-upright starts.
    assert lengths == [5, 5, 5] and returns == [5.0, 5.0, 5.0]


def test_nothing_of_the_agent_changes_and_bad_arguments_are_named():
    vec = gym.make_vec("CartPole-v1", 2, vectorization_mode="sync")
    agent = agent_for(vec, 2)
    state = [x.clone() for x in optree.tree_leaves(agent.state)]
    before = evaluate_policy(agent, vec, 4, seed=3, return_episode_rewards=True)
    assert evaluate_policy(agent, vec, 4, seed=3, return_episode_rewards=True) == before
    assert all(
        torch.equal(a, b) for a, b in zip(state, optree.tree_leaves(agent.state), strict=True)
    )
    with pytest.raises(ValueError, match=r"n_episodes: expected an int >= 1, got 0"):
        evaluate_policy(agent, vec, 0)
    with pytest.raises(ValueError, match=r"deterministic: expected a bool, got 'yes'"):
        evaluate_policy(agent, vec, 2, "yes")
    with pytest.raises(ValueError, match=r"env: expected observations of size 4 and heads "
                       r"\{'action': 2\} .* got size 8 and heads \{'action': 3\}"):  # fmt: skip
        evaluate_policy(agent, Only(0), 1)


def test_recurrent_rows_are_evaluated_apart():
    # Each env of a vector env plays the episode it would play alone: the LSTM state of one
    # row never leaks into another's. FrozenLake's slippery moves give episodes of many lengths.
    make = lambda: gym.make("FrozenLake-v1")  # noqa: E731
    vec = gym.vector.SyncVectorEnv([make] * 4, autoreset_mode=SAME)
    agent = agent_for(vec, 4, lstm_size=8)
    together = evaluate_policy(agent, vec, 4, seed=10, return_episode_rewards=True)
    alone = [
        evaluate_policy(agent, make(), 1, seed=10 + i, return_episode_rewards=True)
        for i in range(4)
    ]
    assert sorted(zip(*together, strict=True)) == sorted((r[0], n[0]) for r, n in alone)
    assert len({n[0] for _, n in alone}) > 1


class SB3Policy:
    """funcppo's agent behind SB3's ``predict(obs, state, episode_start, deterministic)``:
    raw observations encoded by the adapter's encoder, actions as the env takes them."""

    def __init__(self, agent, space, encoder):
        self.agent, self.space, self.encoder = agent, space, encoder

    def predict(self, obs, state=None, episode_start=None, deterministic=True, action_masks=None):
        x = torch.from_numpy(self.encoder(obs, len(obs)))
        masks = None if action_masks is None else head_masks(self.space, action_masks)
        actions, _ = self.agent.predict(x, masks, None, deterministic)
        return env_action(self.space, actions), None


@pytest.mark.parametrize("mode", [NEXT, SAME])
@pytest.mark.parametrize("env_id", ["FrozenLake-v1", "CartPole-v1"])
def test_the_same_episodes_as_sb3s_evaluate_policy(env_id, mode):
    evaluation = pytest.importorskip("stable_baselines3.common.evaluation")
    vec_env = pytest.importorskip("stable_baselines3.common.vec_env")
    n = 3
    vec = gym.make_vec(env_id, n, vectorization_mode="sync", vector_kwargs={"autoreset_mode": mode})
    adapter = GymAdapter(vec)
    agent = agent_for(adapter, n, torso_sizes=(16,))
    ours = evaluate_policy(agent, vec, 8, seed=7, return_episode_rewards=True)
    dummy = vec_env.DummyVecEnv([lambda: gym.make(env_id)] * n)
    dummy.seed(7)  # env i's first reset gets seed 7 + i, as a gymnasium vector env's
    policy = SB3Policy(agent, adapter.action_space, adapter.obs_encoder)
    theirs = evaluation.evaluate_policy(policy, dummy, 8, return_episode_rewards=True, warn=False)
    if mode == SAME:  # SB3 resets in the step that ends an episode too: the same order
        assert ours == ([float(r) for r in theirs[0]], [int(x) for x in theirs[1]])
    else:  # each env's episodes the same, their interleaving shifted by the reset steps
        assert sorted(zip(*ours, strict=True)) == sorted(zip(*theirs, strict=True))
    assert len(set(ours[1])) > 1  # episodes of several lengths: a comparison that can fail
    dummy.seed(7)
    mean, std = evaluation.evaluate_policy(policy, dummy, 8, warn=False)
    assert evaluate_policy(agent, vec, 8, seed=7) == pytest.approx((mean, std), rel=1e-12)


def test_masked_episodes_as_sb3_contribs_evaluate_policy():
    maskable = pytest.importorskip("sb3_contrib.common.maskable.evaluation")
    envs = pytest.importorskip("sb3_contrib.common.envs")
    vec_env = pytest.importorskip("stable_baselines3.common.vec_env")

    class Counting(envs.InvalidActionEnvDiscrete):
        def __init__(self, i):
            super().__init__(dim=6, ep_length=9, n_invalid_actions=4)
            self.action_space.seed(i)  # the states it draws
            self.invalid = 0

        def step(self, action):
            self.invalid += int(action in self.invalid_actions)
            return super().step(action)

    agent = agent_for(GymAdapter(Counting(0)), 2)

    def envs_fns():
        np.random.seed(0)  # the env draws its invalid actions from numpy's global generator
        return [lambda i=i: Counting(i) for i in range(2)]

    vec = gym.vector.SyncVectorEnv(envs_fns(), autoreset_mode=SAME)
    ours = evaluate_policy(agent, vec, 5, return_episode_rewards=True)
    dummy = vec_env.DummyVecEnv(envs_fns())
    adapter = GymAdapter(vec)
    policy = SB3Policy(agent, adapter.action_space, adapter.obs_encoder)
    theirs = maskable.evaluate_policy(policy, dummy, 5, return_episode_rewards=True, warn=False)
    assert ours == ([float(r) for r in theirs[0]], [int(x) for x in theirs[1]])
    assert [env.invalid for env in vec.envs] == [0, 0]
    assert [env.invalid for env in dummy.envs] == [0, 0]
    assert len(set(ours[0])) > 1
