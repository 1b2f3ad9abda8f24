"""``python -m funcppo train``: several seeds at once on a built-in or gymnasium environment.

This module and ``funcppo.cli.args`` (presets, checks, the output folder) read and check the
command line without importing torch (seconds of imports), so that ``--help`` and a mistake
answer at once and nothing is written before the arguments are known to be good. The runs
themselves are ``funcppo.cli.train`` (built-in environments, seeds vmapped into one program)
and ``funcppo.cli.gym_train`` (``--env gym:ID``); what they print and write is
``funcppo.cli.report``.

A run shows progress (and how long the first compile took), writes every metric of every
update per seed to ``metrics.jsonl`` (and to TensorBoard when installed), and at the end a
learning-curve PNG (when matplotlib is installed), a summary table and a checkpoint, in a new
folder per run unless ``--out`` names one. Ctrl-C stops it, keeps what finished and exits 130.
The compiled pieces are saved whole on disk (``funcppo.accel.precompile``), so that a later run
starts in seconds; ``--no-precompile`` leaves only inductor's caches.

Under torchrun (``torchrun --nproc-per-node=K -m funcppo train ...``) the seeds are split over
the K processes, or with ``--data-parallel`` every process trains all seeds on its own
environments and the updates average over processes; rank 0 alone prints and writes files.
"""

from __future__ import annotations

import argparse
import sys

from funcppo.cli.args import (
    GYM_PREFIX,
    GYM_ROLLOUT,
    PRESETS,
    ROLLOUT_THREADS,
    RUNS_DIR,
    SWEEPABLE,
    UsageError,
    check_args,
    fill_defaults,
    parse_sweep,
)

__all__ = ["PRESETS", "ROLLOUT_THREADS", "UsageError", "main", "parse_sweep"]

# funcppo.accel.precompile.PRECOMPILE_ENV, named here so that --help needs no torch.
PRECOMPILE_ENV = "FUNCPPO_PRECOMPILE_DIR"

DESCRIPTION = """\
funcppo trains PPO agents: several seeds of one job at once, vmapped into one compiled
program on the built-in environments (CartPole, velocity-hidden CartPole with an LSTM,
Lifecycle's factored and masked actions), or on a gymnasium environment, one vector env for
every seed's envs.
"""

