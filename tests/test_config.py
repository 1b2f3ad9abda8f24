"""Tests for funcppo.core.config: defaults, normalisation, validation messages, presets."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from funcppo.core.config import PPOConfig
from funcppo.core.constants import ADAM_EPS
from funcppo.core.spec import ActionSpec
from funcppo.envs.lifecycle_spec import esper_config, lifecycle_spec

SPEC = ActionSpec({"op": 3, "arg": 4, "extra": 2}, "op", [{"op"}, {"arg"}, {"arg", "extra"}])


def make(**changes) -> PPOConfig:
    return PPOConfig(**{"obs_dim": 5, "spec": SPEC, **changes})


def test_defaults_follow_cleanrl():
    cfg = make()
    assert cfg.torso_sizes == (64, 64) and cfg.activation == "tanh" and not cfg.recurrent
    assert (cfg.gamma, cfg.gae_lambda, cfg.clip_coef, cfg.vf_coef) == (0.99, 0.95, 0.2, 0.5)
    assert (cfg.ent_coef, cfg.max_grad_norm, cfg.learning_rate) == (0.01, 0.5, 2.5e-4)
    assert (cfg.update_epochs, cfg.num_minibatches, cfg.target_kl) == (4, 4, None)
    assert cfg.clip_vloss and cfg.norm_adv and cfg.compile and not cfg.shared_torso
    assert cfg.adam_eps == ADAM_EPS and cfg.weight_decay == 0.0 and cfg.grad_accum_steps == 1


def test_frozen_and_hashable():
    cfg = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.gamma = 0.5  # type: ignore[misc]
    assert hash(cfg) == hash(make()) and cfg == make()
    assert {cfg: 1}[make()] == 1
    assert cfg != make(gamma=0.9)


def test_mappings_and_lists_normalised_to_tuples_in_spec_order():
    cfg = make(
        torso_sizes=[32, 16],
        head_ent_coef={"extra": 2.0, "op": 0.5},
        entropy_floor={"arg": 0.3},
    )
    assert cfg.torso_sizes == (32, 16)
    assert cfg.head_ent_coef == (("op", 0.5), ("extra", 2.0))
    assert cfg.entropy_floor == (("arg", 0.3),)
    assert cfg == make(
        torso_sizes=(32, 16),
        head_ent_coef=(("op", 0.5), ("extra", 2)),
        entropy_floor=[("arg", 0.3)],
    )
    hash(cfg)


def test_head_ent_coefs_fill_missing_heads_with_one():
    cfg = make(head_ent_coef={"arg": 1.5})
    assert cfg.head_ent_coefs() == {"op": 1.0, "arg": 1.5, "extra": 1.0}
    assert make().head_ent_coefs() == {"op": 1.0, "arg": 1.0, "extra": 1.0}
    assert make(entropy_floor={"extra": 0.2}).entropy_floors() == {"extra": 0.2}
    assert make().entropy_floors() == {}


def test_float_fields_are_stored_as_floats():
    cfg = make(gamma=1, weight_decay=0, target_kl=1)
    assert isinstance(cfg.gamma, float) and isinstance(cfg.weight_decay, float)
    assert isinstance(cfg.target_kl, float)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("obs_dim", 0, "int >= 1"),
        ("obs_dim", True, "int >= 1"),
        ("obs_dim", 2.0, "int >= 1"),
        ("spec", "lifecycle", "ActionSpec"),
        ("torso_sizes", (64, 0), "int >= 1"),
        ("torso_sizes", "64", "sequence"),
        ("activation", "gelu", "tanh"),
        ("recurrent", 1, "bool"),
        ("clip_vloss", "yes", "bool"),
        ("compile", None, "bool"),
        ("lstm_size", 0, "int >= 1"),
        ("bptt_len", 0, "int >= 1"),
        ("update_epochs", 0, "int >= 1"),
        ("num_minibatches", -1, "int >= 1"),
        ("grad_accum_steps", 0, "int >= 1"),
        ("gamma", 0.0, "(0.0, 1.0]"),
        ("gamma", 1.01, "(0.0, 1.0]"),
        ("gae_lambda", -0.1, "[0.0, 1.0]"),
        ("gae_lambda", math.nan, "[0.0, 1.0]"),
        ("clip_coef", 0.0, "(0.0, inf)"),
        ("value_clip", -1.0, "(0.0, inf)"),
        ("vf_coef", -0.5, "[0.0, inf)"),
        ("ent_coef", math.nan, "[0.0, inf)"),
        ("ent_coef", "0.01", "[0.0, inf)"),
        ("entropy_floor_coef", -1.0, "[0.0, inf)"),
        ("max_grad_norm", 0.0, "(0.0, inf]"),
        ("target_kl", 0.0, "(0.0, inf)"),
        ("learning_rate", 0.0, "(0.0, inf)"),
        ("adam_eps", -1e-5, "(0.0, inf)"),
        ("weight_decay", -0.1, "[0.0, inf)"),
        ("head_ent_coef", {"blend": 1.0}, "head names"),
        ("head_ent_coef", {"op": -1.0}, "head_ent_coef['op']"),
        ("head_ent_coef", [("op",)], "pairs"),
        ("entropy_floor", {"arg": 1.5}, "[0.0, 1.0]"),
        ("entropy_floor", {"nope": 0.1}, "head names"),
    ],
)
def test_validation_names_field_range_and_value(field, value, expected):
    with pytest.raises(ValueError) as info:
        make(**{field: value})
    message = str(info.value)
    assert message.startswith(field), message
    assert expected in message, message
    assert "got" in message


def test_boundaries_accepted():
    cfg = make(
        gamma=1.0,
        gae_lambda=0.0,
        vf_coef=0.0,
        ent_coef=0.0,
        max_grad_norm=math.inf,
        entropy_floor={"op": 0.0, "arg": 1.0},
        torso_sizes=(),
    )
    assert cfg.torso_sizes == () and cfg.max_grad_norm == math.inf
    assert make(gae_lambda=1.0).gae_lambda == 1.0


def test_replace_revalidates_and_leaves_original():
    cfg = make()
    new = cfg.replace(gamma=0.9, head_ent_coef={"op": 2.0})
    assert new.gamma == 0.9 and new.head_ent_coef == (("op", 2.0),)
    assert cfg.gamma == 0.99 and cfg.head_ent_coef == ()
    with pytest.raises(ValueError, match="gamma"):
        cfg.replace(gamma=2.0)
    with pytest.raises(ValueError, match="entropy_floor"):
        cfg.replace(entropy_floor={"op": -0.1})


def test_esper_config_carries_seed_system_values():
    cfg = esper_config(obs_dim=40)
    assert cfg.spec == lifecycle_spec(3) and cfg.obs_dim == 40
    assert (cfg.learning_rate, cfg.gamma, cfg.gae_lambda, cfg.clip_coef) == (3e-4, 0.995, 0.98, 0.2)
    assert cfg.target_kl == 0.015 and cfg.recurrent and cfg.lstm_size == 128
    assert cfg.ent_coef == 0.05
    # One epoch of the recurrent policy over the whole rollout as one batch of sequences.
    assert cfg.update_epochs == 1
    assert cfg.num_minibatches == 1
    # Value clipping off by default, with its own range of 10 when turned on.
    assert cfg.clip_vloss is False
    assert cfg.value_clip == 10.0
    assert cfg.max_grad_norm == 5.0
    assert cfg.entropy_floors() == {
        "op": 0.30,
        "slot": 0.15,
        "blueprint": 0.20,
        "style": 0.15,
        "tempo": 0.20,
        "alpha_target": 0.10,
        "alpha_speed": 0.10,
        "alpha_curve": 0.10,
    }
    assert cfg.head_ent_coefs() == {
        "op": 1.0,
        "slot": 1.0,
        "blueprint": 1.3,
        "style": 1.2,
        "tempo": 1.3,
        "alpha_target": 1.2,
        "alpha_speed": 1.2,
        "alpha_curve": 1.2,
    }
    hash(cfg)


def test_esper_config_slots_and_overrides():
    cfg = esper_config(12, num_slots=5, lstm_size=32, gamma=0.9)
    assert cfg.spec.size("slot") == 5 and cfg.lstm_size == 32 and cfg.gamma == 0.9
    assert cfg.target_kl == 0.015
    assert esper_config(12, clip_vloss=True).clip_vloss is True
    assert esper_config(12, entropy_floor={"op": 0.5}).entropy_floors() == {"op": 0.5}
    with pytest.raises(ValueError, match="lstm_size"):
        esper_config(12, lstm_size=0)
    with pytest.raises(ValueError, match="num_slots"):
        esper_config(12, num_slots=0)


@settings(max_examples=50, deadline=None)
@given(
    gamma=st.floats(0.0, 1.0, exclude_min=True),
    lam=st.floats(0.0, 1.0),
    floor=st.floats(0.0, 1.0),
    coef=st.floats(0.0, 1e6),
)
def test_any_valid_values_construct_and_round_trip(gamma, lam, floor, coef):
    cfg = make(
        gamma=gamma, gae_lambda=lam, entropy_floor={"arg": floor}, head_ent_coef={"extra": coef}
    )
    again = cfg.replace()
    assert again == cfg and hash(again) == hash(cfg)
    assert cfg.entropy_floors() == {"arg": floor}
    assert cfg.head_ent_coefs()["extra"] == coef


@settings(max_examples=50, deadline=None)
@given(gamma=st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True)))
def test_any_gamma_out_of_range_rejected(gamma):
    with pytest.raises(ValueError, match="gamma"):
        make(gamma=gamma)
