"""Callbacks for ``PPOAgent.learn``: periodic evaluation, checkpoints and TensorBoard logging.

A callback is an object with ``on_update(agent, metrics) -> bool | None``, called after each
update with the update's metrics (``PPOAgent.update``'s dict); returning False stops training
after that update, as in Stable-Baselines3. It may also have ``on_training_start(agent)`` and
``on_training_end(agent)``, called when ``learn`` starts and when it ends (however it ends). A
plain function ``f(agent, metrics)`` is a callback too, and a list of callbacks is called in
its order, every one of them each update, training stopping if any returned False.

A callback may add entries to ``metrics``: later callbacks in the list see them, and so does
the history ``learn`` returns. ``EvalCallback`` adds its evaluation's figures, so a
``TensorBoardCallback`` after it logs them too.

Each callback counts the updates it has seen (``num_updates``) and their env steps
(``num_timesteps``: ``num_envs * num_steps`` of its agent per update), across ``learn`` calls.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from funcppo.agent.gym_adapter import GymAdapter
from funcppo.agent.gym_evaluate import evaluate_policy

if TYPE_CHECKING:
    from funcppo.agent.agent import PPOAgent

__all__ = [
    "Callback",
    "CallbackList",
    "CheckpointCallback",
    "EvalCallback",
    "TensorBoardCallback",
    "as_callback",
    "summary_writer",
]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    return value


class Callback:
    """A base that does nothing: subclasses override ``after_update`` (and the start and end
    hooks), and it keeps ``num_updates`` and ``num_timesteps`` for them."""

    def __init__(self) -> None:
        self.num_updates = 0
        self.num_timesteps = 0

    def on_training_start(self, agent: PPOAgent) -> None:
        """Called once when ``learn`` starts."""

    def on_update(self, agent: PPOAgent, metrics: dict) -> bool | None:
        """Counts the update, then runs ``after_update``; False stops training."""
        self.num_updates += 1
        self.num_timesteps += agent.num_envs * agent.num_steps
        return self.after_update(agent, metrics)

    def after_update(self, agent: PPOAgent, metrics: dict) -> bool | None:
        """What the callback does after an update; False stops training."""
        return None

    def on_training_end(self, agent: PPOAgent) -> None:
        """Called once when ``learn`` ends, also when it ends by an exception."""


class CallbackList(Callback):
    """Several callbacks, called in order; training stops when any of them returns False.
    Each is an object with ``on_update`` (its other two methods optional) or a function
    ``f(agent, metrics)``."""

    def __init__(self, callbacks: Sequence[Any]) -> None:
        super().__init__()
        for callback in callbacks:
            if not (hasattr(callback, "on_update") or callable(callback)):
                raise TypeError(
                    "callback: expected an object with on_update(agent, metrics) or a function "
                    f"f(agent, metrics), got {type(callback).__name__}"
                )
        self.callbacks = list(callbacks)

    def _each(self, method: str, agent: PPOAgent) -> None:
        for callback in self.callbacks:
            hook = getattr(callback, method, None)
            if hook is not None:
                hook(agent)

    def on_training_start(self, agent: PPOAgent) -> None:
        self._each("on_training_start", agent)

    def on_update(self, agent: PPOAgent, metrics: dict) -> bool:
        go_on = True
        for callback in self.callbacks:
            hook = getattr(callback, "on_update", callback)
            answer = hook(agent, metrics)
            if answer is not None and answer is not True and answer is not False:
                raise TypeError(
                    f"callback {callback!r}: expected None, True or False from on_update, "
                    f"got {answer!r}"
                )
            go_on = go_on and answer is not False
        return go_on

    def on_training_end(self, agent: PPOAgent) -> None:
        self._each("on_training_end", agent)


def as_callback(callback: Any) -> CallbackList:
    """``callback`` (None, an object with ``on_update``, a function ``f(agent, metrics)`` or a
    list of these) as one ``CallbackList``, which ``learn`` calls."""
    if callback is None:
        return CallbackList([])
    if isinstance(callback, (list, tuple)):
        return CallbackList(callback)
    return CallbackList([callback])


class EvalCallback(Callback):
    """Every ``eval_freq`` updates, ``evaluate_policy`` on ``eval_env``; the best agent so far
    saved as ``best_model.pt`` in ``best_model_save_path``.

    Args:
      eval_env: a gymnasium env or vector env (or a ``GymAdapter``), apart from the training one.
      eval_freq: evaluate after every this many updates.
      n_eval_episodes, deterministic: ``evaluate_policy``'s.
      best_model_save_path: a folder (made if missing) for ``best_model.pt``, written (through
        ``PPOAgent.save``, atomically) whenever the mean return beats every earlier one; None
        keeps no file.
      reward_threshold: stop training once an evaluation's mean return reaches it (SB3's
        ``StopTrainingOnRewardThreshold``).

    Each evaluation adds ``eval_mean_reward``, ``eval_std_reward`` and ``eval_mean_length`` to
    ``metrics`` and appends ``(num_timesteps, returns, lengths)`` to ``evaluations``;
    ``best_mean_reward`` and ``last_mean_reward`` keep the figures.
    """

    def __init__(
        self,
        eval_env: Any,
        eval_freq: int = 10,
        n_eval_episodes: int = 5,
        deterministic: bool = True,
        best_model_save_path: str | os.PathLike | None = None,
        reward_threshold: float | None = None,
    ) -> None:
        super().__init__()
        self.eval_freq = _positive_int("eval_freq", eval_freq)
        self.n_eval_episodes = _positive_int("n_eval_episodes", n_eval_episodes)
        if deterministic not in (True, False):
            raise ValueError(f"deterministic: expected a bool, got {deterministic!r}")
        self.deterministic = deterministic
        # One adapter for every evaluation: the env's spaces are checked now, not mid-training.
        self.eval_env = eval_env if isinstance(eval_env, GymAdapter) else GymAdapter(eval_env)
        self.best_model_save_path = None
        if best_model_save_path is not None:
            self.best_model_save_path = Path(best_model_save_path)
        self.reward_threshold = reward_threshold
        self.best_mean_reward = -math.inf
        self.last_mean_reward = math.nan
        self.evaluations: list[tuple[int, list[float], list[int]]] = []

    def after_update(self, agent: PPOAgent, metrics: dict) -> bool | None:
        if self.num_updates % self.eval_freq != 0:
            return None
        returns, lengths = evaluate_policy(
            agent,
            self.eval_env,
            self.n_eval_episodes,
            self.deterministic,
            return_episode_rewards=True,
        )
        # evaluate_policy's mean and std, from the same episodes.
        mean = float(np.mean(returns))
        metrics["eval_mean_reward"] = mean
        metrics["eval_std_reward"] = float(np.std(returns))
        metrics["eval_mean_length"] = float(np.mean(lengths))
        self.evaluations.append((self.num_timesteps, returns, lengths))
        self.last_mean_reward = mean
        if mean > self.best_mean_reward:
            self.best_mean_reward = mean
            if self.best_model_save_path is not None:
                self.best_model_save_path.mkdir(parents=True, exist_ok=True)
                agent.save(self.best_model_save_path / "best_model.pt")
        if self.reward_threshold is not None and mean >= self.reward_threshold:
            return False
        return None


class CheckpointCallback(Callback):
    """Every ``save_freq`` updates, ``agent.save`` (atomic) to
    ``save_path / f"{name_prefix}_{num_timesteps}_steps.pt"``, SB3's naming; the folder is
    made if missing. ``saved`` lists the files written."""

    def __init__(
        self, save_freq: int, save_path: str | os.PathLike, name_prefix: str = "funcppo"
    ) -> None:
        super().__init__()
        self.save_freq = _positive_int("save_freq", save_freq)
        self.save_path, self.name_prefix = Path(save_path), name_prefix
        self.saved: list[Path] = []

    def after_update(self, agent: PPOAgent, metrics: dict) -> None:
        if self.num_updates % self.save_freq == 0:
            self.save_path.mkdir(parents=True, exist_ok=True)
            path = self.save_path / f"{self.name_prefix}_{self.num_timesteps}_steps.pt"
            agent.save(path)
            self.saved.append(path)


def summary_writer(log_dir: str | os.PathLike):
    """torch's TensorBoard ``SummaryWriter`` writing to ``log_dir``; an ImportError that names
    the package where tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(
            "TensorBoard logging needs the tensorboard package: pip install tensorboard"
        ) from err
    return SummaryWriter(str(log_dir))


class TensorBoardCallback(Callback):
    """Every update's numeric metrics (floats, ints, bools; not ``ratio_worst_head``, a name) to
    TensorBoard under their own names, against ``num_timesteps``; those that callbacks before
    this one in the list added included. Flushed when ``learn`` ends; ``close`` ends the file.

    Args:
      log_dir: the folder of the event file; or ``writer``, any object with ``add_scalar``,
        ``flush`` and ``close`` (a ``SummaryWriter`` shared with other logging).
    """

    def __init__(self, log_dir: str | os.PathLike | None = None, *, writer: Any = None) -> None:
        super().__init__()
        if (log_dir is None) == (writer is None):
            raise ValueError("TensorBoardCallback: expected exactly one of log_dir and writer")
        self.writer = summary_writer(log_dir) if writer is None else writer

    def after_update(self, agent: PPOAgent, metrics: dict) -> None:
        for name, value in metrics.items():
            if isinstance(value, (bool, int, float)):
                self.writer.add_scalar(name, float(value), self.num_timesteps)

    def on_training_end(self, agent: PPOAgent) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
