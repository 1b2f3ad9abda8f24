"""What compile_fn's settings are worth: the main job's training loop with each one on and off.

CartPole, the main job's shape (8 seeds vmapped, 4 envs x 128 steps per seed, CleanRL's
64 x 64 MLP, compiled rollout and update). Variants, each built by its own ``make_train``:

* ``shipped``: ``CompileSettings.for_device("cpu")`` and ``funcppo.networks`` as they are
  (inductor's size and alignment asserts off, tanh in its exp form, the kernels called from
  C++, ``cpp_wrapper``; dynamo's guards on the arguments only, ``guard_filter``; products
  with a thin weight as pointwise sums, ``THIN_MAX``);
* ``asserts on``: inductor's default asserts, the rest shipped;
* ``all guards``: every guard dynamo makes, the rest shipped;
* ``library tanh``: inductor's own vectorised tanh, the rest shipped;
* ``matmuls``: every product a matmul (``THIN_MAX = 0``), the rest shipped;
* ``python wrapper``: the update's kernels called from inductor's Python wrapper, the rest
  shipped;
* ``none``: inductor's and dynamo's defaults, every product a matmul.

All run in this one process, interleaved: each round trains every variant for ``--updates``
updates from the same key; the first round's time includes compilation. Reported: the median
update (rollout and update step) over the later updates of every round, and its ratio to
``none``. Each variant's final parameters are compared with ``none``'s.

    python benchmarks/compile_options.py [--seeds 8] [--updates 30] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

from funcppo import networks
from funcppo import random as jr
from funcppo.cli_args import ppo_config
from funcppo.compiling import CompileSettings
from funcppo.envs import make_env
from funcppo.train import TrainConfig, make_train
from interleaved import print_table, run_rounds

SHIPPED = CompileSettings.for_device("cpu")
ASSERTS = ("size_asserts", "alignment_asserts")
TANH = ("cpp.use_decompose_tanh",)


def without(names: tuple[str, ...]) -> CompileSettings:
    kept = tuple((k, v) for k, v in SHIPPED.inductor_options if k not in names)
    return SHIPPED.replace(inductor_options=kept)


# name: (compile settings, THIN_MAX); THIN_MAX is read when a function is traced, the
# settings when it is built.
VARIANTS = {
    "shipped": (SHIPPED, networks.THIN_MAX),
    "asserts on": (without(ASSERTS), networks.THIN_MAX),
    "all guards": (SHIPPED.replace(guard_filter=False), networks.THIN_MAX),
    "library tanh": (without(TANH), networks.THIN_MAX),
    "matmuls": (SHIPPED, 0),
    "python wrapper": (SHIPPED.replace(cpp_wrapper=False), networks.THIN_MAX),
    "none": (CompileSettings(guard_filter=False), 0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"device: CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, one thread; {args.seeds} seeds, CartPole 4 x 128"
    )
    env = make_env("cartpole", 4)
    ppo = ppo_config("cartpole", env, True)
    config = TrainConfig("cartpole", ppo, 4, 128, total_steps=4 * 128 * args.updates)
    trains = {}
    for name, (settings, _) in VARIANTS.items():
        trains[name] = make_train(config, num_seeds=args.seeds, compiler=settings)
    keys = jr.split(jr.key(0), args.seeds)

    def before(name: str) -> None:
        networks.THIN_MAX = VARIANTS[name][1]

    times, first, params = run_rounds(trains, keys, args.rounds, before)
    networks.THIN_MAX = VARIANTS["shipped"][1]
    print_table("variant", "none", times, first, params)


if __name__ == "__main__":
    main()
