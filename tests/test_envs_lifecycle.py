"""Tests for funcppo.envs.lifecycle (the seed-lifecycle env) and its reference policies."""

from __future__ import annotations

import functools

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from funcppo.core import random
from funcppo.envs import ENVS, Env, StepResult, lifecycle, make_env
from funcppo.envs.lifecycle import (
    ACTION_COST,
    ADVANCE,
    ALPHA_STEPS,
    ALPHA_TARGETS,
    BLENDING,
    BLUEPRINT_QUALITY,
    COLLAPSE_PENALTY,
    COLLAPSE_RATE,
    CONTRIB_SCALE,
    CURVE_POWER,
    DORMANT,
    EMBARGOED,
    FOSSIL_BONUS,
    FOSSILIZE,
    FOSSILIZED,
    GERMINATE,
    GERMINATE_CURVE,
    GERMINATE_SPEED,
    GERMINATED,
    HOLDING,
    MIN_PRUNE_AGE,
    NOISE_SCALE,
    ORACLE_RETURN,
    PRUNE,
    PRUNE_SHOCK,
    PRUNED,
    RANDOM_RETURN,
    REFERENCE_RETURN,
    SET_ALPHA_TARGET,
    SLOT_FEATURES,
    STAGES,
    STYLE_GAIN,
    STYLE_NOISE,
    TEMPO_GAIN,
    TEMPO_STEPS,
    TRAINING,
    WAIT,
    Lifecycle,
    LifecycleState,
)
from funcppo.envs.lifecycle_policy import (
    episode_returns,
    heuristic_policy,
    oracle_policy,
    random_policy,
)
from funcppo.envs.lifecycle_spec import LIFECYCLE_OPS, lifecycle_spec

SETTINGS = settings(max_examples=30, deadline=None)
SPEC = lifecycle_spec(3)
ARGS = [name for name in SPEC.names if name != "op"]


def act(n: int, **values) -> dict[str, torch.Tensor]:
    """Actions for ``n`` envs: every head 0 unless given (an int or a list)."""
    return {
        name: torch.as_tensor(values.get(name, 0), dtype=torch.int64).expand(n).clone()
        for name in SPEC.names
    }


@functools.cache
def trace() -> list:
    """(state, obs, masks, actions, key) along a random-policy rollout of 16 envs, with resets."""
    env = Lifecycle(16, max_steps=70)
    res = env.reset(random.key(0))
    state, obs, masks, steps = res.env_state, res.obs, res.masks, []
    for t in range(110):
        k_act, k_step = random.split(random.fold_in(random.key(1), t))
        actions = random_policy(state, obs, masks, k_act)
        steps.append((state, obs, masks, actions, k_step))
        out = env.step(state, actions, k_step)
        state, obs, masks = out.env_state, out.obs, out.masks
    return steps


def ref_legal(stage: int, age: int, tempo: int, phase: float) -> list[bool]:
    """Naive legality of each op (in LIFECYCLE_OPS order) on one slot."""
    live = GERMINATED <= stage <= HOLDING
    by_name = {
        "WAIT": True,
        "GERMINATE": stage == DORMANT,
        "SET_ALPHA_TARGET": stage in (BLENDING, HOLDING),
        "PRUNE": live and age >= MIN_PRUNE_AGE,
        "FOSSILIZE": stage == HOLDING,
        "ADVANCE": stage == GERMINATED
        or (stage == TRAINING and age >= TEMPO_STEPS[tempo])
        or (stage == BLENDING and phase >= 1.0),
    }
    return [by_name[name] for name in LIFECYCLE_OPS]


