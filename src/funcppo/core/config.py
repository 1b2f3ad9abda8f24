"""PPO hyperparameters as one frozen, hashable dataclass.

Compiled functions close over a ``PPOConfig``, so every field is immutable (tuples, not lists or
dicts) and the whole config hashes. Defaults follow CleanRL's ``ppo.py`` where it has the field;
``funcppo.envs.lifecycle_spec.esper_config`` carries the original agent's values instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from funcppo.core.constants import ADAM_EPS
from funcppo.core.spec import ActionSpec

__all__ = ["TENSOR_HYPERPARAMS", "PPOConfig", "anneal_left", "check_hparam"]

HeadFloats = tuple[tuple[str, float], ...]

_ACTIVATIONS = ("tanh", "relu")


def anneal_left(update: int, num_updates: int) -> float:
    """The share of a linearly annealed value (learning rate, clipping range) that update
    ``update`` (0-based) of ``num_updates`` uses: ``1 - update / num_updates``, so the first
    update uses all of it and the last ``1 / num_updates`` (CleanRL's schedule)."""
    return 1.0 - update / num_updates


def _fail(name: str, expected: str, got: Any) -> NoReturn:
    raise ValueError(f"{name}: expected {expected}, got {got!r}")


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(name, f"an int >= {low}", value)


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(name, "a bool", value)


def _check_float(
    name: str, value: Any, low: float, high: float, low_open: bool, high_open: bool
) -> None:
    """``value`` is a real number in the interval; NaN fails every comparison and is rejected."""
    brackets = ("(" if low_open else "[", ")" if high_open else "]")
    expected = f"a number in {brackets[0]}{low}, {high}{brackets[1]}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(name, expected, value)
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        _fail(name, expected, value)


def _head_floats(name: str, value: Any, spec: ActionSpec, low: float, high: float) -> HeadFloats:
    """Normalise a mapping or pairs to ``((head, float), ...)`` in the spec's head order."""
    if isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        try:
            pairs = [tuple(pair) for pair in value]
        except TypeError:
            pairs = None
        if pairs is None or any(len(pair) != 2 for pair in pairs):
            _fail(name, "a mapping or (head, value) pairs", value)
    given = dict(pairs)
    if len(given) != len(pairs):
        _fail(name, "each head at most once", value)
    unknown = sorted(set(given) - set(spec.names))
    if unknown:
        _fail(name, f"head names from {list(spec.names)}", unknown)
    for head, number in given.items():
        _check_float(f"{name}[{head!r}]", number, low, high, False, False)
    return tuple((head, float(given[head])) for head in spec.names if head in given)


# PPOConfig's fields that the update reads from ``TrainState.hparams`` (``state.Hyperparams``),
# never from the config itself.
TENSOR_HYPERPARAMS = (
    "learning_rate",
    "ent_coef",
    "clip_coef",
    "vf_coef",
    "gamma",
    "gae_lambda",
    "max_grad_norm",
    "target_kl",
)

_INF = math.inf
# The float fields' ranges: name -> (low, high, low_open, high_open).
_RANGES = {
    "gamma": (0.0, 1.0, True, False),
    "gae_lambda": (0.0, 1.0, False, False),
    "clip_coef": (0.0, _INF, True, True),
    "value_clip": (0.0, _INF, True, True),
    "vf_coef": (0.0, _INF, False, True),
    "ent_coef": (0.0, _INF, False, True),
    "entropy_floor_coef": (0.0, _INF, False, True),
    "max_grad_norm": (0.0, _INF, True, False),
    "learning_rate": (0.0, _INF, True, True),
    "adam_eps": (0.0, _INF, True, True),
    "weight_decay": (0.0, _INF, False, True),
}


def check_hparam(name: str, value: Any, label: str | None = None) -> float:
    """``value`` as a float, checked against the range of tensor hyperparameter ``name`` (one of
    ``TENSOR_HYPERPARAMS``) that ``PPOConfig`` enforces; the error names ``label`` (default
    ``name``). ``target_kl`` may be None or +inf, both stored as +inf: no target."""
    label = name if label is None else label
    if name == "target_kl":
        if value is None or (isinstance(value, (int, float)) and value == _INF):
            return _INF
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            _fail(label, "None or a number in (0.0, inf]", value)
        return float(value)
    _check_float(label, value, *_RANGES[name])
    return float(value)


@dataclass(frozen=True)
class PPOConfig:
    """Everything the network and the update need, validated on construction.

    Network: ``torso_sizes`` hidden layers with ``activation``; with ``recurrent`` an LSTM of
    ``lstm_size`` follows the torso, and actor and critic share torso and LSTM (as CleanRL's
    ``ppo_atari_lstm`` and the original agent do), so ``shared_torso`` only affects the MLP, whose
    critic has its own torso by default (CleanRL ``ppo.py``).

    ``bptt_len``: the update replays the rollout in chunks of this many steps with gradient.
    Gradients are truncated at chunk starts: each chunk starts from the hidden state the rollout
    recorded there (no gradient flows into it), and episode starts inside a chunk reset the state.

    Loss: ``ent_coef`` scales the mean over heads of ``head_ent_coef[h] * entropy_h`` (missing
    heads 1.0; a mean, as a sum would multiply the coefficient by the number of heads).
    ``entropy_floor`` maps heads to a floor in [0, 1] on their normalised entropy, penalised with
    ``entropy_floor_coef * relu(floor_h - mean_h)``, where ``mean_h`` averages head h's entropy
    over the minibatch's steps at which some valid op uses h and h has more than one valid
    action (``funcppo.core.spec.entropy_floor_masks``; with one valid action the entropy is 0 by
    construction); a head with no such step in a minibatch adds nothing. ``value_clip`` is the
    value-clipping range (separate from ``clip_coef``: values have the scale of returns, not of
    ratios). ``weight_decay`` applies to the critic only (on actor heads it kills exploration).
    ``grad_accum_steps`` splits each minibatch into that many micro-batches (the same gradient in
    less memory; docs/design.md, Gradient accumulation).

    Hyperparameters as tensors: the fields in ``TENSOR_HYPERPARAMS`` (``learning_rate``,
    ``ent_coef``, ``clip_coef``, ``vf_coef``, ``gamma``, ``gae_lambda``, ``max_grad_norm``,
    ``target_kl``) seed a train state's ``hparams`` (``funcppo.training.state.init_train_state``),
    and the update reads them from the state, never from the config: per seed under vmap, and
    changeable without a recompile (``funcppo.training.state.with_hparams``).
    ``make_update_fn(config)`` refuses a state whose values differ from these unless told to take
    the state's (``hparams="state"``, as ``make_train`` and ``PPOAgent`` do for sweeps and
    schedules).
    """

    obs_dim: int
    spec: ActionSpec
    torso_sizes: tuple[int, ...] = (64, 64)
    activation: str = "tanh"
    recurrent: bool = False
    lstm_size: int = 128
    bptt_len: int = 16
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_coef: float = 0.2
    clip_vloss: bool = True
    value_clip: float = 0.2
    vf_coef: float = 0.5
    ent_coef: float = 0.01
    head_ent_coef: HeadFloats = ()
    entropy_floor: HeadFloats = ()
    entropy_floor_coef: float = 0.1
    max_grad_norm: float = 0.5
    target_kl: float | None = None
    update_epochs: int = 4
    num_minibatches: int = 4
    learning_rate: float = 2.5e-4
    adam_eps: float = ADAM_EPS
    weight_decay: float = 0.0
    norm_adv: bool = True
    grad_accum_steps: int = 1
    compile: bool = True
    shared_torso: bool = False

    def __post_init__(self) -> None:
        _check_int("obs_dim", self.obs_dim, 1)
        if not isinstance(self.spec, ActionSpec):
            _fail("spec", "an ActionSpec", type(self.spec).__name__)
        if isinstance(self.torso_sizes, (str, bytes)) or not hasattr(self.torso_sizes, "__iter__"):
            _fail("torso_sizes", "a sequence of ints >= 1", self.torso_sizes)
        sizes = tuple(self.torso_sizes)
        for i, size in enumerate(sizes):
            _check_int(f"torso_sizes[{i}]", size, 1)
        object.__setattr__(self, "torso_sizes", sizes)
        if self.activation not in _ACTIVATIONS:
            _fail("activation", f"one of {_ACTIVATIONS}", self.activation)
        for name in ("recurrent", "clip_vloss", "norm_adv", "compile", "shared_torso"):
            _check_bool(name, getattr(self, name))
        for name in ("lstm_size", "bptt_len", "update_epochs", "num_minibatches"):
            _check_int(name, getattr(self, name), 1)
        _check_int("grad_accum_steps", self.grad_accum_steps, 1)
        for name, bounds in _RANGES.items():
            value = getattr(self, name)
            _check_float(name, value, *bounds)
            object.__setattr__(self, name, float(value))
        if self.target_kl is not None:
            _check_float("target_kl", self.target_kl, 0.0, _INF, True, True)
            object.__setattr__(self, "target_kl", float(self.target_kl))
        coefs = _head_floats("head_ent_coef", self.head_ent_coef, self.spec, 0.0, _INF)
        floors = _head_floats("entropy_floor", self.entropy_floor, self.spec, 0.0, 1.0)
        object.__setattr__(self, "head_ent_coef", coefs)
        object.__setattr__(self, "entropy_floor", floors)

    def head_ent_coefs(self) -> dict[str, float]:
        """Entropy multiplier per head, every head of the spec present (missing ones 1.0)."""
        given = dict(self.head_ent_coef)
        return {name: given.get(name, 1.0) for name in self.spec.names}

    def entropy_floors(self) -> dict[str, float]:
        """Normalised-entropy floor per head that has one (heads without a floor are absent)."""
        return dict(self.entropy_floor)

    def replace(self, **changes: Any) -> PPOConfig:
        """A copy with ``changes`` applied, validated again."""
        return dataclasses.replace(self, **changes)

    def compile_key(self) -> tuple:
        """What code compiled for this config depends on (precompiled files are keyed by it):
        every field, but of those that travel as tensors in ``Hyperparams`` only whether they
        are set, so that a run with another learning rate reuses the code."""
        return tuple(
            (f.name, getattr(self, f.name) is None)
            if f.name in TENSOR_HYPERPARAMS
            else (f.name, getattr(self, f.name))
            for f in dataclasses.fields(self)
        )
