"""Loading an agent's checkpoint: run-time settings may differ from the saved agent's (the
number of envs, the learning rate), the architecture may not, an agent rebuilt from the file
alone predicts exactly as the saved one, and a resumed run continues bit-exactly."""

import gymnasium as gym
import pytest
import torch

from funcppo.agent.agent import PPOAgent
from funcppo.agent.checkpoint import AgentCarry, carry_from_extra, carry_to_extra
from funcppo.agent.gym_adapter import GymAdapter
from funcppo.core.networks import LSTMState
from funcppo.core.normalize import RewardScaleState, init_running_stats
from funcppo.core.spec import ActionSpec
from funcppo.training.checkpoint import save_checkpoint
from test_agent import assert_trees_equal, cartpole, config_for

LSTM = {"recurrent": True, "lstm_size": 8, "bptt_len": 4}
NORMALIZE = {"normalize_obs": True, "normalize_reward": True}
THREE_ACTIONS = ActionSpec({"action": 3}, "action", [(), (), ()])  # CartPole's has 2


def trained(tmp_path, num_envs, recurrent=False, updates=1, **settings):
    """An agent after ``updates`` updates on CartPole, saved to ``tmp_path / "agent.pt"``."""
    env = cartpole(num_envs)
    config = config_for(env, **(LSTM if recurrent else {}))
    agent = PPOAgent(config, num_envs, 8, seed=3, **settings)
    agent.learn(env, 8 * num_envs * updates)
    agent.save(tmp_path / "agent.pt")
    return agent, env


def predictions(agent, steps=6, batch=3, deterministic=True):
    """Actions and LSTM states for a fixed observation sequence, fed back as an evaluation
    loop does."""
    g = torch.Generator().manual_seed(0)
    hidden, out = None, []
    for t in range(steps):
        obs = torch.randn(batch, agent.config.obs_dim, generator=g)
        start = torch.full((batch,), t == 0)
        actions, hidden = agent.predict(obs, None, hidden, deterministic, episode_start=start)
        out.append((actions, hidden))
    return out


def test_an_agent_evaluates_with_another_number_of_envs(tmp_path):
    saved, _ = trained(tmp_path, 4, recurrent=True, **NORMALIZE)
    evaluator = PPOAgent(saved.config, 2, 32, **NORMALIZE)
    evaluator.load(tmp_path / "agent.pt")
    assert_trees_equal(evaluator.state, saved.state)
    assert_trees_equal(evaluator.obs_stats, saved.obs_stats)
    assert_trees_equal(evaluator.reward_scale.stats, saved.reward_scale.stats)
    assert_trees_equal(predictions(evaluator), predictions(saved))
    # Each of the 2 envs starts a new episode: nothing of the 4 saved envs' episodes carries.
    assert evaluator.episode_start.tolist() == [True, True]
    assert_trees_equal(evaluator.hidden, LSTMState(torch.zeros(2, 8), torch.zeros(2, 8)))
    assert evaluator.reward_scale.returns.tolist() == [0.0, 0.0]
    evaluator.learn(cartpole(2), 2 * 32)  # and it trains on, at its own size
    assert int(evaluator.state.step) == 2


def test_an_agent_fine_tunes_with_another_learning_rate(tmp_path):
    saved, _ = trained(tmp_path, 2)
    config = saved.config.replace(learning_rate=1e-3, update_epochs=3)
    tuned = PPOAgent(config, 2, 8, seed=99)
    tuned.load(tmp_path / "agent.pt")
    assert float(tuned.state.hparams.learning_rate) == pytest.approx(1e-3)
    assert_trees_equal(tuned.state.params, saved.state.params)
    # The same carry, keys and env: the same rollout, trained on at the new rate and epochs,
    # as the saved state trained at that rate by an explicit override.
    env, copy = cartpole(2, seed=7), cartpole(2, seed=7)
    reference = PPOAgent(config, 2, 8, seed=99)
    reference.load(tmp_path / "agent.pt")
    reference.state = reference.state._replace(hparams=saved.state.hparams)
    tuned.collect(env)
    reference.collect(copy)
    tuned.update()
    reference.update(learning_rate=1e-3)
    assert_trees_equal(tuned.state.params, reference.state.params)
    assert not torch.equal(tuned.state.params["torso"]["w0"], saved.state.params["torso"]["w0"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"torso_sizes": (16,)}, r"config.torso_sizes: .* has \[8\], this config \[16\]"),
        ({**LSTM}, r"config.recurrent: .* has False, this config True"),
        ({"spec": THREE_ACTIONS}, r"config.spec.heads: .*this config \[\['action', 3\]\]"),
    ],
)
def test_another_architecture_is_refused_naming_what_differs(tmp_path, change, message):
    saved, _ = trained(tmp_path, 2)
    with pytest.raises(ValueError, match=message + ".*must match"):
        PPOAgent(saved.config.replace(**change), 2, 8).load(tmp_path / "agent.pt")


