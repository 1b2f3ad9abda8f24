"""Learning through the gymnasium path: ``SeedsAgent`` trains S seeds as one program, then
each seed plays whole episodes (``evaluate_policy``, deterministic) on fresh envs.

Checks (CleanRL's settings: 4 envs x 128 steps, 4 epochs x 4 minibatches, lr 2.5e-4 annealed):
* ``cartpole``: gymnasium CartPole-v1, every seed's evaluation at least 475;
* ``acrobot``: gymnasium Acrobot-v1, the mean over seeds at least -100;
* ``masked``: sb3-contrib's ``InvalidActionEnvMultiDiscrete([3, 4], n_invalid_actions=3)``,
  learned with its masks: no invalid action is ever taken (counted by a wrapper, in training
  and evaluation), and the mean evaluation return at least 0.9 of the episode length.

    python benchmarks/gym_learning.py --checks cartpole acrobot masked --seeds 8 \\
        --total-steps 500000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import gymnasium as gym
import numpy as np
import torch

from funcppo.agent.gym_adapter import GymAdapter
from funcppo.agent.gym_evaluate import evaluate_policy
from funcppo.agent.gym_vector import SeedsAgent
from funcppo.core.config import PPOConfig

NUM_ENVS, NUM_STEPS = 4, 128
EPISODE = 20  # the masked env's episode length


class Referee(gym.Wrapper):
    """Counts the actions that the env's own ``action_masks`` forbade when they were taken."""

    broken = 0

    def action_masks(self):
        return self.env.unwrapped.action_masks()

    def step(self, action):
        allowed = np.asarray(self.action_masks())
        offsets = np.cumsum([0, *self.action_space.nvec[:-1]])
        Referee.broken += int((~allowed[offsets + np.asarray(action)]).any())
        return self.env.step(action)


def _masked_env():
    from sb3_contrib.common.envs import InvalidActionEnvMultiDiscrete

    env = InvalidActionEnvMultiDiscrete([3, 4], ep_length=EPISODE, n_invalid_actions=3)
    return Referee(env)


def _vector(check: str, n: int):
    same = {"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}
    if check == "masked":
        return gym.vector.SyncVectorEnv([_masked_env] * n, **same)
    env_id = {"cartpole": "CartPole-v1", "acrobot": "Acrobot-v1"}[check]
    return gym.make_vec(env_id, num_envs=n, vectorization_mode="sync", vector_kwargs=same)


def run_check(check: str, seeds: int, total_steps: int, episodes: int) -> dict:
    env = GymAdapter(_vector(check, seeds * NUM_ENVS), seed=[i + j for i in range(seeds)
                                                             for j in range(NUM_ENVS)])  # fmt: skip
    agents = SeedsAgent(
        PPOConfig(obs_dim=env.obs_dim, spec=env.spec), NUM_ENVS, NUM_STEPS, seeds=range(seeds)
    )
    start = time.perf_counter()
    agents.learn(env, total_steps, anneal_lr=True)
    seconds = time.perf_counter() - start
    env.env.close()
    scores = []
    for i in range(seeds):
        eval_env = GymAdapter(_vector(check, NUM_ENVS), seed=10_000 + i)
        mean, _ = evaluate_policy(agents.seed_agent(i), eval_env, episodes, deterministic=True)
        eval_env.env.close()
        scores.append(mean)
    mean = statistics.fmean(scores)
    if check == "cartpole":
        passed = min(scores) >= 475
    elif check == "acrobot":
        passed = mean >= -100
    else:
        passed = Referee.broken == 0 and mean >= 0.9 * EPISODE
    return {
        "check": check,
        "seeds": seeds,
        "total_steps": total_steps,
        "train_seconds": seconds,
        "evaluation": scores,
        "mean": mean,
        "invalid_actions": Referee.broken if check == "masked" else None,
        "passed": passed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", nargs="+", default=["cartpole", "acrobot", "masked"])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--total-steps", type=int, default=500_000)
    parser.add_argument("--episodes", type=int, default=10, help="evaluation episodes per seed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for check in args.checks:
        result = run_check(check, args.seeds, args.total_steps, args.episodes)
        results.append(result)
        scores = ", ".join(f"{s:.1f}" for s in result["evaluation"])
        print(
            f"{check}: {'PASS' if result['passed'] else 'FAIL'}, mean {result['mean']:.1f} "
            f"({scores}), {args.seeds} seeds x {args.total_steps:,} steps in "
            f"{result['train_seconds']:.0f} s"
            + (f", invalid actions {result['invalid_actions']}" if check == "masked" else ""),
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