def ref_step(
    s: dict, a: dict, noise: list[float], u: float, rate: float = COLLAPSE_RATE
) -> tuple[dict, float, bool]:
    """One env's step as a plain Python loop over slots (the module docstring, literally)."""
    s = {k: list(v) if isinstance(v, list) else v for k, v in s.items()}
    op, k, reward = a["op"], a["slot"], 0.0
    if op != WAIT and ref_legal(s["stage"][k], s["age"][k], s["tempo"][k], s["phase"][k])[op]:
        q = s["quality"][s["blueprint"][k]]
        gain = STYLE_GAIN[s["style"][k]] * TEMPO_GAIN[s["tempo"][k]]
        reward -= ACTION_COST
        if op == GERMINATE:
            for name, value in [("stage", GERMINATED), ("blueprint", a["blueprint"]),
                                ("style", a["style"]), ("tempo", a["tempo"]),
                                ("speed", GERMINATE_SPEED), ("curve", GERMINATE_CURVE),
                                ("alpha_target", ALPHA_TARGETS[a["alpha_target"]]),
                                ("alpha", 0.0), ("alpha_start", 0.0), ("phase", 0.0),
                                ("est_sum", 0.0), ("est_count", 0.0)]:  # fmt: skip
                s[name][k] = value
        elif op == ADVANCE:
            if s["stage"][k] == TRAINING:
                s["alpha_start"][k], s["phase"][k] = s["alpha"][k], 0.0
            s["stage"][k] += 1
        elif op == SET_ALPHA_TARGET:
            s["stage"][k], s["style"][k] = BLENDING, a["style"]
            s["speed"][k], s["curve"][k] = a["alpha_speed"], a["alpha_curve"]
            s["alpha_target"][k] = ALPHA_TARGETS[a["alpha_target"]]
            s["alpha_start"][k], s["phase"][k] = s["alpha"][k], 0.0
        elif op == PRUNE:
            embargo = 1 + a["alpha_speed"] + a["alpha_curve"]
            reward -= PRUNE_SHOCK * s["alpha"][k] / embargo
            s["stage"][k], s["embargo"][k], s["alpha"][k] = PRUNED, embargo, 0.0
        elif op == FOSSILIZE:
            reward += FOSSIL_BONUS * q * s["alpha"][k] * gain
            s["stage"][k] = FOSSILIZED
            s["fossils"][0 if q > 0 else 1] += 1
        s["age"][k] = 0
    risk = 0.0
    for j in range(len(s["stage"])):
        if s["stage"][j] == PRUNED and s["age"][j] >= 1:
            s["stage"][j], s["age"][j] = EMBARGOED, 0
        elif s["stage"][j] == EMBARGOED and s["age"][j] >= s["embargo"][j]:
            s["stage"][j], s["age"][j] = DORMANT, 0
        s["age"][j] += 1
        q = s["quality"][s["blueprint"][j]]
        if s["stage"][j] == BLENDING:
            s["phase"][j] = min(1.0, s["phase"][j] + 1.0 / ALPHA_STEPS[s["speed"][j]])
            shape = s["phase"][j] ** CURVE_POWER[s["curve"][j]]
            start = s["alpha_start"][j]
            s["alpha"][j] = start + (s["alpha_target"][j] - start) * shape
        if s["stage"][j] in (TRAINING, BLENDING):
            sample = q + STYLE_NOISE[s["style"][j]] * noise[j]
            s["est_sum"][j] += sample
            s["est_count"][j] += 1
            s["bp_sum"][s["blueprint"][j]] += sample
            s["bp_count"][s["blueprint"][j]] += 1
        if s["stage"][j] in (BLENDING, HOLDING, FOSSILIZED):
            gain = STYLE_GAIN[s["style"][j]] * TEMPO_GAIN[s["tempo"][j]]
            reward += CONTRIB_SCALE * q * s["alpha"][j] * gain
        if s["stage"][j] in (BLENDING, HOLDING):
            risk += rate * max(0.0, -q) * s["alpha"][j]
    s["steps"] += 1
    collapse = u < risk
    return s, reward - COLLAPSE_PENALTY * collapse, collapse


