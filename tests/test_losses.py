"""Tests for funcppo.core.losses: reference loops, hand-worked values, properties, vmap, compile."""

from __future__ import annotations

import math

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import vmap

from funcppo.core.constants import (
    HEAD_LOG_RATIO_CLAMP,
    JOINT_LOG_RATIO_CLAMP,
    RATIO_COLLAPSE_THRESHOLD,
    RATIO_EXPLOSION_THRESHOLD,
)
from funcppo.core.losses import (
    LossCoefs,
    clip_fraction,
    clipped_surrogate,
    head_kl,
    head_log_ratios,
    joint_log_ratio,
    loss_info,
    loss_stats,
    masked_mean,
    ppo_loss,
    ppo_objective,
    ratio_diagnostic,
    value_loss,
    weighted_kl,
)

HEADS = ("op", "slot", "blueprint")
SETTINGS = settings(max_examples=40, deadline=None)


def t(xs, dtype=torch.float64):
    return torch.tensor(xs, dtype=dtype)


def make_batch(seed, shape=(12,), heads=HEADS, scale=1.0, dtype=torch.float64):
    """Random per-head inputs; the op head (first) is relevant at every step."""
    g = torch.Generator().manual_seed(seed)

    def randn():
        return torch.randn(shape, generator=g, dtype=dtype)

    causal = {h: torch.rand(shape, generator=g) < 0.5 for h in heads}
    causal[heads[0]] = torch.ones(shape, dtype=torch.bool)
    old = {h: -torch.rand(shape, generator=g, dtype=dtype) * 3 for h in heads}
    new = {h: old[h] + scale * 0.3 * randn() for h in heads}
    adv_full = randn()
    return dict(
        new_logprobs=new,
        old_logprobs=old,
        entropies={h: torch.rand(shape, generator=g, dtype=dtype) for h in heads},
        values=randn(),
        old_values=randn(),
        returns=randn(),
        advantages={h: torch.where(causal[h], adv_full, 0.0) for h in heads},
        causal=causal,
        availability={h: causal[h] | (torch.rand(shape, generator=g) < 0.5) for h in heads},
    )


def as_lists(batch):
    return optree.tree_map(lambda x: x.flatten().tolist(), batch)


def ref_mean(xs, ws):
    """Plain-loop masked mean with the max(1, n) denominator."""
    return sum(x * w for x, w in zip(xs, ws, strict=True)) / max(1.0, sum(float(w) for w in ws))


def ref_clip(x, lo, hi):
    return min(max(x, lo), hi)


def ref_losses(b, coefs):
    """Plain-Python reference of ppo_loss: loss, approx KL and joint clip fraction."""
    heads, n, c = list(b["new_logprobs"]), len(b["values"]), float(coefs.clip_coef)
    lr = {
        h: [
            ref_clip(b["new_logprobs"][h][i] - b["old_logprobs"][h][i], -20.0, 20.0)
            if b["causal"][h][i]
            else 0.0
            for i in range(n)
        ]
        for h in heads
    }
    policy = 0.0
    for h in heads:
        surr = []
        for i in range(n):
            r, a = math.exp(lr[h][i]), b["advantages"][h][i]
            surr.append(-min(r * a, ref_clip(r, 1 - c, 1 + c) * a))
        policy += ref_mean(surr, b["causal"][h])
    sq = []
    for i in range(n):
        v, vo, ret = b["values"][i], b["old_values"][i], b["returns"][i]
        unclipped = (v - ret) ** 2
        vc = vo + ref_clip(v - vo, -coefs.value_clip, coefs.value_clip)
        sq.append(max(unclipped, (vc - ret) ** 2) if coefs.clip_vloss else unclipped)
    value = 0.5 * sum(sq) / n
    hec = coefs.head_ent_coef or {}
    ent = [hec.get(h, 1.0) * ref_mean(b["entropies"][h], b["causal"][h]) for h in heads]
    floor = 0.0
    for h, f in (coefs.entropy_floor or {}).items():
        if any(b["availability"][h]):  # a head with no available step adds nothing
            floor += max(0.0, f - ref_mean(b["entropies"][h], b["availability"][h]))
    loss = (
        policy
        + coefs.vf_coef * value
        - coefs.ent_coef * sum(ent) / len(heads)
        + coefs.entropy_floor_coef * floor
    )
    kls, weights = [], []
    for h in heads:
        k3 = [math.exp(x) - 1 - x for x in lr[h]]
        kls.append(ref_mean(k3, b["causal"][h]))
        weights.append(sum(b["causal"][h]) / n)
    kl = sum(k * w for k, w in zip(kls, weights, strict=True)) / sum(weights)
    joint = [math.exp(ref_clip(sum(lr[h][i] for h in heads), -30.0, 30.0)) for i in range(n)]
    clipfrac = sum(abs(r - 1) > c for r in joint) / n
    return loss, kl, clipfrac


