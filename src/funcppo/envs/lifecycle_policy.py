"""Reference policies for :mod:`funcppo.envs.lifecycle`: a hand-written heuristic and random.

The heuristic reads only what the observation shows (stages, ages, blend progress, the running
quality estimates per slot and per blueprint, time), never the hidden ``quality``. Its rules,
first match wins, each on the first slot where it applies:

1. FOSSILIZE a HOLDING seed whose blueprint looks good.
2. PRUNE (fastest embargo: speed 0, curve 0) a seed whose blueprint looks bad.
3. SET_ALPHA_TARGET (style 3, target 1.0, one-tick blend) on a good BLENDING or HOLDING seed
   that is not yet at the high-gain style and full alpha.
4. ADVANCE a GERMINATED seed, a TRAINING seed whose blueprint looks good, or a finished blend.
5. GERMINATE into an empty slot, while enough time is left, the blueprint with the best score:
   its mean sample once judged, ``OPTIMISM`` while untried, -1 while on trial (so skipped).
   A known-good blueprint is planted at the high-gain style and slow tempo, an unknown one at
   the low-noise style and medium tempo; blends target alpha 1.0.
6. WAIT.

A blueprint is judged after ``JUDGE_SAMPLES`` samples; it looks good above ``GOOD_THRESHOLD``.

:func:`oracle_policy` plays the same rules with the hidden qualities in place of the sample
means (every blueprint judged from the start): it plants the best blueprint in every slot and
never explores. It is not a policy an agent can reach, only an upper yardstick for the
heuristic: what the rules would earn if discovery cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from funcppo.core import random
from funcppo.core.distributions import factored_sample
from funcppo.envs.lifecycle import (
    ADVANCE,
    ALPHA_TARGETS,
    BLENDING,
    BLUEPRINT_QUALITY,
    FOSSILIZE,
    GERMINATE,
    GERMINATED,
    PRUNE,
    SET_ALPHA_TARGET,
    SLOT_FEATURES,
    STYLE_GAIN,
    TEMPO_GAIN,
    TRAINING,
    WAIT,
    Lifecycle,
    LifecycleState,
)
from funcppo.envs.lifecycle_spec import lifecycle_spec

__all__ = [
    "episode_returns",
    "heuristic_policy",
    "oracle_policy",
    "random_policy",
    "reference_return",
]

JUDGE_SAMPLES = 5
GOOD_THRESHOLD = 0.4
OPTIMISM = 0.5
MIN_TIME_LEFT = 0.15
HIGH_GAIN_STYLE, LOW_NOISE_STYLE = len(STYLE_GAIN) - 1, 0
SLOW_TEMPO, MEDIUM_TEMPO = len(TEMPO_GAIN) - 1, 1
FULL_ALPHA = len(ALPHA_TARGETS) - 1

Policy = Callable[[Any, Tensor, Mapping[str, Tensor], Tensor], dict[str, Tensor]]


def _first(candidates: Tensor) -> tuple[Tensor, Tensor]:
    """Whether any slot qualifies ``[N]`` and the first one that does ``[N]`` (0 if none)."""
    return candidates.any(-1), candidates.int().argmax(-1)


def heuristic_policy(
    env_state: LifecycleState,
    obs: Tensor,
    masks: Mapping[str, Tensor],
    key: Tensor | None = None,
) -> dict[str, Tensor]:
    """The rules of the module docstring: int64 ``[N]`` per head, for ``obs`` ``[N, D]``.

    Reads the visible parts of ``env_state`` (stages, ages, styles, blend targets, the sample
    sums and counts) and the time left from ``obs``; ``key`` is unused.
    """
    s = env_state
    time_left = obs[:, s.stage.shape[1] * SLOT_FEATURES]
    legal = masks["slot"]
    nb = len(BLUEPRINT_QUALITY)
    judged = s.bp_count >= JUDGE_SAMPLES
    mean = s.bp_sum / s.bp_count.clamp(min=1.0)
    good_bp, bad_bp = judged & (mean > GOOD_THRESHOLD), judged & (mean <= GOOD_THRESHOLD)
    good = torch.gather(good_bp, 1, s.blueprint)
    bad = torch.gather(bad_bp, 1, s.blueprint)
    trial = ((s.stage == GERMINATED) | (s.stage == TRAINING)).unsqueeze(-1)
    trial = (trial & (s.blueprint.unsqueeze(-1) == torch.arange(nb, device=obs.device))).any(1)
    score = torch.where(judged, mean, torch.where(trial, -1.0, OPTIMISM))  # [N, 13]
    best = score.argmax(-1)
    best_good = torch.gather(good_bp, 1, best.unsqueeze(-1)).squeeze(-1)
    plant = (score.amax(-1) > GOOD_THRESHOLD) & (time_left > MIN_TIME_LEFT)
    full = (s.style == HIGH_GAIN_STYLE) & (s.alpha_target >= ALPHA_TARGETS[FULL_ALPHA])
    advance = (s.stage == GERMINATED) | (s.stage == BLENDING) | ((s.stage == TRAINING) & good)
    rules = [  # lowest priority first; later rules overwrite earlier ones
        (GERMINATE, legal[:, GERMINATE] & plant.unsqueeze(-1)),
        (ADVANCE, legal[:, ADVANCE] & advance),
        (SET_ALPHA_TARGET, legal[:, SET_ALPHA_TARGET] & good & ~full),
        (PRUNE, legal[:, PRUNE] & bad),
        (FOSSILIZE, legal[:, FOSSILIZE] & good),
    ]
    op = torch.full_like(s.steps, WAIT)
    slot = torch.zeros_like(s.steps)
    for o, candidates in rules:
        hit, first = _first(candidates)
        op, slot = torch.where(hit, o, op), torch.where(hit, first, slot)
    zeros = torch.zeros_like(s.steps)
    germ_style = torch.where(best_good, HIGH_GAIN_STYLE, LOW_NOISE_STYLE)
    return {
        "op": op,
        "slot": slot,
        "blueprint": best,
        "style": torch.where(op == GERMINATE, germ_style, HIGH_GAIN_STYLE),
        "tempo": torch.where(best_good, SLOW_TEMPO, MEDIUM_TEMPO),
        "alpha_target": torch.full_like(zeros, FULL_ALPHA),
        "alpha_speed": zeros,
        "alpha_curve": zeros,
    }


def oracle_policy(
    env_state: LifecycleState,
    obs: Tensor,
    masks: Mapping[str, Tensor],
    key: Tensor | None = None,
) -> dict[str, Tensor]:
    """:func:`heuristic_policy` told the hidden qualities: each blueprint's samples replaced by
    ``JUDGE_SAMPLES`` exact ones. Reads ``env_state.quality``; ``key`` is unused."""
    judged = torch.full_like(env_state.quality, float(JUDGE_SAMPLES))
    told = env_state._replace(bp_sum=env_state.quality * JUDGE_SAMPLES, bp_count=judged)
    return heuristic_policy(told, obs, masks, key)


def random_policy(
    env_state: Any, obs: Tensor, masks: Mapping[str, Tensor], key: Tensor
) -> dict[str, Tensor]:
    """Uniform over valid values: the op first, then each head under the op's masks."""
    spec = lifecycle_spec(masks["slot"].shape[-1])
    logits = {name: torch.zeros(m.shape, device=m.device) for name, m in masks.items()}
    logits["slot"] = logits["slot"][..., 0, :]
    return factored_sample(spec, logits, masks, key)


