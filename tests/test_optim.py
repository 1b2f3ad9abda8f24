import math

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import vmap

from funcppo.core.constants import ADAM_EPS, CLIP_NORM_EPS
from funcppo.core.optim import (
    EmptyState,
    ScaleByAdamState,
    adamw,
    add_decayed_weights,
    apply_updates,
    chain,
    clip_by_global_norm,
    critic_mask,
    global_norm,
    is_critic_path,
    scale_by_adam,
    scale_by_learning_rate,
)

SHAPES = {
    "torso": {"w0": (4, 3), "b0": (4,)},
    "heads": {"op": {"w": (2, 4), "b": (2,)}},
    "value": {"w": (1, 4), "b": (1,)},
}


def _is_shape(x):
    return isinstance(x, tuple)


def make_params(gen, dtype=torch.float32, lead=()):
    return optree.tree_map(
        lambda s: torch.randn(*lead, *s, generator=gen, dtype=dtype), SHAPES, is_leaf=_is_shape
    )


def random_like(tree, gen, scale=1.0):
    return optree.tree_map(
        lambda x: scale * torch.randn(x.shape, generator=gen, dtype=x.dtype), tree
    )


def assert_trees_close(a, b, atol, rtol=0.0):
    la, sa = optree.tree_flatten(a)
    lb, sb = optree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


# The chain rounds in a different order from torch's fused addcdiv (lr is its own step), so
# float32 params drift by a few ulps over 50 steps: hence rtol next to atol.
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_adamw_matches_torch_adamw_and_clip_grad_norm(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    lr, wd, max_norm = 3e-3, 0.1, 0.5
    params = make_params(gen, dtype)
    paths, leaves, _ = optree.tree_flatten_with_path(params)
    torch_params = [torch.nn.Parameter(x.clone()) for x in leaves]
    critic = [p for p, path in zip(torch_params, paths, strict=True) if is_critic_path(path)]
    actor = [p for p, path in zip(torch_params, paths, strict=True) if not is_critic_path(path)]
    assert critic and actor
    opt = torch.optim.AdamW(
        [{"params": actor, "weight_decay": 0.0}, {"params": critic, "weight_decay": wd}],
        lr=lr,
        eps=ADAM_EPS,
    )
    tx = adamw(lr, weight_decay=wd, decay_mask=is_critic_path, max_grad_norm=max_norm)
    state = tx.init(params)
    clipped_steps = 0
    for step in range(50):
        # Scales from 1e-2 to 10 so that some steps clip and some do not.
        grads = random_like(params, gen, scale=10 ** (3 * (step % 5) / 4 - 2))
        clipped_steps += int(global_norm(grads) > max_norm)
        for p, g in zip(torch_params, optree.tree_leaves(grads), strict=True):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(torch_params, max_norm)
        opt.step()
        updates, state = tx.update(grads, state, params)
        params = apply_updates(params, updates)
        for p, x in zip(torch_params, optree.tree_leaves(params), strict=True):
            torch.testing.assert_close(x, p.detach(), atol=tol, rtol=tol)
    assert 0 < clipped_steps < 50
    assert int(state[1].count) == 50


def test_scale_by_adam_hand_worked_two_steps():
    # Step 1, g = 1: m = 0.1, v = 0.001, m_hat = 1, sqrt(v_hat) = 1 -> 1 / (1 + eps).
    # Step 2, g = -1: m = 0.9*0.1 - 0.1 = -0.01, bc1 = 1 - 0.81 = 0.19, m_hat = -1/19;
    #   v = 0.999*0.001 + 0.001 = 0.001999 = bc2, so v_hat = 1 -> (-1/19) / (1 + eps).
    tx = scale_by_adam()
    params = {"x": torch.zeros(1, dtype=torch.float64)}
    state = tx.init(params)
    u1, state = tx.update({"x": torch.ones(1, dtype=torch.float64)}, state)
    assert u1["x"].item() == pytest.approx(1 / (1 + ADAM_EPS), rel=1e-14)
    torch.testing.assert_close(state.mu["x"], torch.tensor([0.1], dtype=torch.float64))
    u2, state = tx.update({"x": -torch.ones(1, dtype=torch.float64)}, state)
    assert u2["x"].item() == pytest.approx((-1 / 19) / (1 + ADAM_EPS), rel=1e-12)
    assert state.nu["x"].item() == pytest.approx(0.001999, rel=1e-12)
    assert state.count.dtype == torch.int64 and int(state.count) == 2


def naive_adam_steps(grads_per_step, b1, b2, eps):
    """torch.optim.Adam's recursion on Python floats, one element at a time."""
    m, v, out = 0.0, 0.0, []
    for t, g in enumerate(grads_per_step, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        out.append((m / (1 - b1**t)) / (math.sqrt(v) / math.sqrt(1 - b2**t) + eps))
    return out


def test_scale_by_adam_matches_naive_loop():
    gen = torch.Generator().manual_seed(1)
    grads = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    b1, b2, eps = 0.8, 0.95, 1e-3
    tx = scale_by_adam(b1, b2, eps)
    state = tx.init(torch.zeros(5, dtype=torch.float64))
    got = []
    for g in grads:
        u, state = tx.update(g, state)
        got.append(u)
    for j in range(5):
        want = naive_adam_steps(grads[:, j].tolist(), b1, b2, eps)
        for step, w in enumerate(want):
            assert got[step][j].item() == pytest.approx(w, rel=1e-12, abs=1e-14)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=8))
