"""Tests for funcppo.training.accumulation: hand values, the parts against the whole, vmap against
a loop.

That a full update with grad_accum_steps > 1 equals the whole-minibatch one is tested in
test_update.py; that a data-parallel one equals one process given every batch, in
test_distributed.py.
"""

from __future__ import annotations

import math

import optree
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import vmap

from funcppo.core.losses import (
    LossCoefs,
    LossStats,
    RatioExtremes,
    loss_info,
    loss_stats,
    ppo_loss,
    ppo_objective,
)
from funcppo.training.accumulation import accumulate, merge_extremes, split_tree, tree_add, weigh
from funcppo.training.distributed import SingleProcess
from test_losses import assert_trees_close, hand_ppo_inputs, make_batch, ratio_batch

SETTINGS = settings(max_examples=40, deadline=None)
# The tensors a part's loss is differentiated by: in the update, the network's outputs.
LIVE = ("new_logprobs", "entropies", "values")


def t(xs, dtype=torch.float64):
    return torch.tensor(xs, dtype=dtype)


def split_parts(batch, sizes):
    """Consecutive slices of ``sizes`` steps along the first axis of every tensor."""
    return [optree.tree_map(lambda x, j=j: x.split(sizes)[j], batch) for j in range(len(sizes))]


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


# weigh, merge_extremes -----------------------------------------------------------------------


def test_weigh_hand_values():
    # The inputs of test_ppo_loss_hand_values, cut into step 0 and steps 1-2.
    coefs = LossCoefs(entropy_floor={"arg": 0.6})
    avail = {"op": torch.ones(3, dtype=torch.bool), "arg": torch.tensor([True, True, False])}
    batch = dict(**hand_ppo_inputs(), availability=avail)
    whole = loss_stats(**batch, coefs=coefs).counts
    first, second = (loss_stats(**p, coefs=coefs) for p in split_parts(batch, [1, 2]))
    assert (first.counts.steps, first.counts.causal["arg"].item()) == (1, 0)
    share = weigh(first.means, first.counts, whole)
    # Step 0: op surrogate -1, a third of the op's 3 steps; arg irrelevant there.
    assert share.causal["policy"]["op"].item() == -1 / 3
    assert share.causal["policy"]["arg"].item() == 0.0
    # Value 0.5 * max(1, 0.49) over one step of three.
    assert share.steps["value"].item() == 0.5 / 3
    # arg available at steps 0 and 1 (entropies 0.7, 0.4): each part holds one of the two.
    assert share.available["arg"].item() == 0.7 / 2
    assert weigh(second.means, second.counts, whole).available["arg"].item() == 0.4 / 2


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.lists(st.integers(1, 5), min_size=1, max_size=4))
def test_weighed_parts_sum_to_the_whole_means(seed, sizes):
    coefs = LossCoefs(entropy_floor={"slot": 0.5, "blueprint": 0.2})
    b = make_batch(seed, shape=(sum(sizes),), scale=2.0)
    # A head never relevant in the first part: its share is an exact 0, not a NaN.
    b["causal"]["slot"][: sizes[0]] = False
    whole = loss_stats(**b, coefs=coefs)
    parts = [loss_stats(**p, coefs=coefs) for p in split_parts(b, sizes)]
    summed = tree_add([weigh(p.means, p.counts, whole.counts) for p in parts])
    assert_trees_close(summed, whole.means, rtol=1e-10, atol=1e-12)


def test_merge_extremes_hand_values():
    never = {"op": t(2.0), "x": t(-math.inf)}, {"op": t(0.5), "x": t(math.inf)}
    a = RatioExtremes(t(2.0), t(0.5), *never)  # head x never relevant in this part
    b = RatioExtremes(t(1.5), t(0.2), {"op": t(1.5), "x": t(1.2)}, {"op": t(0.2), "x": t(1.2)})
    got = merge_extremes([a, b])
    assert (got.max.item(), got.min.item()) == (2.0, 0.2)
    assert {h: x.item() for h, x in got.head_max.items()} == {"op": 2.0, "x": 1.2}
    assert {h: x.item() for h, x in got.head_min.items()} == {"op": 0.2, "x": 1.2}


# accumulate ----------------------------------------------------------------------------------


