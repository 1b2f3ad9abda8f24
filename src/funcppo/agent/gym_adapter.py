"""Gymnasium environments, single or vector, as batches of tensors for ``PPOAgent.collect``.

Action spaces: ``Discrete(n)`` becomes one head ``"action"``; ``MultiDiscrete(nvec)`` becomes
heads ``"a0", "a1", ...``, with ``a0`` the op head and every head causally relevant to every
op (nothing in the space says otherwise). Any other action space is refused, naming it: the
heads are categorical, so continuous (``Box``) actions have no encoding. Observations are
encoded as Stable-Baselines3 encodes them (``funcppo.agent.gym_spaces``: ``Box`` flattened, one-hots
for ``Discrete`` and ``MultiDiscrete``, ``MultiBinary`` as floats, ``Dict`` and ``Tuple``
concatenated); ``obs_dim`` is the encoded size. One that does not fit its space is a
ValueError naming the env, the part and both shapes.

Masks follow sb3-contrib's MaskablePPO, so environments written for it work unchanged: from
``info["action_mask"]`` when the env reports one, else from an ``action_masks()`` method, else
all actions are valid. A mask is one flat bool vector of length ``sum(nvec)`` (``n`` for
``Discrete``); a tuple of per-component vectors (gymnasium's ``MultiDiscrete.sample`` form)
is accepted too. ``head_masks`` turns such a mask into the agent's per-head masks, for
``PPOAgent.predict`` outside the adapter.

Episode ends: a single env is reset here, and a vector env resets itself in one of gymnasium
1.x's autoreset modes. SAME_STEP reports the last observation in ``info["final_obs"]``.
NEXT_STEP (the default) returns the last observation as ``obs`` and resets on the next
``step``, ignoring its action: the step that ends an episode says so in
``EnvStep.next_valid``, and the ignored one comes back with ``valid=False``, so the agent
neither trains on it nor counts its observation in its statistics. Either way a truncated step
bootstraps from the last observation (``EnvStep.final_obs``). DISABLED is refused.

Actions: ``env_action`` turns the agent's head -> int actions (batched, or one observation's
from ``PPOAgent.predict``) into the action space's own values, ``start`` offsets added; the
adapter's ``step`` goes through it too.

gymnasium is an optional dependency (``pip install funcppo[gym]``), imported when an adapter
is made.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from funcppo.agent.checks import describe
from funcppo.agent.gym_spaces import ObsError, make_obs_encoder
from funcppo.agent.rollout import EnvStep
from funcppo.core.spec import ActionSpec
from funcppo.envs.base import check_actions

__all__ = ["GymAdapter", "env_action", "gym_action_spec", "head_masks", "require_gymnasium"]


def require_gymnasium():
    """The gymnasium module, imported on first use: an ImportError that says how to install
    it where it is missing (gymnasium is an optional dependency)."""
    try:
        import gymnasium
    except ImportError as err:
        raise ImportError(
            "funcppo.agent.gym_adapter needs gymnasium>=1.0: pip install 'funcppo[gym]'"
        ) from err
    return gymnasium


def _action_layout(space: Any) -> tuple[ActionSpec, np.ndarray, np.ndarray]:
    gym = require_gymnasium()
    if isinstance(space, gym.spaces.Discrete):
        n = int(space.n)
        return ActionSpec({"action": n}, "action", [()] * n), np.array([n]), np.array([space.start])
    if isinstance(space, gym.spaces.MultiDiscrete) and space.nvec.ndim == 1:
        nvec = space.nvec.astype(np.int64)
        names = [f"a{i}" for i in range(len(nvec))]
        heads = dict(zip(names, nvec.tolist(), strict=True))
        spec = ActionSpec(heads, "a0", [names] * int(nvec[0]))
        return spec, nvec, np.broadcast_to(np.asarray(space.start), nvec.shape).astype(np.int64)
    raise ValueError(
        f"action_space: expected Discrete or MultiDiscrete, got {space!r}; {_why(gym, space)}"
    )


def _why(gym: Any, space: Any) -> str:
    """What to do about an action space that has no categorical heads."""
    spaces = gym.spaces
    if isinstance(space, spaces.Box):
        return (
            "funcppo's heads are categorical, so continuous actions are not supported "
            "(gymnasium.wrappers.DiscretizeAction makes them Discrete)"
        )
    if isinstance(space, spaces.MultiDiscrete):
        return f"its nvec has shape {space.nvec.shape}; expected one axis, one head per entry"
    if isinstance(space, spaces.MultiBinary):
        return "funcppo's heads are categorical: give the env a MultiDiscrete([2] * n) instead"
    if isinstance(space, (spaces.Tuple, spaces.Dict)):
        return "composite action spaces are not supported: express the parts as one MultiDiscrete"
    return "funcppo's heads are categorical"


def gym_action_spec(space: Any) -> ActionSpec:
    """The ``ActionSpec`` of a ``Discrete`` or 1-d ``MultiDiscrete`` action space."""
    return _action_layout(space)[0]


def env_action(space: Any, actions: Mapping[str, Any]) -> np.ndarray:
    """The value that ``space`` takes for the agent's ``actions`` (head -> int ``[]`` or ``[B]``,
    tensors or arrays): each head's index plus the space's ``start``.

    ``space`` is one env's ``Discrete`` or 1-d ``MultiDiscrete`` (a vector env's
    ``single_action_space``). Returns int64: for ``Discrete`` a scalar, or ``[B]``; for
    ``MultiDiscrete(nvec)`` ``[len(nvec)]``, or ``[B, len(nvec)]``. An index outside
    ``[0, size)`` of its head is a ValueError.
    """
    spec, _, start = _action_layout(space)
    if not isinstance(actions, Mapping) or set(actions) != set(spec.names):
        got = sorted(actions) if isinstance(actions, Mapping) else type(actions).__name__
        raise ValueError(f"actions: expected a dict with heads {list(spec.names)}, got {got}")
    first, cols = spec.names[0], []
    for name, size in spec.heads:
        value = actions[name]
        x = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
        got = describe(value) if isinstance(value, Tensor) else f"{x.dtype} {x.shape}"
        if x.dtype.kind not in "iu":
            raise ValueError(f"actions[{name!r}]: expected integers, got {got}")
        if x.ndim > 1:
            raise ValueError(f"actions[{name!r}]: expected shape () or (B,), got {x.shape}")
        if cols and x.shape != cols[0].shape:
            raise ValueError(
                f"actions[{name!r}]: expected shape {cols[0].shape} (that of "
                f"actions[{first!r}]), got {x.shape}"
            )
        bad = (x < 0) | (x >= size)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"actions[{name!r}]: expected values in [0, {size}), got {int(x[where])} at "
                f"index {where}"
            )
        cols.append(x.astype(np.int64))
    values = np.stack(cols, axis=-1) + start
    # One head is the Discrete case: its value, not a length-1 row; [()] makes a 0-d a scalar.
    return values[..., 0][()] if len(cols) == 1 else values


def _flat_mask(mask: Any, nvec: np.ndarray, what: str) -> np.ndarray:
    """A flat mask ``[..., sum(nvec)]`` (or a tuple of per-component vectors) as bool."""
    if isinstance(mask, (tuple, list)):
        mask = np.concatenate([np.asarray(m).reshape(-1) for m in mask])
    mask = np.asarray(mask)
    total = int(nvec.sum())
    if mask.ndim == 0 or mask.shape[-1] != total:
        raise ValueError(
            f"{what}: expected {total} entries (sum of the action space's sizes "
            f"{nvec.tolist()}) in its last axis, got shape {mask.shape}"
        )
    return mask != 0


def head_masks(space: Any, mask: Any) -> dict[str, Tensor]:
    """An sb3-contrib action mask for ``space`` (one env's ``Discrete`` or 1-d
    ``MultiDiscrete``) as head -> bool masks, the form ``PPOAgent.predict`` takes.

    ``mask`` is flat, ``[sum(nvec)]`` (an env's ``action_masks()``), or ``[B, sum(nvec)]`` for a
    batch; or one observation's tuple of per-component vectors. Returns head -> ``[size]``, or
    ``[B, size]``.
    """
    spec, nvec, _ = _action_layout(space)
    flat = _flat_mask(mask, nvec, "mask")
    parts = np.split(flat, np.cumsum(nvec)[:-1], axis=-1)
    return {
        name: torch.from_numpy(part.copy()) for name, part in zip(spec.names, parts, strict=True)
    }


def _env_name(env: Any) -> str:
    """The registered id of ``env``, else the class of the (first) env inside it."""
    spec = getattr(env, "spec", None)
    if getattr(spec, "id", None):
        return spec.id
    inner = env.envs[0] if hasattr(env, "envs") else env
    return type(getattr(inner, "unwrapped", inner)).__name__


class GymAdapter:
    """A gymnasium env as ``num_envs`` rows of tensors: ``obs``, ``masks``, ``step``.

    Args:
      env: a ``gymnasium.Env`` (one row) or ``gymnasium.vector.VectorEnv``.
      seed: passed to the first ``reset``.
      device: where the returned tensors live (None: CPU).

    Attributes: ``num_envs``; ``obs_shape``, one env's observation space's shape (None for a
    ``Dict`` or ``Tuple``), and ``obs_dim``, the size of its encoded observation (the ``obs_dim``
    of its ``PPOConfig``); ``obs_encoder``, the ``funcppo.agent.gym_spaces.ObsEncoder`` that makes
    it; ``spec``, the ``ActionSpec``; ``action_space``, one env's action space.
    """

    def __init__(self, env: Any, seed: int | None = None, device=None) -> None:
        gym = require_gymnasium()
        self.env, self.seed = env, seed
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.is_vector = isinstance(env, gym.vector.VectorEnv)
        if self.is_vector:
            self.num_envs = int(env.num_envs)
            obs_space, act_space = env.single_observation_space, env.single_action_space
            mode = env.metadata.get("autoreset_mode", gym.vector.AutoresetMode.NEXT_STEP)
            self.autoreset_mode = gym.vector.AutoresetMode(mode)
            if self.autoreset_mode == gym.vector.AutoresetMode.DISABLED:
                raise ValueError(
                    "env: autoreset_mode DISABLED is not supported; make the vector env with "
                    "autoreset_mode=AutoresetMode.SAME_STEP or NEXT_STEP"
                )
        else:
            self.num_envs = 1
            obs_space, act_space = env.observation_space, env.action_space
            self.autoreset_mode = None
        self.action_space = act_space
        self.spec, self._nvec, self._start = _action_layout(act_space)
        self.obs_encoder = make_obs_encoder(obs_space)
        self.obs_dim = self.obs_encoder.dim
        self.obs_shape = obs_space.shape
        self._name = _env_name(env)
        self._mask_source: str | None = None
        self._pending_reset = np.zeros(self.num_envs, dtype=bool)
        self._obs: Tensor | None = None
        self._masks: dict[str, Tensor] | None = None
        self._all_valid: dict[str, Tensor] | None = None

    def _next_step_mode(self) -> bool:
        return self.is_vector and self.autoreset_mode.name == "NEXT_STEP"

    def _obs_rows(self, obs: Any, what: str = "observation", one: bool = False) -> np.ndarray:
        """``obs`` encoded as a new float32 ``[num_envs, obs_dim]`` array (``one``: one env's,
        as ``[1, obs_dim]``); one that does not fit is a ValueError naming ``what``, the env,
        the part and the shapes."""
        batched = self.is_vector and not one
        try:
            return self.obs_encoder.encode_rows(obs, 1 if one else self.num_envs, batched)
        except ObsError as error:
            raise ValueError(f"{what}{error.path} from env {self._name}: {error.detail}") from None

    def _obs_tensor(self, obs: Any) -> Tensor:
        return torch.from_numpy(self._obs_rows(obs)).to(self.device)

    def _raw_masks(self, info: dict) -> Any:
        """Per-row masks as the env gives them, or None when it gives none."""
        if self._mask_source is None:
            if "action_mask" in info:
                self._mask_source = "info"
            else:
                # Asked, not tried: a failed call shuts an async vector env's workers down.
                if self.is_vector:
                    call = getattr(self.env, "call", None)  # a native vector env may have none
                    has = call is not None and all(call("has_wrapper_attr", "action_masks"))
                else:
                    has = self.env.has_wrapper_attr("action_masks")
                self._mask_source = "method" if has else "none"
        if self._mask_source == "none":
            return None
        if self._mask_source == "method":
            return self._call_action_masks()
        if "action_mask" not in info:
            raise ValueError("info['action_mask']: missing after the env reported it before")
        rows = info["action_mask"]
        if self.is_vector:
            have = info.get("_action_mask", np.ones(self.num_envs, dtype=bool))
            if not np.all(have):
                missing = int(np.flatnonzero(~np.asarray(have))[0])
                raise ValueError(f"info['action_mask']: missing for env {missing}")
            return list(rows)
        return [rows]

    def _call_action_masks(self) -> list:
        if self.is_vector:
            return list(self.env.call("action_masks"))
        return [self.env.get_wrapper_attr("action_masks")()]

    def _mask_tensors(self, info: dict, ignored: np.ndarray) -> dict[str, Tensor]:
        """Head -> bool ``[num_envs, size]``; rows whose next action is ignored are all True.
        An env without masks gets the same all-True tensors every step (nobody writes them)."""
        total = int(self._nvec.sum())
        raw = self._raw_masks(info)
        if raw is None and self._all_valid is not None:
            return self._all_valid
        flat = np.ones((self.num_envs, total), dtype=bool)
        if raw is not None:
            for i, row in enumerate(raw):
                if not isinstance(row, (tuple, list)):
                    row = np.asarray(row).reshape(-1)
                flat[i] = _flat_mask(row, self._nvec, f"action mask of env {i}")
        flat[ignored] = True
        parts = np.split(flat, np.cumsum(self._nvec)[:-1], axis=1)
        masks = {
            name: torch.from_numpy(part.copy()).to(self.device)
            for name, part in zip(self.spec.names, parts, strict=True)
        }
        if raw is None:
            self._all_valid = masks
        return masks

    def reset(self, seed: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Start every env afresh; returns ``obs`` ``[num_envs, obs_dim]`` and ``masks``."""
        obs, info = self.env.reset(seed=self.seed if seed is None else seed)
        self._pending_reset[:] = False
        self._obs = self._obs_tensor(obs)
        self._masks = self._mask_tensors(info, self._pending_reset)
        return self._obs, self._masks

    @property
    def obs(self) -> Tensor:
        """The observation to act on next (resets the env on first use)."""
        if self._obs is None:
            self.reset()
        return self._obs

    @property
    def masks(self) -> dict[str, Tensor]:
        """The masks of ``obs``."""
        if self._masks is None:
            self.reset()
        return self._masks

    def _env_actions(self, actions: Mapping[str, Tensor], validate: bool) -> Any:
        if validate:
            check_actions(self.spec, self.num_envs, actions)
            values = env_action(self.action_space, actions)
        else:
            cols = [actions[name].cpu().numpy() for name in self.spec.names]
            values = np.stack(cols, axis=-1) + self._start
            values = values[..., 0] if len(cols) == 1 else values
        return values if self.is_vector else values[0]

    def step(self, actions: Mapping[str, Tensor], validate: bool = True) -> EnvStep:
        """Apply ``actions`` (head -> int64 ``[num_envs]``) and report an ``EnvStep``.

        ``validate`` False skips the checks of the actions' shapes and ranges, for a caller
        whose sampler guarantees them (``SeedsAgent``)."""
        if self._obs is None:
            raise RuntimeError("step: reset the env first (or read .obs)")
        env_actions = self._env_actions(actions, validate)
        obs, reward, terminated, truncated, info = self.env.step(env_actions)
        terminated = np.asarray(terminated, dtype=bool).reshape(self.num_envs)
        truncated = np.asarray(truncated, dtype=bool).reshape(self.num_envs)
        reward = np.asarray(reward, dtype=np.float32).reshape(self.num_envs)
        done = terminated | truncated
        final = self._obs_rows(obs)
        valid = np.ones(self.num_envs, dtype=bool)
        if not self.is_vector:
            start = done.copy()
            if done[0]:
                obs, info = self.env.reset()
        elif self._next_step_mode():
            # Rows that were done last step just reset: no transition, a new episode's obs.
            valid = ~self._pending_reset
            start = self._pending_reset.copy()
            self._pending_reset = done & valid
        else:
            start = done.copy()
            has_final = info.get("_final_obs", np.zeros(self.num_envs, dtype=bool))
            for i in np.flatnonzero(done):
                if not has_final[i]:
                    raise ValueError(f"info['final_obs']: missing for env {i}, which is done")
                final[i] = self._obs_rows(info["final_obs"][i], f"info['final_obs'][{i}]", True)[0]
        self._obs = self._obs_tensor(obs)
        self._masks = self._mask_tensors(info, self._pending_reset)
        d = self.device
        return EnvStep(
            obs=self._obs,
            reward=torch.from_numpy(reward).to(d),
            terminated=torch.from_numpy(terminated & valid).to(d),
            truncated=torch.from_numpy(truncated & valid).to(d),
            masks=self._masks,
            final_obs=torch.from_numpy(final).to(d),
            valid=torch.from_numpy(valid).to(d),
            episode_start=torch.from_numpy(start).to(d),
            next_valid=torch.from_numpy(~self._pending_reset).to(d),
        )