def test_first_adam_step_is_sign_like(values):
    # After one step m_hat = g and sqrt(v_hat) = |g|, so the direction is g / (|g| + eps).
    g = torch.tensor(values, dtype=torch.float64)
    tx = scale_by_adam()
    u, _ = tx.update(g, tx.init(g))
    torch.testing.assert_close(u, g / (g.abs() + ADAM_EPS), atol=1e-12, rtol=1e-12)
    assert bool((u.abs() < 1).all())


def test_global_norm_matches_naive_loop_and_hand_value():
    tree = {"a": torch.tensor([3.0, 0.0]), "b": {"c": torch.tensor([[4.0]])}}
    assert global_norm(tree).item() == pytest.approx(5.0)
    gen = torch.Generator().manual_seed(2)
    params = make_params(gen, torch.float64)
    naive = math.sqrt(
        sum(x * x for leaf in optree.tree_leaves(params) for x in leaf.flatten().tolist())
    )
    assert global_norm(params).item() == pytest.approx(naive, rel=1e-13)


def test_clip_by_global_norm_hand_worked():
    grads = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
    tx = clip_by_global_norm(1.0)
    out, state = tx.update(grads, tx.init(grads))
    coef = 1.0 / (5.0 + CLIP_NORM_EPS)
    torch.testing.assert_close(out["a"], torch.tensor([3.0 * coef, 0.0]))
    torch.testing.assert_close(out["b"], torch.tensor([4.0 * coef]))
    assert state == EmptyState()
    unclipped, _ = clip_by_global_norm(10.0).update(grads, EmptyState())
    assert all(torch.equal(unclipped[k], grads[k]) for k in grads)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=8),
    st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=8),
    st.floats(1e-3, 1e3),
)
def test_clip_by_global_norm_properties(a, b, max_norm):
    grads = {"a": torch.tensor(a), "b": {"c": torch.tensor(b)}}
    norm = global_norm(grads)
    out, _ = clip_by_global_norm(max_norm).update(grads, EmptyState())
    assert global_norm(out).item() <= max_norm * (1 + 1e-5)
    # Direction preserved: one shared factor c in [0, 1] for every element of every leaf.
    flat_in = torch.cat([x.flatten() for x in optree.tree_leaves(grads)])
    flat_out = torch.cat([x.flatten() for x in optree.tree_leaves(out)])
    c = min(1.0, max_norm / (norm.item() + CLIP_NORM_EPS))
    torch.testing.assert_close(flat_out, flat_in * c, atol=1e-6 * max(1.0, max_norm), rtol=1e-5)
    # Where the factor, in the gradients' dtype as clip_grad_norm_ computes it, is exactly 1,
    # gradients pass through bit for bit. (In float64, norm + eps <= max_norm can still give a
    # float32 factor of 0.99999994: hypothesis found a = [0], b = [105.2628173828125],
    # max_norm = 105.26282075379683.)
    factor = torch.clamp(max_norm / (norm + CLIP_NORM_EPS), max=1.0)
    if factor == 1:
        assert torch.equal(flat_out, flat_in)


