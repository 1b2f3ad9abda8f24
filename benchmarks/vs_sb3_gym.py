"""funcppo against Stable-Baselines3 PPO on a gymnasium environment, as whole processes.

Workload: CleanRL's CartPole settings for both: gymnasium ``CartPole-v1``, 4 sync envs x 128
steps per update, 4 epochs x 4 minibatches, learning rate 2.5e-4 annealed linearly to 0,
gamma 0.99, GAE lambda 0.95, clip 0.2, entropy 0.01, 64 x 64 tanh actor and critic, one torch
thread, ``--total-steps`` env steps per seed.

* funcppo: ``SeedsAgent`` (``funcppo.agent.gym_vector``) on one gymnasium sync vector env of
  S x 4 envs (same-step autoreset), with its default settings: acting and update compiled
  ahead of time, the packages warm in the command line's folder (a first, untimed run
  writes them);
* SB3: ``PPO("MlpPolicy", make_vec_env(CartPole-v1, 4))`` and ``learn``, S runs one after
  the other in one process (the most favourable way to run S seeds with SB3: one import).

Each timed run is a new process: import, set-up and training. The rounds alternate funcppo
and SB3 for every seed count; the medians are reported, with env steps per second over all
seeds and SB3's time over funcppo's. Each process also reports its own phases.

    pip install -e '.[bench]'
    python benchmarks/vs_sb3_gym.py --rounds 3 --seeds 1 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from machine import cpu_name

TOTAL_STEPS = 51_200
NUM_ENVS, NUM_STEPS = 4, 128


def run_funcppo(seeds: int, total_steps: int, vector: str) -> dict:
    start = time.perf_counter()
    import gymnasium as gym
    import torch

    from funcppo.agent.gym_adapter import GymAdapter
    from funcppo.agent.gym_vector import SeedsAgent
    from funcppo.core.config import PPOConfig

    imported = time.perf_counter()
    torch.set_num_threads(1)
    vec = gym.make_vec(
        "CartPole-v1",
        num_envs=seeds * NUM_ENVS,
        vectorization_mode=vector,
        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP},
    )
    env = GymAdapter(vec, seed=[i + j for i in range(seeds) for j in range(NUM_ENVS)])
    config = PPOConfig(obs_dim=env.obs_dim, spec=env.spec)
    agents = SeedsAgent(config, NUM_ENVS, NUM_STEPS, seeds=range(seeds))
    ready = time.perf_counter()
    history = agents.learn(env, total_steps, anneal_lr=True)
    done = time.perf_counter()
    vec.close()
    returns = [m for h in history[-10:] for m in h["episode_return"] if m == m]
    return {
        "import_s": imported - start,
        "setup_s": ready - imported,
        "learn_s": done - ready,
        "return_last10": sum(returns) / max(len(returns), 1),
    }


def run_sb3(seeds: int, total_steps: int, vector: str) -> dict:
    start = time.perf_counter()
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    imported = time.perf_counter()
    torch.set_num_threads(1)
    learn, setup, returns = 0.0, 0.0, []
    for seed in range(seeds):
        t0 = time.perf_counter()
        vec_cls = SubprocVecEnv if vector == "async" else DummyVecEnv
        env = make_vec_env("CartPole-v1", n_envs=NUM_ENVS, seed=seed, vec_env_cls=vec_cls)
        model = PPO(
            "MlpPolicy",
            env,
            learning_rate=lambda left: 2.5e-4 * left,
            n_steps=NUM_STEPS,
            batch_size=NUM_ENVS * NUM_STEPS // 4,
            n_epochs=4,
            gamma=0.99,
            gae_lambda=0.95,
            clip_range=0.2,
            ent_coef=0.01,
            vf_coef=0.5,
            max_grad_norm=0.5,
            policy_kwargs={"net_arch": [64, 64], "activation_fn": torch.nn.Tanh},
            seed=seed,
            device="cpu",
            verbose=0,
        )
        t1 = time.perf_counter()
        model.learn(total_steps)
        t2 = time.perf_counter()
        setup, learn = setup + t1 - t0, learn + t2 - t1
        returns += [ep["r"] for ep in list(model.ep_info_buffer)[-10:]]
        env.close()
    return {
        "import_s": imported - start,
        "setup_s": setup,
        "learn_s": learn,
        "return_last10": sum(returns) / max(len(returns), 1),
    }


def _child(lib: str, seeds: int, total_steps: int, vector: str) -> dict:
    """One whole process: its wall time measured here, its phases reported by itself."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--child", lib, "--seeds", str(seeds)]
    cmd += ["--total-steps", str(total_steps), "--vector", vector]
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"{lib} with {seeds} seeds failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result | {"wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--total-steps", type=int, default=TOTAL_STEPS)
    parser.add_argument("--vector", choices=("sync", "async"), default="sync")
    parser.add_argument("--child", choices=("funcppo", "sb3"), default=None)
    parser.add_argument("--json", default=None, help="write every run's figures here")
    args = parser.parse_args()
    if args.child is not None:
        run = run_funcppo if args.child == "funcppo" else run_sb3
        print(json.dumps(run(args.seeds[0], args.total_steps, args.vector)))
        return
    # The CLI's folder of precompiled files, unless one is named.
    if "FUNCPPO_PRECOMPILE_DIR" not in os.environ:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        os.environ["FUNCPPO_PRECOMPILE_DIR"] = os.path.join(cache_dir(), "funcppo")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; one torch thread per process", flush=True)
    runs: dict[str, list[dict]] = {}
    for seeds in args.seeds:
        warm = _child("funcppo", seeds, args.total_steps, args.vector)
        print(f"warm-up funcppo, {seeds} seeds: {warm['wall_s']:.1f} s", flush=True)
        for r in range(args.rounds):
            for lib in ("funcppo", "sb3") if r % 2 == 0 else ("sb3", "funcppo"):
                result = _child(lib, seeds, args.total_steps, args.vector)
                runs.setdefault(f"{lib}/{seeds}", []).append(result)
                phases = ", ".join(f"{k} {v:.2f}" for k, v in result.items())
                print(f"round {r} {lib:8s} {seeds} seeds: {phases}", flush=True)
    print("\n| seeds | funcppo s (env steps/s) | SB3 s (env steps/s) | SB3 time / funcppo time |")
    print("| ---: | ---: | ---: | ---: |")
    for seeds in args.seeds:
        steps = seeds * args.total_steps
        f = statistics.median(x["wall_s"] for x in runs[f"funcppo/{seeds}"])
        s = statistics.median(x["wall_s"] for x in runs[f"sb3/{seeds}"])
        print(f"| {seeds} | {f:.1f} ({steps / f:,.0f}) | {s:.1f} ({steps / s:,.0f}) | "
              f"{s / f:.2f}x |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_name(), "args": vars(args), "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
