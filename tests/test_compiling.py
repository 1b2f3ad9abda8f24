"""compile_fn's guards: the arguments stay guarded, the closure and modules do not; carries
packed by dtype, and a scan that carries them in inductor's C++ loop; the settings per device
and inductor's options (tanh in its exp form, the CPU's instruction sets trusted unless the
user decides), the rollout's threads; no module-level knob."""

import dataclasses
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
    CompileSettings,
    compile_fn,
    keep_input_guards,
    pack_by_dtype,
    per_device,
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

    g = compile_fn(f, "guarded", CompileSettings(backend=backend))
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
    g = compile_fn(lambda x: x * scale[0], "closure", CompileSettings(backend="eager"))
    x = torch.ones(3)
    torch.testing.assert_close(g(x), 2 * x)
    scale[0] = 3.0
    torch.testing.assert_close(g(x), 2 * x)


def test_every_guard_kept_without_the_filter():
    scale = [2.0]
    settings = CompileSettings(backend="eager", guard_filter=False)
    g = compile_fn(lambda x: x * scale[0], "all_guards", settings)
    x = torch.ones(3)
    torch.testing.assert_close(g(x), 2 * x)
    scale[0] = 3.0
    torch.testing.assert_close(g(x), 3 * x)  # the closure's value guarded: traced again


# The options that funcppo's CPU code is compiled with, measured in benchmarks/RESULTS.md:
# the CPU's settings must give them exactly (same generated code, same precompiled files).
CPU_OPTIONS = {
    "guard_filter_fn": keep_input_guards,
    "size_asserts": False,
    "alignment_asserts": False,
    "cpp.use_decompose_tanh": True,
    "cpp_wrapper_build_separate": True,
    "cpp.vec_isa_ok": True,
    "cpp_wrapper": True,
}


def test_cpu_settings_are_the_tuned_options():
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.vec_isa_ok": None}):
        settings = CompileSettings.for_device("cpu")
    assert settings.backend == "inductor" and settings.cpp_wrapper and settings.guard_filter
    assert settings.options() == CPU_OPTIONS
    assert list(settings.options()) == list(CPU_OPTIONS)  # the same order, too
    assert CompileSettings.for_device(torch.device("cpu")) == CompileSettings.for_device("cpu")
    assert settings.rollout_threads is None  # the caller's count unless told
    assert CompileSettings.for_device("cpu", rollout_threads=1) == settings.replace(
        rollout_threads=1
    )


@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0), "mps"])
def test_accelerator_settings_are_plain_torch_compile(device):
    # Made on any machine: choosing settings for a GPU needs none.
    initialised = torch.cuda.is_initialized()
    settings = CompileSettings.for_device(device, rollout_threads=1)
    assert settings == CompileSettings()
    assert settings.rollout_threads is None  # the kernels run on the device: threads left alone
    assert settings.inductor_options == () and not settings.cpp_wrapper
    # The guard filter is kept: it chooses among dynamo's guards, the same on any device.
    assert settings.options() == {"guard_filter_fn": keep_input_guards, "cpp_wrapper": False}
    assert torch.cuda.is_initialized() == initialised


def test_settings_are_values_that_share_nothing():
    a = CompileSettings.for_device("cpu")
    b = a.replace(backend="aot_eager", inductor_options=())
    assert a == CompileSettings.for_device("cpu") and a.inductor_options  # a is unchanged
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.cpp_wrapper = False  # type: ignore[misc]
    # Other backends take neither inductor's options nor its wrapper.
    assert b.options() == {"guard_filter_fn": keep_input_guards}
    # Two compiled functions of one fn, each with its settings' backend and cache.
    graphs: dict[str, list] = {"a": [], "b": []}

    def counting(name):
        def backend(gm, example_inputs):
            graphs[name].append(gm)
            return gm.forward

        return backend

    def f(x):
        return x * 2

    ga = compile_fn(f, "shared", CompileSettings(backend=counting("a")))
    gb = compile_fn(f, "shared", CompileSettings(backend=counting("b"), guard_filter=False))
    x = torch.arange(3.0)
    for g in (ga, gb, ga, gb):
        torch.testing.assert_close(g(x), f(x))
    assert [len(graphs["a"]), len(graphs["b"])] == [1, 1]
    # Nothing module-level to patch: the settings object is the one place they live.
    import funcppo.compiling

    knobs = {"GUARD_FILTER", "CPP_WRAPPER", "INDUCTOR_OPTIONS"}
    assert not knobs & set(vars(funcppo.compiling))


