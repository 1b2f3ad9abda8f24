"""Actor-critic networks as pure functions over a nested dict of tensors.

Layout (every weight ``w`` is ``[in, out]``, applied as ``x @ w + b``)::

    {"torso":  {"w0", "b0", "w1", "b1", ...},          # hidden layers (actor; critic too if shared)
     "lstm":   {"w_ih", "w_hh", "b"},                   # recurrent only
     "critic": {"w0", "b0", ...},                       # MLP without shared_torso only
     "heads":  {head_name: {"w", "b"}},                 # one logit layer per action head
     "value":  {"w", "b"}}

Weight decay applies to leaves under the top-level keys "critic" and "value" only (on the actor
it kills exploration), so those names are part of the interface. The recurrent policy shares
torso and LSTM between actor and critic (CleanRL ``ppo_atari_lstm``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from funcppo.core.config import PPOConfig
from funcppo.core.random import fold_in, normal, split

__all__ = [
    "LSTMState",
    "PolicyOutput",
    "check_params",
    "init_hidden",
    "lstm_scan",
    "make_policy_apply",
    "orthogonal",
    "policy_apply",
    "policy_init",
]

Params = dict[str, Any]

HIDDEN_GAIN = math.sqrt(2.0)
POLICY_GAIN = 0.01
VALUE_GAIN = 1.0
LSTM_GAIN = 1.0


class LSTMState(NamedTuple):
    """LSTM carry: ``h`` and ``c``, each ``[B, lstm_size]``."""

    h: Tensor
    c: Tensor


class PolicyOutput(NamedTuple):
    """Logits per head ``[B, n]``/``[T, B, n]``, value ``[B]``/``[T, B]``, next hidden state."""

    logits: dict[str, Tensor]
    value: Tensor
    hidden: LSTMState | None


def orthogonal(
    key: Tensor, shape: tuple[int, int], gain: float, dtype: torch.dtype = torch.float32
) -> Tensor:
    """A ``[rows, cols]`` matrix with orthonormal columns (tall) or rows (wide), times ``gain``.

    As ``torch.nn.init.orthogonal_`` (Saxe et al. 2014): QR of a Gaussian matrix, with the signs
    of Q's columns fixed by the diagonal of R so Q is uniform over the orthogonal group.
    """
    rows, cols = shape
    gauss = normal(key, (max(rows, cols), min(rows, cols)), dtype)
    q, r = torch.linalg.qr(gauss)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    # Row-major strides, even on a size-1 axis (which is_contiguous ignores): QR's column-major
    # Q gives a [n, 1] weight a stride no update reproduces, and compiled functions guard on
    # strides, so the second call would compile again.
    return (gain * (q.mT if rows < cols else q)).contiguous().view(-1).view(rows, cols)


def _linear(key: Tensor, n_in: int, n_out: int, gain: float, dtype: torch.dtype) -> Params:
    w = orthogonal(key, (n_in, n_out), gain, dtype)
    return {"w": w, "b": torch.zeros(n_out, dtype=dtype, device=key.device)}


def _mlp_init(key: Tensor, n_in: int, sizes: tuple[int, ...], dtype: torch.dtype) -> Params:
    layers: Params = {}
    for i, n_out in enumerate(sizes):
        layer = _linear(fold_in(key, i), n_in, n_out, HIDDEN_GAIN, dtype)
        layers[f"w{i}"], layers[f"b{i}"] = layer["w"], layer["b"]
        n_in = n_out
    return layers


def _torso_out(config: PPOConfig) -> int:
    return config.torso_sizes[-1] if config.torso_sizes else config.obs_dim


def _feature_dim(config: PPOConfig) -> int:
    return config.lstm_size if config.recurrent else _torso_out(config)


def policy_init(key: Tensor, config: PPOConfig, dtype: torch.dtype = torch.float32) -> Params:
    """Parameters for ``config`` on ``key.device``, a pure function of ``key``.

    Orthogonal weights (CleanRL ``layer_init``): gain sqrt(2) for hidden layers, 0.01 for the
    policy heads, 1.0 for the value head and the LSTM; biases 0 except the LSTM forget gate, 1.
    """
    k_torso, k_lstm, k_critic, k_heads, k_value = split(key, 5).unbind(-2)
    feat, hidden = _feature_dim(config), config.lstm_size
    params: Params = {"torso": _mlp_init(k_torso, config.obs_dim, config.torso_sizes, dtype)}
    if config.recurrent:
        zeros = torch.zeros(hidden, dtype=dtype, device=key.device)
        params["lstm"] = {
            "w_ih": orthogonal(
                fold_in(k_lstm, 0), (_torso_out(config), 4 * hidden), LSTM_GAIN, dtype
            ),
            "w_hh": orthogonal(fold_in(k_lstm, 1), (hidden, 4 * hidden), LSTM_GAIN, dtype),
            "b": torch.cat([zeros, torch.ones_like(zeros), zeros, zeros]),
        }
    elif not config.shared_torso:
        params["critic"] = _mlp_init(k_critic, config.obs_dim, config.torso_sizes, dtype)
    params["heads"] = {
        name: _linear(fold_in(k_heads, i), feat, size, POLICY_GAIN, dtype)
        for i, (name, size) in enumerate(config.spec.heads)
    }
    params["value"] = _linear(k_value, feat, 1, VALUE_GAIN, dtype)
    return params


def init_hidden(
    config: PPOConfig,
    batch_shape: int | tuple[int, ...],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> LSTMState | None:
    """Zero LSTM state ``[*batch_shape, lstm_size]``; ``None`` for an MLP config."""
    if not config.recurrent:
        return None
    shape = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
    zeros = torch.zeros(*shape, config.lstm_size, dtype=dtype, device=device)
    return LSTMState(zeros, zeros.clone())


def lstm_scan(
    lstm: Mapping[str, Tensor], x: Tensor, state: LSTMState, episode_start: Tensor
) -> tuple[Tensor, LSTMState]:
    """Run the LSTM over ``x`` ``[T, B, in]``; returns outputs ``[T, B, H]`` and the last state.

    Gates in ``torch.nn.LSTM`` order (i, f, g, o), one bias ``b`` (= b_ih + b_hh)::

        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g),   h_t = sigmoid(o) * tanh(c_t)

    Where ``episode_start[t]`` ``[B]`` is True, the carried state is replaced by zeros before
    step t (torch.where, so no in-place write). The input projection is one matmul for all steps;
    only the recurrence is a Python loop, unrolled over the static T.
    """
    projected = x @ lstm["w_ih"] + lstm["b"]
    h, c = state
    outputs = []
    for t in range(x.shape[0]):
        keep = ~episode_start[t].unsqueeze(-1)
        h = torch.where(keep, h, 0.0)
        c = torch.where(keep, c, 0.0)
        i, f, g, o = (projected[t] + h @ lstm["w_hh"]).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs), LSTMState(h, c)


def _act(activation: str) -> Callable[[Tensor], Tensor]:
    return torch.tanh if activation == "tanh" else torch.relu


def _mlp(layers: Mapping[str, Tensor], x: Tensor, n: int, activation: str) -> Tensor:
    for i in range(n):
        x = _act(activation)(x @ layers[f"w{i}"] + layers[f"b{i}"])
    return x


def _mlp_pair(
    actor: Mapping[str, Tensor], critic: Mapping[str, Tensor], x: Tensor, n: int, activation: str
) -> tuple[Tensor, Tensor]:
    """Two MLPs on the same input, their first layers as one matmul (fewer, larger kernels:
    the same numbers as two ``_mlp`` calls)."""
    if n == 0:
        return x, x
    first = x @ torch.cat([actor["w0"], critic["w0"]], -1)
    first = first + torch.cat([actor["b0"], critic["b0"]])
    a, c = _act(activation)(first).split([actor["b0"].shape[-1], critic["b0"].shape[-1]], -1)
    for i in range(1, n):
        a = _act(activation)(a @ actor[f"w{i}"] + actor[f"b{i}"])
        c = _act(activation)(c @ critic[f"w{i}"] + critic[f"b{i}"])
    return a, c


def _linears(layers: list[Mapping[str, Tensor]], x: Tensor) -> list[Tensor]:
    """``x @ w + b`` for each layer on the same input ``x``, as one matmul."""
    w = torch.cat([layer["w"] for layer in layers], -1)
    b = torch.cat([layer["b"] for layer in layers])
    return list((x @ w + b).split([layer["b"].shape[-1] for layer in layers], -1))


def _describe(x: Any) -> str:
    """``"torch.bool (3, 4)"`` for a tensor, else the type's name (error messages only)."""
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _check_inputs(
    config: PPOConfig, obs: Tensor, hidden: LSTMState | None, episode_start: Tensor | None
) -> None:
    """Static checks only (shapes, dtypes): safe under vmap and compile."""
    shape = obs.shape[:-1] if isinstance(obs, Tensor) else None
    if shape is None or obs.ndim not in (2, 3) or obs.shape[-1] != config.obs_dim:
        dim = config.obs_dim
        raise ValueError(f"obs: expected [B, {dim}] or [T, B, {dim}], got {_describe(obs)}")
    if config.recurrent and episode_start is None:
        raise ValueError("episode_start: expected a bool tensor for a recurrent config, got None")
    if episode_start is not None and (
        not isinstance(episode_start, Tensor)
        or episode_start.dtype != torch.bool
        or episode_start.shape != shape
    ):
        raise ValueError(
            f"episode_start: expected torch.bool {tuple(shape)}, got {_describe(episode_start)}"
        )
    if not config.recurrent and hidden is not None:
        raise ValueError(
            f"hidden: expected None (config.recurrent is False), got {_describe(hidden)}"
        )
    want = (shape[-1], config.lstm_size)
    parts = tuple(hidden) if isinstance(hidden, tuple) else (hidden,)
    if hidden is not None and (
        len(parts) != 2 or any(not isinstance(p, Tensor) or p.shape != want for p in parts)
    ):
        raise ValueError(
            f"hidden: expected LSTMState(h, c), each of shape {want} (batch, lstm_size), "
            f"got {[_describe(p) for p in parts]}"
        )