# masked_mean ---------------------------------------------------------------------------------


def test_masked_mean_hand_values():
    assert masked_mean(t([1.0, 2.0, 3.0]), torch.tensor([True, False, True])).item() == 2.0
    # Float weights: (1*0.5 + 3*1.5) / 2 = 2.5; an empty mask gives 0 (denominator max(1, 0)).
    assert masked_mean(t([1.0, 2.0, 3.0]), t([0.5, 0.0, 1.5])).item() == 2.5
    assert masked_mean(t([1.0, 2.0]), torch.tensor([False, False])).item() == 0.0
    # Fractional weight sum below 1 still divides by 1: (4 * 0.25) / 1.
    assert masked_mean(t([4.0]), t([0.25])).item() == 1.0


def test_masked_mean_ignores_nonfinite_where_masked():
    x = t([1.0, float("nan"), float("-inf")]).requires_grad_()
    m = masked_mean(x, torch.tensor([True, False, False]))
    (g,) = torch.autograd.grad(m, x)
    assert m.item() == 1.0
    assert g.tolist() == [1.0, 0.0, 0.0]


@SETTINGS
@given(st.lists(st.tuples(st.floats(-1e3, 1e3), st.floats(0, 2)), min_size=1, max_size=20))
def test_masked_mean_matches_loop(pairs):
    xs, ws = zip(*pairs, strict=True)
    assert masked_mean(t(xs), t(ws)).item() == pytest.approx(ref_mean(xs, ws), rel=1e-9, abs=1e-9)


# log ratios ----------------------------------------------------------------------------------


def test_head_and_joint_log_ratios_hand_values():
    new = {"op": t([0.0, -1.0, 50.0]), "arg": t([-2.0, -30.0, -0.5])}
    old = {"op": t([-1.0, -1.0, 0.0]), "arg": t([-1.0, 0.0, float("-inf")])}
    causal = {"op": torch.ones(3, dtype=torch.bool), "arg": torch.tensor([True, True, False])}
    lr = head_log_ratios(new, old, causal)
    # op: [1, 0, clamp(50) = 20]; arg: [-1, clamp(-30) = -20, irrelevant -> 0 despite -inf].
    assert lr["op"].tolist() == [1.0, 0.0, HEAD_LOG_RATIO_CLAMP]
    assert lr["arg"].tolist() == [-1.0, -HEAD_LOG_RATIO_CLAMP, 0.0]
    assert joint_log_ratio(lr).tolist() == [0.0, -20.0, 20.0]
    big = {"a": t([25.0, -25.0]), "b": t([25.0, 1.0])}
    assert joint_log_ratio(big).tolist() == [JOINT_LOG_RATIO_CLAMP, -24.0]


# KL ------------------------------------------------------------------------------------------