def test_another_lstm_size_or_observation_normalisation_is_refused(tmp_path):
    saved, _ = trained(tmp_path, 2, recurrent=True)
    with pytest.raises(ValueError, match=r"config.lstm_size: .* has 8, this config 4"):
        PPOAgent(saved.config.replace(lstm_size=4), 2, 8).load(tmp_path / "agent.pt")
    with pytest.raises(ValueError, match="agent/normalize_obs: checkpoint has False, this agent"):
        PPOAgent(saved.config, 2, 8, normalize_obs=True).load(tmp_path / "agent.pt")


@pytest.mark.parametrize("recurrent", [False, True])
def test_from_checkpoint_rebuilds_the_agent_and_its_predictions(tmp_path, recurrent):
    saved, _ = trained(tmp_path, 4, recurrent=recurrent, normalize_obs=True, clip_obs=5.0)
    want = predictions(saved), predictions(saved, deterministic=False)
    agent = PPOAgent.from_checkpoint(tmp_path / "agent.pt")
    assert agent.config == saved.config and agent.settings == saved.settings
    assert_trees_equal(agent.state, saved.state)
    assert_trees_equal(agent.obs_stats, saved.obs_stats)
    assert_trees_equal((predictions(agent), predictions(agent, deterministic=False)), want)
    smaller = PPOAgent.from_checkpoint(tmp_path / "agent.pt", num_envs=2, learning_rate=1e-3)
    assert smaller.num_envs == 2 and smaller.config.learning_rate == 1e-3
    assert float(smaller.state.hparams.learning_rate) == pytest.approx(1e-3)
    assert_trees_equal(predictions(smaller), want[0])
    with pytest.raises(
        ValueError, match=r"overrides: expected PPOAgent's arguments .*got \['bogus'\]"
    ):
        PPOAgent.from_checkpoint(tmp_path / "agent.pt", bogus=1)
    with pytest.raises(ValueError, match=r"config.torso_sizes: .*must match"):
        PPOAgent.from_checkpoint(tmp_path / "agent.pt", torso_sizes=(4,))


def test_from_checkpoint_needs_a_file_an_agent_saved(tmp_path):
    saved, _ = trained(tmp_path, 2)
    save_checkpoint(tmp_path / "bare.pt", saved.state, saved.config)
    with pytest.raises(ValueError, match=r"bare.pt: no agent settings .*PPOAgent.save"):
        PPOAgent.from_checkpoint(tmp_path / "bare.pt")
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        PPOAgent.from_checkpoint(tmp_path / "missing.pt")


def test_from_checkpoint_resumes_bit_exactly(tmp_path):
    (tmp_path / "straight").mkdir()
    straight, _ = trained(tmp_path / "straight", 2, recurrent=True, updates=4, **NORMALIZE)
    _, env_b = trained(tmp_path, 2, recurrent=True, updates=2, **NORMALIZE)
    resumed = PPOAgent.from_checkpoint(tmp_path / "agent.pt")
    resumed.learn(env_b, 8 * 2 * 2)
    for name in ("state", "obs_stats", "reward_scale", "hidden", "episode_start"):
        assert_trees_equal(getattr(resumed, name), getattr(straight, name))
    assert int(resumed.state.step) == 4


