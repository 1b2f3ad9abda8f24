"""Tests for funcppo.core.networks: init, torch.nn.LSTM equivalence, resets, vmap, compile,
checks."""

from __future__ import annotations

import math

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from funcppo.accel.compiling import CompileSettings, compile_fn
from funcppo.core import random as fr
from funcppo.core.config import PPOConfig
from funcppo.core.networks import (
    LSTMState,
    PolicyOutput,
    check_params,
    init_hidden,
    lstm_scan,
    make_policy_apply,
    orthogonal,
    policy_apply,
    policy_init,
)
from funcppo.core.spec import ActionSpec

SPEC = ActionSpec({"op": 3, "arg": 4}, "op", [{"op"}, {"arg"}, {"arg"}])
OBS = 5


def config(**changes) -> PPOConfig:
    base = {"obs_dim": OBS, "spec": SPEC, "torso_sizes": (8, 7), "lstm_size": 6}
    return PPOConfig(**{**base, **changes})


MLP, SHARED, LSTM = config(), config(shared_torso=True), config(recurrent=True)


def randomized(params, seed: int = 0, scale: float = 0.5):
    """Every leaf replaced by N(0, scale^2) on the leaf's device: init has zero biases and tiny
    heads."""
    gen = torch.Generator().manual_seed(seed)
    return optree.tree_map(
        lambda x: scale * torch.randn(x.shape, generator=gen).to(x.device), params
    )


def inputs(t: int | None, b: int, seed: int = 0, p_start: float = 0.3, device=None):
    gen = torch.Generator().manual_seed(seed)
    lead = (b,) if t is None else (t, b)
    obs = torch.randn(*lead, OBS, generator=gen)
    return obs.to(device), (torch.rand(*lead, generator=gen) < p_start).to(device)


def assert_trees_close(a, b, atol=1e-6, rtol=1e-5):
    la, lb = optree.tree_leaves(a, none_is_leaf=True), optree.tree_leaves(b, none_is_leaf=True)
    assert optree.tree_structure(a, none_is_leaf=True) == optree.tree_structure(
        b, none_is_leaf=True
    )
    for x, y in zip(la, lb, strict=True):
        if x is None:
            assert y is None
        else:
            torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


def torch_lstm(lstm_params) -> torch.nn.LSTM:
    n_in, gates = lstm_params["w_ih"].shape
    module = torch.nn.LSTM(n_in, gates // 4)
    with torch.no_grad():
        module.weight_ih_l0.copy_(lstm_params["w_ih"].T)
        module.weight_hh_l0.copy_(lstm_params["w_hh"].T)
        module.bias_ih_l0.copy_(lstm_params["b"])
        module.bias_hh_l0.zero_()
    return module


# init ------------------------------------------------------------------------------------------


def test_layout_per_config_and_check_params_accepts_it():
    for cfg, groups in [
        (MLP, {"torso", "critic", "heads", "value"}),
        (SHARED, {"torso", "heads", "value"}),
        (LSTM, {"torso", "lstm", "heads", "value"}),
    ]:
        params = policy_init(fr.key(0), cfg)
        assert set(params) == groups
        assert set(params["heads"]) == {"op", "arg"}
        check_params(params, cfg)
    params = policy_init(fr.key(0), LSTM)
    assert params["torso"]["w0"].shape == (OBS, 8) and params["torso"]["w1"].shape == (8, 7)
    assert params["lstm"]["w_ih"].shape == (7, 24) and params["lstm"]["w_hh"].shape == (6, 24)
    assert params["heads"]["arg"]["w"].shape == (6, 4) and params["value"]["w"].shape == (6, 1)
    assert policy_init(fr.key(0), MLP)["heads"]["op"]["w"].shape == (7, 3)


def test_init_follows_key_device_and_dtype():
    params = policy_init(fr.key(0, device="cpu"), LSTM, dtype=torch.float64)
    for leaf in optree.tree_leaves(params):
        assert leaf.device.type == "cpu" and leaf.dtype == torch.float64


def test_orthogonal_init_gains_and_biases():
    params = policy_init(fr.key(3), config(recurrent=True, torso_sizes=(8, 8), lstm_size=4))
    eye = torch.eye
    w0 = params["torso"]["w0"]  # [5, 8]: wide, rows orthonormal
    torch.testing.assert_close(w0 @ w0.T, 2.0 * eye(5), atol=1e-5, rtol=0)
    w1 = params["torso"]["w1"]  # [8, 8]: square
    torch.testing.assert_close(w1.T @ w1, 2.0 * eye(8), atol=1e-5, rtol=0)
    w_ih = params["lstm"]["w_ih"]  # [8, 16]: wide
    torch.testing.assert_close(w_ih @ w_ih.T, eye(8), atol=1e-5, rtol=0)
    head = params["heads"]["op"]["w"]  # [4, 3]: tall, columns orthonormal
    torch.testing.assert_close(head.T @ head, 1e-4 * eye(3), atol=1e-7, rtol=0)
    torch.testing.assert_close(params["value"]["w"].square().sum(), torch.tensor(1.0))
    assert torch.equal(params["lstm"]["b"], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 8))
    biases = [params["torso"]["b0"], params["torso"]["b1"], params["value"]["b"]]
    biases += [params["heads"][h]["b"] for h in ("op", "arg")]
    assert all(torch.equal(b, torch.zeros_like(b)) for b in biases)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 9), seed=st.integers(0, 2**40))