# Two heads, three steps. op ratios r = [1, 1.5, 0.5] (all relevant); arg ratios [-, 1.1, 0.5]
# with arg irrelevant at step 0. k3(r) = r - 1 - ln r:
#   op : [0, 0.5 - ln 1.5 = 0.0945349, -0.5 + ln 2 = 0.1931472] -> mean 0.2876821 / 3 = 0.0958940
#   arg: [-, 0.1 - ln 1.1 = 0.0046898, 0.1931472]               -> mean 0.1978370 / 2 = 0.0989185
# weights: op 3/3 = 1, arg 2/3 -> KL = (0.0958940 + 2/3 * 0.0989185) / (5/3) = 0.0971038.
HAND = dict(
    new_logprobs={"op": t([-1.0, math.log(1.5) - 1, math.log(0.5) - 1]),
                  "arg": t([-7.0, math.log(1.1) - 2, math.log(0.5) - 2])},
    old_logprobs={"op": t([-1.0, -1.0, -1.0]), "arg": t([-2.0, -2.0, -2.0])},
    causal={"op": torch.ones(3, dtype=torch.bool), "arg": torch.tensor([False, True, True])},
)  # fmt: skip


def test_kl_hand_values():
    kls = head_kl(**HAND)
    assert kls["op"].item() == pytest.approx(0.0958940, abs=1e-7)
    assert kls["arg"].item() == pytest.approx(0.0989185, abs=1e-7)
    assert weighted_kl(**HAND).item() == pytest.approx(0.0971038, abs=1e-7)


def test_kl_all_but_op_masked_equals_op_kl():
    # The op head is always relevant: with every other head masked out it alone carries the weight.
    b = make_batch(3)
    causal = {h: c if h == "op" else torch.zeros_like(c) for h, c in b["causal"].items()}
    kls = head_kl(b["new_logprobs"], b["old_logprobs"], causal)
    kl = weighted_kl(b["new_logprobs"], b["old_logprobs"], causal)
    assert kls["op"].item() > 0
    assert kl.item() == pytest.approx(kls["op"].item(), rel=1e-12)


@SETTINGS
@given(st.integers(0, 2**31 - 1))
def test_kl_matches_loop(seed):
    b = make_batch(seed, scale=3.0)
    coefs = LossCoefs()
    _, ref_kl, _ = ref_losses(as_lists(b), coefs)
    kl = weighted_kl(b["new_logprobs"], b["old_logprobs"], b["causal"])
    assert kl.item() == pytest.approx(ref_kl, rel=1e-9, abs=1e-12)


log_probs = st.lists(st.floats(-1e4, 1e4), min_size=4, max_size=4)


@SETTINGS
@given(log_probs, log_probs, log_probs, log_probs, st.lists(st.booleans(), min_size=4, max_size=4))
def test_kl_nonnegative_finite_and_zero_on_self(op_new, op_old, arg_new, arg_old, arg_mask):
    for dtype in (torch.float32, torch.float64):
        new = {"op": t(op_new, dtype), "arg": t(arg_new, dtype)}
        old = {"op": t(op_old, dtype), "arg": t(arg_old, dtype)}
        causal = {"op": torch.ones(4, dtype=torch.bool), "arg": torch.tensor(arg_mask)}
        kl = weighted_kl(new, old, causal)
        assert torch.isfinite(kl) and kl.item() >= 0
        assert all(
            v.item() >= 0 and math.isfinite(v.item()) for v in head_kl(new, old, causal).values()
        )
        assert weighted_kl(new, new, causal).item() == 0.0


# surrogate, clip fraction, value loss, ratio stats --------------------------------------------


def test_clipped_surrogate_hand_values():
    ratio, adv = t([1.0, 1.5, 0.5, 1.5, 0.5]), t([1.0, 2.0, -1.0, -1.0, 1.0])
    # [-min(1, 1), -min(3, 2.4), -min(-0.5, -0.8), -min(-1.5, -1.2), -min(0.5, 0.8)]
    expected = [-1.0, -2.4, 0.8, 1.5, -0.5]
    assert clipped_surrogate(ratio, adv, 0.2).tolist() == pytest.approx(expected, abs=1e-12)


@SETTINGS
@given(st.lists(st.tuples(st.floats(0, 5), st.floats(-10, 10)), min_size=1, max_size=20),
       st.floats(0.01, 0.9))  # fmt: skip
