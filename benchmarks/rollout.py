"""Rollout: one compiled scan over time against a Python loop over a compiled env step.

CartPole, the main job's shape (8 seeds vmapped, 4 envs x 128 steps per seed, CleanRL's
64 x 64 MLP). In one process: the compile time (first call) and the median of later calls of

* ``loop``: ``torch.compile`` of one vmapped env step, called 128 times from Python;
* ``scan``: ``make_train``'s rollout, the same step under ``scan``, compiled as one call
  whose loop runs in inductor's C++ wrapper;
* ``scan, python wrapper``: the same scan with the loop run by inductor's Python wrapper
  instead of its C++ one;
* ``eager``: the Python loop over the uncompiled step (what ``--no-compile`` runs).

The later calls alternate between the rollouts (one call of each per round), so that a slow
moment of the machine falls on all of them.

    python benchmarks/rollout.py [--seeds 8] [--repeats 15]

The inductor cache is a fresh temporary directory, so both compile times are cold.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="funcppo-rollout-")

import torch
from torch.func import vmap

from funcppo.accel.compiling import CompileSettings, compile_fn
from funcppo.accel.scanning import scan_rollout
from funcppo.cli.args import ppo_config
from funcppo.core import random as jr
from funcppo.envs import make_env
from funcppo.training.train import (
    TrainConfig,
    contiguous_outputs,
    init_runner,
    make_env_step,
    make_rollout,
)

NUM_ENVS, NUM_STEPS = 4, 128


def timed(contenders: dict, rs, repeats: int) -> tuple[dict, dict]:
    """First call of each rollout (compile included), then ``repeats`` rounds alternating
    between them; returns ``{name: (first, median)}`` and each rollout's last batch."""
    firsts, states, batches = {}, {}, {}
    for name, rollout in contenders.items():
        start = time.perf_counter()
        states[name], batches[name] = rollout(rs)
        firsts[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, rollout in contenders.items():
            start = time.perf_counter()
            states[name], batches[name] = rollout(states[name])
            times[name].append(time.perf_counter() - start)
    return {name: (firsts[name], statistics.median(times[name])) for name in contenders}, batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    env = make_env("cartpole", NUM_ENVS)
    config = TrainConfig("cartpole", ppo_config("cartpole", env, True), NUM_ENVS, NUM_STEPS)
    step = contiguous_outputs(vmap(make_env_step(config, env), randomness="error"))
    init = contiguous_outputs(vmap(lambda k: init_runner(config, env, k), randomness="error"))
    rs = init(jr.split(jr.key(0), args.seeds))
    # The CPU's settings with inductor's Python wrapper: the loop's step, and the scan whose
    # loop then runs in Python.
    python_wrapper = CompileSettings.for_device("cpu").replace(cpp_wrapper=False)
    compiled_step = compile_fn(step, "env_step", python_wrapper)
    scanned, drive = scan_rollout(step, NUM_STEPS, 1)
    in_python = compile_fn(scanned, "rollout_python_wrapper", python_wrapper)
    contenders = {
        "loop": make_rollout(compiled_step, NUM_STEPS, 1, False, "inductor"),
        "scan": make_rollout(step, NUM_STEPS, 1, True, "inductor"),
        "scan, python wrapper": lambda rs: drive(in_python, rs),
        "eager": make_rollout(step, NUM_STEPS, 1, False, "inductor"),
    }
    results, batches = timed(contenders, rs, args.repeats)
    for name in contenders:  # same keys, same numbers
        diff = (batches[name].obs - batches["eager"].obs).abs().max()
        assert diff < 1e-4, (name, float(diff))
    print(f"CartPole rollout, {args.seeds} seeds x {NUM_ENVS} envs x {NUM_STEPS} steps, 1 thread")
    print("| rollout | first call (compile) | median | env steps/s, all seeds |")
    print("| --- | ---: | ---: | ---: |")
    steps = args.seeds * NUM_ENVS * NUM_STEPS
    for name, (first, median) in results.items():
        print(f"| {name} | {first:.1f} s | {median * 1e3:.1f} ms | {steps / median:,.0f} |")
    print(f"scan against loop: {results['loop'][1] / results['scan'][1]:.2f}x")
    python = results["scan, python wrapper"][1]
    print(f"scan's loop in C++ against Python: {python / results['scan'][1]:.2f}x")


if __name__ == "__main__":
    main()
