"""Gymnasium observation spaces as flat float32 vectors, the policy's input.

Each space is encoded as Stable-Baselines3's ``preprocess_obs`` encodes it for an MLP policy,
then flattened:

- ``Box``: its values as float32; a ``uint8`` image (3 axes, bounds 0 and 255: SB3's
  ``is_image_space``) divided by 255, as SB3 does with its default ``normalize_images``;
- ``Discrete(n)``: a one-hot of length ``n``;
- ``MultiDiscrete(nvec)``: the one-hots of its components, concatenated (``sum(nvec)``);
- ``MultiBinary``: its bits as float32;
- ``Dict`` and ``Tuple`` of the above: each part encoded, concatenated. A ``Dict`` in the
  space's own key order: the order SB3's ``CombinedExtractor`` concatenates its features in
  and that ``gymnasium.spaces.flatten`` uses; gymnasium sorts the keys of a plain dict when it
  makes the space, so that is sorted order unless the space was made from an ``OrderedDict``
  or a list of pairs. A ``Tuple`` in index order (SB3 has no Tuple observations; this is
  gymnasium's ``flatten`` order).

Two departures, where SB3 has no answer: a one-hot counts from the space's ``start`` (SB3
assumes 0 and fails on any other), and a multi-axis ``MultiDiscrete`` is taken in row-major
order. A ``Dict`` or ``Tuple`` inside another is refused, as SB3 refuses it, and so is every
other space (``Text``, ``Graph``, ``Sequence``, ``OneOf``), naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = ["ObsEncoder", "ObsError", "make_obs_encoder"]

SUPPORTED = "Box, Discrete, MultiDiscrete, MultiBinary, or a Dict or Tuple of them"


class ObsError(ValueError):
    """An observation that does not fit its space: ``path`` (``""``, ``"['pos']"``, ``"[1]"``)
    says which part, ``detail`` what was expected and what came."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"observation{path}: {detail}")
        self.path, self.detail = path, detail


# A leaf encoder: (obs, rows, batched) -> float32 [rows, size]. ``batched`` only words errors.
Leaf = Callable[[Any, int, bool], np.ndarray]


def _rows(x: Any, rows: int, shape: tuple, batched: bool, path: str) -> np.ndarray:
    """``x`` as an array ``[rows, *shape]``, or an ObsError naming both shapes."""
    try:
        array = np.asarray(x)
    except (TypeError, ValueError):
        array = None
    if array is None or array.dtype == object or array.size != rows * int(np.prod(shape)):
        got = type(x).__name__ if array is None or array.dtype == object else array.shape
        batch = f" per env (batch {(rows, *shape)})" if batched else ""
        raise ObsError(path, f"expected shape {shape}{batch}, got {got}")
    return array.reshape(rows, *shape)


def _one_hots(x: np.ndarray, sizes: np.ndarray, start: np.ndarray, path: str) -> np.ndarray:
    """Integer ``x`` ``[rows, k]`` as the concatenated one-hots ``[rows, sum(sizes)]``."""
    if x.dtype.kind not in "iu":
        raise ObsError(path, f"expected integers, got {x.dtype}")
    index = x.astype(np.int64) - start
    bad = (index < 0) | (index >= sizes)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        low, high = int(start[col]), int(start[col] + sizes[col])
        at = f"index {col} of row {row}" if x.shape[1] > 1 else f"row {row}"
        raise ObsError(path, f"expected values in [{low}, {high}), got {int(x[row, col])} at {at}")
    out = np.zeros((x.shape[0], int(sizes.sum())), dtype=np.float32)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    np.put_along_axis(out, index + offsets, 1.0, axis=1)
    return out


