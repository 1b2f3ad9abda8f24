"""Whole CartPole runs against the field, and the plot that shows them.

Every contender trains CartPole-v1 for 499,712 env steps per seed (funcppo's 976 updates of
4 envs x 128 steps) with CleanRL's CartPole hyperparameters: 4 envs, 128 steps, 4 epochs,
4 minibatches, learning rate 2.5e-4 annealed linearly to 0 (rejax: constant, it has no
schedule), gamma 0.99, lambda 0.95, clip 0.2 (value clip 0.2), entropy 0.01, value 0.5, max
gradient norm 0.5, actor and critic MLPs 64 x 64 tanh.

    # funcppo, 8 seeds vmapped and compiled (the main job):
    python -m funcppo train --env cartpole --seeds 8 --out runs/cartpole8
    # Stable-Baselines3 PPO on gymnasium's CartPole-v1, 8 seeds one after another
    # (pip install -e '.[bench]'):
    python benchmarks/whole_runs.py sb3 --seeds 8 --out runs/sb3_cartpole8.json
    # rejax PPO on gymnax CartPole-v1, 8 seeds vmapped and jitted on JAX's CPU backend
    # (run with an interpreter that has jax and rejax; not part of the bench extra):
    python benchmarks/whole_runs.py rejax --seeds 8 --out runs/rejax_cartpole8.json
    # The README figure: learning curves, and update time against the number of seeds:
    python benchmarks/whole_runs.py plot --funcppo runs/cartpole8/metrics.jsonl \
        --sb3 runs/sb3_cartpole8.json --rejax runs/rejax_cartpole8.json \
        --seeds-json runs/vs_peers_seeds.json --out docs/benchmarks.png
"""

from __future__ import annotations

import argparse
import json
import os
import time

TOTAL_STEPS = 976 * 4 * 128  # 499,712, funcppo's budget per seed
NUM_ENVS, NUM_STEPS = 4, 128


def run_sb3(first_seed: int, num_seeds: int, out: str) -> None:
    """SB3 PPO, ``num_seeds`` seeds one after another in this process, each timed.

    The curve is, per rollout, the mean return of the last 100 training episodes, averaged
    over seeds.
    """
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    torch.set_num_threads(1)

    class Curve(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.points: list[tuple[int, float]] = []

        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            buffer = self.model.ep_info_buffer
            if buffer:
                mean = sum(e["r"] for e in buffer) / len(buffer)
                self.points.append((self.num_timesteps, mean))

    load = os.getloadavg()[0]
    walls, finals, curves = [], [], []
    for seed in range(first_seed, first_seed + num_seeds):
        start = time.perf_counter()
        env = make_vec_env("CartPole-v1", n_envs=NUM_ENVS, seed=seed)
        model = PPO(
            "MlpPolicy",
            env,
            n_steps=NUM_STEPS,
            batch_size=NUM_ENVS * NUM_STEPS // 4,
            n_epochs=4,
            learning_rate=lambda remaining: 2.5e-4 * remaining,
            gamma=0.99,
            gae_lambda=0.95,
            clip_range=0.2,
            clip_range_vf=0.2,
            ent_coef=0.01,
            vf_coef=0.5,
            max_grad_norm=0.5,
            device="cpu",
            seed=seed,
            verbose=0,
        )
        curve = Curve()
        model.learn(total_timesteps=TOTAL_STEPS, callback=curve)
        walls.append(time.perf_counter() - start)
        last = [e["r"] for e in model.ep_info_buffer]
        finals.append(sum(last) / len(last))
        curves.append(dict(curve.points))
        print(f"seed {seed}: {walls[-1]:.1f} s, final return {finals[-1]:.1f}", flush=True)
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    result = {
        "contender": "Stable-Baselines3 PPO",
        "seeds": num_seeds,
        "how": "one after another in one process",
        "steps_per_seed": model.num_timesteps,
        "wall_s": sum(walls),
        "wall_s_per_seed": walls,
        "final_return": sum(finals) / len(finals),
        "final_return_per_seed": finals,
        "final_return_def": "mean return of the last 100 training episodes, mean over seeds",
        "load_before": load,
        "load_after": os.getloadavg()[0],
        "curve": [(x, sum(c[x] for c in curves) / len(curves)) for x in steps],
    }
    _write(out, result)


def run_rejax(num_seeds: int, out: str) -> None:
    """rejax PPO, ``num_seeds`` seeds vmapped in one jitted program, timed with compilation.

    rejax evaluates 128 episodes every ``eval_freq`` steps inside the program; the timed run
    evaluates every 31,232 steps (61 updates, 16 evaluations) so that the figure is mostly
    training and the 976 updates are exactly funcppo's.
    """
    import jax
    import numpy as np
    from rejax import PPO

    algo = PPO.create(
        env="CartPole-v1",
        total_timesteps=TOTAL_STEPS,
        eval_freq=61 * NUM_ENVS * NUM_STEPS,
        num_envs=NUM_ENVS,
        num_steps=NUM_STEPS,
        num_epochs=4,
        num_minibatches=4,
        learning_rate=2.5e-4,
        max_grad_norm=0.5,
        gamma=0.99,
        gae_lambda=0.95,
        clip_eps=0.2,
        ent_coef=0.01,
        vf_coef=0.5,
        agent_kwargs={"activation": "tanh", "hidden_layer_sizes": (64, 64)},
    )
    keys = jax.random.split(jax.random.PRNGKey(0), num_seeds)
    train = jax.jit(jax.vmap(algo.train))
    load = os.getloadavg()[0]
    start = time.perf_counter()
    compiled = train.lower(keys).compile()
    compile_s = time.perf_counter() - start
    _, (_lengths, returns) = compiled(keys)
    returns = np.asarray(jax.block_until_ready(returns))  # [S, evals, 128 episodes]
    wall = time.perf_counter() - start
    per_eval = returns.mean(-1)  # [S, evals]
    evals = per_eval.shape[1]
    steps = [i * 61 * NUM_ENVS * NUM_STEPS for i in range(evals)]
    result = {
        "contender": "rejax PPO",
        "seeds": num_seeds,
        "steps_per_seed": TOTAL_STEPS,
        "wall_s": wall,
        "compile_s": compile_s,
        "final_return": float(per_eval[:, -1].mean()),
        "final_return_per_seed": per_eval[:, -1].tolist(),
        "final_return_def": "mean return of 128 evaluation episodes at the end, mean over seeds",
        "load_before": load,
        "load_after": os.getloadavg()[0],
        "jax": jax.__version__,
        "curve": [[s, float(v)] for s, v in zip(steps, per_eval.mean(0), strict=True)],
    }
    _write(out, result)


def _write(out: str, result: dict) -> None:
    summary = {k: v for k, v in result.items() if k != "curve"}
    print(json.dumps(summary, indent=1))
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f)


