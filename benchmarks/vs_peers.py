"""funcppo's update step against the field, side by side in one process.

Workload (``update_step.py``'s): observation 64; heads 3/5/4/6 with random masks (at least one
valid action per row); 8 envs x 128 steps; 4 epochs x 4 minibatches of 256; MLP 2 x 128 tanh;
for the recurrent rows an LSTM of 128.

Contenders, each fed a rollout it produced itself on the same kind of data (random
observations, random masks, rewards and dones from ``synthetic_batch``):

* funcppo, compiled (``make_update_fn``'s default scope, the minibatch steps as one scan)
  and eager, MLP and LSTM, with masks;
* sb3-contrib ``MaskablePPO.train()`` on ``MultiDiscrete([3, 5, 4, 6])`` with masks (only
  ``.train()`` is timed: the buffer is filled once, before timing);
* a CleanRL-style eager update (``cleanrl_style.py``), with masks;
* sb3-contrib ``RecurrentPPO.train()`` (no masks: it has none) against funcppo's recurrent
  update with masks.

Optionally (``--seed-counts``) S seeds: funcppo vmapped and compiled against a loop over S
MaskablePPO models and S CleanRL-style agents (each peer trains one seed per call).

    pip install -e '.[bench]'
    python benchmarks/vs_peers.py --json runs/vs_peers.json
    python benchmarks/vs_peers.py --seed-counts 1,8,32 --json runs/vs_peers_seeds.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import gymnasium as gym
import numpy as np
import optree
import torch
from torch import nn

import cleanrl_style
from funcppo.training.update import make_update_fn
from machine import cpu_name
from update_step import NUM_ENVS, NUM_STEPS, make_config, make_inputs

EPOCHS, MINIBATCHES, HIDDEN = 4, 4, 128


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(first call seconds, median of ``repeats`` later calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def flat_masks(batch, spec_sizes=(3, 5, 4, 6)) -> torch.Tensor:
    """funcppo's per-head masks as CleanRL-style ``[T, B, 28]`` (head a: one row of 5 per op)."""
    m = batch.masks
    t, b = m["op"].shape[:2]
    return torch.cat([m["op"], m["a"].reshape(t, b, -1), m["b"], m["c"]], dim=-1)


def sb3_masks(batch) -> np.ndarray:
    """``[T, B, 18]`` for MultiDiscrete: head a's mask row of the op the rollout took."""
    m = batch.masks
    a_rows = torch.take_along_dim(m["a"], batch.actions["op"][..., None, None], dim=2)[:, :, 0]
    return torch.cat([m["op"], a_rows, m["b"], m["c"]], dim=-1).numpy()


class _SpacesOnly(gym.Env):
    """An env that only carries the spaces: SB3 needs one to build a model."""

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (64,), np.float32)
        self.action_space = gym.spaces.MultiDiscrete([3, 5, 4, 6])

    def reset(self, *, seed=None, options=None):
        return np.zeros(64, np.float32), {}

    def step(self, action):
        return np.zeros(64, np.float32), 0.0, False, False, {}


def _sb3_common() -> dict:
    return {
        "n_steps": NUM_STEPS,
        "batch_size": NUM_STEPS * NUM_ENVS // MINIBATCHES,
        "n_epochs": EPOCHS,
        "learning_rate": 2.5e-4,
        "ent_coef": 0.01,
        "clip_range": 0.2,
        "clip_range_vf": 0.2,
        "max_grad_norm": 0.5,
        "device": "cpu",
        "seed": 0,
        "verbose": 0,
    }


def make_maskable(batch):
    """A MaskablePPO whose buffer holds a rollout of its own policy on ``batch``'s data."""
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.env_util import DummyVecEnv
    from stable_baselines3.common.logger import Logger

    venv = DummyVecEnv([_SpacesOnly] * NUM_ENVS)
    kwargs = {"net_arch": {"pi": [HIDDEN, HIDDEN], "vf": [HIDDEN, HIDDEN]}}
    model = MaskablePPO(
        "MlpPolicy", venv, policy_kwargs={**kwargs, "activation_fn": nn.Tanh}, **_sb3_common()
    )
    model.set_logger(Logger(None, []))
    masks = sb3_masks(batch)
    buf = model.rollout_buffer
    buf.reset()
    dones = (batch.terminated | batch.truncated).numpy()
    with torch.no_grad():
        for t in range(NUM_STEPS):
            obs = batch.obs[t].numpy()
            actions, values, logp = model.policy(torch.as_tensor(obs), action_masks=masks[t])
            start = batch.episode_start[t].numpy()
            buf.add(
                obs, actions.numpy(), batch.rewards[t].numpy(), start, values, logp,
                action_masks=masks[t],
            )  # fmt: skip
        last = model.policy.predict_values(batch.obs[-1])
    buf.compute_returns_and_advantage(last_values=last, dones=dones[-1])
    return model