def test_orthogonal_property_and_sign_correction(rows, cols, seed):
    k = fr.key(seed)
    w = orthogonal(k, (rows, cols), 1.5, torch.float64)
    small = min(rows, cols)
    gram = w.T @ w if rows >= cols else w @ w.T
    torch.testing.assert_close(gram, 2.25 * torch.eye(small, dtype=torch.float64))
    # Sign correction: R = Q^T G has a positive diagonal (torch.nn.init.orthogonal_ does this).
    gauss = fr.normal(k, (max(rows, cols), small), torch.float64)
    q = w / 1.5 if rows >= cols else w.T / 1.5
    assert (torch.diagonal(q.T @ gauss) > 0).all()


def test_same_key_same_params_different_keys_differ():
    a, b, c = (policy_init(k, LSTM) for k in (fr.key(7), fr.key(7), fr.key(8)))
    assert_trees_close(a, b, atol=0, rtol=0)
    paths, leaves_a, _ = optree.tree_flatten_with_path(a)
    for path, x, y in zip(paths, leaves_a, optree.tree_leaves(c), strict=True):
        is_weight = path[-1].startswith("w")  # biases are constants, equal for every key
        assert torch.equal(x, y) != is_weight, path


def test_vmap_init_over_keys_equals_loop():
    keys = torch.stack([fr.key(s) for s in range(3)])
    stacked = torch.func.vmap(lambda k: policy_init(k, LSTM))(keys)
    check_params(stacked, LSTM, batch_dims=1)
    for s in range(3):
        one = optree.tree_map(lambda x, s=s: x[s], stacked)
        assert_trees_close(one, policy_init(keys[s], LSTM), atol=1e-6)


def test_init_hidden():
    state = init_hidden(LSTM, 3)
    assert isinstance(state, LSTMState) and state.h.shape == (3, 6) and state.c.shape == (3, 6)
    assert init_hidden(LSTM, (2, 3)).h.shape == (2, 3, 6)
    assert not state.h.any() and not state.c.any()
    assert init_hidden(MLP, 3) is None


# apply: references -----------------------------------------------------------------------------


