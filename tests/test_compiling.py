"""compile_fn's guards: the arguments stay guarded, the closure and modules do not; carries
packed by dtype, and a scan that carries them in inductor's C++ loop; inductor's options
(tanh in its exp form, the CPU's instruction sets trusted unless the user decides)."""

import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._higher_order_ops.scan import scan

from funcppo.compiling import (
    compile_fn,
    keep_input_guards,
    pack_by_dtype,
    scan_cacheable,
    scan_carry,
)
from funcppo.flat import ravel_leaves, unravel_leaves


def entry(name: str, is_global: bool = False) -> SimpleNamespace:
    return SimpleNamespace(name=name, is_global=is_global)


def test_keep_input_guards_by_source():
    entries = [
        entry("args[0].params['torso']"),  # an argument's tensor
        entry("type(args[1])"),
        entry("len(args[0].opt_state)"),
        entry(""),  # global state (grad mode, default device): no source
        entry("fn.__closure__[1].cell_contents.spec"),
        entry("type(fn.__closure__[2].cell_contents)"),
        entry("G['__import_funcppo_dot_optim'].math"),
        entry("__import__('torch').utils._pytree.SUPPORTED_NODES"),
        entry("args_like_name", is_global=True),
    ]
    assert keep_input_guards(entries) == [True, True, True, True, False, False, False, False, False]


def test_arguments_stay_guarded():
    graphs = []

    def backend(gm, example_inputs):  # counts the graphs dynamo hands over
        graphs.append(gm)
        return gm.forward

    def f(tree):
        return tree["x"] * 2 + tree["y"].sum()

    g = compile_fn(f, "guarded", backend)
    a = {"x": torch.arange(3.0), "y": torch.ones(2)}
    b = {"x": torch.arange(4, dtype=torch.int64), "y": torch.ones(2, 2)}
    for tree in (a, b, a, b):
        torch.testing.assert_close(g(tree), f(tree))
    assert len(graphs) == 2  # one per distinct dtype and shape, each reused
    # Another structure is traced afresh (and fails as f would), not run on a cached graph.
    with pytest.raises(torch._dynamo.exc.Unsupported, match="KeyError"):
        g({"x": torch.arange(3.0)})


def test_closure_is_not_guarded():
    # The documented trade: a compiled step's closure (a frozen config) is read once.
    scale = [2.0]
    g = compile_fn(lambda x: x * scale[0], "closure", "eager")
    x = torch.ones(3)
    torch.testing.assert_close(g(x), 2 * x)
    scale[0] = 3.0
    torch.testing.assert_close(g(x), 2 * x)


def test_inductor_tanh_in_exp_form_matches_torch_tanh():
    """INDUCTOR_OPTIONS has inductor write a vectorised tanh as 2 / (1 + exp(-2x)) - 1: the
    same values to 1e-6 for small, large, infinite and NaN inputs, vector lanes and tail."""
    values = torch.tensor([0.0, 1e-30, -1e-7, 1e-3, 0.5, -2.0, 9.0, -20.0, 50.0, -100.0, 1e4])
    x = torch.cat([values, -values, torch.tensor([float("inf"), -float("inf"), float("nan")])])
    x = torch.cat([x, torch.linspace(-6, 6, 1001)])  # 1026 elements: 128 vectors of 8 and a tail
    got = compile_fn(torch.tanh, "tanh")(x)
    torch.testing.assert_close(got, torch.tanh(x), atol=1e-6, rtol=0, equal_nan=True)
    assert torch.equal(got[x.isinf()], torch.tanh(x[x.isinf()]))


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(0, 3), max_size=3),
            st.sampled_from([torch.float32, torch.int64, torch.bool, torch.float64]),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_pack_by_dtype_gives_every_leaf_back(specs):
    leaves = [torch.arange(math.prod(shape)).reshape(shape).to(dtype) for shape, dtype in specs]
    vectors, layout = pack_by_dtype(leaves)
    # One vector per dtype, in order of first appearance.
    assert [v.dtype for v in vectors] == list(dict.fromkeys(d for _, d in specs))
    back = unravel_leaves(layout, vectors)
    for want, got in zip(leaves, back, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    again = ravel_leaves(layout, [x + 1 if x.dtype != torch.bool else ~x for x in leaves])
    assert [v.shape for v in again] == [v.shape for v in vectors]


@pytest.mark.slow
def test_scan_in_cpp_carries_two_equal_outputs_once_packed():
    # Two carries that inductor computes as one buffer: torch 2.13's C++ loop moves that
    # buffer into both slots, which crashed the next iteration when the carries were separate.
    def body(carry, x):
        a, _ = unravel_leaves(layout, carry)
        nxt = a * 0.5 + x
        return ravel_leaves(layout, [nxt, nxt.clone()]), [nxt.sum(0).clone()]

    def run(a, xs):
        return scan(body, pack_by_dtype([a, a.clone()])[0], xs)

    a, xs = torch.ones(3), torch.arange(4.0)
    _, layout = pack_by_dtype([a, a])
    compiled = compile_fn(run, "packed_scan", "inductor", cpp_wrapper=True)
    with scan_cacheable():
        (carry,), (ys,) = compiled(a, xs)
    (want_carry,), (want_ys,) = run(a, xs)
    torch.testing.assert_close(carry, want_carry)
    torch.testing.assert_close(ys, want_ys)


def test_scan_carry_keeps_the_chosen_leaves_and_packs_the_rest():
    leaves = [torch.randn(5), torch.tensor(3), torch.randn(5), torch.tensor(True), torch.randn(2)]
    pack, unpack = scan_carry(leaves, keep=lambda x: x.shape == (5,))
    carry = pack(leaves)
    # The two kept vectors first, as clones; then one vector per dtype of the rest, in order
    # of first appearance: int64, bool, float32.
    assert [tuple(c.shape) for c in carry] == [(5,), (5,), (1,), (1,), (2,)]
    assert [c.dtype for c in carry[2:]] == [torch.int64, torch.bool, torch.float32]
    assert all(c.data_ptr() != x.data_ptr() for c, x in zip(carry[:2], leaves[::2], strict=False))
    for got, want in zip(unpack(carry), leaves, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    # With nothing kept, the carry is pack_by_dtype's.
    pack_all, _ = scan_carry(leaves)
    for got, want in zip(pack_all(leaves), pack_by_dtype(leaves)[0], strict=True):
        assert torch.equal(got, want)


@pytest.mark.slow
@pytest.mark.parametrize(("env", "expected"), [(None, True), ("0", None), ("1", None)])
def test_vector_instruction_sets_trusted_unless_the_user_decides(env, expected):
    # A fresh interpreter: the options are fixed when funcppo.compiling is imported.
    code = (
        "import funcppo.compiling as c, torch._inductor.config as i; "
        "print(c.INDUCTOR_OPTIONS.get('cpp.vec_isa_ok'), i.cpp.vec_isa_ok)"
    )
    environ = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_VEC_ISA_OK"}
    if env is not None:
        environ["TORCHINDUCTOR_VEC_ISA_OK"] = env
    out = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True
    )
    option, user = out.stdout.split()
    assert option == str(expected)
    # Where the user decided, inductor's own setting carries their value.
    assert user == ("None" if env is None else str(env == "1"))