def test_clipped_surrogate_matches_loop(pairs, c):
    rs, advs = zip(*pairs, strict=True)
    expected = [-min(r * a, ref_clip(r, 1 - c, 1 + c) * a) for r, a in pairs]
    got = clipped_surrogate(t(rs), t(advs), c).tolist()
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert clipped_surrogate(t(rs), t(advs), t(c)).tolist() == got  # 0-d tensor coefficient


def test_clip_fraction_hand_values():
    ratio = t([1.0, 1.1, 1.3, 0.7, 0.85])
    assert clip_fraction(ratio, 0.2).item() == pytest.approx(2 / 5)
    assert clip_fraction(ratio, 0.2, torch.tensor([1, 0, 1, 0, 1]).bool()).item() == 1 / 3


def test_value_loss_hand_values():
    v, vo, ret = t([1.0, 2.0, 3.0]), t([1.5, 1.5, 1.5]), t([2.0, 2.0, 2.0])
    # Unclipped: (v - R)^2 = [1, 0, 1] -> 0.5 * 2/3.
    assert value_loss(v, vo, ret, False, 0.2).item() == pytest.approx(1 / 3)
    # Clipped: v_old + clamp(v - v_old, +-0.2) = [1.3, 1.7, 1.7] -> sq [0.49, 0.09, 0.09];
    # elementwise max with [1, 0, 1] = [1, 0.09, 1] -> 0.5 * 2.09 / 3.
    assert value_loss(v, vo, ret, True, 0.2).item() == pytest.approx(0.5 * 2.09 / 3)
    # value_clip is its own range: with 10 nothing clips and the loss is the unclipped one.
    assert value_loss(v, vo, ret, True, 10.0).item() == pytest.approx(1 / 3)


def ratio_batch(ratios, dtype=torch.float64):
    """One head, relevant at every step, whose (joint) ratios are ``ratios``."""
    r = torch.as_tensor(ratios, dtype=dtype)
    ones = torch.ones_like(r)
    return dict(
        new_logprobs={"op": r.log()},
        old_logprobs={"op": torch.zeros_like(r)},
        entropies={"op": 0.5 * ones},
        values=ones,
        old_values=ones,
        returns=ones,
        advantages={"op": ones},
        causal={"op": torch.ones_like(r, dtype=torch.bool)},
    )


def test_ratio_info_hand_values():
    _, info = ppo_loss(**ratio_batch([0.05, 1.0, 2.0, 8.95]), coefs=LossCoefs())
    s = info.ratio  # mean 3, deviations [-2.95, -2, -1, 5.95]
    assert (s.mean.item(), s.min.item(), s.max.item()) == pytest.approx((3.0, 0.05, 8.95))
    assert s.std.item() == pytest.approx(math.sqrt((2.95**2 + 4 + 1 + 5.95**2) / 4))
    assert s.explosion_fraction.item() == 0.25 and RATIO_EXPLOSION_THRESHOLD < 8.95
    assert s.collapse_fraction.item() == 0.25 and RATIO_COLLAPSE_THRESHOLD > 0.05
    _, one = ppo_loss(**ratio_batch([2.0]), coefs=LossCoefs())
    assert one.ratio.std.item() == 0.0


@SETTINGS
@given(st.lists(st.floats(0.01, 20.0), min_size=1, max_size=12))
def test_ratio_std_matches_population_std(ratios):
    # Taken around 1 from two means, it is still the population standard deviation.
    _, info = ppo_loss(**ratio_batch(ratios), coefs=LossCoefs())
    r = torch.tensor(ratios, dtype=torch.float64)
    assert info.ratio.std.item() == pytest.approx(r.std(correction=0).item(), rel=1e-6, abs=1e-6)


# ppo_loss ------------------------------------------------------------------------------------


