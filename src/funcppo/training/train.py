"""``make_train(config)``: rollouts and updates composed into one training run per key.

One environment step (policy, masked factored sampling, ``env.step``, the value of the reached
observation for truncation bootstrap) is a pure function, vmapped over seeds. Compiled, the
rollout is one call: torch's ``scan`` (``jax.lax.scan``'s counterpart) over ``num_steps`` of that
step, which inductor lowers to one loop, so compile time does not grow with the rollout's length
and dynamo's per-call cost is paid once per rollout rather than once per step (3.1x on
CartPole's rollout, docs/design-notes.md). Eager, a Python loop drives the step. Then the compiled
update runs on the rollout.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor
from torch.func import vmap

from funcppo.accel.compiling import (
    CompileSettings,
    compile_fn,
    per_device,
)
from funcppo.accel.scanning import scan_rollout
from funcppo.core import random as jr
from funcppo.core.config import PPOConfig, anneal_left
from funcppo.core.constants import CLIP_OBS
from funcppo.core.distributions import factored_logprob, factored_sample
from funcppo.core.networks import init_hidden, policy_apply
from funcppo.core.normalize import init_running_stats, normalize_obs, update_running_stats
from funcppo.envs import Env, make_env
from funcppo.training.distributed import DataParallel
from funcppo.training.state import Batch, Hyperparams, TrainState, init_train_state, with_hparams
from funcppo.training.update import make_update_fn

__all__ = [
    "RunnerState",
    "TrainConfig",
    "contiguous_outputs",
    "init_runner",
    "make_env_step",
    "make_rollout",
    "make_train",
    "with_threads",
]


@dataclass(frozen=True)
class TrainConfig:
    """A training run: the environment, its batch shape, the budget and the PPO config.

    ``total_steps`` counts environment steps per seed; a run makes
    ``total_steps // (num_envs * num_steps)`` updates. ``anneal_lr`` decays the learning rate
    linearly to 0 over the run, as CleanRL's PPO does; ``anneal_clip`` decays the clipping range
    the same way (RL Zoo's ``clip_range: lin_0.2``). Update ``u`` of ``n`` uses
    ``1 - u / n`` of each, so the last update keeps ``1 / n`` of them.

    ``normalize_obs``: the policy sees observations normalised by their running mean and
    variance and clipped to ``+-clip_obs``, as SB3's ``VecNormalize`` (its start, merge and
    order: every observation is merged into the statistics before it is normalised; a final
    observation is normalised but not merged). The statistics live in ``TrainState.obs_stats``,
    so checkpoints and ``make_evaluate`` (which reads them without merging) use them too.
    """

    env: str
    ppo: PPOConfig
    num_envs: int = 4
    num_steps: int = 128
    total_steps: int = 500_000
    anneal_lr: bool = True
    anneal_clip: bool = False
    normalize_obs: bool = False
    clip_obs: float = CLIP_OBS

    def __post_init__(self) -> None:
        for name in ("num_envs", "num_steps", "total_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        for name in ("anneal_lr", "anneal_clip", "normalize_obs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        clip = self.clip_obs
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0:
            raise ValueError(f"clip_obs: expected a number > 0, got {clip!r}")
        if self.num_updates < 1:
            raise ValueError(
                f"total_steps: expected at least num_envs * num_steps = "
                f"{self.num_envs * self.num_steps}, got {self.total_steps}"
            )

    @property
    def num_updates(self) -> int:
        return self.total_steps // (self.num_envs * self.num_steps)

    def make_env(self) -> Env:
        return make_env(self.env, self.num_envs)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


class RunnerState(NamedTuple):
    """What the rollout carries from step to step (and from update to update)."""

    train: TrainState
    env_state: Any
    obs: Tensor
    masks: dict[str, Tensor]
    hidden: Any
    episode_start: Tensor
    key: Tensor
    episode_return: Tensor
    episode_length: Tensor
    finished_return: Tensor
    finished_length: Tensor
    finished_count: Tensor
    obs_stats: Any


def _zeros_like_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return x.new_zeros(()), x.new_zeros(()), x.new_zeros(())


def init_runner(config: TrainConfig, env: Env, key: Tensor, rank: int = 0) -> RunnerState:
    """The runner state before a run's first step, for one key ``[2]``: a new train state,
    ``env`` reset, zero episode counters and, with ``config.normalize_obs``, empty observation
    statistics. ``rank`` is a data-parallel process's: every process starts from the same
    agent but steps its own environments (rank 0's are those of a single-process run)."""
    k_train, k_env, k_run = jr.split(key, 3)
    if rank:
        k_env, k_run = jr.fold_in(k_env, rank), jr.fold_in(k_run, rank)
    train = init_train_state(k_train, config.ppo)
    stats = init_running_stats((env.obs_dim,), key.device) if config.normalize_obs else ()
    train = train._replace(obs_stats=stats)
    env_state, obs, masks = env.reset(k_env)
    hidden = init_hidden(config.ppo, env.num_envs, key.device)
    zeros = torch.zeros(env.num_envs, device=key.device)
    return RunnerState(
        train,
        env_state,
        obs,
        masks,
        () if hidden is None else hidden,
        torch.ones(env.num_envs, dtype=torch.bool, device=key.device),
        k_run,
        zeros,
        zeros.clone(),
        *_zeros_like_stats(zeros),
        stats,
    )


def make_env_step(config: TrainConfig, env: Env, learn_obs_stats: bool = True):
    """``env_step(params, rs) -> (rs, transition)``; with ``learn_obs_stats`` False the
    observation statistics are read but not updated (evaluation)."""
    # Not the config itself: a precompiled rollout is keyed by what it closes over, and the
    # run's length (total_steps) does not change it.
    ppo, spec = config.ppo, config.ppo.spec
    normalize, clip_obs = config.normalize_obs, config.clip_obs
    # Without a normaliser there is nothing to learn, and training's step and evaluation's
    # close over the same values (so an evaluation can share training's precompiled rollout).
    learn = normalize and learn_obs_stats

    def seen(stats: Any, obs: Tensor) -> Tensor:
        return normalize_obs(stats, obs, clip_obs) if normalize else obs

    def env_step(params: Any, rs: RunnerState) -> tuple[RunnerState, Batch]:
        # One split (each hash call site costs seconds of compilation); the carried key is
        # cloned so that it does not come back as a strided view of the three.
        k_act, k_env, k_next = jr.split(rs.key, 3)
        k_next = k_next.clone()
        hidden = rs.hidden if ppo.recurrent else None
        stats = rs.obs_stats
        if learn:
            stats = update_running_stats(stats, rs.obs)
        obs = seen(stats, rs.obs)
        out = policy_apply(params, ppo, obs, hidden, rs.episode_start)
        actions = factored_sample(spec, out.logits, rs.masks, k_act)
        logprobs, _ = factored_logprob(spec, out.logits, rs.masks, actions)
        res = env.step(rs.env_state, actions, k_env)
        # V of the observation the step reached (before any reset), under the post-step hidden
        # state: the bootstrap value of a truncated step, and V(s_{t+1}) otherwise.
        no_start = torch.zeros_like(rs.episode_start)
        final_obs = seen(stats, res.final_obs)
        next_value = policy_apply(params, ppo, final_obs, out.hidden, no_start).value
        done = res.terminated | res.truncated
        ep_return = rs.episode_return + res.reward
        ep_length = rs.episode_length + 1
        new_hidden = () if hidden is None else out.hidden
        # One step of the rollout, as a Batch without its time axis.
        transition = Batch(
            obs=obs,
            actions=actions,
            masks=rs.masks,
            logprobs=logprobs,
            values=out.value,
            next_values=next_value,
            rewards=res.reward,
            terminated=res.terminated,
            truncated=res.truncated,
            episode_start=rs.episode_start,
            hidden=rs.hidden,
        )
        new_rs = RunnerState(
            train=rs.train,
            env_state=res.env_state,
            obs=res.obs,
            masks=res.masks,
            hidden=new_hidden,
            episode_start=done,
            key=k_next,
            episode_return=torch.where(done, 0.0, ep_return),
            episode_length=torch.where(done, 0.0, ep_length),
            finished_return=rs.finished_return + torch.where(done, ep_return, 0.0).sum(),
            finished_length=rs.finished_length + torch.where(done, ep_length, 0.0).sum(),
            finished_count=rs.finished_count + done.float().sum(),
            obs_stats=stats,
        )
        return new_rs, optree.tree_map(lambda x: x.detach(), transition)

    return env_step


def _stack(items: list, axis: int) -> Any:
    return optree.tree_map(lambda *xs: torch.stack(xs, dim=axis), *items, none_is_leaf=False)


def make_rollout(
    env_step: Callable,
    num_steps: int,
    time_axis: int,
    compile_: bool,
    backend: str | None = None,
    *,
    compiler: CompileSettings | None = None,
) -> Callable[[RunnerState], tuple[RunnerState, Batch]]:
    """``rollout(rs) -> (rs, batch)``: ``num_steps`` of ``env_step(params, rs)``, the
    transitions stacked on ``time_axis``; compiled as one scan, or driven from Python.

    ``compiler`` (``funcppo.accel.compiling.CompileSettings``): how the scan is compiled, and the
    intra-op threads the rollout runs with (``rollout_threads``, compiled or not); None:
    ``CompileSettings.for_device`` of the runner state's key, chosen at the first call, whose
    thread count is the caller's. ``backend``, when given, replaces its backend."""

    def threaded(rollout: Callable, settings: CompileSettings | None) -> Callable:
        threads = None if settings is None else settings.rollout_threads
        return rollout if threads is None else with_threads(rollout, threads)

    if not compile_:
        rollout = _loop_rollout(contiguous_outputs(env_step), num_steps, time_axis)
        return threaded(rollout, compiler)

    def build(settings: CompileSettings) -> Callable:
        scanned, drive = scan_rollout(env_step, num_steps, time_axis)
        compiled = compile_fn(scanned, "rollout", settings)
        return threaded(functools.partial(drive, compiled), settings)

    return per_device(build, compiler, backend, lambda rs: rs.key.device)


def with_threads(fn: Callable, threads: int) -> Callable:
    """``fn`` run with ``threads`` intra-op threads (``torch.set_num_threads``), then the
    caller's count back, also when ``fn`` raises.

    A compiled kernel parallelises its loops over however many threads torch has when it
    runs. A CartPole rollout is 128 steps of kernels over a few hundred numbers, where
    waking a second thread costs more than it saves: 8 seeds trained 1.04-1.09x faster with
    the rollout on one thread and the update on two than with both on two
    (benchmarks/threads.py, docs/design-notes.md). Lifecycle's 64 envs per seed went the other
    way (0.81x), so ``make_train`` keeps the caller's count unless its settings name one
    (``CompileSettings.rollout_threads``).
    """

    def call(*args: Any) -> Any:
        before = torch.get_num_threads()
        if before == threads:
            return fn(*args)
        torch.set_num_threads(threads)
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(before)

    return call


def _loop_rollout(env_step: Callable, num_steps: int, time_axis: int) -> Callable:
    """``rollout(rs) -> (rs, batch)``: ``num_steps`` calls of ``env_step`` from Python."""

    def rollout(rs: RunnerState) -> tuple[RunnerState, Batch]:
        params, transitions = rs.train.params, []
        for _ in range(num_steps):
            rs, transition = env_step(params, rs)
            transitions.append(transition)
        return rs, _stack(transitions, time_axis)

    return rollout


def make_train(
    config: TrainConfig,
    *,
    num_seeds: int | None = None,
    backend: str | None = None,
    data_parallel: DataParallel | None = None,
    compile_scope: str = "scan",
    compiler: CompileSettings | None = None,
) -> Callable[..., tuple[TrainState, dict[str, Tensor]]]:
    """``train(key, callback=None, hparams=None) -> (final TrainState, metrics history)``.

    With ``num_seeds``, ``key`` is ``[S, 2]`` and S independent runs share one program (vmap);
    the history's tensors are ``[num_updates, S]`` (``[num_updates]`` without seeds). The same
    key gives the same run. ``callback(update_index, metrics)`` is called after each update
    with host floats (one device-to-host transfer per update), lists of them with seeds,
    except ``ratio_worst_head``: the head's name (``ActionSpec.head_name``; None where no head
    qualifies), where the history keeps the update's index; returning False stops the run
    (as a callback of ``PPOAgent.learn`` does).
    ``hparams`` maps fields of ``Hyperparams`` to a float or an ``[S]`` tensor, set with
    ``funcppo.training.state.with_hparams`` (its errors prefixed ``hparams:``): a sweep, one setting
    per seed in one program (the learning rate is the start of the annealed schedule).

    With ``data_parallel`` (``funcppo.training.distributed.DataParallel``), every process calls
    ``train`` with the same key and steps its own environments (keys folded with its rank);
    the update learns from every process's rollout and episode metrics count every process's
    episodes, so the processes return the same state and metrics. ``config.num_envs`` is per
    process.

    ``compile_scope`` is the update's (``make_update_fn``): ``"scan"`` (default) runs each
    update's minibatch steps as one compiled scan looped in C++ (1.07-1.13x over
    ``"minibatch"``'s Python loop on 8 CartPole seeds' training loop, docs/design-notes.md);
    the rollout is one compiled scan either way.

    ``compiler`` (``funcppo.accel.compiling.CompileSettings``) compiles the rollout and the update,
    and names the rollout's intra-op threads (``rollout_threads``, ``with_threads``); None:
    ``CompileSettings.for_device`` of the key's device, chosen at the first call (the
    caller's thread count for the rollout too). ``backend``, when given, replaces its
    ``torch.compile`` backend.
    """
    env = config.make_env()
    ppo = config.ppo
    if data_parallel is not None and config.normalize_obs:
        # Each process would merge only its own envs' observations, and the agents diverge.
        raise ValueError(
            "config.normalize_obs: expected False with data_parallel (the statistics are not "
            "shared between processes), got True"
        )
    if env.spec != ppo.spec or env.obs_dim != ppo.obs_dim:
        raise ValueError(
            f"ppo: expected obs_dim={env.obs_dim} and the action spec of env {config.env!r}, "
            f"got obs_dim={ppo.obs_dim} and heads {ppo.spec.names}"
        )
    env_step = make_env_step(config, env)
    rank = 0 if data_parallel is None else data_parallel.rank
    init = lambda key: init_runner(config, env, key, rank)  # noqa: E731
    if num_seeds is not None:
        env_step, init = vmap(env_step, randomness="error"), vmap(init, randomness="error")
        # vmap returns outputs that do not depend on the inputs expanded (stride 0); make them
        # real tensors so the compiled rollout sees one memory layout from the first call on.
        # (Inside the compiled scan, the body's clones already do, and walking the step's
        # outputs there cost dynamo a tenth of the run's tracing.)
        init = contiguous_outputs(init)
    time_axis = 0 if num_seeds is None else 1
    rollout = make_rollout(
        env_step,
        config.num_steps,
        time_axis,
        ppo.compile,
        backend,
        compiler=compiler,
    )
    update = make_update_fn(
        ppo,
        num_seeds=num_seeds,
        compile_scope=compile_scope,
        backend=backend,
        data_parallel=data_parallel,
        hparams="state",  # a sweep's per-seed values and the annealed schedule
        compiler=compiler,
    )

    def one_update(rs: RunnerState, u: int, base: Hyperparams):
        rs, batch = rollout(rs)
        batch = batch if ppo.recurrent else batch._replace(hidden=None)
        rs = rs._replace(train=rs.train._replace(obs_stats=rs.obs_stats))
        hparams, left = rs.train.hparams, anneal_left(u, config.num_updates)
        if config.anneal_lr:
            hparams = hparams._replace(learning_rate=base.learning_rate * left)
        if config.anneal_clip:
            hparams = hparams._replace(clip_coef=base.clip_coef * left)
        train_state, metrics = update(rs.train._replace(hparams=hparams), batch)
        # The schedule's values this update ran with (CleanRL logs the learning rate too).
        metrics["learning_rate"] = hparams.learning_rate
        metrics["clip_coef"] = hparams.clip_coef
        train_state = train_state._replace(hparams=rs.train.hparams)
        finished = (rs.finished_return, rs.finished_length, rs.finished_count)
        if data_parallel is not None:
            finished = data_parallel.tree_sum(finished)
        total_return, total_length, count = finished
        metrics["episode_return"] = torch.where(
            count > 0, total_return / count.clamp(min=1), torch.nan
        )
        metrics["episode_length"] = torch.where(
            count > 0, total_length / count.clamp(min=1), torch.nan
        )
        metrics["episodes"] = count
        zero = torch.zeros_like(count)
        rs = rs._replace(
            train=train_state,
            finished_return=zero,
            finished_length=zero.clone(),
            finished_count=zero.clone(),
        )
        return rs, metrics

    def train(key: Tensor, callback: Callable | None = None, hparams: dict | None = None):
        rs = init(key)
        if hparams:
            try:
                rs = rs._replace(train=with_hparams(rs.train, **hparams))
            except ValueError as error:
                raise ValueError(f"hparams: {error}") from None
        base = rs.train.hparams
        history = []
        try:
            for u in range(config.num_updates):
                start = time.perf_counter()
                rs, metrics = one_update(rs, u, base)
                history.append(metrics)
                if callback is not None:
                    host = {k: v.tolist() for k, v in _host(metrics).items()}
                    worst = host["ratio_worst_head"]
                    host["ratio_worst_head"] = (
                        ppo.spec.head_name(worst)
                        if num_seeds is None
                        else [ppo.spec.head_name(i) for i in worst]
                    )
                    host["update_seconds"] = time.perf_counter() - start
                    if callback(u, host) is False:
                        break
        except KeyboardInterrupt:
            # Ctrl-C ends the run; every finished update is kept, a half-done one is dropped.
            pass
        stacked = _stack(history, 0) if history else {}
        return rs.train, stacked

    return train


def contiguous_outputs(fn: Callable) -> Callable:
    """``fn`` with every tensor it returns made contiguous.

    vmap returns an output that does not depend on the inputs expanded (stride 0); a compiled
    function that takes it guards on its strides, and would compile again for the dense
    tensors that later calls bring.
    """

    def call(*args):
        return optree.tree_map(lambda x: x.contiguous(), fn(*args), none_is_leaf=False)

    return call


def _host(metrics: dict[str, Tensor]) -> dict[str, Tensor]:
    """One device-to-host transfer for the whole metrics dict."""
    names = list(metrics)
    flat = torch.stack([metrics[n].float() for n in names]).cpu()
    return dict(zip(names, flat, strict=True))
