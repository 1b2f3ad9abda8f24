"""``python -m funcppo train --env cartpole|cartpole-pomdp|lifecycle``: the seeds vmapped into
one program (``make_train``), under torchrun split over processes or data parallel.

Called by ``funcppo.cli.main`` once the arguments are checked: what can still be wrong (a swept
value out of its range) is found here before the output folder is made, and reported as a
``UsageError``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import optree
import torch

from funcppo.accel.compiling import CompileSettings
from funcppo.accel.precompile import default_precompile_dir
from funcppo.cli.args import (
    TRAIN_FIELDS,
    check_sweep_values,
    make_out_dir,
    parse_sweep,
    ppo_config,
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
from funcppo.core import random as jr
from funcppo.envs import make_env
from funcppo.training.checkpoint import save_checkpoint
from funcppo.training.distributed import (
    DataParallel,
    close_distributed,
    data_parallel,
    gather_to_root,
    init_distributed,
    shard_seeds,
)
from funcppo.training.evaluate import make_evaluate
from funcppo.training.train import TrainConfig, make_train

__all__ = ["run_builtin"]


def run_builtin(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    device = torch_device(args.device)
    folder = default_precompile_dir() if args.precompile else None
    return _run_processes(args, folder, device)


def _run_processes(args: argparse.Namespace, folder: Path | None, device: torch.device) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _run_train(args, 0, 1, None, folder, device)
    # The collectives run on the tensors' device: NCCL for GPUs, gloo for the CPU. NCCL's
    # processes each take the GPU of their LOCAL_RANK, which "cuda" then names.
    rank, world = init_distributed(args.dist_timeout, "nccl" if device.type == "cuda" else "gloo")
    try:
        dp = data_parallel() if args.data_parallel else None
        code = _run_train(args, rank, world, dp, folder, device)
    except BaseException:
        close_distributed(wait=False)
        raise
    close_distributed()
    return code


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


def _run_train(
    args: argparse.Namespace,
    rank: int,
    world: int,
    dp: DataParallel | None,
    folder: Path | None,
    device: torch.device,
) -> int:
    # Split seeds: this process's shard of the keys of a single-process run.
    split_seeds = world > 1 and dp is None
    seeds = shard_seeds(args.seeds, rank, world) if split_seeds else range(args.seeds)
    sweep = parse_sweep(args.sweep, args.seeds)
    env = make_env(args.env, args.num_envs)
    ppo = ppo_config(args.env, env, not args.no_compile)
    check_sweep_values(sweep, ppo.replace)
    # Data parallel, an agent learns from every process's envs: --total-steps counts them all.
    replicas = world if dp is not None else 1
    config = TrainConfig(
        args.env,
        ppo,
        total_steps=args.total_steps // replicas,
        **{name: getattr(args, name) for name in TRAIN_FIELDS},
    )
    steps_per_update = args.num_envs * args.num_steps * replicas
    out = make_out_dir(args) if rank == 0 else None
    if out is not None:
        print(
            f"training {args.seeds} seeds on {args.env} for {config.num_updates} updates "
            f"({config.num_updates * steps_per_update:,} env steps per seed"
            f"{f' and process, {world} processes' if dp else ''}), writing to {out}",
            file=sys.stderr,
            flush=True,
        )
    first = FirstCompile(ppo.compile, folder)
    progress = Progress(config.num_updates, steps_per_update, args.seeds, first)
    state, done = None, 0
    with open(out / "metrics.jsonl" if out is not None else os.devnull, "w") as log:
        recorder = Recorder(
            log, out / "tb" if out is not None else None, progress, steps_per_update
        )

        def callback(u: int, metrics: dict) -> None:
            if split_seeds:
                parts = gather_to_root((u, metrics))
                if rank != 0:
                    return
                metrics = _merge_seeds(parts)
            elif rank != 0:
                return
            recorder(u, metrics)

        try:
            keys = jr.split(jr.key(args.seed, device), args.seeds)[seeds.start : seeds.stop]
            # The per-env thread count applies where the rollout's kernels run on the CPU.
            compiler = CompileSettings.for_device(
                device, rollout_threads=args.rollout_threads, precompile_dir=folder
            )
            train = make_train(config, num_seeds=len(seeds), data_parallel=dp, compiler=compiler)
            hparams = None
            if sweep is not None:
                name, per_seed_values = sweep
                hparams = {name: torch.tensor(per_seed_values[seeds.start : seeds.stop])}
            if rank == 0:
                progress.start()
            # Ctrl-C inside train's loop returns the state of the last finished update.
            state, history = train(keys, callback, hparams)
            done = len(history["loss"]) if history else 0
        except KeyboardInterrupt:
            pass  # before the loop: nothing finished
        finally:
            progress.stop()
    interrupted = done < config.num_updates
    with held_interrupts() as held:
        if split_seeds and state is not None:
            states = gather_to_root(optree.tree_map(lambda x: x.cpu(), state))
            if rank == 0:
                state = optree.tree_map(lambda *xs: torch.cat(xs), *states)
        if out is None:
            return 130 if interrupted or held else 0
        kept = [out / "metrics.jsonl"]
        if done > 0:
            save_checkpoint(out / "checkpoint.pt", state, ppo)
            kept.append(out / "checkpoint.pt")
        curve = out / "learning_curve.png"
        if write_plot(curve, recorder.returns, steps_per_update, args.env, sweep):
            kept.append(curve)
        elif done > 0:
            print("(pip install matplotlib for the learning-curve plot)")
        print_summary(recorder.returns, progress, sweep)
    interrupted = interrupted or bool(held)
    if not interrupted:
        try:
            kept.append(_evaluate(args, config, state, world, compiler, out, device))
        except KeyboardInterrupt:
            interrupted = True
    return report_end(kept, done, config.num_updates, interrupted)


def _evaluate(
    args, config: TrainConfig, state, world: int, compiler: CompileSettings, out: Path, device
) -> Path:
    """One whole episode per env and seed under the final policy, printed and written."""
    evaluate = _evaluator(config, args.seeds, world, compiler)
    state = optree.tree_map(lambda x: x.to(device), state)  # split seeds come back on the CPU
    eval_keys = jr.split(jr.fold_in(jr.key(args.seed, device), 1), args.seeds)
    per_seed = evaluate(state, eval_keys).mean(1)
    path = out / "evaluation.json"
    path.write_text(json.dumps({"episode_return": per_seed.tolist()}))
    print(
        f"evaluation, one whole episode per env: {per_seed.mean():.1f} +- "
        f"{per_seed.std(correction=0):.1f} over seeds ({', '.join(f'{r:.1f}' for r in per_seed)})"
    )
    return path


def _evaluator(config: TrainConfig, num_seeds: int, world: int, compiler: CompileSettings):
    """One whole episode per env and seed. Compiled, it plays training's rollout
    (``chunk_steps``) and loads its precompiled file: 0.2 s where eager took 2.5 s for 8
    CartPole seeds; eager wherever that would compile a new shape at the end of the run: no
    precompiled files, another seed count than training's (torchrun's shards), or an
    observation normaliser (evaluation's step then differs from training's)."""
    precompiled = compiler.precompile_dir is not None
    if config.ppo.compile and precompiled and world == 1 and not config.normalize_obs:
        chunk = config.num_steps
        return make_evaluate(config, num_seeds=num_seeds, chunk_steps=chunk, compiler=compiler)
    return make_evaluate(config.replace(ppo=config.ppo.replace(compile=False)), num_seeds=num_seeds)
