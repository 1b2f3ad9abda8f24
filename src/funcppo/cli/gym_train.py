"""``python -m funcppo train --env gym:ID``: a ``SeedsAgent`` on a gymnasium environment.

``--seeds S`` trains S agents as one program (``funcppo.agent.gym_vector``): one vector env of
S x ``--num-envs`` environments (``--vector sync|async``, ``--autoreset``), seed i's envs seeded
as a single agent's with seed ``--seed + i``, one compiled act call per env step for every
seed and one vmapped update. The outputs are the built-in path's: ``metrics.jsonl`` (each
metric a list over seeds), the learning curve, the summary table, and the checkpoint
(``checkpoint.pt`` for one seed, ``checkpoint-<i>.pt`` per seed otherwise, read back with
``PPOAgent.load``). Ctrl-C keeps every finished update, as the built-in path does.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from funcppo.accel.compiling import CompileSettings
from funcppo.accel.precompile import default_precompile_dir
from funcppo.agent.gym_adapter import GymAdapter, require_gymnasium
from funcppo.agent.gym_vector import SeedsAgent
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

# The acting and the update of gymnasium agents, compiled when they first run; precompiled
# files (funcppo.accel.precompile) make later runs start in seconds.
USUAL_COMPILE = "usually a minute or more on a first run, seconds when precompiled files exist"


def _make_env(args: argparse.Namespace, env_id: str, device: torch.device) -> GymAdapter:
    """One vector env of ``seeds x num_envs`` envs, seed i's seeded ``--seed + i + j`` as a
    single agent's vector env reset with seed ``--seed + i``; a mistake the env shows (an
    action space funcppo cannot drive) as a ``UsageError``."""
    gym = require_gymnasium()
    mode = gym.vector.AutoresetMode[args.autoreset.upper().replace("-", "_")]
    seeds = [args.seed + i + j for i in range(args.seeds) for j in range(args.num_envs)]
    vec = None
    try:
        vec = gym.make_vec(
            env_id,
            num_envs=args.seeds * args.num_envs,
            vectorization_mode=args.vector,
            vector_kwargs={"autoreset_mode": mode},
        )
        return GymAdapter(vec, seed=seeds, device=device)
    except (ValueError, gym.error.Error) as error:
        if vec is not None:
            vec.close()
        raise UsageError(f"--env {PREFIX}{env_id}: {error}") from None


def _agents(
    args: argparse.Namespace,
    env: GymAdapter,
    sweep: tuple[str, list[float]] | None,
    device: torch.device,
    folder: Path | None,
) -> SeedsAgent:
    """The seeds' agents, their compiled pieces kept in ``folder`` (None: not kept); a swept
    value out of range as a ``UsageError``."""
    config = PPOConfig(obs_dim=env.obs_dim, spec=env.spec, compile=not args.no_compile)
    check_sweep_values(sweep, config.replace)
    hparams = None if sweep is None else {sweep[0]: sweep[1]}
    return SeedsAgent(
        config,
        args.num_envs,
        args.num_steps,
        seeds=[args.seed + i for i in range(args.seeds)],
        normalize_obs=args.normalize_obs,
        device=device,
        hparams=hparams,
        # Ahead of time where the pieces are kept: compiled anew by every process it would
        # cost more than torch.compile with inductor's caches.
        compiler=CompileSettings.for_device(
            device, precompile_dir=folder, ahead_of_time=folder is not None
        ),
    )


def run_gym_train(args: argparse.Namespace) -> int:
    """Train ``args.seeds`` agents on ``args.env`` (``gym:ID``), as ``run_train`` does."""
    torch.set_num_threads(args.threads)
    folder = default_precompile_dir() if args.precompile and not args.no_compile else None
    return _run(args, folder)


def _run(args: argparse.Namespace, folder: Path | None) -> int:
    env_id = args.env.removeprefix(PREFIX)
    sweep = parse_sweep(args.sweep, args.seeds)
    device = torch_device(args.device)
    env = _make_env(args, env_id, device)
    try:
        agents = _agents(args, env, sweep, device, folder)
        return _train(args, env_id, env, agents, sweep, folder)
    finally:
        env.env.close()


def _train(
    args: argparse.Namespace,
    env_id: str,
    env: GymAdapter,
    agents: SeedsAgent,
    sweep: tuple[str, list[float]] | None,
    folder: Path | None,
) -> int:
    steps_per_update = args.num_envs * args.num_steps
    num_updates = args.total_steps // steps_per_update
    out = make_out_dir(args)
    print(
        f"training {args.seeds} seeds on gymnasium {env_id} for {num_updates} updates "
        f"({num_updates * steps_per_update:,} env steps per seed), one {args.vector} vector "
        f"env of {env.num_envs} envs, writing to {out}",
        file=sys.stderr,
        flush=True,
    )
    first = FirstCompile(not args.no_compile, folder, USUAL_COMPILE)
    progress = Progress(num_updates, steps_per_update, args.seeds, first)
    base = agents.state.hparams
    with open(out / "metrics.jsonl", "w") as log:
        recorder = Recorder(log, out / "tb", progress, steps_per_update)
        try:
            progress.start()
            for u in range(num_updates):
                start = time.perf_counter()
                left = anneal_left(u, num_updates)
                agents.collect(env)
                # Linear decay to 0, as the built-in path (TrainConfig.anneal_lr/_clip).
                lr = base.learning_rate * left
                clip = base.clip_coef * left if args.anneal_clip else base.clip_coef
                metrics = agents.update(lr, clip_coef=clip)
                metrics |= {"learning_rate": lr.tolist(), "clip_coef": clip.tolist()}
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
            agents.discard_rollout()  # after Ctrl-C mid-rollout: keep the last finished update
            kept += [Path(p) for p in agents.save(out)]
        curve = out / "learning_curve.png"
        if write_plot(curve, recorder.returns, steps_per_update, args.env, sweep):
            kept.append(curve)
        print_summary(recorder.returns, progress, sweep)
    return report_end(kept, done, num_updates, done < num_updates or bool(held))
