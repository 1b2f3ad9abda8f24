"""A stand-in for the original agent's environment: grow a network by planting seeds into slots.

Each of ``num_slots`` slots holds a seed whose stage moves
``DORMANT -> GERMINATED -> TRAINING -> BLENDING -> HOLDING -> FOSSILIZED`` under the agent's
ops, or ``PRUNED -> EMBARGOED -> DORMANT`` on its own after a PRUNE. One op per step, on the
eight heads of :func:`funcppo.envs.lifecycle_spec.lifecycle_spec`; the slot mask row of op ``o``
lists the slots where ``o`` is legal (WAIT: all of them). An illegal action is a WAIT.

Dynamics (one step = op, then automatic transitions, then one tick of every slot):

* Each of the 13 blueprints has a hidden quality, a shuffled copy of ``BLUEPRINT_QUALITY``
  drawn per env at reset: three good, seven mediocre, three bad.
* GERMINATE(slot, blueprint, style, tempo, alpha_target) plants a seed. Tempo sets how long
  TRAINING lasts before ADVANCE is legal (``TEMPO_STEPS``) and a gain (``TEMPO_GAIN``); style
  trades observation noise (``STYLE_NOISE``) for gain (``STYLE_GAIN``).
* While TRAINING or BLENDING, each tick reveals ``quality + STYLE_NOISE[style] * e`` with
  ``e = sqrt(3) (2u - 1)``, ``u ~ U(0, 1)`` (mean 0, variance 1); the obs shows the running
  mean per slot and per blueprint (the controller's telemetry).
* BLENDING moves alpha from its start to the target along ``phase ** CURVE_POWER[curve]``,
  ``phase`` rising by ``1 / ALPHA_STEPS[speed]`` per tick; ADVANCE to HOLDING once phase is 1.
  SET_ALPHA_TARGET(slot, style, alpha_target, alpha_speed, alpha_curve) restarts the blend.
* Reward per tick: ``CONTRIB_SCALE * sum(quality * alpha * gain)`` over BLENDING, HOLDING and
  FOSSILIZED seeds; FOSSILIZE adds ``FOSSIL_BONUS * quality * alpha * gain``; every applied
  op but WAIT costs ``ACTION_COST``; PRUNE(slot, alpha_speed, alpha_curve) embargoes the slot
  for ``1 + speed + curve`` ticks and costs ``PRUNE_SHOCK * alpha / embargo``.
* Collapse: terminated with ``-COLLAPSE_PENALTY`` with probability
  ``COLLAPSE_RATE * sum(relu(-quality) * alpha)`` over BLENDING and HOLDING seeds (a bad seed
  at high alpha); truncated at ``max_steps``.

Returns over 256 envs x one episode, ``num_slots=3``, ``max_steps=150``, seed 0, measured by
:func:`funcppo.envs.lifecycle_policy.reference_return`: ``REFERENCE_RETURN`` for the
hand-written heuristic, ``RANDOM_RETURN`` for uniform sampling among valid actions, and
``ORACLE_RETURN`` for the heuristic's rules told the hidden qualities (an upper yardstick no
agent can reach: the heuristic earns about 70% of it, the rest being the price of discovery).
The qualities are shuffled per episode, so no blueprint index is good on average: an agent must
read the sample means in the observation to choose blueprints, and one that ignores them and
fossilizes whatever it planted earns about ``3 * mean(BLUEPRINT_QUALITY) * (2.1 + 0.8)``, near 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from funcppo.core import random
from funcppo.core.spec import ActionSpec
from funcppo.envs.base import ResetResult, StepResult, check_actions, full_masks, where_done
from funcppo.envs.lifecycle_spec import LIFECYCLE_OPS, lifecycle_spec

__all__ = [
    "ORACLE_RETURN",
    "RANDOM_RETURN",
    "REFERENCE_RETURN",
    "STAGES",
    "Lifecycle",
    "LifecycleState",
    "lifecycle_masks",
]

# Mean first-episode returns, Lifecycle(256), seed 0: lifecycle_policy.reference_return(...).
REFERENCE_RETURN = 6.08  # "heuristic": fossilizes 3.0 seeds of quality > 0 per episode, no other
RANDOM_RETURN = -0.09  # "random": uniform over valid actions
ORACLE_RETURN = 8.74  # "oracle": the heuristic told the hidden qualities (not reachable)

STAGES = (
    "DORMANT", "GERMINATED", "TRAINING", "BLENDING", "HOLDING", "FOSSILIZED", "PRUNED", "EMBARGOED"
)  # fmt: skip
DORMANT, GERMINATED, TRAINING, BLENDING, HOLDING, FOSSILIZED, PRUNED, EMBARGOED = range(8)
WAIT, GERMINATE, SET_ALPHA_TARGET, PRUNE, FOSSILIZE, ADVANCE = (
    LIFECYCLE_OPS.index(name)
    for name in ("WAIT", "GERMINATE", "SET_ALPHA_TARGET", "PRUNE", "FOSSILIZE", "ADVANCE")
)

BLUEPRINT_QUALITY = (1.0, 0.8, 0.6, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05, 0.0, -0.3, -0.6, -1.0)
STYLE_NOISE = (0.3, 0.5, 0.7, 0.9)
STYLE_GAIN = (0.7, 0.9, 1.1, 1.3)
TEMPO_STEPS = (2, 4, 7)
TEMPO_GAIN = (0.8, 1.0, 1.2)
ALPHA_TARGETS = (0.4, 0.7, 1.0)
ALPHA_STEPS = (1, 2, 4, 8)
CURVE_POWER = (0.5, 0.75, 1.0, 1.5, 2.0)
# GERMINATE does not read the speed and curve heads (causal table): its blend uses these.
GERMINATE_SPEED, GERMINATE_CURVE = 2, 2
MIN_PRUNE_AGE = 2
ACTION_COST = 0.001
CONTRIB_SCALE = 0.01
FOSSIL_BONUS = 0.5
PRUNE_SHOCK = 0.1
COLLAPSE_RATE = 0.01
COLLAPSE_PENALTY = 2.0
NOISE_SCALE = 3.0**0.5  # sqrt(3) (2u - 1) has mean 0 and variance 1
AGE_NORM = 10.0
MAX_EMBARGO = len(ALPHA_STEPS) + len(CURVE_POWER) - 1
COUNT_NORM = 10.0
# Slot features: stage one-hot, 7 scalars, style, tempo and blueprint one-hots.
SLOT_FEATURES = len(STAGES) + 7 + len(STYLE_GAIN) + len(TEMPO_GAIN) + len(BLUEPRINT_QUALITY)
GLOBAL_FEATURES = 3 + 2 * len(BLUEPRINT_QUALITY)


class LifecycleState(NamedTuple):
    """Per-env state; ``[N, S]`` per slot (N envs, S slots) unless noted.

    Attributes:
      stage, age: int64 stage index (``STAGES``) and ticks spent in it.
      blueprint, style, tempo, speed, curve, embargo: int64 head values the seed was given
        (``embargo`` is the EMBARGOED duration set by PRUNE).
      alpha, alpha_start, alpha_target, phase: float32 blend level, its value when the blend
        began, its target and the blend progress in [0, 1].
      est_sum, est_count: float32 sum and number of quality samples revealed for the seed.
      quality: float32 ``[N, 13]``, hidden quality of each blueprint.
      bp_sum, bp_count: float32 ``[N, 13]``, the samples per blueprint this episode.
      fossils: int64 ``[N, 2]``, fossilized seeds of positive / non-positive quality.
      steps: int64 ``[N]``, steps taken in the episode.
    """

    stage: Tensor
    age: Tensor
    blueprint: Tensor
    style: Tensor
    tempo: Tensor
    speed: Tensor
    curve: Tensor
    embargo: Tensor
    alpha: Tensor
    alpha_start: Tensor
    alpha_target: Tensor
    phase: Tensor
    est_sum: Tensor
    est_count: Tensor
    quality: Tensor
    bp_sum: Tensor
    bp_count: Tensor
    fossils: Tensor
    steps: Tensor


def _one_hot(idx: Tensor, n: int) -> Tensor:
    """Bool ``[..., n]``; an index outside ``[0, n)`` gives an all-False row."""
    return idx.unsqueeze(-1) == torch.arange(n, device=idx.device)


def _table(values: Sequence[float], idx: Tensor) -> Tensor:
    """``values[idx]`` for an int64 index tensor: ``[...] -> [...]`` (float32).

    A chain of ``where`` on Python numbers rather than indexing a table tensor: a tensor
    constant inside a compiled ``scan`` body is not bound by inductor's loop lowering
    (torch 2.13), and the rollout is one.
    """
    out = torch.full(idx.shape, float(values[0]), device=idx.device)
    for i, v in enumerate(values[1:], 1):
        out = torch.where(idx == i, float(v), out)
    return out


def _slot_quality(state: LifecycleState) -> Tensor:
    """Hidden quality of each slot's blueprint: float32 ``[N, S]``."""
    return torch.gather(state.quality, 1, state.blueprint.clamp(0, len(BLUEPRINT_QUALITY) - 1))


