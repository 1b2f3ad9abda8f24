"""Tests for funcppo.training.validation: the update's boundary checks name the field, the head,
what was expected and what came, before any computation; and the config's tensor hyperparameters are
compared with the state's unless the update is told to take the state's."""

from __future__ import annotations

import math

import optree
import pytest
import torch

from funcppo.core import random as jr
from funcppo.core.config import PPOConfig
from funcppo.core.spec import ActionSpec
from funcppo.training.state import init_train_state, with_hparams
from funcppo.training.synthetic import synthetic_batch
from funcppo.training.update import make_update_fn
from funcppo.training.validation import check_batch

# Head a is op-conditioned; op 0 uses no argument head, so b and c are irrelevant there.
SPEC = ActionSpec(
    {"op": 3, "a": 5, "b": 4, "c": 6}, "op", [(), ("a",), ("a", "b", "c")], op_conditioned=("a",)
)
T, B = 8, 2


def small_config(**changes) -> PPOConfig:
    base = dict(obs_dim=6, spec=SPEC, torso_sizes=(8,), update_epochs=1, num_minibatches=2)
    return PPOConfig(**{**base, "compile": False, **changes})


def make_case(config=None, seed=0):
    config = config or small_config()
    state = init_train_state(jr.key(seed), config)
    return config, state, synthetic_batch(config, state.params, jr.key(seed + 100), T, B)


def with_action(batch, head, index, value):
    actions = dict(batch.actions)
    actions[head] = actions[head].clone()
    actions[head][index] = value
    return batch._replace(actions=actions)


def with_mask(batch, head, index, value):
    masks = dict(batch.masks)
    masks[head] = masks[head].clone()
    masks[head][index] = value
    return batch._replace(masks=masks)


def test_a_valid_batch_passes():
    config, state, batch = make_case()
    check_batch(config, state, batch)


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("actions", r"batch\.actions\['b'\]: expected int64 \(8, 2\), got torch\.int32 \(8, 2\)"),
        ("obs", r"batch\.obs: expected float32 \(8, 2, 6\), got torch\.float64 \(8, 2, 6\)"),
        ("rewards", r"batch\.rewards: expected float32 \(8, 2\), got torch\.float64 \(8, 2\)"),
        ("logprobs", r"batch\.logprobs\['b'\]: expected float32 \(8, 2\), got torch\.float64"),
    ],
)
def test_dtypes_name_the_field_and_the_head(field, message):
    config, state, batch = make_case()
    if field == "actions":
        batch = batch._replace(actions=dict(batch.actions, b=batch.actions["b"].int()))
    elif field == "logprobs":
        batch = batch._replace(logprobs=dict(batch.logprobs, b=batch.logprobs["b"].double()))
    else:
        batch = batch._replace(**{field: getattr(batch, field).double()})
    with pytest.raises(ValueError, match=message):
        check_batch(config, state, batch)
    with pytest.raises(ValueError, match=message):
        make_update_fn(config)(state, batch)


@pytest.mark.parametrize(("value", "shown"), [(4, "4"), (-1, "-1")])
def test_an_action_out_of_range_names_the_head_value_and_index(value, shown):
    config, state, batch = make_case()
    bad = with_action(batch, "b", (3, 1), value)
    message = rf"batch\.actions\['b'\]: expected values in \[0, 4\), got {shown} at index \(3, 1\)"
    with pytest.raises(ValueError, match=message):
        make_update_fn(config)(state, bad)
    # Out of range op: reported as such, not as a masked row of the op-conditioned head.
    with pytest.raises(ValueError, match=r"batch\.actions\['op'\]: expected values in \[0, 3\)"):
        check_batch(config, state, with_action(batch, "op", (0, 0), 3))


def test_an_action_its_mask_forbids_names_the_head_value_and_index():
    config, state, batch = make_case()
    taken = int(batch.actions["c"][5, 0])
    bad = with_mask(batch, "c", (5, 0, taken), False)
    message = (
        rf"batch\.actions\['c'\]: expected actions that batch\.masks\['c'\] allows, got {taken} "
        r"at index \(5, 0\), which it forbids"
    )
    with pytest.raises(ValueError, match=message):
        make_update_fn(config)(state, bad)


def test_op_conditioned_heads_are_checked_at_the_taken_op_row():
    config, state, batch = make_case()
    op, taken = int(batch.actions["op"][2, 1]), int(batch.actions["a"][2, 1])
    other = (op + 1) % SPEC.n_ops
    # Forbidden in another op's row only: fine.
    check_batch(config, state, with_mask(batch, "a", (2, 1, other, taken), False))
    # Forbidden in the taken op's row: refused, naming that op.
    bad = with_mask(batch, "a", (2, 1, op, taken), False)
    message = rf"batch\.actions\['a'\]: .*got {taken} at index \(2, 1\), which it forbids .*op {op}"
    with pytest.raises(ValueError, match=message):
        check_batch(config, state, bad)