def test_mlp_hand_worked():
    cfg = config(torso_sizes=(2,), obs_dim=2, shared_torso=True)
    spec_params = {
        "torso": {"w0": torch.tensor([[1.0, 0.0], [0.0, 2.0]]), "b0": torch.tensor([0.0, 0.5])},
        "heads": {
            "op": {"w": torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]), "b": torch.zeros(3)},
            "arg": {"w": torch.zeros(2, 4), "b": torch.tensor([1.0, 2.0, 3.0, 4.0])},
        },
        "value": {"w": torch.tensor([[3.0], [-1.0]]), "b": torch.tensor([0.25])},
    }
    out = policy_apply(spec_params, cfg, torch.tensor([[0.5, -0.25]]), None, None)
    h0, h1 = math.tanh(0.5), math.tanh(-0.5 + 0.5)  # = tanh(0.5), 0
    torch.testing.assert_close(out.logits["op"], torch.tensor([[h0, h1, -h0]]))
    torch.testing.assert_close(out.logits["arg"], torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    torch.testing.assert_close(out.value, torch.tensor([3.0 * h0 - h1 + 0.25]))
    assert out.hidden is None
    relu = policy_apply(
        spec_params, cfg.replace(activation="relu"), torch.tensor([[0.5, -1.0]]), None, None
    )
    torch.testing.assert_close(relu.value, torch.tensor([3.0 * 0.5 + 0.25]))


def test_mlp_matches_torch_modules_with_separate_critic():
    params = randomized(policy_init(fr.key(0), MLP))
    obs, _ = inputs(None, 6)

    def seq(group):
        layers = []
        for i in range(2):
            lin = torch.nn.Linear(*params[group][f"w{i}"].shape)
            with torch.no_grad():
                lin.weight.copy_(params[group][f"w{i}"].T)
                lin.bias.copy_(params[group][f"b{i}"])
            layers += [lin, torch.nn.Tanh()]
        return torch.nn.Sequential(*layers)

    with torch.no_grad():
        actor, critic = seq("torso")(obs), seq("critic")(obs)
    out = policy_apply(params, MLP, obs, None, None)
    for name in ("op", "arg"):
        ref = actor @ params["heads"][name]["w"] + params["heads"][name]["b"]
        torch.testing.assert_close(out.logits[name], ref)
    ref_value = (critic @ params["value"]["w"] + params["value"]["b"])[:, 0]
    torch.testing.assert_close(out.value, ref_value)


def test_lstm_hand_worked_single_unit():
    lstm = {
        "w_ih": torch.tensor([[0.0, 2.0, 1.0, -1.0]]),
        "w_hh": torch.tensor([[0.5] * 4]),
        "b": torch.tensor([0.0, 1.0, 0.0, 0.0]),
    }
    x = torch.tensor([[[1.0]], [[1.0]]])  # T=2, B=1
    out, _ = lstm_scan(
        lstm,
        x,
        LSTMState(torch.zeros(1, 1), torch.zeros(1, 1)),
        torch.zeros(2, 1, dtype=torch.bool),
    )
    sig = lambda z: 1.0 / (1.0 + math.exp(-z))  # noqa: E731
    c1 = sig(0.0) * math.tanh(1.0)
    h1 = sig(-1.0) * math.tanh(c1)
    c2 = sig(3.0 + 0.5 * h1) * c1 + sig(0.5 * h1) * math.tanh(1.0 + 0.5 * h1)
    h2 = sig(-1.0 + 0.5 * h1) * math.tanh(c2)
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([h1, h2]))