def _gain(style: Tensor, tempo: Tensor) -> Tensor:
    return _table(STYLE_GAIN, style) * _table(TEMPO_GAIN, tempo)


def _legal_slots(state: LifecycleState) -> Tensor:
    """Bool ``[N, n_ops, S]``: entry (o, s) is True when op o may act on slot s."""
    st, age = state.stage, state.age
    live = (st >= GERMINATED) & (st <= HOLDING)
    advance = (
        (st == GERMINATED)
        | ((st == TRAINING) & (age >= _table(TEMPO_STEPS, state.tempo)))
        | ((st == BLENDING) & (state.phase >= 1.0))
    )
    rows = {
        WAIT: torch.ones_like(live),
        GERMINATE: st == DORMANT,
        SET_ALPHA_TARGET: (st == BLENDING) | (st == HOLDING),
        PRUNE: live & (age >= MIN_PRUNE_AGE),
        FOSSILIZE: st == HOLDING,
        ADVANCE: advance,
    }
    return torch.stack([rows[o] for o in range(len(LIFECYCLE_OPS))], dim=-2)


def lifecycle_masks(spec: ActionSpec, state: LifecycleState) -> dict[str, Tensor]:
    """Validity masks: op ``[N, 6]`` (legal on some slot), slot ``[N, 6, S]``, others all True."""
    slots = _legal_slots(state)
    return {**full_masks(spec, slots.shape[0], slots.device), "op": slots.any(-1), "slot": slots}


