"""compile_fn's guards: the arguments stay guarded, the closure and modules do not."""

from types import SimpleNamespace

import pytest
import torch

from funcppo.compiling import compile_fn, keep_input_guards


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
