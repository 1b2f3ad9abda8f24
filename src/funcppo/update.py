"""``make_update_fn(config)``: one pure PPO update over a rollout, compiled and vmappable.

The update is four pure pieces: ``shuffle`` (each epoch's minibatch order), ``prepare`` (GAE,
advantage normalisation, causal and availability masks, the rollout cut into sequences;
parameters and optimizer state packed into flat groups, ``funcppo.flat``), ``minibatch_step``
(one gradient step, gated by KL early stopping and by finiteness; with ``grad_accum_steps =
k > 1`` its gradient and metrics are accumulated exactly over k micro-batches of the
minibatch's sequences, one autograd graph at a time; its metrics come back as one vector) and
``finish`` (metrics; parameters unpacked). With ``compile_scope="update"`` they are composed
into one function and compiled as one graph (torch.compile unrolls the epoch and minibatch
loops); with ``"minibatch"`` ``prepare``, the step and ``finish`` are compiled once each and a
Python loop drives the step, which bounds compile time; with ``"scan"`` the steps run as one
compiled ``scan`` over the step index (the gradient is taken inside its body) and looped in
inductor's C++, one call per update with compile time as bounded as the step's (the default).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch._higher_order_ops.scan import scan
from torch.func import grad_and_value, vmap

from funcppo import random as jr
from funcppo.accumulation import (
    LossTotals,
    accumulate_grads,
    combine_infos,
    loss_totals,
    split_tree,
)
from funcppo.advantages import gae, normalize_advantages, per_head_advantages
from funcppo.compiling import (
    CompileSettings,
    compile_fn,
    fresh,
    per_device,
    scan_cacheable,
    scan_carry,
    unaliased,
)
from funcppo.config import PPOConfig
from funcppo.constants import ADV_STD_FLOOR, KL_EARLY_STOP_FACTOR
from funcppo.distributed import (
    DataParallel,
    check_same_shapes,
    replicated_mask_stats,
    replicated_moments,
    replicated_ratio_extremes,
    replicated_step,
)
from funcppo.distributions import factored_entropy, factored_logprob, mask_stats
from funcppo.flat import (
    FlatLayout,
    TreeLayout,
    flat_layout,
    index_tree,
    ravel,
    ravel_tree,
    tree_layout,
    unravel,
    unravel_tree,
)
from funcppo.losses import LossCoefs, LossInfo, RatioStats, masked_mean, ppo_loss, ratio_diagnostic
from funcppo.networks import policy_apply, policy_init
from funcppo.optim import apply_updates, global_norm, is_critic_path
from funcppo.spec import causal_masks, entropy_floor_masks
from funcppo.state import Batch, TrainState, make_hyperparams, make_optimizer
from funcppo.validation import HPARAMS_SOURCES, check_batch

__all__ = ["Prepared", "make_update_fn"]


class Prepared(NamedTuple):
    """The rollout as ``[L, N]`` sequences (L = bptt_len for the LSTM, 1 for the MLP).

    ``counts``: data parallel only, every minibatch's causal and availability counts summed
    over the processes, ``[update_epochs * num_minibatches]`` per head (else ``()``).
    """

    data: dict[str, Any]
    hidden: Any
    order: Tensor
    counts: Any = ()


class Layouts(NamedTuple):
    """The update's static layouts, computed once on the host.

    Inside the update, parameters and optimizer state live as flat groups (``funcppo.flat``),
    and each minibatch step returns its metrics as one vector whose columns follow ``info``
    (``columns``: that tree with each leaf's column index).
    """

    params: FlatLayout
    opt_state: TreeLayout
    info: optree.PyTreeSpec
    columns: Any


def _make_layouts(config: PPOConfig) -> Layouts:
    params = policy_init(jr.key(0), config)
    layout = flat_layout(params, lambda path: "critic" if is_critic_path(path) else "actor")
    opt = make_optimizer(config, make_hyperparams(config, "cpu"))
    opt_layout = tree_layout(layout, opt.init(params), opt.init(ravel(layout, params)))
    heads = dict.fromkeys(config.spec.names, 0)
    info = LossInfo(**{f: dict(heads) if f.startswith("head_") else 0 for f in LossInfo._fields})
    info = info._replace(ratio=RatioStats(*[0] * len(RatioStats._fields)))
    step_info = {"loss": 0, "info": info, "grad_norm": 0, "head_grad_norm": heads, "applied": 0}
    treedef = optree.tree_structure(step_info)
    return Layouts(layout, opt_layout, treedef, index_tree(treedef))


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


def _explained_variance(values: Tensor, returns: Tensor, weight: Tensor) -> Tensor:
    """``1 - Var[R - V] / Var[R]`` over weighted steps; NaN where ``Var[R] = 0`` (as CleanRL)."""
    w = weight.to(values.dtype)
    n = w.sum().clamp(min=1.0)

    def var(x: Tensor) -> Tensor:
        x = torch.where(weight, x, 0.0)
        mean = (x * w).sum() / n
        return ((x - mean) ** 2 * w).sum() / n

    var_r = var(returns)
    return torch.where(var_r > 0, 1.0 - var(returns - values) / var_r, torch.nan)


def _replicated_advantages(adv, returns, values, finite, dp: DataParallel):
    """Advantages normalised, and the explained variance, over every process's steps: the
    formulas of ``normalize_advantages`` and ``_explained_variance`` on global moments."""
    (mean, _, _), (var, var_r, var_e), total = replicated_moments(
        [adv, returns, returns - values], finite, dp
    )
    normed = (adv - mean) / var.clamp(min=ADV_STD_FLOOR**2).sqrt()
    explained = torch.where(var_r > 0, 1.0 - var_e / var_r, torch.nan)
    return torch.where(total > 0, normed, 0.0), explained


def _minibatch_counts(data: dict, order: Tensor, dp: DataParallel) -> dict:
    """Per minibatch (rows of ``order``) and head, causal and availability counts summed over
    the processes: the denominators of the global minibatch's loss."""
    counts = {
        name: {h: mask[:, order].sum((0, 2)) for h, mask in data[name].items()}
        for name in ("causal", "availability")
    }
    return dp.tree_sum(counts)


def _make_shuffle(config: PPOConfig) -> Callable[[TrainState, Batch], Tensor]:
    """``shuffle(state, batch)``: the minibatches of every epoch, ``[epochs * minibatches, n]``
    indices of the rollout's sequences, from ``state.key``; with a leading seed axis on the
    key and the batch (``[S, 2]``, ``[S, T, B]``), ``[S, epochs * minibatches, n]``, each seed's
    rows those of its own key.

    Run uncompiled in the minibatch scope: inductor inlines the hash of a hash of the key into
    one expression, and generating its code took 10-20 s of the compile for 0.3 ms of work.
    The keys' hashes broadcast over the seed axis, so the seeds need no vmap, whose dispatch
    over a hundred small integer ops cost 1.97 against 1.59 ms for 8 seeds.
    """
    seq_len = config.bptt_len if config.recurrent else 1
    rows = config.update_epochs * config.num_minibatches

    def shuffle(state: TrainState, batch: Batch) -> Tensor:
        steps, envs = batch.rewards.shape[-2:]
        num_seq = steps // seq_len * envs
        order = jr.permutations(jr.fold_in(state.key, 0), config.update_epochs, num_seq)
        return order.reshape(*order.shape[:-2], rows, -1)

    return shuffle


def _make_prepare(
    config: PPOConfig, layouts: Layouts, dp: DataParallel | None = None
) -> Callable[[TrainState, Batch, Tensor], tuple[Prepared, dict[str, Tensor], tuple]]:
    """``prepare(state, batch, order) -> (prepared rollout, statistics for the metrics,
    (params, opt_state) as flat groups)``; ``order`` from ``_make_shuffle``. The statistics
    go to ``finish`` only: the minibatch steps never see them."""
    spec = config.spec
    seq_len = config.bptt_len if config.recurrent else 1

    def prepare(state: TrainState, batch: Batch, order: Tensor):
        hp = state.hparams
        adv, returns = gae(
            batch.rewards,
            batch.values,
            batch.next_values,
            batch.terminated,
            batch.truncated,
            hp.gamma,
            hp.gae_lambda,
        )
        finite = torch.isfinite(adv) & torch.isfinite(returns) & torch.isfinite(batch.obs).all(-1)
        adv = torch.where(finite, adv, 0.0)
        if dp is not None:
            normed, explained = _replicated_advantages(adv, returns, batch.values, finite, dp)
            adv = normed if config.norm_adv else adv
        elif config.norm_adv:
            adv = normalize_advantages(adv, finite)
        op = batch.actions[spec.op_head]
        causal = causal_masks(spec, op)
        per_step = {
            "obs": batch.obs,
            "actions": batch.actions,
            "masks": batch.masks,
            "old_logprobs": batch.logprobs,
            "old_values": batch.values,
            "returns": returns,
            "advantages": per_head_advantages(adv, causal),
            "causal": causal,
            "availability": entropy_floor_masks(spec, batch.masks, op),
            "finite": finite,
            "episode_start": batch.episode_start,
        }
        data = optree.tree_map(lambda x: _to_sequences(x, seq_len), per_step)
        # An empty tuple, not None: torch's vmap rejects None inputs and outputs.
        hidden = ()
        if config.recurrent:
            hidden = optree.tree_map(lambda h: h[::seq_len].flatten(0, 1), batch.hidden)
        heads = mask_stats(spec, batch.masks, op)
        counts = ()
        if dp is None:
            explained = _explained_variance(batch.values, returns, finite)
        else:
            heads = replicated_mask_stats(heads, op.numel(), dp)
            counts = _minibatch_counts(data, order, dp)
        stats = {
            "explained_variance": explained,
            **{f"{k}/{h}": v for h, hs in heads.items() for k, v in hs._asdict().items()},
        }
        flat = (ravel(layouts.params, state.params), ravel_tree(layouts.opt_state, state.opt_state))
        return Prepared(data, hidden, order, counts), stats, flat

    return prepare


def _make_minibatch_step(config: PPOConfig, layouts: Layouts, dp: DataParallel | None = None):
    spec = config.spec
    accum = config.grad_accum_steps
    floors = config.entropy_floors()

    def forward(flat, mb, hidden):
        params = unravel(layouts.params, flat)
        out = policy_apply(config, params, mb["obs"], hidden, mb["episode_start"])
        new_logprobs, _ = factored_logprob(spec, out.logits, mb["masks"], mb["actions"])
        entropies = factored_entropy(spec, out.logits, mb["masks"], mb["actions"])
        return out.value, new_logprobs, entropies

    def loss_fn(params, mb, hidden, hp, totals):
        value, new_logprobs, entropies = forward(params, mb, hidden)
        coefs = LossCoefs(
            clip_coef=hp.clip_coef,
            vf_coef=hp.vf_coef,
            ent_coef=hp.ent_coef,
            head_ent_coef=config.head_ent_coefs(),
            clip_vloss=config.clip_vloss,
            value_clip=config.value_clip,
            entropy_floor=floors or None,
            entropy_floor_coef=config.entropy_floor_coef,
        )
        loss, info = ppo_loss(
            new_logprobs,
            mb["old_logprobs"],
            entropies,
            value,
            mb["old_values"],
            mb["returns"],
            mb["advantages"],
            mb["causal"],
            coefs,
            mb["availability"],
            totals=totals,
        )
        finite = torch.stack(
            [torch.isfinite(lp).all() for lp in new_logprobs.values()]
            + [torch.isfinite(value).all(), torch.isfinite(loss)]
        ).all()
        return loss, (info, finite)

    grad_fn = grad_and_value(loss_fn, has_aux=True)

    def floor_entropy(params, parts, totals):
        # No-grad pre-pass: the whole minibatch's mean entropy where each floored head was
        # available, at which every micro-batch linearises the (nonlinear) floor penalty.
        means = dict.fromkeys(floors, 0.0)
        with torch.no_grad():
            for mb, hidden in parts:
                _, _, entropies = forward(params, mb, hidden)
                for h in floors:
                    count = totals.availability_count[h]
                    means[h] = means[h] + masked_mean(entropies[h], mb["availability"][h], count)
        return means

    def accumulate(params, mb, hidden, hp, totals):
        """Gradient, loss, info and finiteness of the whole minibatch ``mb``, computed over
        ``accum`` micro-batches of its sequences one at a time, to bound memory. Data parallel,
        ``totals`` are the global minibatch's and the results this process's shares of it."""
        if accum == 1 and totals is None:
            grads, (loss, (info, finite)) = grad_fn(params, mb, hidden, hp, None)
            return grads, loss, info, finite
        parts = list(zip(split_tree(mb, accum, 1), split_tree(hidden, accum, 0), strict=True))
        if totals is None:
            totals = loss_totals(mb["causal"], mb["availability"])
        if floors:
            means = floor_entropy(params, parts, totals)
            means = means if dp is None else dp.tree_sum(means)
            totals = totals._replace(floor_entropy=means)
        grads, outs = accumulate_grads(grad_fn, params, parts, hp, totals)
        losses, infos, finites = zip(*[(loss, info, ok) for loss, (info, ok) in outs], strict=True)
        info = combine_infos(infos, [part["returns"].numel() for part, _ in parts])
        return grads, torch.stack(losses).sum(), info, torch.stack(finites).all()

    def minibatch_step(carry: Carry, prep: Prepared, hp, k: Tensor):
        # index_select, not order[k]: a tensor index would be read on the host under compile.
        idx = prep.order.index_select(0, k.reshape(1)).squeeze(0)
        epoch = k // config.num_minibatches
        mb = optree.tree_map(lambda x: x[:, idx], prep.data)
        hidden = optree.tree_map(lambda h: h[idx], prep.hidden) if config.recurrent else None
        totals = None
        if dp is not None:
            counts = optree.tree_map(lambda c: c.index_select(0, k.reshape(1))[0], prep.counts)
            n = mb["returns"].numel()
            totals = LossTotals(n * dp.world_size, counts["causal"], counts["availability"])
        grads, loss, info, finite = accumulate(carry.params, mb, hidden, hp, totals)
        finite = finite & mb["finite"].all()
        if dp is not None:
            # Every decision below (finiteness, KL stop) then reads global values, so the
            # processes take the same steps and their parameters stay equal.
            grads, loss, info, finite = replicated_step(
                dp, grads, loss, info, finite, 1 / dp.world_size
            )
        grad_norm = global_norm(grads)
        finite = finite & torch.isfinite(grad_norm)
        # KL is checked before the optimizer step, so a step that leaves the trust region is not
        # applied (docs/design.md, KL before the step). Per seed: a stopped seed's remaining
        # steps are masked, not skipped, so vmapped seeds stop independently.
        # Always in the graph: without a target hp.target_kl is +inf and never fires, and a
        # sweep may give some seeds a target on a config that has none.
        too_far = info.approx_kl > KL_EARLY_STOP_FACTOR * hp.target_kl
        stop_now = carry.stopped | (finite & too_far)
        apply = finite & ~stop_now
        updates, new_opt = make_optimizer(config, hp).update(grads, carry.opt_state, carry.params)
        new_params = apply_updates(carry.params, updates)

        def keep(new, old):
            return torch.where(apply, new, old)

        n_rel = {h: mb["causal"][h].sum() for h in spec.names} if dp is None else counts["causal"]
        head_grads = unravel(layouts.params, grads)["heads"]
        head_grad_norm = {
            # NaN where no step used the head: a 0 would pass for a real zero gradient.
            h: torch.where(n_rel[h] > 0, global_norm(head_grads[h]), torch.nan)
            for h in spec.names
        }
        carry = Carry(
            params=optree.tree_map(keep, new_params, carry.params),
            opt_state=optree.tree_map(keep, new_opt, carry.opt_state),
            stopped=stop_now,
            stop_epoch=torch.where(stop_now & ~carry.stopped, epoch, carry.stop_epoch),
            applied=carry.applied + apply.long(),
            skipped=carry.skipped + (~finite).long(),
        )
        step_info = {
            "loss": loss.detach(),
            "info": info,
            "grad_norm": grad_norm,
            "head_grad_norm": head_grad_norm,
            "applied": apply,
        }
        return carry, pack(step_info)

    def pack(step_info: dict) -> Tensor:
        """The step's metrics as one vector: one output of the compiled step, not dozens."""
        leaves = optree.tree_leaves(step_info)
        if not torch.compiler.is_compiling():
            treedef = optree.tree_structure(step_info)
            if treedef != layouts.info:
                raise AssertionError(f"step metrics {treedef} differ from layout {layouts.info}")
        dtype = step_info["loss"].dtype
        return torch.stack([x.to(dtype) for x in leaves])

    return minibatch_step


def _finish(
    config: PPOConfig,
    layouts: Layouts,
    step: Tensor,
    key: Tensor,
    carry: Carry,
    stats: dict[str, Tensor],
    infos: list[Tensor],
) -> tuple[dict[str, Any], Any, Tensor, Tensor, dict[str, Tensor]]:
    """``(params, opt_state, step, key, metrics)`` after the minibatch steps.

    The per-step metrics summarise the applied steps only: a step refused by the KL early stop
    or skipped as non-finite changed nothing, so it is not reported. Without an applied step
    they are NaN (``ratio_worst_head`` -1) and ``step`` stays where it was: an update that
    changed nothing is not a train step.

    It takes only what it reads: compiled, dynamo interprets vmap's walk over every leaf of
    the arguments and results in Python, which made this piece the slowest to trace.
    """
    # One row per minibatch step, one column per metric: every column reduced at once.
    rows = torch.stack(infos)
    cols = layouts.columns
    info = cols["info"]
    applied = (rows[:, cols["applied"]] != 0).unsqueeze(-1)
    # Means over the applied steps' finite entries; NaN where none.
    ok = applied & torch.isfinite(rows)
    count = ok.sum(0)
    mean = torch.where(ok, rows, 0.0).sum(0) / count.clamp(min=1)
    mean = torch.where(count > 0, mean, torch.nan)
    top = torch.where(applied, rows, -torch.inf).amax(0)
    bottom = torch.where(applied, rows, torch.inf).amin(0)
    named = {
        "loss": cols["loss"],
        "grad_norm": cols["grad_norm"],
        "policy_loss": info.policy_loss,
        "value_loss": info.value_loss,
        "entropy": info.entropy,
        "entropy_floor_penalty": info.entropy_floor_penalty,
        "approx_kl": info.approx_kl,
        "clip_fraction": info.clip_fraction,
        **{f"ratio_{k}": v for k, v in info.ratio._asdict().items()},
    }
    for name, heads in (
        ("policy_loss", info.head_policy_loss),
        ("entropy", info.head_entropy),
        ("kl", info.head_kl),
        ("clip_fraction", info.head_clip_fraction),
        ("grad_norm", cols["head_grad_norm"]),
    ):
        named.update({f"{name}/{h}": i for h, i in heads.items()})
    metrics = {k: mean[i] for k, i in named.items()}
    # NaN, never an infinite extreme, where no step was applied.
    ratio_max, ratio_min = top[info.ratio.max], bottom[info.ratio.min]
    metrics["ratio_max"] = torch.where(ratio_max.isfinite(), ratio_max, torch.nan)
    metrics["ratio_min"] = torch.where(ratio_min.isfinite(), ratio_min, torch.nan)
    head_max = {h: top[i] for h, i in info.head_ratio_max.items()}
    head_min = {h: bottom[i] for h, i in info.head_ratio_min.items()}
    for h in config.spec.names:
        # NaN where the head had no relevant step: a 1 would pass for a healthy ratio.
        metrics[f"ratio_max/{h}"] = torch.where(head_max[h].isfinite(), head_max[h], torch.nan)
        metrics[f"ratio_min/{h}"] = torch.where(head_min[h].isfinite(), head_min[h], torch.nan)
    diag = ratio_diagnostic(head_max, head_min, metrics["ratio_max"], metrics["ratio_min"])
    metrics["ratio_worst_head"] = diag.worst_head.float()
    metrics["ratio_explosion"] = diag.explosion.float()
    metrics["ratio_collapse"] = diag.collapse.float()
    metrics.update(stats)
    num_steps = config.update_epochs * config.num_minibatches
    metrics["stop_epoch"] = carry.stop_epoch.float()
    metrics["early_stopped"] = carry.stopped.float()
    metrics["updates_applied"] = carry.applied.float()
    metrics["nonfinite_skips"] = carry.skipped.float()
    metrics["minibatch_steps"] = torch.full_like(metrics["loss"], num_steps)
    # Fresh tensors, not views of the groups: a view's storage offset would make every compiled
    # function that takes the state next (the rollout, the next update) compile again.
    fresh = lambda tree: optree.tree_map(torch.clone, tree)  # noqa: E731
    params = fresh(unravel(layouts.params, carry.params))
    opt_state = fresh(unravel_tree(layouts.opt_state, carry.opt_state))
    counted = step + (carry.applied > 0).to(step.dtype)
    return params, opt_state, counted, jr.fold_in(key, 1), metrics


def _initial_carry(config: PPOConfig, state: TrainState, flat: tuple) -> Carry:
    # Derived from state.step, not created afresh: under vmap a fresh tensor comes out expanded
    # (stride 0), and the compiled minibatch step would then recompile for the real layout.
    zero = state.step * 0
    params, opt_state = flat
    return Carry(
        params=params,
        opt_state=opt_state,
        stopped=zero != 0,
        stop_epoch=zero + config.update_epochs,
        applied=zero.clone(),
        skipped=zero.clone(),
    )


_SCOPES = ("minibatch", "scan", "update")


def _scanned_steps(step: Callable, num_steps: int) -> Callable:
    """``steps(carry, prep, hparams) -> (carry, infos [num_steps, n])``: the minibatch steps as
    one ``scan`` over the step index, which inductor lowers to one loop (compile time does not
    grow with the number of steps; dynamo's guards run once per update, not once per step).

    The carry's parameter and moment vectors (its leaves shaped as a parameter group) are
    carried as they are; its other leaves (the optimizer's count, the stop flag and epoch, the
    counters) are packed into one vector per dtype (``scan_carry``), so that no two carries
    can be one buffer, which inductor's C++ loop needs (see ``compile_fn``). Packing the
    vectors too cost 0.91x on 8 seeds: a copy of every parameter and moment per step."""

    def steps(carry: Carry, prep: Prepared, hp: Any) -> tuple[Carry, Tensor]:
        leaves, spec = pytree.tree_flatten(carry)
        vectors = {tuple(v.shape) for v in carry.params.values()}
        pack, unpack = scan_carry(leaves, keep=lambda x: tuple(x.shape) in vectors)

        def body(c: list[Tensor], k: Tensor) -> tuple[list[Tensor], list[Tensor]]:
            new, info = step(pytree.tree_unflatten(unpack(c), spec), prep, hp, k)
            return pack(pytree.tree_leaves(new)), [info.clone()]

        ks = torch.arange(num_steps, device=carry.stopped.device)
        out, (infos,) = scan(body, pack(leaves), ks)
        return pytree.tree_unflatten(fresh(unpack(out)), spec), infos

    return steps


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

    The tensor hyperparameters (``config.TENSOR_HYPERPARAMS``: learning rate, entropy, clip and
    value coefficients, gamma, lambda, max grad norm, target KL) are read from
    ``state.hparams``, the one source of truth, so that seeds can differ and a schedule can
    change them without a recompile; every other field (``adam_eps``, ``value_clip``,
    ``weight_decay``, ...) comes from ``config``. ``funcppo.state.with_hparams`` changes them
    in a state.

    Args:
      config: the PPO configuration; ``config.compile`` compiles with ``fullgraph=True``.
      hparams: ``"config"`` (default): the state's tensor hyperparameters must equal the
        config's, checked on the host before every call (in the batch checks' one transfer);
        a ValueError names the first field that differs, the config's value and the state's.
        ``"state"``: the state's values are used as they are, for a sweep (per-seed values)
        or a schedule that writes ``state.hparams`` between updates (``make_train`` and
        ``PPOAgent`` pass it).
      num_seeds: when given, ``state`` and ``batch`` carry a leading seed axis of this size and
        the update is vmapped over it: S independent agents in one program.
      compile_scope: ``"scan"`` (default) compiles ``prepare`` and ``finish`` once each and
        the minibatch steps as one scan, looped in inductor's C++: one call and one guard
        check per update (data parallel and eager updates loop as ``"minibatch"``);
        ``"minibatch"`` compiles one minibatch step and calls it from a Python loop (1.06-1.25x
        slower here, MLP and LSTM, 1 and 8 seeds: benchmarks/RESULTS.md); ``"update"``
        compiles the whole update as one graph, with the epoch and minibatch loops unrolled
        (compile time grows with ``update_epochs * num_minibatches``).
      compiler: how ``config.compile`` compiles (``funcppo.compiling.CompileSettings``); None:
        ``CompileSettings.for_device`` of the device the state lives on, chosen at the first
        call (and again for a state on another kind of device).
      backend: when given, replaces the compiler's ``torch.compile`` backend (``"aot_eager"``
        traces without code generation).
      data_parallel: a ``funcppo.distributed.DataParallel``: every process calls ``update``
        with the same state and its own batch of the same shape, and each minibatch step is
        taken on the union of the processes' minibatch k (one all-reduce of the flattened
        gradients and metrics per step). Advantages are normalised, and explained variance and
        mask statistics computed, over all processes' steps, so the update equals that of one
        process given every batch (the result every process returns).

    ``state.step`` advances by one when the update applied at least one minibatch step: an
    update whose every step was skipped as non-finite leaves it unchanged, as it leaves the
    parameters and optimizer state (a KL early stop after an applied step counts). The
    per-step metrics (loss, KL, clip fractions, ratios, entropies, gradient norms) average or
    bound the applied steps only, never one refused by the KL stop; without an applied step
    they are NaN and ``ratio_worst_head`` (an index in head order) is -1. ``updates_applied``,
    ``nonfinite_skips``, ``early_stopped`` and ``stop_epoch`` count what happened.

    The returned function checks the state and the batch on the host before running
    (``funcppo.validation.check_batch``): shapes, dtypes, devices, every action in range and
    allowed by its mask, and the hyperparameters as above.
    """
    if compile_scope not in _SCOPES:
        raise ValueError(f"compile_scope: expected one of {_SCOPES}, got {compile_scope!r}")
    if hparams not in HPARAMS_SOURCES:
        raise ValueError(f"hparams: expected one of {HPARAMS_SOURCES}, got {hparams!r}")
    dp = data_parallel
    layouts = _make_layouts(config)
    shuffle = _make_shuffle(config)
    prepare = _make_prepare(config, layouts, dp)
    step = _make_minibatch_step(config, layouts, dp)
    num_steps = config.update_epochs * config.num_minibatches

    def finish(count, key, carry, stats, infos):
        return _finish(config, layouts, count, key, carry, stats, infos)

    def finished(state: TrainState, out: tuple) -> tuple[TrainState, dict[str, Tensor]]:
        params, opt_state, count, key, metrics = out
        return state._replace(params=params, opt_state=opt_state, step=count, key=key), metrics

    def drive(shuffle, prepare, step, finish):
        """The update from its pieces; the minibatch loop runs in Python."""

        def run(state: TrainState, batch: Batch):
            prep, stats, flat = prepare(state, batch, shuffle(state, batch))
            # Elementwise on state.step, so it needs neither vmap nor compile (and compiled, two
            # equal outputs could come back as one aliased buffer).
            carry = _initial_carry(config, state, flat)
            infos = []
            for k in range(num_steps):
                carry, info = step(carry, prep, state.hparams, torch.tensor(k))
                infos.append(info)
            if dp is not None:
                infos = replicated_ratio_extremes(infos, layouts.columns["info"], dp)
            return finished(state, finish(state.step, state.key, carry, stats, infos))

        return run

    def drive_scan(shuffle, prepare, steps, finish):
        """The update with its minibatch steps as one compiled ``steps`` call (a scan)."""

        def run(state: TrainState, batch: Batch):
            prep, stats, flat = prepare(state, batch, shuffle(state, batch))
            carry = _initial_carry(config, state, flat)
            # A scan's inputs may not alias (two heads' masks can share a buffer).
            with scan_cacheable():
                carry, infos = steps(*unaliased((carry, prep, state.hparams)))
            out = finish(state.step, state.key, carry, stats, list(infos.unbind(0)))
            return finished(state, out)

        return run

    def seeded(fn, in_dims=0):
        return fn if num_seeds is None else vmap(fn, in_dims=in_dims, randomness="error")

    def build(settings: CompileSettings | None) -> Callable:
        """The update from its pieces, compiled with ``settings`` (None: eager)."""
        if settings is not None and dp is not None:
            # Data parallel, the graphs hold collectives: they keep the Python wrapper.
            settings = settings.replace(cpp_wrapper=False)

        def wrap(fn, in_dims=0):
            fn = seeded(fn, in_dims)
            return fn if settings is None else compile_fn(fn, "update", settings)

        step_dims = (0, 0, 0, None)  # carry, prep, hparams per seed; the step index shared
        if compile_scope == "update":
            # One graph: compiling ``drive`` unrolls the minibatch loop.
            return wrap(drive(shuffle, prepare, step, finish))
        if compile_scope == "scan" and settings is not None and dp is None:
            steps = _scanned_steps(seeded(step, step_dims), num_steps)
            steps = compile_fn(steps, "update", settings)
            return drive_scan(shuffle, wrap(prepare), steps, wrap(finish))
        return drive(shuffle, wrap(prepare), wrap(step, step_dims), wrap(finish))

    if config.compile:
        run = per_device(build, compiler, backend, lambda state, batch: state.key.device)
    else:
        run = build(None)

    checked = []

    def update(state: TrainState, batch: Batch):
        check_batch(config, state, batch, num_seeds, hparams=hparams)
        if dp is not None and not checked:
            check_same_shapes(batch, dp)
            checked.append(True)
        if batch.hidden is None:
            batch = batch._replace(hidden=())
        return run(state, batch)

    return update
