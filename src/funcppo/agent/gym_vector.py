"""``SeedsAgent``: S PPO agents on one gymnasium vector env of S x E environments, as one
program: one ``act`` call per env step for every seed (``funcppo.agent.gym_acting``, vmapped over a
seed axis and compiled) and one vmapped update (``make_update_fn(num_seeds=S)``).

Seed i's agent is ``PPOAgent(..., seed=seeds[i])`` on envs ``i * E .. i * E + E - 1`` of the
vector env: the same parameters, keys, normalisers and rollouts, as long as every seed collects
the same number of env steps per update. That holds where every step is a transition (a single
env, or a vector env with ``AutoresetMode.SAME_STEP``). With ``NEXT_STEP`` a reset step is no
transition, and every seed steps until every seed's env columns hold ``num_steps``
transitions: a seed whose columns filled first takes steps (dropped, as ``PPOAgent`` drops a
column's extra ones) that its single agent would have taken after its update.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import optree
import torch
from torch import Tensor

from funcppo.accel.compiling import CompileSettings
from funcppo.agent.agent import PPOAgent, learn_rounds
from funcppo.agent.checks import check_agent_args
from funcppo.agent.gym_acting import init_act_carry, make_acting
from funcppo.agent.gym_adapter import GymAdapter
from funcppo.agent.rollout import compact_rollout
from funcppo.core import random as jr
from funcppo.core.config import PPOConfig
from funcppo.core.constants import CLIP_OBS
from funcppo.training.state import Batch, init_train_state, with_hparams
from funcppo.training.update import make_update_fn

__all__ = ["SeedsAgent"]


def _dense(tree: Any) -> Any:
    """Every leaf with the strides of a new tensor. The update's parameters come back as
    copies of views into flat groups; with one seed such a copy keeps the group's stride on
    its size-1 seed axis, which the compiled act and update guard on: each would compile
    again, with symbolic strides, for 12 more inputs per call."""
    return optree.tree_map(lambda x: x.clone(memory_format=torch.contiguous_format), tree)


def _config_value(name: str, value: Any) -> Any:
    """A swept value as its ``PPOConfig`` field takes it: a float, None for no ``target_kl``."""
    value = float(value)
    return None if name == "target_kl" and value == float("inf") else value


class SeedsAgent:
    """``len(seeds)`` PPO agents, one per seed, trained as one program on one vector env.

    Args:
      config: the PPO configuration (``obs_dim`` and ``spec`` the env's); ``config.compile``
        compiles the update and, unless ``compile_acting`` says otherwise, the acting.
      num_envs: E, each seed's envs; the env that ``collect`` steps has ``S * E``.
      num_steps: transitions per env column per update.
      seeds: one agent per seed, each seeded as ``PPOAgent(seed=...)``.
      normalize_obs, clip_obs, normalize_reward, clip_reward, device: ``PPOAgent``'s.
      hparams: per-seed hyperparameters, ``{name: [S] values}`` (a sweep), fields of
        ``funcppo.training.state.Hyperparams``.
      compile_acting: compile ``act``/``observe`` (None: ``config.compile``).
      compiler: ``funcppo.accel.compiling.CompileSettings`` for both (None:
        ``CompileSettings.for_agent(device)``, ahead of time on a CPU, kept on disk).

    ``update`` and ``learn`` return metrics as host values, each a list over seeds.
    ``seed_agent(i)`` gives seed i as a ``PPOAgent`` (to save, predict or evaluate).
    """

    def __init__(
        self,
        config: PPOConfig,
        num_envs: int,
        num_steps: int = 128,
        *,
        seeds: Sequence[int] = (0,),
        normalize_obs: bool = False,
        normalize_reward: bool = False,
        clip_obs: float = CLIP_OBS,
        clip_reward: float = 10.0,
        device: torch.device | str | None = None,
        hparams: dict[str, Any] | None = None,
        compile_acting: bool | None = None,
        compiler: CompileSettings | None = None,
    ) -> None:
        check_agent_args(config, num_envs, num_steps, clip_obs, clip_reward)
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError("seeds: expected at least one seed, got none")
        self.config, self.num_envs, self.num_steps = config, num_envs, num_steps
        self.seeds, self.num_seeds = seeds, len(seeds)
        self.device = torch.device("cpu") if device is None else torch.device(device)
        if compiler is None:
            compiler = CompileSettings.for_agent(self.device)
        self.settings = {
            "normalize_obs": bool(normalize_obs),
            "normalize_reward": bool(normalize_reward),
            "clip_obs": float(clip_obs),
            "clip_reward": float(clip_reward),
        }
        # Each seed's own config (a swept value in place of the config's), for seed_agent.
        self._configs = [
            config.replace(**{k: _config_value(k, v[i]) for k, v in (hparams or {}).items()})
            for i in range(self.num_seeds)
        ]
        keys = torch.stack([jr.key(s, self.device) for s in seeds])
        overrides = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in (hparams or {}).items()}
        self.state = _dense(init_train_state(keys, config, **overrides))
        # The reward normaliser discounts in float64 by the config's value, as PPOAgent's.
        gamma = (hparams or {}).get("gamma", [config.gamma] * self.num_seeds)
        self._gamma = torch.as_tensor(gamma, dtype=torch.float64, device=self.device)
        self._update = make_update_fn(
            config, num_seeds=self.num_seeds, hparams="state", compiler=compiler
        )
        self._acting = make_acting(
            config,
            num_seeds=self.num_seeds,
            clip_obs=float(clip_obs),
            clip_reward=float(clip_reward),
            compile=config.compile if compile_acting is None else compile_acting,
            compiler=compiler,
        )
        one = init_act_carry(config, num_envs, normalize_obs, normalize_reward, self.device)
        self.carry = optree.tree_map(lambda x: torch.stack([x] * self.num_seeds), one)
        self.metrics: dict[str, list] = {}
        self._rows: list[Batch] = []
        self._valid: list[np.ndarray] = []

    @property
    def total_envs(self) -> int:
        return self.num_seeds * self.num_envs

    def _seeded(self, x: Tensor) -> Tensor:
        """``[S * E, ...]`` as ``[S, E, ...]``: seed i's envs are rows ``i * E`` onwards."""
        return x.view(self.num_seeds, self.num_envs, *x.shape[1:])

    def _room(self, counts: np.ndarray) -> Tensor:
        """Bool ``[S, E]``: the env columns that still lack ``num_steps`` transitions."""
        return self._seeded(torch.from_numpy(counts < self.num_steps).to(self.device))

    def _inputs(self, obs: Tensor, masks: dict[str, Tensor]) -> tuple[Tensor, dict]:
        return self._seeded(obs), {h: self._seeded(m) for h, m in masks.items()}

    def collect(self, env: Any) -> None:
        """Step ``env`` (a ``GymAdapter`` over ``S * E`` envs, or anything with its
        ``num_envs``, ``obs``, ``masks`` and ``step``) until every env column holds
        ``num_steps`` transitions."""
        if getattr(env, "num_envs", None) != self.total_envs:
            raise ValueError(
                f"env: expected num_envs={self.total_envs} ({self.num_seeds} seeds x "
                f"{self.num_envs}), got {getattr(env, 'num_envs', None)}"
            )
        act, observe, observe_act = self._acting
        params, key, gamma = self.state.params, self.state.key, self._gamma
        trusted = {"validate": False} if isinstance(env, GymAdapter) else {}
        counts = np.zeros(self.total_envs, dtype=np.int64)
        room = self._room(counts)
        carry, acted, actions = act(
            params, key, self.carry, *self._inputs(env.obs, env.masks), room
        )
        while True:
            # The sampler draws in range and under the masks: nothing for the adapter to check.
            step = env.step({h: a.view(-1) for h, a in actions.items()}, **trusted)
            fields = (step.reward, step.terminated, step.truncated, step.final_obs, step.valid,
                      step.episode_start, step.next_valid)  # fmt: skip
            fields = tuple(map(self._seeded, fields))
            valid = step.valid.cpu().numpy()
            self._valid.append(valid)
            counts += valid
            if (counts >= self.num_steps).all():
                carry, row = observe(params, gamma, carry, acted, fields, room)
                self._rows.append(row)
                break
            # A column that just filled changes the room: rare, so the tensor is kept till then.
            next_room = self._room(counts) if (counts == self.num_steps).any() else room
            carry, row, acted, actions = observe_act(
                params, key, gamma, carry, acted, fields, room,
                *self._inputs(step.obs, step.masks), next_room,
            )  # fmt: skip
            self._rows.append(row)
            room = next_room
        self.carry = carry

    def discard_rollout(self) -> None:
        """Drop the steps collected since the last update (say, after an interrupted
        collection); the carried normalisers, LSTM states and episodes stay as they are."""
        self._rows, self._valid = [], []

    def rollout(self) -> Batch:
        """The collected rollout as ``[S, num_steps, E]``: each env column's first
        ``num_steps`` transitions, in time order."""
        valid = np.stack(self._valid)
        if (valid.sum(0) < self.num_steps).any():
            raise RuntimeError("rollout: some env column lacks num_steps transitions; collect")
        rows = [optree.tree_map(lambda x: x.flatten(0, 1), r) for r in self._rows]
        flags = [torch.from_numpy(v).to(self.device) for v in self._valid]
        batch = compact_rollout(rows, flags, self.num_steps)  # [T, S * E, ...]

        def seeds_first(x: Tensor) -> Tensor:
            x = x.view(x.shape[0], self.num_seeds, self.num_envs, *x.shape[2:])
            return x.movedim(1, 0).contiguous()

        batch = optree.tree_map(seeds_first, batch)
        return batch._replace(hidden=batch.hidden if self.config.recurrent else None)

    def update(self, learning_rate: Any = None, clip_coef: Any = None) -> dict[str, list]:
        """One vmapped PPO update of every seed on the collected rollout; returns host metrics,
        each a list over seeds (``PPOAgent.update``'s names). ``learning_rate``/``clip_coef``:
        a number or ``[S]`` values, for this update only."""
        batch = self.rollout()
        valid = np.stack(self._valid).reshape(len(self._valid), self.num_seeds, -1)
        discarded = valid.sum((0, 2)) - self.num_steps * self.num_envs
        given = {"learning_rate": learning_rate, "clip_coef": clip_coef}
        given = {k: v for k, v in given.items() if v is not None}
        state = with_hparams(self.state, **given) if given else self.state
        new_state, metrics = self._update(state, batch)
        self.state = _dense(new_state._replace(hparams=self.state.hparams))
        host = self._host_metrics(metrics, discarded)
        self.carry = self.carry._replace(
            act_count=torch.zeros_like(self.carry.act_count),
            finished=torch.zeros_like(self.carry.finished),
        )
        self.discard_rollout()
        self.metrics = host
        return host

    def _host_metrics(self, metrics: dict[str, Tensor], discarded: np.ndarray) -> dict[str, list]:
        """Every ``[S]`` metric and the finished episodes' sums in one device-to-host copy."""
        names = list(metrics)
        stacked = torch.stack([metrics[n].float() for n in names])
        finished = self.carry.finished.T.float()  # [3, S]
        values = torch.cat([stacked, finished]).cpu().tolist()
        host: dict[str, list] = dict(zip(names, values[: len(names)], strict=True))
        host["ratio_worst_head"] = [self.config.spec.head_name(i) for i in host["ratio_worst_head"]]
        total, length, count = values[len(names) :]
        host["episode_return"] = [
            t / c if c else float("nan") for t, c in zip(total, count, strict=True)
        ]
        host["episode_length"] = [
            n / c if c else float("nan") for n, c in zip(length, count, strict=True)
        ]
        host["episodes"] = [int(c) for c in count]
        host["discarded_steps"] = [int(d) for d in discarded]
        return host

    def learn(
        self,
        env: Any,
        total_steps: int,
        callback: Any = None,
        anneal_lr: bool = False,
        anneal_clip: bool = False,
    ) -> list[dict[str, list]]:
        """``total_steps // (E * num_steps)`` rounds of ``collect`` and ``update`` (steps per
        seed), as ``PPOAgent.learn``; ``callback(agents, metrics)`` returning False stops."""
        hp = self.state.hparams
        return learn_rounds(
            self, env, total_steps, callback, hp.learning_rate, hp.clip_coef, anneal_lr, anneal_clip
        )

    def seed_agent(self, i: int) -> PPOAgent:
        """Seed ``i`` as a ``PPOAgent`` of its own (copies: training this one changes nothing
        there), between updates: to ``save``, ``predict`` or ``evaluate_policy``."""
        if self._rows:
            raise RuntimeError("seed_agent: a rollout is being collected; call it after update")
        s = self.settings
        agent = PPOAgent(
            self._configs[i],
            self.num_envs,
            self.num_steps,
            seed=self.seeds[i],
            device=self.device,
            **s,
        )
        agent.state = optree.tree_map(lambda x: x[i].clone(), self.state)
        c = optree.tree_map(lambda x: x[i].clone(), self.carry)
        agent.obs_stats = c.obs_stats or None
        agent.reward_scale = c.reward_scale or None
        agent.hidden = c.hidden or None
        agent.episode_start, agent.next_valid = c.episode_start, c.next_valid
        agent.episode_return, agent.episode_length = c.episode_return, c.episode_length
        return agent

    def save(self, folder: str | os.PathLike) -> list[str]:
        """Each seed's ``PPOAgent.save`` in ``folder``: ``checkpoint.pt`` for one seed,
        ``checkpoint-<i>.pt`` per seed otherwise; returns the paths."""
        names = (
            ["checkpoint.pt"]
            if self.num_seeds == 1
            else [f"checkpoint-{i}.pt" for i in range(self.num_seeds)]
        )
        paths = [os.path.join(folder, name) for name in names]
        for i, path in enumerate(paths):
            self.seed_agent(i).save(path)
        return paths
