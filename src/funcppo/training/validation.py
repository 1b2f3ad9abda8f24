"""Host-side checks at the update boundary, before any computation, outside compiled code.

First the static facts: shapes, dtypes and devices of the state and the batch. Then the values:
every action inside its head's range and allowed by its own mask (an op-conditioned head's at
the taken op's row), and, when the config's hyperparameters are the reference, the state's
tensor hyperparameters equal to them. The value checks cross to the host once, as one vector of
flags (one sync per update); only a failing check is looked at further. A bad input fails with
an error that names the argument (and the head), what was expected and what came.
"""

from __future__ import annotations

from collections.abc import Callable

import optree
import torch
from torch import Tensor

from funcppo.core.config import TENSOR_HYPERPARAMS, PPOConfig, check_hparam
from funcppo.core.networks import check_params
from funcppo.core.spec import resolve_masks

__all__ = ["HPARAMS_SOURCES", "check_batch"]

# Where the update's tensor hyperparameters are meant to come from (``make_update_fn``).
HPARAMS_SOURCES = ("config", "state")


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"{x.dtype} {tuple(x.shape)} on {x.device}"
    return type(x).__name__


def _check_tensor(name: str, x, shape: tuple, dtype_ok, dtype_name: str, device) -> None:
    if not isinstance(x, Tensor) or tuple(x.shape) != shape or not dtype_ok(x.dtype):
        raise ValueError(f"{name}: expected {dtype_name} {shape}, got {_describe(x)}")
    if x.device != device:
        raise ValueError(
            f"{name}: expected a tensor on {device} (the device of the train state), got one on "
            f"{x.device}; move the batch with .to({str(device)!r}) before calling update"
        )


def _is_bool(dtype: torch.dtype) -> bool:
    return dtype == torch.bool


def _is_int64(dtype: torch.dtype) -> bool:
    return dtype == torch.int64


def _first_index(bad: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.nonzero(bad)[0])


def _show_pair(want: float, have: float | list[float]) -> tuple[str, str]:
    """A config value and the state's (one or a list) to 6 significant digits, or to 9 where
    6 would make them read alike."""
    haves = have if isinstance(have, list) else [have]
    digits = 9 if {f"{v:.6g}" for v in haves} == {f"{want:.6g}"} else 6
    text = ", ".join(f"{v:.{digits}g}" for v in haves)
    return f"{want:.{digits}g}", text if not isinstance(have, list) else f"[{text}]"


def check_batch(
    config: PPOConfig, state, batch, num_seeds: int | None = None, *, hparams: str = "state"
) -> None:
    """Raise ValueError unless ``state`` and ``batch`` fit ``config`` (and ``num_seeds``).

    Floats are the parameters' dtype, actions int64, flags bool; every action lies in
    ``[0, size)`` and its mask allows it, for every head, whether or not the taken op uses the
    head (the rollout samples every head from its mask). With ``hparams="config"``, the
    state's tensor hyperparameters (``state.hparams``) must also equal the config's; with
    ``"state"`` they are the state's to choose. The value checks cost one device-to-host
    transfer.
    """
    if hparams not in HPARAMS_SOURCES:
        raise ValueError(f"hparams: expected one of {HPARAMS_SOURCES}, got {hparams!r}")
    lead = () if num_seeds is None else (num_seeds,)
    _check_state(config, state, lead, num_seeds)
    _check_static(config, state, batch, lead)
    checks = _value_checks(config, state, batch, hparams == "config")
    flags = torch.stack([bad for bad, _ in checks]).tolist()  # the one transfer
    for flag, (_, fail) in zip(flags, checks, strict=True):
        if flag:
            fail()


def _check_state(config: PPOConfig, state, lead: tuple, num_seeds: int | None) -> None:
    device = state.step.device
    if tuple(state.step.shape) != lead:
        raise ValueError(
            f"state: expected {'an unbatched state' if not lead else f'{num_seeds} stacked states'}"
            f" (step of shape {lead}), got step of shape {tuple(state.step.shape)}"
        )
    check_params(state.params, config, batch_dims=len(lead))
    for path, leaf in zip(*optree.tree_flatten_with_path(state)[:2], strict=True):
        if isinstance(leaf, Tensor) and leaf.device != device:
            raise ValueError(f"state{path}: expected a tensor on {device}, got {leaf.device}")
    for name in TENSOR_HYPERPARAMS:
        x = getattr(state.hparams, name)
        if not isinstance(x, Tensor) or tuple(x.shape) != lead or not x.is_floating_point():
            raise ValueError(f"state.hparams.{name}: expected float {lead}, got {_describe(x)}")


