"""Ahead-of-time compiled functions (``funcppo.accel.ahead``): equal to the eager function, the
output tree kept, one package per argument signature, loaded by a new process without dynamo,
and ``torch.compile`` where a function cannot be exported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import optree
import pytest
import torch

from funcppo.accel.compiling import CompileSettings, compile_fn

pytestmark = pytest.mark.slow

# One module for this process and the new one.
PROBE = textwrap.dedent(
    """
    from typing import NamedTuple

    import torch


    class Out(NamedTuple):
        y: torch.Tensor
        stats: dict


    def probe(params, x, hidden):
        # vmapped over a leading seed axis, a None leaf, a tensor made inside (a constant)
        def one(p, xs):
            h = torch.tanh(xs @ p["w"] + p["b"])
            scale = torch.tensor([2.0, 0.5])
            return Out(h * scale.sum(), {"mean": h.mean(), "count": (h > 0).sum()})

        assert hidden is None
        return torch.func.vmap(one)(params, x)
    """
)


@pytest.fixture(scope="module")
def probe_module(tmp_path_factory):
    """``PROBE`` as an importable module (its output type must pickle by name)."""
    folder = tmp_path_factory.mktemp("probe_module")
    (folder / "funcppo_aot_probe.py").write_text(PROBE)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("funcppo_aot_probe", None)


@pytest.fixture
def probe(probe_module):
    import funcppo_aot_probe

    return funcppo_aot_probe.probe


def _inputs(seeds: int = 2, rows: int = 3):
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(seeds, 4, 5, generator=g), "b": torch.randn(seeds, 5, generator=g)}
    return params, torch.randn(seeds, rows, 4, generator=g)


def _settings(folder) -> CompileSettings:
    return CompileSettings.for_device("cpu", precompile_dir=folder, ahead_of_time=True)


def _assert_same(got, want):
    assert type(got) is type(want) and list(got.stats) == list(want.stats)
    torch.testing.assert_close(got.y, want.y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.stats["mean"], want.stats["mean"], rtol=1e-5, atol=1e-6)
    assert torch.equal(got.stats["count"], want.stats["count"])


def test_ahead_of_time_equals_eager_per_signature_and_loads_without_dynamo(
    tmp_path, probe, probe_module
):
    fn = compile_fn(probe, "aot_probe", _settings(tmp_path))
    params, x = _inputs()
    _assert_same(fn(params, x, None), probe(params, x, None))
    (first,) = tmp_path.glob("aot_probe-aot-*.pt2")
    # New values of the same signature run the same package; a new shape compiles another.
    params2, x2 = _inputs(rows=3)
    params2 = {k: v + 1 for k, v in params2.items()}
    _assert_same(fn(params2, x2, None), probe(params2, x2, None))
    assert list(tmp_path.glob("*.pt2")) == [first]
    params3, x3 = _inputs(rows=6)
    _assert_same(fn(params3, x3, None), probe(params3, x3, None))
    assert len(list(tmp_path.glob("*.pt2"))) == 2

    # A new process loads the package, compiles nothing and never imports dynamo.
    torch.save({"inputs": (params, x), "want": probe(params, x, None)}, tmp_path / "io.pt")
    code = textwrap.dedent(
        f"""
        import sys, torch
        from funcppo.accel.compiling import CompileSettings, compile_fn
        sys.path.insert(0, {str(probe_module)!r})
        from funcppo_aot_probe import probe
        io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=False)
        settings = CompileSettings.for_device("cpu", precompile_dir={str(tmp_path)!r},
                                              ahead_of_time=True)
        got = compile_fn(probe, "aot_probe", settings)(*io["inputs"], None)
        want = io["want"]
        torch.testing.assert_close(got.y, want.y, rtol=1e-5, atol=1e-6)
        assert torch.equal(got.stats["count"], want.stats["count"])
        print(type(got).__name__, "torch._dynamo" in sys.modules, "torch._inductor" in sys.modules)
        """
    )
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["Out", "False", "False"]
    assert len(list(tmp_path.glob("*.pt2"))) == 2


def test_a_function_that_cannot_be_exported_runs_through_torch_compile(tmp_path):
    def counts(x):
        return x * 2, int(x.shape[0])  # a Python number out: no tensor program returns it

    fn = compile_fn(counts, "aot_counts", _settings(tmp_path))
    with pytest.warns(UserWarning, match="aot_counts compiled by torch.compile, not ahead"):
        y, n = fn(torch.ones(3))
    assert torch.equal(y, torch.full((3,), 2.0)) and n == 3
    # A leaf that is neither a tensor nor a plain value: its value would be baked in unkeyed.
    odd = compile_fn(lambda x, dtype: x.to(dtype) * 2, "aot_odd", _settings(tmp_path))
    with pytest.warns(UserWarning, match=r"aot_odd compiled by torch.compile: .*\['dtype'\]"):
        y = odd(torch.ones(2), torch.float64)
    assert y.dtype == torch.float64 and torch.equal(y, torch.full((2,), 2.0, dtype=torch.float64))
    y, n = fn(torch.ones(4))  # the torch.compile form from now on, no second warning
    # No package; torch.compile's form is kept in the folder as precompiled files are.
    assert n == 4 and not list(tmp_path.glob("*-aot-*")) and list(tmp_path.glob("*.pt2"))


def test_an_unreadable_package_is_compiled_again(tmp_path, probe):
    params, x = _inputs()
    compile_fn(probe, "aot_probe", _settings(tmp_path))(params, x, None)
    (path,) = tmp_path.glob("*.pt2")
    path.write_bytes(b"not a package")
    _assert_same(
        compile_fn(probe, "aot_probe", _settings(tmp_path))(params, x, None),
        probe(params, x, None),
    )
    assert path.stat().st_size > 1000


def test_an_update_compiled_ahead_of_time_is_the_eager_update(tmp_path):
    # The gradient goes through make_fx; the minibatch steps loop in Python (a gradient inside
    # a scan cannot be exported), 2 seeds vmapped, the factored spec's masks and heads.
    from funcppo.training.update import make_update_fn
    from test_update import make_case, max_diff, small_config

    config = small_config(compile=True, update_epochs=1, num_minibatches=2)
    cases = [make_case(config, seed=s) for s in (0, 1)]
    state, batch = (
        optree.tree_map(lambda *xs: torch.stack(xs), *parts) for parts in zip(*cases, strict=True)
    )
    eager = make_update_fn(config.replace(compile=False), num_seeds=2)
    ahead = make_update_fn(config, num_seeds=2, compiler=_settings(tmp_path))
    want_state, want_metrics = eager(state, batch)
    got_state, got_metrics = ahead(state, batch)
    assert max_diff(got_state, want_state) < 1e-5
    assert list(got_metrics) == list(want_metrics)
    assert max_diff(got_metrics, want_metrics) < 1e-4
    # prepare, the minibatch step and finish, each a package
    assert len(list(tmp_path.glob("update-aot-*.pt2"))) == 3