EPILOG = """\
examples:
  python -m funcppo train --env cartpole
      8 seeds of CartPole, 500k env steps each, into a new folder runs/cartpole-<time>
  python -m funcppo train --env gym:CartPole-v1 --seeds 4 --vector async --out runs/gym
  python -m funcppo train --help
      every option of a training run and its default
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help, unless the help already says it (a default of
    None means "decided later" and is described in words); description and epilog as
    written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


def _positive_help(what: str) -> str:
    return f"{what} (an int >= 1)"


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The program's parser and its ``train`` command's (whose usage a mistake shows)."""
    parser = argparse.ArgumentParser(
        prog="python -m funcppo",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser(
        "train",
        help="train several seeds at once on a built-in or gymnasium environment",
        description="Train --seeds independent PPO agents on one environment: print progress,\n"
        "write metrics.jsonl, a learning curve, a summary and checkpoints into --out.\n"
        "Ctrl-C stops the run, keeps every finished update and exits 130.",
        formatter_class=_HelpFormatter,
    )
    train.add_argument(
        "--env",
        default="cartpole",
        help=f"one of {', '.join(sorted(PRESETS))}, or gym:ID for a registered gymnasium "
        "environment with discrete actions (e.g. gym:CartPole-v1)",
    )
    train.add_argument(
        "--seeds",
        type=int,
        default=8,
        help=_positive_help(
            "how many independent agents to train, each from its own random key (split from "
            "--seed), vmapped into one program (gym:ID: one vector env for all seeds)"
        ),
    )
    train.add_argument(
        "--total-steps",
        type=int,
        default=500_000,
        help="environment steps per seed; the run makes total-steps // (num-envs x num-steps) "
        "updates, so at least one rollout",
    )
    train.add_argument(
        "--num-envs",
        type=int,
        default=None,
        help=f"environments per seed (default: the env's preset; {GYM_ROLLOUT['num_envs']} for "
        "gym:ID)",
    )
    train.add_argument(
        "--num-steps",
        type=int,
        default=None,
        help=f"steps per environment in one rollout (default: the env's preset; "
        f"{GYM_ROLLOUT['num_steps']} for gym:ID)",
    )
    train.add_argument(
        "--normalize-obs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="normalise observations by their running mean and variance, as SB3's "
        "VecNormalize (default: the env's preset; off for gym:ID)",
    )
    train.add_argument(
        "--anneal-clip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decay the clipping range linearly to 0 over the run, as the learning rate "
        "(default: the env's preset; off for gym:ID)",
    )
    train.add_argument(
        "--vector",
        choices=("sync", "async"),
        default="sync",
        help="gym:ID only: gymnasium's vector env, its envs stepped in this process (sync) or "
        "each in a subprocess of its own (async, for envs whose step is expensive)",
    )
    train.add_argument(
        "--autoreset",
        choices=("same-step", "next-step"),
        default="same-step",
        help="gym:ID only: the vector env's autoreset mode; same-step wastes no env step, and "
        "only with it is each seed exactly the run of a single agent with that seed",
    )
    train.add_argument("--no-compile", action="store_true", help="run eagerly, no torch.compile")
    train.add_argument(
        "--precompile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the compiled functions on disk whole, so that a later run skips tracing "
        f"(in {PRECOMPILE_ENV} when set, else in a folder of inductor's cache)",
    )
    train.add_argument(
        "--out",
        default=None,
        help=f"output folder: new, or empty, or with --overwrite (default: a new folder "
        f"{RUNS_DIR}/<env>-<YYYYmmdd-HHMMSS> per run, -2, -3, ... appended when taken)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --out that holds files: its earlier outputs (metrics.jsonl, "
        "evaluation.json, learning_curve.png, checkpoints, tb/) are removed first, other files "
        "are left",
    )
    train.add_argument("--seed", type=int, default=0, help="the key every seed's key is split from")
    train.add_argument(
        "--device",
        default="cpu",
        help="where the agents' tensors live and their programs run: cpu, cuda or cuda:N (under "
        "torchrun, cuda is each process's own GPU, cuda:LOCAL_RANK)",
    )
    train.add_argument(
        "--data-parallel",
        action="store_true",
        help="under torchrun: all seeds on every process, each with its own envs; updates "
        "average over processes (default: seeds split over processes)",
    )
    train.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        help="under torchrun: seconds before a failed or hung process stops the others",
    )
    train.add_argument(
        "--sweep",
        metavar="NAME=V1,V2,...",
        default=None,
        help="one program, several settings: seed i takes value i mod (number of values) of "
        f"the hyperparameter NAME, one of {', '.join(SWEEPABLE)} (default: no sweep)",
    )
    train.add_argument(
        "--threads",
        type=int,
        default=1,
        help=_positive_help(
            "torch intra-op threads; 1 is safe when other work shares the cores; on an idle "
            "2-core CPU, 2 ran the 8-seed CartPole job 1.2x faster"
        ),
    )
    train.add_argument(
        "--rollout-threads",
        type=int,
        default=None,
        help="torch intra-op threads while a built-in env's rollout runs (default: 1 for "
        "cartpole, else --threads); on an idle 2-core CPU, --threads 2 --rollout-threads 1 "
        "trained 8 CartPole seeds 1.04-1.09x faster than 2 for both, and Lifecycle's 64 envs "
        "0.81x as fast",
    )
    return parser, train


def run_train(args: argparse.Namespace) -> int:
    """The run on a built-in env (torch is imported here, after the arguments are checked)."""
    from funcppo.cli.train import run_builtin

    return run_builtin(args)


def main(argv: list[str] | None = None) -> int:
    parser, train_parser = _parsers()
    args = parser.parse_args(argv)
    fill_defaults(args)
    try:
        check_args(args)
        if args.env.startswith(GYM_PREFIX):
            from funcppo.cli.gym_train import run_gym_train

            return run_gym_train(args)
        return run_train(args)
    except UsageError as error:
        train_parser.error(str(error))
    except KeyboardInterrupt:
        # Outside a run's own handling: while torch is imported, before its folder is made.
        print("\ninterrupted", file=sys.stderr)
        return 130