def _apply_op(
    state: LifecycleState, actions: Mapping[str, Tensor]
) -> tuple[LifecycleState, Tensor]:
    """The op's effect on its slot (WAIT where illegal) and its reward: ``[N]``."""
    n_slots = state.stage.shape[1]
    hits = _legal_slots(state) & _one_hot(actions["op"], len(LIFECYCLE_OPS)).unsqueeze(-1)
    hits = hits & _one_hot(actions["slot"], n_slots).unsqueeze(-2)
    germ, seta, prune, fossil, adv = (
        hits[:, o] for o in (GERMINATE, SET_ALPHA_TARGET, PRUNE, FOSSILIZE, ADVANCE)
    )
    head = {name: value.unsqueeze(-1) for name, value in actions.items()}
    speed = torch.where(germ, GERMINATE_SPEED, torch.where(seta, head["alpha_speed"], state.speed))
    curve = torch.where(germ, GERMINATE_CURVE, torch.where(seta, head["alpha_curve"], state.curve))
    target = _table(ALPHA_TARGETS, head["alpha_target"])
    st = state.stage
    stage = torch.where(germ, GERMINATED, torch.where(adv, st + 1, st))
    stage = torch.where(seta, BLENDING, torch.where(prune, PRUNED, stage))
    stage = torch.where(fossil, FOSSILIZED, stage)
    restart = germ | seta | (adv & (st == TRAINING))  # a blend starts from the current alpha
    alpha = torch.where(germ | prune, 0.0, state.alpha)
    embargo = 1 + head["alpha_speed"] + head["alpha_curve"]
    q, gain = _slot_quality(state), _gain(state.style, state.tempo)
    is_good = (fossil & (q > 0)).sum(-1)
    reward = (
        FOSSIL_BONUS * (fossil * q * state.alpha * gain).sum(-1)
        - PRUNE_SHOCK * (prune * state.alpha / embargo).sum(-1)
        - ACTION_COST * hits[:, 1:].any(-1).any(-1)  # row 0 is WAIT
    )
    new = state._replace(
        stage=stage,
        age=torch.where(hits[:, 1:].any(1), 0, state.age),
        blueprint=torch.where(germ, head["blueprint"], state.blueprint),
        style=torch.where(germ | seta, head["style"], state.style),
        tempo=torch.where(germ, head["tempo"], state.tempo),
        speed=speed,
        curve=curve,
        embargo=torch.where(prune, embargo, state.embargo),
        alpha=alpha,
        alpha_start=torch.where(restart, alpha, state.alpha_start),
        alpha_target=torch.where(germ | seta, target, state.alpha_target),
        phase=torch.where(restart, 0.0, state.phase),
        est_sum=torch.where(germ, 0.0, state.est_sum),
        est_count=torch.where(germ, 0.0, state.est_count),
        fossils=state.fossils + torch.stack([is_good, fossil.sum(-1) - is_good], -1),
    )
    return new, reward