def test_lstm_matches_torch_nn_lstm_without_resets():
    params = randomized(policy_init(fr.key(1), LSTM))
    obs, _ = inputs(9, 4)
    none = torch.zeros(9, 4, dtype=torch.bool)
    gen = torch.Generator().manual_seed(5)
    h0, c0 = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    out = policy_apply(params, LSTM, obs, LSTMState(h0, c0), none)
    feats = torch.tanh(
        torch.tanh(obs @ params["torso"]["w0"] + params["torso"]["b0"]) @ params["torso"]["w1"]
        + params["torso"]["b1"]
    )
    with torch.no_grad():
        ref, (h_n, c_n) = torch_lstm(params["lstm"])(feats, (h0[None], c0[None]))
    torch.testing.assert_close(out.hidden.h, h_n[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.hidden.c, c_n[0], atol=1e-6, rtol=0)
    ref_value = (ref @ params["value"]["w"] + params["value"]["b"])[..., 0]
    torch.testing.assert_close(out.value, ref_value, atol=1e-6, rtol=0)
    ref_logits = ref @ params["heads"]["arg"]["w"] + params["heads"]["arg"]["b"]
    torch.testing.assert_close(out.logits["arg"], ref_logits, atol=1e-6, rtol=0)


def reference_scan(lstm_params, x, h, c, starts):
    """Naive loop: one torch.nn.LSTMCell call per env and step; zero state at episode starts."""
    cell = torch.nn.LSTMCell(x.shape[-1], h.shape[-1])
    with torch.no_grad():
        cell.weight_ih.copy_(lstm_params["w_ih"].T)
        cell.weight_hh.copy_(lstm_params["w_hh"].T)
        cell.bias_ih.copy_(lstm_params["b"])
        cell.bias_hh.zero_()
    h, c = h.clone(), c.clone()
    outs = torch.zeros(*x.shape[:2], h.shape[-1])
    with torch.no_grad():
        for t in range(x.shape[0]):
            for b in range(x.shape[1]):
                if starts[t, b]:
                    h[b], c[b] = 0.0, 0.0
                hb, cb = cell(x[t, b][None], (h[b][None], c[b][None]))
                h[b], c[b] = hb[0], cb[0]
                outs[t, b] = h[b]
    return outs, h, c


def test_lstm_resets_match_reference_loop():
    params = randomized(policy_init(fr.key(2), LSTM))["lstm"]
    gen = torch.Generator().manual_seed(3)
    x, h0, c0 = torch.randn(10, 5, 7, generator=gen), torch.randn(5, 6), torch.randn(5, 6)
    starts = torch.rand(10, 5, generator=gen) < 0.3
    starts[0, 0], starts[4, 1] = True, True
    out, (h, c) = lstm_scan(params, x, LSTMState(h0, c0), starts)
    ref, ref_h, ref_c = reference_scan(params, x, h0, c0, starts)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(h, ref_h, atol=1e-6, rtol=0)
    torch.testing.assert_close(c, ref_c, atol=1e-6, rtol=0)


def chained_steps(cfg, params, obs, hidden, starts):
    outs = []
    for t in range(obs.shape[0]):
        out = policy_apply(params, cfg, obs[t], hidden, starts[t])
        hidden = out.hidden
        outs.append(out)
    logits = {k: torch.stack([o.logits[k] for o in outs]) for k in outs[0].logits}
    return PolicyOutput(logits, torch.stack([o.value for o in outs]), hidden)


@settings(max_examples=20, deadline=None)
@given(
    t=st.integers(1, 6),
    b=st.integers(1, 4),
    seed=st.integers(0, 10**6),
    p=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_sequence_equals_chained_single_steps(t, b, seed, p):
    params = randomized(policy_init(fr.key(0), LSTM), seed=1)
    obs, starts = inputs(t, b, seed=seed, p_start=p)
    hidden = LSTMState(*torch.randn(2, b, 6, generator=torch.Generator().manual_seed(seed)))
    assert_trees_close(
        policy_apply(params, LSTM, obs, hidden, starts),
        chained_steps(LSTM, params, obs, hidden, starts),
    )
    assert_trees_close(
        policy_apply(policy_init(fr.key(0), MLP), MLP, obs, None, starts),
        chained_steps(MLP, policy_init(fr.key(0), MLP), obs, None, starts),
    )


@settings(max_examples=20, deadline=None)
@given(t=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_episode_start_forgets_the_past(t, seed):
    """From an episode start on, outputs do not depend on the state carried into the sequence."""
    params = randomized(policy_init(fr.key(0), LSTM), seed=2)
    obs, starts = inputs(t, 3, seed=seed)
    starts[0] = True
    gen = torch.Generator().manual_seed(seed)
    a = policy_apply(params, LSTM, obs, LSTMState(*torch.randn(2, 3, 6, generator=gen)), starts)
    b = policy_apply(params, LSTM, obs, LSTMState(*torch.randn(2, 3, 6, generator=gen)), starts)
    assert_trees_close(a, b, atol=0, rtol=0)
    zero = policy_apply(params, LSTM, obs, None, starts)
    assert_trees_close(a, zero, atol=0, rtol=0)
    assert all(torch.isfinite(x).all() for x in optree.tree_leaves(a))


def test_separate_critic_gradients_stay_apart():
    obs, _ = inputs(None, 4)

    def parts(cfg, params):
        out = policy_apply(params, cfg, obs, None, None)
        return out.value.sum(), sum(x.sum() for x in out.logits.values())

    for cfg, shared in ((MLP, False), (SHARED, True)):
        params = randomized(policy_init(fr.key(0), cfg))
        g_value = torch.func.grad(lambda p, cfg=cfg: parts(cfg, p)[0])(params)
        g_actor = torch.func.grad(lambda p, cfg=cfg: parts(cfg, p)[1])(params)
        assert bool(g_value["torso"]["w0"].abs().sum() > 0) == shared
        assert not g_actor["value"]["w"].any()
        if not shared:
            assert not g_actor["critic"]["w0"].any() and g_value["critic"]["w0"].abs().sum() > 0


def test_func_grad_matches_autograd():
    params = randomized(policy_init(fr.key(4), LSTM))
    obs, starts = inputs(5, 3)

    def loss(p):
        out = policy_apply(p, LSTM, obs, None, starts)
        return out.value.square().mean() + sum(x.logsumexp(-1).mean() for x in out.logits.values())

    grads = torch.func.grad(loss)(params)
    leaves = [x.clone().requires_grad_() for x in optree.tree_leaves(params)]
    ref = torch.autograd.grad(
        loss(optree.tree_unflatten(optree.tree_structure(params), leaves)), leaves
    )
    for g, r in zip(optree.tree_leaves(grads), ref, strict=True):
        torch.testing.assert_close(g, r)
    assert all(g.abs().sum() > 0 for g in optree.tree_leaves(grads))


# vmap and compile ------------------------------------------------------------------------------


def stacked_params(cfg, n=3, device=None):
    return torch.func.vmap(lambda k: randomized_like(policy_init(k, cfg), k))(
        torch.stack([fr.key(s, device) for s in range(n)])
    )


def randomized_like(params, k):
    """Random leaves from the funcppo key, so it runs under vmap."""
    return optree.tree_map(
        lambda x, i: 0.5 * fr.normal(fr.fold_in(k, i), x.shape),
        params,
        optree.tree_unflatten(
            optree.tree_structure(params), list(range(len(optree.tree_leaves(params))))
        ),
    )


def test_vmap_over_seeds_equals_loop_recurrent(device):
    params = stacked_params(LSTM, device=device)
    obs, starts = inputs(4, 2, device=device)
    obs = torch.stack([obs, obs + 1.0, obs - 1.0])
    starts = torch.stack([starts, ~starts, starts])
    hidden = init_hidden(LSTM, (3, 2), device)
    got = torch.func.vmap(make_policy_apply(LSTM))(params, obs, hidden, starts)
    for s in range(3):
        one = optree.tree_map(lambda x, s=s: x[s], params)
        ref = policy_apply(one, LSTM, obs[s], LSTMState(hidden.h[s], hidden.c[s]), starts[s])
        assert_trees_close(optree.tree_map(lambda x, s=s: x[s], got), ref)


def test_vmap_over_seeds_equals_loop_mlp_shared_obs(device):
    """MLP hidden is None: vmap needs out_dims=None for it (torch's pytree keeps None a leaf)."""
    params = stacked_params(MLP, device=device)
    obs, _ = inputs(None, 5, device=device)
    apply = torch.func.vmap(
        make_policy_apply(MLP), in_dims=(0, None, None, None), out_dims=PolicyOutput(0, 0, None)
    )
    got = apply(params, obs, None, None)
    assert got.hidden is None
    for s in range(3):
        one = optree.tree_map(lambda x, s=s: x[s], params)
        ref = policy_apply(one, MLP, obs, None, None)
        assert_trees_close(
            PolicyOutput(*[optree.tree_map(lambda x, s=s: x[s], got[i]) for i in range(2)], None),
            ref,
        )


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [MLP, LSTM], ids=["mlp", "lstm"])
def test_compile_fullgraph_matches_eager(cfg, device):
    params = randomized(policy_init(fr.key(5, device), cfg))
    obs, starts = inputs(4, 3, device=device)  # T=4: compile time grows with the unrolled steps
    hidden = None if not cfg.recurrent else LSTMState(*torch.randn(2, 3, 6, device=device))
    apply = make_policy_apply(cfg)
    compiled = torch.compile(apply, fullgraph=True)
    assert_trees_close(
        compiled(params, obs, hidden, starts), apply(params, obs, hidden, starts), atol=1e-5
    )


THIN = config(obs_dim=4, torso_sizes=(8, 7))  # first layers' inner size and value head thin


@pytest.mark.parametrize(
    "settings",
    [CompileSettings(backend="aot_eager"), CompileSettings.for_device("cpu")],
    ids=["aot_eager", "inductor-cpu"],
)
def test_compiled_gradients_over_seeds_equal_an_eager_loop(settings):
    """``compile_fn`` as the update compiles: under inductor on CPU, the products with a thin
    weight (the first layers' 4 inputs, the value head's one output) run as the seam's
    pointwise forms, and their gradients as autograd derives them; values and gradients are
    the eager loop's."""
    params = stacked_params(THIN)
    gen = torch.Generator().manual_seed(3)
    obs, weights = torch.randn(3, 6, 4, generator=gen), torch.randn(3, 6, generator=gen)

    def loss(params, obs, weights):
        out = policy_apply(params, THIN, obs, None, None)
        logits = sum(x.logsumexp(-1) for x in out.logits.values())
        return ((logits + out.value) * weights).sum(), (out.logits, out.value)

    def value_and_grad(params, obs, weights):
        return torch.func.grad(loss, has_aux=True)(params, obs, weights)

    compiled = compile_fn(torch.func.vmap(value_and_grad), "thin_network", settings)
    got = compiled(params, obs, weights)
    for s in range(3):
        one = optree.tree_map(lambda x, s=s: x[s], params)
        want = value_and_grad(one, obs[s], weights[s])
        assert_trees_close(optree.tree_map(lambda x, s=s: x[s], got), want, atol=1e-5)


# validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "obs", "hidden", "starts", "fragment"),
    [
        (MLP, torch.zeros(3, 4), None, None, "obs: expected [B, 5]"),
        (MLP, torch.zeros(5), None, None, "obs: expected"),
        (MLP, torch.zeros(3, 5), None, torch.zeros(4, dtype=torch.bool), "episode_start"),
        (MLP, torch.zeros(3, 5), init_hidden(LSTM, 3), None, "hidden: expected None"),
        (
            LSTM,
            torch.zeros(3, 5),
            None,
            torch.zeros(3),
            "episode_start: expected torch.bool (3,), got torch.float32 (3,)",
        ),
        (LSTM, torch.zeros(3, 5), None, None, "episode_start: expected a bool tensor"),
        (LSTM, torch.zeros(2, 3, 5), None, torch.zeros(3, dtype=torch.bool), "(2, 3)"),
        (
            LSTM,
            torch.zeros(3, 5),
            init_hidden(LSTM.replace(lstm_size=8), 3),
            torch.zeros(3, dtype=torch.bool),
            "hidden: expected LSTMState(h, c), each of shape (3, 6)",
        ),
        (
            LSTM,
            torch.zeros(3, 5),
            init_hidden(LSTM, 4),
            torch.zeros(3, dtype=torch.bool),
            "got ['torch.float32 (4, 6)', 'torch.float32 (4, 6)']",
        ),
    ],
)
def test_policy_apply_input_errors(cfg, obs, hidden, starts, fragment):
    params = policy_init(fr.key(0), cfg)
    with pytest.raises(ValueError) as info:
        policy_apply(params, cfg, obs, hidden, starts)
    assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("built", "checked", "fragments"),
    [
        (LSTM.replace(lstm_size=8), LSTM, ["params['lstm']['w_ih']", "lstm_size", "(7, 24)"]),
        (MLP.replace(obs_dim=6), MLP, ["params['torso']['w0']", "obs_dim", "got (6, 8)"]),
        (MLP.replace(torso_sizes=(8, 9)), MLP, ["['w1']", "torso_sizes[1]", "(8, 7)"]),
        (MLP, SHARED, ["params['critic']['b0']: unexpected", "shared_torso=True"]),
        (SHARED, MLP, ["params['critic']['w0']: missing", "obs_dim"]),
        (MLP, LSTM, ["params['critic']", "unexpected", "recurrent=True"]),
        (
            config(spec=ActionSpec({"op": 3}, "op", [(), (), ()])),
            MLP,
            ["params['heads']['arg']['w']: missing", "spec head 'arg'"],
        ),
        (
            config(spec=ActionSpec({"op": 2}, "op", [(), ()])),
            config(spec=ActionSpec({"op": 3}, "op", [(), (), ()])),
            ["params['heads']['op']['w']", "spec head 'op'", "got (7, 2)"],
        ),
    ],
)
def test_check_params_names_leaf_and_field(built, checked, fragments):
    params = policy_init(fr.key(0), built)
    with pytest.raises(ValueError) as info:
        check_params(params, checked)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_check_params_batch_dims_and_dtype():
    params = policy_init(fr.key(0), MLP)
    with pytest.raises(ValueError, match="after 1 batch dims"):
        check_params(params, MLP, batch_dims=1)
    bad = optree.tree_map(lambda x: x, params)
    bad["value"]["b"] = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"params\['value'\]\['b'\]: expected a floating tensor"):
        check_params(bad, MLP)


def test_empty_torso_is_a_linear_policy():
    cfg = config(torso_sizes=())
    params = policy_init(fr.key(0), cfg)
    check_params(params, cfg)
    obs, _ = inputs(None, 2)
    out = policy_apply(params, cfg, obs, None, None)
    torch.testing.assert_close(out.logits["op"], obs @ params["heads"]["op"]["w"])
