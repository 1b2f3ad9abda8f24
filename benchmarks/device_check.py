"""One device, checked and timed: is funcppo right and fast there?

On the device named by ``--device`` (``cpu``, ``cuda``, ``cuda:1``, ...), in one process:

a. **compiled == eager**: one update on the update benchmark's workload (``update_step.py``:
   observation 64, heads 3/5/4/6 with masks, 8 envs x 128 steps, 4 epochs x 4 minibatches, MLP
   2 x 128 and the same with an LSTM of 128), compiled with inductor and run eagerly from the
   same state and batch; also for 8 vmapped seeds, the benchmark's compiled and eager runs.
b. **vmap == loop**: the update vmapped over 4 seeds against a loop over the seeds (eager: vmap's
   batching rules on this device; (a)'s 8-seed row checks the compiled vmap against it).
c. **the update benchmark**: median milliseconds of the compiled and the eager update, for 1 and 8
   seeds, and the compiled first call (compile included).
d. **the main job**: 8 CartPole seeds through ``make_train`` with the CLI's CartPole preset
   (4 envs x 128 steps per seed), compiled, ``--main-updates`` updates (32 by default): the
   first update (compile included), the median of the later updates, and env steps per second.

Run it as

    python benchmarks/device_check.py --device cuda            # sized for under 8 minutes
    python benchmarks/device_check.py --device cpu --quick     # a few minutes on a small CPU

``--quick`` takes 3 timed repeats instead of 7, drops the LSTM's 8-seed row and runs the main
job for 8 updates; ``--skip-lstm``, ``--seeds``, ``--repeats`` and ``--main-updates`` size it
by hand.

Reading the output: the first lines name the device (the GPU's name, or the CPU model), the
torch version and the intra-op threads. The first table lists each check, the largest
absolute difference it found over every parameter, optimizer moment and metric (NaN where
both sides are NaN counts as equal), the tolerance and ``ok`` or ``FAILED``; the second lists
the figures, each compiled median with its speed-up over eager. The script exits with status 1
when any check failed, so it can gate a CI job on a GPU runner. Medians come from repeated
calls on the same inputs (the update is pure), synchronised with the device before the clock
is read; the first call of a compiled function is timed alone, so it includes compilation
(and is faster when inductor's on-disk cache already holds the kernels).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import optree
import torch

from funcppo.cli.args import PRESETS, ppo_config
from funcppo.core import random as jr
from funcppo.envs import make_env
from funcppo.training.train import TrainConfig, make_train
from funcppo.training.update import make_update_fn
from machine import cpu_name
from update_step import loop_over_seeds, make_config, make_inputs, sync, time_calls

MAIN_SEEDS = 8
VMAP_SEEDS = 4


def seeds_label(n: int) -> str:
    return "1 seed" if n == 1 else f"{n} seeds"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def check_device(name: str) -> torch.device:
    """``name`` as a torch device this machine has, or exit with a message that says why not."""
    try:
        device = torch.device(name)
    except RuntimeError:
        sys.exit(f"--device: expected a torch device name such as cpu or cuda, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device: expected a device this machine has, got {name!r}: no CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        sys.exit(f"--device: expected a CUDA index below {torch.cuda.device_count()}, got {name!r}")
    return device


def max_abs_diff(a, b) -> float:
    """The largest ``|a - b|`` over two trees of tensors; equal values (infinities included) and
    NaN on both sides count as 0, NaN on one side only as ``inf``."""
    worst = 0.0
    for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True):
        x, y = x.double(), y.double()
        same = (x == y) | (torch.isnan(x) & torch.isnan(y))
        diff = torch.where(same, 0.0, (x - y).abs().nan_to_num(nan=math.inf))
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
    return worst


def first_call(fn, args, device: torch.device):
    """``(fn(*args), seconds)`` for one call, the device synchronised on both sides."""
    sync(device)
    start = time.perf_counter()
    out = fn(*args)
    sync(device)
    return out, time.perf_counter() - start


class Report:
    """The checks and figures as they come, printed at once and again as two tables."""

    def __init__(self, atol: float) -> None:
        self.atol = atol
        self.checks: list[tuple[str, float, bool]] = []
        self.figures: list[tuple[str, str]] = []

    def check(self, label: str, got, want) -> None:
        diff = max_abs_diff(got, want)
        ok = diff <= self.atol
        self.checks.append((label, diff, ok))
        print(f"check  {label}: max abs diff {diff:.2e} {'ok' if ok else 'FAILED'}", flush=True)

    def figure(self, label: str, value: str) -> None:
        self.figures.append((label, value))
        print(f"figure {label}: {value}", flush=True)

    def print_tables(self) -> None:
        print("\n| check | max abs diff | tolerance | result |\n| --- | ---: | ---: | --- |")
        for label, diff, ok in self.checks:
            print(f"| {label} | {diff:.2e} | {self.atol:.0e} | {'ok' if ok else 'FAILED'} |")
        print("\n| figure | value |\n| --- | --- |")
        for label, value in self.figures:
            print(f"| {label} | {value} |")

    @property
    def failed(self) -> list[str]:
        return [label for label, _, ok in self.checks if not ok]


def update_part(
    report: Report, recurrent: bool, seed_counts: list[int], repeats: int, device: torch.device
) -> None:
    """Checks (a) and (b) and the update benchmark's rows for one architecture."""
    kind = "lstm" if recurrent else "mlp"
    eager_cfg, compiled_cfg = make_config(recurrent, False), make_config(recurrent, True)
    for num_seeds in seed_counts:
        seeds = None if num_seeds == 1 else num_seeds
        args = make_inputs(eager_cfg, seeds, device)
        eager = make_update_fn(eager_cfg, num_seeds=seeds)
        compiled = make_update_fn(compiled_cfg, num_seeds=seeds)
        want = eager(*args)
        got, compile_s = first_call(compiled, args, device)
        report.check(f"compiled == eager, {kind} update, {seeds_label(num_seeds)}", got, want)
        _, eager_s = time_calls(eager, args, repeats, device)
        _, compiled_s = time_calls(compiled, args, repeats, device)
        label = f"{kind} update, {seeds_label(num_seeds)}"
        report.figure(f"{label}, eager", f"{eager_s * 1e3:.1f} ms")
        report.figure(
            f"{label}, compiled",
            f"{compiled_s * 1e3:.1f} ms ({eager_s / compiled_s:.2f}x eager; "
            f"first call {compile_s:.1f} s)",
        )
    states, batches = make_inputs(eager_cfg, VMAP_SEEDS, device)
    vmapped = make_update_fn(eager_cfg, num_seeds=VMAP_SEEDS)(states, batches)
    looped = loop_over_seeds(make_update_fn(eager_cfg), VMAP_SEEDS)(states, batches)
    report.check(f"vmap == loop, {kind} update, {VMAP_SEEDS} seeds (eager)", vmapped, looped)