def test_clip_factor_at_the_float32_boundary():
    # The example hypothesis found: exactly, norm + eps < max_norm; in float32 the factor is
    # 0.99999994, and the result still agrees with torch's clip_grad_norm_ bit for bit.
    grads = {"a": torch.tensor([0.0]), "b": torch.tensor([105.2628173828125])}
    max_norm = 105.26282075379683
    out, _ = clip_by_global_norm(max_norm).update(grads, EmptyState())
    expected = [g.clone().requires_grad_() for g in grads.values()]
    for p in expected:
        p.grad = p.detach().clone()
    torch.nn.utils.clip_grad_norm_(expected, max_norm)
    for got, p in zip(out.values(), expected, strict=True):
        assert torch.equal(got, p.grad)


def test_clip_under_vmap_uses_one_norm_per_seed():
    # Seed norms 0.5, 5 and 50 with max_norm 1: only seeds 1 and 2 are clipped, each to norm 1.
    # One norm over the stacked seeds (the trap) would also shrink seed 0.
    base = {"w": torch.tensor([[0.3, 0.0], [0.0, 0.0]]), "b": torch.tensor([0.4])}
    scales = torch.tensor([1.0, 10.0, 100.0])
    grads = optree.tree_map(lambda x: scales.reshape(-1, *[1] * x.ndim) * x, base)
    tx = clip_by_global_norm(1.0)
    out, _ = vmap(tx.update, in_dims=(0, None))(grads, EmptyState())
    per_seed = vmap(global_norm)(out)
    torch.testing.assert_close(per_seed, torch.tensor([0.5, 1.0, 1.0]), atol=1e-5, rtol=0)
    assert_trees_close(optree.tree_map(lambda x: x[0], out), base, atol=0)
    for s in range(3):
        want, _ = tx.update(optree.tree_map(lambda x, s=s: x[s], grads), EmptyState())
        assert_trees_close(optree.tree_map(lambda x, s=s: x[s], out), want, atol=1e-7)
    trap, _ = tx.update(grads, EmptyState())
    assert not torch.allclose(trap["b"][0], out["b"][0])


def test_add_decayed_weights_masks_and_learning_rate_hand_worked():
    params = {"actor": {"w": torch.tensor([2.0])}, "value": {"w": torch.tensor([-4.0])}}
    updates = {"actor": {"w": torch.tensor([1.0])}, "value": {"w": torch.tensor([1.0])}}
    want = {"actor": {"w": torch.tensor([1.0])}, "value": {"w": torch.tensor([1.0 - 0.5 * 4.0])}}
    for mask in (is_critic_path, critic_mask(params)):
        out, _ = add_decayed_weights(0.5, mask).update(updates, EmptyState(), params)
        assert_trees_close(out, want, atol=0)
    everything, _ = add_decayed_weights(0.5).update(updates, EmptyState(), params)
    assert everything["actor"]["w"].item() == 2.0
    scaled, _ = scale_by_learning_rate(0.1).update(want, EmptyState())
    torch.testing.assert_close(scaled["value"]["w"], torch.tensor([0.1]))


def test_critic_mask_marks_value_and_critic_keys_only():
    params = make_params(torch.Generator().manual_seed(3))
    params["heads"]["critic"] = {"w": torch.zeros(1)}
    mask = critic_mask(params)
    assert mask["value"] == {"w": True, "b": True}
    assert mask["heads"]["critic"] == {"w": True}
    assert mask["heads"]["op"] == {"w": False, "b": False}
    assert mask["torso"] == {"w0": False, "b0": False}
    assert is_critic_path(("value", "w")) and not is_critic_path(("heads", "op", "w"))


