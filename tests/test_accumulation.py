"""Tests for funcppo.accumulation: hand values, loops, properties, vmap and compile.

That ``ppo_loss`` shares sum to the whole loss, gradient and info is tested in test_losses.py;
that a full update with grad_accum_steps > 1 equals the whole-minibatch one, in test_update.py.
"""

from __future__ import annotations

import math

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import grad_and_value, vmap

from funcppo.accumulation import (
    LossTotals,
    accumulate_grads,
    check_totals,
    combine_ratio_stats,
    loss_totals,
    split_tree,
)
from funcppo.losses import ratio_stats

SETTINGS = settings(max_examples=40, deadline=None)


def t(xs, dtype=torch.float64):
    return torch.tensor(xs, dtype=dtype)


def assert_stats_close(got, expected, **kw):
    for name, x, y in zip(expected._fields, got, expected, strict=True):
        torch.testing.assert_close(x, y, msg=name, **kw)


# split_tree ----------------------------------------------------------------------------------


def test_split_tree_hand_values_and_views():
    x = torch.arange(12.0).reshape(2, 6)
    tree = {"x": x, "y": (torch.arange(6),)}
    parts = split_tree({"x": x}, 3, 1)
    assert [p["x"].tolist() for p in parts] == [
        [[0, 1], [6, 7]],
        [[2, 3], [8, 9]],
        [[4, 5], [10, 11]],
    ]
    assert all(p["x"].untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for p in parts)
    pairs = split_tree(tree["y"], 2, 0)
    assert [p[0].tolist() for p in pairs] == [[0, 1, 2], [3, 4, 5]]
    assert split_tree(None, 4, 0) == [None] * 4
    assert split_tree((), 2, 0) == [(), ()]


def test_split_tree_under_vmap_matches_loop():
    x = torch.randn(3, 4, 8)
    got = vmap(lambda row: split_tree(row, 4, 1))(x)
    for i in range(3):
        for part, expected in zip(got, split_tree(x[i], 4, 1), strict=True):
            assert torch.equal(part[i], expected)


# accumulate_grads ----------------------------------------------------------------------------


