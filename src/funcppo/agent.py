"""``PPOAgent``: the one mutable object, a thin shell over the pure functions.

It holds a ``TrainState``, the config, the running normalisers and the rollout being collected.
``act`` samples actions (keys folded from the train state's key, so a run is reproducible),
``observe`` records what the environment answered, ``update`` runs ``make_update_fn`` on the
rollout and returns host floats (one device-to-host transfer), ``save``/``load`` go through
``funcppo.checkpoint`` with the normalisers. Every computation is a call into a pure function.

Steps that are no transition (gymnasium's NEXT_STEP autoreset: the step after an episode end
resets the env and ignores the action) carry ``valid=False`` and are left out: each env column
of the rollout holds its first ``num_steps`` real transitions, and any extra ones a column
collected while waiting for the others are dropped (counted in ``discarded_steps``), so the
update only ever sees on-policy data.
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from funcppo import random as jr
from funcppo.checkpoint import load_checkpoint, save_checkpoint
from funcppo.config import PPOConfig
from funcppo.distributions import factored_logprob, factored_sample, validate_masks
from funcppo.envs.base import full_masks
from funcppo.networks import LSTMState, init_hidden, policy_apply
from funcppo.normalize import (
    init_reward_scale,
    init_running_stats,
    normalize_obs,
    scale_reward,
    update_reward_scale,
    update_running_stats,
)
from funcppo.spec import resolve_masks
from funcppo.state import Batch, init_train_state
from funcppo.update import make_update_fn
from funcppo.validation import check_batch

__all__ = ["EnvStep", "PPOAgent"]

# fold_in(state.key, ACT_STREAM) seeds action sampling; the update uses streams 0 and 1.
ACT_STREAM = 2


class EnvStep(NamedTuple):
    """What the environment answered to ``act``'s actions; leading axis ``[num_envs]``.

    Attributes:
      obs: float ``[B, obs_dim]``, the observation to act on next (a new episode's after a reset).
      reward: float ``[B]``. terminated, truncated: bool ``[B]``.
      masks: head -> bool masks for ``obs`` (None: every action valid); ``act`` takes them.
      final_obs: float ``[B, obs_dim]``, the observation reached before any reset, from which a
        truncated step bootstraps (None: ``obs``).
      valid: bool ``[B]``, False where the step was no transition (None: all True).
      episode_start: bool ``[B]``, True where ``obs`` starts an episode (None: done).
    """

    obs: Any
    reward: Any
    terminated: Any
    truncated: Any
    masks: dict[str, Any] | None = None
    final_obs: Any = None
    valid: Any = None
    episode_start: Any = None


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"{x.dtype} {tuple(x.shape)}"
    return type(x).__name__


def _tensor(name: str, x: Any, shape: tuple, kind: str, device) -> Tensor:
    """``x`` (tensor or array) as a tensor on ``device``, checked: ``kind`` is float or bool."""
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name}: expected {kind} {shape}, got {type(x).__name__}") from None
    ok = x.is_floating_point() if kind == "float" else x.dtype == torch.bool
    if tuple(x.shape) != shape or not ok:
        raise ValueError(f"{name}: expected {kind} {shape}, got {_describe(x)}")
    return x.to(device=device, dtype=torch.float32 if kind == "float" else torch.bool)


class PPOAgent:
    """PPO on ``num_envs`` parallel environments, ``num_steps`` transitions per env per update.

    Args:
      config: the PPO configuration (its ``obs_dim`` and ``spec`` are the environment's).
      num_envs, num_steps: the rollout is ``[num_steps, num_envs]``.
      seed: seeds the parameters and every sampled action.
      normalize_obs, clip_obs: running observation normalisation, clipped to ``+-clip_obs``.
      normalize_reward, clip_reward: rewards divided by the running std of the discounted return.
      device: where the state lives (None: CPU). compile_scope, backend: see ``make_update_fn``.
    """

    def __init__(
        self,
        config: PPOConfig,
        num_envs: int,
        num_steps: int = 128,
        *,
        seed: int = 0,
        normalize_obs: bool = False,
        normalize_reward: bool = False,
        clip_obs: float = 10.0,
        clip_reward: float = 10.0,
        device: torch.device | str | None = None,
        compile_scope: str = "minibatch",
        backend: str = "inductor",
    ) -> None:
        if not isinstance(config, PPOConfig):
            raise ValueError(f"config: expected a PPOConfig, got {type(config).__name__}")
        for name, value in (("num_envs", num_envs), ("num_steps", num_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        for name, value in (("clip_obs", clip_obs), ("clip_reward", clip_reward)):
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name}: expected a number > 0, got {value!r}")
        self.config, self.num_envs, self.num_steps = config, num_envs, num_steps
        self.settings = {
            "num_envs": num_envs,
            "num_steps": num_steps,
            "normalize_obs": bool(normalize_obs),
            "normalize_reward": bool(normalize_reward),
            "clip_obs": float(clip_obs),
            "clip_reward": float(clip_reward),
        }
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.state = init_train_state(jr.key(seed, self.device), config)
        self._update = make_update_fn(config, compile_scope=compile_scope, backend=backend)
        # A rollout of zeros through the update's own checks: a rollout shape that the update
        # would refuse fails here, before any environment step.
        check_batch(config, self.state, self._zero_batch())
        d = self.device
        self.obs_stats = init_running_stats((config.obs_dim,), d) if normalize_obs else None
        self.reward_scale = init_reward_scale(num_envs, d) if normalize_reward else None
        self.hidden = init_hidden(config, num_envs, d)
        self.episode_start = torch.ones(num_envs, dtype=torch.bool, device=d)
        self.episode_return = torch.zeros(num_envs, dtype=torch.float64, device=d)
        self.episode_length = torch.zeros(num_envs, dtype=torch.float64, device=d)
        self.metrics: dict[str, Any] = {}
        self._clear_rollout()

    def _zero_batch(self) -> Batch:
        t, b, spec = self.num_steps, self.num_envs, self.config.spec
        z = torch.zeros(t, b, device=self.device)
        no = z.bool()
        masks = {k: v.expand(t, *v.shape) for k, v in full_masks(spec, b, self.device).items()}
        heads = {h: z.long() for h in spec.names}
        hidden = init_hidden(self.config, (t, b), self.device)
        return Batch(z[..., None].expand(t, b, self.config.obs_dim), heads, masks,
                     dict.fromkeys(spec.names, z), z, z, z, no, no, no, hidden)  # fmt: skip

    def discard_rollout(self) -> None:
        """Drop the steps collected since the last update (say, before saving after an
        interrupted collection); the carried LSTM state and normalisers stay as they are."""
        self._clear_rollout()

    def _clear_rollout(self) -> None:
        self._pending: tuple[Batch, Any] | None = None  # the act awaiting observe
        self._rows: list[Batch] = []
        self._valid: list[Tensor] = []
        self._counts = torch.zeros(self.num_envs, dtype=torch.int64)
        self._act_count = 0
        self._finished = [0.0, 0.0, 0]  # summed return, summed length, episodes

    @property
    def ready(self) -> bool:
        """True when every env column holds ``num_steps`` transitions."""
        return int(self._counts.min()) >= self.num_steps

    def _obs(self, name: str, obs: Any) -> Tensor:
        return _tensor(name, obs, (self.num_envs, self.config.obs_dim), "float", self.device)

    def _masks(self, masks: Any) -> dict[str, Tensor]:
        if masks is None:
            return full_masks(self.config.spec, self.num_envs, self.device)
        if not isinstance(masks, dict):
            raise ValueError(f"masks: expected a dict over heads, got {type(masks).__name__}")
        masks = {h: torch.as_tensor(m).to(self.device) for h, m in masks.items()}
        validate_masks(self.config.spec, masks)
        return masks

    @torch.no_grad()
    def act(self, obs: Any, masks: dict[str, Any] | None = None, hidden: Any = None):
        """Sample one action per head for ``obs`` ``[num_envs, obs_dim]`` under ``masks``.

        Returns head -> int64 ``[num_envs]``. ``hidden`` (an ``LSTMState``), when given,
        replaces the carried LSTM state. Each call must be followed by ``observe``.
        """
        if self._pending is not None:
            raise RuntimeError("act: the previous actions were not observed; call observe first")
        obs, masks = self._obs("obs", obs), self._masks(masks)
        if hidden is not None:
            if not self.config.recurrent:
                raise ValueError(
                    f"hidden: expected None for an MLP config, got {_describe(hidden)}"
                )
            want = (self.num_envs, self.config.lstm_size)
            hidden = LSTMState(*(_tensor("hidden", x, want, "float", self.device) for x in hidden))
            self.hidden = hidden
        if self.obs_stats is not None:
            self.obs_stats = update_running_stats(self.obs_stats, obs)
            obs = normalize_obs(self.obs_stats, obs, self.settings["clip_obs"])
        key = jr.fold_in(jr.fold_in(self.state.key, ACT_STREAM), self._act_count)
        self._act_count += 1
        out = policy_apply(self.config, self.state.params, obs, self.hidden, self.episode_start)
        actions = factored_sample(self.config.spec, out.logits, masks, key)
        logprobs, _ = factored_logprob(self.config.spec, out.logits, masks, actions)
        # The transition so far; observe fills in what the environment answers.
        row = Batch(obs, actions, masks, logprobs, out.value, None, None, None, None,
                    self.episode_start, self.hidden)  # fmt: skip
        self._pending = (row, out.hidden)
        return actions

    @torch.no_grad()
    def observe(self, step: EnvStep) -> None:
        """Record the transition that the last ``act`` started; see ``EnvStep``."""
        if self._pending is None:
            raise RuntimeError("observe: no actions to observe; call act first")
        b, d = (self.num_envs,), self.device
        obs = self._obs("step.obs", step.obs)
        reward = _tensor("step.reward", step.reward, b, "float", d)
        terminated = _tensor("step.terminated", step.terminated, b, "bool", d)
        truncated = _tensor("step.truncated", step.truncated, b, "bool", d)
        done = terminated | truncated
        ones = torch.ones(b, dtype=torch.bool, device=d)
        valid = ones if step.valid is None else _tensor("step.valid", step.valid, b, "bool", d)
        start = done if step.episode_start is None else step.episode_start
        start = _tensor("step.episode_start", start, b, "bool", d)
        final = obs if step.final_obs is None else self._obs("step.final_obs", step.final_obs)
        (row, next_hidden), self._pending = self._pending, None
        if self.obs_stats is not None:
            final = normalize_obs(self.obs_stats, final, self.settings["clip_obs"])
        # V of the observation reached, under the post-step LSTM state: the bootstrap value.
        next_value = policy_apply(self.config, self.state.params, final, next_hidden, ~ones)
        train_reward = reward
        if self.reward_scale is not None:
            gamma = self.config.gamma
            self.reward_scale = update_reward_scale(self.reward_scale, reward, done, gamma, valid)
            train_reward = scale_reward(self.reward_scale, reward, self.settings["clip_reward"])
        self._rows.append(
            row._replace(
                next_values=next_value.value,
                rewards=train_reward,
                terminated=terminated,
                truncated=truncated,
            )
        )
        self._valid.append(valid)
        self._counts += valid.long().cpu()
        self.hidden, self.episode_start = next_hidden, start
        ret = self.episode_return + torch.where(valid, reward.double(), 0.0)
        length = self.episode_length + valid.double()
        ended = (done & valid).cpu()
        if bool(ended.any()):
            self._finished[0] += float(ret.cpu()[ended].sum())
            self._finished[1] += float(length.cpu()[ended].sum())
            self._finished[2] += int(ended.sum())
        self.episode_return = torch.where(done & valid, 0.0, ret)
        self.episode_length = torch.where(done & valid, 0.0, length)

    def rollout(self) -> Batch:
        """The rollout ``update`` trains on, ``[num_steps, num_envs]``: each env column's first
        ``num_steps`` real transitions, in time order."""
        if not self.ready:
            raise RuntimeError(
                f"rollout: expected {self.num_steps} observed transitions in every env column, "
                f"got {int(self._counts.min())} in the shortest; call collect or act/observe"
            )
        stacked = optree.tree_map(lambda *xs: torch.stack(xs), *self._rows, none_is_leaf=False)
        valid = torch.stack(self._valid)
        if bool(valid.all()) and valid.shape[0] == self.num_steps:
            return stacked
        # Stable sort puts each column's valid steps first, in time order.
        index = torch.argsort((~valid).long(), dim=0, stable=True)[: self.num_steps]

        def take(x: Tensor) -> Tensor:
            idx = index.reshape(*index.shape, *(1,) * (x.ndim - 2)).expand(-1, -1, *x.shape[2:])
            return torch.take_along_dim(x, idx, dim=0)

        return optree.tree_map(take, stacked, none_is_leaf=False)

    def _check_actions(self, batch: Batch) -> None:
        """Host-side value checks of a caller's batch: actions in range and valid under masks."""
        check_batch(self.config, self.state, batch)
        spec = self.config.spec
        for name, size in spec.heads:
            a = batch.actions[name]
            bad = (a < 0) | (a >= size)
            if bool(bad.any()):
                where = tuple(int(i) for i in torch.nonzero(bad)[0])
                raise ValueError(
                    f"batch.actions[{name!r}]: expected values in [0, {size}), got "
                    f"{int(a[where])} at index {where}"
                )
        validate_masks(spec, batch.masks, batch.actions[spec.op_head])
        resolved = resolve_masks(spec, batch.masks, batch.actions[spec.op_head])
        for name in spec.names:
            a = batch.actions[name]
            taken = torch.gather(resolved[name], -1, a.unsqueeze(-1)).squeeze(-1)
            if not bool(taken.all()):
                where = tuple(int(i) for i in torch.nonzero(~taken)[0])
                raise ValueError(
                    f"batch.actions[{name!r}]: action {int(a[where])} at index {where} is masked"
                )

    def update(self, learning_rate: float | None = None, batch: Batch | None = None) -> dict:
        """One PPO update; returns (and keeps in ``metrics``) host floats, plus
        ``worst_ratio_head``, the name of the head whose ratio strayed furthest from 1.

        ``learning_rate``, when given, replaces the configured one for this update only.
        ``batch``, when given, is trained on instead of the collected rollout (which is kept);
        its actions are checked against the head sizes and masks first.
        """
        if self._pending is not None:
            raise RuntimeError("update: the last actions were not observed; call observe first")
        discarded, own = 0, batch is None
        if own:
            batch = self.rollout()
            discarded = sum(int(v.sum()) for v in self._valid) - self.num_steps * self.num_envs
        else:
            self._check_actions(batch)
        hp = self.state.hparams
        state = self.state
        if learning_rate is not None:
            lr = torch.full_like(hp.learning_rate, learning_rate)
            state = state._replace(hparams=hp._replace(learning_rate=lr))
        new_state, metrics = self._update(state, batch)
        self.state = new_state._replace(hparams=hp)
        names = list(metrics)
        # One device-to-host transfer for every metric.
        values = torch.stack([metrics[n].float() for n in names]).cpu().tolist()
        host: dict[str, Any] = dict(zip(names, values, strict=True))
        worst = int(host["ratio_worst_head"])
        host["worst_ratio_head"] = self.config.spec.names[worst] if worst >= 0 else None
        total, length, count = self._finished
        host["episode_return"] = total / count if count else math.nan
        host["episode_length"] = length / count if count else math.nan
        host["episodes"] = count
        host["discarded_steps"] = discarded
        if own:
            self._clear_rollout()
        self.metrics = host
        return host

    def collect(self, env: Any) -> None:
        """Step ``env`` until the rollout is full. ``env`` has ``num_envs``, the current
        ``obs`` and ``masks``, and ``step(actions) -> EnvStep`` (see ``funcppo.gym_adapter``)."""
        if getattr(env, "num_envs", None) != self.num_envs:
            raise ValueError(
                f"env: expected num_envs={self.num_envs}, got {getattr(env, 'num_envs', None)}"
            )
        while not self.ready:
            self.observe(env.step(self.act(env.obs, env.masks)))

    def learn(self, env: Any, total_steps: int, callback=None, anneal_lr: bool = False) -> list:
        """``total_steps // (num_envs * num_steps)`` rounds of ``collect`` and ``update``.

        ``anneal_lr`` decays the learning rate linearly to 0 over this call (as CleanRL).
        ``callback(update_index, metrics)`` returning True stops early. Returns the metrics.
        """
        num_updates = total_steps // (self.num_envs * self.num_steps)
        if num_updates < 1:
            raise ValueError(
                f"total_steps: expected at least num_envs * num_steps = "
                f"{self.num_envs * self.num_steps}, got {total_steps}"
            )
        base = float(self.state.hparams.learning_rate)
        history = []
        for u in range(num_updates):
            self.collect(env)
            metrics = self.update(base * (1 - u / num_updates) if anneal_lr else None)
            history.append(metrics)
            if callback is not None and callback(u, metrics):
                break
        return history

    def _extra(self) -> dict[str, Tensor]:
        """Everything but the TrainState that an exact resume needs, as named tensors."""
        extra = {f"agent/{k}": torch.tensor(v) for k, v in self.settings.items()}
        extra |= {
            "agent/episode_start": self.episode_start,
            "agent/episode_return": self.episode_return,
            "agent/episode_length": self.episode_length,
        }
        if self.hidden is not None:
            extra |= {"agent/hidden_h": self.hidden.h, "agent/hidden_c": self.hidden.c}
        if self.obs_stats is not None:
            extra |= {f"obs_stats/{k}": v for k, v in self.obs_stats._asdict().items()}
        if self.reward_scale is not None:
            extra["reward_scale/returns"] = self.reward_scale.returns
            extra |= {f"reward_scale/{k}": v for k, v in self.reward_scale.stats._asdict().items()}
        return extra

    def save(self, path: str | os.PathLike) -> None:
        """Write the train state, the normalisers and the carried LSTM state atomically.

        Between updates only: a half-collected rollout would be lost, so it is refused.
        """
        collected = len(self._rows) + (self._pending is not None)
        if collected:
            raise RuntimeError(
                f"save: {collected} steps of an unfinished rollout would be lost; "
                "save right after update()"
            )
        save_checkpoint(path, self.state, self.config, self._extra())

    def load(self, path: str | os.PathLike) -> None:
        """Restore what ``save`` wrote; the config and the agent's settings must match."""
        state, _, extra = load_checkpoint(path, self.config, self.device)
        want = self._extra()
        for name, mine in want.items():
            if name not in extra:
                raise ValueError(f"{path}: extra[{name!r}]: missing (saved by another agent?)")
            got = extra[name]
            if name.removeprefix("agent/") in self.settings and not torch.equal(got, mine):
                raise ValueError(
                    f"{name}: checkpoint has {got.item()!r}, this agent {mine.item()!r}"
                )
            if got.shape != mine.shape or got.dtype != mine.dtype:
                raise ValueError(
                    f"{path}: extra[{name!r}]: expected {mine.dtype} {list(mine.shape)}, "
                    f"got {got.dtype} {list(got.shape)}"
                )
        unknown = sorted(set(extra) - set(want))
        if unknown:
            raise ValueError(f"{path}: extra{unknown}: not expected by this agent's settings")
        self._clear_rollout()
        self.state = state
        self.episode_start = extra["agent/episode_start"]
        self.episode_return = extra["agent/episode_return"]
        self.episode_length = extra["agent/episode_length"]
        if self.hidden is not None:
            self.hidden = LSTMState(extra["agent/hidden_h"], extra["agent/hidden_c"])
        if self.obs_stats is not None:
            self.obs_stats = type(self.obs_stats)(
                *(extra[f"obs_stats/{k}"] for k in self.obs_stats._fields)
            )
        if self.reward_scale is not None:
            stats = type(self.reward_scale.stats)(
                *(extra[f"reward_scale/{k}"] for k in self.reward_scale.stats._fields)
            )
            self.reward_scale = self.reward_scale._replace(
                returns=extra["reward_scale/returns"], stats=stats
            )
