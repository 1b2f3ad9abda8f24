"""gym_adapter: action spaces to specs, masks from info or action_masks(), autoreset modes
(NEXT_STEP steps never trained on, truncation bootstraps from the final observation), errors,
and learning: gymnasium's CartPole-v1 and a masked MultiDiscrete env only a masked policy scores.
"""

import json
import math
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

from funcppo.agent.agent import PPOAgent
from funcppo.agent.gym_adapter import GymAdapter, env_action, gym_action_spec, head_masks
from funcppo.core.config import PPOConfig
from funcppo.core.networks import policy_apply
from funcppo.core.normalize import normalize_obs

NEXT, SAME = gym.vector.AutoresetMode.NEXT_STEP, gym.vector.AutoresetMode.SAME_STEP
SMALL = {"torso_sizes": (8,), "compile": False, "update_epochs": 1, "num_minibatches": 2}


class Clock(gym.Env):
    """Actions do nothing: obs = [t, episode], reward = t + 1; an episode of env ``i`` ends
    after ``3 + i`` steps, terminated on odd episodes and truncated on even ones."""

    def __init__(self, length=3):
        self.length = length
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = gym.spaces.Discrete(2)
        self.episode = -1

    def _obs(self):
        return np.array([self.t, self.episode], dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.episode = 0, self.episode + 1
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        end = self.t >= self.length
        odd = self.episode % 2 == 1
        return self._obs(), float(self.t), end and odd, end and not odd, {}


def clock_vec(mode, n=2):
    return gym.vector.SyncVectorEnv(
        [lambda i=i: Clock(3 + i) for i in range(n)], autoreset_mode=mode
    )


def agent_for(env, num_steps=8, **kw):
    config = PPOConfig(obs_dim=env.obs_dim, spec=env.spec, **(SMALL | kw))
    return PPOAgent(config, env.num_envs, num_steps, seed=0)


def test_missing_gymnasium_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium", None)
    with pytest.raises(ImportError, match=r"pip install 'funcppo\[gym\]'"):
        gym_action_spec(object())


def test_action_spaces_map_to_specs():
    spec = gym_action_spec(gym.spaces.Discrete(3, start=1))
    assert spec.heads == (("action", 3),) and spec.op_head == "action"
    spec = gym_action_spec(gym.spaces.MultiDiscrete([3, 4, 2]))
    assert spec.heads == (("a0", 3), ("a1", 4), ("a2", 2)) and spec.op_head == "a0"
    assert all(row == {"a0", "a1", "a2"} for row in spec.causal) and len(spec.causal) == 3
    with pytest.raises(ValueError, match="action_space: expected Discrete"):
        gym_action_spec(gym.spaces.Box(0, 1, (2,)))
    with pytest.raises(ValueError, match=r"observation_space\['hand'\]: a Tuple inside a Dict"):
        nested = gym.spaces.Dict({"hand": gym.spaces.Tuple([gym.spaces.Discrete(2)] * 2)})
        GymAdapter(gym.wrappers.TransformObservation(Clock(), lambda obs: obs, nested))
    with pytest.raises(ValueError, match="DISABLED"):
        GymAdapter(clock_vec(gym.vector.AutoresetMode.DISABLED))


@pytest.mark.parametrize("mode", ["single", NEXT, SAME])
def test_rollout_holds_real_transitions_and_bootstraps_from_final_obs(mode):
    env = GymAdapter(Clock(3) if mode == "single" else clock_vec(mode), seed=0)
    agent = agent_for(env)
    agent.collect(env)
    batch = agent.rollout()
    for b in range(env.num_envs):
        length = 3 + b
        # Every row is a real transition: t runs 0..length-1 and the reward is t + 1, so an
        # ignored NEXT_STEP step (acting on the final obs t = length) never appears.
        t = batch.obs[:, b, 0]
        assert torch.equal(t, torch.arange(8.0) % length)
        assert torch.equal(batch.rewards[:, b], t + 1)
        assert torch.equal(batch.obs[:, b, 1], torch.arange(8) // length * 1.0)
        end = t == length - 1
        odd = batch.obs[:, b, 1] % 2 == 1
        assert torch.equal(batch.terminated[:, b], end & odd)
        assert torch.equal(batch.truncated[:, b], end & ~odd)
        assert torch.equal(batch.episode_start[:, b], t == 0)
        # next_values: V of the final obs [length, episode] at episode ends, of the next obs else.
        nxt = torch.stack([t + 1, batch.obs[:, b, 1]], -1)
        want = policy_apply(agent.state.params, agent.config, nxt, None, None).value
        # Not to the bit: the agent evaluated these rows in other batch shapes, and on an
        # AVX-512 CPU MKL's sgemm rounds by shape (1-ulp differences). V of a wrong
        # observation (the reset one) is off by orders of magnitude more.
        torch.testing.assert_close(batch.next_values[:, b], want, rtol=1e-5, atol=1e-6)


def test_next_step_mode_matches_same_step_mode_on_what_is_trained():
    batches = {}
    for mode in (NEXT, SAME):
        env = GymAdapter(clock_vec(mode, 3), seed=0)
        agent = agent_for(env, num_steps=10)
        agent.collect(env)
        batches[mode] = agent.rollout()
    for field in ("obs", "rewards", "terminated", "truncated", "episode_start", "values"):
        assert torch.equal(getattr(batches[NEXT], field), getattr(batches[SAME], field)), field
    torch.testing.assert_close(batches[NEXT].next_values, batches[SAME].next_values)


def by_hand_stats(rows):
    """Mean and population variance of ``rows`` ``[n, ...]`` merged into the normaliser's start
    (mean 0, var 1, count 1e-4) in one step of Chan et al.'s formula, in float64."""
    rows = np.asarray(rows, dtype=np.float64)
    n, eps = rows.shape[0], 1e-4
    m, v, total = rows.mean(0), rows.var(0), n + eps
    return m * n / total, (eps + v * n + m**2 * eps * n / total) / total, total


def test_normalisers_count_exactly_the_steps_trained_on():
    # Clock ignores its actions, so an agent without normalisers on a twin env collects the
    # same rows: its rollouts hold the raw observations that the normalising agent trains on.
    # NEXT_STEP adds an ignored step after every episode end, and columns run past num_steps
    # while others catch up; neither kind of step is trained on, so neither may be counted.
    gamma, seen = 0.9, {}
    for mode in (NEXT, SAME):
        env, twin = GymAdapter(clock_vec(mode, 3), seed=0), GymAdapter(clock_vec(mode, 3), seed=0)
        plain, trained = agent_for(twin, gamma=gamma), []
        agent = PPOAgent(plain.config, 3, 8, normalize_obs=True, normalize_reward=True)
        for u in range(2):
            agent.collect(env)
            plain.collect(twin)
            trained.append(plain.rollout().obs.reshape(-1, 2))
            discarded = agent.update()["discarded_steps"]
            assert plain.update()["discarded_steps"] == discarded
            if u == 0:
                seen[mode] = (agent.obs_stats, agent.reward_scale.stats)
        assert mode == SAME or discarded > 0  # the case that needs the care
        rows = torch.cat(trained).numpy()
        mean, var, count = by_hand_stats(rows)
        torch.testing.assert_close(agent.obs_stats.mean, torch.from_numpy(mean), rtol=1e-12, atol=0)
        torch.testing.assert_close(agent.obs_stats.var, torch.from_numpy(var), rtol=1e-12, atol=0)
        assert float(agent.obs_stats.count) == pytest.approx(count, rel=1e-15)
        # A row at time t of its episode trained on reward t + 1 after rewards 1..t, so its
        # discounted return is sum_j gamma^(t-j) (j + 1).
        t = rows[:, 0].astype(int)
        returns = [sum(gamma ** (k - j) * (j + 1) for j in range(k + 1)) for k in t]
        mean, var, count = by_hand_stats(returns)
        stats = agent.reward_scale.stats
        torch.testing.assert_close(stats.mean, torch.tensor(mean), rtol=1e-12, atol=0)
        torch.testing.assert_close(stats.var, torch.tensor(var), rtol=1e-12, atol=0)
        assert float(stats.count) == pytest.approx(count, rel=1e-15)
    # The same episodes give the same statistics in either mode (merged in other groupings).
    for a, b in zip(seen[NEXT], seen[SAME], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_act_normalises_by_the_statistics_that_count_the_step():
    # In NEXT_STEP mode act cannot see whether a row will be trained on; the env's next_valid
    # tells it, so each trained row is normalised by the statistics that observe commits.
    env = GymAdapter(clock_vec(NEXT, 3), seed=0)
    agent = PPOAgent(agent_for(env).config, 3, 8, normalize_obs=True)
    kept = [[] for _ in range(3)]  # each column's trained rows, normalised after observe
    while not agent.ready:
        raw = env.obs
        step = env.step(agent.act(raw, env.masks))
        agent.observe(step)
        seen = normalize_obs(agent.obs_stats, raw, 10.0)
        for b in range(3):
            if step.valid[b] and len(kept[b]) < 8:
                kept[b].append(seen[b])
    assert torch.equal(agent.rollout().obs, torch.stack([torch.stack(k) for k in kept], 1))


class Masked(gym.Env):
    """MultiDiscrete([4, 5]); obs one-hot of a target for a0. a1 has two valid values per step,
    not in the obs. Reward 1 when a0 hits the target and a1 is valid; an invalid a1 ends the
    episode with reward -1; 16 steps at most. Masks as sb3-contrib: ``action_masks()`` or
    ``info["action_mask"]``, flat of length 9."""

    def __init__(self, mask_in_info=False, empty_head=None):
        self.observation_space = gym.spaces.Box(0, 1, (4,), np.float32)
        self.action_space = gym.spaces.MultiDiscrete([4, 5])
        self.mask_in_info, self.empty_head = mask_in_info, empty_head

    def _draw(self):
        self.target = int(self.np_random.integers(4))
        self.valid = np.zeros(5, dtype=bool)
        self.valid[self.np_random.choice(5, 2, replace=False)] = True
        obs = np.zeros(4, dtype=np.float32)
        obs[self.target] = 1
        return obs, ({"action_mask": self.action_masks()} if self.mask_in_info else {})

    def action_masks(self):
        mask = np.concatenate([np.ones(4, dtype=bool), self.valid])
        if self.empty_head is not None:
            mask[:4] = self.empty_head != "a0"
            mask[4:] = mask[4:] & (self.empty_head != "a1")
        return mask

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._draw()

    def step(self, action):
        self.t += 1
        if not self.valid[action[1]]:
            obs, info = self._draw()
            return obs, -1.0, True, False, info
        reward = float(action[0] == self.target)
        obs, info = self._draw()
        return obs, reward, False, self.t >= 16, info


def test_masks_from_info_and_from_action_masks_agree():
    via_info = GymAdapter(Masked(mask_in_info=True), seed=3)
    via_method = GymAdapter(Masked(), seed=3)
    for _ in range(5):
        for name in ("a0", "a1"):
            assert torch.equal(via_info.masks[name], via_method.masks[name])
        assert via_method.masks["a1"].sum() == 2 and via_method.masks["a0"].all()
        actions = {"a0": torch.tensor([0]), "a1": torch.nonzero(via_method.masks["a1"][0])[0]}
        via_info.step(actions)
        via_method.step(actions)
    vec = GymAdapter(gym.vector.SyncVectorEnv([lambda: Masked(True)] * 3), seed=0)
    assert vec.masks["a1"].shape == (3, 5) and bool((vec.masks["a1"].sum(-1) == 2).all())


def test_head_masks_split_an_sb3_contrib_mask_for_predict():
    # MaskablePPO's predict(obs, action_masks=env.action_masks()) as funcppo's.
    env = Masked()
    obs, _ = env.reset(seed=1)
    adapter = GymAdapter(Masked(), seed=1)
    masks = head_masks(env.action_space, env.action_masks())
    assert {name: m.shape for name, m in masks.items()} == {"a0": (4,), "a1": (5,)}
    for name in ("a0", "a1"):
        assert torch.equal(masks[name], adapter.masks[name][0])
    as_tuple = head_masks(env.action_space, (env.action_masks()[:4], env.action_masks()[4:]))
    assert_masks_equal(as_tuple, masks)
    batch = head_masks(env.action_space, np.stack([env.action_masks()] * 3))
    assert batch["a1"].shape == (3, 5) and torch.equal(batch["a1"][2], masks["a1"])
    agent = PPOAgent(PPOConfig(obs_dim=4, spec=adapter.spec, **SMALL), 1, 8)
    for _ in range(10):
        actions, _ = agent.predict(obs, masks)
        assert bool(masks["a1"][actions["a1"]])
    env.step(env_action(env.action_space, actions))
    with pytest.raises(ValueError, match=r"mask: expected 9 entries \(sum of the action space's "
                       r"sizes \[4, 5\]\) in its last axis, got shape \(8,\)"):  # fmt: skip
        head_masks(env.action_space, env.action_masks()[:8])


def assert_masks_equal(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_empty_mask_row_and_bad_actions_are_errors():
    env = GymAdapter(gym.vector.SyncVectorEnv([Masked, lambda: Masked(empty_head="a1")]), seed=0)
    agent = PPOAgent(PPOConfig(obs_dim=4, spec=env.spec, **SMALL), 2, 8)
    with pytest.raises(ValueError, match=r"masks\['a1'\]: no valid action at batch index \(1,\)"):
        agent.act(env.obs, env.masks)
    good = {"a0": torch.tensor([0, 1]), "a1": torch.tensor([0, 0])}
    with pytest.raises(ValueError, match=r"actions\['a1'\]: expected values in \[0, 5\), got 5"):
        env.step(good | {"a1": torch.tensor([0, 5])})
    with pytest.raises(ValueError, match=r"actions\['a0'\]: expected an int64 tensor of shape"):
        env.step(good | {"a0": torch.tensor([0.0, 1.0])})


class OneTooMany(gym.ObservationWrapper):
    """Appends a 0 to every observation and keeps the wrapped env's observation space: a lie."""

    def observation(self, obs):
        return np.append(obs, np.float32(0))


class OneTooManyVec(gym.vector.VectorObservationWrapper):
    def observations(self, obs):
        return np.concatenate([obs, np.zeros((len(obs), 1), obs.dtype)], axis=1)


class LongLastObs(Clock):
    """A Clock whose episode-ending observation has one entry too many."""

    def step(self, action):
        obs, *rest = super().step(action)
        return (np.append(obs, np.float32(0)) if rest[1] or rest[2] else obs), *rest


def test_a_wrong_observation_size_names_the_env_and_the_shapes():
    single = GymAdapter(OneTooMany(gym.make("CartPole-v1")))
    with pytest.raises(
        ValueError, match=r"observation from env CartPole-v1: expected shape \(4,\), got \(5,\)"
    ):
        single.reset()
    vec = GymAdapter(OneTooManyVec(gym.make_vec("CartPole-v1", 2, vectorization_mode="sync")))
    with pytest.raises(
        ValueError,
        match=r"observation from env CartPole-v1: expected shape \(4,\) per env \(batch "
        r"\(2, 4\)\), got \(2, 5\)",
    ):
        vec.reset()
    same = GymAdapter(gym.vector.SyncVectorEnv([LongLastObs] * 2, autoreset_mode=SAME))
    same.reset()
    actions = {"action": torch.zeros(2, dtype=torch.int64)}
    same.step(actions)
    same.step(actions)
    with pytest.raises(
        ValueError,
        match=r"info\['final_obs'\]\[0\] from env LongLastObs: expected shape \(2,\), got \(3,\)",
    ):
        same.step(actions)


class Recorder(gym.Env):
    """Keeps every action it is given; obs are zeros, episodes never end."""

    def __init__(self, action_space):
        self.observation_space = gym.spaces.Box(-1, 1, (4,), np.float32)
        self.action_space, self.taken = action_space, []

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(4, np.float32), {}

    def step(self, action):
        assert self.action_space.contains(action), action
        self.taken.append(np.asarray(action).tolist())
        return np.zeros(4, np.float32), 0.0, False, False, {}


MULTI = gym.spaces.MultiDiscrete([3, 4], start=[1, -2])
DISCRETE = gym.spaces.Discrete(3, start=5)


def test_env_action_adds_the_start_offsets_batched_and_unbatched():
    out = env_action(MULTI, {"a0": torch.tensor([0, 2]), "a1": torch.tensor([3, 0])})
    assert out.dtype == np.int64 and out.tolist() == [[1, 1], [3, -2]]
    one = env_action(MULTI, {"a0": torch.tensor(2), "a1": torch.tensor(0)})
    assert one.shape == (2,) and one.tolist() == [3, -2] and MULTI.contains(one)
    assert env_action(DISCRETE, {"action": torch.tensor([0, 2])}).tolist() == [5, 7]
    one = env_action(DISCRETE, {"action": torch.tensor(2)})
    assert one == 7 and np.ndim(one) == 0 and DISCRETE.contains(one)
    # Arrays and ints are taken as tensors are.
    assert env_action(gym.spaces.Discrete(2), {"action": np.array([1, 0])}).tolist() == [1, 0]
    assert env_action(gym.spaces.Discrete(2), {"action": 1}) == 1
    cases = [
        ({"a0": torch.tensor([0, 3]), "a1": torch.tensor([0, 0])},
         r"actions\['a0'\]: expected values in \[0, 3\), got 3 at index \(1,\)"),
        ({"a0": torch.tensor([0, 1])}, r"actions: expected a dict with heads \['a0', 'a1'\]"),
        ({"a0": torch.tensor([0.0]), "a1": torch.tensor([0])},
         r"actions\['a0'\]: expected integers, got torch.float32 \(1,\)"),
        ({"a0": torch.tensor([0, 1]), "a1": torch.tensor(0)},
         r"actions\['a1'\]: expected shape \(2,\) \(that of actions\['a0'\]\), got \(\)"),
        ({"a0": torch.zeros(2, 2, dtype=torch.int64), "a1": torch.zeros(2, 2, dtype=torch.int64)},
         r"actions\['a0'\]: expected shape \(\) or \(B,\), got \(2, 2\)"),
    ]  # fmt: skip
    for actions, message in cases:
        with pytest.raises(ValueError, match=message):
            env_action(MULTI, actions)


@pytest.mark.parametrize("space", [MULTI, DISCRETE])
def test_the_adapter_and_predict_give_the_env_its_own_action_values(space):
    # The adapter's actions and env_action of predict's one-observation actions reach the
    # env as the same values, start offsets added.
    single = Recorder(space)
    adapter = GymAdapter(single, seed=0)
    vec = GymAdapter(gym.vector.SyncVectorEnv([lambda: Recorder(space)] * 2), seed=0)
    agent = PPOAgent(PPOConfig(obs_dim=4, spec=adapter.spec, **SMALL), 1, 8)
    names = adapter.spec.names
    top = {name: torch.tensor([size - 1]) for name, size in adapter.spec.heads}
    adapter.reset()
    vec.reset()
    adapter.step(top)
    vec.step({name: torch.cat([torch.zeros(1, dtype=torch.int64), a]) for name, a in top.items()})
    low = np.asarray(space.start)
    high = low + np.array(adapter.spec.sizes) - 1
    if len(names) == 1:
        low, high = low.item(), high.item()
    else:
        low, high = low.tolist(), high.tolist()
    assert single.taken == [high]
    assert [e.taken for e in vec.env.envs] == [[low], [high]]
    obs, _ = single.reset()
    actions, _ = agent.predict(obs, deterministic=True)
    assert all(actions[name].shape == () for name in names)
    single.step(env_action(space, actions))
    want = [
        int(actions[name]) + s for name, s in zip(names, np.atleast_1d(space.start), strict=True)
    ]
    assert single.taken[-1] == (want[0] if len(names) == 1 else want)


def mean_return(history, last=4):
    returns = [m["episode_return"] for m in history[-last:] if not math.isnan(m["episode_return"])]
    return sum(returns) / len(returns)


def test_learns_cartpole_v1():
    env = GymAdapter(gym.make_vec("CartPole-v1", num_envs=4, vectorization_mode="sync"), seed=0)
    config = PPOConfig(obs_dim=env.obs_dim, spec=env.spec, compile=False, learning_rate=2.5e-3)
    agent = PPOAgent(config, env.num_envs, 128, seed=0)
    history = agent.learn(env, total_steps=12 * 512)
    assert history[0]["episode_return"] < 40
    assert mean_return(history) >= 150


def test_learns_a_masked_multidiscrete_env_that_only_a_masked_policy_scores():
    def make():
        return gym.vector.SyncVectorEnv([Masked] * 8)

    env = GymAdapter(make(), seed=0)
    config = PPOConfig(obs_dim=4, spec=env.spec, compile=False, learning_rate=3e-3, gamma=0.9)
    agent = PPOAgent(config, env.num_envs, 32, seed=0)
    history = agent.learn(env, total_steps=12 * 256)
    learned = mean_return(history)
    # Uniform policies over 200 episodes: unmasked, an invalid a1 (3 in 5) ends the episode;
    # masked, a1 is always valid but a0 hits the target only 1 time in 4.
    rng = np.random.default_rng(0)
    scores = {"unmasked": [], "masked": []}
    for kind in scores:
        single = Masked()
        for episode in range(100):
            single.reset(seed=episode)
            total, done = 0.0, False
            while not done:
                a1 = (
                    rng.choice(np.flatnonzero(single.valid))
                    if kind == "masked"
                    else rng.integers(5)
                )
                _, r, term, trunc, _ = single.step(np.array([rng.integers(4), a1]))
                total, done = total + r, term or trunc
            scores[kind].append(total)
    unmasked, masked = np.mean(scores["unmasked"]), np.mean(scores["masked"])
    assert unmasked < 0.5 and masked < 5.0
    assert learned > 12.0, (learned, masked, unmasked)
    assert history[-1]["discarded_steps"] >= 0 and history[-1]["nonfinite_skips"] == 0


def test_cli_trains_a_gym_env_and_writes_the_usual_outputs(tmp_path, capsys):
    from funcppo.cli.main import main

    argv = ["train", "--env", "gym:CartPole-v1", "--seeds", "1", "--num-envs", "2"]
    argv += ["--num-steps", "64", "--total-steps", "512", "--no-compile", "--out", str(tmp_path)]
    assert main([*argv, "--normalize-obs", "--anneal-clip"]) == 0
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    clips = [json.loads(line)["clip_coef"][0] for line in lines]
    assert clips == pytest.approx([0.2, 0.15, 0.1, 0.05])
    record = json.loads(lines[-1])
    assert record["env_steps"] == 512 and record["ratio_worst_head"] == ["action"]
    assert "| all |" in capsys.readouterr().out
    env = GymAdapter(gym.make_vec("CartPole-v1", num_envs=2), seed=0)
    agent = PPOAgent(PPOConfig(obs_dim=4, spec=env.spec, compile=False), 2, 64, normalize_obs=True)
    agent.load(tmp_path / "checkpoint.pt")
    assert int(agent.state.step) == 4
    assert float(agent.obs_stats.count) > 512  # the flag reached the agent
    with pytest.raises(SystemExit):
        main(["train", "--env", "nope", "--out", str(tmp_path)])
    assert "expected one of" in capsys.readouterr().err


def test_cli_sweep_over_a_gym_env_gives_each_agent_its_value(tmp_path, capsys):
    from funcppo.cli.main import main

    argv = ["train", "--env", "gym:CartPole-v1", "--seeds", "2", "--num-envs", "2"]
    argv += ["--num-steps", "64", "--total-steps", "128", "--no-compile", "--out", str(tmp_path)]
    assert main([*argv, "--sweep", "learning_rate=1e-3,3e-3"]) == 0
    assert "| learning_rate=0.003 |" in capsys.readouterr().out
    env = GymAdapter(gym.make_vec("CartPole-v1", num_envs=2), seed=0)
    for i, lr in enumerate([1e-3, 3e-3]):
        config = PPOConfig(obs_dim=4, spec=env.spec, compile=False, learning_rate=lr)
        agent = PPOAgent(config, 2, 64)
        agent.load(tmp_path / f"checkpoint-{i}.pt")
        assert float(agent.state.hparams.learning_rate) == pytest.approx(lr)
        # Another learning rate fine-tunes: the loaded state takes the config's.
        tuned = PPOAgent(config.replace(learning_rate=2.5e-4), 2, 64)
        tuned.load(tmp_path / f"checkpoint-{i}.pt")
        assert float(tuned.state.hparams.learning_rate) == pytest.approx(2.5e-4)