def _auto_transitions(state: LifecycleState) -> LifecycleState:
    """PRUNED -> EMBARGOED after one tick; EMBARGOED -> DORMANT after ``embargo`` ticks."""
    to_embargo = (state.stage == PRUNED) & (state.age >= 1)
    to_dormant = (state.stage == EMBARGOED) & (state.age >= state.embargo)
    stage = torch.where(to_embargo, EMBARGOED, torch.where(to_dormant, DORMANT, state.stage))
    return state._replace(stage=stage, age=torch.where(to_embargo | to_dormant, 0, state.age))


def _tick(state: LifecycleState, noise: Tensor) -> LifecycleState:
    """Ages +1, blends progress, TRAINING/BLENDING seeds reveal a noisy quality sample."""
    blending = state.stage == BLENDING
    phase = torch.where(blending, state.phase + 1.0 / _table(ALPHA_STEPS, state.speed), state.phase)
    phase = phase.clamp(max=1.0)
    shape = phase ** _table(CURVE_POWER, state.curve)
    alpha = torch.where(
        blending, state.alpha_start + (state.alpha_target - state.alpha_start) * shape, state.alpha
    )
    seen = ((state.stage == TRAINING) | blending).float()
    sample = seen * (_slot_quality(state) + _table(STYLE_NOISE, state.style) * noise)
    per_bp = _one_hot(state.blueprint, len(BLUEPRINT_QUALITY)).float() * seen.unsqueeze(-1)
    return state._replace(
        age=state.age + 1,
        alpha=alpha,
        phase=phase,
        est_sum=state.est_sum + sample,
        est_count=state.est_count + seen,
        bp_sum=state.bp_sum + (per_bp * sample.unsqueeze(-1)).sum(1),
        bp_count=state.bp_count + per_bp.sum(1),
    )


def _payoff(state: LifecycleState, u: Tensor) -> tuple[Tensor, Tensor]:
    """Contribution reward ``[N]`` and collapse (bool ``[N]``, from uniform ``u`` ``[N]``)."""
    blended = (state.stage == BLENDING) | (state.stage == HOLDING)
    q, weight = _slot_quality(state), (blended | (state.stage == FOSSILIZED)) * state.alpha
    contribution = CONTRIB_SCALE * (weight * q * _gain(state.style, state.tempo)).sum(-1)
    collapse = u < COLLAPSE_RATE * (blended * state.alpha * torch.relu(-q)).sum(-1)
    return contribution - COLLAPSE_PENALTY * collapse, collapse


