"""Tests for funcppo.core.distributions: torch Categorical, reference loops, hand values,
properties, vmap over seeds and compile."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Categorical
from torch.func import vmap

from funcppo.core import random as R
from funcppo.core.constants import MASK_FILL_FRACTION
from funcppo.core.distributions import (
    factored_entropy,
    factored_logprob,
    factored_sample,
    mask_stats,
    masked_entropy,
    masked_entropy_raw,
    masked_log_softmax,
    masked_logits,
    masked_logprob,
    masked_sample,
    validate_masks,
)
from funcppo.core.spec import ActionSpec, causal_masks
from funcppo.envs.lifecycle_spec import lifecycle_spec

SETTINGS = settings(max_examples=40, deadline=None)


def small_spec():
    return ActionSpec(
        {"op": 3, "slot": 2, "kind": 4},
        "op",
        causal=[[], ["slot", "kind"], ["slot"]],
        op_conditioned=["slot"],
        op_names=["WAIT", "BUILD", "MOVE"],
    )


def random_row_masks(shape, gen, p=0.5):
    """Bool ``shape`` with at least one True in every last-axis row."""
    mask = torch.rand(shape, generator=gen) < p
    first = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    return mask | (torch.arange(shape[-1]) == first.unsqueeze(-1))


def factored_inputs(spec, batch, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    logits, masks = {}, {}
    for name, size in spec.heads:
        rows = (*batch, spec.n_ops, size) if name in spec.op_conditioned else (*batch, size)
        logits[name] = 3 * torch.randn((*batch, size), generator=gen, dtype=dtype)
        masks[name] = random_row_masks(rows, gen)
    return logits, masks


def ref_row(logits, mask):
    """Plain-Python masked log-softmax and entropy (nats) of one row."""
    valid = [x for x, m in zip(logits, mask, strict=True) if m]
    top = max(valid)
    lse = top + math.log(sum(math.exp(x - top) for x in valid))
    log_p = [x - lse if m else -math.inf for x, m in zip(logits, mask, strict=True)]
    ent = -sum(math.exp(lp) * lp for lp in log_p if lp != -math.inf)
    return log_p, ent


def categorical(logits, mask):
    return Categorical(logits=torch.where(mask, logits, -math.inf))


@st.composite
def masked_rows(draw, max_n=8, bound=1e6):
    rows, n = draw(st.integers(1, 4)), draw(st.integers(1, max_n))
    values = st.floats(-bound, bound, allow_nan=False, allow_infinity=False)
    logits = draw(st.lists(st.lists(values, min_size=n, max_size=n), min_size=rows, max_size=rows))
    flags = st.lists(st.booleans(), min_size=n, max_size=n)
    mask = draw(st.lists(flags, min_size=rows, max_size=rows))
    keep = draw(st.lists(st.integers(0, n - 1), min_size=rows, max_size=rows))
    for row, k in zip(mask, keep, strict=True):
        row[k] = True
    return torch.tensor(logits, dtype=torch.float64), torch.tensor(mask)


def test_hand_values():
    logits = torch.tensor([0.0, math.log(3.0), 5.0], dtype=torch.float64)
    mask = torch.tensor([True, True, False])
    log_p = masked_log_softmax(logits, mask)
    torch.testing.assert_close(log_p[:2], torch.tensor([math.log(0.25), math.log(0.75)]).double())
    assert float(log_p[2].exp()) == 0.0
    assert float(masked_logprob(logits, mask, torch.tensor(1))) == pytest.approx(math.log(0.75))
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert float(masked_entropy_raw(logits, mask)) == pytest.approx(h)
    assert float(masked_entropy(logits, mask)) == pytest.approx(h / math.log(2))
    uniform = masked_entropy(torch.zeros(4), torch.tensor([True, True, True, False]))
    assert float(uniform) == pytest.approx(1.0)


def test_single_valid_action_is_exactly_zero():
    logits = torch.tensor([[3.0, -2.0, 7.0], [1e6, -1e6, 0.0]], requires_grad=True)
    mask = torch.tensor([[False, True, False], [False, True, False]])
    lp = masked_logprob(logits, mask, torch.tensor([1, 1]))
    ent, raw = masked_entropy(logits, mask), masked_entropy_raw(logits, mask)
    assert lp.tolist() == [0.0, 0.0] and ent.tolist() == [0.0, 0.0] and raw.tolist() == [0.0, 0.0]
    (grad,) = torch.autograd.grad((lp + ent + raw).sum(), logits)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_fill_value_and_very_negative_valid_logits(dtype):
    fill = torch.finfo(dtype).min * MASK_FILL_FRACTION
    logits = torch.tensor([0.0, -100.0, 5.0], dtype=dtype)
    out = masked_logits(logits, torch.tensor([True, True, False]))
    assert out.dtype == dtype and out[:2].tolist() == [0.0, -100.0]
    assert out[2] == torch.tensor(fill, dtype=dtype) and bool(torch.isfinite(out[2]))
    # Valid logits far below a fixed -1e4 fill still beat the masked entry.
    low = -0.25 * float(torch.finfo(dtype).max)
    logits = torch.tensor([low, low, 0.0], dtype=dtype)
    probs = masked_log_softmax(logits, torch.tensor([True, True, False])).double().exp()
    half = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    torch.testing.assert_close(probs, half, rtol=0, atol=torch.finfo(dtype).eps)
    assert float(probs[2]) == 0.0


@SETTINGS
@given(seed=st.integers(0, 10_000), n=st.integers(1, 9))
def test_matches_torch_categorical_and_reference_loop(seed, n):
    gen = torch.Generator().manual_seed(seed)
    logits = 4 * torch.randn(6, n, generator=gen, dtype=torch.float64)
    mask = random_row_masks((6, n), gen)
    actions = torch.multinomial(mask.double(), 1, generator=gen).squeeze(-1)
    dist = categorical(logits, mask)
    torch.testing.assert_close(masked_logprob(logits, mask, actions), dist.log_prob(actions))
    torch.testing.assert_close(masked_entropy_raw(logits, mask), dist.entropy())
    n_valid = mask.sum(-1).double()
    expected = torch.where(n_valid > 1, dist.entropy() / n_valid.log(), 0.0)
    torch.testing.assert_close(masked_entropy(logits, mask), expected)
    log_p = masked_log_softmax(logits, mask)
    for i in range(6):
        ref_lp, ref_ent = ref_row(logits[i].tolist(), mask[i].tolist())
        for j in range(n):
            if mask[i, j]:
                assert float(log_p[i, j]) == pytest.approx(ref_lp[j], abs=1e-12)
        assert float(masked_entropy_raw(logits[i], mask[i])) == pytest.approx(ref_ent, abs=1e-12)


@SETTINGS
@given(data=masked_rows(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_finite_and_bounded_for_extreme_logits(data, dtype):
    logits, mask = data
    logits = logits.to(dtype).requires_grad_(True)
    n = logits.shape[-1]
    all_actions = torch.arange(n).expand(logits.shape)
    # Row i, column a: log pi_i(a) for every action a, masked ones included.
    rows_l, rows_m = logits.unsqueeze(-2).expand(-1, n, -1), mask.unsqueeze(-2).expand(-1, n, -1)
    lp = masked_logprob(rows_l, rows_m, all_actions)
    ent, raw = masked_entropy(logits, mask), masked_entropy_raw(logits, mask)
    assert bool(torch.isfinite(lp).all() & torch.isfinite(ent).all() & torch.isfinite(raw).all())
    probs = lp.detach().double().exp()
    assert bool((probs[~mask] < 1e-30).all())
    ones = torch.ones(probs.shape[0], dtype=torch.float64)
    torch.testing.assert_close(probs.sum(-1), ones, rtol=0, atol=1e-5)
    assert bool(((ent >= 0) & (ent <= 1)).all())
    log_n = mask.sum(-1).double().log()
    assert bool(((raw >= 0) & (raw.double() <= log_n + 1e-5)).all())
    (grad,) = torch.autograd.grad(lp.sum() + ent.sum() + raw.sum(), logits)
    assert bool(torch.isfinite(grad).all())


@SETTINGS
@given(data=masked_rows(max_n=6, bound=1e6), seed=st.integers(0, 2**31))
def test_masked_actions_never_sampled(data, seed):
    logits, mask = data
    big_l, big_m = logits.repeat(500, 1), mask.repeat(500, 1)
    samples = masked_sample(big_l.float(), big_m, R.key(seed))
    assert samples.dtype == torch.int64
    assert bool(big_m.gather(-1, samples.unsqueeze(-1)).all())


def test_masked_never_sampled_against_huge_masked_logits():
    logits = torch.tensor([[1e6, -1e6, 1e6, -1e6], [3e38, -3e38, 3e38, -3e38]])
    mask = torch.tensor([[False, True, False, True]] * 2)
    samples = masked_sample(logits.repeat(5000, 1), mask.repeat(5000, 1), R.key(0))
    assert set(samples.tolist()) == {1, 3}


@pytest.mark.parametrize(
    ("logits", "mask"),
    [
        ([0.5, -1.0, 2.0, 0.1, 1.2], [True, True, False, True, True]),
        ([-1e6, -1e6 + 1.0, 0.0, -1e6 + 3.0], [True, True, False, True]),
    ],
)
def test_sampling_frequencies_match_softmax(logits, mask):
    n_draws = 50_000
    logits, mask = torch.tensor(logits), torch.tensor(mask)
    samples = masked_sample(logits.expand(n_draws, -1), mask.expand(n_draws, -1), R.key(5))
    counts = torch.bincount(samples, minlength=logits.numel()).double()
    assert float(counts[~mask].sum()) == 0.0
    expected = n_draws * categorical(logits.double(), mask).probs[mask]
    chi2 = float(((counts[mask] - expected) ** 2 / expected).sum())
    # 3 degrees of freedom for 4 valid actions: chi2 > 25 has probability ~1.6e-5.
    assert chi2 < 25


def ref_factored_logprob(spec, logits, masks, actions):
    """Per-head loop over batch rows: masked log-prob if the op uses the head, else 0."""
    batch = actions[spec.op_head].shape[0]
    out = {name: torch.zeros(batch, dtype=torch.float64) for name in spec.names}
    for b in range(batch):
        op = int(actions[spec.op_head][b])
        for name in spec.causal[op]:
            m = masks[name][b, op] if name in spec.op_conditioned else masks[name][b]
            log_p, _ = ref_row(logits[name][b].tolist(), m.tolist())
            out[name][b] = log_p[int(actions[name][b])]
    return out


@pytest.mark.parametrize("spec", [small_spec(), lifecycle_spec(3)], ids=["small", "lifecycle"])
def test_factored_sample_and_logprob_against_loops(spec):
    logits, masks = factored_inputs(spec, (300,), seed=1)
    key = R.key(8)
    actions = factored_sample(spec, logits, masks, key)
    # One Gumbel draw for all heads, head i on the next size_i columns, worked row by row.
    sizes = [size for _, size in spec.heads]
    noise = R.gumbel(key, (300, sum(sizes)), logits[spec.op_head].dtype)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    op = actions[spec.op_head]
    for i, name in enumerate(spec.names):
        m = masks[name][torch.arange(300), op] if name in spec.op_conditioned else masks[name]
        assert bool(m.gather(-1, actions[name].unsqueeze(-1)).all()), name
        for b in range(0, 300, 37):
            g = noise[b, offsets[i] : offsets[i] + sizes[i]]
            score = [
                logits[name][b, a] + g[a] if m[b, a] else -float("inf") for a in range(sizes[i])
            ]
            assert int(actions[name][b]) == max(range(sizes[i]), key=lambda a: score[a]), name
    per_head, joint = factored_logprob(spec, logits, masks, actions)
    ref = ref_factored_logprob(spec, logits, masks, actions)
    causal = causal_masks(spec, op)
    for name in spec.names:
        torch.testing.assert_close(per_head[name], ref[name])
        assert bool((per_head[name][~causal[name]] == 0).all())
    torch.testing.assert_close(joint, sum(ref.values()))


def test_irrelevant_head_gets_exactly_zero_gradient():
    spec = small_spec()
    logits, masks = factored_inputs(spec, (4,), seed=2)
    # WAIT uses only the op head; BUILD uses all. Irrelevant actions may even be masked ones.
    actions = {
        "op": torch.tensor([0, 0, 1, 2]),
        "slot": torch.tensor([0, 1, 0, 1]),
        "kind": torch.tensor([3, 3, 0, 2]),
    }
    masks["op"] = torch.ones(4, 3, dtype=torch.bool)
    masks["slot"][2, 1] = torch.tensor([True, False])
    masks["slot"][3, 2] = torch.tensor([False, True])
    masks["kind"][2] = torch.tensor([True, True, False, False])
    masks["kind"][:2] = False  # rows the op ignores may have no valid action at all
    leaves = {n: v.clone().requires_grad_(True) for n, v in logits.items()}
    per_head, joint = factored_logprob(spec, leaves, masks, actions)
    assert per_head["kind"][:2].tolist() == [0.0, 0.0] and per_head["slot"][:2].tolist() == [0, 0]
    assert per_head["kind"][3] == 0.0
    grads = torch.autograd.grad(joint.sum(), list(leaves.values()))
    grad = dict(zip(leaves, grads, strict=True))
    assert torch.equal(grad["kind"][[0, 1, 3]], torch.zeros(3, 4, dtype=torch.float64))
    assert torch.equal(grad["slot"][:2], torch.zeros(2, 2, dtype=torch.float64))
    assert bool((grad["kind"][2, :2] != 0).all()) and bool((grad["op"] != 0).all())
    assert grad["kind"][2, 2:].tolist() == [0.0, 0.0]  # masked logits of a relevant head
    assert bool(torch.isfinite(joint).all())


def test_factored_entropy_is_raw_per_head_with_resolved_masks():
    spec = small_spec()
    logits, masks = factored_inputs(spec, (5,), seed=3)
    actions = {"op": torch.tensor([0, 1, 2, 0, 1])}
    ent = factored_entropy(spec, logits, masks, actions)
    for b in range(5):
        op = int(actions["op"][b])
        for name in spec.names:
            m = masks[name][b, op] if name in spec.op_conditioned else masks[name][b]
            _, h = ref_row(logits[name][b].tolist(), m.tolist())
            n_valid = int(m.sum())
            want = h / math.log(n_valid) if n_valid > 1 else 0.0
            assert float(ent[name][b]) == pytest.approx(want, abs=1e-12), (name, b)


def test_mask_stats_by_hand_and_against_loop():
    spec = small_spec()
    masks = {
        "op": torch.ones(4, 3, dtype=torch.bool),
        "slot": torch.tensor([[[True, False], [True, True], [False, True]]] * 4),
        "kind": torch.tensor([[True] * 4, [True, False, False, False], [True] * 4, [True] * 4]),
    }
    ops = torch.tensor([0, 1, 1, 2])
    stats = mask_stats(spec, masks, ops)
    # slot rows taken: [T,F], [T,T], [T,T], [F,T] -> single 2/4; relevant for ops 1,1,2 -> 3/4;
    # of those, >1 valid at steps 1, 2 -> 2/3. kind relevant for op 1 only (steps 1, 2): step 1
    # has one valid action, step 2 four -> learnable 1/2; single-action steps 1/4.
    assert stats["slot"].single_action_fraction.item() == pytest.approx(0.5)
    assert stats["slot"].relevant_fraction.item() == pytest.approx(0.75)
    assert stats["slot"].learnable_fraction.item() == pytest.approx(2 / 3)
    assert stats["kind"].single_action_fraction.item() == pytest.approx(0.25)
    assert stats["kind"].learnable_fraction.item() == pytest.approx(0.5)
    assert stats["op"].relevant_fraction.item() == 1.0
    none_relevant = mask_stats(spec, masks, torch.zeros(4, dtype=torch.int64))
    assert none_relevant["kind"].learnable_fraction.item() == 0.0
    # Against a loop on random masks.
    _, masks = factored_inputs(spec, (50,), seed=4)
    ops = torch.randint(0, 3, (50,), generator=torch.Generator().manual_seed(0))
    stats = mask_stats(spec, masks, ops)
    for name in spec.names:
        single = relevant = learnable = 0
        for b in range(50):
            op = int(ops[b])
            m = masks[name][b, op] if name in spec.op_conditioned else masks[name][b]
            single += int(m.sum()) == 1
            if name in spec.causal[op]:
                relevant += 1
                learnable += int(m.sum()) > 1
        assert stats[name].single_action_fraction.item() == pytest.approx(single / 50)
        assert stats[name].relevant_fraction.item() == pytest.approx(relevant / 50)
        assert stats[name].learnable_fraction.item() == pytest.approx(learnable / max(relevant, 1))


def valid_masks():
    return {
        "op": torch.tensor([[True, True, False], [True, False, False]]),
        "slot": torch.tensor([[[True, False], [False, True], [False, False]]] * 2),
        "kind": torch.ones(2, 4, dtype=torch.bool),
    }


def test_validate_masks_accepts_empty_rows_of_invalid_or_untaken_ops():
    masks = valid_masks()
    assert not bool(masks["slot"][:, 2].any())  # op 2 is invalid in both rows
    masks["slot"][1, 1] = False  # op 1 is invalid in row 1
    validate_masks(small_spec(), masks)
    masks["slot"][0, 0] = False  # op 0 is valid in row 0 but not taken below
    validate_masks(small_spec(), masks, op_actions=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="for op 0 WAIT"):
        validate_masks(small_spec(), masks)


def _edit(name, fn):
    masks = valid_masks()
    masks[name] = fn(masks[name])
    return masks


def _set(index, value):
    def fn(m):
        m = m.clone()
        m[index] = value
        return m

    return fn


@pytest.mark.parametrize(
    ("masks", "op_actions", "pattern"),
    [
        ({"op": valid_masks()["op"], "slot": valid_masks()["slot"]}, None, "missing \\['kind'\\]"),
        ({**valid_masks(), "extra": torch.ones(2, 1) > 0}, None, "unknown \\['extra'\\]"),
        (_edit("kind", lambda m: m.float()), None, "masks\\['kind'\\]: expected dtype torch.bool"),
        (_edit("kind", lambda m: m[:, :3]), None, "masks\\['kind'\\]: expected shape \\(2, 4\\)"),
        (_edit("slot", lambda m: m[:, 0]), None, "masks\\['slot'\\]: expected shape \\(2, 3, 2\\)"),
        (_edit("kind", _set(1, False)), None, "masks\\['kind'\\]: no valid action at .* \\(1,\\)"),
        (_edit("op", _set(0, False)), None, "masks\\['op'\\]: .* index \\(0,\\)"),
        (_edit("slot", _set((1, 0), False)), None, "masks\\['slot'\\]: .* \\(1,\\) for op 0 WAIT"),
        (_edit("slot", _set((0, 1), False)), torch.tensor([1, 0]), "slot.*\\(0,\\) for op 1 BUILD"),
        (valid_masks(), torch.tensor([0, 1]), "op_actions: taken op is masked .* index \\(1,\\)"),
        (valid_masks(), torch.tensor([0, 3]), "op_actions: out of range"),
        (valid_masks(), torch.tensor([0.0, 1.0]), "op_actions: expected int64"),
    ],
)  # fmt: skip
def test_validate_masks_errors_name_head_and_index(masks, op_actions, pattern):
    with pytest.raises(ValueError, match=pattern):
        validate_masks(small_spec(), masks, op_actions)


def test_static_argument_checks():
    logits, mask = torch.zeros(3, 4), torch.ones(3, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"mask: expected dtype torch\.bool"):
        masked_logits(logits, mask.float())
    with pytest.raises(ValueError, match="mask: expected the shape"):
        masked_entropy(logits, mask[:, :3])
    with pytest.raises(ValueError, match=r"actions: expected dtype torch\.int64"):
        masked_logprob(logits, mask, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="actions: expected shape"):
        masked_logprob(logits, mask, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="key: expected one key"):
        masked_sample(logits, mask, R.split(R.key(0), 3))


def test_vmap_over_seeds_and_batch_equals_loop():
    spec = small_spec()
    logits, masks = factored_inputs(spec, (6,), seed=5)
    keys = R.split(R.key(3), 4)
    l_op, m_op = logits["op"], masks["op"]
    batched = vmap(masked_sample, in_dims=(None, None, 0))(l_op, m_op, keys)
    fact = vmap(factored_sample, in_dims=(None, None, None, 0))(spec, logits, masks, keys)
    for s in range(4):
        assert torch.equal(batched[s], masked_sample(l_op, m_op, keys[s]))
        single = factored_sample(spec, logits, masks, keys[s])
        for name in spec.names:
            assert torch.equal(fact[name][s], single[name]), name
    actions = factored_sample(spec, logits, masks, keys[0])
    per_row = vmap(factored_logprob, in_dims=(None, 0, 0, 0))(spec, logits, masks, actions)
    ent_row = vmap(masked_entropy)(l_op, m_op)
    for b in range(6):
        row = [{n: v[b] for n, v in d.items()} for d in (logits, masks, actions)]
        heads, joint = factored_logprob(spec, *row)
        torch.testing.assert_close(per_row[1][b], joint, rtol=0, atol=0)
        for name in spec.names:
            torch.testing.assert_close(per_row[0][name][b], heads[name], rtol=0, atol=0)
        torch.testing.assert_close(ent_row[b], masked_entropy(l_op[b], m_op[b]), rtol=0, atol=0)


def compiled_target(spec, logits, masks, actions, key):
    logit, mask, action = logits["kind"], masks["kind"], actions["kind"]
    return (
        masked_logprob(logit, mask, action),
        masked_entropy(logit, mask),
        masked_sample(logit, mask, key),
        factored_sample(spec, logits, masks, key),
    )


@pytest.mark.slow
def test_compile_equals_eager():
    # One graph for all four so the suite pays for a single cold compile.
    spec = small_spec()
    logits, masks = factored_inputs(spec, (8,), seed=6, dtype=torch.float32)
    actions = factored_sample(spec, logits, masks, R.key(1))
    args = (spec, logits, masks, actions, R.key(2))
    eager = compiled_target(*args)
    compiled = torch.compile(compiled_target, fullgraph=True)(*args)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-6, atol=1e-6)
    assert torch.equal(compiled[2], eager[2])
    for name in spec.names:
        assert torch.equal(compiled[3][name], eager[3][name]), name
