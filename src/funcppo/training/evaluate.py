"""``make_evaluate(config)``: the return of whole episodes under a trained policy.

The returns that training reports are the episodes that happened to finish inside each
rollout; with short rollouts those are biased towards short episodes (a 500-step CartPole
episode rarely finishes inside a 32-step window). Evaluation instead starts ``num_envs`` fresh
episodes and plays each to its end, with the policy sampling as it does in training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import vmap

from funcppo.accel.compiling import CompileSettings
from funcppo.training.state import TrainState
from funcppo.training.train import (
    TrainConfig,
    contiguous_outputs,
    init_runner,
    make_env_step,
    make_rollout,
)

__all__ = ["make_evaluate"]


def make_evaluate(
    config: TrainConfig,
    *,
    num_seeds: int | None = None,
    backend: str | None = None,
    chunk_steps: int | None = None,
    compiler: CompileSettings | None = None,
) -> Callable[[TrainState, Tensor], Tensor]:
    """``evaluate(train_state, key) -> returns``: one whole episode in each of ``num_envs`` envs.

    Every env plays ``env.max_steps`` steps; since no episode is longer, each env's first
    episode ends inside them, and its return is kept. With ``num_seeds``, ``train_state`` and
    ``key`` carry a leading seed axis and the result is ``[S, num_envs]``; else ``[num_envs]``.
    The same state and key give the same returns.

    ``chunk_steps``: play them as rollouts of this many steps, as many as it takes to cover
    ``env.max_steps`` (the same returns: the runner state carries over). With training's
    ``config.num_steps``, a compiled evaluation runs training's rollout, same shapes and, without
    an observation normaliser, same closure, so it reuses training's precompiled file
    (``funcppo.accel.precompile``) instead of compiling a rollout of its own.

    ``compiler`` (``funcppo.accel.compiling.CompileSettings``): how the rollout is compiled; None:
    ``CompileSettings.for_device`` of the key's device, chosen at the first call. ``backend``,
    when given, replaces its ``torch.compile`` backend.
    """
    if chunk_steps is not None and (
        isinstance(chunk_steps, bool) or not isinstance(chunk_steps, int) or chunk_steps < 1
    ):
        raise ValueError(f"chunk_steps: expected an int >= 1 or None, got {chunk_steps!r}")
    env = config.make_env()
    # The policy's observation statistics are read, never updated, by an evaluation.
    env_step = make_env_step(config, env, learn_obs_stats=False)

    def init(train_state: TrainState, key: Tensor):
        rs = init_runner(config, env, key)
        return rs._replace(train=train_state, obs_stats=train_state.obs_stats)

    if num_seeds is not None:
        env_step, init = vmap(env_step, randomness="error"), vmap(init, randomness="error")
        # As in make_train: the runner's first state made contiguous; the steps' outputs are,
        # by the compiled scan's clones or by make_rollout's eager loop.
        init = contiguous_outputs(init)
    # As long as the longest episode: every env ends an episode within it.
    time_axis = 0 if num_seeds is None else 1
    steps = env.max_steps if chunk_steps is None else chunk_steps
    chunks = -(-env.max_steps // steps)
    rollout = make_rollout(
        env_step, steps, time_axis, config.ppo.compile, backend, compiler=compiler
    )

    def play(rs) -> tuple[Tensor, Tensor]:
        """Episode ends and rewards of every step, time first: only these are read."""
        done, rewards = [], []
        for _ in range(chunks):
            rs, batch = rollout(rs)
            done.append((batch.terminated | batch.truncated).movedim(time_axis, 0))
            rewards.append(batch.rewards.movedim(time_axis, 0))
        return torch.cat(done), torch.cat(rewards)

    def evaluate(train_state: TrainState, key: Tensor) -> Tensor:
        shape = (2,) if num_seeds is None else (num_seeds, 2)
        if not isinstance(key, Tensor) or key.dtype != torch.int64 or tuple(key.shape) != shape:
            got = f"{key.dtype} {tuple(key.shape)}" if isinstance(key, Tensor) else type(key)
            raise ValueError(f"key: expected an int64 tensor of shape {list(shape)}, got {got}")
        if config.normalize_obs != (train_state.obs_stats != ()):
            want = "observation statistics" if config.normalize_obs else "no observation statistics"
            raise ValueError(
                f"train_state.obs_stats: expected {want} (config.normalize_obs="
                f"{config.normalize_obs}), got {type(train_state.obs_stats).__name__}"
            )
        done, rewards = play(init(train_state, key))
        # Steps of each env's first episode: those with no episode end before them.
        first = (done.long().cumsum(0) - done.long()) == 0
        return torch.where(first & done.any(0), rewards, 0.0).sum(0)

    return evaluate