def make_recurrent(batch, shared_lstm: bool):
    """A RecurrentPPO (LSTM 128, no masks) with a rollout of its own policy in its buffer."""
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.env_util import DummyVecEnv
    from stable_baselines3.common.logger import Logger

    venv = DummyVecEnv([_SpacesOnly] * NUM_ENVS)
    policy_kwargs = {
        "net_arch": {"pi": [HIDDEN, HIDDEN], "vf": [HIDDEN, HIDDEN]},
        "activation_fn": nn.Tanh,
        "lstm_hidden_size": HIDDEN,
        "shared_lstm": shared_lstm,
        "enable_critic_lstm": not shared_lstm,
    }
    model = RecurrentPPO("MlpLstmPolicy", venv, policy_kwargs=policy_kwargs, **_sb3_common())
    model.set_logger(Logger(None, []))
    buf = model.rollout_buffer
    buf.reset()
    states = model._last_lstm_states
    dones = (batch.terminated | batch.truncated).numpy()
    with torch.no_grad():
        for t in range(NUM_STEPS):
            obs = batch.obs[t].numpy()
            start = torch.as_tensor(batch.episode_start[t].numpy(), dtype=torch.float32)
            actions, values, logp, new_states = model.policy(torch.as_tensor(obs), states, start)
            buf.add(
                obs, actions.numpy(), batch.rewards[t].numpy(), start.numpy(), values, logp,
                lstm_states=states,
            )  # fmt: skip
            states = new_states
        last = model.policy.predict_values(batch.obs[-1], states.vf, torch.zeros(NUM_ENVS))
    buf.compute_returns_and_advantage(last_values=last, dones=dones[-1])
    return model


def make_cleanrl(batch, seed: int = 0):
    """A CleanRL-style agent, optimizer and its own rollout on ``batch``'s data."""
    torch.manual_seed(seed)
    agent = cleanrl_style.Agent(64, HIDDEN)
    optimizer = torch.optim.Adam(agent.parameters(), lr=2.5e-4, eps=1e-5)
    dones = batch.terminated | batch.truncated
    data = cleanrl_style.rollout(agent, batch.obs, flat_masks(batch), batch.rewards, dones)
    return lambda: cleanrl_style.ppo_update(agent, optimizer, data, EPOCHS, MINIBATCHES)


def funcppo_update(recurrent: bool, compile_: bool, num_seeds: int | None = None):
    cfg = make_config(recurrent, compile_)
    state, batch = make_inputs(make_config(recurrent, False), num_seeds, torch.device("cpu"))
    update = make_update_fn(cfg, num_seeds=num_seeds)

    def run():
        _, metrics = update(state, batch)
        optree.tree_map(lambda x: x.sum().item(), metrics)

    return run, batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed updates per contender")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, all contenders")
    parser.add_argument("--skip-funcppo", action="store_true", help="peers only")
    parser.add_argument("--skip-lstm", action="store_true")
    parser.add_argument("--seed-counts", default="", help="e.g. 1,8,32: also time S seeds")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device_line = (
        f"CPU: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()} (every contender), load {os.getloadavg()[0]:.2f}"
    )
    print(device_line, flush=True)
    results: dict[str, dict] = {}

    def record(name: str, fn: Callable[[], object], repeats: int = args.repeats) -> float:
        first, median = median_time(fn, repeats)
        results[name] = {"first_s": first, "median_s": median, "repeats": repeats}
        print(f"{name:52s} first {first:8.2f} s  median {median * 1e3:9.1f} ms", flush=True)
        return median

    _, mlp_batch = funcppo_update(False, False)
    if not args.seed_counts:
        if not args.skip_funcppo:
            record("funcppo eager (MLP, masks)", funcppo_update(False, False)[0])
            record("funcppo compiled (MLP, masks)", funcppo_update(False, True)[0])
        record("CleanRL-style eager (MLP, masks)", make_cleanrl(mlp_batch))
        record("sb3-contrib MaskablePPO.train() (MLP, masks)", make_maskable(mlp_batch).train)
        if not args.skip_lstm:
            _, lstm_batch = funcppo_update(True, False)
            if not args.skip_funcppo:
                record("funcppo eager (LSTM, masks)", funcppo_update(True, False)[0])
                record("funcppo compiled (LSTM, masks)", funcppo_update(True, True)[0])
            for shared in (False, True):
                label = "shared LSTM" if shared else "separate critic LSTM, default"
                model = make_recurrent(lstm_batch, shared)
                record(f"sb3-contrib RecurrentPPO.train() ({label}, no masks)", model.train)
    for count in [int(c) for c in args.seed_counts.split(",") if c]:
        if not args.skip_funcppo:
            record(
                f"funcppo vmap {count} seeds compiled (MLP)", funcppo_update(False, True, count)[0]
            )
        reps = max(3, args.repeats // 2)
        updates = [make_cleanrl(mlp_batch, seed) for seed in range(count)]
        record(f"CleanRL-style loop over {count} seeds", lambda u=updates: [f() for f in u], reps)
        models = [make_maskable(mlp_batch) for _ in range(count)]
        record(
            f"MaskablePPO loop over {count} seeds", lambda m=models: [x.train() for x in m], reps
        )

    print(f"\n{device_line}\n\n| contender | median per update (ms) | first call (s) |")
    print("| --- | ---: | ---: |")
    for name, r in results.items():
        print(f"| {name} | {r['median_s'] * 1e3:.1f} | {r['first_s']:.1f} |")
    ratios = [
        ("MaskablePPO", "funcppo compiled (MLP, masks)"),
        ("CleanRL-style", "funcppo compiled (MLP, masks)"),
        ("MaskablePPO", "funcppo eager (MLP, masks)"),
        ("CleanRL-style", "funcppo eager (MLP, masks)"),
        ("RecurrentPPO.train() (separate", "funcppo compiled (LSTM, masks)"),
        ("RecurrentPPO.train() (shared", "funcppo compiled (LSTM, masks)"),
    ]
    for peer_prefix, ours in ratios:
        peer = next((k for k in results if peer_prefix in k and "loop" not in k), None)
        if peer and ours in results:
            ratio = results[peer]["median_s"] / results[ours]["median_s"]
            results[f"ratio: {peer} / {ours}"] = {"ratio": ratio}
            print(f"{peer} / {ours}: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_line, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
