"""callbacks: learn's callback protocol (False stops, hooks at start and end, lists in order),
periodic evaluation that keeps the best agent, periodic checkpoints that load back, and
TensorBoard logging of every update's metrics (read back from the event file where tensorboard
is installed)."""

import math
import sys

import gymnasium as gym
import optree
import pytest
import torch

from funcppo.agent.agent import PPOAgent
from funcppo.agent.callbacks import (
    Callback,
    CheckpointCallback,
    EvalCallback,
    TensorBoardCallback,
    summary_writer,
)
from funcppo.agent.gym_adapter import GymAdapter
from funcppo.agent.gym_evaluate import evaluate_policy
from funcppo.core.config import PPOConfig

SMALL = {"torso_sizes": (8,), "compile": False, "update_epochs": 1, "num_minibatches": 2}
NUM_ENVS, NUM_STEPS = 2, 8
PER_UPDATE = NUM_ENVS * NUM_STEPS


def cartpole(seed=0, num_envs=NUM_ENVS):
    return GymAdapter(gym.make_vec("CartPole-v1", num_envs, vectorization_mode="sync"), seed=seed)


def make_agent(env, seed=0):
    config = PPOConfig(obs_dim=env.obs_dim, spec=env.spec, **SMALL)
    return PPOAgent(config, env.num_envs, NUM_STEPS, seed=seed)


def leaves_equal(a, b):
    return all(
        torch.equal(x, y) for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True)
    )


class Log(Callback):
    """Records every hook it sees; stops after ``stop_at`` updates."""

    def __init__(self, calls, name, stop_at=None):
        super().__init__()
        self.calls, self.name, self.stop_at = calls, name, stop_at

    def on_training_start(self, agent):
        self.calls.append((self.name, "start"))

    def after_update(self, agent, metrics):
        self.calls.append((self.name, self.num_updates, sorted(k for k in metrics if k == "x")))
        metrics[self.name] = self.num_timesteps
        return False if self.num_updates == self.stop_at else None

    def on_training_end(self, agent):
        self.calls.append((self.name, "end"))


def test_false_stops_after_that_update_and_every_callback_runs_in_order():
    env, calls = cartpole(), []
    first, second = Log(calls, "x", stop_at=2), Log(calls, "y")
    history = make_agent(env).learn(env, 5 * PER_UPDATE, [first, second])
    assert len(history) == 2
    # The second sees what the first added to the metrics; both run in the stopping update.
    assert calls == [
        ("x", "start"), ("y", "start"),
        ("x", 1, []), ("y", 1, ["x"]),
        ("x", 2, []), ("y", 2, ["x"]),
        ("x", "end"), ("y", "end"),
    ]  # fmt: skip
    assert [m["y"] for m in history] == [PER_UPDATE, 2 * PER_UPDATE]
    # Counts go on across learn calls.
    make_agent(env).learn(env, PER_UPDATE, second)
    assert second.num_updates == 3 and second.num_timesteps == 3 * PER_UPDATE


def test_plain_functions_and_objects_without_hooks_are_callbacks():
    env, seen = cartpole(), []

    def stop_on_second(agent, metrics):
        seen.append(metrics["loss"])
        return len(seen) < 2

    class OnlyUpdate:
        def __init__(self):
            self.n = 0

        def on_update(self, agent, metrics):
            self.n += 1

    only = OnlyUpdate()
    agent = make_agent(env)
    history = agent.learn(env, 4 * PER_UPDATE, callback=[stop_on_second, only])
    assert len(history) == 2 and seen == [m["loss"] for m in history] and only.n == 2
    assert agent.learn(env, 2 * PER_UPDATE, callback=lambda agent, m: True) != []


def test_the_end_hook_runs_when_training_fails_and_bad_callbacks_are_named():
    env, calls = cartpole(), []

    class Fails(Log):
        def after_update(self, agent, metrics):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        make_agent(env).learn(env, 3 * PER_UPDATE, Fails(calls, "f"))
    assert calls == [("f", "start"), ("f", "end")]
    with pytest.raises(TypeError, match=r"expected None, True or False from on_update, got 1"):
        make_agent(env).learn(env, PER_UPDATE, lambda agent, metrics: 1)
    with pytest.raises(TypeError, match=r"callback: expected an object with on_update"):
        make_agent(env).learn(env, PER_UPDATE, [3])


