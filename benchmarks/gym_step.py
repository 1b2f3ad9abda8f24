"""Where one env step of the gymnasium path goes: ``SeedsAgent.collect`` on CartPole-v1.

For S seeds x 4 envs (sync vector env, same-step autoreset), each part timed alone over
``--steps`` steps, medians of ``--repeats``:

* ``vector env``: gymnasium's ``step`` on the S x 4 envs alone (fixed actions, no funcppo);
* ``adapter``: ``GymAdapter.step`` without its action checks, less the vector env: actions to
  numpy, observations, masks, final observations and flags to tensors;
* ``act``: the ``observe_act`` call, every seed in one call: compiled ahead of time (the
  agents' default, ``CompileSettings.for_agent``), through torch.compile (``--plain``) or eager;
* ``whole step``: ``collect``'s time per env step, its loop included; ``glue`` is what the
  parts leave of it (the loop's own Python: views of the seed axis, the rows kept, counts).

    python benchmarks/gym_step.py --seeds 1 8
    python benchmarks/gym_step.py --seeds 1 --plain     # torch.compile's precompiled files
    python benchmarks/gym_step.py --seeds 1 --eager     # acting eager instead of compiled
"""

from __future__ import annotations

import argparse
import statistics
import time

import gymnasium as gym
import numpy as np
import torch

from funcppo.accel.compiling import CompileSettings
from funcppo.accel.precompile import default_precompile_dir
from funcppo.agent.gym_adapter import GymAdapter
from funcppo.agent.gym_vector import SeedsAgent
from funcppo.core.config import PPOConfig

NUM_ENVS, NUM_STEPS = 4, 128


def _per_step(fn, steps: int, repeats: int) -> float:
    """Median over ``repeats`` of the seconds per call of ``fn`` called ``steps`` times."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def measure(
    seeds: int, eager: bool, steps: int, repeats: int, compiler: CompileSettings
) -> dict[str, float]:
    same = {"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}
    vec = gym.make_vec(
        "CartPole-v1", seeds * NUM_ENVS, vectorization_mode="sync", vector_kwargs=same
    )
    env = GymAdapter(vec, seed=[i + j for i in range(seeds) for j in range(NUM_ENVS)])
    config = PPOConfig(obs_dim=env.obs_dim, spec=env.spec)
    agents = SeedsAgent(
        config, NUM_ENVS, NUM_STEPS, seeds=range(seeds), compile_acting=not eager, compiler=compiler
    )
    for _ in range(3):  # compile or load every variant, and leave the envs mid-episode
        agents.collect(env)
        agents.update()

    def one_collect() -> float:
        start = time.perf_counter()
        agents.collect(env)
        seconds = time.perf_counter() - start
        agents.discard_rollout()  # every collect starts afresh
        return seconds / NUM_STEPS

    collect = statistics.median(one_collect() for _ in range(repeats))
    zeros = np.zeros(seeds * NUM_ENVS, dtype=np.int64)
    actions = {"action": torch.zeros(seeds * NUM_ENVS, dtype=torch.int64)}
    # Alternating actions keep CartPole upright long enough for few resets, as a policy does.
    flip = [0]

    def raw():
        flip[0] ^= 1
        vec.step(zeros + flip[0])

    def adapted():
        flip[0] ^= 1
        env.step({"action": actions["action"] + flip[0]}, validate=False)

    vector = _per_step(raw, steps, repeats)
    adapter = _per_step(adapted, steps, repeats) - vector
    # The fused call on the inputs one step gives it.
    _, _, observe_act = agents._acting
    s = agents.state
    carry, acted, _ = agents._acting.act(
        s.params, s.key, agents.carry, *agents._inputs(env.obs, env.masks), agents._room(zeros)
    )
    step = env.step(actions, validate=False)
    fields = tuple(map(agents._seeded, (step.reward, step.terminated, step.truncated,
                   step.final_obs, step.valid, step.episode_start, step.next_valid)))  # fmt: skip
    room = agents._room(zeros)
    inputs = agents._inputs(step.obs, step.masks)

    def call():
        observe_act(s.params, s.key, agents._gamma, carry, acted, fields, room, *inputs, room)

    act = _per_step(call, steps, repeats)
    vec.close()
    return {
        "whole step": collect,
        "vector env": vector,
        "adapter": adapter,
        "act": act,
        "glue": collect - vector - adapter - act,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--eager", action="store_true", help="acting eager, not compiled")
    parser.add_argument(
        "--plain", action="store_true", help="torch.compile, not ahead of time (files kept)"
    )
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # The agents' settings, their files in the command line's folder: a warm start, as a
    # second run has.
    compiler = CompileSettings.for_agent("cpu")
    if args.plain:
        compiler = CompileSettings.for_device("cpu", precompile_dir=default_precompile_dir())
    for seeds in args.seeds:
        parts = measure(seeds, args.eager, args.steps, args.repeats, compiler)
        mode = "eager" if args.eager else "torch.compile" if args.plain else "ahead of time"
        line = ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in parts.items())
        print(f"{seeds} seeds x {NUM_ENVS} envs, acting {mode}: {line}", flush=True)


if __name__ == "__main__":
    main()
