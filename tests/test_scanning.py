"""funcppo.accel.scanning: the scanned loop against a Python loop, compiled and vmapped, and the
compile scopes' pieces called in order. The update through every scope is tested in
test_update.py."""

from __future__ import annotations

from typing import NamedTuple

import optree
import pytest
import torch
from torch.func import vmap

from funcppo.accel.compiling import CompileSettings, compile_fn
from funcppo.accel.scanning import UpdatePieces, compose_update, scan_steps, stacked_tree_map
from funcppo.core.config import PPOConfig
from funcppo.core.spec import ActionSpec
from funcppo.training.distributed import SingleProcess

AOT = CompileSettings(backend="aot_eager")


class ToyCarry(NamedTuple):
    params: torch.Tensor  # the highest rank: carried as it is
    count: torch.Tensor  # counters of two dtypes: packed
    total: torch.Tensor


def toy_step(carry: ToyCarry, scale: torch.Tensor, k: torch.Tensor):
    params = carry.params * scale + k
    metrics = {
        "mean": {"norm": params.square().sum(), "k": k.float()},
        "max": {"top": params.amax()},
        "applied": params.sum() > 0,
    }
    return ToyCarry(params, carry.count + 1, carry.total + params.sum()), metrics


def loop(carry, scale, num_steps):
    metrics = []
    for k in range(num_steps):
        carry, m = toy_step(carry, scale, torch.tensor(k))
        metrics.append(m)
    return carry, optree.tree_map(lambda *xs: torch.stack(xs), *metrics)


def toy_carry(seed: int) -> ToyCarry:
    g = torch.Generator().manual_seed(seed)
    params = torch.randn(5, generator=g)
    return ToyCarry(params, torch.tensor(0), torch.tensor(0.0, dtype=torch.float64))


def assert_trees_equal(a, b):
    leaves_a, spec_a = optree.tree_flatten(a)
    leaves_b, spec_b = optree.tree_flatten(b)
    assert spec_a == spec_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        torch.testing.assert_close(x, y)


def test_scan_steps_compiled_matches_a_python_loop():
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    steps = compile_fn(scan_steps(toy_step, 4), "toy_steps", AOT)
    scale = torch.tensor(0.9)
    got = steps(toy_carry(0), scale)
    assert sum(counters["graph_break"].values()) == 0
    assert_trees_equal(got, loop(toy_carry(0), scale, 4))
    assert got[1]["mean"]["k"].tolist() == [0.0, 1.0, 2.0, 3.0]  # stacked on a step axis
    assert got[0].count.item() == 4


def test_scan_steps_of_a_vmapped_step_matches_each_seed_alone():
    torch._dynamo.reset()
    carries = [toy_carry(s) for s in range(3)]
    stacked = optree.tree_map(lambda *xs: torch.stack(xs), *carries)
    scales = torch.tensor([0.5, 1.0, 1.5])
    seeded = vmap(toy_step, in_dims=(0, 0, None))
    steps = compile_fn(scan_steps(seeded, 3), "toy_seeds", AOT)
    carry, metrics = steps(stacked, scales)
    for s in range(3):
        alone = loop(carries[s], scales[s], 3)
        # [steps, seeds] for the metrics, as the loop over vmapped steps stacks them.
        assert_trees_equal(
            (
                optree.tree_map(lambda x, s=s: x[s], carry),
                optree.tree_map(lambda x, s=s: x[:, s], metrics),
            ),
            alone,
        )


def test_compose_update_runs_the_pieces_in_order_and_names_a_bad_scope():
    calls = []

    class State(NamedTuple):
        step: torch.Tensor
        key: torch.Tensor
        hparams: torch.Tensor

    def shuffle(state, batch):
        calls.append("shuffle")
        return torch.arange(3)

    def prepare(state, batch, order):
        calls.append("prepare")
        return batch * order, {"stat": batch.sum()}, state.step.float()

    def start(state, groups):
        calls.append("start")
        return groups

    def step(carry, prep, hparams, k):
        calls.append(f"step {int(k)}")
        return carry + prep.sum() * hparams, {"k": k}

    def finish(step_, key, carry, stats, metrics):
        calls.append("finish")
        return carry, stats, metrics

    pieces = UpdatePieces(shuffle, prepare, start, step, finish)
    config = PPOConfig(
        obs_dim=2,
        spec=ActionSpec({"op": 2}, "op", [(), ()]),
        update_epochs=2,
        num_minibatches=1,
        compile=False,
    )
    run = compose_update(pieces, config, "minibatch", None, SingleProcess(), None)
    state = State(torch.tensor(1), torch.tensor(0), torch.tensor(2.0))
    carry, stats, metrics = run(state, torch.ones(3))
    assert calls == ["shuffle", "prepare", "start", "step 0", "step 1", "finish"]
    assert carry.item() == 1.0 + 2 * 3.0 * 2.0
    assert metrics["k"].tolist() == [0, 1] and stats["stat"].item() == 3.0
    with pytest.raises(ValueError, match=r"compile_scope: expected one of .*'epoch'"):
        compose_update(pieces, config, "epoch", None, SingleProcess(), None)


def test_the_python_loop_makes_the_step_index_on_the_datas_device():
    # The eager and "minibatch" loops index minibatch k of data on the state's device: an
    # index made on the CPU failed on a GPU (an H200), and fails on the meta device here.
    meta = torch.device("meta")

    class State(NamedTuple):
        step: torch.Tensor
        key: torch.Tensor
        hparams: torch.Tensor

    def step(carry, prep, hparams, k):
        return carry + prep.index_select(0, k.reshape(1)).sum() * hparams, {"k": k}

    pieces = UpdatePieces(
        lambda state, batch: torch.arange(3, device=batch.device),
        lambda state, batch, order: (batch[order], {}, state.step.float()),
        lambda state, groups: groups,
        step,
        lambda step_, key, carry, stats, metrics: (carry, metrics),
    )
    config = PPOConfig(
        obs_dim=2, spec=ActionSpec({"op": 2}, "op", [(), ()]), update_epochs=3, compile=False
    )
    state = State(*(torch.zeros((), device=meta) for _ in range(3)))
    for scope in ("minibatch", "scan"):  # eager: both loop in Python
        run = compose_update(pieces, config, scope, None, SingleProcess(), None)
        carry, metrics = run(state, torch.ones(3, device=meta))
        assert carry.device == meta and metrics["k"].device == meta
        assert metrics["k"].shape == (3 * config.num_minibatches,)


def test_stacked_tree_map_equals_tree_map_eager_and_compiled():
    g = torch.Generator().manual_seed(0)
    tree = {"a": torch.randn(6, generator=g), "b": {"x": torch.randn(6, generator=g), "e": {}}}
    tree["b"]["x"][2] = float("nan")
    applied = torch.tensor([True, True, False, True, False, True])

    def mean(x):  # over the last axis, the leading ones a batch
        ok = applied & torch.isfinite(x)
        return torch.where(ok, x, 0.0).sum(-1) / ok.sum(-1)

    expected = optree.tree_map(mean, tree)
    assert_trees_equal(stacked_tree_map(mean, tree), expected)
    torch._dynamo.reset()
    compiled = compile_fn(lambda t: stacked_tree_map(mean, t), "stacked", AOT)
    assert_trees_equal(compiled(tree), expected)
    assert stacked_tree_map(mean, {"e": {}}) == {"e": {}}