def test_checkpoints_every_n_updates_load_back(tmp_path):
    env = cartpole()
    agent = make_agent(env)
    saver = CheckpointCallback(2, tmp_path / "ckpt", name_prefix="cp")
    states = []

    def snapshot(agent, metrics):
        states.append(optree.tree_map(torch.clone, agent.state))

    agent.learn(env, 5 * PER_UPDATE, [saver, snapshot])
    names = [p.name for p in saver.saved]
    assert names == [f"cp_{2 * PER_UPDATE}_steps.pt", f"cp_{4 * PER_UPDATE}_steps.pt"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted(names)
    for path, after in zip(saver.saved, (2, 4), strict=True):
        reloaded = PPOAgent.from_checkpoint(path)
        assert leaves_equal(reloaded.state, states[after - 1])
        assert not leaves_equal(reloaded.state.params, agent.state.params)
    with pytest.raises(ValueError, match=r"save_freq: expected an int >= 1, got 0"):
        CheckpointCallback(0, tmp_path)


def test_evaluation_keeps_the_best_agent(tmp_path):
    env = cartpole()
    # A seeded adapter: every evaluation plays the same starts, so a saved agent's figure
    # can be checked by evaluating it again.
    eval_env = cartpole(seed=123)
    evaluator = EvalCallback(
        eval_env, eval_freq=2, n_eval_episodes=3, best_model_save_path=tmp_path
    )
    agent = make_agent(env)
    history = agent.learn(env, 6 * PER_UPDATE, evaluator)
    assert [t for t, _, _ in evaluator.evaluations] == [
        2 * PER_UPDATE,
        4 * PER_UPDATE,
        6 * PER_UPDATE,
    ]
    means = [sum(r) / len(r) for _, r, _ in evaluator.evaluations]
    assert [m.get("eval_mean_reward") for m in history] == [
        None,
        means[0],
        None,
        means[1],
        None,
        means[2],
    ]
    assert evaluator.best_mean_reward == max(means) and evaluator.last_mean_reward == means[-1]
    best = PPOAgent.from_checkpoint(tmp_path / "best_model.pt", num_envs=NUM_ENVS)
    mean, std = evaluate_policy(best, eval_env, 3)
    assert mean == evaluator.best_mean_reward
    assert history[1 + 2 * means.index(max(means))]["eval_std_reward"] == std


def test_evaluation_stops_training_at_the_reward_threshold():
    env = cartpole()
    stop = EvalCallback(cartpole(seed=1), eval_freq=2, n_eval_episodes=2, reward_threshold=0.0)
    assert len(make_agent(env).learn(env, 6 * PER_UPDATE, stop)) == 2
    never = EvalCallback(cartpole(seed=1), eval_freq=2, n_eval_episodes=2, reward_threshold=1e9)
    assert len(make_agent(env).learn(env, 4 * PER_UPDATE, never)) == 4


class FakeWriter:
    def __init__(self):
        self.scalars, self.flushed, self.closed = [], 0, False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        self.flushed += 1

    def close(self):
        self.closed = True


def test_tensorboard_logs_every_numeric_metric_against_env_steps():
    env, writer = cartpole(), FakeWriter()
    evaluator = EvalCallback(cartpole(seed=5), eval_freq=2, n_eval_episodes=2)
    history = make_agent(env).learn(
        env, 2 * PER_UPDATE, [evaluator, TensorBoardCallback(writer=writer)]
    )
    for u, metrics in enumerate(history):
        logged = {tag: value for tag, value, step in writer.scalars if step == (u + 1) * PER_UPDATE}
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (bool, int, float))}
        assert logged.keys() == numeric.keys() and "ratio_worst_head" not in logged
        assert all(
            v == logged[k] or (math.isnan(v) and math.isnan(logged[k])) for k, v in numeric.items()
        )
    assert "eval_mean_reward" in {tag for tag, _, step in writer.scalars if step == 2 * PER_UPDATE}
    assert writer.flushed == 1 and not writer.closed
    with pytest.raises(ValueError, match="exactly one of log_dir and writer"):
        TensorBoardCallback()


def test_tensorboard_event_file_holds_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = cartpole()
    logger = TensorBoardCallback(tmp_path / "tb")
    history = make_agent(env).learn(env, 3 * PER_UPDATE, logger)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [PER_UPDATE, 2 * PER_UPDATE, 3 * PER_UPDATE]
    assert [e.value for e in loss] == pytest.approx([m["loss"] for m in history], rel=1e-6)


def test_missing_tensorboard_is_an_import_error_naming_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(
        ImportError, match=r"needs the tensorboard package: pip install tensorboard"
    ):
        summary_writer(tmp_path)
    with pytest.raises(ImportError, match="tensorboard"):
        TensorBoardCallback(tmp_path)