@dataclass(frozen=True)
class Lifecycle:
    """``num_envs`` copies of the seed lifecycle on ``num_slots`` slots (see module doc)."""

    num_envs: int
    num_slots: int = 3
    max_steps: int = 150

    def __post_init__(self) -> None:
        for name in ("num_envs", "num_slots", "max_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")

    @property
    def spec(self) -> ActionSpec:
        return lifecycle_spec(self.num_slots)

    @property
    def obs_dim(self) -> int:
        return self.num_slots * SLOT_FEATURES + GLOBAL_FEATURES

    def initial_state(self, key: Tensor) -> LifecycleState:
        """Empty slots; blueprint qualities are ``BLUEPRINT_QUALITY`` shuffled per env."""
        return self.fresh_state(random.uniform(key, (self.num_envs, len(BLUEPRINT_QUALITY))))

    def fresh_state(self, u: Tensor) -> LifecycleState:
        """``initial_state`` from uniform numbers ``[N, 13]``: their argsort shuffles."""
        n, s, nb, dev = self.num_envs, self.num_slots, len(BLUEPRINT_QUALITY), u.device
        order = torch.argsort(u, dim=-1, stable=True)
        quality = _table(BLUEPRINT_QUALITY, order)
        ints, floats = torch.zeros(n, s, dtype=torch.int64, device=dev), quality.new_zeros(n, s)
        bp = quality.new_zeros(n, nb)
        counts = torch.zeros(n, 2, dtype=torch.int64, device=dev)
        return LifecycleState(*(ints,) * 8, *(floats,) * 6, quality, bp, bp, counts, ints[:, 0])

    def observe(self, state: LifecycleState) -> Tensor:
        """float32 ``[N, obs_dim]``: ``SLOT_FEATURES`` per slot, then ``GLOBAL_FEATURES``.

        Per slot: stage one-hot; age / 10 (at most 1); alpha, its target, blend phase; mean
        and count / 10 (at most 1) of the seed's samples; embargo ticks left / 8; then style,
        tempo and blueprint one-hots (zero unless a seed is live or fossilized). Global: the
        fraction of time left, fossils of quality > 0 and <= 0 over ``num_slots``, then the mean
        and count / 10 (at most 1) of the samples of each blueprint.
        """
        st = state.stage
        live = ((st >= GERMINATED) & (st <= FOSSILIZED)).unsqueeze(-1)
        embargo_left = torch.where(st == EMBARGOED, state.embargo - state.age, 0) / MAX_EMBARGO
        scalars = [
            (state.age / AGE_NORM).clamp(max=1.0),
            state.alpha,
            state.alpha_target,
            state.phase,
            state.est_sum / state.est_count.clamp(min=1.0),
            (state.est_count / COUNT_NORM).clamp(max=1.0),
            embargo_left,
        ]
        heads = (
            (state.style, STYLE_GAIN),
            (state.tempo, TEMPO_GAIN),
            (state.blueprint, BLUEPRINT_QUALITY),
        )
        slots = [_one_hot(st, len(STAGES)), torch.stack(scalars, -1)]
        slots += [live & _one_hot(idx, len(table)) for idx, table in heads]
        glob = [
            (1.0 - state.steps / self.max_steps).unsqueeze(-1),
            state.fossils / self.num_slots,
            state.bp_sum / state.bp_count.clamp(min=1.0),
            (state.bp_count / COUNT_NORM).clamp(max=1.0),
        ]
        slots = torch.cat([x.float() for x in slots], -1).flatten(1)
        return torch.cat([slots, *(x.float() for x in glob)], -1)

    def reset(self, key: Tensor) -> ResetResult:
        state = self.initial_state(key)
        return ResetResult(state, self.observe(state), lifecycle_masks(self.spec, state))

    def step(
        self, env_state: LifecycleState, actions: Mapping[str, Tensor], key: Tensor
    ) -> StepResult:
        """Op, automatic transitions, tick, payoff; envs that end restart.

        Every random number comes from one draw ``u = uniform(key, [N, S + 14])`` (one hash loop
        when compiled): ``u[:, :S]`` the sample noise, ``u[:, S]`` the collapse test,
        ``u[:, S + 1:]`` the fresh episodes (:meth:`fresh_state`).
        """
        check_actions(self.spec, self.num_envs, actions)
        s, u = (
            self.num_slots,
            random.uniform(key, (self.num_envs, self.num_slots + 1 + len(BLUEPRINT_QUALITY))),
        )
        state, reward = _apply_op(env_state, actions)
        state = _tick(_auto_transitions(state), NOISE_SCALE * (2.0 * u[:, :s] - 1.0))
        contribution, terminated = _payoff(state, u[:, s])
        state = state._replace(steps=state.steps + 1)
        truncated = state.steps >= self.max_steps
        final_obs = self.observe(state)
        state = where_done(terminated | truncated, self.fresh_state(u[:, s + 1 :]), state)
        return StepResult(
            env_state=state,
            obs=self.observe(state),
            reward=(reward + contribution).float(),
            terminated=terminated,
            truncated=truncated,
            masks=lifecycle_masks(self.spec, state),
            final_obs=final_obs,
        )