def main_job_part(report: Report, updates: int, device: torch.device) -> None:
    """The main job's benchmark: ``MAIN_SEEDS`` CartPole seeds, compiled, ``updates`` updates."""
    env = make_env("cartpole", PRESETS["cartpole"][0]["num_envs"])
    rollout = PRESETS["cartpole"][0]
    steps_per_update = rollout["num_envs"] * rollout["num_steps"]
    config = TrainConfig(
        "cartpole",
        ppo_config("cartpole", env, True),
        total_steps=updates * steps_per_update,
        **rollout,
    )
    seconds: list[float] = []
    train = make_train(config, num_seeds=MAIN_SEEDS)
    keys = jr.split(jr.key(0, device), MAIN_SEEDS)
    sync(device)
    start = time.perf_counter()
    train(keys, callback=lambda u, metrics: seconds.append(metrics["update_seconds"]))
    sync(device)
    wall = time.perf_counter() - start
    steady = statistics.median(seconds[1:]) if len(seconds) > 1 else math.nan
    label = f"main job: {MAIN_SEEDS} cartpole seeds x {updates} updates of {steps_per_update} steps"
    report.figure(f"{label}, wall", f"{wall:.1f} s (first update {seconds[0]:.1f} s)")
    report.figure(
        f"{label}, later updates",
        f"{steady * 1e3:.1f} ms median; {MAIN_SEEDS * steps_per_update / steady:,.0f} env "
        "steps/s over all seeds",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--quick", action="store_true", help="3 repeats, no LSTM 8-seed row, 8 main-job updates"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per median (7)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 8], help="update seed counts")
    parser.add_argument("--skip-lstm", action="store_true")
    parser.add_argument("--main-updates", type=int, default=None, help="main-job updates (32)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (CPU; 1 as the benchmarks)"
    )
    parser.add_argument(
        "--atol", type=float, default=1e-4, help="largest absolute difference a check accepts"
    )
    args = parser.parse_args()
    for flag, value in (("--repeats", args.repeats), ("--main-updates", args.main_updates)):
        if value is not None and value < 1:
            sys.exit(f"{flag}: expected an int >= 1, got {value}")
    if any(n < 1 for n in args.seeds):
        sys.exit(f"--seeds: expected ints >= 1, got {args.seeds}")
    device = check_device(args.device)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    main_updates = args.main_updates or (8 if args.quick else 32)
    start = time.perf_counter()
    print(
        f"device: {device} ({device_name(device)}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op thread(s)",
        flush=True,
    )
    report = Report(args.atol)
    update_part(report, False, args.seeds, repeats, device)
    if not args.skip_lstm:
        lstm_seeds = [1] if args.quick else args.seeds
        update_part(report, True, lstm_seeds, repeats, device)
    main_job_part(report, main_updates, device)
    report.print_tables()
    print(f"\n{device} ({device_name(device)}): {time.perf_counter() - start:.0f} s in all")
    if report.failed:
        print(f"FAILED: {', '.join(report.failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