def draws(key: torch.Tensor, n: int, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's random numbers: sample noise ``[n, s]``, collapse ``u`` ``[n]``, reset ``u``."""
    u = random.uniform(key, (n, s + 1 + len(BLUEPRINT_QUALITY)))
    return NOISE_SCALE * (2.0 * u[:, :s] - 1.0), u[:, s], u[:, s + 1 :]


def env_dict(state: LifecycleState, i: int) -> dict:
    return {name: value[i].tolist() for name, value in state._asdict().items()}


def test_step_matches_python_reference_over_rollouts(monkeypatch):
    steps = trace()[::2]  # drawn at the real collapse rate
    # A collapse rate 1000x the real one makes collapses common enough to check the rule.
    rate = 10.0
    monkeypatch.setattr(lifecycle, "COLLAPSE_RATE", rate)
    env, checked, collapses = Lifecycle(16, max_steps=70), 0, 0
    for t, (state, _, _, actions, key) in enumerate(steps):
        if t % 2:  # half the steps take uniformly random actions, mostly illegal
            g = torch.Generator().manual_seed(t)
            actions = {n: torch.randint(0, SPEC.size(n), (16,), generator=g) for n in SPEC.names}
        out = env.step(state, actions, key)
        noise, u, _ = draws(key, 16, 3)
        for i in range(16):
            a = {name: int(v[i]) for name, v in actions.items()}
            s_i, noise_i = env_dict(state, i), noise[i].tolist()
            ref, reward, collapse = ref_step(s_i, a, noise_i, float(u[i]), rate)
            assert out.terminated[i].item() == collapse
            collapses += collapse
            assert out.reward[i].item() == pytest.approx(reward, abs=1e-5)
            ref_state = LifecycleState(**{n: torch.tensor([v]) for n, v in ref.items()})
            ref_obs = Lifecycle(1, max_steps=70).observe(ref_state)
            torch.testing.assert_close(out.final_obs[i], ref_obs[0], rtol=0, atol=1e-5)
            if not (out.terminated[i] or out.truncated[i]):
                got = env_dict(out.env_state, i)
                for name, value in ref.items():
                    assert got[name] == pytest.approx(value, abs=1e-5), name
                checked += 1
    assert checked > 300 and collapses > 10, collapses


def test_masks_match_reference_and_invariants():
    seen = set()
    for state, _, masks, actions, _ in trace()[::2]:
        assert masks["op"].shape == (16, 6) and masks["slot"].shape == (16, 6, 3)
        assert masks["op"][:, LIFECYCLE_OPS.index("WAIT")].all()
        assert torch.equal(masks["op"], masks["slot"].any(-1))  # a legal op has a valid slot
        for name in ARGS[1:]:
            assert masks[name].shape == (16, SPEC.size(name)) and masks[name].all()
        for i in range(16):
            for j in range(3):
                stage, age = int(state.stage[i, j]), int(state.age[i, j])
                ref = ref_legal(stage, age, int(state.tempo[i, j]), float(state.phase[i, j]))
                assert masks["slot"][i, :, j].tolist() == ref
                seen.add(stage)
        # random_policy samples valid actions only
        row = masks["slot"][torch.arange(16), actions["op"]]
        assert row[torch.arange(16), actions["slot"]].all()
    assert seen == set(range(len(STAGES)))


@SETTINGS
@given(st.integers(0, 109), st.integers(0, 2**31), st.booleans())
def test_irrelevant_heads_have_no_effect(t, seed, legal_only):
    state, _, _, actions, key = trace()[t]
    g = torch.Generator().manual_seed(seed)
    if not legal_only:
        actions = {n: torch.randint(0, SPEC.size(n), (16,), generator=g) for n in SPEC.names}
    other = {n: torch.randint(0, SPEC.size(n), (16,), generator=g) for n in SPEC.names}
    causal = SPEC.causal_table()[actions["op"]]  # [16, n_heads]
    mixed = {n: torch.where(causal[:, h], actions[n], other[n]) for h, n in enumerate(SPEC.names)}
    env = Lifecycle(16, max_steps=70)
    a, b = env.step(state, actions, key), env.step(state, mixed, key)
    for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("op", range(1, 6))
def test_relevant_heads_change_the_next_state(op):
    env = Lifecycle(16, max_steps=70)
    for name in sorted(SPEC.causal[op] - {"op"}):
        changed = False
        for state, _, masks, _, key in trace():
            legal = masks["slot"][:, op]
            if not legal.any():
                continue
            slot = legal.int().argmax(-1)
            base = act(16, op=op, slot=slot)
            alt = {**base, name: (base[name] + 1) % SPEC.size(name)}
            if name == "slot":
                alt["slot"] = torch.where(legal.sum(-1) > 1, 2 - legal.flip(-1).int().argmax(-1), 3)
            x, y = env.step(state, base, key), env.step(state, alt, key)
            if any(not torch.equal(p, q) for p, q in zip(x.env_state, y.env_state, strict=True)):
                changed = True
                break
        assert changed, (LIFECYCLE_OPS[op], name)


def hand_state(n_slots: int = 2) -> LifecycleState:
    """One env, empty slots, blueprint b has quality BLUEPRINT_QUALITY[b] (no shuffle)."""
    state = Lifecycle(1, n_slots).initial_state(random.key(0))
    return state._replace(quality=torch.tensor([BLUEPRINT_QUALITY]))


def test_stage_transitions_hand_checked():
    env, state = Lifecycle(1, 2), hand_state()

    def step(**a):
        nonlocal state
        key = random.fold_in(random.key(5), int(state.steps[0]))
        out = env.step(state, act(1, **a), key)
        noise = draws(key, 1, 2)[0][0]
        state = out.env_state
        return out, noise

    # GERMINATE slot 1: blueprint 1 (q 0.8), style 2 (noise 0.7, gain 1.1), tempo 0 (2 ticks,
    # gain 0.8), alpha target index 1 (0.7).
    out, _ = step(op=GERMINATE, slot=1, blueprint=1, style=2, tempo=0, alpha_target=1)
    assert state.stage[0].tolist() == [DORMANT, GERMINATED] and state.age[0].tolist() == [1, 1]
    assert out.reward.item() == pytest.approx(-0.001)
    assert out.masks["slot"][0, :, 1].tolist() == [True, False, False, False, False, True]
    assert out.masks["slot"][0, :, 0].tolist() == [True, True, False, False, False, False]
    out, n1 = step(op=ADVANCE, slot=1)
    assert state.stage[0, 1] == TRAINING and state.est_count[0, 1] == 1
    assert state.est_sum[0, 1].item() == pytest.approx(0.8 + 0.7 * n1[1].item(), abs=1e-6)
    assert not out.masks["op"][0, ADVANCE] and not out.masks["op"][0, PRUNE]  # age 1 < 2
    out, n2 = step()  # WAIT: age 2 = TEMPO_STEPS[0], so ADVANCE and PRUNE open
    assert out.masks["slot"][0, :, 1].tolist() == [True, False, False, True, False, True]
    obs = out.obs[0, SLOT_FEATURES : 2 * SLOT_FEATURES]
    assert obs[TRAINING] == 1 and obs[len(STAGES)].item() == pytest.approx(0.2)  # age / 10
    mean = 0.8 + 0.35 * (n1[1] + n2[1]).item()
    assert obs[len(STAGES) + 4].item() == pytest.approx(mean, abs=1e-6)
    # ADVANCE to BLENDING: 4-tick linear blend to 0.7 -> alpha 0.175 after one tick.
    out, _ = step(op=ADVANCE, slot=1)
    assert state.stage[0, 1] == BLENDING and state.alpha[0, 1].item() == pytest.approx(0.175)
    gain = 1.1 * 0.8
    assert out.reward.item() == pytest.approx(-0.001 + 0.01 * 0.8 * 0.175 * gain)
    # SET_ALPHA_TARGET: style 3 (gain 1.3), target 1.0, 2 ticks (speed 1), curve p^2.
    out, _ = step(op=SET_ALPHA_TARGET, slot=1, style=3, alpha_target=2, alpha_speed=1,
                  alpha_curve=4)  # fmt: skip
    alpha, gain = 0.175 + (1.0 - 0.175) * 0.25, 1.3 * 0.8
    assert state.alpha[0, 1].item() == pytest.approx(alpha) and state.phase[0, 1] == 0.5
    assert out.reward.item() == pytest.approx(-0.001 + 0.01 * 0.8 * alpha * gain)
    assert not out.masks["op"][0, ADVANCE]
    out, _ = step()
    assert state.alpha[0, 1].item() == pytest.approx(1.0) and out.masks["slot"][0, ADVANCE, 1]
    out, _ = step(op=ADVANCE, slot=1)
    assert state.stage[0, 1] == HOLDING and state.est_count[0, 1] == 5  # 2 training + 3 blend
    assert out.masks["slot"][0, :, 1].tolist() == [True, False, True, False, True, False]
    out, _ = step(op=FOSSILIZE, slot=1)
    fossil_reward = 0.01 * 0.8 * gain
    assert out.reward.item() == pytest.approx(0.5 * 0.8 * gain - 0.001 + fossil_reward)
    assert state.stage[0, 1] == FOSSILIZED and state.fossils[0].tolist() == [1, 0]
    assert out.masks["slot"][0, :, 1].tolist() == [True] + [False] * 5
    # Slot 0: blueprint 12 (q -1), pruned from TRAINING at speed 2, curve 1: embargo 4 ticks.
    step(op=GERMINATE, slot=0, blueprint=12)
    step(op=ADVANCE, slot=0)
    step()
    out, _ = step(op=PRUNE, slot=0, alpha_speed=2, alpha_curve=1)
    assert out.reward.item() == pytest.approx(-0.001 + fossil_reward)  # alpha 0: no shock
    assert state.stage[0, 0] == PRUNED and state.embargo[0, 0] == 4
    stages = [int(step()[0].env_state.stage[0, 0]) for _ in range(6)]
    assert stages == [EMBARGOED] * 4 + [DORMANT] * 2
    assert state.bp_count[0].tolist() == [0, 5] + [0] * 10 + [2]


def test_prune_shock_and_collapse():
    # Slots 0, 1 HOLDING q -1 at alpha 1; slot 2 FOSSILIZED q -0.6 at alpha 0.5 (no risk).
    n = 4096
    state = hand_state(3)._replace(
        stage=torch.tensor([[HOLDING, HOLDING, FOSSILIZED]]),
        blueprint=torch.tensor([[12, 12, 11]]),
        alpha=torch.tensor([[1.0, 1.0, 0.5]]),
        alpha_target=torch.tensor([[1.0, 1.0, 0.5]]),
        phase=torch.tensor([[1.0, 1.0, 1.0]]),
        style=torch.tensor([[1, 1, 1]]),
        tempo=torch.tensor([[1, 1, 1]]),
        age=torch.tensor([[3, 3, 3]]),
    )
    state = optree.tree_map(lambda x: x.expand(n, *x.shape[1:]).clone(), state)
    env, key = Lifecycle(n, 3), random.key(9)
    out = env.step(state, act(n, op=PRUNE, slot=0), key)  # speed 0, curve 0: embargo 1
    _, u, fresh_u = draws(key, n, 3)
    risk = COLLAPSE_RATE * 1.0  # slot 1 only: slot 0 is pruned, slot 2 fossilized
    assert torch.equal(out.terminated, u < risk)
    assert 0.5 * n * risk < out.terminated.sum() < 1.5 * n * risk
    contribution = 0.01 * 0.9 * (-1.0 - 0.6 * 0.5)
    expected = -0.001 - 0.1 * 1.0 / 1 + contribution - COLLAPSE_PENALTY * out.terminated.float()
    torch.testing.assert_close(out.reward, expected)
    fresh = env.fresh_state(fresh_u)
    dead = out.terminated
    assert torch.equal(out.env_state.stage[dead], fresh.stage[dead])
    assert (out.env_state.stage[~dead, 0] == PRUNED).all()


def test_truncation_final_obs_and_auto_reset():
    env, key = Lifecycle(4, max_steps=150), random.key(3)
    res = env.reset(key)
    assert res.masks["op"].tolist() == [[True, True, False, False, False, False]] * 4
    state = res.env_state
    for t in range(150):
        k = random.fold_in(key, t)
        out = env.step(state, act(4), k)  # WAIT only: nothing is active, nothing collapses
        assert not out.terminated.any() and out.truncated.all() == (t == 149)
        assert (out.reward == 0).all()
        state = out.env_state
    fresh = env.fresh_state(draws(k, 4, 3)[2])
    torch.testing.assert_close(out.obs, env.observe(fresh), rtol=0, atol=0)
    for got, want in zip(out.env_state, fresh, strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(out.env_state.quality, res.env_state.quality)
    assert (out.final_obs[:, 3 * SLOT_FEATURES] == 0).all()  # no time left
    assert (out.obs[:, 3 * SLOT_FEATURES] == 1).all() and (state.steps == 0).all()


@SETTINGS
@given(st.integers(0, 2**40), st.integers(1, 5), st.integers(1, 4))
def test_reset_shuffles_qualities(seed, n, slots):
    env = Lifecycle(n, slots)
    res = env.reset(random.key(seed))
    assert res.obs.shape == (n, env.obs_dim) and res.obs.dtype == torch.float32
    expected = torch.tensor(sorted(BLUEPRINT_QUALITY))
    assert torch.equal(res.env_state.quality.sort(-1).values, expected.expand(n, -1))
    assert res.masks["slot"].shape == (n, 6, slots)


def rollout(env, key, steps, policy=random_policy):
    """Stacked obs, reward, flags and final_obs of a policy rollout."""
    reset_key, loop_key = random.split(key)
    res = env.reset(reset_key)
    state, obs, masks, rows = res.env_state, res.obs, res.masks, []
    for t in range(steps):
        k_act, k_step = random.split(random.fold_in(loop_key, t))
        out = env.step(state, policy(state, obs, masks, k_act), k_step)
        state, obs, masks = out.env_state, out.obs, out.masks
        flags = torch.stack([out.reward, out.terminated, out.truncated], -1)
        rows.append(torch.cat([out.obs, out.final_obs, flags], -1))
    return torch.stack(rows)


def test_same_key_same_trajectory():
    env = Lifecycle(8, max_steps=30)
    a, b, c = (rollout(env, random.key(s), 40) for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a[..., -1].sum() > 0


def test_vmap_over_seeds_equals_loop(device):
    env = Lifecycle(5, max_steps=8)
    keys = torch.stack([random.key(s, device) for s in (7, 8, 9)])
    res = torch.func.vmap(env.reset)(keys)
    assert res.obs.shape == (3, 5, env.obs_dim) and res.masks["slot"].shape == (3, 5, 6, 3)
    states, masks = res.env_state, res.masks
    loop = [env.reset(k).env_state for k in keys]
    vstep = torch.func.vmap(env.step)
    for t in range(12):
        step_keys = torch.stack([random.fold_in(k, t) for k in keys])
        per_seed = [
            random_policy(None, None, {n: m[s] for n, m in masks.items()}, step_keys[s])
            for s in range(3)
        ]
        actions = {n: torch.stack([a[n] for a in per_seed]) for n in SPEC.names}
        out = vstep(states, actions, step_keys)
        states, masks = out.env_state, out.masks
        for s in range(3):
            ref = env.step(loop[s], {n: a[s] for n, a in actions.items()}, step_keys[s])
            loop[s] = ref.env_state
            for got, want in zip(optree.tree_leaves(out), optree.tree_leaves(ref), strict=True):
                torch.testing.assert_close(got[s], want, rtol=0, atol=0)
    assert (states.stage != DORMANT).any()
    batched = torch.func.vmap(heuristic_policy)(states, out.obs, masks)
    for s in range(3):
        tree = optree.tree_map(lambda x, s=s: x[s], (states, out.obs, masks))
        for name, value in heuristic_policy(*tree).items():
            assert torch.equal(batched[name][s], value)


@pytest.mark.slow
def test_compile_step_equals_eager():
    env = Lifecycle(16, max_steps=70)
    state, _, _, actions, key = trace()[60]
    torch._dynamo.reset()
    compiled = torch.compile(env.step, fullgraph=True)
    got, want = compiled(state, actions, key), env.step(state, actions, key)
    assert isinstance(got, StepResult)
    for x, y in zip(optree.tree_leaves(got), optree.tree_leaves(want), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_heuristic_beats_random():
    env = Lifecycle(64)
    heuristic = episode_returns(env, heuristic_policy, random.key(11))
    uniform = episode_returns(env, random_policy, random.key(11))
    assert heuristic.mean() > uniform.mean() + 3.0, (heuristic.mean(), uniform.mean())
    assert (heuristic > uniform.median()).float().mean() > 0.95
    # The documented 256-episode means are not stale (5 standard errors at 64 episodes).
    assert abs(heuristic.mean() - REFERENCE_RETURN) < 5 * heuristic.std() / 8
    assert abs(uniform.mean() - RANDOM_RETURN) < 5 * uniform.std() / 8


def test_oracle_bounds_heuristic():
    env = Lifecycle(64)
    oracle = episode_returns(env, oracle_policy, random.key(11))
    heuristic = episode_returns(env, heuristic_policy, random.key(11))
    # Told the qualities, the rules plant the best blueprint at once: every episode the same.
    assert oracle.min() > heuristic.mean() + 1.0, (oracle.min(), heuristic.mean())
    assert abs(oracle.mean() - ORACLE_RETURN) < 0.01


@SETTINGS
@given(st.integers(0, 109), st.integers(0, 2**31))
def test_heuristic_is_valid_and_ignores_hidden_quality(t, seed):
    state, obs, masks, _, _ = trace()[t]
    actions = heuristic_policy(state, obs, masks)
    row = masks["slot"][torch.arange(16), actions["op"]]
    assert row[torch.arange(16), actions["slot"]].all()
    g = torch.Generator().manual_seed(seed)
    shuffled = state._replace(quality=state.quality[:, torch.randperm(13, generator=g)])
    for name, value in heuristic_policy(shuffled, obs, masks).items():
        assert torch.equal(value, actions[name])


def test_tables_match_spec_and_registry():
    for table, head in [(BLUEPRINT_QUALITY, "blueprint"), (STYLE_GAIN, "style"),
                        (STYLE_NOISE, "style"), (TEMPO_GAIN, "tempo"), (TEMPO_STEPS, "tempo"),
                        (ALPHA_TARGETS, "alpha_target"), (ALPHA_STEPS, "alpha_speed"),
                        (CURVE_POWER, "alpha_curve")]:  # fmt: skip
        assert len(table) == SPEC.size(head)
    env = make_env("lifecycle", 4)
    assert "lifecycle" in ENVS and env == Lifecycle(4) and isinstance(env, Env)
    assert hash(env) == hash(Lifecycle(4)) and env.spec == SPEC
    assert env.reset(random.key(0)).obs.shape == (4, env.obs_dim)


@pytest.mark.parametrize(
    "kwargs", [{"num_envs": 0}, {"num_envs": 2, "num_slots": 0}, {"num_envs": 2, "max_steps": 0}]
)
def test_bad_config(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs.keys() - {"num_envs"}), "num_envs")):
        Lifecycle(**kwargs)


def test_step_rejects_bad_actions():
    env = Lifecycle(3)
    state = env.reset(random.key(0)).env_state
    bad = act(3)
    bad["slot"] = bad["slot"].int()
    for actions in (bad, {k: v for k, v in act(3).items() if k != "tempo"}, act(4)):
        with pytest.raises(ValueError, match="actions"):
            env.step(state, actions, random.key(1))