def test_chain_state_layout_and_purity():
    gen = torch.Generator().manual_seed(4)
    params = make_params(gen)
    grads = random_like(params, gen)
    snapshot = optree.tree_map(torch.clone, (params, grads))
    for tx in (
        adamw(1e-3),
        adamw(1e-3, weight_decay=0.1, decay_mask=critic_mask(params), max_grad_norm=0.5),
    ):
        state = tx.init(params)
        assert len(state) == 4 and isinstance(state[1], ScaleByAdamState)
        updates, new_state = tx.update(grads, state, params)
        new_params = apply_updates(params, updates)
        assert int(state[1].count) == 0 and int(new_state[1].count) == 1
        assert_trees_close((params, grads), snapshot, atol=0)
        inputs = {x.data_ptr() for x in optree.tree_leaves((params, grads, state))}
        outputs = optree.tree_leaves((updates, new_state, new_params))
        assert not inputs & {x.data_ptr() for x in outputs}


def test_zero_dim_leaves_keep_dtype_with_tensor_hyperparameters():
    params = {"log_std": torch.zeros((), dtype=torch.float64), "w": torch.ones(3)}
    grads = {"log_std": torch.ones((), dtype=torch.float64), "w": torch.ones(3)}
    h = torch.tensor(0.1)
    tx = adamw(
        h,
        b1=torch.tensor(0.9),
        b2=torch.tensor(0.99),
        eps=torch.tensor(1e-8),
        weight_decay=h,
        max_grad_norm=torch.tensor(1.0),
    )
    updates, _ = tx.update(grads, tx.init(params), params)
    assert updates["log_std"].dtype == torch.float64 and updates["w"].dtype == torch.float32


def run_adamw(params, grads_seq, **hyper):
    tx = adamw(**hyper)
    state = tx.init(params)
    for grads in grads_seq:
        updates, state = tx.update(grads, state, params)
        params = apply_updates(params, updates)
    return params, state


def test_vmap_over_seeds_matches_loop_with_swept_learning_rate():
    gen = torch.Generator().manual_seed(5)
    params = make_params(gen, lead=(2,))
    grads_seq = [random_like(params, gen, scale=s) for s in (0.1, 3.0, 1.0)]
    lrs = torch.tensor([1e-3, 3e-3])

    def run(lr, p, gs):
        return run_adamw(
            p, gs, learning_rate=lr, weight_decay=0.01, decay_mask=is_critic_path, max_grad_norm=1.0
        )

    batched, state = vmap(run)(lrs, params, grads_seq)
    assert state[1].count.shape == (2,)
    for s, lr in enumerate([1e-3, 3e-3]):
        one, _ = run_adamw(
            optree.tree_map(lambda x, s=s: x[s], params),
            optree.tree_map(lambda x, s=s: x[s], grads_seq),
            learning_rate=lr,
            weight_decay=0.01,
            decay_mask=is_critic_path,
            max_grad_norm=1.0,
        )
        assert_trees_close(optree.tree_map(lambda x, s=s: x[s], batched), one, atol=1e-7)


def test_vmap_sweeps_every_hyperparameter():
    gen = torch.Generator().manual_seed(6)
    params = make_params(gen, lead=(2,))
    grads_seq = [random_like(params, gen, scale=s) for s in (2.0, 0.2)]
    hyper = {
        "learning_rate": [1e-2, 2e-3],
        "b1": [0.9, 0.8],
        "b2": [0.999, 0.95],
        "eps": [1e-5, 1e-3],
        "weight_decay": [0.0, 0.1],
        "max_grad_norm": [0.5, 5.0],
    }
    stacked = {k: torch.tensor(v) for k, v in hyper.items()}
    init_state = vmap(adamw(1e-3).init)(params)
    assert init_state[1].count.shape == (2,)
    batched, _ = vmap(lambda h, p, gs: run_adamw(p, gs, decay_mask=is_critic_path, **h))(
        stacked, params, grads_seq
    )
    for s in range(2):
        one, _ = run_adamw(
            optree.tree_map(lambda x, s=s: x[s], params),
            optree.tree_map(lambda x, s=s: x[s], grads_seq),
            decay_mask=is_critic_path,
            **{k: v[s] for k, v in hyper.items()},
        )
        assert_trees_close(optree.tree_map(lambda x, s=s: x[s], batched), one, atol=1e-7)