def accumulated(batch, sizes, coefs):
    """``accumulate`` over consecutive parts of ``sizes`` steps of ``batch``, differentiated by
    its ``LIVE`` tensors: ``(grads, loss, info, finite)`` of the whole batch."""
    live = {k: batch[k] for k in LIVE}
    whole = loss_stats(**batch, coefs=coefs).counts
    bounds = [(sum(sizes[:j]), sum(sizes[: j + 1])) for j in range(len(sizes))]

    def part_stats(params, start, stop):
        part = {**batch, **params}
        part = optree.tree_map(lambda x: x[start:stop], part)
        return loss_stats(**part, coefs=coefs), torch.isfinite(part["values"]).all()

    grads, means, extremes, finite = accumulate(
        part_stats, live, bounds, whole, coefs, SingleProcess()
    )
    info = loss_info(LossStats(whole, means, extremes), coefs)
    return grads, ppo_objective(means, whole, coefs), info, finite


@SETTINGS
@given(
    st.integers(0, 2**31 - 1),
    st.lists(st.integers(1, 5), min_size=1, max_size=4),
    st.floats(0.0, 1.0),
    st.booleans(),
)
def test_accumulate_equals_the_whole_loss_gradient_and_info(seed, sizes, floor, clip_vloss):
    b = make_batch(seed, shape=(sum(sizes),), scale=2.0)
    # slot's floor of 1 is always active; blueprint's random floor may or may not be.
    coefs = LossCoefs(
        clip_coef=0.15,
        vf_coef=0.7,
        ent_coef=0.02,
        head_ent_coef={"slot": 2.0},
        clip_vloss=clip_vloss,
        value_clip=0.3,
        entropy_floor={"slot": 1.0, "blueprint": floor},
        entropy_floor_coef=0.3,
    )

    def whole_loss(live):
        return ppo_loss(**{**b, **live}, coefs=coefs)

    live = {k: b[k] for k in LIVE}
    expected_grads, (expected_loss, expected_info) = torch.func.grad_and_value(
        whole_loss, has_aux=True
    )(live)
    grads, loss, info, finite = accumulated(b, sizes, coefs)
    assert finite.item()
    assert math.isclose(loss.item(), expected_loss.item(), rel_tol=1e-10, abs_tol=1e-12)
    assert_trees_close(grads, expected_grads, rtol=1e-10, atol=1e-12)
    assert_trees_close(info, expected_info, rtol=1e-10, atol=1e-12)


def test_accumulate_floor_of_a_head_never_available_adds_nothing():
    b = make_batch(3, shape=(6,))
    b["availability"] = dict(b["availability"], slot=torch.zeros(6, dtype=torch.bool))
    coefs = LossCoefs(entropy_floor={"slot": 0.6}, entropy_floor_coef=0.5)
    _, loss, info, finite = accumulated(b, [2, 4], coefs)
    assert finite.item()
    no_floor, _ = ppo_loss(**b, coefs=coefs._replace(entropy_floor=None))
    assert info.entropy_floor_penalty.item() == 0.0
    assert math.isclose(loss.item(), no_floor.item(), rel_tol=1e-12)


def test_accumulate_under_vmap_matches_loop():
    batches = [make_batch(s, shape=(6,), dtype=torch.float32) for s in range(3)]
    stacked = optree.tree_map(lambda *xs: torch.stack(xs), *batches)
    coefs = LossCoefs(entropy_floor={"slot": 1.0})

    def run(batch):
        return accumulated(batch, [2, 4], coefs)

    got = vmap(run)(stacked)
    for s in range(3):
        assert_trees_close(optree.tree_map(lambda x, s=s: x[s], got), run(batches[s]))


def test_pooled_ratio_std_does_not_cancel_near_one_in_float32():
    # Near-on-policy ratios 1 +- 1e-4, pooled from four parts: the spread is taken around 1,
    # where E[r^2] - E[r]^2 would lose the variance to float32 rounding.
    g = torch.Generator().manual_seed(0)
    r = 1.0 + 1e-4 * torch.randn(4096, generator=g)
    b = ratio_batch(r, dtype=torch.float32)
    coefs = LossCoefs()
    whole = loss_stats(**b, coefs=coefs)
    parts = [loss_stats(**p, coefs=coefs) for p in split_parts(b, [1024] * 4)]
    means = tree_add([weigh(p.means, p.counts, whole.counts) for p in parts])
    info = loss_info(LossStats(whole.counts, means, whole.extremes), coefs)
    exact = r.double().std(correction=0).item()
    assert math.isclose(info.ratio.std.item(), exact, rel_tol=1e-3)
    naive = ((r.square().mean() - r.mean().square()).clamp_min(0).sqrt()).item()
    assert not math.isclose(naive, exact, rel_tol=1e-1)  # what the form around 1 avoids
