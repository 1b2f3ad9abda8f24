"""PPOAgent: its update is make_update_fn on its rollout, resume is bit-exact, faults are
skipped and counted with parameters unchanged, bad input names the argument, the ratio
diagnostic names the worst head, and predict leaves the agent as it was (its deterministic
actions the masked argmax, op head first)."""

import math

import gymnasium as gym
import numpy as np
import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from funcppo.agent.agent import EnvStep, PPOAgent
from funcppo.agent.checkpoint import AgentCarry, carry_from_extra, carry_to_extra
from funcppo.agent.gym_adapter import GymAdapter
from funcppo.agent.predict import factored_argmax
from funcppo.agent.rollout import compact_rollout, zero_rollout
from funcppo.core.config import PPOConfig
from funcppo.core.networks import LSTMState, init_hidden, policy_apply
from funcppo.core.normalize import init_reward_scale, init_running_stats, normalize_obs
from funcppo.core.spec import ActionSpec
from funcppo.training.state import Batch
from funcppo.training.update import make_update_fn

SMALL = {"torso_sizes": (8,), "compile": False, "update_epochs": 2, "num_minibatches": 2}
SPEC = ActionSpec({"op": 3, "a1": 4}, "op", [(), ("a1",), ("a1",)])
# The slot mask depends on the op: [..., n_ops, 4], the row of the chosen op applies.
SLOTS = ActionSpec({"op": 3, "slot": 4}, "op", [(), ("slot",), ("slot",)], op_conditioned=["slot"])


def cartpole(num_envs=2, seed=1):
    vec = gym.make_vec("CartPole-v1", num_envs=num_envs, vectorization_mode="sync")
    return GymAdapter(vec, seed=seed)


def config_for(env, **kw):
    return PPOConfig(obs_dim=env.obs_dim, spec=env.spec, **(SMALL | kw))


def assert_trees_equal(a, b):
    la, sa = optree.tree_flatten(a, none_is_leaf=False)
    lb, sb = optree.tree_flatten(b, none_is_leaf=False)
    assert sa == sb
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)


def same_metrics(a, b):
    assert a.keys() == b.keys()
    for k in a:
        both_nan = isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k])
        assert both_nan or a[k] == b[k], k


def test_update_is_make_update_fn_on_the_rollout():
    env = cartpole()
    agent = PPOAgent(config_for(env), env.num_envs, 16, seed=0)
    agent.collect(env)
    batch, before = agent.rollout(), agent.state
    metrics = agent.update()
    want_state, want = make_update_fn(agent.config)(before, batch)
    assert_trees_equal(agent.state, want_state)
    assert metrics["loss"] == float(want["loss"]) and metrics["episodes"] >= 0
    assert metrics["ratio_worst_head"] == "action"
    assert metrics["ratio_max/action"] == float(want["ratio_max/action"])


def test_update_for_one_call_schedule_is_make_update_fn_with_those_hparams():
    # update(learning_rate, clip_coef=...) runs the update with those values, then the state
    # keeps the configured ones; a bad value is refused by the config's own range check.
    env = cartpole()
    agent = PPOAgent(config_for(env), env.num_envs, 16, seed=0)
    agent.collect(env)
    batch, before = agent.rollout(), agent.state
    metrics = agent.update(3e-2, clip_coef=1e-4)
    hp = before.hparams._replace(learning_rate=torch.tensor(3e-2), clip_coef=torch.tensor(1e-4))
    update = make_update_fn(agent.config, hparams="state")
    want_state, want = update(before._replace(hparams=hp), batch)
    assert_trees_equal(agent.state.params, want_state.params)
    assert metrics["clip_fraction"] == float(want["clip_fraction"]) > 0.0
    assert_trees_equal(agent.state.hparams, before.hparams)
    agent.collect(env)
    with pytest.raises(ValueError, match=r"clip_coef: expected a number in \(0"):
        agent.update(clip_coef=0.0)
    with pytest.raises(ValueError, match=r"learning_rate: expected a number"):
        agent.update(float("nan"))


