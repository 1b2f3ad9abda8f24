"""Update throughput on 1 and 2 processes (torch.distributed, gloo on the loopback, CPU).

Workload (the update-step benchmark's): observation 64; heads of sizes 3, 5, 4, 6 with random
masks; 8 envs x 128 steps per process; 4 epochs x 4 minibatches; MLP 2 x 128 tanh.

Cases, each timed as the median of ``--repeats`` calls after one warm-up call, the slowest
process's median counting:

- ``1 process``: ``make_update_fn(config)`` on one batch (no torch.distributed at all);
- ``1 process, data parallel``: the same through ``DataParallel`` over a group of 1 (the cost of
  the reduction path itself);
- ``2 processes, data parallel``: one agent trained on both processes' batches (each its own
  8 x 128), so an update covers twice the samples;
- ``seeds``: S seeds vmapped in 1 process, against S / 2 per process on 2 processes.

Throughput is samples (env steps, times seeds) per second of update. The script spawns its own
processes:

    python benchmarks/distributed.py               # eager
    python benchmarks/distributed.py --compile     # compiled (inductor; slow to compile)
    python benchmarks/distributed.py --overhead    # plain vs group of 1, alternating calls

``--overhead`` times the first two cases in one process, alternating calls, so that a change
of load on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import optree
import torch

from funcppo.core import random as jr
from funcppo.core.config import PPOConfig
from funcppo.core.spec import ActionSpec
from funcppo.training.state import init_train_state
from funcppo.training.synthetic import synthetic_batch
from funcppo.training.update import make_update_fn

SPEC = ActionSpec(
    {"op": 3, "a": 5, "b": 4, "c": 6}, "op", [(), ("a",), ("a", "b", "c")], op_conditioned=("a",)
)
NUM_STEPS, NUM_ENVS = 128, 8


def make_config(compile_: bool) -> PPOConfig:
    return PPOConfig(
        obs_dim=64,
        spec=SPEC,
        torso_sizes=(128, 128),
        update_epochs=4,
        num_minibatches=4,
        target_kl=None,
        compile=compile_,
    )


def make_inputs(config: PPOConfig, num_seeds: int | None, rank: int, first_seed: int = 0):
    """The shared initial state and this process's batch (seed i: key i, as on one process)."""
    if num_seeds is None:
        state = init_train_state(jr.key(0), config)
        batch = synthetic_batch(
            config, state.params, jr.fold_in(jr.key(1), rank), NUM_STEPS, NUM_ENVS
        )
        return state, batch
    keys = jr.split(jr.key(0), first_seed + num_seeds)[first_seed:]
    states = init_train_state(keys, config)
    batches = [
        synthetic_batch(
            config,
            optree.tree_map(lambda x, i=i: x[i], states.params),
            jr.fold_in(jr.key(1), first_seed + i),
            NUM_STEPS,
            NUM_ENVS,
        )
        for i in range(num_seeds)
    ]
    return states, optree.tree_map(lambda *xs: torch.stack(xs), *batches, none_is_leaf=False)


def median_seconds(update, state, batch, repeats: int, barrier) -> float:
    update(state, batch)
    times = []
    for _ in range(repeats):
        barrier()
        start = time.perf_counter()
        _, metrics = update(state, batch)
        float(metrics["loss"].sum())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def overhead(args: dict, out: str) -> None:
    """Plain and group-of-1 data-parallel updates in one process, alternating calls."""
    from funcppo.training.distributed import data_parallel, init_distributed

    init_distributed(timeout_s=600)
    config = make_config(args["compile"])
    state, batch = make_inputs(config, None, 0)
    updates = {
        "plain": make_update_fn(config),
        "dp": make_update_fn(config, data_parallel=data_parallel()),
    }
    times = {name: [] for name in updates}
    for update in updates.values():
        update(state, batch)
    for _ in range(args["repeats"]):
        for name, update in updates.items():
            start = time.perf_counter()
            float(update(state, batch)[1]["loss"].sum())
            times[name].append(time.perf_counter() - start)
    Path(out, "0.txt").write_text(
        " ".join(str(statistics.median(times[name])) for name in ("plain", "dp"))
    )


def worker(rank: int, world: int, port: int, case: str, args: dict, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    if case == "overhead":
        return overhead(args, out)
    from funcppo.training.distributed import data_parallel, init_distributed

    init_distributed(timeout_s=600)
    import torch.distributed as dist

    config = make_config(args["compile"])
    if case == "seeds":
        per = args["seeds"] // world
        state, batch = make_inputs(config, per, rank, first_seed=rank * per)
        update = make_update_fn(config, num_seeds=per)
    else:
        state, batch = make_inputs(config, None, rank)
        dp = None if case == "plain" else data_parallel()
        update = make_update_fn(config, data_parallel=dp)
    seconds = median_seconds(update, state, batch, args["repeats"], dist.barrier)
    Path(out, f"{rank}.txt").write_text(str(seconds))
    dist.destroy_process_group()


def run(world: int, case: str, args: dict) -> list[float]:
    """Every number rank 0 wrote (overhead: two medians), else the slowest process's median."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as out:
        procs = [
            ctx.Process(target=worker, args=(r, world, port, case, args, out)) for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"{case} on {world} processes failed: {[p.exitcode for p in procs]}")
        if case == "overhead":
            return [float(x) for x in Path(out, "0.txt").read_text().split()]
        return [max(float(Path(out, f"{r}.txt").read_text()) for r in range(world))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seeds", type=int, default=8, help="seeds of the seeds case (even)")
    parser.add_argument("--compile", action="store_true", help="compile the update (inductor)")
    parser.add_argument(
        "--overhead", action="store_true", help="only plain vs group of 1, alternating calls"
    )
    args = parser.parse_args()
    if args.seeds % 2:
        parser.error(f"--seeds: expected an even number, got {args.seeds}")
    print(
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, gloo, 1 intra-op thread per process, "
        f"{'compiled' if args.compile else 'eager'}, 1-min load at start "
        f"{os.getloadavg()[0]:.1f}",
        flush=True,
    )
    opts = vars(args)
    if args.overhead:
        plain, dp = run(1, "overhead", opts)
        print(
            f"alternating, {args.repeats} calls each: plain {plain * 1e3:.1f} ms, data parallel "
            f"(group of 1) {dp * 1e3:.1f} ms per update ({dp / plain - 1:+.1%}); "
            f"1-min load at end {os.getloadavg()[0]:.1f}"
        )
        return
    samples = NUM_STEPS * NUM_ENVS
    rows = []
    for label, world, case, n in (
        ("1 process", 1, "plain", samples),
        ("1 process, data parallel (group of 1)", 1, "dp", samples),
        ("2 processes, data parallel", 2, "dp", 2 * samples),
        (f"{args.seeds} seeds vmapped, 1 process", 1, "seeds", args.seeds * samples),
        (
            f"{args.seeds} seeds, {args.seeds // 2} per process, 2 processes",
            2,
            "seeds",
            args.seeds * samples,
        ),
    ):
        (seconds,) = run(world, case, opts)
        rows.append((label, n, seconds))
        print(
            f"{label:48s} median {seconds * 1e3:8.1f} ms  {n / seconds:9.0f} samples/s", flush=True
        )
    print(f"1-min load at end {os.getloadavg()[0]:.1f}")
    print("\n| case | samples per update | median update (ms) | samples/s |")
    print("| --- | ---: | ---: | ---: |")
    for label, n, seconds in rows:
        print(f"| {label} | {n} | {seconds * 1e3:.1f} | {n / seconds:.0f} |")


if __name__ == "__main__":
    main()
