"""The command line's arguments, read without torch: the built-in environments' presets, the
checks that find a mistake before anything is imported or written, and the output folder.

Used by ``funcppo.cli.main`` (parsing) and by the runs it starts; torch is not imported here, so
that a mistake answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "GYM_PREFIX",
    "GYM_ROLLOUT",
    "PRESETS",
    "ROLLOUT_THREADS",
    "SWEEPABLE",
    "TRAIN_FIELDS",
    "UsageError",
    "check_args",
    "check_sweep_values",
    "fill_defaults",
    "make_out_dir",
    "parse_sweep",
    "ppo_config",
    "torch_device",
]

GYM_PREFIX = "gym:"

# Hyperparams' fields (funcppo.training.state), named here so that parsing needs no torch.
SWEEPABLE = (
    "learning_rate",
    "ent_coef",
    "clip_coef",
    "vf_coef",
    "gamma",
    "gae_lambda",
    "max_grad_norm",
    "target_kl",
)

# Where a run writes when --out is not given: RUNS_DIR/<env>-<YYYYmmdd-HHMMSS>[-N].
RUNS_DIR = "runs"

# What a run writes into its folder; --overwrite removes these first, and nothing else.
OUTPUT_FILES = ("metrics.jsonl", "evaluation.json", "learning_curve.png", "checkpoint.pt")
OUTPUT_GLOBS = ("checkpoint-*.pt",)
OUTPUT_DIRS = ("tb",)

# Per built-in env: the TrainConfig settings (rollout shape, normaliser, schedules) and the PPO
# settings that differ from CleanRL's defaults.
PRESETS: dict[str, tuple[dict, dict]] = {
    "cartpole": ({"num_envs": 4, "num_steps": 128}, {}),
    # Lifecycle: 64 envs x 32 steps (more envs per Python-driven step: ~10x the steps/s of 4 x
    # 128 eager), and a floor on the blueprint head's entropy (0.6 and 0.8 did about as well).
    # Qualities are shuffled every episode, so no blueprint index is good on average; without
    # the floor the head collapses onto a few indices (normalised entropy ~0.35), after which
    # pruning is pointless (the replant is the same index) and the policy settles on
    # fossilizing whatever it planted (a floor of 0.4 learnt more slowly than 0.6). Learning
    # rate 2e-3, annealed: the best of 5e-4, 1e-3, 2e-3 and 4e-3 in a 3M-step sweep; 20M steps
    # per seed then reach 97% of the reference return (benchmarks/RESULTS.md).
    "lifecycle": (
        {"num_envs": 64, "num_steps": 32},
        {"learning_rate": 2e-3, "entropy_floor": {"blueprint": 0.6}, "entropy_floor_coef": 1.0},
    ),
    # Velocity-hidden CartPole takes RL Zoo's RecurrentPPO settings for CartPoleNoVel: short
    # rollouts replayed whole (one minibatch, gradient through all 32 steps), twenty epochs,
    # lambda 0.8, no entropy bonus, a higher learning rate, the clipping range annealed with
    # it, and normalised observations (the pole's angle varies by hundredths of a radian):
    # 8 seeds evaluate at 423, against 274 with chunks of 16 steps, 4 minibatches and raw
    # observations (docs/design-notes.md, Presets).
    "cartpole-pomdp": (
        {"num_envs": 8, "num_steps": 32, "normalize_obs": True, "anneal_clip": True},
        {
            "recurrent": True,
            "lstm_size": 64,
            "bptt_len": 32,
            "gamma": 0.98,
            "gae_lambda": 0.8,
            "update_epochs": 20,
            "num_minibatches": 1,
            "ent_coef": 0.0,
            "learning_rate": 1e-3,
        },
    ),
}

# Gymnasium envs take CleanRL's rollout shape.
GYM_ROLLOUT = {"num_envs": 4, "num_steps": 128}

# The TrainConfig fields a preset may set and the command line may override.
TRAIN_FIELDS = ("num_envs", "num_steps", "normalize_obs", "anneal_clip")

# Per built-in env, --rollout-threads when not given. CartPole's rollout kernels are too small to
# split: with --threads 2, one thread for its rollout trained 8 seeds 1.04-1.09x faster than two
# (benchmarks/threads.py). Lifecycle's 64 envs per seed went the other way (0.81x): not listed.
ROLLOUT_THREADS: dict[str, int] = {"cartpole": 1}


class UsageError(ValueError):
    """A mistake in the command line, found before anything is written; ``main`` reports it
    as argparse does (usage, the message, exit status 2)."""


def parse_sweep(text: str | None, num_seeds: int) -> tuple[str, list[float]] | None:
    """``"NAME=V1,V2,..."`` as ``(NAME, value per seed)``: seed i takes value i mod n."""
    if text is None:
        return None
    name, sep, values = text.partition("=")
    if not sep or name not in SWEEPABLE:
        raise ValueError(
            f"--sweep: expected NAME=V1,V2,... with NAME one of {list(SWEEPABLE)}, got {text!r}"
        )
    try:
        floats = [float(v) for v in values.split(",")]
    except ValueError:
        raise ValueError(
            f"--sweep: expected comma-separated numbers after '=', got {values!r}"
        ) from None
    if not 1 <= len(floats) <= num_seeds:
        raise ValueError(
            f"--sweep: expected between 1 and --seeds={num_seeds} values, got {len(floats)}"
        )
    return name, [floats[i % len(floats)] for i in range(num_seeds)]


def check_sweep_values(sweep: tuple[str, list[float]] | None, replace: Callable) -> None:
    """Each swept value through the PPO config's own range check (``replace``, a
    ``PPOConfig.replace``); an infinite ``target_kl`` is no early stopping, and allowed."""
    if sweep is None:
        return
    name, values = sweep
    for value in dict.fromkeys(values):
        if name == "target_kl" and value == math.inf:
            continue
        try:
            replace(**{name: value})
        except ValueError as error:
            raise UsageError(f"--sweep: {error}") from None


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def fill_defaults(args: argparse.Namespace) -> None:
    """The env's preset (CleanRL's rollout for gym:ID) where the command line left None."""
    rollout = PRESETS.get(args.env, (GYM_ROLLOUT, {}))[0]
    for name in TRAIN_FIELDS:
        if getattr(args, name) is None:
            setattr(args, name, rollout.get(name, False))
    if args.rollout_threads is None:
        args.rollout_threads = ROLLOUT_THREADS.get(args.env)


def check_args(args: argparse.Namespace) -> None:
    """Every mistake that can be seen in the arguments, the environment's name and the output
    folder, as a ``UsageError`` naming the flag, what was expected and what came."""
    if args.env.startswith(GYM_PREFIX):
        _check_gym_id(args.env.removeprefix(GYM_PREFIX))
        if _world() > 1:
            raise UsageError(
                f"--env {args.env}: expected one process (gymnasium envs are not split over "
                f"processes), got WORLD_SIZE={_world()}; start it without torchrun"
            )
    elif args.env not in PRESETS:
        raise UsageError(f"--env: expected one of {sorted(PRESETS)} or gym:ID, got {args.env!r}")
    for flag, value in (
        ("--seeds", args.seeds),
        ("--total-steps", args.total_steps),
        ("--num-envs", args.num_envs),
        ("--num-steps", args.num_steps),
        ("--threads", args.threads),
        ("--rollout-threads", args.rollout_threads),
    ):
        if value is not None and value < 1:
            raise UsageError(f"{flag}: expected an int >= 1, got {value}")
    # Data parallel, the processes' envs together make one rollout of every seed.
    replicas = _world() if args.data_parallel and not args.env.startswith(GYM_PREFIX) else 1
    rollout = args.num_envs * args.num_steps * replicas
    if args.total_steps < rollout:
        shape = f"--num-envs x --num-steps = {args.num_envs} x {args.num_steps}"
        if replicas > 1:
            shape += f" x {replicas} processes"
        raise UsageError(
            f"--total-steps: expected at least one rollout per seed ({shape} = {rollout} env "
            f"steps), got {args.total_steps}"
        )
    if not args.dist_timeout > 0:
        raise UsageError(f"--dist-timeout: expected seconds > 0, got {args.dist_timeout}")
    try:
        parse_sweep(args.sweep, args.seeds)
    except ValueError as error:
        raise UsageError(str(error)) from None
    _check_out(args)


def _check_gym_id(env_id: str) -> None:
    """Whether gymnasium knows ``env_id``, as ``gymnasium.make`` looks it up (a ``module:``
    prefix imported first, an unversioned name taking its latest version)."""
    try:
        gym = importlib.import_module("gymnasium")
    except ImportError:
        raise UsageError(
            "--env gym:ID: expected gymnasium to be installed (pip install 'funcppo[gym]'), "
            "got no module named gymnasium"
        ) from None
    from gymnasium.envs.registration import find_highest_version, parse_env_id, registry

    module, _, name = env_id.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise UsageError(
                f"--env gym:{env_id}: expected an importable module before ':', got {error}"
            ) from None
    if name in registry:
        return
    try:
        namespace, base, version = parse_env_id(name)
        if version is None and find_highest_version(namespace, base) is not None:
            return
        gym.spec(name)
    except gym.error.Error as error:
        raise UsageError(
            f"--env: expected gym: and a registered gymnasium ID, got {GYM_PREFIX}{env_id} "
            f"({error})"
        ) from None


def _check_out(args: argparse.Namespace) -> None:
    if args.out is None or int(os.environ.get("RANK", "0")) != 0:
        return  # a new folder is made per run; under torchrun only rank 0 writes
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: expected a folder, got {str(out)!r}, which is a file")
    if out.is_dir():
        try:
            held = sorted(p.name for p in out.iterdir())
        except OSError as error:
            raise UsageError(f"--out: expected a folder this user can read, got {error}") from None
        if held and not args.overwrite:
            shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
            raise UsageError(
                f"--out: expected a new or empty folder, got {str(out)!r}, which holds "
                f"{len(held)} entries ({shown}); pass --overwrite to replace its earlier "
                "outputs, or leave --out out for a new folder per run"
            )
        if not os.access(out, os.W_OK | os.X_OK):
            raise UsageError(f"--out: expected a folder this user can write, got {str(out)!r}")
        return
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(
            f"--out: expected a path a folder can be made at, got {str(out)!r} "
            f"({str(parent)!r} is not a writable folder)"
        )


def make_out_dir(args: argparse.Namespace) -> Path:
    """The run's output folder, made now: ``--out`` (its earlier outputs removed with
    ``--overwrite``), or a new ``runs/<env>-<time>`` folder, never one that exists."""
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite:
            for name in OUTPUT_FILES:
                (out / name).unlink(missing_ok=True)
            for pattern in OUTPUT_GLOBS:
                for path in out.glob(pattern):
                    path.unlink()
            for name in OUTPUT_DIRS:
                shutil.rmtree(out / name, ignore_errors=True)
        return out
    stem = f"{re.sub(r'[^A-Za-z0-9._-]+', '-', args.env)}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in itertools.count(1):
        out = Path(RUNS_DIR) / (stem if n == 1 else f"{stem}-{n}")
        try:
            out.mkdir(parents=True)  # fails when it exists: two runs started in one second
        except FileExistsError:
            continue
        return out
    raise AssertionError("unreachable")


def torch_device(name: str):
    """``--device`` as a ``torch.device`` this machine has, or a ``UsageError``. It imports
    torch, so the runs call it once the other arguments are known to be good."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: expected cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise UsageError(
                f"--device: expected a device this machine has, got {name!r}, and torch "
                f"{torch.__version__} sees {count} CUDA device(s)"
            )
    return device


def ppo_config(env_name: str, env, compile_: bool):
    """A built-in env's ``PPOConfig``: its observation size and action spec, and its preset."""
    from funcppo.core.config import PPOConfig

    return PPOConfig(obs_dim=env.obs_dim, spec=env.spec, compile=compile_, **PRESETS[env_name][1])