def policy_apply(
    params: Params,
    config: PPOConfig,
    obs: Tensor,
    hidden: LSTMState | None = None,
    episode_start: Tensor | None = None,
) -> PolicyOutput:
    """Logits, value and next hidden state for one step ``[B, obs_dim]`` or a time-major
    sequence ``[T, B, obs_dim]``.

    ``episode_start`` is bool ``[B]``/``[T, B]``: True where that step's observation starts an
    episode (the LSTM state is zeroed before it). An MLP config ignores it (None allowed) and
    returns ``hidden=None``; a recurrent config with ``hidden=None`` starts from zeros.
    """
    _check_inputs(config, obs, hidden, episode_start)
    n_layers = len(config.torso_sizes)
    if not config.recurrent and not config.shared_torso:
        actor, critic = _mlp_pair(
            params["torso"], params["critic"], obs, n_layers, config.activation
        )
    else:
        x = _mlp(params["torso"], obs, n_layers, config.activation)
    if config.recurrent:
        step = obs.ndim == 2
        if hidden is None:
            hidden = init_hidden(config, obs.shape[-2], obs.device, obs.dtype)
        seq, starts = (x.unsqueeze(0), episode_start.unsqueeze(0)) if step else (x, episode_start)
        out, hidden = lstm_scan(params["lstm"], seq, hidden, starts)
        actor = critic = out.squeeze(0) if step else out
    elif config.shared_torso:
        actor = critic = x
    # Every head, and the value where it reads the actor's features, in one matmul.
    names = config.spec.names
    heads = [params["heads"][name] for name in names]
    if config.recurrent or config.shared_torso:
        *head_out, value = _linears([*heads, params["value"]], actor)
    else:
        head_out = _linears(heads, actor)
        value = critic @ params["value"]["w"] + params["value"]["b"]
    return PolicyOutput(dict(zip(names, head_out, strict=True)), value.squeeze(-1), hidden)


