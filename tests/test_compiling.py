"""compile_fn's guards: the arguments stay guarded, the closure and modules do not; carries
packed by dtype, and a scan that carries them in inductor's C++ loop; the settings per device
and inductor's options (tanh in its exp form, the CPU's instruction sets trusted unless the
user decides), the rollout's threads; no module-level knob; the graph rewrites for inductor's
CPU code, equal to the plain arithmetic they replace."""

import dataclasses
import math
import operator
import os
import subprocess
import sys
from types import SimpleNamespace

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._higher_order_ops.scan import scan
from torch.fx.experimental.proxy_tensor import make_fx

from funcppo.accel.compiling import (
    CompileSettings,
    compile_fn,
    keep_input_guards,
    pack_by_dtype,
    per_device,
    scan_cacheable,
    scan_carry,
)
from funcppo.accel.rewrites import PowAsExp, ThinProducts
from funcppo.core.flat import ravel_leaves, unravel_leaves


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
    "pre_grad_custom_pass": ThinProducts(),
    "post_grad_custom_post_pass": PowAsExp(),
    "cpp_wrapper": True,
}


def test_cpu_settings_are_the_tuned_options():
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.vec_isa_ok": None}):
        settings = CompileSettings.for_device("cpu")
        one_thread = CompileSettings.for_device("cpu", rollout_threads=1)
    assert settings.backend == "inductor" and settings.cpp_wrapper and settings.guard_filter
    assert settings.options() == CPU_OPTIONS
    assert list(settings.options()) == list(CPU_OPTIONS)  # the same order, too
    assert CompileSettings.for_device(torch.device("cpu")) == CompileSettings.for_device("cpu")
    assert settings.rollout_threads is None  # the caller's count unless told
    assert one_thread == settings.replace(rollout_threads=1)


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
    import funcppo.accel.compiling

    knobs = {"GUARD_FILTER", "CPP_WRAPPER", "INDUCTOR_OPTIONS"}
    assert not knobs & set(vars(funcppo.accel.compiling))


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
        "import funcppo.accel.compiling as c, torch._inductor.config as i; "
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


def test_the_cpu_settings_carry_the_rewrites_and_compare_equal():
    cpu, other = CompileSettings.for_device("cpu"), CompileSettings.for_device("meta")
    assert cpu.rewrites == ("thin_products", "pow_as_exp") and other.rewrites == ()
    options = cpu.options()
    assert options["pre_grad_custom_pass"] == ThinProducts()
    assert options["post_grad_custom_post_pass"] == PowAsExp()
    assert "pre_grad_custom_pass" not in other.options()
    assert cpu == CompileSettings.for_device("cpu") and hash(cpu) == hash(
        CompileSettings.for_device("cpu")
    )
    with pytest.raises(ValueError, match=r"rewrites: expected names in .*got \['tanh'\]"):
        CompileSettings(rewrites=("thin_products", "tanh"))


def test_agent_settings_compile_ahead_of_time_into_the_command_lines_folder():
    from funcppo.accel.precompile import default_precompile_dir

    agent = CompileSettings.for_agent("cpu")
    assert agent == CompileSettings.for_device(
        "cpu", precompile_dir=default_precompile_dir(), ahead_of_time=True
    )
    assert agent.plain() == agent.replace(ahead_of_time=False)
    # Off the CPU, where ahead-of-time code was never run: torch.compile, files kept.
    gpu = CompileSettings.for_agent("cuda")
    assert not gpu.ahead_of_time and gpu.precompile_dir == agent.precompile_dir


@pytest.mark.slow
def test_settings_and_the_precompile_folder_import_no_compiler():
    # A process that loads ahead-of-time code must not pay for dynamo's import (1.2 s here).
    code = (
        "import sys, funcppo.accel.compiling as c\n"
        "s = c.CompileSettings.for_agent('cpu')\n"
        "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))\n"
        "import torch._inductor.runtime.cache_dir_utils as u, os\n"
        "print(s.precompile_dir == os.path.join(u.cache_dir(), 'funcppo'))"
    )
    environ = {k: v for k, v in os.environ.items() if k != "FUNCPPO_PRECOMPILE_DIR"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True
    )
    assert out.stdout.split("\n")[:2] == ["[]", "True"]


# The seam's forms for inductor's CPU code, equal to the plain ones ----------------------------

MATMULS = (operator.matmul, torch.matmul)


def thin_backend(seen: list, rewrite: ThinProducts):
    """A dynamo backend that applies ``rewrite`` to the graph, as inductor does before autograd,
    records the graph's call targets and runs it as it is."""

    def backend(gm: torch.fx.GraphModule, _inputs):
        rewrite(gm.graph)
        gm.graph.lint()
        gm.recompile()
        seen.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    return backend


