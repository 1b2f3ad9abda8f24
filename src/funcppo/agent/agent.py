"""``PPOAgent``: the one mutable object, a thin shell over the pure functions.

It holds a ``TrainState``, the config, the running normalisers and the rollout being collected.
``act`` samples actions (keys folded from the train state's key, so a run is reproducible),
``observe`` records what the environment answered, ``update`` runs ``make_update_fn`` on the
rollout and returns host floats (one device-to-host transfer), ``save``/``load`` go through
``funcppo.training.checkpoint`` with the normalisers (``funcppo.agent.checkpoint``), and
``predict`` gives evaluation actions that change nothing. Every computation is a call into a pure
function; the checks of what callers pass in live in ``funcppo.agent.checks``.

Steps that are no transition (gymnasium's NEXT_STEP autoreset: the step after an episode end
resets the env and ignores the action) carry ``valid=False`` and are left out: each env column
of the rollout holds its first ``num_steps`` real transitions, and any extra ones a column
collected while waiting for the others are dropped (counted in ``discarded_steps``), so the
update only ever sees on-policy data. Neither kind enters the normalisers' statistics either
(a dropped step's reward still adds to its episode's running return): they count exactly the
steps trained on, so both autoreset modes give the same statistics for the same episodes.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from funcppo.accel.compiling import CompileSettings
from funcppo.agent.callbacks import as_callback
from funcppo.agent.checkpoint import (
    AgentCarry,
    agent_from_checkpoint,
    carry_from_extra,
    carry_to_extra,
)
from funcppo.agent.checks import (
    check_agent_args,
    checked_hidden,
    checked_masks,
    checked_policy_inputs,
    checked_step,
    checked_tensor,
)
from funcppo.agent.predict import predict_actions
from funcppo.agent.rollout import (
    EnvStep,
    compact_rollout,
    host_metrics,
    step_episodes,
    zero_rollout,
)
from funcppo.core import random as jr
from funcppo.core.config import PPOConfig, anneal_left
from funcppo.core.constants import ACT_STREAM, CLIP_OBS, PREDICT_STREAM
from funcppo.core.distributions import factored_logprob, factored_sample
from funcppo.core.networks import LSTMState, init_hidden, policy_apply
from funcppo.core.normalize import (
    init_reward_scale,
    init_running_stats,
    normalize_obs,
    scale_reward,
    update_reward_scale,
    update_running_stats,
)
from funcppo.training.checkpoint import load_checkpoint, save_checkpoint
from funcppo.training.state import Batch, init_train_state
from funcppo.training.update import make_update_fn
from funcppo.training.validation import check_batch

__all__ = ["EnvStep", "PPOAgent", "learn_rounds"]


class PPOAgent:
    """PPO on ``num_envs`` parallel environments, ``num_steps`` transitions per env per update.

    Args:
      config: the PPO configuration (its ``obs_dim`` and ``spec`` are the environment's).
      num_envs, num_steps: the rollout is ``[num_steps, num_envs]``.
      seed: seeds the parameters and every sampled action.
      normalize_obs, clip_obs: running observation normalisation, clipped to ``+-clip_obs``.
      normalize_reward, clip_reward: rewards divided by the running std of the discounted return.
      device: where the state lives (None: CPU). compile_scope, backend: see ``make_update_fn``.
      compiler: how the update is compiled (``funcppo.accel.compiling.CompileSettings``); None:
        ``CompileSettings.for_agent(device)``, ahead of time on a CPU, kept on disk.
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
        clip_obs: float = CLIP_OBS,
        clip_reward: float = 10.0,
        device: torch.device | str | None = None,
        compile_scope: str = "scan",
        backend: str | None = None,
        compiler: CompileSettings | None = None,
    ) -> None:
        check_agent_args(config, num_envs, num_steps, clip_obs, clip_reward)
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
        if compiler is None and config.compile:
            compiler = CompileSettings.for_agent(self.device)
        self.state = init_train_state(jr.key(seed, self.device), config)
        # The state's hyperparameters: update(learning_rate=, clip_coef=) sets them per call.
        self._update = make_update_fn(
            config,
            compile_scope=compile_scope,
            backend=backend,
            hparams="state",
            compiler=compiler,
        )
        # A rollout of zeros through the update's own checks: a rollout shape that the update
        # would refuse fails here, before any environment step.
        check_batch(config, self.state, zero_rollout(config, num_steps, num_envs, self.device))
        d = self.device
        self.obs_stats = init_running_stats((config.obs_dim,), d) if normalize_obs else None
        self.reward_scale = init_reward_scale(num_envs, d) if normalize_reward else None
        self.hidden = init_hidden(config, num_envs, d)
        self.episode_start = torch.ones(num_envs, dtype=torch.bool, device=d)
        # The last EnvStep's next_valid: False where the env will ignore the next action. Public
        # as episode_start is: both describe the env's state, not the rollout's.
        self.next_valid = torch.ones(num_envs, dtype=torch.bool, device=d)
        self.episode_return = torch.zeros(num_envs, dtype=torch.float64, device=d)
        self.episode_length = torch.zeros(num_envs, dtype=torch.float64, device=d)
        self.metrics: dict[str, Any] = {}
        self._predict_count = 0  # predict's own key counter; act's is _act_count
        self._clear_rollout()

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

    def _trained(self, valid: Tensor) -> Tensor:
        """Bool ``[num_envs]``: which of this step's rows the rollout keeps, given ``valid``:
        real transitions in columns that still lack ``num_steps`` of them."""
        return valid & (self._counts < self.num_steps).to(valid.device)

    @torch.no_grad()
    def act(self, obs: Any, masks: dict[str, Any] | None = None, hidden: Any = None):
        """Sample one action per head for ``obs`` ``[num_envs, obs_dim]`` under ``masks``.

        Returns head -> int64 ``[num_envs]``. ``hidden`` (an ``LSTMState``), when given,
        replaces the carried LSTM state. Each call must be followed by ``observe``.
        """
        if self._pending is not None:
            raise RuntimeError("act: the previous actions were not observed; call observe first")
        obs = checked_tensor("obs", obs, (self.num_envs, self.config.obs_dim), "float", self.device)
        masks = checked_masks(self.config, masks, self.num_envs, self.device)
        if hidden is not None:
            self.hidden = checked_hidden(self.config, hidden, self.num_envs, self.device)
        raw_obs = obs
        if self.obs_stats is not None:
            # As SB3, the policy sees obs normalised by statistics that include it. Which rows
            # will be trained on is known for sure only in observe, which merges them for good;
            # the env's last next_valid says it ahead, so both merges agree.
            seen = update_running_stats(self.obs_stats, obs, self._trained(self.next_valid))
            obs = normalize_obs(seen, obs, self.settings["clip_obs"])
        key = jr.fold_in(jr.fold_in(self.state.key, ACT_STREAM), self._act_count)
        self._act_count += 1
        out = policy_apply(self.state.params, self.config, obs, self.hidden, self.episode_start)
        actions = factored_sample(self.config.spec, out.logits, masks, key)
        logprobs, _ = factored_logprob(self.config.spec, out.logits, masks, actions)
        # The transition so far; observe fills in what the environment answers.
        row = Batch(obs, actions, masks, logprobs, out.value, None, None, None, None,
                    self.episode_start, self.hidden)  # fmt: skip
        self._pending = (row, out.hidden, raw_obs)
        return actions

    @torch.no_grad()
    def predict(
        self,
        obs: Any,
        masks: dict[str, Any] | None = None,
        hidden: Any = None,
        deterministic: bool = False,
        *,
        episode_start: Any = None,
    ) -> tuple[dict[str, Tensor], LSTMState | None]:
        """Evaluation actions for ``obs`` ``[B, obs_dim]`` (any ``B``), or for one observation
        ``[obs_dim]``, under ``masks``.

        Records nothing: no rollout step, and the carried LSTM state, the normalisers (``obs``
        is normalised with the current statistics, left as they are) and the keys ``act``
        draws from stay as they were. ``deterministic`` takes each head's masked argmax, the
        op head first and op-conditioned heads under the op it chose; else actions are drawn
        as ``act`` draws them, from a key stream of predict's own.

        Returns ``(actions, hidden)``: head -> int64 ``[B]``, and the LSTM state after this
        step (None for an MLP config), to pass back with the next observation. ``hidden`` None
        starts from zeros; ``episode_start`` bool ``[B]`` (None: all False) zeroes it where
        ``obs`` starts an episode. For one observation every input and output lacks the batch
        axis, as SB3's ``predict``: masks per head ``[size]`` (``[n_ops, size]`` op-conditioned),
        ``hidden`` ``[lstm_size]``, ``episode_start`` a bool, actions int64 ``[]``;
        ``funcppo.agent.gym_adapter.env_action`` turns them into a gymnasium env's action.
        An evaluation loop over a ``GymAdapter`` ``env``::

            actions, hidden = agent.predict(env.obs, env.masks, None, True)
            while ...:
                step = env.step(actions)
                actions, hidden = agent.predict(step.obs, step.masks, hidden, True,
                                                episode_start=step.episode_start)
        """
        if deterministic not in (True, False):
            raise ValueError(f"deterministic: expected a bool, got {deterministic!r}")
        obs, masks, hidden, episode_start, one = checked_policy_inputs(
            self.config, obs, masks, hidden, episode_start, self.device
        )
        if self.obs_stats is not None:
            obs = normalize_obs(self.obs_stats, obs, self.settings["clip_obs"])
        key = None
        if not deterministic:
            key = jr.fold_in(jr.fold_in(self.state.key, PREDICT_STREAM), self._predict_count)
            self._predict_count += 1
        actions, hidden = predict_actions(
            self.config, self.state.params, obs, masks, hidden, episode_start, key
        )
        if one:
            actions = {name: a[0] for name, a in actions.items()}
            hidden = None if hidden is None else LSTMState(*(x[0] for x in hidden))
        return actions, hidden

    @torch.no_grad()
    def observe(self, step: EnvStep) -> None:
        """Record the transition that the last ``act`` started; see ``EnvStep``."""
        if self._pending is None:
            raise RuntimeError("observe: no actions to observe; call act first")
        step = checked_step(step, self.num_envs, self.config.obs_dim, self.device)
        reward, valid, final = step.reward, step.valid, step.final_obs
        done = step.terminated | step.truncated
        (row, next_hidden, raw_obs), self._pending = self._pending, None
        trained = self._trained(valid)
        if self.obs_stats is not None:
            self.obs_stats = update_running_stats(self.obs_stats, raw_obs, trained)
            final = normalize_obs(self.obs_stats, final, self.settings["clip_obs"])
        # V of the observation reached, under the post-step LSTM state: the bootstrap value.
        no = torch.zeros_like(valid)
        next_value = policy_apply(self.state.params, self.config, final, next_hidden, no)
        train_reward = reward
        if self.reward_scale is not None:
            gamma = self.config.gamma
            self.reward_scale = update_reward_scale(
                self.reward_scale, reward, done, gamma, valid, trained
            )
            train_reward = scale_reward(self.reward_scale, reward, self.settings["clip_reward"])
        self._rows.append(
            row._replace(
                next_values=next_value.value,
                rewards=train_reward,
                terminated=step.terminated,
                truncated=step.truncated,
            )
        )
        self._valid.append(valid)
        self._counts += valid.long().cpu()
        self.hidden, self.episode_start = next_hidden, step.episode_start
        self.next_valid = step.next_valid
        self.episode_return, self.episode_length, ended = step_episodes(
            self.episode_return, self.episode_length, reward, done, valid
        )
        self._finished = [total + x for total, x in zip(self._finished, ended, strict=True)]

    def rollout(self) -> Batch:
        """The rollout ``update`` trains on, ``[num_steps, num_envs]``: each env column's first
        ``num_steps`` real transitions, in time order."""
        if not self.ready:
            raise RuntimeError(
                f"rollout: expected {self.num_steps} observed transitions in every env column, "
                f"got {int(self._counts.min())} in the shortest; call collect or act/observe"
            )
        return compact_rollout(self._rows, self._valid, self.num_steps)

    def update(
        self,
        learning_rate: float | None = None,
        batch: Batch | None = None,
        clip_coef: float | None = None,
    ) -> dict:
        """One PPO update; returns (and keeps in ``metrics``) host floats, except
        ``ratio_worst_head``: the name of the head whose ratio strayed furthest from 1, None
        where no head had a finite ratio (the functional update reports its index).

        ``learning_rate`` and ``clip_coef``, when given, replace the configured ones for this
        update only (each passes the config's own range check).
        ``batch``, when given, is trained on instead of the collected rollout (which is kept);
        the update's own checks (``funcppo.training.validation.check_batch``) refuse it, naming the
        head, where an action is out of its head's range or forbidden by its mask.
        """
        if self._pending is not None:
            raise RuntimeError("update: the last actions were not observed; call observe first")
        discarded, own = 0, batch is None
        if own:
            batch = self.rollout()
            discarded = sum(int(v.sum()) for v in self._valid) - self.num_steps * self.num_envs
        hp = self.state.hparams
        given = {"learning_rate": learning_rate, "clip_coef": clip_coef}
        given = {name: value for name, value in given.items() if value is not None}
        if given:
            self.config.replace(**given)  # a ValueError naming the field for a bad value
        now = {name: torch.full_like(getattr(hp, name), value) for name, value in given.items()}
        state = self.state._replace(hparams=hp._replace(**now))
        new_state, metrics = self._update(state, batch)
        self.state = new_state._replace(hparams=hp)
        host = host_metrics(self.config.spec, metrics, self._finished, discarded)
        if own:
            self._clear_rollout()
        self.metrics = host
        return host

    def collect(self, env: Any) -> None:
        """Step ``env`` until the rollout is full. ``env`` has ``num_envs``, the current
        ``obs`` and ``masks``, and ``step(actions) -> EnvStep`` (see
        ``funcppo.agent.gym_adapter``)."""
        if getattr(env, "num_envs", None) != self.num_envs:
            raise ValueError(
                f"env: expected num_envs={self.num_envs}, got {getattr(env, 'num_envs', None)}"
            )
        while not self.ready:
            self.observe(env.step(self.act(env.obs, env.masks)))

    def learn(
        self,
        env: Any,
        total_steps: int,
        callback: Any = None,
        anneal_lr: bool = False,
        anneal_clip: bool = False,
    ) -> list:
        """``total_steps // (num_envs * num_steps)`` rounds of ``collect`` and ``update``.

        ``anneal_lr`` decays the learning rate linearly to 0 over this call (as CleanRL),
        ``anneal_clip`` the clipping range (as ``TrainConfig.anneal_clip``).
        ``callback``: an object with ``on_update(agent, metrics)`` (and optionally
        ``on_training_start(agent)``, ``on_training_end(agent)``), a function
        ``f(agent, metrics)``, or a list of them (``funcppo.agent.callbacks``: evaluation,
        checkpoints, TensorBoard); one that returns False stops training after that update,
        as in Stable-Baselines3. Returns the metrics of every update.
        """
        hp = self.state.hparams
        lr, clip = float(hp.learning_rate), float(hp.clip_coef)
        return learn_rounds(self, env, total_steps, callback, lr, clip, anneal_lr, anneal_clip)

    def _carry(self) -> AgentCarry:
        return AgentCarry(*(getattr(self, name) for name in AgentCarry._fields))

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
        save_checkpoint(path, self.state, self.config, carry_to_extra(self.settings, self._carry()))

    def load(self, path: str | os.PathLike) -> None:
        """Restore what ``save`` wrote. The config's architecture and ``normalize_obs`` must
        match the saved agent's; the rest may differ: the hyperparameters follow this agent's
        config where it changes them (``funcppo.training.checkpoint``), and with another
        ``num_envs`` each env starts a new episode (``funcppo.agent.checkpoint``)."""
        state, _, extra = load_checkpoint(path, self.config, self.device)
        carry = carry_from_extra(path, extra, self.settings, self._carry())
        self._clear_rollout()
        self.state = state
        for name, value in zip(AgentCarry._fields, carry, strict=True):
            setattr(self, name, value)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **overrides: Any) -> PPOAgent:
        """The agent that ``save`` wrote to ``path``, rebuilt from the file alone (its config
        and settings included), as Stable-Baselines3's ``PPO.load``. ``overrides`` replace
        constructor arguments (``num_envs=1`` to evaluate, ``device``, ...) or config fields
        (``learning_rate`` to fine-tune, ...), within what ``load`` accepts."""
        return agent_from_checkpoint(cls, path, overrides)


