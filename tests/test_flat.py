"""funcppo.core.flat: parameters and optimizer state as flat groups, and back."""

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from funcppo.core import random as jr
from funcppo.core.config import PPOConfig
from funcppo.core.flat import flat_layout, ravel, ravel_tree, tree_layout, unravel, unravel_tree
from funcppo.core.networks import policy_init
from funcppo.core.optim import adamw, is_critic_path
from funcppo.core.spec import ActionSpec

SPEC = ActionSpec({"op": 3, "a": 5}, "op", [(), ("a",), ("a",)])


def critic_or_actor(path):
    return "critic" if is_critic_path(path) else "actor"


def params_for(recurrent: bool):
    config = PPOConfig(obs_dim=6, spec=SPEC, torso_sizes=(8, 4), recurrent=recurrent, lstm_size=5)
    return policy_init(jr.key(0), config)


@pytest.mark.parametrize("recurrent", [False, True])
def test_groups_hold_each_leaf_once_in_flatten_order(recurrent):
    params = params_for(recurrent)
    layout = flat_layout(params, critic_or_actor)
    flat = ravel(layout, params)
    paths, leaves, _ = optree.tree_flatten_with_path(params)
    for name in ("actor", "critic"):
        mine = [
            x.reshape(-1) for p, x in zip(paths, leaves, strict=True) if critic_or_actor(p) == name
        ]
        # Worked by hand: a group is its leaves, flattened, one after another.
        assert torch.equal(flat[name], torch.cat(mine))
    assert sum(v.numel() for v in flat.values()) == sum(x.numel() for x in leaves)


@pytest.mark.parametrize("recurrent", [False, True])
def test_unravel_inverts_ravel_with_views(recurrent):
    params = params_for(recurrent)
    layout = flat_layout(params, critic_or_actor)
    flat = ravel(layout, params)
    back = unravel(layout, flat)
    assert optree.tree_structure(back) == optree.tree_structure(params)
    for a, b in zip(optree.tree_leaves(back), optree.tree_leaves(params), strict=True):
        assert torch.equal(a, b) and a.shape == b.shape
    # Views of the group's storage, not copies.
    storages = {flat[name].untyped_storage().data_ptr() for name in flat}
    assert {x.untyped_storage().data_ptr() for x in optree.tree_leaves(back)} <= storages


@settings(max_examples=30, deadline=None)
@given(
    shapes=st.lists(
        st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=6
    ),
    groups=st.lists(st.sampled_from("xyz"), min_size=6, max_size=6),
)
def test_roundtrip_any_tree(shapes, groups):
    params = {f"leaf{i}": torch.randn(shape) for i, shape in enumerate(shapes)}
    layout = flat_layout(params, lambda path: groups[int(path[0][4:])])
    flat = ravel(layout, params)
    assert set(flat) == {groups[i] for i in range(len(shapes))}
    back = unravel(layout, flat)
    assert all(torch.equal(back[k], v) for k, v in params.items())


def test_mixed_dtypes_refused():
    params = {"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.float64)}
    with pytest.raises(ValueError, match="params: expected one floating dtype"):
        flat_layout(params, lambda path: "g")


def test_optimizer_on_groups_equals_optimizer_on_leaves():
    """AdamW (decay on the critic only) with clipping, 20 steps, on the tree and on its flat
    groups: the same numbers, and the state maps back leaf for leaf."""
    params = params_for(False)
    layout = flat_layout(params, critic_or_actor)
    opt = adamw(learning_rate=1e-2, weight_decay=0.1, decay_mask=is_critic_path, max_grad_norm=0.5)
    state = opt.init(params)
    flat_params, flat_state = ravel(layout, params), opt.init(ravel(layout, params))
    tl = tree_layout(layout, state, flat_state)
    assert optree.tree_structure(ravel_tree(tl, state)) == optree.tree_structure(flat_state)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        grads = optree.tree_map(lambda p: torch.randn(p.shape, generator=gen), params)
        updates, state = opt.update(grads, state, params)
        params = optree.tree_map(torch.add, params, updates)
        flat_updates, flat_state = opt.update(ravel(layout, grads), flat_state, flat_params)
        flat_params = optree.tree_map(torch.add, flat_params, flat_updates)
    for a, b in zip(
        optree.tree_leaves(unravel(layout, flat_params)), optree.tree_leaves(params), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    back = unravel_tree(tl, flat_state)
    assert optree.tree_structure(back) == optree.tree_structure(state)
    for a, b in zip(optree.tree_leaves(back), optree.tree_leaves(state), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # The decay really is per group: zero gradients move only critic leaves.
    zero = optree.tree_map(torch.zeros_like, flat_params)
    step, _ = opt.update(zero, opt.init(flat_params), flat_params)
    assert step["actor"].abs().max() == 0 and step["critic"].abs().max() > 0


def test_ravel_and_unravel_compile_without_graph_break():
    params = params_for(True)
    layout = flat_layout(params, critic_or_actor)

    def roundtrip(p):
        return unravel(layout, optree.tree_map(lambda x: 2 * x, ravel(layout, p)))

    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    out = compiled(params)
    for a, b in zip(optree.tree_leaves(out), optree.tree_leaves(params), strict=True):
        assert torch.equal(a, 2 * b)
