"""What compile_fn's settings are worth: the main job's training loop with each one on and off.

CartPole, the main job's shape (8 seeds vmapped, 4 envs x 128 steps per seed, CleanRL's
64 x 64 MLP, compiled rollout and update). Variants, each built by its own ``make_train``:

* ``shipped``: ``CompileSettings.for_device("cpu")`` as it is (inductor's size and alignment
  asserts off, tanh in its exp form, the kernels called from C++, ``cpp_wrapper``; dynamo's
  guards on the arguments only, ``guard_filter``; the graph rewrites: thin products as
  pointwise sums, ``ThinProducts``, Adam's bias corrections in exp form, ``PowAsExp``);
* ``asserts on``: inductor's default asserts, the rest shipped;
* ``all guards``: every guard dynamo makes, the rest shipped;
* ``library tanh``: inductor's own vectorised tanh, the rest shipped;
* ``matmuls``: every product a matmul (no ``ThinProducts``), the rest shipped;
* ``pow``: the bias corrections as pow (no ``PowAsExp``), the rest shipped;
* ``python wrapper``: the update's kernels called from inductor's Python wrapper, the rest
  shipped;
* ``none``: inductor's and dynamo's defaults, no rewrite.

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

from funcppo.accel.compiling import CompileSettings
from funcppo.cli.args import ppo_config
from funcppo.core import random as jr
from funcppo.envs import make_env
from funcppo.training.train import TrainConfig, make_train
from interleaved import print_table, run_rounds

SHIPPED = CompileSettings.for_device("cpu")
ASSERTS = ("size_asserts", "alignment_asserts")
TANH = ("cpp.use_decompose_tanh",)
THIN, POW = ("pre_grad_custom_pass",), ("post_grad_custom_post_pass",)


def without(names: tuple[str, ...]) -> CompileSettings:
    kept = tuple((k, v) for k, v in SHIPPED.inductor_options if k not in names)
    return SHIPPED.replace(inductor_options=kept)


# name: compile settings, read when a function is built.
VARIANTS = {
    "shipped": SHIPPED,
    "asserts on": without(ASSERTS),
    "all guards": SHIPPED.replace(guard_filter=False),
    "library tanh": without(TANH),
    "matmuls": without(THIN),
    "pow": without(POW),
    "python wrapper": SHIPPED.replace(cpp_wrapper=False),
    "none": CompileSettings(guard_filter=False),
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
    for name, settings in VARIANTS.items():
        trains[name] = make_train(config, num_seeds=args.seeds, compiler=settings)
    keys = jr.split(jr.key(0), args.seeds)
    times, first, params = run_rounds(trains, keys, args.rounds, lambda name: None)
    print_table("variant", "none", times, first, params)


if __name__ == "__main__":
    main()