def funcppo_curve(path: str) -> list[tuple[int, float]]:
    """Mean over seeds of each update's episode return from the CLI's ``metrics.jsonl``."""
    points = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            values = [v for v in row["episode_return"] if v == v]  # NaN: no episode ended yet
            if values:
                points.append((row["env_steps"], sum(values) / len(values)))
    return points


def plot(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    fp = funcppo_curve(args.funcppo)
    left.plot(*zip(*fp, strict=True), label="funcppo (mean of 8 seeds)")
    for path, label in ((args.sb3, "Stable-Baselines3 PPO"), (args.rejax, "rejax")):
        if path:
            with open(path) as f:
                run = json.load(f)
            name = (
                f"{label} (mean of {run['seeds']} seeds)"
                if run["seeds"] > 1
                else f"{label} (1 seed)"
            )
            left.plot(
                *zip(*run["curve"], strict=True),
                label=name,
                marker="." if "rejax" in label else None,
            )
    left.set_xlabel("environment steps per seed")
    left.set_ylabel("episode return")
    left.set_title("CartPole-v1, CleanRL hyperparameters")
    left.legend()
    with open(args.seeds_json) as f:
        results = json.load(f)["results"]
    for prefix, label in (
        ("funcppo vmap", "funcppo, vmapped + compiled"),
        ("CleanRL-style loop", "CleanRL-style eager, loop over seeds"),
        ("MaskablePPO loop", "MaskablePPO.train(), loop over seeds"),
    ):
        rows = sorted(
            (int(k.split(" seeds")[0].split()[-1]), v["median_s"])
            for k, v in results.items()
            if k.startswith(prefix)
        )
        if rows:
            right.plot(*zip(*rows, strict=True), marker="o", label=label)
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("seeds per update")
    right.set_ylabel("seconds per update (median)")
    right.set_title("Update step, masked MLP workload, 1 CPU thread")
    right.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sb3 = sub.add_parser("sb3")
    sb3.add_argument("--seed", type=int, default=0, help="the first seed")
    sb3.add_argument("--seeds", type=int, default=1, help="how many, one after another")
    sb3.add_argument("--out", default="")
    rejax = sub.add_parser("rejax")
    rejax.add_argument("--seeds", type=int, default=8)
    rejax.add_argument("--out", default="")
    fig = sub.add_parser("plot")
    fig.add_argument("--funcppo", required=True, help="the CLI's metrics.jsonl")
    fig.add_argument("--sb3", default="")
    fig.add_argument("--rejax", default="")
    fig.add_argument("--seeds-json", required=True, help="vs_peers.py --seed-counts --json")
    fig.add_argument("--out", default="docs/benchmarks.png")
    args = parser.parse_args()
    if args.command == "sb3":
        run_sb3(args.seed, args.seeds, args.out)
    elif args.command == "rejax":
        run_rejax(args.seeds, args.out)
    else:
        plot(args)


if __name__ == "__main__":
    main()
