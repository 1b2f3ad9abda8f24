"""funcppo.training.distributed: data-parallel updates against one process that saw every batch,
seeds split over processes against one process running them all, and a failing process stopping
the run. Multi-process tests spawn 2 CPU processes (gloo, loopback), bounded by a timeout."""

import json
import math
import multiprocessing
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import optree
import pytest
import torch

import funcppo.core.random as jr
from funcppo.core.advantages import explained_variance, normalize_advantages
from funcppo.core.config import PPOConfig
from funcppo.core.distributions import mask_stats
from funcppo.training.distributed import (
    SingleProcess,
    replicated_advantage_stats,
    replicated_mask_stats,
    shard_seeds,
)
from funcppo.training.state import init_train_state
from funcppo.training.synthetic import synthetic_batch
from funcppo.training.update import make_update_fn
from test_update import B, T, small_config

WORLD = 2
FLOORS = (("a", 1.0), ("c", 1.0), ("op", 0.0))
# Each case: config changes, number of seeds (None: one unbatched agent) and the compile
# backend. The first stops early on KL in its second epoch, so the processes must agree on it.
CASES = {
    "eager": (dict(target_kl=5e-4), None, None),
    "seeds": (dict(target_kl=2e-2), 2, None),
    "floor_accum": (
        dict(entropy_floor=FLOORS, entropy_floor_coef=5.0, grad_accum_steps=2),
        None,
        None,
    ),
    "recurrent": (dict(recurrent=True, bptt_len=4, num_minibatches=2), None, None),
}
# Compiling a whole update takes about 30 s per process on 2 shared cores, two processes at once
# several times that: beyond this suite's budget, so these run only with FUNCPPO_SLOW_TESTS=1.
# The collective itself is compiled in every run (test_collectives_...).
SLOW = os.environ.get("FUNCPPO_SLOW_TESTS") == "1"
SLOW_CASES = {
    "compiled_seeds_aot_eager": (dict(target_kl=2e-2, compile=True), 2, "aot_eager"),
    "compiled_inductor": (dict(target_kl=5e-4, compile=True), None, "inductor"),
}
RUN_CASES = {**CASES, **SLOW_CASES} if SLOW else CASES
SLOW_MARK = pytest.mark.skipif(not SLOW, reason="compiles a whole update: FUNCPPO_SLOW_TESTS=1")


def case_inputs(name: str, rank: int):
    """The shared initial state and rank ``rank``'s own batch ``[T, B]`` (per seed)."""
    changes, seeds, _ = {**CASES, **SLOW_CASES}[name]
    config = small_config(**changes)
    if seeds is None:
        state = init_train_state(jr.key(0), config)
        batch = synthetic_batch(config, state.params, jr.fold_in(jr.key(100), rank), T, B)
        return config, seeds, state, batch
    state = init_train_state(jr.split(jr.key(1), seeds), config)
    batches = [
        synthetic_batch(
            config,
            optree.tree_map(lambda x, i=i: x[i], state.params),
            jr.fold_in(jr.key(200 + i), rank),
            T,
            B,
        )
        for i in range(seeds)
    ]
    stacked = optree.tree_map(lambda *xs: torch.stack(xs), *batches, none_is_leaf=False)
    return config, seeds, state, stacked


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str, task: str, timeout_s: float) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    torch.set_num_threads(1)
    try:
        from funcppo.training.distributed import close_distributed, data_parallel, init_distributed

        init_distributed(timeout_s=timeout_s)
        result = globals()[task](rank, data_parallel())
        torch.save(result, Path(out) / f"rank{rank}.pt")
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise SystemExit(1) from None
    finally:
        # No barrier: some tasks end with their peer gone on purpose.
        close_distributed(wait=False)
    # Everything the test reads is written: skip interpreter finalisation, where with a peer
    # gone gloo's threads can still abort the process (SIGABRT, "terminate called without an
    # active exception"; pytorch/pytorch#190489), which failed one run of the failing-rank case.
    os._exit(0)