def hand_ppo_inputs():
    # Same ratios as HAND; advantages op [1, 2, -1], arg [0, 2, -1] (0 where irrelevant).
    return dict(
        **HAND,
        entropies={"op": t([0.9, 0.6, 0.3]), "arg": t([0.7, 0.4, 0.2])},
        values=t([1.0, 2.0, 3.0]),
        old_values=t([1.5, 1.5, 1.5]),
        returns=t([2.0, 2.0, 2.0]),
        advantages={"op": t([1.0, 2.0, -1.0]), "arg": t([0.0, 2.0, -1.0])},
    )


def test_ppo_loss_hand_values():
    coefs = LossCoefs(entropy_floor={"arg": 0.6})
    avail = {"op": torch.ones(3, dtype=torch.bool), "arg": torch.tensor([True, True, False])}
    loss, info = ppo_loss(**hand_ppo_inputs(), coefs=coefs, availability=avail)
    # policy op : surrogates [-1, -2.4, 0.8] (see test_clipped_surrogate) -> mean -13/15
    # policy arg: step 1 r = 1.1 unclipped -> -2.2, step 2 -> 0.8         -> mean -0.7
    assert info.head_policy_loss["op"].item() == pytest.approx(-13 / 15)
    assert info.head_policy_loss["arg"].item() == pytest.approx(-0.7)
    assert info.policy_loss.item() == pytest.approx(-47 / 30)
    assert info.value_loss.item() == pytest.approx(0.5 * 2.09 / 3)  # test_value_loss clipped
    # Entropy: op mean 0.6, arg mean over relevant steps (0.4 + 0.2) / 2 = 0.3 -> average 0.45.
    assert info.head_entropy["arg"].item() == pytest.approx(0.3)
    assert info.entropy.item() == pytest.approx(0.45)
    # Floor: arg entropy where available (0.7 + 0.4) / 2 = 0.55 -> 0.1 * relu(0.6 - 0.55).
    assert info.entropy_floor_penalty.item() == pytest.approx(0.005)
    # -47/30 + 0.5 * 0.348333 - 0.01 * 0.45 + 0.005 = -1.392
    assert loss.item() == pytest.approx(-1.392)
    # Joint ratios [1, 1.65, 0.25]: 2 of 3 outside [0.8, 1.2]. arg: 1.1 in, 0.5 out -> 1/2.
    assert info.clip_fraction.item() == pytest.approx(2 / 3)
    assert info.head_clip_fraction["arg"].item() == pytest.approx(0.5)
    assert info.ratio.max.item() == pytest.approx(1.65)
    assert info.approx_kl.item() == pytest.approx(0.0971038, abs=1e-7)


def test_head_ratio_extremes_and_worst_head_hand_values():
    _, info = ppo_loss(**hand_ppo_inputs(), coefs=LossCoefs())
    # op ratios [1, 1.5, 0.5]; arg relevant at steps 1 and 2 only, ratios [1.1, 0.5].
    assert info.head_ratio_max["op"].item() == pytest.approx(1.5)
    assert info.head_ratio_max["arg"].item() == pytest.approx(1.1)
    assert info.head_ratio_min["arg"].item() == pytest.approx(0.5)
    # Deviations in log space: a: max(log 3, -log 0.9) = log 3; b: -log 0.05 = log 20; c: none.
    diag = ratio_diagnostic(
        {"a": t(3.0), "b": t(1.1), "c": t(-math.inf)},
        {"a": t(0.9), "b": t(0.05), "c": t(math.inf)},
        t(RATIO_EXPLOSION_THRESHOLD + 1),
        t(RATIO_COLLAPSE_THRESHOLD),
    )
    assert diag.worst_head.item() == 1
    assert diag.worst_log_deviation.item() == pytest.approx(math.log(20))
    assert diag.explosion.item() and not diag.collapse.item()
    none = ratio_diagnostic({"a": t(math.nan)}, {"a": t(math.nan)}, t(1.0), t(0.0))
    assert none.worst_head.item() == -1 and math.isnan(none.worst_log_deviation.item())
    assert none.collapse.item() and not none.explosion.item()