def test_accumulate_grads_hand_values_and_order():
    # loss_j = sum(w * x_j) + c: the summed gradient is sum_j sum(x_j) per weight.
    def loss(w, x, c):
        return (w * x).sum() + c, x.sum()

    grad_fn = grad_and_value(loss, has_aux=True)
    w = t([2.0])
    parts = [(t([1.0, 2.0]),), (t([3.0]),), (t([-4.0, 0.5]),)]
    grads, outs = accumulate_grads(grad_fn, w, parts, 1.0)
    assert grads.tolist() == [2.5]
    assert [o[0].item() for o in outs] == [7.0, 7.0, -6.0]  # values, in the parts' order
    assert [o[1].item() for o in outs] == [3.0, 3.0, -3.5]  # aux


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(1, 5))
def test_accumulate_grads_equals_gradient_of_the_sum(seed, k):
    g = torch.Generator().manual_seed(seed)
    params = {
        "w": torch.randn(3, generator=g, dtype=torch.float64),
        "b": torch.randn((), generator=g, dtype=torch.float64),
    }
    xs = torch.randn(2 * k, 3, generator=g, dtype=torch.float64)

    def loss(p, x):
        return torch.tanh(x @ p["w"] + p["b"]).square().sum(), x.sum()

    grads, _ = accumulate_grads(
        grad_and_value(loss, has_aux=True), params, [(x,) for x in xs.split(2)]
    )
    expected = torch.func.grad(lambda p: loss(p, xs)[0])(params)
    for a, b in zip(optree.tree_leaves(grads), optree.tree_leaves(expected), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# loss_totals and check_totals ----------------------------------------------------------------


def test_loss_totals_hand_values():
    causal = {
        "op": torch.ones(2, 3, dtype=torch.bool),
        "arg": torch.tensor([[True, False, False], [True, True, False]]),
    }
    avail = {"op": torch.ones(2, 3, dtype=torch.bool), "arg": torch.zeros(2, 3, dtype=torch.bool)}
    totals = loss_totals(causal, avail, {"arg": t(0.5)})
    assert totals.num_samples == 6
    assert {h: c.item() for h, c in totals.causal_count.items()} == {"op": 6, "arg": 3}
    assert {h: c.item() for h, c in totals.availability_count.items()} == {"op": 6, "arg": 0}
    assert totals.floor_entropy["arg"].item() == 0.5
    assert loss_totals(causal).availability_count is None


def test_check_totals_errors_name_the_field():
    totals = LossTotals(6, {"op": t(6.0), "arg": t(3.0)}, {"arg": t(2.0)})
    check_totals(totals, ["op", "arg"], ["arg"], 6)  # the whole batch: no floor_entropy needed
    with pytest.raises(ValueError, match=r"totals\.floor_entropy.*\['arg'\].*3 of 6"):
        check_totals(totals, ["op", "arg"], ["arg"], 3)
    with pytest.raises(ValueError, match=r"totals\.availability_count.*\['op'\]"):
        check_totals(totals, ["op", "arg"], ["op"], 6)
    with pytest.raises(
        ValueError, match=r"totals: expected causal counts for heads \['arg', 'op', 'x'\]"
    ):
        check_totals(totals, ["op", "arg", "x"], [], 6)
    with pytest.raises(ValueError, match="at least 7 steps"):
        check_totals(totals, ["op", "arg"], [], 7)


# combine_ratio_stats -------------------------------------------------------------------------


def test_combine_ratio_stats_hand_values():
    # [1, 3] (mean 2, std 1) and [2, 8, 0.05] (mean 3.35): whole mean 2.81, min 0.05, max 8.
    parts = [t([1.0, 3.0]), t([2.0, 8.0, 0.05])]
    got = combine_ratio_stats([ratio_stats(p) for p in parts], [2, 3])
    squares = [(r - 2.81) ** 2 for r in (1.0, 3.0, 2.0, 8.0, 0.05)]
    assert got.mean.item() == pytest.approx(2.81)
    assert (got.min.item(), got.max.item()) == (0.05, 8.0)
    assert got.std.item() == pytest.approx(math.sqrt(sum(squares) / 5))
    assert got.explosion_fraction.item() == pytest.approx(1 / 5)  # 8 > 5
    assert got.collapse_fraction.item() == pytest.approx(1 / 5)  # 0.05 < 0.1


@SETTINGS
@given(st.lists(st.lists(st.floats(0.0, 10.0), min_size=1, max_size=6), min_size=1, max_size=4))
def test_combine_ratio_stats_equals_stats_of_concatenation(parts):
    tensors = [t(p) for p in parts]
    got = combine_ratio_stats([ratio_stats(x) for x in tensors], [len(p) for p in parts])
    assert_stats_close(got, ratio_stats(torch.cat(tensors)), rtol=1e-9, atol=1e-9)


def test_combine_ratio_stats_does_not_cancel_in_float32():
    # Near-on-policy ratios 1 +- 1e-4: E[r^2] - m^2 loses the variance to float32 rounding.
    g = torch.Generator().manual_seed(0)
    r = 1.0 + 1e-4 * torch.randn(4096, generator=g)
    got = combine_ratio_stats([ratio_stats(p) for p in r.split(1024)], [1024] * 4)
    exact = r.double().std(correction=0).item()
    assert got.std.item() == pytest.approx(exact, rel=1e-3)
    naive = ((r.square().mean() - r.mean().square()).clamp_min(0).sqrt()).item()
    assert naive != pytest.approx(exact, rel=1e-1)  # what the pooled form avoids


def test_combine_ratio_stats_vmap_and_compile():
    x = 0.5 + torch.rand(3, 10)

    def combined(row):
        a, b = row.split([4, 6])
        return combine_ratio_stats([ratio_stats(a), ratio_stats(b)], [4, 6])

    got = vmap(combined)(x)
    for i in range(3):
        assert_stats_close(optree.tree_map(lambda v, i=i: v[i], got), combined(x[i]))
    torch._dynamo.reset()
    compiled = torch.compile(combined, fullgraph=True, backend="aot_eager")
    assert_stats_close(compiled(x[0]), combined(x[0]))