def test_learn_anneals_the_clipping_range():
    env = cartpole()
    agent = PPOAgent(config_for(env, clip_coef=0.3), env.num_envs, 16, seed=0)
    seen = []
    real_update = agent.update

    def spy(learning_rate=None, batch=None, clip_coef=None):
        seen.append((learning_rate, clip_coef))
        return real_update(learning_rate, batch, clip_coef)

    agent.update = spy
    agent.learn(env, total_steps=4 * 2 * 16, anneal_clip=True)
    assert [c for _, c in seen] == pytest.approx([0.3, 0.225, 0.15, 0.075])
    assert [lr for lr, _ in seen] == [None] * 4  # anneal_lr is off


def test_act_is_reproducible_from_the_seed():
    env = cartpole()
    actions = []
    for seed in (0, 0, 1):
        agent = PPOAgent(config_for(env), env.num_envs, 64, seed=seed)
        obs = torch.zeros(env.num_envs, env.obs_dim)
        steps = []
        for _ in range(64):
            steps.append(agent.act(obs)["action"])
            agent.observe(
                EnvStep(obs, torch.zeros(2), torch.zeros(2, dtype=bool), torch.zeros(2, dtype=bool))
            )
        actions.append(torch.stack(steps))
    assert torch.equal(actions[0], actions[1]) and not torch.equal(actions[0], actions[2])


@pytest.mark.parametrize("recurrent", [False, True])
def test_resume_through_the_agent_is_bit_exact(tmp_path, recurrent):
    kw = {"recurrent": recurrent, "lstm_size": 8, "bptt_len": 4}
    settings = {"normalize_obs": True, "normalize_reward": True}

    def make(seed, env):
        return PPOAgent(config_for(env, **kw), env.num_envs, 8, seed=seed, **settings)

    env_a = cartpole()
    straight = make(0, env_a)
    history = [straight.learn(env_a, 8 * 2 * 4)]
    env_b = cartpole()
    first = make(0, env_b)
    first.learn(env_b, 8 * 2 * 2)
    first.save(tmp_path / "agent.pt")
    resumed = make(123, env_b)
    resumed.load(tmp_path / "agent.pt")
    history.append(resumed.learn(env_b, 8 * 2 * 2))
    assert_trees_equal(resumed.state, straight.state)
    assert_trees_equal(resumed.obs_stats, straight.obs_stats)
    assert_trees_equal(resumed.reward_scale, straight.reward_scale)
    assert_trees_equal(resumed.hidden, straight.hidden)
    same_metrics(history[1][-1], history[0][-1])
    assert int(resumed.state.step) == 4


class Corrupt(gym.Wrapper):
    """Replaces the observation or the reward of step ``at`` with ``value``."""

    def __init__(self, env, field, value, at=5):
        super().__init__(env)
        self.field, self.value, self.at, self.t = field, value, at, 0

    def step(self, action):
        obs, reward, term, trunc, info = self.env.step(action)
        self.t += 1
        if self.t == self.at:
            if self.field == "obs":
                obs = np.full_like(obs, self.value)
            else:
                reward = self.value
        return obs, reward, term, trunc, info


