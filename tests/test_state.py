"""Tests for funcppo.training.state: hyperparameters from the config, overrides,
``with_hparams``."""

from __future__ import annotations

import math

import optree
import pytest
import torch

from funcppo.core import random as jr
from funcppo.core.config import TENSOR_HYPERPARAMS, PPOConfig
from funcppo.core.spec import ActionSpec
from funcppo.training.state import Hyperparams, init_train_state, make_hyperparams, with_hparams

SPEC = ActionSpec({"op": 3, "arg": 4}, "op", [(), ("arg",), ("arg",)])


def small_config(**changes) -> PPOConfig:
    return PPOConfig(
        **{"obs_dim": 5, "spec": SPEC, "torso_sizes": (8,), "compile": False, **changes}
    )


def test_hyperparams_are_the_config_tensor_fields():
    assert Hyperparams._fields == TENSOR_HYPERPARAMS
    hp = make_hyperparams(small_config(learning_rate=1e-3, target_kl=None))
    assert hp.learning_rate.dtype == torch.float32 and hp.learning_rate.shape == ()
    assert hp.learning_rate.item() == pytest.approx(1e-3)
    assert hp.target_kl.item() == math.inf  # no target: early stopping never fires


def test_target_kl_none_means_no_target_in_overrides():
    config = small_config(target_kl=0.02)
    assert make_hyperparams(config, target_kl=None).target_kl.item() == math.inf
    state = init_train_state(jr.key(0), config, target_kl=None)
    assert state.hparams.target_kl.item() == math.inf
    states = init_train_state(jr.split(jr.key(0), 2), config, target_kl=None)
    assert states.hparams.target_kl.tolist() == [math.inf, math.inf]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr": 1e-3}, r"overrides: expected fields of Hyperparams .*got unknown \['lr'\]"),
        ({"gamma": 1.5}, r"gamma: expected a number in \(0.0, 1.0\], got 1.5"),
        ({"learning_rate": None}, r"learning_rate: expected a number in \(0.0, inf\), got None"),
        ({"clip_coef": torch.tensor(-0.1)}, r"clip_coef: expected a number in \(0.0, inf\)"),
    ],
)
def test_overrides_are_validated_like_the_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_hyperparams(small_config(), **overrides)
    with pytest.raises(ValueError, match=message):
        init_train_state(jr.key(0), small_config(), **overrides)


def test_with_hparams_replaces_only_the_named_fields():
    state = init_train_state(jr.key(0), small_config(target_kl=0.02))
    new = with_hparams(state, learning_rate=1e-3, target_kl=None, clip_coef=torch.tensor(0.1))
    assert new.hparams.learning_rate.item() == pytest.approx(1e-3)
    assert new.hparams.target_kl.item() == math.inf
    assert new.hparams.clip_coef.item() == pytest.approx(0.1)
    assert new.hparams.gamma is state.hparams.gamma and new.params is state.params
    # Pure: the given state is unchanged.
    assert state.hparams.learning_rate.item() == pytest.approx(2.5e-4)
    assert state.hparams.target_kl.item() == pytest.approx(0.02)
    # Equal to a state made from the config with those values.
    made = make_hyperparams(small_config(learning_rate=1e-3, clip_coef=0.1))
    for name in ("learning_rate", "clip_coef", "target_kl", "gamma"):
        assert torch.equal(getattr(new.hparams, name), getattr(made, name)), name


def test_with_hparams_on_stacked_states():
    states = init_train_state(jr.split(jr.key(0), 3), small_config())
    new = with_hparams(states, learning_rate=1e-3, ent_coef=torch.tensor([0.0, 0.1, 0.2]))
    assert new.hparams.learning_rate.shape == (3,)
    assert new.hparams.learning_rate.tolist() == pytest.approx([1e-3] * 3)
    assert new.hparams.ent_coef.tolist() == pytest.approx([0.0, 0.1, 0.2])
    # Fresh dense tensors, as init_train_state makes them (compiled code guards on strides).
    for leaf in optree.tree_leaves(new.hparams):
        assert leaf.is_contiguous() and leaf.stride() == (1,)
    same = with_hparams(states, gamma=torch.tensor(0.9))  # a 0-d tensor broadcasts
    assert same.hparams.gamma.tolist() == pytest.approx([0.9] * 3)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lr": 1e-3}, r"^expected fields of Hyperparams .*got unknown \['lr'\]"),
        ({"gamma": 0.0}, r"gamma: expected a number in \(0.0, 1.0\], got 0.0"),
        ({"ent_coef": torch.tensor([0.1, -1.0])}, r"ent_coef\[1\]: expected a number in \[0.0"),
        ({"ent_coef": torch.tensor([0.1, 0.2, 0.3])}, r"ent_coef: expected a float or a tensor "
         r"of shape \(\) or \(2,\) \(one per seed\), got shape \(3,\)"),
        ({"max_grad_norm": "big"}, r"max_grad_norm: expected a number"),
        ({"target_kl": math.nan}, r"target_kl: expected None or a number in \(0.0, inf\]"),
    ],
)  # fmt: skip
def test_with_hparams_names_the_bad_field(changes, message):
    states = init_train_state(jr.split(jr.key(0), 2), small_config())
    with pytest.raises(ValueError, match=message):
        with_hparams(states, **changes)
