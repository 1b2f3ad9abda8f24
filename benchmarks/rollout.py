"""Rollout: one compiled scan over time against a Python loop over a compiled env step.

CartPole, the main job's shape (8 seeds vmapped, 4 envs x 128 steps per seed, CleanRL's
64 x 64 MLP). In one process: the compile time (first call) and the median of later calls of

* ``loop``: ``torch.compile`` of one vmapped env step, called 128 times from Python (what
  ``make_train`` did before the scan);
* ``scan``: ``make_train``'s rollout, the same step under ``scan``, compiled as one call;
* ``eager``: the Python loop over the uncompiled step (what ``--no-compile`` runs).

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

from funcppo import random as jr
from funcppo.cli import _ppo_config
from funcppo.compiling import compile_fn
from funcppo.envs import make_env
from funcppo.train import (
    TrainConfig,
    _contiguous,
    _init_runner,
    _make_env_step,
    make_rollout,
)

NUM_ENVS, NUM_STEPS = 4, 128


def timed(rollout, rs, repeats: int) -> tuple[float, float, object]:
    start = time.perf_counter()
    rs, batch = rollout(rs)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        rs, batch = rollout(rs)
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    env = make_env("cartpole", NUM_ENVS)
    config = TrainConfig("cartpole", _ppo_config("cartpole", env, True), NUM_ENVS, NUM_STEPS)
    step = _contiguous(vmap(_make_env_step(config, env), randomness="error"))
    init = _contiguous(vmap(lambda k: _init_runner(config, env, k), randomness="error"))
    rs = init(jr.split(jr.key(0), args.seeds))
    compiled_step = compile_fn(step, "env_step")
    contenders = {
        "loop": make_rollout(compiled_step, NUM_STEPS, 1, False, "inductor"),
        "scan": make_rollout(step, NUM_STEPS, 1, True, "inductor"),
        "eager": make_rollout(step, NUM_STEPS, 1, False, "inductor"),
    }
    results, batches = {}, {}
    for name, rollout in contenders.items():
        first, median, batches[name] = timed(rollout, rs, args.repeats)
        results[name] = (first, median)
    for name in ("loop", "scan"):  # same keys, same numbers
        diff = (batches[name].obs - batches["eager"].obs).abs().max()
        assert diff < 1e-4, (name, float(diff))
    print(f"CartPole rollout, {args.seeds} seeds x {NUM_ENVS} envs x {NUM_STEPS} steps, 1 thread")
    print("| rollout | first call (compile) | median | env steps/s, all seeds |")
    print("| --- | ---: | ---: | ---: |")
    steps = args.seeds * NUM_ENVS * NUM_STEPS
    for name, (first, median) in results.items():
        print(f"| {name} | {first:.1f} s | {median * 1e3:.1f} ms | {steps / median:,.0f} |")
    print(f"scan against loop: {results['loop'][1] / results['scan'][1]:.2f}x")


if __name__ == "__main__":
    main()