@pytest.mark.parametrize("field", ["obs", "reward"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_obs_and_rewards_skip_and_count_and_leave_params(field, value):
    env = GymAdapter(Corrupt(gym.make("CartPole-v1"), field, value), seed=0)
    config = config_for(env, num_minibatches=1)
    agent = PPOAgent(config, 1, 16, normalize_obs=True, normalize_reward=True)
    before = agent.state
    agent.collect(env)
    metrics = agent.update()
    assert metrics["nonfinite_skips"] == 2.0 and metrics["updates_applied"] == 0.0
    assert_trees_equal(agent.state.params, before.params)
    assert_trees_equal(agent.state.opt_state, before.opt_state)
    # The normalisers never saw the fault.
    for leaf in optree.tree_leaves((agent.obs_stats, agent.reward_scale)):
        assert bool(torch.isfinite(leaf).all())
    # The next rollout is clean, and the update applies.
    agent.collect(env)
    assert agent.update()["updates_applied"] == 2.0


def test_nonfinite_values_skip_and_count_and_leave_params():
    env = cartpole()
    agent = PPOAgent(config_for(env), env.num_envs, 16)
    agent.collect(env)
    batch = agent.rollout()
    values = batch.values.clone()
    values[3, 0] = math.nan
    values[12, 1] = math.inf
    before = agent.state
    # Rollout steps 3 and 12 make 2 of the 32 samples non-finite; both minibatches hold one
    # of them in at least one epoch, so some steps are skipped and the counts add up.
    metrics = agent.update(batch=batch._replace(values=values))
    assert metrics["nonfinite_skips"] + metrics["updates_applied"] == 4.0
    assert metrics["nonfinite_skips"] >= 2.0
    every = batch._replace(values=torch.full_like(values, math.nan))
    agent.state = before
    metrics = agent.update(batch=every)
    assert metrics["nonfinite_skips"] == 4.0
    assert_trees_equal(agent.state.params, before.params)


def test_ratio_diagnostic_names_the_worst_head():
    config = PPOConfig(obs_dim=4, spec=SPEC, **SMALL)
    agent = PPOAgent(config, 2, 16)
    obs = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    no = torch.zeros(2, dtype=bool)
    while not agent.ready:
        agent.act(obs)
        agent.observe(EnvStep(obs, torch.ones(2), no, no))
    batch = agent.rollout()
    # Old log-probs of a1 lowered by 3: its ratio is e^3 ~ 20 where the op uses it.
    logprobs = dict(batch.logprobs, a1=batch.logprobs["a1"] - 3.0)
    metrics = agent.update(batch=batch._replace(logprobs=logprobs))
    assert metrics["ratio_worst_head"] == "a1"
    assert metrics["ratio_max/a1"] > 15 and metrics["ratio_max/op"] < 2
    assert metrics["ratio_explosion"] == 1.0 and metrics["ratio_collapse"] == 0.0


def test_bad_input_names_the_argument(tmp_path):
    env = cartpole()
    agent = PPOAgent(config_for(env), 2, 16)
    obs, no = torch.zeros(2, 4), torch.zeros(2, dtype=bool)
    with pytest.raises(
        ValueError, match=r"obs: expected float \(2, 4\), got torch.float32 \(2, 3\)"
    ):
        agent.act(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"obs: expected float \(2, 4\), got torch.int64"):
        agent.act(torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(
        ValueError, match=r"masks\['action'\]: no valid action at batch index \(1,\)"
    ):
        agent.act(obs, {"action": torch.tensor([[True, False], [False, False]])})
    with pytest.raises(RuntimeError, match="observe: no actions"):
        agent.observe(EnvStep(obs, torch.zeros(2), no, no))
    agent.act(obs)
    with pytest.raises(RuntimeError, match="act: the previous actions were not observed"):
        agent.act(obs)
    with pytest.raises(
        ValueError, match=r"step.reward: expected float \(2,\), got torch.float32 \(3,\)"
    ):
        agent.observe(EnvStep(obs, torch.zeros(3), no, no))
    with pytest.raises(
        ValueError, match=r"step.terminated: expected bool \(2,\), got torch.float32"
    ):
        agent.observe(EnvStep(obs, torch.zeros(2), torch.zeros(2), no))
    agent.observe(EnvStep(obs, torch.zeros(2), no, no))
    with pytest.raises(RuntimeError, match="save: 1 steps of an unfinished rollout"):
        agent.save(tmp_path / "a.pt")
    with pytest.raises(RuntimeError, match=r"expected 16 observed transitions .* got 1"):
        agent.update()
    with pytest.raises(ValueError, match=r"batch\.obs: .*num_minibatches=2"):
        PPOAgent(config_for(env), 1, 3)
    agent.collect(env)
    batch = agent.rollout()
    high = dict(batch.actions, action=batch.actions["action"].clone())
    high["action"][5, 1] = 2
    with pytest.raises(
        ValueError,
        match=r"batch.actions\['action'\]: expected values in \[0, 2\), got 2 at index \(5, 1\)",
    ):
        agent.update(batch=batch._replace(actions=high))
    masks = dict(batch.masks, action=batch.masks["action"].clone())
    masks["action"][4, 0, int(batch.actions["action"][4, 0])] = False
    with pytest.raises(
        ValueError, match=r"batch.actions\['action'\]: .* at index \(4, 0\), which it forbids"
    ):
        agent.update(batch=batch._replace(masks=masks))
    agent.update()
    agent.save(tmp_path / "a.pt")
    other = PPOAgent(config_for(env), 2, 16, normalize_obs=True)
    with pytest.raises(
        ValueError, match="agent/normalize_obs: checkpoint has False, this agent True"
    ):
        other.load(tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"config\.torso_sizes: .*must match"):
        PPOAgent(config_for(env, torso_sizes=(4,)), 2, 16).load(tmp_path / "a.pt")


def test_a_given_batchs_bad_action_or_mask_names_the_head_and_changes_nothing():
    # The update's own checks refuse it, before anything is trained: for the op-conditioned
    # slot head, a forbidden action is named with the row of the op that was taken.
    agent = PPOAgent(PPOConfig(obs_dim=4, spec=SLOTS, **SMALL), 2, 16)
    batch = zero_rollout(agent.config, 16, 2)  # op 0 and slot 0 everywhere, all allowed
    before = agent.state
    high = dict(batch.actions, slot=batch.actions["slot"].clone())
    high["slot"][3, 1] = 4
    with pytest.raises(
        ValueError,
        match=r"batch.actions\['slot'\]: expected values in \[0, 4\), got 4 at index \(3, 1\)",
    ):
        agent.update(batch=batch._replace(actions=high))
    ops = dict(batch.actions, op=batch.actions["op"].clone())
    ops["op"][2, 0] = 1
    masks = dict(batch.masks, slot=batch.masks["slot"].clone())
    masks["slot"][2, 0, 1, 0] = False  # slot 0 in op 1's row only
    with pytest.raises(
        ValueError,
        match=r"batch.actions\['slot'\]: .*got 0 at index \(2, 0\), which it forbids in the "
        r"row of the taken op 1",
    ):
        agent.update(batch=batch._replace(actions=ops, masks=masks))
    assert agent.state is before and agent.metrics == {}
    masks["slot"][2, 0, 1, 0], masks["slot"][2, 0, 2, 0] = True, False  # another op's row
    agent.update(batch=batch._replace(actions=ops, masks=masks))
    assert int(agent.state.step) == 1


def test_act_takes_an_explicit_lstm_state():
    env = cartpole()
    config = config_for(env, recurrent=True, lstm_size=8, bptt_len=4)
    obs, no = (
        torch.randn(2, 4, generator=torch.Generator().manual_seed(1)),
        torch.zeros(2, dtype=bool),
    )
    given = LSTMState(torch.ones(2, 8), -torch.ones(2, 8))
    agent = PPOAgent(config, 2, 16)
    agent.episode_start = no  # mid-episode, so the given state is used, not zeroed
    agent.act(obs, hidden=given)
    want = policy_apply(agent.state.params, config, obs, given, no).hidden
    agent.observe(EnvStep(obs, torch.zeros(2), no, no))
    assert_trees_equal(agent.hidden, want)
    with pytest.raises(ValueError, match=r"hidden: expected None"):
        PPOAgent(config_for(env), 2, 16).act(obs, hidden=given)
    with pytest.raises(ValueError, match=r"hidden: expected float \(2, 8\)"):
        PPOAgent(config, 2, 16).act(obs, hidden=LSTMState(torch.ones(2, 3), torch.ones(2, 3)))


def masks_for(op, slot):
    return {"op": torch.tensor(op), "slot": torch.tensor(slot)}


T, F = True, False
# Three envs. Env 1 masks op 1 (the unmasked argmax); every env's slot row of its chosen op
# masks slot 0 (the unmasked argmax) or leaves one slot only.
HAND_MASKS = masks_for(
    [[T, T, T], [T, F, T], [T, F, F]],
    [
        [[T, T, T, T], [F, T, T, T], [T, T, T, T]],
        [[T, T, T, T], [T, T, T, T], [F, T, F, T]],
        [[F, F, F, T], [T, T, T, T], [T, T, T, T]],
    ],
)


def with_logits(agent, op, slot):
    """The agent with zero head weights: its logits are the given biases for any obs."""
    params = optree.tree_map(torch.clone, agent.state.params)
    for name, bias in (("op", op), ("slot", slot)):
        params["heads"][name]["w"].zero_()
        params["heads"][name]["b"].copy_(torch.tensor(bias))
    agent.state = agent.state._replace(params=params)
    return agent


def test_deterministic_predict_is_the_masked_argmax_op_first():
    agent = PPOAgent(PPOConfig(obs_dim=4, spec=SLOTS, **SMALL), 2, 16)
    with_logits(agent, [0.5, 2.0, 1.0], [3.0, 1.0, 2.0, 0.0])
    obs = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    actions, hidden = agent.predict(obs, HAND_MASKS, deterministic=True)
    # Env 0: op 1 (2.0); its slot row [F, T, T, T] leaves 1.0, 2.0, 0.0: slot 2.
    # Env 1: op 1 masked, so op 2 (1.0 > 0.5); row [F, T, F, T] leaves 1.0, 0.0: slot 1.
    # Env 2: only op 0; row [F, F, F, T]: slot 3.
    assert actions["op"].tolist() == [1, 2, 0] and actions["slot"].tolist() == [2, 1, 3]
    assert actions["op"].dtype == torch.int64 and hidden is None
    # Sampled predictions respect the same masks, slot under the sampled op's row.
    for _ in range(20):
        sampled, _ = agent.predict(obs, HAND_MASKS)
        op = sampled["op"]
        assert bool(HAND_MASKS["op"][torch.arange(3), op].all())
        assert bool(HAND_MASKS["slot"][torch.arange(3), op, sampled["slot"]].all())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(0, 2**31 - 1), st.booleans())
def test_factored_argmax_against_a_naive_loop(batch, seed, ties):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: argmax must take the first of the tied maxima
        logits = {"op": torch.randint(0, 2, (batch, 3), generator=g).float()}
        logits["slot"] = torch.randint(0, 2, (batch, 4), generator=g).float()
    else:
        logits = {
            "op": torch.randn(batch, 3, generator=g),
            "slot": torch.randn(batch, 4, generator=g),
        }
    masks = {
        "op": torch.rand(batch, 3, generator=g) < 0.5,
        "slot": torch.rand(batch, 3, 4, generator=g) < 0.5,
    }
    masks["op"][torch.arange(batch), torch.randint(0, 3, (batch,), generator=g)] = True
    for b in range(batch):
        for o in range(3):
            masks["slot"][b, o, torch.randint(0, 4, (), generator=g)] = True
    got = factored_argmax(SLOTS, logits, masks)

    def best(values, valid):
        picks = [i for i in range(len(values)) if valid[i]]
        return max(picks, key=lambda i: (values[i], -i))

    for b in range(batch):
        op = best(logits["op"][b].tolist(), masks["op"][b].tolist())
        slot = best(logits["slot"][b].tolist(), masks["slot"][b, op].tolist())
        assert (int(got["op"][b]), int(got["slot"][b])) == (op, slot)
    # torch.distributions agrees on the op head: the mode of the masked categorical.
    masked = torch.where(masks["op"], logits["op"], -math.inf)
    assert torch.equal(got["op"], torch.distributions.Categorical(logits=masked).mode)


def run(agent, steps, probe=None):
    """``steps`` act/observe rounds on fixed random observations; ``probe(agent)`` (predict
    calls) runs before each act and between act and observe. Returns the sampled actions."""
    g = torch.Generator().manual_seed(3)
    taken = []
    for t in range(steps):
        obs = torch.randn(2, 4, generator=g)
        masks = {"op": torch.tensor([[T, T, F], [T, T, T]]), "a1": torch.ones(2, 4, dtype=bool)}
        if probe is not None:
            probe(agent)
        taken.append(agent.act(obs, masks))
        if probe is not None:
            probe(agent)
        done = torch.tensor([t % 3 == 2, False])
        agent.observe(EnvStep(obs, torch.randn(2, generator=g), done, torch.zeros(2, dtype=bool)))
    return taken


def test_predict_leaves_the_agent_and_its_next_actions_as_they_were():
    kw = {"recurrent": True, "lstm_size": 8, "bptt_len": 4}
    config = PPOConfig(obs_dim=4, spec=SPEC, **(SMALL | kw))
    settings = {"normalize_obs": True, "normalize_reward": True}
    plain, probed = (PPOAgent(config, 2, 8, seed=5, **settings) for _ in range(2))
    obs = torch.randn(3, 4, generator=torch.Generator().manual_seed(9))
    hidden = LSTMState(torch.ones(3, 8), torch.ones(3, 8))

    def probe(agent):
        agent.predict(obs)
        agent.predict(obs, deterministic=True)
        agent.predict(obs, None, hidden, episode_start=torch.tensor([T, F, F]))

    assert_trees_equal(run(plain, 8), run(probed, 8, probe))
    for name in ("obs_stats", "reward_scale", "hidden", "episode_start", "episode_return"):
        assert_trees_equal(getattr(probed, name), getattr(plain, name))
    assert_trees_equal(probed.rollout(), plain.rollout())
    same_metrics(probed.update(), plain.update())
    assert_trees_equal(probed.state, plain.state)
    assert_trees_equal(run(plain, 3), run(probed, 3, probe))
    # predict acts on the observation normalised by the current statistics.
    out = policy_apply(
        probed.state.params,
        config,
        normalize_obs(probed.obs_stats, obs, 10.0),
        init_hidden(config, 3),
        torch.zeros(3, dtype=bool),
    )
    full = {"op": torch.ones(3, 3, dtype=bool), "a1": torch.ones(3, 4, dtype=bool)}
    actions, next_hidden = probed.predict(obs, deterministic=True)
    assert_trees_equal(actions, factored_argmax(SPEC, out.logits, full))
    assert_trees_equal(next_hidden, out.hidden)


def test_sampled_predictions_are_reproducible_and_vary_per_call():
    config = PPOConfig(obs_dim=4, spec=SPEC, **SMALL)
    obs = torch.zeros(64, 4)
    draws = []
    for _ in range(2):
        agent = PPOAgent(config, 2, 16, seed=0)
        draws.append([agent.predict(obs)[0] for _ in range(3)])
    assert_trees_equal(draws[0], draws[1])
    assert not torch.equal(draws[0][0]["op"], draws[0][1]["op"])


def test_predict_carries_an_lstm_through_an_evaluation_loop():
    config = PPOConfig(obs_dim=4, spec=SPEC, recurrent=True, lstm_size=8, bptt_len=4, **SMALL)
    agent = PPOAgent(config, 2, 16, seed=1)
    g = torch.Generator().manual_seed(2)
    obs = torch.randn(5, 3, 4, generator=g)  # [T, B] with B = 3, not the agent's num_envs
    starts = torch.zeros(5, 3, dtype=bool)
    starts[0], starts[3, 1] = True, True  # env 1 starts a new episode at step 3
    hidden, stepped = None, []
    for t in range(5):
        actions, hidden = agent.predict(obs[t], None, hidden, True, episode_start=starts[t])
        stepped.append(actions)
    # The same steps as one sequence through the LSTM.
    out = policy_apply(agent.state.params, config, obs, init_hidden(config, 3), starts)
    full = {"op": torch.ones(5, 3, 3, dtype=bool), "a1": torch.ones(5, 3, 4, dtype=bool)}
    want = factored_argmax(SPEC, out.logits, full)
    for name in SPEC.names:
        assert torch.equal(torch.stack([a[name] for a in stepped]), want[name])
    for x, y in zip(hidden, out.hidden, strict=True):
        torch.testing.assert_close(x, y)


def test_predict_bad_input_names_the_argument():
    mlp = PPOAgent(PPOConfig(obs_dim=4, spec=SLOTS, **SMALL), 2, 16)
    lstm = PPOAgent(PPOConfig(obs_dim=4, spec=SLOTS, recurrent=True, lstm_size=8, **SMALL), 2, 16)
    obs = torch.zeros(3, 4)
    cases = [
        (mlp, (torch.zeros(3, 5),), {},
         r"obs: expected float \(4,\) or \(B, 4\), got torch.float32 \(3, 5"),
        (mlp, (torch.zeros(5),), {},
         r"obs: expected float \(4,\) or \(B, 4\), got torch.float32 \(5,\)"),
        (mlp, (torch.zeros(3, 4, dtype=torch.int64),), {}, r"obs: .* got torch.int64 \(3, 4\)"),
        (mlp, ("x",), {}, r"obs: expected float \(4,\) or \(B, 4\), got str"),
        (mlp, (obs, [1]), {}, r"masks: expected a dict over heads, got list"),
        (mlp, (obs, {"op": torch.ones(3, 3, dtype=bool)}), {}, r"masks: expected heads"),
        (mlp, (obs, masks_for([[T, T, T]] * 2, [[[T] * 4] * 3] * 2)), {},
         r"masks: expected batch shape \(3,\) \(that of obs\), got \(2,\)"),
        (mlp, (obs, masks_for([[T, T, T]] * 3, [[[T] * 4] * 3] * 3)), {"deterministic": "yes"},
         r"deterministic: expected a bool, got 'yes'"),
        (mlp, (obs, None, LSTMState(torch.zeros(3, 8), torch.zeros(3, 8))), {},
         r"hidden: expected None for an MLP config"),
        (lstm, (obs, None, LSTMState(torch.zeros(2, 8), torch.zeros(2, 8))), {},
         r"hidden: expected float \(3, 8\), got torch.float32 \(2, 8\)"),
        (lstm, (obs,), {"episode_start": torch.zeros(3)},
         r"episode_start: expected bool \(3,\), got torch.float32 \(3,\)"),
    ]  # fmt: skip
    for agent, args, kw, message in cases:
        with pytest.raises(ValueError, match=message):
            agent.predict(*args, **kw)
    # A numpy batch works as a tensor does.
    actions, hidden = lstm.predict(np.zeros((3, 4), dtype=np.float32), deterministic=True)
    assert actions["op"].shape == (3,) and hidden.h.shape == (3, 8)


@pytest.mark.parametrize("recurrent", [False, True])
def test_predict_takes_one_unbatched_observation(recurrent):
    # One observation [obs_dim] is a batch of one whose batch axis every input and output
    # leaves out: masks per head [size] ([n_ops, size] op-conditioned), hidden [lstm_size],
    # episode_start a bool, actions 0-d.
    config = PPOConfig(obs_dim=4, spec=SLOTS, recurrent=recurrent, lstm_size=8, **SMALL)
    one_agent, batch_agent = PPOAgent(config, 2, 16, seed=4), PPOAgent(config, 2, 16, seed=4)
    obs = torch.randn(4, generator=torch.Generator().manual_seed(0))
    masks = {name: m[1] for name, m in HAND_MASKS.items()}
    hidden = LSTMState(torch.ones(8), -torch.ones(8)) if recurrent else None
    batched_hidden = None if hidden is None else LSTMState(*(x[None] for x in hidden))
    for deterministic in (True, False, False):
        got, got_hidden = one_agent.predict(obs, masks, hidden, deterministic, episode_start=False)
        want, want_hidden = batch_agent.predict(
            obs[None], {name: m[None] for name, m in masks.items()}, batched_hidden,
            deterministic, episode_start=torch.tensor([False]),
        )  # fmt: skip
        for name in SLOTS.names:
            assert got[name].shape == () and got[name].dtype == torch.int64
            assert torch.equal(got[name], want[name][0])
        assert bool(masks["op"][got["op"]]) and bool(masks["slot"][got["op"], got["slot"]])
        if recurrent:
            assert_trees_equal(got_hidden, LSTMState(*(x[0] for x in want_hidden)))
        else:
            assert got_hidden is None
    # A gymnasium observation as it comes (float32 numpy [obs_dim]), every action valid.
    actions, _ = one_agent.predict(np.zeros(4, dtype=np.float32))
    assert actions["op"].shape == () and actions["slot"].shape == ()
    cases = [
        ((obs, HAND_MASKS),
         r"masks\['op'\]: expected shape \(3,\) for one observation \(obs \(4,\)\), got \(3, 3\)"),
        ((obs, dict(masks, slot=masks["slot"][0])),
         r"masks\['slot'\]: expected shape \(3, 4\) for one observation .* got \(4,\)"),
    ]  # fmt: skip
    if recurrent:
        cases.append(((obs, None, batched_hidden),
                      r"hidden: expected float \(8,\), got torch.float32 \(1, 8\)"))  # fmt: skip
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            one_agent.predict(*args)
    with pytest.raises(
        ValueError, match=r"episode_start: expected bool \(\), got torch.bool \(1,\)"
    ):
        one_agent.predict(obs, episode_start=torch.tensor([True]))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_compact_rollout_keeps_each_columns_first_valid_steps(num_envs, num_steps, seed):
    g = torch.Generator().manual_seed(seed)
    extra = int(torch.randint(0, 4, (), generator=g))
    valid = torch.rand(num_steps + extra, num_envs, generator=g) < 0.6
    # Each column holds at least num_steps valid steps, as the agent ensures.
    for b in range(num_envs):
        valid[torch.randperm(num_steps + extra, generator=g)[:num_steps], b] = True
    obs = torch.randn(num_steps + extra, num_envs, 2, generator=g)
    rows = [
        Batch(obs[t], {"a": obs[t, :, 0].long()}, {"a": obs[t] > 0}, None, obs[t, :, 1],
              None, None, None, None, None, None)
        for t in range(num_steps + extra)
    ]  # fmt: skip
    got = compact_rollout(rows, list(valid), num_steps)
    for b in range(num_envs):
        kept = [t for t in range(num_steps + extra) if valid[t, b]][:num_steps]
        assert torch.equal(got.obs[:, b], obs[kept, b])
        assert torch.equal(got.masks["a"][:, b], obs[kept, b] > 0)
        assert torch.equal(got.values[:, b], obs[kept, b, 1])
    assert got.logprobs is None and got.obs.shape == (num_steps, num_envs, 2)


def test_agent_carry_round_trips_and_names_a_bad_entry():
    stats = init_running_stats((3,))
    carry = AgentCarry(
        torch.tensor([True, False]),
        torch.tensor([1.5, 2.0], dtype=torch.float64),
        torch.tensor([3.0, 4.0], dtype=torch.float64),
        LSTMState(torch.randn(2, 5), torch.randn(2, 5)),
        stats._replace(count=torch.tensor(7.0, dtype=torch.float64)),
        init_reward_scale(2),
    )
    settings = {"num_envs": 2, "normalize_obs": True}
    extra = carry_to_extra(settings, carry)
    assert_trees_equal(carry_from_extra("c.pt", extra, settings, carry), carry)
    with pytest.raises(ValueError, match=r"c.pt: extra\['agent/hidden_h'\]: missing"):
        carry_from_extra("c.pt", {k: v for k, v in extra.items() if k != "agent/hidden_h"},
                         settings, carry)  # fmt: skip
    bad = extra | {"obs_stats/mean": torch.zeros(4, dtype=torch.float64)}
    with pytest.raises(
        ValueError, match=r"extra\['obs_stats/mean'\]: expected torch.float64 \[3\]"
    ):
        carry_from_extra("c.pt", bad, settings, carry)
    # Saved with reward scaling, loaded into an agent without: the statistics are not needed.
    unscaled = carry._replace(reward_scale=None)
    assert_trees_equal(carry_from_extra("c.pt", extra, settings, unscaled), unscaled)
