"""Tests for funcppo.core.advantages: GAE, per-head masking and normalisation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from funcppo.core.advantages import (
    explained_variance,
    gae,
    normalize_advantages,
    per_head_advantages,
)
from funcppo.core.constants import GAE_BLOCK_SIZE
from funcppo.core.spec import causal_masks
from funcppo.envs.lifecycle_spec import LIFECYCLE_OPS, lifecycle_spec

SETTINGS = settings(max_examples=40, deadline=None)
unit = st.floats(0.0, 1.0)


def gae_loop(rewards, values, next_values, terminated, truncated, gamma, gae_lambda):
    """Reference: the textbook backward loop, per column, in float64 Python numbers."""
    steps, cols = rewards.shape
    out = [[0.0] * cols for _ in range(steps)]
    for b in range(cols):
        running = 0.0
        for t in reversed(range(steps)):
            boot = 0.0 if terminated[t, b] else float(next_values[t, b])
            delta = float(rewards[t, b]) + gamma * boot - float(values[t, b])
            done = bool(terminated[t, b] or truncated[t, b])
            running = delta + gamma * gae_lambda * (0.0 if done else running)
            out[t][b] = running
    return torch.tensor(out, dtype=torch.float64)


def rollout(seed, steps, cols, p_term=0.05, p_trunc=0.05, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    floats = [torch.randn(steps, cols, generator=g, dtype=dtype) for _ in range(3)]
    terminated = torch.rand(steps, cols, generator=g) < p_term
    truncated = torch.rand(steps, cols, generator=g) < p_trunc
    return (*floats, terminated, truncated)


def assert_close_to_loop(adv, ref, rtol):
    # Relative to the largest advantage: an entry near 0 is a cancellation whose error is set
    # by the rounding of its inputs, and the float32 loop does no better there.
    scale = ref.abs().max().clamp(min=1.0)
    torch.testing.assert_close(adv.double(), ref, rtol=rtol, atol=rtol * scale)


def test_gae_hand_worked():
    # gamma = lambda = 0.5, so gamma * lambda = 0.25. Column 0 is truncated at t=1, column 1
    # terminated at t=1; otherwise identical.
    rewards = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    values = torch.tensor([[0.5, 0.5], [1.0, 1.0], [1.5, 1.5]])
    next_values = torch.tensor([[1.0, 1.0], [1.5, 1.5], [2.0, 2.0]])
    terminated = torch.tensor([[False, False], [False, True], [False, False]])
    truncated = torch.tensor([[False, False], [True, False], [False, False]])
    adv, ret = gae(rewards, values, next_values, terminated, truncated, 0.5, 0.5)
    # Column 0: delta = [1 + .5*1 - .5, 2 + .5*1.5 - 1, 3 + .5*2 - 1.5] = [1, 1.75, 2.5].
    #   A2 = 2.5 (bootstrapped via next_values); A1 = 1.75 (done: A2 not added);
    #   A0 = 1 + .25 * 1.75 = 1.4375.
    # Column 1: delta1 = 2 + 0 - 1 = 1 (no bootstrap); A2 = 2.5; A1 = 1; A0 = 1 + .25 = 1.25.
    expected = torch.tensor([[1.4375, 1.25], [1.75, 1.0], [2.5, 2.5]])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected + values)


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    steps=st.integers(1, 2 * GAE_BLOCK_SIZE + 5),
    cols=st.integers(1, 3),
    p_term=unit,
    p_trunc=unit,
    gamma=unit,
    gae_lambda=unit,
)
def test_gae_matches_loop(seed, steps, cols, p_term, p_trunc, gamma, gae_lambda):
    r, v, nv, term, trunc = rollout(seed, steps, cols, p_term, p_trunc, torch.float64)
    ref = gae_loop(r, v, nv, term, trunc, gamma, gae_lambda)
    adv, ret = gae(r, v, nv, term, trunc, gamma, gae_lambda)
    assert adv.dtype == ret.dtype == torch.float64
    assert_close_to_loop(adv, ref, 1e-10)
    torch.testing.assert_close(ret, adv + v, rtol=0, atol=0)
    adv32, _ = gae(r.float(), v.float(), nv.float(), term, trunc, gamma, gae_lambda)
    ref32 = gae_loop(r.float(), v.float(), nv.float(), term, trunc, gamma, gae_lambda)
    assert_close_to_loop(adv32, ref32, 1e-5)


@pytest.mark.parametrize("steps", [128, 512])
def test_gae_float32_precision_long_horizon(steps):
    r, v, nv, term, trunc = rollout(1, steps, 8, p_term=0.01, p_trunc=0.01)
    ref = gae_loop(r, v, nv, term, trunc, 0.995, 0.98)
    adv, _ = gae(r, v, nv, term, trunc, 0.995, 0.98)
    assert_close_to_loop(adv, ref, 1e-5)


def test_gae_float64_with_tensor_coefficients():
    r, v, nv, term, trunc = rollout(2, 70, 4, dtype=torch.float64)
    coef = {"dtype": torch.float64}
    adv, ret = gae(r, v, nv, term, trunc, torch.tensor(0.99, **coef), torch.tensor(0.95, **coef))
    assert adv.dtype == ret.dtype == torch.float64
    assert_close_to_loop(adv, gae_loop(r, v, nv, term, trunc, 0.99, 0.95), 1e-12)


def test_gae_lambda_extremes():
    r, v, nv, term, trunc = rollout(3, 40, 3, dtype=torch.float64)
    # lambda = 0: one-step TD error.
    adv0, _ = gae(r, v, nv, term, trunc, 0.9, 0.0)
    torch.testing.assert_close(adv0, r + 0.9 * torch.where(term, 0.0, nv) - v)
    # lambda = 1, V'_t = V_{t+1}, no truncation, last step terminated: the TD errors telescope
    # and returns are discounted reward sums.
    nv[:-1] = v[1:]
    done = term.clone()
    done[-1] = True
    _, ret = gae(r, v, nv, done, torch.zeros_like(done), 0.9, 1.0)
    mc = torch.zeros_like(r)
    running = torch.zeros(3, dtype=torch.float64)
    for t in reversed(range(40)):
        running = r[t] + 0.9 * torch.where(done[t], 0.0, running)
        mc[t] = running
    torch.testing.assert_close(ret, mc)


@SETTINGS
@given(
    seed=st.integers(0, 2**31),
    steps=st.integers(2, 80),
    cut=st.data(),
    kind=st.sampled_from(["terminated", "truncated"]),
)
def test_gae_nothing_leaks_across_done_or_columns(seed, steps, cut, kind):
    r, v, nv, term, trunc = rollout(seed, steps, 2, p_term=0.0, p_trunc=0.0)
    d = cut.draw(st.integers(0, steps - 2))
    (term if kind == "terminated" else trunc)[d, 0] = True
    adv, _ = gae(r, v, nv, term, trunc, 0.99, 0.95)
    noise = torch.randn(3, steps, 2) * 100
    after = torch.zeros(steps, 2, dtype=torch.bool)
    after[d + 1 :, 0] = True
    after[:, 1] = True  # the other column changes entirely
    r2, v2, nv2 = (torch.where(after, x + n, x) for x, n in zip((r, v, nv), noise, strict=True))
    adv2, _ = gae(r2, v2, nv2, term, trunc, 0.99, 0.95)
    assert torch.equal(adv2[: d + 1, 0], adv[: d + 1, 0])
    assert not torch.equal(adv2[:, 1], adv[:, 1])


def test_gae_truncation_bootstraps_and_termination_ignores_next_value():
    r, v, nv, term, trunc = rollout(4, 50, 2, p_term=0.0, p_trunc=0.0, dtype=torch.float64)
    d = 37
    trunc[d, 0] = True
    term[d, 1] = True
    adv, _ = gae(r, v, nv, term, trunc, 0.9, 0.8)
    bumped = nv.clone()
    bumped[d, 0] += 1.0
    bumped[d, 1] = math.nan  # a terminated step's next value is never read
    adv2, _ = gae(r, v, bumped, term, trunc, 0.9, 0.8)
    # dA_t / dV'_d = gamma * (gamma * lambda)^(d - t) for t <= d in the truncated column.
    lags = torch.arange(d, -1, -1, dtype=torch.float64)
    torch.testing.assert_close(adv2[: d + 1, 0] - adv[: d + 1, 0], 0.9 * 0.72**lags)
    torch.testing.assert_close(adv2[d + 1 :, 0], adv[d + 1 :, 0])
    assert torch.equal(adv2[:, 1], adv[:, 1])


def test_gae_vmap_per_seed_coefficients_matches_loop():
    seeds = 4
    data = [rollout(10 + s, 45, 3) for s in range(seeds)]
    stacked = [torch.stack(x) for x in zip(*data, strict=True)]
    gammas = torch.tensor([0.9, 0.99, 0.5, 1.0], dtype=torch.float64)  # cast to float32 inside
    lambdas = torch.tensor([0.95, 0.0, 1.0, 0.9])
    adv, ret = torch.func.vmap(gae)(*stacked, gammas, lambdas)
    assert adv.shape == (seeds, 45, 3) and adv.dtype == torch.float32
    for s in range(seeds):
        adv_s, ret_s = gae(*data[s], float(gammas[s]), float(lambdas[s]))
        torch.testing.assert_close(adv[s], adv_s)
        torch.testing.assert_close(ret[s], ret_s)
    # Only the coefficients batched: one rollout under several discounts.
    adv_g, _ = torch.func.vmap(gae, in_dims=(None,) * 5 + (0, 0))(*data[0], gammas, lambdas)
    for s in range(seeds):
        torch.testing.assert_close(adv_g[s], gae(*data[0], float(gammas[s]), float(lambdas[s]))[0])


@pytest.mark.slow
def test_gae_compiled_matches_eager():
    r, v, nv, term, trunc = rollout(5, 128, 8)
    compiled = torch.compile(gae, fullgraph=True)
    gamma, lam = torch.tensor(0.995), torch.tensor(0.98)
    adv_c, ret_c = compiled(r, v, nv, term, trunc, gamma, lam)
    adv_e, ret_e = gae(r, v, nv, term, trunc, gamma, lam)
    torch.testing.assert_close(adv_c, adv_e)
    torch.testing.assert_close(ret_c, ret_e)


@pytest.mark.slow
def test_gae_compiled_vmap_matches_eager():
    stacked = [
        torch.stack(x) for x in zip(*(rollout(20 + s, 40, 2) for s in range(3)), strict=True)
    ]
    gammas, lambdas = torch.tensor([0.9, 0.99, 0.5]), torch.tensor([0.95, 0.5, 1.0])
    fn = torch.func.vmap(gae)
    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(*stacked, gammas, lambdas), fn(*stacked, gammas, lambdas))


@pytest.mark.parametrize(
    ("field", "bad", "match"),
    [
        ("values", torch.zeros(4, 3), "values: expected shape"),
        ("next_values", torch.zeros(5, 3, dtype=torch.float64), "next_values: expected dtype"),
        ("terminated", torch.zeros(5, 3), "terminated: expected dtype torch.bool"),
        ("truncated", torch.zeros(5, 2, dtype=torch.bool), "truncated: expected shape"),
        ("rewards", torch.zeros(5, 3, dtype=torch.long), "rewards: expected a float"),
        ("rewards", torch.zeros(0, 3), "rewards: expected T >= 1"),
        ("gamma", 1.5, r"gamma: expected a value in \[0, 1\]"),
        ("gamma", torch.ones(2), "gamma: expected a 0-d tensor"),
        ("gae_lambda", "0.9", "gae_lambda: expected a float"),
    ],
)
def test_gae_rejects_bad_input(field, bad, match):
    r, v, nv, term, trunc = rollout(0, 5, 3)
    kwargs = dict(
        rewards=r, values=v, next_values=nv, terminated=term, truncated=trunc,
        gamma=0.99, gae_lambda=0.95,
    )  # fmt: skip
    kwargs[field] = bad
    if field == "rewards" and bad.shape[0] == 0:
        kwargs.update(values=bad, next_values=bad)
    with pytest.raises(ValueError, match=match):
        gae(**kwargs)


@SETTINGS
@given(seed=st.integers(0, 2**31), p=unit)
def test_per_head_advantages_exactly_zero_where_irrelevant(seed, p):
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(16, 4, generator=g)
    adv[0, 0] = -0.0
    adv[1, 1] = -math.inf
    causal = {"op": torch.ones(16, 4, dtype=torch.bool)}
    causal["slot"] = torch.rand(16, 4, generator=g) < p
    causal["blueprint"] = torch.zeros(16, 4, dtype=torch.bool)
    out = per_head_advantages(adv, causal)
    assert out.keys() == causal.keys()
    for name, mask in causal.items():
        assert torch.equal(out[name][mask], adv[mask])
        assert (out[name][~mask] == 0).all()
        assert not torch.signbit(out[name][~mask]).any()  # +0.0, never -0.0
    assert torch.equal(out["op"], adv)


def test_per_head_advantages_with_lifecycle_spec():
    spec = lifecycle_spec(num_slots=2)
    ops = torch.arange(len(LIFECYCLE_OPS))
    adv = -torch.arange(1.0, len(LIFECYCLE_OPS) + 1)
    out = per_head_advantages(adv, causal_masks(spec, ops))
    germinate = LIFECYCLE_OPS.index("GERMINATE")
    # Blueprint is read only by GERMINATE; op and slot by the rows that name them.
    expected_blueprint = torch.zeros_like(adv)
    expected_blueprint[germinate] = adv[germinate]
    assert torch.equal(out["blueprint"], expected_blueprint)
    assert torch.equal(out["op"], adv)
    assert torch.equal(out["slot"], torch.where(ops == 0, 0.0, adv))


def test_per_head_advantages_vmap_matches_loop_and_rejects_bad_masks():
    adv = torch.randn(3, 10)
    causal = {"op": torch.ones(3, 10, dtype=torch.bool), "slot": torch.rand(3, 10) < 0.5}
    batched = torch.func.vmap(per_head_advantages)(adv, causal)
    for s in range(3):
        one = per_head_advantages(adv[s], {k: m[s] for k, m in causal.items()})
        for name in causal:
            assert torch.equal(batched[name][s], one[name])
    with pytest.raises(ValueError, match=r"causal\['slot'\]: expected dtype torch.bool"):
        per_head_advantages(adv, {"slot": torch.ones(3, 10)})
    with pytest.raises(ValueError, match=r"causal\['op'\]: expected shape \(3, 10\)"):
        per_head_advantages(adv, {"op": torch.ones(10, dtype=torch.bool)})


def normalize_loop(adv, weights):
    """Reference: weighted mean and population std, element by element, in float64."""
    pairs = [(float(a), float(w)) for a, w in zip(adv.flatten(), weights.flatten(), strict=True)]
    total = sum(w for _, w in pairs)
    mean = sum(w * a for a, w in pairs if w) / total
    var = sum(w * (a - mean) ** 2 for a, w in pairs if w) / total
    std = max(math.sqrt(var), 1e-8)
    return torch.tensor([(a - mean) / std for a, _ in pairs], dtype=torch.float64).view(adv.shape)


def test_normalize_hand_worked():
    # mean 2.5, population variance (2.25 + .25 + .25 + 2.25) / 4 = 1.25.
    out = normalize_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(out, torch.tensor([-1.5, -0.5, 0.5, 1.5]) / math.sqrt(1.25))
    # Weights 3, 1 on 0, 10: mean 2.5, variance (3 * 6.25 + 56.25) / 4 = 18.75 = 3 * 2.5^2,
    # so the outputs are -2.5 / (2.5 sqrt 3) = -1/sqrt 3 and 7.5 / (2.5 sqrt 3) = sqrt 3.
    out = normalize_advantages(torch.tensor([0.0, 10.0]), torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(out, torch.tensor([-1 / math.sqrt(3), math.sqrt(3)]))


def test_normalize_unweighted_matches_torch():
    adv = torch.randn(64, 8) * 3 + 5
    expected = (adv - adv.mean()) / adv.std(unbiased=False)
    torch.testing.assert_close(normalize_advantages(adv), expected)


@SETTINGS
@given(seed=st.integers(0, 2**31), size=st.integers(2, 50), use_bool=st.booleans())
def test_normalize_weighted_properties(seed, size, use_bool):
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(size, generator=g, dtype=torch.float64) * 4 - 1
    weights = torch.rand(size, generator=g, dtype=torch.float64)
    weights = (weights < 0.7) if use_bool else weights * (weights < 0.7)
    weights[0] = True if use_bool else 0.5  # at least one sample counts
    out = normalize_advantages(adv, weights)
    w = weights.double()
    torch.testing.assert_close(out, normalize_loop(adv, w))
    mean = (w * out).sum() / w.sum()
    torch.testing.assert_close(mean, torch.zeros((), dtype=torch.float64), atol=1e-9, rtol=0)
    if ((adv - adv[weights != 0][0]) * (weights != 0)).abs().max() > 1e-6:
        std = ((w * (out - mean) ** 2).sum() / w.sum()).sqrt()
        torch.testing.assert_close(std, torch.ones((), dtype=torch.float64))


def test_normalize_bool_weights_equal_subset_and_ignore_masked_nan():
    adv = torch.randn(6, 5)
    keep = torch.rand(6, 5) < 0.6
    keep[0, 0] = True
    keep[0, 1] = False
    adv[0, 1] = math.nan  # padding: weight 0, must not reach the statistics
    out = normalize_advantages(adv, keep)
    torch.testing.assert_close(out[keep], normalize_advantages(adv[keep]))


def test_normalize_integer_weights_equal_repetition():
    adv = torch.tensor([0.3, -1.2, 2.0, 0.7])
    counts = torch.tensor([2, 0, 3, 1])
    out = normalize_advantages(adv, counts.float())
    repeated = normalize_advantages(adv.repeat_interleave(counts))
    torch.testing.assert_close(out.repeat_interleave(counts), repeated)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalize_degenerate_inputs_are_finite(dtype):
    assert torch.equal(
        normalize_advantages(torch.tensor([3.7], dtype=dtype)), torch.zeros(1, dtype=dtype)
    )
    scalar = normalize_advantages(torch.tensor(-2.0, dtype=dtype))
    assert scalar.shape == () and scalar == 0
    # All equal: exactly zero, not rounding noise of the mean divided by the floor.
    same = torch.full((7, 3), 100.1, dtype=dtype)
    assert torch.equal(normalize_advantages(same), torch.zeros_like(same))
    zero_w = normalize_advantages(torch.randn(5, dtype=dtype), torch.zeros(5, dtype=dtype))
    assert torch.equal(zero_w, torch.zeros(5, dtype=dtype))
    tiny = normalize_advantages(torch.tensor([1.0, 1.0 + 1e-12, 1.0 - 1e-12], dtype=dtype))
    assert torch.isfinite(tiny).all() and tiny.abs().max() < 1e-3


def test_normalize_vmap_matches_loop():
    adv = torch.randn(4, 20, 3)
    weights = (torch.rand(4, 20, 3) < 0.5).float()
    weights[2] = 0.0  # one seed with nothing to normalise
    batched = torch.func.vmap(normalize_advantages)(adv, weights)
    for s in range(4):
        assert torch.equal(batched[s], normalize_advantages(adv[s], weights[s]))


def test_normalize_and_per_head_compiled_match_eager():
    def fn(adv, weights, causal):
        return per_head_advantages(normalize_advantages(adv, weights), causal)

    adv, weights = torch.randn(32, 4), torch.rand(32, 4) < 0.8
    causal = {"op": torch.ones(32, 4, dtype=torch.bool), "slot": torch.rand(32, 4) < 0.3}
    compiled = torch.compile(fn, fullgraph=True)(adv, weights, causal)
    eager = fn(adv, weights, causal)
    for name in causal:
        torch.testing.assert_close(compiled[name], eager[name])
        assert torch.equal(compiled[name][~causal[name]], torch.zeros(int((~causal[name]).sum())))


@pytest.mark.parametrize(
    ("adv", "weights", "match"),
    [
        (torch.zeros(3, dtype=torch.long), None, "advantages: expected a float tensor"),
        (torch.zeros(0), None, "advantages: expected at least one element"),
        (torch.zeros(3), torch.ones(4), r"weights: expected shape \(3,\)"),
        (torch.zeros(3), torch.ones(3, dtype=torch.long), "weights: expected a float or bool"),
    ],
)
def test_normalize_rejects_bad_input(adv, weights, match):
    with pytest.raises(ValueError, match=match):
        normalize_advantages(adv, weights)


def test_non_finite_delta_stays_inside_its_episode():
    # A NaN reward poisons its own step and the earlier steps of the same episode only: not the
    # episode before the boundary, not the steps after it, and not another env.
    steps = 70
    rewards = torch.zeros(steps, 2)
    terminated = torch.zeros(steps, 2, dtype=torch.bool)
    truncated = torch.zeros(steps, 2, dtype=torch.bool)
    rewards[40, 0] = float("nan")
    terminated[20, 0] = True
    truncated[45, 0] = True
    zeros = torch.zeros(steps, 2)
    adv, _ = gae(rewards, zeros, zeros, terminated, truncated, 0.99, 0.95)
    poisoned = torch.zeros(steps, dtype=torch.bool)
    poisoned[21:41] = True
    assert torch.isnan(adv[:, 0]).eq(poisoned).all()
    assert torch.isfinite(adv[:, 1]).all()


# explained_variance ---------------------------------------------------------------------------


def test_explained_variance_hand_worked():
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    values = torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=torch.float64)
    every = torch.ones(4, dtype=torch.bool)
    # Var[R] = 1.25; R - V = [0, 0, 0, -1]: mean -0.25, Var = 0.1875 -> 1 - 0.15 = 0.85.
    assert explained_variance(values, returns, every).item() == pytest.approx(0.85)
    assert explained_variance(returns, returns, every).item() == 1.0
    # Weighted: the last step (and its NaN value) left out, the values then exact.
    nan_last = torch.cat([values[:3], torch.tensor([math.nan], dtype=torch.float64)])
    first_three = torch.tensor([True, True, True, False])
    assert explained_variance(nan_last, returns, first_three).item() == 1.0
    # Constant returns: nothing to explain, NaN (as CleanRL).
    assert math.isnan(explained_variance(values, torch.ones(4), every).item())


def test_explained_variance_vmap_matches_loop():
    g = torch.Generator().manual_seed(0)
    values, returns = torch.randn(3, 2, 5, generator=g), torch.randn(3, 2, 5, generator=g)
    weight = torch.rand(3, 2, 5, generator=g) < 0.7
    got = torch.func.vmap(explained_variance)(values, returns, weight)
    for i in range(3):
        assert torch.equal(got[i], explained_variance(values[i], returns[i], weight[i]))