def _leaf(gym: Any, space: Any, path: str) -> tuple[int, Leaf]:
    """``(size, encode)`` of a non-composite space, or a ValueError naming the space."""
    spaces = gym.spaces
    if isinstance(space, spaces.Box):
        shape, size = tuple(space.shape), int(np.prod(space.shape))
        image = (
            space.dtype == np.uint8
            and len(shape) == 3
            and bool(np.all(space.low == 0))
            and bool(np.all(space.high == 255))
        )

        def box(x, rows, batched):
            try:
                array = np.array(x, dtype=np.float32)
            except (TypeError, ValueError):
                array = _rows(x, rows, shape, batched, path)  # raises, naming the type
            if array.size != rows * size:
                _rows(array, rows, shape, batched, path)  # raises, naming both shapes
            array = array.reshape(rows, size)
            return array / np.float32(255.0) if image else array

        return size, box
    if isinstance(space, spaces.Discrete):
        n, start = np.array([int(space.n)]), np.array([int(space.start)])
        return int(n[0]), lambda x, rows, b: _one_hots(
            _rows(x, rows, (1,), b, path), n, start, path
        )
    if isinstance(space, spaces.MultiDiscrete):
        nvec = space.nvec.reshape(-1).astype(np.int64)
        start = np.broadcast_to(np.asarray(space.start), space.nvec.shape).reshape(-1)
        shape = tuple(space.nvec.shape)

        def multi(x, rows, batched):
            x = _rows(x, rows, shape, batched, path).reshape(rows, -1)
            return _one_hots(x, nvec, start.astype(np.int64), path)

        return int(nvec.sum()), multi
    if isinstance(space, spaces.MultiBinary):
        shape = tuple(int(n) for n in space.shape)

        def bits(x, rows, batched):
            return _rows(x, rows, shape, batched, path).reshape(rows, -1).astype(np.float32)

        return int(np.prod(shape)), bits
    raise ValueError(
        f"observation_space{path}: expected {SUPPORTED}, got {space!r}; funcppo's policy "
        "takes a flat vector"
    )


def _composite(gym: Any, space: Any) -> tuple[list, list[int], list[Leaf]]:
    """The parts of a ``Dict`` (keys) or ``Tuple`` (indices), their sizes and encoders."""
    parts = list(space.spaces) if isinstance(space, gym.spaces.Dict) else range(len(space))
    sizes, leaves = [], []
    for part in parts:
        sub, path = space[part], f"[{part!r}]"
        if isinstance(sub, (gym.spaces.Dict, gym.spaces.Tuple)):
            raise ValueError(
                f"observation_space{path}: a {type(sub).__name__} inside a "
                f"{type(space).__name__} is not supported (nor in Stable-Baselines3), got "
                f"{sub!r}; wrap the env in gymnasium.wrappers.FlattenObservation"
            )
        size, leaf = _leaf(gym, sub, path)
        sizes.append(size)
        leaves.append(leaf)
    return list(parts), sizes, leaves


class ObsEncoder:
    """One gymnasium observation space's encoding: ``dim``, the encoded size (``PPOConfig``'s
    ``obs_dim``), and ``encoder(obs, num_envs=None)``.

    ``obs`` is one observation of ``space`` (``num_envs`` None: returns float32 ``[dim]``) or a
    vector env's batch of ``num_envs`` (returns ``[num_envs, dim]``): for a ``Dict`` a mapping
    of batched arrays, for a ``Tuple`` a tuple of them, as gymnasium's vector envs give them.
    An observation that does not fit raises ``ObsError`` (a ValueError) naming the part.
    """

    def __init__(self, space: Any) -> None:
        from funcppo.agent.gym_adapter import require_gymnasium

        gym = require_gymnasium()
        self.space = space
        if isinstance(space, (gym.spaces.Dict, gym.spaces.Tuple)):
            self.parts, sizes, self._leaves = _composite(gym, space)
            self.is_dict = isinstance(space, gym.spaces.Dict)
            self.dim = int(sum(sizes))
        else:
            self.parts = None
            size, leaf = _leaf(gym, space, "")
            self._leaves, self.dim = [leaf], size

    def encode_rows(self, obs: Any, rows: int, batched: bool) -> np.ndarray:
        """``obs`` as float32 ``[rows, dim]``; ``batched`` words a shape error per env."""
        if self.parts is None:
            return self._leaves[0](obs, rows, batched)
        if self.is_dict:
            if not isinstance(obs, Mapping) or any(key not in obs for key in self.parts):
                got = sorted(map(str, obs)) if isinstance(obs, Mapping) else type(obs).__name__
                raise ObsError("", f"expected a dict with keys {self.parts}, got {got}")
        elif not isinstance(obs, (tuple, list)) or len(obs) != len(self.parts):
            got = f"{len(obs)} parts" if isinstance(obs, (tuple, list)) else type(obs).__name__
            raise ObsError("", f"expected a tuple of {len(self.parts)} parts, got {got}")
        encoded = [
            leaf(obs[part], rows, batched)
            for part, leaf in zip(self.parts, self._leaves, strict=True)
        ]
        return np.concatenate(encoded, axis=1)

    def __call__(self, obs: Any, num_envs: int | None = None) -> np.ndarray:
        if num_envs is None:
            return self.encode_rows(obs, 1, False)[0]
        return self.encode_rows(obs, num_envs, True)


def make_obs_encoder(space: Any) -> ObsEncoder:
    """The ``ObsEncoder`` of a gymnasium observation space (see the module's docstring), or a
    ValueError naming the space where it has no encoding."""
    return ObsEncoder(space)