def test_entropy_is_averaged_over_heads_with_multipliers():
    b = make_batch(0, heads=("op", "a", "b", "c"))
    b["entropies"] = {h: torch.ones_like(x) for h, x in b["entropies"].items()}
    b["causal"] = {h: torch.ones_like(c) for h, c in b["causal"].items()}
    b.pop("availability")
    base, _ = ppo_loss(**b, coefs=LossCoefs(ent_coef=0.0))
    plain, _ = ppo_loss(**b, coefs=LossCoefs(ent_coef=0.05))
    # Four heads at entropy 1: the bonus is ent_coef (a mean over heads), not 4 * ent_coef.
    assert (base - plain).item() == pytest.approx(0.05)
    scaled, _ = ppo_loss(**b, coefs=LossCoefs(ent_coef=0.05, head_ent_coef={"a": 3.0}))
    assert (base - scaled).item() == pytest.approx(0.05 * (3 + 1 + 1 + 1) / 4)


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.booleans(), st.booleans())
def test_ppo_loss_matches_loop(seed, clip_vloss, floor):
    b = make_batch(seed, shape=(3, 4), scale=4.0)
    coefs = LossCoefs(
        clip_coef=0.15,
        vf_coef=0.7,
        ent_coef=0.02,
        head_ent_coef={"slot": 2.0},
        clip_vloss=clip_vloss,
        value_clip=0.3,
        entropy_floor={"slot": 0.6, "blueprint": 0.9} if floor else None,
        entropy_floor_coef=0.3,
    )
    loss, info = ppo_loss(**b, coefs=coefs)
    ref_loss, ref_kl, ref_clipfrac = ref_losses(as_lists(b), coefs)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-9, abs=1e-12)
    assert info.approx_kl.item() == pytest.approx(ref_kl, rel=1e-9, abs=1e-12)
    assert info.clip_fraction.item() == pytest.approx(ref_clipfrac)


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.floats(0.1, 1e4))
def test_irrelevant_head_gets_exactly_zero_gradient(seed, scale):
    b = make_batch(seed, scale=scale, dtype=torch.float32)
    new = {h: x.clone().requires_grad_() for h, x in b["new_logprobs"].items()}
    # Garbage at irrelevant steps (masked action log-probs) must not leak either.
    old = {h: torch.where(b["causal"][h], x, -math.inf) for h, x in b["old_logprobs"].items()}
    coefs = LossCoefs(entropy_floor={"slot": 0.5})
    loss, _ = ppo_loss(**{**b, "new_logprobs": new, "old_logprobs": old}, coefs=coefs)
    grads = torch.autograd.grad(loss, list(new.values()))
    assert torch.isfinite(loss)
    for h, g in zip(new, grads, strict=True):
        irrelevant = ~b["causal"][h]
        assert torch.equal(g[irrelevant], torch.zeros_like(g[irrelevant])), h


def test_entropy_floor_of_a_head_never_available_adds_nothing():
    # No step where the head could have mattered: no entropy to push, so no penalty either.
    b = make_batch(3, shape=(6,))
    b["availability"] = dict(b["availability"], slot=torch.zeros(6, dtype=torch.bool))
    no_floor, _ = ppo_loss(**b, coefs=LossCoefs(entropy_floor_coef=0.5))
    coefs = LossCoefs(entropy_floor={"slot": 0.6}, entropy_floor_coef=0.5)
    loss, info = ppo_loss(**b, coefs=coefs)
    assert info.entropy_floor_penalty.item() == 0.0
    assert loss.item() == no_floor.item()
    # A head available somewhere keeps its floor.
    b["availability"]["slot"][0] = True
    _, info = ppo_loss(**b, coefs=coefs)
    expected = 0.5 * max(0.0, 0.6 - b["entropies"]["slot"][0].item())
    assert info.entropy_floor_penalty.item() == pytest.approx(expected)


