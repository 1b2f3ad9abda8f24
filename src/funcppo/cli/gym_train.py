"""``python -m funcppo train --env gym:ID``: PPOAgent on a gymnasium environment.

Gymnasium environments run on the host, so seeds are not vmapped: ``--seeds S`` makes S agents,
each with its own ``gymnasium.make_vec(ID, num_envs)`` (seeded ``--seed + i``), stepped one
after the other within each update. The outputs are the built-in path's: ``metrics.jsonl``
(each metric a list over seeds), the learning curve, the summary table, and the checkpoint
(``checkpoint.pt`` for one seed, ``checkpoint-<i>.pt`` per seed otherwise, read back with
``PPOAgent.load``). Ctrl-C keeps every finished update, as the built-in path does.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from funcppo.agent.agent import PPOAgent
from funcppo.agent.gym_adapter import GymAdapter, require_gymnasium
from funcppo.cli.args import (
    UsageError,
    check_sweep_values,
    make_out_dir,
    parse_sweep,
    torch_device,
)
from funcppo.cli.report import (
    FirstCompile,
    Progress,
    Recorder,
    held_interrupts,
    print_summary,
    report_end,
    write_plot,
)
from funcppo.core.config import PPOConfig, anneal_left

__all__ = ["run_gym_train"]

PREFIX = "gym:"

# The update step of a gymnasium agent, compiled when it first runs; inductor's caches, not
# precompiled files, make later runs quicker.
USUAL_COMPILE = "usually a minute or more on a first run, less when inductor's caches are warm"


def _agents(
    args: argparse.Namespace,
    env_id: str,
    sweep: tuple[str, list[float]] | None,
    device: torch.device,
) -> list[tuple[PPOAgent, GymAdapter]]:
    """One agent and vector env per seed; a mistake the env or the sweep shows (an action
    space funcppo cannot drive, a swept value out of range) as a ``UsageError``."""
    gym = require_gymnasium()
    pairs = []
    for i in range(args.seeds):
        try:
            vec = gym.make_vec(env_id, num_envs=args.num_envs, vectorization_mode="sync")
            env = GymAdapter(vec, seed=args.seed + i, device=device)
        except (ValueError, gym.error.Error) as error:
            raise UsageError(f"--env {PREFIX}{env_id}: {error}") from None
        config = PPOConfig(obs_dim=env.obs_dim, spec=env.spec, compile=not args.no_compile)
        if i == 0:
            check_sweep_values(sweep, config.replace)
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
            device=device,
        )
        pairs.append((agent, env))
    return pairs


def run_gym_train(args: argparse.Namespace) -> int:
    """Train ``args.seeds`` agents on ``args.env`` (``gym:ID``), as ``run_train`` does."""
    torch.set_num_threads(args.threads)
    env_id = args.env.removeprefix(PREFIX)
    sweep = parse_sweep(args.sweep, args.seeds)
    pairs = _agents(args, env_id, sweep, torch_device(args.device))
    steps_per_update = args.num_envs * args.num_steps
    num_updates = args.total_steps // steps_per_update
    out = make_out_dir(args)
    print(
        f"training {args.seeds} agents on gymnasium {env_id} for {num_updates} updates "
        f"({num_updates * steps_per_update:,} env steps per seed), one after the other, "
        f"writing to {out}",
        file=sys.stderr,
        flush=True,
    )
    first = FirstCompile(not args.no_compile, None, USUAL_COMPILE)
    progress = Progress(num_updates, steps_per_update, args.seeds, first)
    base = [(float(a.config.learning_rate), float(a.config.clip_coef)) for a, _ in pairs]
    with open(out / "metrics.jsonl", "w") as log:
        recorder = Recorder(log, out / "tb", progress, steps_per_update)
        try:
            progress.start()
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
                recorder(u, metrics)
        except KeyboardInterrupt:
            pass  # every finished update is kept below
        finally:
            progress.stop()
    done = len(recorder.returns)
    with held_interrupts() as held:
        kept = [out / "metrics.jsonl"]
        if done > 0:
            names = (
                ["checkpoint.pt"]
                if len(pairs) == 1
                else [f"checkpoint-{i}.pt" for i in range(len(pairs))]
            )
            for (agent, _), name in zip(pairs, names, strict=True):
                agent.discard_rollout()  # after Ctrl-C mid-rollout: keep the last finished update
                agent.save(out / name)
                kept.append(out / name)
        curve = out / "learning_curve.png"
        if write_plot(curve, recorder.returns, steps_per_update, args.env, sweep):
            kept.append(curve)
        print_summary(recorder.returns, progress, sweep)
    return report_end(kept, done, num_updates, done < num_updates or bool(held))