def make_policy_apply(
    config: PPOConfig,
) -> Callable[[Params, Tensor, LSTMState | None, Tensor | None], PolicyOutput]:
    """``policy_apply`` with ``config`` closed over: ``(params, obs, hidden, episode_start)``."""

    def apply(
        params: Params, obs: Tensor, hidden: LSTMState | None, episode_start: Tensor | None
    ) -> PolicyOutput:
        return policy_apply(params, config, obs, hidden, episode_start)

    return apply


def _layout(config: PPOConfig) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
    """Expected shape of every leaf, with the config fields that set it."""
    layout: dict[tuple[str, ...], tuple[tuple[int, ...], str]] = {}

    def mlp(group: str) -> None:
        n_in, src = config.obs_dim, "obs_dim"
        for i, size in enumerate(config.torso_sizes):
            here = f"torso_sizes[{i}]"
            layout[(group, f"w{i}")] = ((n_in, size), f"{src}, {here}")
            layout[(group, f"b{i}")] = ((size,), here)
            n_in, src = size, here

    mlp("torso")
    torso_src = f"torso_sizes[{len(config.torso_sizes) - 1}]" if config.torso_sizes else "obs_dim"
    feat, feat_src = _feature_dim(config), torso_src
    if config.recurrent:
        gates = 4 * config.lstm_size
        layout[("lstm", "w_ih")] = ((_torso_out(config), gates), f"{torso_src}, 4 * lstm_size")
        layout[("lstm", "w_hh")] = ((config.lstm_size, gates), "lstm_size, 4 * lstm_size")
        layout[("lstm", "b")] = ((gates,), "4 * lstm_size")
        feat_src = "lstm_size"
    elif not config.shared_torso:
        mlp("critic")
    for name, size in config.spec.heads:
        layout[("heads", name, "w")] = ((feat, size), f"{feat_src}, spec head {name!r}")
        layout[("heads", name, "b")] = ((size,), f"spec head {name!r}")
    layout[("value", "w")] = ((feat, 1), f"{feat_src}, 1")
    layout[("value", "b")] = ((1,), "1")
    return layout


