"""Tests for funcppo.core.spec: validation, the lifecycle table, reference loops, vmap, compile."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import vmap

from funcppo.core.spec import (
    ActionSpec,
    availability_masks,
    causal_masks,
    entropy_floor_masks,
    resolve_masks,
)
from funcppo.envs.lifecycle_spec import LIFECYCLE_OPS, lifecycle_spec

SETTINGS = settings(max_examples=40, deadline=None)


def small_spec():
    return ActionSpec(
        {"op": 3, "slot": 2, "kind": 4},
        "op",
        causal=[[], ["slot", "kind"], ["slot"]],
        op_conditioned=["slot"],
    )


def ref_causal(spec, op_actions):
    out = {n: torch.zeros(op_actions.shape, dtype=torch.bool) for n in spec.names}
    for idx in range(op_actions.numel()):
        op = int(op_actions.flatten()[idx])
        for name in spec.names:
            out[name].view(-1)[idx] = name in spec.causal[op]
    return out


def ref_availability(spec, op_valid):
    flat = op_valid.reshape(-1, spec.n_ops)
    out = {n: torch.zeros(flat.shape[0], dtype=torch.bool) for n in spec.names}
    for i in range(flat.shape[0]):
        for op in range(spec.n_ops):
            if flat[i, op]:
                for name in spec.causal[op]:
                    out[name][i] = True
    return {n: v.reshape(op_valid.shape[:-1]) for n, v in out.items()}


def ref_resolve(spec, masks, op_actions):
    out = {}
    for name in spec.names:
        m = masks[name]
        if name not in spec.op_conditioned:
            out[name] = m.clone()
            continue
        flat_m = m.reshape(-1, spec.n_ops, m.shape[-1])
        rows = [flat_m[i, int(op)] for i, op in enumerate(op_actions.flatten())]
        out[name] = torch.stack(rows).reshape(*op_actions.shape, m.shape[-1])
    return out


def random_masks(spec, batch, seed):
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, size in spec.heads:
        shape = (*batch, spec.n_ops, size) if name in spec.op_conditioned else (*batch, size)
        masks[name] = torch.rand(shape, generator=g) < 0.5
    return masks


def assert_dicts_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == torch.bool and b[name].dtype == torch.bool, name
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"heads": {}}, "heads"),
        ({"heads": [("op", 2), ("op", 3)]}, "heads"),
        ({"heads": {"op": 2, "x": 0}}, "heads"),
        ({"op_head": "nope"}, "op_head"),
        ({"causal": [[]]}, "causal"),
        ({"causal": [[], ["ghost"]]}, "causal"),
        ({"op_conditioned": ["op"]}, "op_conditioned"),
        ({"op_conditioned": ["ghost"]}, "op_conditioned"),
        ({"op_names": ["A"]}, "op_names"),
    ],
)
def test_validation_errors_name_the_argument(kwargs, argument):
    base = {"heads": {"op": 2, "x": 3}, "op_head": "op", "causal": [[], ["x"]]}
    with pytest.raises(ValueError, match=f"^{argument}:"):
        ActionSpec(**{**base, **kwargs})


def test_head_that_no_op_uses_is_refused_by_name():
    # Such a head could never be relevant, and the mask functions have no op to read it from.
    with pytest.raises(
        ValueError,
        match=r"^causal: expected every head in some op's row, got "
        r"head 'unused' in none",
    ):
        ActionSpec({"op": 2, "x": 3, "unused": 4}, "op", [[], ["x"]])


def test_lifecycle_spec_rejects_no_slots():
    with pytest.raises(ValueError, match="num_slots"):
        lifecycle_spec(0)


def test_op_head_in_every_causal_row_and_accessors():
    spec = small_spec()
    assert all("op" in row for row in spec.causal)
    assert spec.causal[0] == frozenset({"op"})
    assert spec.names == ("op", "slot", "kind")
    assert spec.sizes == (3, 2, 4)
    assert spec.n_ops == 3 and spec.size("kind") == 4
    pairs = [("op", 3), ("slot", 2), ("kind", 4)]
    same = ActionSpec(pairs, "op", [[], ["slot", "kind"], ["slot"]], op_conditioned=("slot",))
    assert same == spec and hash(same) == hash(spec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.op_head = "slot"


def test_head_name_reads_an_index_in_head_order_and_minus_one_as_none():
    spec = small_spec()
    assert [spec.head_name(i) for i in (0, 1, 2.0, -1, -1.0)] == ["op", "slot", "kind", None, None]
    for bad in (3, -2, 0.5):
        with pytest.raises(ValueError, match=r"index: expected -1 or a head index in \[0, 3\)"):
            spec.head_name(bad)


def test_causal_table_by_hand():
    table = small_spec().causal_table()
    expected = [[True, False, False], [True, True, True], [True, True, False]]
    assert table.dtype == torch.bool and table.tolist() == expected


def test_lifecycle_spec_matches_seed_table():
    spec = lifecycle_spec(num_slots=4)
    assert spec.op_names == LIFECYCLE_OPS
    assert dict(spec.heads) == {
        "op": 6, "slot": 4, "blueprint": 13, "style": 4,
        "tempo": 3, "alpha_target": 3, "alpha_speed": 4, "alpha_curve": 5,
    }  # fmt: skip
    assert spec.op_conditioned == frozenset({"slot"})
    expected = {
        "WAIT": {"op"},
        "GERMINATE": {"op", "slot", "blueprint", "style", "tempo", "alpha_target"},
        "SET_ALPHA_TARGET": {"op", "slot", "style", "alpha_target", "alpha_speed", "alpha_curve"},
        "PRUNE": {"op", "slot", "alpha_speed", "alpha_curve"},
        "FOSSILIZE": {"op", "slot"},
        "ADVANCE": {"op", "slot"},
    }
    assert {op: set(row) for op, row in zip(spec.op_names, spec.causal, strict=True)} == expected


@SETTINGS
@given(seed=st.integers(0, 10_000), batch=st.lists(st.integers(1, 4), min_size=0, max_size=2))
def test_mask_functions_match_reference_loops(seed, batch):
    for spec in (small_spec(), lifecycle_spec(3)):
        g = torch.Generator().manual_seed(seed)
        ops = torch.randint(0, spec.n_ops, tuple(batch), generator=g)
        op_valid = torch.rand((*batch, spec.n_ops), generator=g) < 0.4
        masks = random_masks(spec, tuple(batch), seed)
        assert_dicts_equal(causal_masks(spec, ops), ref_causal(spec, ops))
        assert_dicts_equal(availability_masks(spec, op_valid), ref_availability(spec, op_valid))
        assert_dicts_equal(resolve_masks(spec, masks, ops), ref_resolve(spec, masks, ops))
        masks[spec.op_head] = op_valid
        resolved, available = ref_resolve(spec, masks, ops), ref_availability(spec, op_valid)
        expected = {n: available[n] & (resolved[n].sum(-1) > 1) for n in spec.names}
        assert_dicts_equal(entropy_floor_masks(spec, masks, ops), expected)


def test_mask_functions_by_hand():
    spec = small_spec()
    ops = torch.tensor([0, 1, 2])
    causal = causal_masks(spec, ops)
    assert causal["op"].tolist() == [True, True, True]
    assert causal["slot"].tolist() == [False, True, True]
    assert causal["kind"].tolist() == [False, True, False]
    avail = availability_masks(spec, torch.tensor([[True, False, False], [True, False, True]]))
    assert avail["slot"].tolist() == [False, True] and avail["kind"].tolist() == [False, False]
    slot = torch.tensor([[False, False], [True, False], [False, True]])  # one row per op
    masks = {"op": torch.ones(3, dtype=torch.bool), "slot": slot, "kind": torch.ones(4) > 0}
    resolved = resolve_masks(spec, masks, torch.tensor(2))
    assert resolved["slot"].tolist() == [False, True]
    assert resolved["kind"].tolist() == [True] * 4


def test_entropy_floor_masks_by_hand():
    # Step 0: only WAIT valid, so slot and kind unavailable. Step 1: MOVE valid (uses slot),
    # taken MOVE, whose slot row has two valid slots. Step 2: MOVE valid but its row has one
    # slot, so slot's entropy is 0 by construction and the step does not count.
    spec = small_spec()
    op_valid = torch.tensor([[True, False, False], [True, False, True], [False, False, True]])
    two, one = [True, True], [False, True]
    slot = torch.tensor([[two] * 3, [two] * 3, [two, two, one]])
    kind = torch.ones(3, 4, dtype=torch.bool)
    masks = {"op": op_valid, "slot": slot, "kind": kind}
    floor = entropy_floor_masks(spec, masks, torch.tensor([0, 2, 2]))
    assert floor["op"].tolist() == [False, True, False]  # op: one valid op at steps 0 and 2
    assert floor["slot"].tolist() == [False, True, False]
    assert floor["kind"].tolist() == [False, False, False]  # no valid op uses kind


def mask_functions(spec, ops, op_valid, masks):
    return (
        causal_masks(spec, ops),
        availability_masks(spec, op_valid),
        resolve_masks(spec, masks, ops),
    )


def test_vmap_equals_loop():
    spec = lifecycle_spec(3)
    g = torch.Generator().manual_seed(0)
    ops = torch.randint(0, spec.n_ops, (5, 7), generator=g)
    op_valid = torch.rand(5, 7, spec.n_ops, generator=g) < 0.5
    masks = random_masks(spec, (5, 7), 1)
    batched = vmap(mask_functions, in_dims=(None, 0, 0, 0))(spec, ops, op_valid, masks)
    for i in range(5):
        single = mask_functions(spec, ops[i], op_valid[i], {n: m[i] for n, m in masks.items()})
        for got, want in zip(batched, single, strict=True):
            assert_dicts_equal({n: v[i] for n, v in got.items()}, want)


def test_compile_equals_eager():
    spec = small_spec()
    g = torch.Generator().manual_seed(2)
    ops = torch.randint(0, spec.n_ops, (6,), generator=g)
    op_valid = torch.rand(6, spec.n_ops, generator=g) < 0.5
    masks = random_masks(spec, (6,), 3)
    eager = mask_functions(spec, ops, op_valid, masks)
    compiled = torch.compile(mask_functions, fullgraph=True)(spec, ops, op_valid, masks)
    for got, want in zip(compiled, eager, strict=True):
        assert_dicts_equal(got, want)
