"""``python -m funcppo train --env gym:ID``: PPOAgent on a gymnasium environment.

Gymnasium environments run on the host, so seeds are not vmapped: ``--seeds S`` makes S agents,
each with its own ``gymnasium.make_vec(ID, num_envs)`` (seeded ``--seed + i``), stepped one
after the other within each update. The outputs are the built-in path's: ``metrics.jsonl``
(each metric a list over seeds), the learning curve, the summary table, and the checkpoint
(``checkpoint.pt`` for one seed, ``checkpoint-<i>.pt`` per seed otherwise, read back with
``PPOAgent.load``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from funcppo.agent import PPOAgent
from funcppo.config import PPOConfig, anneal_left
from funcppo.gym_adapter import GymAdapter, _gym

__all__ = ["run_gym_train"]

PREFIX = "gym:"


def _agents(
    args: argparse.Namespace, env_id: str, sweep: tuple[str, list[float]] | None
) -> list[tuple[PPOAgent, GymAdapter]]:
    gym = _gym()
    pairs = []
    for i in range(args.seeds):
        vec = gym.make_vec(env_id, num_envs=args.num_envs, vectorization_mode="sync")
        env = GymAdapter(vec, seed=args.seed + i)
        config = PPOConfig(obs_dim=env.obs_dim, spec=env.spec, compile=not args.no_compile)
        if sweep is not None:
            value = sweep[1][i]
            if sweep[0] == "target_kl" and value == float("inf"):
                value = None  # no early stopping
            config = config.replace(**{sweep[0]: value})
        agent = PPOAgent(
            config,
            args.num_envs,
            args.num_steps,
            seed=args.seed + i,
            normalize_obs=args.normalize_obs,
        )
        pairs.append((agent, env))
    return pairs


def run_gym_train(args: argparse.Namespace) -> int:
    """Train ``args.seeds`` agents on ``args.env`` (``gym:ID``), as ``run_train`` does."""
    from funcppo.cli import (
        Progress,
        _summary,
        _tensorboard,
        _write_plot,
        parse_sweep,
        record_update,
    )

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("--env gym:ID runs in one process; start it without torchrun")
    torch.set_num_threads(args.threads)
    env_id = args.env.removeprefix(PREFIX)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sweep = parse_sweep(args.sweep, args.seeds)
    pairs = _agents(args, env_id, sweep)
    steps_per_update = args.num_envs * args.num_steps
    num_updates = args.total_steps // steps_per_update
    if num_updates < 1:
        raise SystemExit(
            f"--total-steps: expected at least {steps_per_update}, got {args.total_steps}"
        )
    print(
        f"training {args.seeds} agents on gymnasium {env_id} for {num_updates} updates "
        f"({num_updates * steps_per_update} steps per seed), one after the other",
        file=sys.stderr,
    )
    progress = Progress(num_updates, steps_per_update, not args.no_compile)
    writer = _tensorboard(out)
    returns: list[list[float]] = []
    base = [(float(a.config.learning_rate), float(a.config.clip_coef)) for a, _ in pairs]
    with open(out / "metrics.jsonl", "w") as log:
        try:
            for u in range(num_updates):
                start = time.perf_counter()
                per_seed = []
                left = anneal_left(u, num_updates)
                for (agent, env), (lr, clip) in zip(pairs, base, strict=True):
                    agent.collect(env)
                    # Linear decay to 0, as the built-in path (TrainConfig.anneal_lr/_clip).
                    lr_now, clip_now = lr * left, clip * left if args.anneal_clip else clip
                    metrics = agent.update(lr_now, clip_coef=clip_now)
                    per_seed.append(metrics | {"learning_rate": lr_now, "clip_coef": clip_now})
                metrics = {k: [m[k] for m in per_seed] for k in per_seed[0]}
                metrics["update_seconds"] = time.perf_counter() - start
                record_update(u, metrics, steps_per_update, log, writer, progress, returns)
        except KeyboardInterrupt:
            pass
    print(file=sys.stderr)
    names = (
        ["checkpoint.pt"] if len(pairs) == 1 else [f"checkpoint-{i}.pt" for i in range(len(pairs))]
    )
    for (agent, _), name in zip(pairs, names, strict=True):
        agent.discard_rollout()  # after Ctrl-C mid-rollout: keep the last finished update
        agent.save(out / name)
    plotted = _write_plot(out / "learning_curve.png", returns, steps_per_update, args.env, sweep)
    _summary(returns, steps_per_update, sweep)
    print(
        f"wrote {out / 'metrics.jsonl'}, {', '.join(str(out / n) for n in names)}"
        + (f", {out / 'learning_curve.png'}" if plotted else "")
    )
    return 0
