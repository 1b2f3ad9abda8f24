"""``python -m funcppo train``: several seeds at once on a built-in environment.

It shows progress (and how long compiling took), writes every metric of every update per seed
to ``metrics.jsonl`` (and to TensorBoard when installed), and at the end a learning-curve PNG
(when matplotlib is installed), a summary table and a checkpoint. Ctrl-C stops after the
current update and keeps what was done. The compiled pieces are saved whole on disk
(``funcppo.precompile``), so that a later run starts in seconds; ``--no-precompile`` leaves
only inductor's caches.

Under torchrun (``torchrun --nproc-per-node=K -m funcppo train ...``) the seeds are split over
the K processes, or with ``--data-parallel`` every process trains all seeds on its own
environments and the updates average over processes; rank 0 alone prints and writes files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import optree
import torch
from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

from funcppo import random as jr
from funcppo.checkpoint import save_checkpoint
from funcppo.config import PPOConfig
from funcppo.distributed import (
    DataParallel,
    close_distributed,
    data_parallel,
    gather_to_root,
    init_distributed,
    shard_seeds,
)
from funcppo.envs import ENVS, make_env
from funcppo.envs.lifecycle import REFERENCE_RETURN
from funcppo.evaluate import make_evaluate
from funcppo.precompile import PRECOMPILE_ENV, precompile_dir, precompiling
from funcppo.state import Hyperparams
from funcppo.train import TrainConfig, make_train

__all__ = ["main"]

# Returns drawn on the learning curve: Lifecycle's hand-written heuristic.
REFERENCE_RETURNS = {"lifecycle": REFERENCE_RETURN}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m funcppo")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train several seeds at once on a built-in environment")
    train.add_argument(
        "--env",
        default="cartpole",
        help=f"one of {sorted(ENVS)}, or gym:ID for a gymnasium environment (e.g. gym:CartPole-v1)",
    )
    train.add_argument("--seeds", type=int, default=8)
    train.add_argument("--total-steps", type=int, default=500_000, help="env steps per seed")
    train.add_argument(
        "--num-envs", type=int, default=None, help="envs per seed (default: the env's preset)"
    )
    train.add_argument(
        "--num-steps", type=int, default=None, help="rollout length (default: the env's preset)"
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
    train.add_argument("--no-compile", action="store_true", help="run eagerly")
    train.add_argument(
        "--precompile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the compiled functions on disk whole, so that a later run skips tracing "
        f"(in {PRECOMPILE_ENV} when set, else in a folder of inductor's cache)",
    )
    train.add_argument("--out", default="runs/latest", help="output directory")
    train.add_argument("--seed", type=int, default=0, help="seed of the first run")
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
        f"the hyperparameter NAME, one of {', '.join(Hyperparams._fields)}",
    )
    train.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1, safe when other work shares the cores; on an "
        "idle 2-core CPU, 2 ran the 8-seed CartPole job 1.2x faster)",
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
    return parser


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
    # 8 seeds evaluated at 274 before, 423 after (benchmarks/RESULTS.md).
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


# The TrainConfig fields a preset may set and the command line may override.
_TRAIN_FIELDS = ("num_envs", "num_steps", "normalize_obs", "anneal_clip")


def parse_sweep(text: str | None, num_seeds: int) -> tuple[str, list[float]] | None:
    """``"NAME=V1,V2,..."`` as ``(NAME, value per seed)``: seed i takes value i mod n."""
    if text is None:
        return None
    name, sep, values = text.partition("=")
    if not sep or name not in Hyperparams._fields:
        raise ValueError(
            f"--sweep: expected NAME=V1,V2,... with NAME one of {list(Hyperparams._fields)}, "
            f"got {text!r}"
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


def _sweep_groups(sweep: tuple[str, list[float]]) -> list[tuple[float, torch.Tensor]]:
    """Each distinct swept value, in first-seen order, with the bool mask of its seeds."""
    values = sweep[1]
    return [(v, torch.tensor([x == v for x in values])) for v in dict.fromkeys(values)]


# Per built-in env, --rollout-threads when not given. CartPole's rollout kernels are too small to
# split: with --threads 2, one thread for its rollout trained 8 seeds 1.04-1.09x faster than two
# (benchmarks/threads.py). Lifecycle's 64 envs per seed went the other way (0.81x): not listed.
ROLLOUT_THREADS: dict[str, int] = {"cartpole": 1}


def _ppo_config(env_name: str, env, compile_: bool) -> PPOConfig:
    return PPOConfig(obs_dim=env.obs_dim, spec=env.spec, compile=compile_, **PRESETS[env_name][1])


class Progress:
    """One line on stderr: updates, steps/s, mean return over seeds, ETA."""

    def __init__(self, total_updates: int, steps_per_update: int, compiling: bool) -> None:
        self.total, self.steps, self.compiling = total_updates, steps_per_update, compiling
        self.start = time.perf_counter()
        self.first_done: float | None = None

    def __call__(self, u: int, mean_return: float) -> None:
        now = time.perf_counter()
        if self.first_done is None:
            self.first_done = now
            what = "compiled and ran" if self.compiling else "ran"
            print(f"\n{what} the first update in {now - self.start:.1f} s", file=sys.stderr)
        done = u + 1
        rate = (done - 1) * self.steps / max(now - self.first_done, 1e-9) if done > 1 else 0.0
        eta = (self.total - done) * self.steps / rate if rate > 0 else float("nan")
        print(
            f"\rupdate {done}/{self.total}  {rate:8.0f} steps/s  return {mean_return:8.2f}  "
            f"ETA {eta:6.0f} s",
            end="",
            file=sys.stderr,
            flush=True,
        )


def _smooth(returns: torch.Tensor, points: int = 100) -> torch.Tensor:
    """``[U, S]`` per-update returns as a trailing mean over about ``U / points`` updates per
    seed, skipping updates in which no episode finished (NaN)."""
    window = max(1, returns.shape[0] // points)
    finite = torch.isfinite(returns)
    zeros = returns.new_zeros(1, returns.shape[1])
    total = torch.cat([zeros, torch.where(finite, returns, 0.0).cumsum(0)])
    count = torch.cat([zeros, finite.double().cumsum(0)])
    start = (torch.arange(returns.shape[0]) + 1 - window).clamp(min=0)
    end = torch.arange(returns.shape[0]) + 1
    n = count[end] - count[start]
    return torch.where(n > 0, (total[end] - total[start]) / n.clamp(min=1), torch.nan)


def _write_plot(
    path: Path, returns: list[list[float]], steps_per_update: int, env: str, sweep=None
) -> bool:
    """The learning curve: mean and 10th-90th percentile over seeds, or with a sweep one
    mean curve per swept value (its seeds' mean)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    data = _smooth(torch.tensor(returns, dtype=torch.float64))
    x = (torch.arange(data.shape[0]) + 1) * steps_per_update
    mean = torch.nanmean(data, 1)
    lo = torch.nanquantile(data, 0.1, dim=1) if data.shape[1] > 1 else mean
    hi = torch.nanquantile(data, 0.9, dim=1) if data.shape[1] > 1 else mean
    fig, ax = plt.subplots(figsize=(7, 4))
    window = max(1, data.shape[0] // 100)
    smoothing = f", trailing mean of {window} updates" if window > 1 else ""
    if sweep is None:
        ax.plot(x, mean, label=f"mean over {data.shape[1]} seeds{smoothing}")
        ax.fill_between(x, lo, hi, alpha=0.3, label="10th-90th percentile")
    else:
        name = sweep[0]
        for v, mine in _sweep_groups(sweep):
            label = f"{name}={v:g}, mean over {int(mine.sum())} seeds{smoothing}"
            ax.plot(x, torch.nanmean(data[:, mine], 1), label=label)
    reference = REFERENCE_RETURNS.get(env)
    if reference is not None:
        ax.axhline(reference, color="k", linestyle="--", label="reference return")
    ax.set_xlabel("environment steps per seed")
    ax.set_ylabel("episode return")
    ax.set_title(f"funcppo PPO on {env}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def record_update(
    u: int, metrics: dict, steps_per_update: int, log, writer, progress, returns: list
) -> None:
    """One update's per-seed host metrics to the JSONL log, TensorBoard, the curve and the
    progress line."""
    env_steps = (u + 1) * steps_per_update
    log.write(json.dumps({"update": u, "env_steps": env_steps, **metrics}) + "\n")
    returns.append(metrics["episode_return"])
    finite = [r for r in metrics["episode_return"] if not math.isnan(r)]
    mean_return = sum(finite) / len(finite) if finite else float("nan")
    if writer is not None:
        writer.add_scalar("episode_return", mean_return, env_steps)
    progress(u, mean_return)


def _merge_seeds(parts: list[tuple[int, dict]]) -> dict:
    """Rank 0's view of one update from every process's ``(update, metrics)``: per-seed lists
    concatenated in rank order (seed order), the slowest process's update time."""
    updates = {u for u, _ in parts}
    if len(updates) != 1:
        raise RuntimeError(f"processes out of step: at updates {sorted(updates)}")
    metrics = [m for _, m in parts]
    merged = {k: [x for m in metrics for x in m[k]] for k in metrics[0] if k != "update_seconds"}
    merged["update_seconds"] = max(m["update_seconds"] for m in metrics)
    return merged


def run_train(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    folder = None
    if args.precompile:
        folder = os.environ.get(PRECOMPILE_ENV) or os.path.join(inductor_cache_dir(), "funcppo")
    with precompiling(folder):
        return _run_processes(args)


def _run_processes(args: argparse.Namespace) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _run_train(args, 0, 1, None)
    rank, world = init_distributed(args.dist_timeout)
    try:
        code = _run_train(args, rank, world, data_parallel() if args.data_parallel else None)
    except BaseException:
        close_distributed(wait=False)
        raise
    close_distributed()
    return code


def _run_train(args: argparse.Namespace, rank: int, world: int, dp: DataParallel | None) -> int:
    # Split seeds: this process's shard of the keys of a single-process run.
    split_seeds = world > 1 and dp is None
    seeds = shard_seeds(args.seeds, rank, world) if split_seeds else range(args.seeds)
    sweep = parse_sweep(args.sweep, args.seeds)
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    env = make_env(args.env, args.num_envs)
    ppo = _ppo_config(args.env, env, not args.no_compile)
    # Data parallel, an agent learns from every process's envs: --total-steps counts them all.
    replicas = world if dp is not None else 1
    total = args.total_steps // replicas
    config = TrainConfig(
        args.env, ppo, total_steps=total, **{name: getattr(args, name) for name in _TRAIN_FIELDS}
    )
    steps_per_update = args.num_envs * args.num_steps * replicas
    if rank == 0:
        print(
            f"training {args.seeds} seeds on {args.env} for {config.num_updates} updates "
            f"({config.num_updates * steps_per_update} steps per seed"
            f"{f' and process, {world} processes' if dp else ''}), "
            f"{'compiling first (cached on disk after the first run)' if ppo.compile else 'eager'}",
            file=sys.stderr,
        )
    train = make_train(
        config, num_seeds=len(seeds), data_parallel=dp, rollout_threads=args.rollout_threads
    )
    progress = Progress(config.num_updates, steps_per_update, ppo.compile)
    returns: list[list[float]] = []
    writer = _tensorboard(out) if rank == 0 else None
    with open(out / "metrics.jsonl" if rank == 0 else os.devnull, "w") as log:

        def callback(u: int, metrics: dict) -> None:
            if split_seeds:
                parts = gather_to_root((u, metrics))
                if rank != 0:
                    return
                metrics = _merge_seeds(parts)
            elif rank != 0:
                return
            record_update(u, metrics, steps_per_update, log, writer, progress, returns)

        keys = jr.split(jr.key(args.seed), args.seeds)[seeds.start : seeds.stop]
        hparams = None
        if sweep is not None:
            name, per_seed_values = sweep
            hparams = {name: torch.tensor(per_seed_values[seeds.start : seeds.stop])}
        state, _ = train(keys, callback, hparams)
    if split_seeds:
        states = gather_to_root(optree.tree_map(lambda x: x.cpu(), state))
        if rank == 0:
            state = optree.tree_map(lambda *xs: torch.cat(xs), *states)
    if rank != 0:
        return 0
    print(file=sys.stderr)
    save_checkpoint(out / "checkpoint.pt", state, ppo)
    plotted = _write_plot(out / "learning_curve.png", returns, steps_per_update, args.env, sweep)
    _summary(returns, steps_per_update, sweep)
    evaluate = _evaluator(config, args.seeds, world, precompiled=precompile_dir() is not None)
    eval_keys = jr.split(jr.fold_in(jr.key(args.seed), 1), args.seeds)
    per_seed = evaluate(state, eval_keys).mean(1)
    (out / "evaluation.json").write_text(json.dumps({"episode_return": per_seed.tolist()}))
    print(
        f"evaluation, one whole episode per env: {per_seed.mean():.1f} +- "
        f"{per_seed.std(correction=0):.1f} over seeds ({', '.join(f'{r:.1f}' for r in per_seed)})"
    )
    print(
        f"wrote {out / 'metrics.jsonl'}, {out / 'evaluation.json'}, {out / 'checkpoint.pt'}"
        + (
            f", {out / 'learning_curve.png'}"
            if plotted
            else " (pip install matplotlib for the learning-curve plot)"
        )
    )
    return 0


def _evaluator(config: TrainConfig, num_seeds: int, world: int, precompiled: bool):
    """One whole episode per env and seed. Compiled, it plays training's rollout
    (``chunk_steps``) and loads its precompiled file: 0.2 s where eager took 2.5 s for 8
    CartPole seeds; eager wherever that would compile a new shape at the end of the run: no
    precompiled files, another seed count than training's (torchrun's shards), or an
    observation normaliser (evaluation's step then differs from training's)."""
    if config.ppo.compile and precompiled and world == 1 and not config.normalize_obs:
        return make_evaluate(config, num_seeds=num_seeds, chunk_steps=config.num_steps)
    return make_evaluate(config.replace(ppo=config.ppo.replace(compile=False)), num_seeds=num_seeds)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tb"))


def _summary(returns: list[list[float]], steps_per_update: int, sweep=None) -> None:
    if not returns:
        print("no update finished")
        return
    last = torch.tensor(returns[-10:], dtype=torch.float64)
    per_seed = torch.nanmean(last, 0)
    if sweep is None:
        print("\n| seed | mean return, last 10 updates |\n| ---: | ---: |")
        for i, r in enumerate(per_seed.tolist()):
            print(f"| {i} | {r:.1f} |")
    else:
        name, values = sweep
        print(f"\n| seed | {name} | mean return, last 10 updates |\n| ---: | ---: | ---: |")
        for i, r in enumerate(per_seed.tolist()):
            print(f"| {i} | {values[i]:g} | {r:.1f} |")
        for v, mine in _sweep_groups(sweep):
            group = per_seed[mine]
            print(f"| {name}={v:g} | | {group.mean():.1f} +- {group.std(correction=0):.1f} |")
    print(f"| all | {per_seed.mean():.1f} +- {per_seed.std(correction=0):.1f} |")
    print(f"after {len(returns) * steps_per_update} steps per seed")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # Gymnasium envs take CleanRL's rollout shape; built-in envs their preset's.
    rollout = PRESETS.get(args.env, ({"num_envs": 4, "num_steps": 128}, {}))[0]
    for name in _TRAIN_FIELDS:
        if getattr(args, name) is None:
            setattr(args, name, rollout.get(name, False))
    try:
        parse_sweep(args.sweep, args.seeds)
    except ValueError as error:
        parser.error(str(error))
    for flag, value in (("--threads", args.threads), ("--rollout-threads", args.rollout_threads)):
        if value is not None and value < 1:
            parser.error(f"{flag}: expected an int >= 1, got {value}")
    if args.rollout_threads is None:
        args.rollout_threads = ROLLOUT_THREADS.get(args.env)
    if args.env.startswith("gym:"):
        from funcppo.gym_train import run_gym_train

        return run_gym_train(args)
    if args.env not in ENVS:
        parser.error(f"--env: expected one of {sorted(ENVS)} or gym:ID, got {args.env!r}")
    return run_train(args)