def _leaves(tree: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if not isinstance(tree, Mapping):
        return {path: tree}
    out: dict[tuple[str, ...], Any] = {}
    for k, v in tree.items():
        out.update(_leaves(v, (*path, str(k))))
    return out


def check_params(params: Params, config: PPOConfig, batch_dims: int = 0) -> None:
    """Host-side check that ``params`` match ``config``: fail early, not in a compiled graph.

    ``batch_dims`` leading axes (e.g. a stacked seed axis) are allowed on every leaf. Raises
    ValueError naming the leaf, the config fields behind its expected shape, and what came.
    """
    expected, actual = _layout(config), _leaves(params)
    extra = sorted(actual.keys() - expected.keys())
    if extra:
        raise ValueError(
            f"params{''.join(f'[{p!r}]' for p in extra[0])}: unexpected for this config "
            f"(recurrent={config.recurrent}, shared_torso={config.shared_torso}, "
            f"torso_sizes={config.torso_sizes}, heads={config.spec.names})"
        )
    for path, (shape, fields) in expected.items():
        name = "params" + "".join(f"[{p!r}]" for p in path)
        if path not in actual:
            raise ValueError(f"{name}: missing; expected a tensor of shape {shape} ({fields})")
        leaf = actual[path]
        if not isinstance(leaf, Tensor) or not leaf.is_floating_point():
            got = leaf.dtype if isinstance(leaf, Tensor) else type(leaf).__name__
            raise ValueError(f"{name}: expected a floating tensor, got {got}")
        if leaf.ndim != batch_dims + len(shape) or tuple(leaf.shape[batch_dims:]) != shape:
            raise ValueError(
                f"{name}: expected shape {shape} ({fields}) after {batch_dims} batch dims, "
                f"got {tuple(leaf.shape)}"
            )