def _check_static(config: PPOConfig, state, batch, lead: tuple) -> None:
    spec = config.spec
    device = state.step.device
    # The network's dtype: a float64 observation would meet float32 weights in a matmul.
    dtype = optree.tree_leaves(state.params)[0].dtype
    dtype_name = str(dtype).removeprefix("torch.")

    def check_float(name: str, x, shape: tuple) -> None:
        _check_tensor(name, x, shape, lambda d: d == dtype, dtype_name, device)

    obs = batch.obs
    if not isinstance(obs, Tensor) or obs.ndim != len(lead) + 3:
        raise ValueError(
            f"batch.obs: expected {dtype_name} {(*lead, 'T', 'B', config.obs_dim)}, "
            f"got {_describe(obs)}"
        )
    t, b = obs.shape[len(lead)], obs.shape[len(lead) + 1]
    tb = (*lead, t, b)
    check_float("batch.obs", obs, (*tb, config.obs_dim))
    seq_len = config.bptt_len if config.recurrent else 1
    if t % seq_len:
        raise ValueError(
            f"batch.obs: rollout length T={t} must be a multiple of config.bptt_len={seq_len}"
        )
    num_seq = (t // seq_len) * b
    if num_seq % config.num_minibatches:
        raise ValueError(
            f"batch.obs: {num_seq} sequences (T/bptt_len * B) must divide evenly into "
            f"config.num_minibatches={config.num_minibatches}"
        )
    per_minibatch = num_seq // config.num_minibatches
    if per_minibatch % config.grad_accum_steps:
        raise ValueError(
            f"config.grad_accum_steps: expected a divisor of the {per_minibatch} sequences per "
            f"minibatch (T/bptt_len * B / num_minibatches), got {config.grad_accum_steps}"
        )
    for field in ("actions", "masks", "logprobs"):
        heads = getattr(batch, field)
        if not isinstance(heads, dict) or set(heads) != set(spec.names):
            got = sorted(heads) if isinstance(heads, dict) else type(heads).__name__
            raise ValueError(f"batch.{field}: expected a dict over heads {spec.names}, got {got}")
    for name, size in spec.heads:
        _check_tensor(
            f"batch.actions[{name!r}]", batch.actions[name], tb, _is_int64, "int64", device
        )
        mask_shape = (*tb, spec.n_ops, size) if name in spec.op_conditioned else (*tb, size)
        _check_tensor(
            f"batch.masks[{name!r}]", batch.masks[name], mask_shape, _is_bool, "bool", device
        )
        check_float(f"batch.logprobs[{name!r}]", batch.logprobs[name], tb)
    for field in ("values", "next_values", "rewards"):
        check_float(f"batch.{field}", getattr(batch, field), tb)
    for field in ("terminated", "truncated", "episode_start"):
        _check_tensor(f"batch.{field}", getattr(batch, field), tb, _is_bool, "bool", device)
    hidden = batch.hidden
    if not config.recurrent:
        if hidden is not None:
            raise ValueError(
                f"batch.hidden: expected None for an MLP config, got {type(hidden).__name__}"
            )
        return
    if not isinstance(hidden, tuple) or len(hidden) != 2:
        raise ValueError(
            f"batch.hidden: expected LSTMState(h, c) of {(*tb, config.lstm_size)}, "
            f"got {type(hidden).__name__}"
        )
    for part, x in zip("hc", hidden, strict=True):
        check_float(f"batch.hidden.{part}", x, (*tb, config.lstm_size))


Check = tuple[Tensor, Callable[[], None]]


def _value_checks(config: PPOConfig, state, batch, against_config: bool) -> list[Check]:
    """``(bad, fail)`` pairs in the order their errors take precedence: ``bad`` a 0-d bool
    tensor, ``fail()`` raising the error that describes it."""
    spec = config.spec
    checks: list[Check] = []
    in_range = {}
    for name, size in spec.heads:
        a = batch.actions[name]
        in_range[name] = (a >= 0) & (a < size)

        def fail_range(name=name, size=size, a=a) -> None:
            where = _first_index(~in_range[name])
            raise ValueError(
                f"batch.actions[{name!r}]: expected values in [0, {size}), got {int(a[where])} "
                f"at index {where}"
            )

        checks.append((~in_range[name].all(), fail_range))
    op = batch.actions[spec.op_head]
    resolved = resolve_masks(spec, batch.masks, op)
    for name, size in spec.heads:
        a = batch.actions[name]
        taken = a.clamp(0, size - 1).unsqueeze(-1)
        forbidden = in_range[name] & ~resolved[name].gather(-1, taken).squeeze(-1)

        def fail_mask(name=name, a=a, forbidden=forbidden) -> None:
            where = _first_index(forbidden)
            row = ""
            if name in spec.op_conditioned:
                o = int(op[where])
                label = f" ({spec.op_names[o]})" if spec.op_names else ""
                row = f" in the row of the taken op {o}{label}"
            raise ValueError(
                f"batch.actions[{name!r}]: expected actions that batch.masks[{name!r}] allows, "
                f"got {int(a[where])} at index {where}, which it forbids{row}"
            )

        checks.append((forbidden.any(), fail_mask))
    if against_config:
        for name in TENSOR_HYPERPARAMS:
            have = getattr(state.hparams, name)
            want = check_hparam(name, getattr(config, name))
            differs = have != torch.tensor(want, dtype=have.dtype, device=have.device)

            def fail_hparam(name=name, have=have, want=want) -> None:
                expected, got = _show_pair(want, have.tolist())
                note = " is None: no target" if getattr(config, name) is None else ""
                raise ValueError(
                    f"state.hparams.{name}: expected {expected} (config.{name}{note}), got "
                    f"{got} in the state. The update trains with the state's "
                    f"hyperparameters: give the state the config's value with "
                    f"with_hparams(state, {name}=...), or pass hparams='state' to make_update_fn "
                    f"to train with the state's values on purpose (a sweep, a schedule)"
                )

            checks.append((differs.any(), fail_hparam))
    return checks