def spawn(task: str, out: Path, timeout_s: float = 60.0, pg_timeout_s: float = 30.0):
    """Run ``task(rank, dp)`` on 2 spawned processes; returns (exit codes, seconds taken)."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, port, str(out), task, pg_timeout_s))
        for r in range(WORLD)
    ]
    start = time.perf_counter()
    for p in procs:
        p.start()
    deadline = start + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.perf_counter()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs], time.perf_counter() - start


def dp_updates(rank: int, dp):
    """Every case's data-parallel update on this rank's batch."""
    results = {}
    for name, (_, _, backend) in RUN_CASES.items():
        config, seeds, state, batch = case_inputs(name, rank)
        kwargs = {} if backend is None else dict(backend=backend)
        update = make_update_fn(config, num_seeds=seeds, data_parallel=dp, **kwargs)
        results[name] = update(state, batch)
    results["collectives"] = collectives(rank, dp)
    results["train"] = data_parallel_train(rank, dp)
    return results


def collective_inputs(rank: int):
    # The empty dict: the loss's entropy-floor means without a floor, also reduced compiled.
    x = torch.arange(6.0).reshape(2, 3) * (rank + 1)
    return {"x": x, "n": torch.tensor([rank, 7]), "none": {}}


def collectives(rank: int, dp):
    """``tree_sum``/``tree_max`` eager, vmapped, and compiled (aot_eager) with and without vmap."""
    from torch.func import vmap

    from funcppo.accel.compiling import CompileSettings, compile_fn

    def both(tree):
        return dp.tree_sum(tree), dp.tree_max(tree)

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    tree = collective_inputs(rank)
    traced = CompileSettings(backend="aot_eager")
    out = {
        "eager": both(tree),
        "vmap": vmap(both)(tree),
        "compiled": compile_fn(both, "both", traced)(tree),
        "compiled_vmap": compile_fn(vmap(both), "both_vmap", traced)(tree),
    }
    return out, sum(counters["graph_break"].values())


def train_config():
    from funcppo.envs import make_env
    from funcppo.training.train import TrainConfig

    env = make_env("cartpole", 2)
    ppo = PPOConfig(obs_dim=env.obs_dim, spec=env.spec, compile=False, torso_sizes=(16, 16))
    return TrainConfig("cartpole", ppo, num_envs=2, num_steps=16, total_steps=2 * 16 * 2)


def data_parallel_train(rank: int, dp):
    """Two updates of ``make_train`` on CartPole, data parallel over the processes."""
    from funcppo.training.train import make_train

    state, history = make_train(train_config(), num_seeds=2, data_parallel=dp)(
        jr.split(jr.key(11), 2)
    )
    return state, history


def minibatch_union_permutations(config: PPOConfig, seqs_per_env: int):
    """``jr.permutations`` for one process holding both ranks' batches side by side on the env
    axis (rank 0's envs first): in every epoch its minibatch k is exactly rank 0's minibatch k
    together with rank 1's, which is the global minibatch a data-parallel step trains on."""
    original = jr.permutations

    def permutations(key, num, n):
        assert seqs_per_env * B * WORLD == n
        rows = []
        for local in original(key, num, n // WORLD):
            size = local.numel() // config.num_minibatches
            parts = []
            for k in range(config.num_minibatches):
                idx = local[k * size : (k + 1) * size]
                # Sequence c * B + b of a rank (chunk c, env b) is c * 2B + rank * B + b here.
                chunk, env = idx // B, idx % B
                parts += [chunk * WORLD * B + r * B + env for r in range(WORLD)]
            rows.append(torch.cat(parts))
        return torch.stack(rows)

    return permutations


def reference(name: str, monkeypatch):
    """One process, eager, given both ranks' batches concatenated on the env axis."""
    config, seeds, state, _ = case_inputs(name, 0)
    config = config.replace(compile=False)
    batches = [case_inputs(name, r)[3] for r in range(WORLD)]
    env_axis = 1 if seeds is None else 2
    both = optree.tree_map(lambda *xs: torch.cat(xs, env_axis), *batches, none_is_leaf=False)
    seq_len = config.bptt_len if config.recurrent else 1
    monkeypatch.setattr(jr, "permutations", minibatch_union_permutations(config, T // seq_len))
    update = make_update_fn(config)
    if seeds is None:
        return update(state, both)
    outs = [
        update(*optree.tree_map(lambda x, i=i: x[i], (state, both), none_is_leaf=False))
        for i in range(seeds)
    ]
    return optree.tree_map(lambda *xs: torch.stack(xs), *outs)


def max_diff(a, b):
    return max(
        float((x.float() - y.float()).abs().max())
        for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True)
    )


@pytest.fixture(scope="module")
def dp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    codes, seconds = spawn("dp_updates", out, timeout_s=600.0 if SLOW else 120.0)
    errors = "".join(p.read_text() for p in out.glob("*.err"))
    assert codes == [0, 0], (codes, seconds, errors)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize(
    "name",
    [*CASES, *[pytest.param(name, marks=SLOW_MARK) for name in SLOW_CASES]],
)
def test_data_parallel_update_equals_one_process_with_every_batch(name, dp_results, monkeypatch):
    # Exact in math: each process weighs its part of minibatch k's means by its share of the
    # global minibatch's counts (funcppo.training.accumulation), so the summed gradients are the
    # gradient of the loss of the union of the ranks' minibatches k, which is what the reference's
    # partition trains on; advantage normalisation uses the moments over both batches, as the
    # reference's does.
    expected_state, expected = reference(name, monkeypatch)
    (state0, metrics0), (state1, metrics1) = dp_results[0][name], dp_results[1][name]
    assert max_diff(state0, state1) == 0.0
    assert max_diff(state0.params, expected_state.params) < 1e-6
    assert max_diff(state0.opt_state, expected_state.opt_state) < 1e-6
    assert sorted(metrics0) == sorted(expected)
    for key, value in expected.items():
        assert torch.allclose(metrics0[key], value, atol=1e-5, rtol=0, equal_nan=True), key
        assert torch.equal(metrics0[key].nan_to_num(), metrics1[key].nan_to_num()), key
    if name == "eager":
        assert float(expected["early_stopped"]) == 1.0
        assert float(expected["updates_applied"]) == 2.0
    assert max_diff(state0.params, case_inputs(name, 0)[2].params) > 1e-4


def test_data_parallel_differs_from_each_batch_alone(dp_results):
    # The test above can fail: one process's batch alone gives other parameters.
    config, _, state, batch = case_inputs("eager", 0)
    alone, _ = make_update_fn(config)(state, batch)
    assert max_diff(alone.params, dp_results[0]["eager"][0].params) > 1e-4


def test_collectives_sum_and_max_eager_vmapped_and_compiled(dp_results):
    inputs = [collective_inputs(r) for r in range(WORLD)]
    total = optree.tree_map(lambda *xs: sum(xs), *inputs)
    top = optree.tree_map(lambda *xs: torch.stack(xs).amax(0), *inputs)
    for rank in range(WORLD):
        out, graph_breaks = dp_results[rank]["collectives"]
        assert graph_breaks == 0
        for name, (summed, maxed) in out.items():
            assert max_diff(summed, total) == 0.0, name
            assert max_diff(maxed, top) == 0.0, name


def test_data_parallel_train_keeps_processes_in_step(dp_results):
    from funcppo.training.train import make_train

    (state0, hist0), (state1, hist1) = dp_results[0]["train"], dp_results[1]["train"]
    assert max_diff(state0, state1) == 0.0
    for key in hist0:
        assert torch.equal(hist0[key].nan_to_num(), hist1[key].nan_to_num()), key
    # Rank 0 steps the envs of a single-process run; the other rank's rollouts change the result
    # and its episodes count.
    alone, hist = make_train(train_config(), num_seeds=2)(jr.split(jr.key(11), 2))
    assert max_diff(alone.params, state0.params) > 1e-4
    assert (hist0["episodes"] >= hist["episodes"]).all()
    assert hist0["episodes"].sum() > hist["episodes"].sum()


HANG_S = 8.0


def failing_rank(rank: int, dp):
    """Rank 1 raises at once; rank 0 times its data-parallel update until the error."""
    from funcppo.training.distributed import DistributedError

    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    return _time_update_until_error(dp, DistributedError)


def hanging_rank(rank: int, dp):
    """Rank 1 stops answering for HANG_S seconds, longer than the process group's timeout."""
    from funcppo.training.distributed import DistributedError

    if rank == 1:
        time.sleep(HANG_S)
        return None
    return _time_update_until_error(dp, DistributedError)


def _time_update_until_error(dp, error):
    config, _, state, batch = case_inputs("eager", 0)
    start = time.perf_counter()
    try:
        make_update_fn(config, data_parallel=dp)(state, batch)
    except error as err:
        return {"seconds": time.perf_counter() - start, "error": str(err)}
    return {"seconds": time.perf_counter() - start, "error": None}


@pytest.mark.slow
@pytest.mark.parametrize(("task", "bound_s"), [("failing_rank", 10.0), ("hanging_rank", 6.0)])
def test_a_failed_or_hung_process_stops_the_other_with_a_clear_error(task, bound_s, tmp_path):
    codes, _ = spawn(task, tmp_path, timeout_s=60.0, pg_timeout_s=2.0)
    assert codes[1] == (1 if task == "failing_rank" else 0)
    err = tmp_path / "rank0.err"
    # A negative code is a signal (the process crashed, no traceback written).
    assert codes[0] == 0, (codes, err.read_text() if err.exists() else "no rank0.err")
    result = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert result["error"] is not None
    assert "rank 0:" in result["error"] and "another process" in result["error"]
    # Hung: the 2 s timeout, not the other process's 8 s sleep, ends the wait.
    assert result["seconds"] < bound_s, result


def test_shard_seeds_covers_every_seed_once_with_sizes_within_one():
    for seeds in range(1, 12):
        for world in range(1, seeds + 1):
            shards = [shard_seeds(seeds, r, world) for r in range(world)]
            assert [i for s in shards for i in s] == list(range(seeds))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert list(shard_seeds(3, 0, 2)) == [0, 1] and list(shard_seeds(3, 1, 2)) == [2]
    with pytest.raises(ValueError, match="at least one seed per process"):
        shard_seeds(1, 0, 2)
    with pytest.raises(ValueError, match="rank"):
        shard_seeds(4, 2, 2)


def test_single_process_reductions_are_the_plain_formulas():
    one = SingleProcess()
    assert (one.world_size, one.rank, one.collectives) == (1, 0, False)
    tree = collective_inputs(0)
    assert one.tree_sum(tree) is tree and one.tree_max(tree) is tree
    _, batch = case_inputs("eager", 0)[2:]
    adv, returns, values = batch.rewards, batch.next_values, batch.values
    weight = torch.rand(adv.shape, generator=torch.Generator().manual_seed(0)) < 0.8
    normed, explained = one.advantage_stats(adv, returns, values, weight)
    assert torch.equal(normed, normalize_advantages(adv, weight))
    assert torch.equal(explained, explained_variance(values, returns, weight))
    stats = mask_stats(small_config().spec, batch.masks, batch.actions["op"])
    assert one.mask_stats(stats, batch.rewards.numel()) is stats
    one.check_same_shapes(batch)  # one process: nothing to compare, no collective


def test_replicated_formulas_over_one_process_equal_the_plain_ones():
    # DataParallel's statistics are these formulas over the group's sums; over one process
    # (SingleProcess's identity sums) they must be normalize_advantages' and the plain ones.
    config, _, _, batch = case_inputs("eager", 0)
    g = torch.Generator().manual_seed(1)
    adv = 3.0 * torch.randn(batch.rewards.shape, generator=g, dtype=torch.float64) + 1.0
    returns, values = adv + 0.5, torch.randn(adv.shape, generator=g, dtype=torch.float64)
    weight = torch.rand(adv.shape, generator=g) < 0.8
    adv = torch.where(weight, adv, math.nan)  # entries off the weight must not leak
    normed, explained = replicated_advantage_stats(adv, returns, values, weight, SingleProcess())
    expected = normalize_advantages(adv, weight)
    torch.testing.assert_close(normed[weight], expected[weight], rtol=1e-12, atol=1e-12)
    expected = explained_variance(values, returns, weight)
    torch.testing.assert_close(explained, expected, rtol=1e-12, atol=1e-12)
    stats = mask_stats(config.spec, batch.masks, batch.actions["op"])
    pooled = replicated_mask_stats(stats, batch.rewards.numel(), SingleProcess())
    for h in stats:
        torch.testing.assert_close(pooled[h], stats[h], msg=h)


def test_data_parallel_without_process_group_names_the_problem(monkeypatch):
    from funcppo.training.distributed import data_parallel, init_distributed

    with pytest.raises(ValueError, match="process group"):
        data_parallel()
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match="MASTER_PORT"):
        init_distributed()


CLI_ARGS = ["train", "--seeds", "3", "--total-steps", "96", "--num-envs", "2"]
CLI_ARGS += ["--num-steps", "16", "--no-compile"]


@pytest.mark.slow
def test_cli_seeds_split_over_two_processes_match_one_process(tmp_path):
    # 3 seeds over 2 processes: rank 0 runs seeds 0-1, rank 1 seed 2, vmapped each.
    from funcppo.cli.main import main
    from funcppo.training.checkpoint import load_checkpoint

    port = free_port()
    split, alone = tmp_path / "split", tmp_path / "alone"
    procs = []
    for rank in range(WORLD):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(WORLD),
        )
        cmd = [sys.executable, "-m", "funcppo", *CLI_ARGS, "--out", str(split)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert b"| all |" in outputs[0][0] and outputs[1][0] == b""
    assert main([*CLI_ARGS, "--out", str(alone)]) == 0
    records = [
        [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        for d in (split, alone)
    ]
    assert len(records[0]) == len(records[1]) == 3
    for got, want in zip(*records, strict=True):
        assert got["update"] == want["update"] and got["env_steps"] == want["env_steps"]
        for key in ("episode_return", "episodes", "loss", "approx_kl"):
            assert len(got[key]) == 3, key
            assert all(
                (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-4
                for a, b in zip(got[key], want[key], strict=True)
            ), (key, got[key], want[key])
    s_state, _, _ = load_checkpoint(split / "checkpoint.pt")
    a_state, _, _ = load_checkpoint(alone / "checkpoint.pt")
    assert max_diff(s_state, a_state) < 1e-5
    assert sorted(p.name for p in split.iterdir() if p.name != "tb") == sorted(
        p.name for p in alone.iterdir() if p.name != "tb"
    )