def learn_rounds(
    agent: Any,
    env: Any,
    total_steps: int,
    callback: Any,
    learning_rate: Any,
    clip_coef: Any,
    anneal_lr: bool,
    anneal_clip: bool,
) -> list:
    """``learn``'s loop for ``PPOAgent`` and ``SeedsAgent``: ``total_steps // (num_envs *
    num_steps)`` rounds of ``agent.collect(env)`` and ``agent.update(lr, clip)``, the callbacks
    after each update (one returning False stops), their start and end around the rounds.
    ``learning_rate`` and ``clip_coef`` (numbers, or per-seed tensors) are what ``anneal_lr``
    and ``anneal_clip`` decay linearly over the rounds. Returns every update's metrics."""
    num_updates = total_steps // (agent.num_envs * agent.num_steps)
    if num_updates < 1:
        raise ValueError(
            f"total_steps: expected at least num_envs * num_steps = "
            f"{agent.num_envs * agent.num_steps}, got {total_steps}"
        )
    callbacks = as_callback(callback)
    history = []
    callbacks.on_training_start(agent)
    try:
        for u in range(num_updates):
            agent.collect(env)
            left = anneal_left(u, num_updates)
            metrics = agent.update(
                learning_rate * left if anneal_lr else None,
                clip_coef=clip_coef * left if anneal_clip else None,
            )
            history.append(metrics)
            if not callbacks.on_update(agent, metrics):
                break
    finally:
        callbacks.on_training_end(agent)
    return history
