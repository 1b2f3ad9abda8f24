"""``make_update_fn(config)``: one pure PPO update over a rollout, compiled and vmappable.

As PureJaxRL's ``_update_step``: ``prepare`` (GAE, advantage normalisation, masks, sequences),
``update_epochs * num_minibatches`` calls of ``minibatch_step`` (one gradient step, gated by KL
early stopping and finiteness, its metrics a dict), then ``finish`` (the metrics, stacked,
reduced by tree maps). The processes are an object (``training.distributed``), micro-batches
sum in ``training.accumulation``, and ``accel.scanning`` vmaps, compiles and loops the pieces.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from funcppo.accel.compiling import CompileSettings, per_device
from funcppo.accel.scanning import UpdatePieces, compose_update, stacked_tree_map
from funcppo.core import flat, losses
from funcppo.core import random as jr
from funcppo.core.advantages import gae, per_head_advantages
from funcppo.core.config import PPOConfig
from funcppo.core.constants import KL_EARLY_STOP_FACTOR
from funcppo.core.distributions import factored_entropy, factored_logprob, mask_stats
from funcppo.core.networks import policy_apply, policy_init
from funcppo.core.optim import apply_updates, global_norm, is_critic_path, make_optimizer
from funcppo.core.spec import causal_masks, entropy_floor_masks
from funcppo.training.accumulation import accumulate, split_tree
from funcppo.training.distributed import DataParallel, SingleProcess
from funcppo.training.state import Batch, TrainState, make_hyperparams, make_loss_coefs
from funcppo.training.validation import HPARAMS_SOURCES, check_batch

__all__ = ["Carry", "Prepared", "Setup", "finish", "make_update_fn", "minibatch_step", "prepare"]


class Setup(NamedTuple):
    """What the pieces read besides their arguments, made once: the config, the processes, the
    sequence length, and the layouts of the parameters and the optimizer state as flat groups
    (``funcppo.core.flat``), in which the optimizer steps a few vectors, not a dozen leaves."""

    config: PPOConfig
    dp: SingleProcess | DataParallel
    seq_len: int
    params: flat.FlatLayout
    opt_state: flat.TreeLayout


class Prepared(NamedTuple):
    """The rollout as ``[L, N]`` sequences (L = bptt_len for the LSTM, 1 for the MLP), every
    epoch's minibatches (``order``: ``[epochs * minibatches, n]`` sequence indices) and per
    minibatch its ``causal`` and ``available`` counts per head, summed over the processes."""

    data: dict[str, Any]
    hidden: Any
    order: Tensor
    counts: dict[str, dict[str, Tensor]]


class Carry(NamedTuple):
    """What one minibatch step hands the next; ``params`` and ``opt_state`` as flat groups."""

    params: Any
    opt_state: Any
    stopped: Tensor
    stop_epoch: Tensor
    applied: Tensor
    skipped: Tensor


def _to_sequences(x: Tensor, seq_len: int) -> Tensor:
    """``[T, B, ...] -> [L, (T // L) * B, ...]``: chunk c of env b becomes sequence c * B + b."""
    t, b = x.shape[:2]
    chunks = x.reshape(t // seq_len, seq_len, b, *x.shape[2:]).movedim(0, 1)
    return chunks.reshape(seq_len, (t // seq_len) * b, *x.shape[2:])


def shuffle(s: Setup, state: TrainState, batch: Batch) -> Tensor:
    """The minibatches of every epoch, ``[epochs * minibatches, n]`` indices of the rollout's
    sequences, from ``state.key``; with a leading seed axis on the key and the batch, each
    seed's rows those of its own key (the keys' hashes broadcast: no vmap needed)."""
    config = s.config
    steps, envs = batch.rewards.shape[-2:]
    num_seq = steps // s.seq_len * envs
    order = jr.permutations(jr.fold_in(state.key, 0), config.update_epochs, num_seq)
    return order.reshape(*order.shape[:-2], config.update_epochs * config.num_minibatches, -1)


def prepare(s: Setup, state: TrainState, batch: Batch, order: Tensor):
    """``(prepared rollout, statistics for the metrics, (params, opt_state) as flat groups)``.

    Advantages are normalised, and explained variance and mask statistics computed, over the
    finite steps of every process (``s.dp``). The statistics go to ``finish`` only.
    """
    config, dp, spec, hp, b = s.config, s.dp, s.config.spec, state.hparams, batch
    adv, returns = gae(
        b.rewards, b.values, b.next_values, b.terminated, b.truncated, hp.gamma, hp.gae_lambda
    )
    finite = torch.isfinite(adv) & torch.isfinite(returns) & torch.isfinite(b.obs).all(-1)
    adv = torch.where(finite, adv, 0.0)
    normed, explained = dp.advantage_stats(adv, returns, b.values, finite)
    op = b.actions[spec.op_head]
    causal = causal_masks(spec, op)
    per_step = {
        "obs": b.obs,
        "actions": b.actions,
        "masks": b.masks,
        "old_logprobs": b.logprobs,
        "old_values": b.values,
        "returns": returns,
        "advantages": per_head_advantages(normed if config.norm_adv else adv, causal),
        "causal": causal,
        "availability": entropy_floor_masks(spec, b.masks, op),
        "finite": finite,
        "episode_start": b.episode_start,
    }
    data = optree.tree_map(lambda x: _to_sequences(x, s.seq_len), per_step)
    # The LSTM's state at each sequence's start (for the MLP, the empty tuple that replaced None).
    hidden = optree.tree_map(lambda h: h[:: s.seq_len].flatten(0, 1), b.hidden)
    # Each minibatch's counts over every process: the denominators of its loss's means.
    available = {h: data["availability"][h] for h in config.entropy_floors()}
    masks = {"causal": data["causal"], "available": available}
    counts = dp.tree_sum(optree.tree_map(lambda m: m[:, order].sum((0, 2)), masks))
    heads = dp.mask_stats(mask_stats(spec, b.masks, op), op.numel())
    stats = {f"{k}/{h}": v for h, hs in heads.items() for k, v in hs._asdict().items()}
    stats = {"explained_variance": explained, **stats}
    groups = (flat.ravel(s.params, state.params), flat.ravel_tree(s.opt_state, state.opt_state))
    return Prepared(data, hidden, order, counts), stats, groups


def start(s: Setup, state: TrainState, groups: tuple) -> Carry:
    """The carry before the first step, derived from ``state.step``: a fresh tensor comes out
    of vmap expanded (stride 0), and the compiled step would recompile for the real layout."""
    zero = state.step * 0
    params, opt_state = groups
    stop_epoch = zero + s.config.update_epochs
    return Carry(params, opt_state, zero != 0, stop_epoch, zero.clone(), zero.clone())


# The prepared rollout's entries that ``loss_stats`` takes as they are.
_LOSS_INPUTS = ("old_logprobs", "old_values", "returns", "advantages", "causal", "availability")


def minibatch_step(s: Setup, carry: Carry, prep: Prepared, hp: Any, k: Tensor):
    """``(carry, metrics)`` after minibatch step ``k`` (epoch ``k // num_minibatches``).

    The gradient is the whole minibatch's, over its micro-batches and every process's part
    (``accumulate``), so the decisions read global values and the processes step alike. The
    step is applied (``metrics["applied"]``) when finite and the KL early stop has not fired.
    """
    config, dp, spec = s.config, s.dp, s.config.spec
    coefs = make_loss_coefs(config, hp)

    # index_select, not x[k]: a tensor index would be read on the host under compile.
    def row(x: Tensor) -> Tensor:
        return x.index_select(0, k.reshape(1)).squeeze(0)

    idx = row(prep.order)
    mb = optree.tree_map(lambda x: x[:, idx], prep.data)
    hidden = optree.tree_map(lambda h: h[idx], prep.hidden) if config.recurrent else None
    counts, steps = optree.tree_map(row, prep.counts), mb["returns"].numel() * dp.world_size
    whole = losses.LossCounts(steps, counts["causal"], counts["available"])

    def part_stats(groups: Any, part: dict, part_hidden: Any) -> tuple[losses.LossStats, Tensor]:
        params = flat.unravel(s.params, groups)
        out = policy_apply(params, config, part["obs"], part_hidden, part["episode_start"])
        logprobs, _ = factored_logprob(spec, out.logits, part["masks"], part["actions"])
        entropies = factored_entropy(spec, out.logits, part["masks"], part["actions"])
        given = {name: part[name] for name in _LOSS_INPUTS}
        stats = losses.loss_stats(
            logprobs, entropies=entropies, values=out.value, coefs=coefs, **given
        )
        checks = [torch.isfinite(lp).all() for lp in logprobs.values()]
        checks += [torch.isfinite(out.value).all(), part["finite"].all()]
        return stats, torch.stack(checks).all()

    n = config.grad_accum_steps
    parts = list(zip(split_tree(mb, n, 1), split_tree(hidden, n, 0), strict=True))
    grads, means, extremes, finite = accumulate(part_stats, carry.params, parts, whole, coefs, dp)
    info = losses.loss_info(losses.LossStats(whole, means, extremes), coefs)
    grad_norm = global_norm(grads)
    finite = finite & torch.isfinite(grad_norm)
    # KL is checked before the optimizer step (docs/design.md, KL before the step), per seed:
    # a stopped seed's later steps are masked, not skipped. Without a target hp.target_kl is
    # +inf and never fires (a sweep may give some seeds a target on a config that has none).
    too_far = info.approx_kl > KL_EARLY_STOP_FACTOR * hp.target_kl
    stop_now = carry.stopped | (finite & too_far)
    apply = finite & ~stop_now
    first_stop = stop_now & ~carry.stopped
    updates, new_opt = make_optimizer(config, hp).update(grads, carry.opt_state, carry.params)
    new_params = apply_updates(carry.params, updates)

    keep = functools.partial(torch.where, apply)  # keep(new, old)
    carry = Carry(
        params=optree.tree_map(keep, new_params, carry.params),
        opt_state=optree.tree_map(keep, new_opt, carry.opt_state),
        stopped=stop_now,
        stop_epoch=torch.where(first_stop, k // config.num_minibatches, carry.stop_epoch),
        applied=carry.applied + apply.long(),
        skipped=carry.skipped + (~finite).long(),
    )
    head_grads = flat.unravel(s.params, grads)["heads"]
    head_grad_norm = {
        # NaN where no step used the head: a 0 would pass for a real zero gradient.
        f"grad_norm/{h}": torch.where(whole.causal[h] > 0, global_norm(head_grads[h]), torch.nan)
        for h in spec.names
    }
    loss = losses.ppo_objective(means, whole, coefs)
    metrics = {
        "applied": apply,
        "mean": {"loss": loss, "grad_norm": grad_norm, **_averaged(info), **head_grad_norm},
        "max": {"ratio_max": extremes.max, **_per_head("ratio_max", extremes.head_max)},
        "min": {"ratio_min": extremes.min, **_per_head("ratio_min", extremes.head_min)},
    }
    return carry, metrics


def _per_head(name: str, heads: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{name}/{h}": v for h, v in heads.items()}


def _averaged(info: losses.LossInfo) -> dict[str, Tensor]:
    """The loss's metrics that ``finish`` averages over the applied steps, by name."""
    fields = ("policy_loss", "value_loss", "entropy", "entropy_floor_penalty", "approx_kl")
    out = {f: getattr(info, f) for f in (*fields, "clip_fraction")}
    out |= {f"ratio_{f}": v for f, v in info.ratio._asdict().items() if f not in ("min", "max")}
    names = "policy_loss", "entropy", "kl", "clip_fraction"
    heads = info.head_policy_loss, info.head_entropy, info.head_kl, info.head_clip_fraction
    for name, per_head in zip(names, heads, strict=True):
        out |= _per_head(name, per_head)
    return out


def finish(s: Setup, step: Tensor, key: Tensor, carry: Carry, stats: dict, metrics: dict):
    """``(params, opt_state, step, key, metrics)`` after the steps, whose metrics come stacked.

    Only the applied steps are reported (a refused or skipped step changed nothing):
    ``metrics["mean"]`` averaged over their finite values, ``"max"`` and ``"min"`` bounded on
    every process, NaN where none; ``step`` counts the update only if a step was applied.
    """
    applied = metrics["applied"]  # [steps]; the metrics are [steps] each, or stacked [n, steps]

    def mean(x: Tensor) -> Tensor:
        ok = applied & torch.isfinite(x)
        count = ok.sum(-1)
        average = torch.where(ok, x, 0.0).sum(-1) / count.clamp(min=1)
        return torch.where(count > 0, average, torch.nan)

    def bound(x: Tensor) -> Tensor:  # the largest over the applied steps, -inf where none
        return torch.where(applied, x, -torch.inf).amax(-1)

    out = stacked_tree_map(mean, metrics["mean"])
    top = stacked_tree_map(bound, metrics["max"])
    bottom = stacked_tree_map(lambda x: bound(-x), metrics["min"])
    # min(x) = -max(-x): one collective gives every process's maxima and minima.
    top, bottom = s.dp.tree_max((top, bottom))
    out |= optree.tree_map(lambda x: torch.where(x.isfinite(), x, torch.nan), top)
    out |= optree.tree_map(lambda x: torch.where(x.isfinite(), -x, torch.nan), bottom)
    heads = s.config.spec.names
    head_max, head_min = ({h: out[f"{m}/{h}"] for h in heads} for m in ("ratio_max", "ratio_min"))
    diag = losses.ratio_diagnostic(head_max, head_min, out["ratio_max"], out["ratio_min"])
    out |= {f"ratio_{f}": getattr(diag, f).float() for f in ("worst_head", "explosion", "collapse")}
    out |= {
        **stats,
        "stop_epoch": carry.stop_epoch.float(),
        "early_stopped": carry.stopped.float(),
        "updates_applied": carry.applied.float(),
        "nonfinite_skips": carry.skipped.float(),
        "minibatch_steps": torch.full_like(out["loss"], applied.shape[0]),
    }
    # Fresh tensors, not views of the groups: a view's storage offset would make every compiled
    # function that takes the state next (the rollout, the next update) compile again.
    params = optree.tree_map(torch.clone, flat.unravel(s.params, carry.params))
    opt_state = optree.tree_map(torch.clone, flat.unravel_tree(s.opt_state, carry.opt_state))
    counted = step + (carry.applied > 0).to(step.dtype)
    return params, opt_state, counted, jr.fold_in(key, 1), out


def make_update_fn(
    config: PPOConfig,
    *,
    num_seeds: int | None = None,
    compile_scope: str = "scan",
    backend: str | None = None,
    data_parallel: DataParallel | None = None,
    hparams: str = "config",
    compiler: CompileSettings | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Tensor]]]:
    """A pure ``update(state, batch) -> (state, metrics)`` for ``config``.

    The tensor hyperparameters (``config.TENSOR_HYPERPARAMS``) are read from ``state.hparams``
    only, so that seeds can differ and a schedule can change them without a recompile
    (``with_hparams``); every other field (``adam_eps``, ``value_clip``, ...) from ``config``.

    Args:
      config: the PPO configuration; ``config.compile`` compiles with ``fullgraph=True``.
      hparams: ``"config"`` (default): the state's tensor hyperparameters must equal the
        config's, checked on the host before every call (a ValueError names the first that
        differs); ``"state"``: the state's are used as they are, for a sweep (per-seed
        values) or a schedule that writes them between updates (``make_train``, ``PPOAgent``).
      num_seeds: S, the size of a leading seed axis of ``state`` and ``batch``, vmapped over.
      compile_scope: ``"scan"`` (default: the steps one scan looped in C++), ``"minibatch"``
        (a compiled step called from Python, 1.06-1.25x slower here: docs/design-notes.md)
        or ``"update"`` (the whole update as one graph); see ``funcppo.accel.scanning``.
      compiler: how ``config.compile`` compiles, a ``CompileSettings``; None: ``for_device``
        of the state's device at the first call. ``backend`` replaces its backend if given.
      data_parallel: a ``funcppo.training.distributed.DataParallel``: every process calls ``update``
        with the same state and its own batch of the same shape; each minibatch step is taken
        on the union of the processes' minibatch k, and every statistic is over all their
        steps, so the update equals that of one process given every batch (on every process).

    ``state.step`` advances by one when the update applied at least one minibatch step (a KL
    early stop after an applied step counts; an update whose every step was non-finite leaves
    the state as it was). The per-step metrics (loss, KL, clip fractions, ratios, entropies,
    gradient norms) average or bound the applied steps only; without one they are NaN and
    ``ratio_worst_head`` (an index in head order) -1. ``updates_applied``,
    ``nonfinite_skips``, ``early_stopped`` and ``stop_epoch`` count what happened.

    The returned function checks the state and the batch on the host first (``check_batch``):
    shapes, dtypes, devices, every action in range and allowed, the hyperparameters as above.
    """
    if hparams not in HPARAMS_SOURCES:
        raise ValueError(f"hparams: expected one of {HPARAMS_SOURCES}, got {hparams!r}")
    dp = SingleProcess() if data_parallel is None else data_parallel
    params = policy_init(jr.key(0), config)
    layout = flat.flat_layout(params, lambda path: "critic" if is_critic_path(path) else "actor")
    opt = make_optimizer(config, make_hyperparams(config, "cpu"))
    opt_layout = flat.tree_layout(layout, opt.init(params), opt.init(flat.ravel(layout, params)))
    s = Setup(config, dp, config.bptt_len if config.recurrent else 1, layout, opt_layout)
    pieces = (shuffle, prepare, start, minibatch_step, finish)
    pieces = UpdatePieces(*(functools.partial(piece, s) for piece in pieces))
    build = functools.partial(compose_update, pieces, config, compile_scope, num_seeds, dp)
    run = build(None)
    if config.compile:  # for the state's device, on the first call when no compiler is given
        run = per_device(build, compiler, backend, lambda state, _: state.key.device)
    checked = []

    def update(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Tensor]]:
        check_batch(config, state, batch, num_seeds, hparams=hparams)
        if not checked:  # unequal batches would make the processes' sums misalign
            dp.check_same_shapes(batch)
            checked.append(True)
        if batch.hidden is None:
            batch = batch._replace(hidden=())
        params, opt_state, step, key, metrics = run(state, batch)
        return state._replace(params=params, opt_state=opt_state, step=step, key=key), metrics

    return update