def _carry(num_envs, scaled=True):
    g, f64 = torch.Generator().manual_seed(num_envs), torch.float64
    stats = init_running_stats(())._replace(mean=torch.tensor(num_envs / 3, dtype=f64))
    return AgentCarry(
        torch.rand(num_envs, generator=g) > 0.5,
        torch.rand(num_envs, generator=g, dtype=torch.float64),
        torch.rand(num_envs, generator=g, dtype=torch.float64),
        LSTMState(torch.randn(num_envs, 5, generator=g), torch.randn(num_envs, 5, generator=g)),
        init_running_stats((3,))._replace(count=torch.tensor(num_envs + 0.5, dtype=f64)),
        RewardScaleState(torch.rand(num_envs, generator=g, dtype=f64), stats) if scaled else None,
    )


def test_carry_fits_another_number_of_envs_and_reward_setting():
    saved = _carry(4)
    settings = {"num_envs": 4, "normalize_obs": True, "normalize_reward": True}
    extra = carry_to_extra(settings, saved)
    mine = _carry(2)
    got = carry_from_extra("c.pt", extra, settings | {"num_envs": 2}, mine)
    # The per-env entries are the agent's own (new episodes); the statistics are kept.
    stats = saved.reward_scale.stats
    want = mine._replace(
        obs_stats=saved.obs_stats, reward_scale=mine.reward_scale._replace(stats=stats)
    )
    assert_trees_equal(got, want)
    # Saved with reward scaling, loaded without: its statistics are not needed.
    off = settings | {"normalize_reward": False}
    got = carry_from_extra("c.pt", extra, off, saved._replace(reward_scale=None))
    assert_trees_equal(got, saved._replace(reward_scale=None))
    # Saved without, loaded with: the agent's fresh statistics.
    plain = carry_to_extra(off, saved._replace(reward_scale=None))
    assert_trees_equal(carry_from_extra("c.pt", plain, settings, saved), saved)
    with pytest.raises(ValueError, match=r"c.pt: extra\['agent/hidden_h'\]: missing"):
        carry_from_extra("c.pt", {k: v for k, v in extra.items() if k != "agent/hidden_h"},
                         settings, saved)  # fmt: skip
    bad = extra | {"agent/hidden_c": torch.zeros(4, 6)}
    with pytest.raises(ValueError, match=r"extra\['agent/hidden_c'\]: expected torch.float32"):
        carry_from_extra("c.pt", bad, settings | {"num_envs": 2}, mine)
    with pytest.raises(ValueError, match=r"c.pt: extra\['surprise'\]: not written by"):
        carry_from_extra("c.pt", extra | {"surprise": torch.zeros(1)}, settings, saved)


def test_resume_is_bit_exact_when_every_episode_ends_at_the_save(tmp_path):
    """Episodes of exactly num_steps: under NEXT_STEP autoreset each rollout ends on an
    episode's last step, so the first action after the save is one the env ignores, and the
    resumed agent must know it (it stays out of the observation statistics)."""

    def make_env():
        vec = gym.make_vec(
            "CartPole-v1", num_envs=2, vectorization_mode="sync", max_episode_steps=8
        )
        return GymAdapter(vec, seed=1)

    def agent():
        return PPOAgent(config_for(make_env()), 2, 8, seed=3, normalize_obs=True)

    straight, env = agent(), make_env()
    straight.learn(env, 8 * 2 * 4)
    first, env_b = agent(), make_env()
    first.learn(env_b, 8 * 2 * 2)
    first.save(tmp_path / "agent.pt")
    resumed = PPOAgent.from_checkpoint(tmp_path / "agent.pt")
    assert resumed.next_valid.tolist() == first.next_valid.tolist() == [False, False]
    resumed.learn(env_b, 8 * 2 * 2)
    assert_trees_equal(resumed.obs_stats, straight.obs_stats)
    assert_trees_equal(resumed.state, straight.state)


def test_carry_keeps_next_valid_and_reads_files_written_without_it():
    saved = _carry(2)._replace(next_valid=torch.tensor([False, True]))
    settings = {"num_envs": 2, "normalize_obs": True, "normalize_reward": True}
    extra = carry_to_extra(settings, saved)
    mine = _carry(2)._replace(next_valid=torch.ones(2, dtype=torch.bool))
    assert_trees_equal(carry_from_extra("c.pt", extra, settings, mine), saved)
    older = {k: v for k, v in extra.items() if k != "agent/next_valid"}
    got = carry_from_extra("c.pt", older, settings, mine)
    assert_trees_equal(got, saved._replace(next_valid=mine.next_valid))
