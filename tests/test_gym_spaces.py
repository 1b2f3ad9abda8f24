"""gym_spaces: observation spaces encoded as Stable-Baselines3's preprocess_obs encodes them
(compared with it where it is installed, and by hand), Dict and Tuple concatenated in the
space's order, errors that name the part; and action spaces with no categorical heads refused,
naming the space."""

from collections import OrderedDict

import gymnasium as gym
import numpy as np
import pytest
import torch

from funcppo.agent.agent import PPOAgent
from funcppo.agent.gym_adapter import GymAdapter, gym_action_spec
from funcppo.agent.gym_spaces import ObsError, make_obs_encoder
from funcppo.core.config import PPOConfig

S = gym.spaces
IMAGE = S.Box(0, 255, (3, 4, 5), np.uint8)
SPACES = {
    "box": S.Box(-2.0, 2.0, (2, 3), np.float32),
    "image": IMAGE,
    "discrete": S.Discrete(5),
    "multidiscrete": S.MultiDiscrete([3, 4, 2]),
    "multibinary": S.MultiBinary(6),
    "multibinary2d": S.MultiBinary((2, 3)),
    "dict": S.Dict({"pos": S.Box(-1, 1, (2,)), "cell": S.Discrete(4), "bits": S.MultiBinary(3)}),
}


def batch_of(space, n, seed=0):
    """``n`` samples of ``space``, stacked as a vector env gives them."""
    space.seed(seed)
    samples = [space.sample() for _ in range(n)]
    if isinstance(space, S.Dict):
        return {key: np.stack([s[key] for s in samples]) for key in space}
    return np.stack(samples)


@pytest.mark.parametrize("name", sorted(SPACES))
def test_encodings_match_stable_baselines3(name):
    preprocessing = pytest.importorskip("stable_baselines3.common.preprocessing")
    space, n = SPACES[name], 7
    obs = batch_of(space, n)
    ours = make_obs_encoder(space)(obs, n)
    if isinstance(space, S.Dict):
        theirs = preprocessing.preprocess_obs(
            {k: torch.as_tensor(v) for k, v in obs.items()}, space
        )
        # SB3's CombinedExtractor flattens each key and concatenates them in the space's order.
        theirs = torch.cat([theirs[key].reshape(n, -1) for key in space.spaces], dim=1)
        dim = sum(preprocessing.get_flattened_obs_dim(sub) for sub in space.spaces.values())
    else:
        theirs = preprocessing.preprocess_obs(torch.as_tensor(obs), space).reshape(n, -1)
        dim = preprocessing.get_flattened_obs_dim(space)
    assert ours.dtype == np.float32 and ours.shape == (n, dim)
    assert make_obs_encoder(space).dim == dim
    np.testing.assert_array_equal(ours, theirs.numpy())


def test_encodings_by_hand():
    encode = make_obs_encoder(S.Discrete(3, start=2))
    np.testing.assert_array_equal(encode(3), [0, 1, 0])
    np.testing.assert_array_equal(encode(np.array([4, 2]), 2), [[0, 0, 1], [1, 0, 0]])
    encode = make_obs_encoder(S.MultiDiscrete([2, 3], start=[1, -1]))
    np.testing.assert_array_equal(encode(np.array([2, 1])), [0, 1, 0, 0, 1])
    # A two-axis MultiDiscrete in row-major order.
    encode = make_obs_encoder(S.MultiDiscrete([[2, 3], [2, 2]]))
    np.testing.assert_array_equal(encode(np.array([[1, 0], [0, 1]])), [0, 1, 1, 0, 0, 1, 0, 0, 1])
    np.testing.assert_array_equal(
        make_obs_encoder(S.MultiBinary(3))(np.array([1, 0, 1])), [1, 0, 1]
    )
    image = np.full((3, 4, 5), 51, dtype=np.uint8)
    np.testing.assert_allclose(make_obs_encoder(IMAGE)(image), np.full(60, 0.2), rtol=1e-7)
    # A uint8 Box that is no image (two axes) keeps its values, as in SB3.
    flat = make_obs_encoder(S.Box(0, 255, (2, 2), np.uint8))(np.full((2, 2), 51, np.uint8))
    np.testing.assert_array_equal(flat, [51, 51, 51, 51])


def test_dict_and_tuple_parts_follow_the_space_order():
    parts = {"b": S.Discrete(2), "a": S.Box(-1, 1, (1,))}
    obs = {"b": 1, "a": np.array([0.5], np.float32)}
    # gymnasium sorts a plain dict's keys: "a" first.
    np.testing.assert_array_equal(make_obs_encoder(S.Dict(parts))(obs), [0.5, 0, 1])
    # An OrderedDict keeps its order, in gymnasium's flatten and in SB3's CombinedExtractor.
    ordered = S.Dict(OrderedDict(parts))
    np.testing.assert_array_equal(make_obs_encoder(ordered)(obs), [0, 1, 0.5])
    np.testing.assert_array_equal(S.flatten(ordered, obs), [0, 1, 0.5])
    blackjack = gym.make("Blackjack-v1").observation_space
    encode = make_obs_encoder(blackjack)
    assert encode.dim == 32 + 11 + 2
    np.testing.assert_array_equal(encode((20, 10, 1)), S.flatten(blackjack, (20, 10, 1)))
    batch = (np.array([20, 4]), np.array([10, 1]), np.array([1, 0]))
    np.testing.assert_array_equal(encode(batch, 2)[1], S.flatten(blackjack, (4, 1, 0)))


