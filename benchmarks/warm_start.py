"""Warm start: how long a new process takes to the end of its first update, with inductor's
on-disk caches alone against precompiled functions (``funcppo.accel.precompile``).

Each measurement is a fresh process running ``make_train`` for 8 CartPole seeds (the main
job's shape) for two updates; the modes alternate, after one unmeasured process per mode
that fills its caches. Run with nothing else on the machine:

    python benchmarks/warm_start.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def child(seeds: int) -> None:
    import optree
    import torch

    start = time.perf_counter()
    torch.set_num_threads(1)
    from funcppo import random as jr
    from funcppo.cli.args import ppo_config
    from funcppo.envs import make_env
    from funcppo.training.train import TrainConfig, make_train

    imported = time.perf_counter() - start
    env = make_env("cartpole", 4)
    config = TrainConfig("cartpole", ppo_config("cartpole", env, True), 4, 128, 4 * 128 * 2)
    times: list[float] = []
    state, _ = make_train(config, num_seeds=seeds)(
        jr.split(jr.key(0), seeds), lambda u, m: times.append(m["update_seconds"])
    )
    checksum = sum(float(x.double().sum()) for x in optree.tree_leaves(state.params))
    print(json.dumps({"import": imported, "first": times[0], "checksum": checksum}))


def run(mode: str, seeds: int, folder: str) -> dict:
    env = dict(os.environ)
    env.pop("FUNCPPO_PRECOMPILE_DIR", None)
    if mode == "precompiled":
        env["FUNCPPO_PRECOMPILE_DIR"] = folder
    cmd = [sys.executable, __file__, "--child", "--seeds", str(seeds)]
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["process"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(args.seeds)
        return
    import torch

    modes = ("inductor caches", "precompiled")
    print(
        f"CPU, {os.cpu_count()} cores, torch {torch.__version__}, one thread; "
        f"{args.seeds} CartPole seeds, 4 envs x 128 steps, first update of a new process"
    )
    with tempfile.TemporaryDirectory() as folder:
        for mode in modes:  # fill the caches
            first = run(mode, args.seeds, folder)
            print(f"filling {mode:16s}: first update {first['first']:6.1f} s", flush=True)
        rows = {mode: [] for mode in modes}
        for r in range(args.rounds):
            for mode in modes:
                rows[mode].append(run(mode, args.seeds, folder))
                got = rows[mode][-1]
                print(
                    f"round {r} {mode:16s}: first update {got['first']:6.2f} s, "
                    f"process {got['process']:6.2f} s",
                    flush=True,
                )
    print("\n| mode | first update, median (s) | whole process, median (s) |")
    print("| --- | ---: | ---: |")
    for mode in modes:
        first = statistics.median(r["first"] for r in rows[mode])
        process = statistics.median(r["process"] for r in rows[mode])
        print(f"| {mode} | {first:.2f} | {process:.2f} |")
    base, pre = (statistics.median(r["first"] for r in rows[m]) for m in modes)
    checks = {r["checksum"] for m in modes for r in rows[m]}
    print(f"\nfirst update {base / pre:.1f}x faster precompiled; parameter checksums: {checks}")


if __name__ == "__main__":
    main()
