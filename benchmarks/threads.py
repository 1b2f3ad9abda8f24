"""Threads for the rollout and for the update: the main job's training loop on each split.

The main job's shape (``--seeds`` seeds vmapped, the env's preset rollout and PPO settings,
compiled rollout and update). Each variant is its own ``make_train(...,
compiler=CompileSettings.for_device("cpu", rollout_threads=R))`` run with
``torch.set_num_threads(U)``, so it compiles as the CLI's ``--threads U --rollout-threads R``
would:

* ``1/1``: one thread throughout (the CLI's default);
* ``2/2``: two threads throughout (``--threads 2``);
* ``rollout 1, update 2`` (``--threads 2 --rollout-threads 1``).

All run in this one process, interleaved: each round trains every variant for ``--updates``
updates from the same key; the first round's time includes compilation. Reported: the median
update (rollout and update step) over the later updates of every round, its ratio to ``2/2``,
and each variant's largest parameter difference from ``2/2`` after its last round.

    python benchmarks/threads.py [--env cartpole] [--seeds 8] [--updates 30] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

from funcppo.accel.compiling import CompileSettings
from funcppo.cli.args import ppo_config
from funcppo.cli.main import PRESETS
from funcppo.core import random as jr
from funcppo.envs import make_env
from funcppo.training.train import TrainConfig, make_train
from interleaved import print_table, run_rounds

# name: (rollout threads, update threads)
VARIANTS = {"1/1": (1, 1), "2/2": (2, 2), "rollout 1, update 2": (1, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="cartpole", choices=sorted(PRESETS))
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    shape = PRESETS[args.env][0]
    num_envs, num_steps = shape["num_envs"], shape["num_steps"]
    print(
        f"device: CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}; {args.env}, {args.seeds} seeds, {num_envs} x {num_steps}"
    )
    env = make_env(args.env, num_envs)
    ppo = ppo_config(args.env, env, True)
    config = TrainConfig(args.env, ppo, total_steps=num_envs * num_steps * args.updates, **shape)
    trains = {
        name: make_train(
            config,
            num_seeds=args.seeds,
            compiler=CompileSettings.for_device("cpu", rollout_threads=rollout),
        )
        for name, (rollout, _) in VARIANTS.items()
    }
    keys = jr.split(jr.key(0), args.seeds)
    times, first, params = run_rounds(
        trains, keys, args.rounds, lambda name: torch.set_num_threads(VARIANTS[name][1])
    )
    print_table("rollout / update threads", "2/2", times, first, params)


if __name__ == "__main__":
    main()