def test_observations_that_do_not_fit_name_the_part():
    with pytest.raises(ObsError, match=r"observation: expected values in \[2, 5\), got 5 at row 0"):
        make_obs_encoder(S.Discrete(3, start=2))(5)
    with pytest.raises(ObsError, match=r"expected values in \[0, 4\), got 4 at index 1 of row 1"):
        make_obs_encoder(S.MultiDiscrete([3, 4]))(np.array([[0, 0], [1, 4]]), 2)
    with pytest.raises(ObsError, match=r"observation: expected integers, got float64"):
        make_obs_encoder(S.Discrete(3))(1.0)
    dict_space = S.Dict({"pos": S.Box(-1, 1, (2,)), "cell": S.Discrete(4)})
    with pytest.raises(
        ObsError, match=r"expected a dict with keys \['cell', 'pos'\], got \['pos'\]"
    ):
        make_obs_encoder(dict_space)({"pos": np.zeros(2)})
    with pytest.raises(
        ObsError, match=r"observation\['pos'\]: expected shape \(2,\) per env \(batch \(3, 2\)\)"
    ):
        make_obs_encoder(dict_space)({"pos": np.zeros((3, 3)), "cell": np.zeros(3, int)}, 3)


def test_unsupported_observation_spaces_are_refused_by_name():
    with pytest.raises(ValueError, match=r"observation_space: expected Box, Discrete, .*got Text"):
        make_obs_encoder(S.Text(5))
    with pytest.raises(ValueError, match=r"observation_space\['inner'\]: a Dict inside a Dict"):
        make_obs_encoder(S.Dict({"inner": S.Dict({"x": S.Discrete(2)})}))
    with pytest.raises(ValueError, match=r"observation_space\[1\]: a Tuple inside a Tuple"):
        make_obs_encoder(S.Tuple([S.Discrete(2), S.Tuple([S.Discrete(2)])]))
    with pytest.raises(ValueError, match=r"observation_space\['s'\]: expected Box, .*got Sequence"):
        make_obs_encoder(S.Dict({"s": S.Sequence(S.Discrete(2))}))


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            S.Box(-1.0, 1.0, (2,), np.float32),
            r"action_space: expected Discrete or MultiDiscrete, got Box\(-1.0, 1.0, \(2,\), "
            r"float32\); funcppo's heads are categorical, so continuous actions are not supported",
        ),
        (S.MultiBinary(3), r"got MultiBinary\(3\); .* MultiDiscrete\(\[2\] \* n\)"),
        (S.MultiDiscrete([[2, 3]]), r"its nvec has shape \(1, 2\); expected one axis"),
        (S.Tuple([S.Discrete(2)] * 2), r"got Tuple\(Discrete\(2\), Discrete\(2\)\); composite"),
        (S.Dict({"a": S.Discrete(2)}), r"got Dict\('a': Discrete\(2\)\); composite"),
    ],
)
def test_action_spaces_without_categorical_heads_are_refused_by_name(space, message):
    with pytest.raises(ValueError, match=message):
        gym_action_spec(space)


class Walk(gym.Env):
    """A Dict observation (a Discrete cell and a Box) and a Discrete one-hot, stepped: the
    adapter encodes both the same way as the encoder, batched and in ``final_obs``."""

    def __init__(self):
        self.observation_space = S.Dict({"cell": S.Discrete(4), "noise": S.Box(-1, 1, (2,))})
        self.action_space = S.Discrete(2)

    def _obs(self):
        return {"cell": self.t, "noise": np.array([self.t / 4, -self.t / 4], np.float32)}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        return self._obs(), 1.0, self.t == 3, False, {}


@pytest.mark.parametrize("mode", ["single", gym.vector.AutoresetMode.SAME_STEP])
def test_the_adapter_encodes_what_it_steps_and_an_agent_learns_on_it(mode):
    env = Walk() if mode == "single" else gym.vector.SyncVectorEnv([Walk] * 2, autoreset_mode=mode)
    adapter = GymAdapter(env, seed=0)
    assert adapter.obs_dim == 6 and adapter.obs_encoder.dim == 6 and adapter.obs_shape is None
    encode = make_obs_encoder(Walk().observation_space)
    obs, _ = adapter.reset()
    np.testing.assert_array_equal(
        obs.numpy(), np.stack([encode({"cell": 0, "noise": [0, 0]})] * adapter.num_envs)
    )
    step = None
    for _ in range(3):
        step = adapter.step({"action": torch.zeros(adapter.num_envs, dtype=torch.int64)})
    # The step that ended the episode: final_obs is cell 3, obs the reset's cell 0.
    last = encode({"cell": 3, "noise": np.array([0.75, -0.75], np.float32)})
    np.testing.assert_array_equal(step.final_obs.numpy()[0], last)
    assert step.obs[0, 0] == 1.0 and step.obs[0, :4].sum() == 1.0
    config = PPOConfig(obs_dim=adapter.obs_dim, spec=adapter.spec, torso_sizes=(8,), compile=False)
    agent = PPOAgent(config, adapter.num_envs, 8)
    history = agent.learn(adapter, 2 * 8 * adapter.num_envs)
    assert len(history) == 2 and all(np.isfinite(m["loss"]) for m in history)