def test_compiled_adamw_update_matches_eager():
    gen = torch.Generator().manual_seed(7)
    params = make_params(gen)
    tx = adamw(3e-3, weight_decay=0.1, decay_mask=is_critic_path, max_grad_norm=0.5)

    def step(params, grads, state):
        updates, state = tx.update(grads, state, params)
        return apply_updates(params, updates), state

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    eager_p, eager_s = params, tx.init(params)
    comp_p, comp_s = params, tx.init(params)
    for scale in (5.0, 0.01):
        grads = random_like(params, gen, scale=scale)
        eager_p, eager_s = step(eager_p, grads, eager_s)
        comp_p, comp_s = compiled(comp_p, grads, comp_s)
        assert_trees_close(comp_p, eager_p, atol=1e-6)
        assert_trees_close(comp_s, eager_s, atol=1e-6)
    # The decay mask was applied inside the compiled graph: actor and critic differ from a
    # run that decays everything.
    no_mask = adamw(3e-3, weight_decay=0.1, max_grad_norm=0.5)
    g = random_like(params, gen)
    u_all, _ = no_mask.update(g, no_mask.init(params), params)
    u_mask, _ = tx.update(g, tx.init(params), params)
    assert torch.equal(u_all["value"]["w"], u_mask["value"]["w"])
    assert not torch.equal(u_all["torso"]["w0"], u_mask["torso"]["w0"])


@pytest.mark.parametrize(
    ("factory", "name"),
    [
        (lambda: adamw(-1e-3), "learning_rate"),
        (lambda: adamw(torch.tensor([1e-3, 2e-3])), "learning_rate"),
        (lambda: adamw(1e-3, b1=1.0), "b1"),
        (lambda: adamw(1e-3, b2=-0.1), "b2"),
        (lambda: adamw(1e-3, eps=-1.0), "eps"),
        (lambda: adamw(1e-3, weight_decay=-0.1), "weight_decay"),
        (lambda: adamw(1e-3, max_grad_norm=0.0), "max_norm"),
        (lambda: adamw("0.1"), "learning_rate"),
        (lambda: clip_by_global_norm(torch.tensor(1)), "max_norm"),
    ],
)
def test_bad_hyperparameters_raise_value_error(factory, name):
    with pytest.raises(ValueError, match=name):
        factory()


def test_bad_update_inputs_raise_value_error():
    params = {"a": torch.ones(2), "value": torch.ones(1)}
    with pytest.raises(ValueError, match="params"):
        add_decayed_weights(0.1).update(params, EmptyState(), None)
    with pytest.raises(ValueError, match="mask"):
        add_decayed_weights(0.1, {"a": True}).update(params, EmptyState(), params)
    with pytest.raises(ValueError, match="mask"):
        add_decayed_weights(0.1, {"a": 1, "value": True}).update(params, EmptyState(), params)
    tx = chain(scale_by_adam(), scale_by_learning_rate(0.1))
    with pytest.raises(ValueError, match="state"):
        tx.update(params, (tx.init(params)[0],), params)
    with pytest.raises(ValueError, match="tree"):
        global_norm({"a": 1.0})


@pytest.mark.slow
def test_compiled_vmapped_sweep_matches_eager():
    gen = torch.Generator().manual_seed(8)
    params = make_params(gen, lead=(2,))
    grads = random_like(params, gen, scale=3.0)
    lrs = torch.tensor([1e-3, 3e-3])

    def step(lr, params, grads, state):
        tx = adamw(lr, weight_decay=0.01, decay_mask=is_critic_path, max_grad_norm=1.0)
        updates, state = tx.update(grads, state, params)
        return apply_updates(params, updates), state

    state = vmap(adamw(1e-3, weight_decay=0.01, max_grad_norm=1.0).init)(params)
    torch._dynamo.reset()
    compiled = torch.compile(vmap(step), fullgraph=True)
    assert_trees_close(
        compiled(lrs, params, grads, state), vmap(step)(lrs, params, grads, state), atol=1e-6
    )