def episode_returns(env: Lifecycle, policy: Policy, key: Tensor) -> Tensor:
    """Undiscounted return of each env's first episode: float32 ``[num_envs]``.

    ``policy(env_state, obs, masks, key) -> actions``. Runs ``env.max_steps`` steps eagerly;
    rewards after an env's first done are ignored.
    """
    reset_key, loop_key = random.split(key)
    res = env.reset(reset_key)
    state, obs, masks = res.env_state, res.obs, res.masks
    total = torch.zeros(env.num_envs, device=key.device)
    alive = torch.ones(env.num_envs, dtype=torch.bool, device=key.device)
    for t in range(env.max_steps):
        k_act, k_step = random.split(random.fold_in(loop_key, t))
        out = env.step(state, policy(state, obs, masks, k_act), k_step)
        total = total + torch.where(alive, out.reward, 0.0)
        alive = alive & ~(out.terminated | out.truncated)
        state, obs, masks = out.env_state, out.obs, out.masks
    return total


def reference_return(policy: str = "heuristic", num_envs: int = 256, seed: int = 0) -> float:
    """Mean first-episode return of ``"heuristic"``, ``"oracle"`` or ``"random"`` on
    ``Lifecycle(num_envs)``."""
    policies = {"heuristic": heuristic_policy, "oracle": oracle_policy, "random": random_policy}
    if policy not in policies:
        raise ValueError(f"policy: expected one of {sorted(policies)}, got {policy!r}")
    returns = episode_returns(Lifecycle(num_envs), policies[policy], random.key(seed))
    return float(returns.mean())
