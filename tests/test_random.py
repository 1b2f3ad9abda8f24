"""Tests for funcppo.core.random: plain-int reference, hand values, statistics, vmap, compile."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import vmap

from funcppo.core import random as R

SETTINGS = settings(max_examples=30, deadline=None)
N = 100_000
M32 = 0xFFFFFFFF


def ref_mul(a, c):
    return (a * c) & M32


def ref_fmix32(h):
    h ^= h >> 16
    h = ref_mul(h, 0x85EBCA6B)
    h ^= h >> 13
    h = ref_mul(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def ref_hash(k0, k1, counter):
    h = ref_fmix32((ref_mul(counter, 0x9E3779B9) + k0) & M32)
    h = ref_fmix32(h ^ k1)
    return ref_fmix32((h + (counter ^ k0)) & M32)


def ref_key(seed):
    return [ref_fmix32((seed & M32) ^ 0x165667B1), ref_fmix32(((seed >> 32) & M32) ^ 0x9E3779B9)]


def ref_bits(k, n):
    return [ref_hash(k[0], k[1], c) for c in range(n)]


def ref_split(k, n):
    words = [ref_hash(k[0] ^ 0x5BD1E995, k[1], c) for c in range(2 * n)]
    return [words[2 * i : 2 * i + 2] for i in range(n)]


def ref_fold_in(k, data):
    d = data & M32
    return [ref_hash(k[0] ^ 0x27D4EB2F, k[1], c) for c in (d, d ^ M32)]


def corr(x, y):
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def test_key_zero_by_hand():
    # fmix32(0x165667B1) and fmix32(0x9E3779B9), worked out with Python ints above.
    assert ref_key(0) == [0xBCF51837, 0x92CA2F0E]
    assert R.key(0).tolist() == [0xBCF51837, 0x92CA2F0E]
    assert R.key(0).dtype == torch.int64 and R.key(0).shape == (2,)


@SETTINGS
@given(seed=st.integers(-(2**63), 2**63 - 1))
def test_key_matches_reference(seed):
    assert R.key(seed).tolist() == ref_key(seed)


@SETTINGS
@given(seed=st.integers(0, 2**40), data=st.integers(-(2**40), 2**40), n=st.integers(1, 5))
def test_bits_split_fold_in_match_reference(seed, data, n):
    k = ref_key(seed)
    assert R.bits(R.key(seed), (3, 4)).flatten().tolist() == ref_bits(k, 12)
    assert R.split(R.key(seed), n).tolist() == ref_split(k, n)
    assert R.fold_in(R.key(seed), data).tolist() == ref_fold_in(k, data)
    assert R.fold_in(R.key(seed), torch.tensor(data)).tolist() == ref_fold_in(k, data)


def test_bits_range_and_scalar_shape():
    b = R.bits(R.key(3), (N,))
    assert b.dtype == torch.int64 and int(b.min()) >= 0 and int(b.max()) <= M32
    assert R.bits(R.key(3), ()).shape == ()


def test_same_key_same_numbers_and_different_keys_differ():
    for fn in (R.uniform, R.normal, R.gumbel, R.bits):
        a, b, c = fn(R.key(11), (1000,)), fn(R.key(11), (1000,)), fn(R.key(12), (1000,))
        assert torch.equal(a, b)
        assert (a != c).float().mean() > 0.99
    assert torch.equal(R.permutation(R.key(5), 20), R.permutation(R.key(5), 20))
    assert not torch.equal(R.permutation(R.key(5), 20), R.permutation(R.key(6), 20))


def test_batched_keys_give_one_stream_each():
    keys = R.split(R.key(0), 4)
    batched = R.uniform(keys, (7,))
    assert batched.shape == (4, 7)
    for i in range(4):
        assert torch.equal(batched[i], R.uniform(keys[i], (7,)))


def test_uniform_moments_and_open_interval():
    for dtype in (torch.float32, torch.float64):
        u = R.uniform(R.key(1), (N,), dtype)
        assert u.dtype == dtype
        assert bool((u > 0).all()) and bool((u < 1).all())
        # mean 1/2 (se sqrt(1/12 / N)), variance 1/12 (se sqrt(1/180 / N)).
        assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / N)
        assert abs(float(u.var()) - 1 / 12) < 5 * math.sqrt(1 / 180 / N)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_uniform_extreme_bits_stay_inside_open_interval(monkeypatch, dtype):
    # The two most extreme words a hash can give: all zeros and all ones.
    def extreme_bits(key, shape):
        return torch.tensor([0, M32], dtype=torch.int64).repeat(math.prod(shape) // 2).view(shape)

    monkeypatch.setattr(R, "bits", extreme_bits)
    u = R.uniform(R.key(0), (4,), dtype)
    assert u.dtype == dtype
    assert bool((u > 0).all()) and bool((u < 1).all()), u
    assert bool(torch.isfinite(R.gumbel(R.key(0), (4,), dtype)).all())
    assert bool(torch.isfinite(R.normal(R.key(0), (2,), dtype)).all())


def test_uniform_low_precision_dtypes_and_bad_dtype():
    for dtype in (torch.float16, torch.bfloat16):
        u = R.uniform(R.key(2), (N,), dtype)
        assert u.dtype == dtype and bool((u > 0).all()) and bool((u < 1).all())
        assert abs(float(u.double().mean()) - 0.5) < 0.01
    with pytest.raises(ValueError, match="dtype"):
        R.uniform(R.key(0), (3,), torch.int32)


def test_normal_moments():
    for dtype in (torch.float32, torch.float64):
        z = R.normal(R.key(4), (N,), dtype).double()
        # mean 0 (se 1/sqrt(N)), std 1 (se ~ 1/sqrt(2N)).
        assert abs(float(z.mean())) < 5 / math.sqrt(N)
        assert abs(float(z.std()) - 1) < 5 / math.sqrt(2 * N)


def test_gumbel_moments():
    g = R.gumbel(R.key(5), (N,)).double()
    euler_gamma = 0.5772156649015329
    var = math.pi**2 / 6
    assert abs(float(g.mean()) - euler_gamma) < 5 * math.sqrt(var / N)
    assert abs(float(g.var()) - var) < 0.05 * var


def test_streams_are_uncorrelated():
    parent = R.key(7)
    a, b = R.split(parent, 2)
    ua, ub = R.uniform(a, (N,)), R.uniform(b, (N,))
    assert abs(corr(ua, ub)) < 0.02
    assert abs(corr(ua, R.uniform(parent, (N,)))) < 0.02
    assert abs(corr(ua[1:], ua[:-1])) < 0.02
    f0, f1 = R.fold_in(parent, 0), R.fold_in(parent, 1)
    assert not torch.equal(f0, f1) and not torch.equal(f0, parent)
    assert abs(corr(R.uniform(f0, (N,)), R.uniform(f1, (N,)))) < 0.02
    # Many sibling keys: the first draw of each stream is itself uniform and uncorrelated.
    firsts = R.uniform(R.fold_in(parent, torch.arange(N)).unsqueeze(-2), (2,))
    assert abs(corr(firsts[:, 0, 0], firsts[:, 0, 1])) < 0.02
    assert abs(float(firsts.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / (2 * N))


def test_split_keys_all_distinct():
    keys = R.split(R.key(9), 1000)
    assert len({tuple(k) for k in keys.tolist()}) == 1000


def test_permutation_is_uniform_permutation():
    p = R.permutation(R.key(1), 50)
    assert p.dtype == torch.int64 and sorted(p.tolist()) == list(range(50))
    # All 6 orders of 3 items, each ~1/6 over 6000 keys (chi-square, 5 dof, p ~ 1e-6 at 35).
    perms = vmap(lambda k: R.permutation(k, 3))(R.split(R.key(2), 6000))
    codes = perms[:, 0] * 9 + perms[:, 1] * 3 + perms[:, 2]
    counts = torch.bincount(codes, minlength=27)
    counts = counts[counts > 0].double()
    assert counts.numel() == 6
    assert float(((counts - 1000) ** 2 / 1000).sum()) < 35


def test_permutations_rows_are_independent_uniform_permutations():
    rows = R.permutations(R.key(3), 6000, 3)
    assert rows.shape == (6000, 3) and rows.dtype == torch.int64
    assert all(sorted(r) == [0, 1, 2] for r in rows[:50].tolist())
    codes = rows[:, 0] * 9 + rows[:, 1] * 3 + rows[:, 2]
    counts = torch.bincount(codes, minlength=27)
    counts = counts[counts > 0].double()
    assert counts.numel() == 6
    assert float(((counts - 1000) ** 2 / 1000).sum()) < 35
    # Consecutive rows independent: the pair of first items is uniform over 9 outcomes.
    pairs = torch.bincount(rows[:-1:2, 0] * 3 + rows[1::2, 0], minlength=9).double()
    assert float(((pairs - 333.3) ** 2 / 333.3).sum()) < 30
    # A pure function of the key, eager and vmapped alike.
    keys = R.split(R.key(4), 3)
    assert torch.equal(
        vmap(lambda k: R.permutations(k, 2, 7))(keys)[1], R.permutations(keys[1], 2, 7)
    )
    # Stacked keys broadcast: row i is key i's draw (the update's shuffle relies on it).
    folded = R.fold_in(keys, 5)
    assert torch.equal(folded[2], R.fold_in(keys[2], 5))
    assert torch.equal(R.permutations(folded, 2, 7)[2], R.permutations(folded[2], 2, 7))


@pytest.mark.parametrize("bad", [[0, 1], torch.zeros(2), torch.zeros(3, dtype=torch.int64)])
def test_bad_key_names_key(bad):
    for call in (
        lambda: R.split(bad),
        lambda: R.fold_in(bad, 1),
        lambda: R.bits(bad, (2,)),
        lambda: R.uniform(bad, (2,)),
        lambda: R.normal(bad, (2,)),
    ):
        with pytest.raises(ValueError, match="key"):
            call()


def draws(k):
    return {
        "bits": R.bits(k, (4, 8)),
        "uniform32": R.uniform(k, (64,)),
        "uniform64": R.uniform(k, (64,), torch.float64),
        "permutation": R.permutation(k, 33),
        "split": R.split(k, 3),
        "fold_in": R.fold_in(k, 12345),
        "normal": R.normal(k, (64,)),
        "gumbel": R.gumbel(k, (64,)),
    }


def test_vmap_over_keys_equals_loop():
    keys = R.split(R.key(21), 5)
    batched = vmap(draws)(keys)
    for i in range(5):
        single = draws(keys[i])
        for name, value in single.items():
            assert torch.equal(batched[name][i], value), name


def compiled_draws(k):
    return {
        "bits": R.bits(k, (32,)),
        "uniform32": R.uniform(k, (32,)),
        "uniform64": R.uniform(k, (32,), torch.float64),
        "normal": R.normal(k, (32,)),
        "gumbel": R.gumbel(k, (32,)),
        "permutation": R.permutation(k, 33),
    }


@pytest.mark.slow
def test_compile_equals_eager():
    # One small graph: each compiled kernel costs seconds of C++ build on a cold cache.
    k = R.key(33)
    eager = compiled_draws(k)
    compiled = torch.compile(compiled_draws, fullgraph=True)(k)
    for name in ("bits", "uniform32", "uniform64", "permutation"):
        assert torch.equal(compiled[name], eager[name]), name
    for name in ("normal", "gumbel"):
        # Compiled log/cos may differ from eager by an ulp.
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-6, atol=1e-6)