def test_settings_refuse_a_bad_thread_count_and_compile_fn_a_bad_settings():
    for bad in (0, 1.0, True, "2"):
        with pytest.raises(
            ValueError, match=f"rollout_threads: expected None or an int >= 1, got {bad!r}"
        ):
            CompileSettings(rollout_threads=bad)
    with pytest.raises(TypeError, match="settings: expected a CompileSettings, got 'aot_eager'"):
        compile_fn(torch.sin, "sin", "aot_eager")


def test_settings_reach_torch_compile():
    # A counting aot_eager backend: each compiled function reads the settings it was built
    # with, and the filter keeps the closure unguarded (one graph for two closure values).
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm

    scale = [2.0]
    traced = CompileSettings(backend=aot_autograd(fw_compiler=count))
    g = compile_fn(lambda x: torch.tanh(x) * scale[0], "counted", traced)
    x = torch.linspace(-2, 2, 5)
    torch.testing.assert_close(g(x), torch.tanh(x) * 2)
    scale[0] = 3.0
    torch.testing.assert_close(g(x), torch.tanh(x) * 2)  # filtered: the closure is read once
    assert len(graphs) == 1 and "tanh" in str(graphs[0].graph)
    every = compile_fn(
        lambda x: torch.tanh(x) * scale[0], "counted", traced.replace(guard_filter=False)
    )
    torch.testing.assert_close(every(x), torch.tanh(x) * 3)
    scale[0] = 4.0
    torch.testing.assert_close(every(x), torch.tanh(x) * 4)  # every guard: traced again
    assert len(graphs) == 3


def test_compile_fn_honours_the_settings_backend():
    def f(x):
        return torch.tanh(x) * 3

    x = torch.linspace(-2, 2, 7)
    g = compile_fn(f, "aot", CompileSettings.for_device("cpu").replace(backend="aot_eager"))
    torch.testing.assert_close(g(x), f(x))
    # Only inductor's compiled code is kept on disk: another backend gives torch.compile's own.
    assert type(g).__name__ != "Precompiled"


def test_per_device_builds_once_per_device_type():
    built = []

    def build(settings):
        built.append(settings)
        return lambda x: x + len(built)

    call = per_device(build, None, "aot_eager", lambda x: x.device)
    assert built == []  # nothing chosen before the first call names a device
    cpu = torch.zeros(2)
    call(cpu), call(cpu)
    call(torch.zeros(2, device="meta"))
    assert built == [
        CompileSettings.for_device("cpu").replace(backend="aot_eager"),
        CompileSettings(backend="aot_eager"),
    ]
    given = CompileSettings(backend="eager")
    per_device(build, given, None, lambda x: x.device)
    assert built[-1] is given  # given settings: built at once, as they are


def test_inductor_tanh_in_exp_form_matches_torch_tanh():
    """INDUCTOR_OPTIONS has inductor write a vectorised tanh as 2 / (1 + exp(-2x)) - 1: the
    same values to 1e-6 for small, large, infinite and NaN inputs, vector lanes and tail."""
    values = torch.tensor([0.0, 1e-30, -1e-7, 1e-3, 0.5, -2.0, 9.0, -20.0, 50.0, -100.0, 1e4])
    x = torch.cat([values, -values, torch.tensor([float("inf"), -float("inf"), float("nan")])])
    x = torch.cat([x, torch.linspace(-6, 6, 1001)])  # 1026 elements: 128 vectors of 8 and a tail
    got = compile_fn(torch.tanh, "tanh", CompileSettings.for_device("cpu"))(x)
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
    compiled = compile_fn(run, "packed_scan", CompileSettings.for_device("cpu"))
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
    # A fresh interpreter: inductor reads TORCHINDUCTOR_VEC_ISA_OK when its config is imported.
    code = (
        "import funcppo.compiling as c, torch._inductor.config as i; "
        "s = c.CompileSettings.for_device('cpu'); "
        "print(dict(s.inductor_options).get('cpp.vec_isa_ok'), i.cpp.vec_isa_ok)"
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


def test_vector_instruction_sets_decided_when_the_settings_are_made():
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.vec_isa_ok": None}):
        trusted = CompileSettings.for_device("cpu")
    with inductor_config.patch({"cpp.vec_isa_ok": False}):
        decided = CompileSettings.for_device("cpu")
    assert dict(trusted.inductor_options)["cpp.vec_isa_ok"] is True
    assert "cpp.vec_isa_ok" not in dict(decided.inductor_options)
    assert dict(trusted.inductor_options)["cpp.vec_isa_ok"] is True  # made earlier, kept