@pytest.mark.parametrize(
    ("k", "n", "thin"),
    [(1, 9, True), (4, 16, True), (3, 3, True), (16, 1, True), (16, 4, True), (5, 16, False)],
)
def test_thin_products_equal_the_matmul_with_gradients_and_over_seeds(k, n, thin):
    """A weight of at most 4 rows or columns: its product becomes pointwise sums before autograd
    (no matmul left), with the matmul's values and gradients, alone and under vmap."""
    gen = torch.Generator().manual_seed(k * 100 + n)
    x, w, g = (
        torch.randn(*shape, generator=gen) for shape in ((2, 3, 6, k), (2, k, n), (2, 3, 6, n))
    )

    def value_and_grads(w, x):
        def loss(w, x):
            return ((x @ w) * g[0]).sum()

        return x @ w, torch.func.grad(loss, argnums=(0, 1))(w, x)

    # Static shapes: each case's sizes are constants, as in a first compile (a symbolic size is
    # left as a matmul).
    seen: list = []
    compiled = torch.compile(
        value_and_grads, backend=thin_backend(seen, ThinProducts()), fullgraph=True, dynamic=False
    )
    torch.testing.assert_close(compiled(w[0], x[0]), value_and_grads(w[0], x[0]))
    assert any(t in MATMULS for t in seen) is not thin, (k, n, seen)
    batched = torch.compile(
        torch.func.vmap(value_and_grads),
        backend=thin_backend(seen, ThinProducts()),
        fullgraph=True,
        dynamic=False,
    )
    looped = [value_and_grads(w[s], x[s]) for s in range(2)]
    stacked = optree.tree_map(lambda *v: torch.stack(v), *looped)
    torch.testing.assert_close(batched(w, x), stacked)


@pytest.mark.parametrize(
    ("rewrite", "device"),
    [(ThinProducts(thin_max=0), "cpu"), (ThinProducts(), "meta")],
    ids=["off", "not-cpu"],
)
def test_thin_products_off_and_off_the_cpu(rewrite, device):
    x, w = torch.randn(6, 5, device=device), torch.randn(5, 2, device=device)
    seen: list = []
    compiled = torch.compile(lambda x, w: x @ w, backend=thin_backend(seen, rewrite), dynamic=False)
    assert compiled(x, w).shape == (6, 2)
    assert any(t in MATMULS for t in seen)


def post_grad_graph(fn, *args):
    """``fn`` traced to aten ops on fake tensors, as inductor's passes after autograd see it,
    with ``PowAsExp`` applied; the module and the names of the ops it calls."""
    gm = make_fx(fn, tracing_mode="fake")(*args)
    PowAsExp()(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return gm, [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@settings(max_examples=50, deadline=None)
@given(
    st.sampled_from([1e-300, 0.01, 0.5, 0.9, 0.999, 1.5, 10.0]),
    st.lists(st.integers(0, 10**7) | st.floats(-50, 50), min_size=1, max_size=5),
)
def test_pow_of_a_positive_base_as_exp_equals_pow(base, exponents):
    """Adam's ``1 - beta^t`` in float64 becomes ``1 - exp(t log beta)``: the same to rounding
    for any exponent, integer steps to 10^7 included."""
    t = torch.tensor(exponents, dtype=torch.float64)

    def plain(t):
        return 1 - base**t

    gm, ops = post_grad_graph(plain, t)
    assert "aten.pow.Scalar" not in ops and "aten.exp.default" in ops, ops
    torch.testing.assert_close(gm(t), plain(t), atol=1e-15, rtol=1e-12)


@pytest.mark.parametrize(
    ("base", "dtype", "device"),
    [
        (1.0, torch.float64, "cpu"),
        (0.0, torch.float64, "cpu"),
        (-0.5, torch.float64, "cpu"),
        (0.9, torch.float32, "cpu"),
        (0.9, torch.float64, "meta"),
    ],
)
def test_pow_kept_where_the_exp_form_is_not_exact_or_not_on_cpu(base, dtype, device):
    # 1^inf and 0^0 are 1, where exp(t log base) is NaN; a negative base has no log; float32
    # loses digits in t log base.
    _, ops = post_grad_graph(lambda t: base**t, torch.arange(3.0, dtype=dtype, device=device))
    assert "aten.pow.Scalar" in ops and "aten.exp.default" not in ops, ops


def test_rewrites_key_the_caches_by_their_settings():
    # Inductor's caches key on uuid(), precompiled files on repr() (compile_fn's options): equal
    # settings give equal keys in any process, distinct settings distinct keys.
    assert ThinProducts().uuid() == ThinProducts().uuid() != ThinProducts(thin_max=0).uuid()
    assert repr(ThinProducts()) == repr(ThinProducts()) != repr(ThinProducts(thin_max=0))
    assert PowAsExp().uuid() == PowAsExp().uuid() != ThinProducts().uuid()
    assert "0x" not in repr(ThinProducts()) + repr(PowAsExp())  # no address