def test_a_forbidden_action_of_a_head_the_op_does_not_use_is_refused():
    # The rollout samples every head from its mask, used or not, so a forbidden action
    # anywhere means the batch did not come from the policy under these masks.
    config, state, batch = make_case()
    batch = with_action(batch, "op", (1, 0), 0)  # op 0 uses neither b nor c
    batch = with_mask(batch, "op", (1, 0, 0), True)
    batch = with_mask(batch, "a", (1, 0, 0, int(batch.actions["a"][1, 0])), True)
    taken = int(batch.actions["b"][1, 0])
    check_batch(config, state, batch)
    with pytest.raises(
        ValueError, match=rf"batch\.actions\['b'\]: .*got {taken} at index \(1, 0\)"
    ):
        check_batch(config, state, with_mask(batch, "b", (1, 0, taken), False))


def test_vmapped_batches_name_the_seed_in_the_index():
    config = small_config()
    states = init_train_state(jr.split(jr.key(0), 2), config)
    batches = [
        synthetic_batch(
            config, optree.tree_map(lambda x, i=i: x[i], states.params), jr.key(i), T, B
        )
        for i in range(2)
    ]
    stacked = optree.tree_map(lambda *xs: torch.stack(xs), *batches, none_is_leaf=False)
    check_batch(config, states, stacked, num_seeds=2)
    bad = with_action(stacked, "c", (1, 6, 0), 6)
    with pytest.raises(ValueError, match=r"batch\.actions\['c'\]: .*got 6 at index \(1, 6, 0\)"):
        make_update_fn(config, num_seeds=2)(states, bad)


def test_the_update_refuses_a_state_whose_hparams_differ_from_the_config():
    config, state, batch = make_case()
    other = config.replace(learning_rate=1e-3)
    message = (
        r"state\.hparams\.learning_rate: expected 0\.001 \(config\.learning_rate\), got "
        r"0\.00025.*with_hparams.*hparams='state'"
    )
    with pytest.raises(ValueError, match=message):
        make_update_fn(other)(state, batch)
    # Either make the state carry the config's value ...
    _, got = make_update_fn(other)(with_hparams(state, learning_rate=1e-3), batch)
    # ... or tell the update to take the state's values as they are.
    _, want = make_update_fn(other, hparams="state")(with_hparams(state, learning_rate=1e-3), batch)
    assert all(
        torch.equal(x, y) for x, y in zip(*map(optree.tree_leaves, (got, want)), strict=True)
    )
    kept_state, _ = make_update_fn(other, hparams="state")(state, batch)  # the state's 2.5e-4
    assert float(kept_state.hparams.learning_rate) == pytest.approx(2.5e-4)
    # target_kl None in the config is +inf in the state; a finite target in the state differs.
    with pytest.raises(ValueError, match=r"state\.hparams\.target_kl: expected inf .*got 0\.01"):
        make_update_fn(config)(with_hparams(state, target_kl=0.01), batch)
    with pytest.raises(ValueError, match=r"hparams: expected one of \('config', 'state'\)"):
        make_update_fn(config, hparams="mine")


def test_a_sweep_needs_the_state_hparams_and_then_runs():
    config = small_config()
    states = init_train_state(jr.split(jr.key(0), 2), config, gamma=torch.tensor([0.9, 0.99]))
    batch = synthetic_batch(config, optree.tree_map(lambda x: x[0], states.params), jr.key(1), T, B)
    stacked = optree.tree_map(lambda x: torch.stack([x, x]), batch, none_is_leaf=False)
    with pytest.raises(ValueError, match=r"state\.hparams\.gamma: expected 0\.99 .*got \[0\.9"):
        make_update_fn(config, num_seeds=2)(states, stacked)
    new, metrics = make_update_fn(config, num_seeds=2, hparams="state")(states, stacked)
    assert new.step.tolist() == [1, 1] and not math.isnan(float(metrics["loss"][0]))


def test_hparams_of_the_wrong_shape_are_named():
    config, state, batch = make_case()
    hp = state.hparams._replace(gamma=torch.ones(2))
    with pytest.raises(ValueError, match=r"state\.hparams\.gamma: expected float \(\), got"):
        check_batch(config, state._replace(hparams=hp), batch)