def test_clip_fraction_uses_joint_ratio():
    # Each head's ratio 1.15 is inside [0.8, 1.2]; their product 1.3225 is outside.
    lr = math.log(1.15)
    b = make_batch(1, shape=(4,), heads=("op", "arg"))
    b["causal"] = {h: torch.ones(4, dtype=torch.bool) for h in ("op", "arg")}
    b["new_logprobs"] = {h: b["old_logprobs"][h] + lr for h in ("op", "arg")}
    _, info = ppo_loss(**b, coefs=LossCoefs(clip_coef=0.2))
    assert all(v.item() == 0.0 for v in info.head_clip_fraction.values())
    assert info.clip_fraction.item() == 1.0
    assert info.ratio.mean.item() == pytest.approx(1.15**2)


def test_bad_arguments_raise():
    b = make_batch(0)
    with pytest.raises(ValueError, match="availability"):
        ppo_loss(**{**b, "availability": None}, coefs=LossCoefs(entropy_floor={"slot": 0.5}))
    with pytest.raises(ValueError, match="advantages"):
        ppo_loss(**{**b, "advantages": {"op": b["values"]}}, coefs=LossCoefs())
    with pytest.raises(ValueError, match=r"entropies\['slot'\].*shape"):
        ents = {**b["entropies"], "slot": torch.zeros(5)}
        ppo_loss(**{**b, "entropies": ents}, coefs=LossCoefs())
    with pytest.raises(ValueError, match=r"causal.*bool"):
        causal = {h: c.double() for h, c in b["causal"].items()}
        ppo_loss(**{**b, "causal": causal}, coefs=LossCoefs())
    with pytest.raises(ValueError, match="head_ent_coef"):
        ppo_loss(**b, coefs=LossCoefs(head_ent_coef={"nope": 1.0}))


def test_ppo_loss_is_the_objective_of_its_stats():
    b = make_batch(4, shape=(7,))
    coefs = LossCoefs(entropy_floor={"slot": 0.9}, head_ent_coef={"blueprint": 2.0})
    loss, info = ppo_loss(**b, coefs=coefs)
    stats = loss_stats(**b, coefs=coefs)
    assert ppo_objective(stats.means, stats.counts, coefs).item() == loss.item()
    assert_trees_close(loss_info(stats, coefs), info)
    assert stats.counts.steps == 7
    assert {h: c.item() for h, c in stats.counts.causal.items()} == {
        h: int(c.sum()) for h, c in b["causal"].items()
    }
    assert list(stats.counts.available) == ["slot"] == list(stats.means.available)


# vmap and compile ----------------------------------------------------------------------------


def assert_trees_close(a, b, **kw):
    leaves_a, spec_a = optree.tree_flatten(a)
    leaves_b, spec_b = optree.tree_flatten(b)
    assert spec_a == spec_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        torch.testing.assert_close(x, y, **kw)


def test_vmap_over_seeds_with_per_seed_coefs_matches_loop():
    n_seeds = 3
    batches = [make_batch(s, shape=(5, 2), dtype=torch.float32) for s in range(n_seeds)]
    stacked = optree.tree_map(lambda *xs: torch.stack(xs), *batches)
    clip, ent = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.0, 0.01, 0.5])
    floor = torch.tensor([0.2, 0.5, 0.9])

    def loss_fn(batch, c, e, f):
        coefs = LossCoefs(clip_coef=c, ent_coef=e, entropy_floor={"slot": f}, value_clip=c)
        return ppo_loss(**batch, coefs=coefs)

    got = vmap(loss_fn)(stacked, clip, ent, floor)
    for s in range(n_seeds):
        expected = loss_fn(batches[s], clip[s], ent[s], floor[s])
        assert_trees_close(optree.tree_map(lambda x, s=s: x[s], got), expected)


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    b = make_batch(7, shape=(6,), dtype=torch.float32)
    coefs = LossCoefs(head_ent_coef={"slot": 2.0}, entropy_floor={"blueprint": 0.7})
    compiled = torch.compile(ppo_loss, fullgraph=True)
    assert_trees_close(compiled(**b, coefs=coefs), ppo_loss(**b, coefs=coefs))
