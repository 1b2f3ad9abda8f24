"""make_update_fn: against a plain torch reference, compiled against eager, vmapped against a
loop, KL early stopping per seed, the finiteness gate, the NaN gradient sentinel and errors."""

import math

import optree
import pytest
import torch

from funcppo.core import random as jr
from funcppo.core.advantages import gae, normalize_advantages, per_head_advantages
from funcppo.core.config import PPOConfig
from funcppo.core.constants import KL_EARLY_STOP_FACTOR
from funcppo.core.distributions import factored_entropy, factored_logprob
from funcppo.core.losses import LossCoefs, ppo_loss
from funcppo.core.networks import policy_apply
from funcppo.core.spec import ActionSpec, causal_masks, entropy_floor_masks
from funcppo.training.state import init_train_state, make_hyperparams
from funcppo.training.synthetic import synthetic_batch
from funcppo.training.update import make_update_fn

SPEC = ActionSpec(
    {"op": 3, "a": 5, "b": 4, "c": 6}, "op", [(), ("a",), ("a", "b", "c")], op_conditioned=("a",)
)
T, B = 16, 4


def small_config(**changes) -> PPOConfig:
    base = dict(
        obs_dim=6,
        spec=SPEC,
        torso_sizes=(16,),
        lstm_size=8,
        bptt_len=8,
        update_epochs=2,
        num_minibatches=2,
        compile=False,
        learning_rate=1e-2,
        weight_decay=0.1,
    )
    base.update(changes)
    return PPOConfig(**base)


def make_case(config, seed=0, device=None):
    state = init_train_state(jr.key(seed, device), config)
    batch = synthetic_batch(config, state.params, jr.key(seed + 100, device), T, B)
    return state, batch


def leaves_close(a, b, atol):
    return all(
        torch.allclose(x, y, atol=atol, rtol=0, equal_nan=True)
        for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True)
    )


def max_diff(a, b):
    return max(
        float((x.float() - y.float()).abs().max())
        for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True)
    )


def reference_update(config, state, batch):
    """One epoch, one minibatch over the whole rollout, with torch.optim.AdamW and
    clip_grad_norm_: written without make_update_fn's sequencing, gating or metrics."""
    params = optree.tree_map(lambda p: p.detach().clone().requires_grad_(True), state.params)
    paths, leaves, _ = optree.tree_flatten_with_path(params)
    critic = [p for path, p in zip(paths, leaves, strict=True) if path[0] in ("critic", "value")]
    actor = [p for path, p in zip(paths, leaves, strict=True) if path[0] not in ("critic", "value")]
    opt = torch.optim.AdamW(
        [
            {"params": actor, "weight_decay": 0.0},
            {"params": critic, "weight_decay": config.weight_decay},
        ],
        lr=config.learning_rate,
        eps=config.adam_eps,
    )
    adv, returns = gae(
        batch.rewards,
        batch.values,
        batch.next_values,
        batch.terminated,
        batch.truncated,
        config.gamma,
        config.gae_lambda,
    )
    adv = normalize_advantages(adv)
    op = batch.actions["op"]
    causal = causal_masks(SPEC, op)
    availability = entropy_floor_masks(SPEC, batch.masks, op)
    out = policy_apply(params, config, batch.obs, None, batch.episode_start)
    new_lp, _ = factored_logprob(SPEC, out.logits, batch.masks, batch.actions)
    ent = factored_entropy(SPEC, out.logits, batch.masks, batch.actions)
    coefs = LossCoefs(
        config.clip_coef,
        config.vf_coef,
        config.ent_coef,
        None,
        config.clip_vloss,
        config.value_clip,
        None,
        config.entropy_floor_coef,
    )
    loss, _ = ppo_loss(
        new_lp,
        batch.logprobs,
        ent,
        out.value,
        batch.values,
        returns,
        per_head_advantages(adv, causal),
        causal,
        coefs,
        availability,
    )
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(leaves, config.max_grad_norm)
    opt.step()
    return optree.tree_map(lambda p: p.detach(), params)


def test_one_step_matches_plain_torch_reference(device):
    config = small_config(update_epochs=1, num_minibatches=1)
    state, batch = make_case(config, device=device)
    new_state, metrics = make_update_fn(config)(state, batch)
    expected = reference_update(config, state, batch)
    assert max_diff(new_state.params, expected) < 1e-6
    assert float(metrics["updates_applied"]) == 1.0
    assert int(new_state.step) == 1


def test_update_is_pure_and_changes_params():
    config = small_config()
    state, batch = make_case(config)
    before = optree.tree_map(torch.clone, (state, batch))
    new_state, _ = make_update_fn(config)(state, batch)
    assert max_diff((state, batch), before) == 0.0
    assert max_diff(new_state.params, state.params) > 0.0


@pytest.mark.parametrize("num_seeds", [None, 3])
def test_states_have_row_major_strides_before_and_after_an_update(num_seeds):
    """Compiled functions guard on strides, size-1 axes included: a state whose layout an
    update does not reproduce (QR's column-major [n, 1] value weight, or a parameter left as a
    view into the update's flat groups) made the rollout and the update compile twice."""
    config = small_config()
    keys = jr.key(0) if num_seeds is None else jr.split(jr.key(0), num_seeds)
    state = init_train_state(keys, config)
    if num_seeds is None:
        _, batch = make_case(config)
        after, _ = make_update_fn(config)(state, batch)
    else:
        batch = optree.tree_map(
            lambda *xs: torch.stack(xs),
            *[make_case(config)[1] for _ in range(num_seeds)],
            none_is_leaf=False,
        )
        after, _ = make_update_fn(config, num_seeds=num_seeds)(state, batch)
    for tree in (state.params, state.opt_state, after.params, after.opt_state):
        for leaf in optree.tree_leaves(tree):
            assert leaf.stride() == torch.empty(leaf.shape).stride()
            assert leaf.storage_offset() == 0


# Inductor's C++ code generation dominates compile time on CPU, so one test runs the default
# path through inductor (the minibatch steps as one scan, looped in inductor's C++) and the
# others trace with aot_eager: the same dynamo graph capture (fullgraph, no graph break) and
# AOTAutograd, without code generation.
@pytest.mark.parametrize(
    ("scope", "backend"),
    [("scan", "inductor"), ("minibatch", "aot_eager"), ("update", "aot_eager")],
)
def test_compiled_matches_eager_without_graph_breaks(scope, backend, device):
    config = small_config(target_kl=0.05, update_epochs=1)
    state, batch = make_case(config, device=device)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = make_update_fn(config.replace(compile=True), compile_scope=scope, backend=backend)
    c_state, c_metrics = compiled(state, batch)
    e_state, e_metrics = make_update_fn(config)(state, batch)
    assert sum(counters["graph_break"].values()) == 0
    assert max_diff(c_state.params, e_state.params) < 1e-5
    for name, value in e_metrics.items():
        assert torch.allclose(c_metrics[name], value, atol=1e-5, equal_nan=True), name


@pytest.mark.slow
def test_scan_scope_matches_eager_for_vmapped_seeds_without_graph_breaks(device):
    # The minibatch steps as one scan: vmapped inside the scan body, an LSTM replayed in it.
    config = small_config(recurrent=True, bptt_len=4, target_kl=0.02, update_epochs=2)
    states = init_train_state(jr.split(jr.key(5, device), 2), config)
    batches = [
        synthetic_batch(
            config, optree.tree_map(lambda x, i=i: x[i], states.params), jr.key(6 + i, device), T, B
        )
        for i in range(2)
    ]
    batches = optree.tree_map(lambda *xs: torch.stack(xs), *batches, none_is_leaf=False)
    e_state, e_metrics = make_update_fn(config, num_seeds=2)(states, batches)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    scanned = make_update_fn(
        config.replace(compile=True), num_seeds=2, compile_scope="scan", backend="aot_eager"
    )
    c_state, c_metrics = scanned(states, batches)
    assert sum(counters["graph_break"].values()) == 0
    assert max_diff(c_state.params, e_state.params) < 1e-5
    assert max_diff(c_state.opt_state, e_state.opt_state) < 1e-5
    for name, value in e_metrics.items():
        assert torch.allclose(c_metrics[name], value, atol=1e-5, equal_nan=True), name


def test_vmapped_seeds_match_each_seed_alone(device):
    config = small_config(target_kl=0.02)
    keys = jr.split(jr.key(3, device), 4)
    states = init_train_state(keys, config)
    batches = [
        synthetic_batch(
            config,
            optree.tree_map(lambda x, i=i: x[i], states.params),
            jr.fold_in(jr.key(4, device), i),
            T,
            B,
        )
        for i in range(4)
    ]
    batch = optree.tree_map(lambda *xs: torch.stack(xs), *batches, none_is_leaf=False)
    v_state, v_metrics = make_update_fn(config, num_seeds=4)(states, batch)
    single = make_update_fn(config)
    for i in range(4):
        state_i = optree.tree_map(lambda x, i=i: x[i], states)
        s_state, s_metrics = single(state_i, batches[i])
        assert max_diff(optree.tree_map(lambda x, i=i: x[i], v_state), s_state) < 1e-5
        for name, value in s_metrics.items():
            assert torch.allclose(v_metrics[name][i], value, atol=1e-5, equal_nan=True), name


def test_learning_rate_sweep_in_one_vmapped_call(device):
    config = small_config()
    lrs = torch.tensor([1e-3, 3e-2])
    keys = torch.stack([jr.key(7, device), jr.key(7, device)])
    states = init_train_state(keys, config, learning_rate=lrs)
    state0 = optree.tree_map(lambda x: x[0], states)
    batch = synthetic_batch(config, state0.params, jr.key(8, device), T, B)
    batches = optree.tree_map(lambda x: torch.stack([x, x]), batch, none_is_leaf=False)
    v_state, _ = make_update_fn(config, num_seeds=2, hparams="state")(states, batches)
    for i, lr in enumerate(lrs.tolist()):
        alone = init_train_state(jr.key(7, device), config.replace(learning_rate=lr))
        s_state, _ = make_update_fn(config.replace(learning_rate=lr))(alone, batch)
        assert max_diff(optree.tree_map(lambda x, i=i: x[i], v_state.params), s_state.params) < 1e-6
    assert (
        max_diff(
            optree.tree_map(lambda x: x[0], v_state.params),
            optree.tree_map(lambda x: x[1], v_state.params),
        )
        > 1e-4
    )


def test_kl_early_stopping_is_per_seed_and_before_the_step(device):
    config = small_config(target_kl=1.0, learning_rate=0.05)
    keys = torch.stack([jr.key(1, device), jr.key(1, device)])
    states = init_train_state(keys, config, target_kl=torch.tensor([1e-9, 1e9]))
    state0 = optree.tree_map(lambda x: x[0], states)
    batch = synthetic_batch(config, state0.params, jr.key(2, device), T, B)
    batches = optree.tree_map(lambda x: torch.stack([x, x]), batch, none_is_leaf=False)
    v_state, metrics = make_update_fn(config, num_seeds=2, hparams="state")(states, batches)
    # Seed 0: the first step is on-policy (KL 0), so it applies; the second sees KL > 0 and
    # stops before its optimizer step, in epoch 0.
    assert metrics["updates_applied"].tolist() == [1.0, 4.0]
    assert metrics["stop_epoch"].tolist() == [0.0, 2.0]
    assert metrics["early_stopped"].tolist() == [1.0, 0.0]
    assert v_state.opt_state[1].count.tolist() == [1, 4]
    assert v_state.step.tolist() == [1, 1]
    # Seed 0's metrics are those of its one applied, on-policy step: ratio 1, KL 0; the
    # evaluated-but-refused second step is left out.
    assert float(metrics["approx_kl"][0]) < 1e-10
    assert float(metrics["clip_fraction"][0]) == 0.0
    assert metrics["ratio_max"][0].item() == pytest.approx(1.0, abs=1e-5)
    single = make_update_fn(config, hparams="state")
    for i in range(2):
        s_state, s_metrics = single(optree.tree_map(lambda x, i=i: x[i], states), batch)
        assert max_diff(optree.tree_map(lambda x, i=i: x[i], v_state), s_state) < 1e-5
        for name, value in s_metrics.items():
            assert torch.allclose(metrics[name][i], value, atol=1e-5, equal_nan=True), name


@pytest.mark.slow
def test_vmapped_seed_without_an_applied_step_keeps_its_step_and_reports_nan(device):
    # Seed 0's data is non-finite (every step skipped), seed 1's target stops it after one
    # applied step, seed 2 runs every step: vmapped, eager and compiled, as one at a time.
    config = small_config(target_kl=1.0, learning_rate=0.05, update_epochs=1)
    keys = torch.stack([jr.key(1, device)] * 3)
    states = init_train_state(keys, config, target_kl=torch.tensor([1e9, 1e-9, 1e9]))
    state0 = optree.tree_map(lambda x: x[0], states)
    batch = synthetic_batch(config, state0.params, jr.key(2, device), T, B)
    bad = batch._replace(obs=torch.full_like(batch.obs, math.nan))
    batches = [bad, batch, batch]
    stacked = optree.tree_map(lambda *xs: torch.stack(xs), *batches, none_is_leaf=False)
    v_state, v_metrics = make_update_fn(config, num_seeds=3, hparams="state")(states, stacked)
    assert v_state.step.tolist() == [0, 1, 1]
    assert v_metrics["updates_applied"].tolist() == [0.0, 1.0, 2.0]
    assert math.isnan(float(v_metrics["approx_kl"][0])) and float(v_metrics["approx_kl"][1]) < 1e-10
    single = make_update_fn(config, hparams="state")
    for i in range(3):
        s_state, s_metrics = single(optree.tree_map(lambda x, i=i: x[i], states), batches[i])
        assert max_diff(optree.tree_map(lambda x, i=i: x[i], v_state), s_state) < 1e-5
        for name, value in s_metrics.items():
            assert torch.allclose(v_metrics[name][i], value, atol=1e-5, equal_nan=True), name
    torch._dynamo.reset()
    compiled = make_update_fn(
        config.replace(compile=True),
        num_seeds=3,
        compile_scope="scan",
        backend="aot_eager",
        hparams="state",
    )
    c_state, c_metrics = compiled(states, stacked)
    assert c_state.step.tolist() == [0, 1, 1]
    assert max_diff(c_state.params, v_state.params) < 1e-5
    for name, value in v_metrics.items():
        assert torch.allclose(c_metrics[name], value, atol=1e-5, equal_nan=True), name


def test_finiteness_gate_leaves_params_untouched():
    config = small_config()
    state, batch = make_case(config)
    bad = batch._replace(obs=torch.full_like(batch.obs, math.nan))
    new_state, metrics = make_update_fn(config)(state, bad)
    assert max_diff(new_state.params, state.params) == 0.0
    assert max_diff(new_state.opt_state, state.opt_state) == 0.0
    assert float(metrics["nonfinite_skips"]) == 4.0
    assert float(metrics["updates_applied"]) == 0.0
    # Nothing was applied, so it is no train step (annealing and checkpoints count them).
    assert int(new_state.step) == 0
    # A seed with no applied step reports NaN for every per-step metric, -1 for the worst head.
    for name in ("loss", "approx_kl", "clip_fraction", "ratio_max", "ratio_min", "entropy"):
        assert math.isnan(float(metrics[name])), name
    assert float(metrics["ratio_worst_head"]) == -1.0


def capture_steps(monkeypatch):
    """Record every update's per-step metrics, stacked on a leading step axis, as ``finish``
    receives them."""
    import funcppo.training.update as update_module

    real, seen = update_module.finish, []

    def spy(s, step, key, carry, stats, metrics):
        seen.append(metrics)
        return real(s, step, key, carry, stats, metrics)

    monkeypatch.setattr(update_module, "finish", spy)
    return seen


def test_metrics_after_a_kl_stop_average_the_applied_steps_only(monkeypatch):
    config = small_config(learning_rate=0.05)
    state, batch = make_case(config)
    seen = capture_steps(monkeypatch)
    _, free = make_update_fn(config)(state, batch)
    rows = seen[-1]["mean"]
    kl = rows["approx_kl"]
    assert float(free["updates_applied"]) == 4.0
    assert seen[-1]["applied"].tolist() == [True] * 4
    # A target between the first two steps' KL and the third's: the third step stops the
    # update, so two steps are applied, the same two as without a target.
    assert float(kl[2]) > float(kl[:2].max())
    target = (float(kl[:2].max()) + float(kl[2])) / 2 / KL_EARLY_STOP_FACTOR
    stopping = config.replace(target_kl=target)
    state = state._replace(hparams=make_hyperparams(stopping))
    stopped_state, stopped = make_update_fn(stopping)(state, batch)
    assert float(stopped["updates_applied"]) == 2.0 and float(stopped["early_stopped"]) == 1.0
    assert seen[-1]["applied"].tolist() == [True, True, False, False]
    assert int(stopped_state.step) == 1  # a stop after applied steps is a train step
    for name in ("approx_kl", "loss", "clip_fraction", "grad_norm", "kl/a"):
        expected = rows[name][:2].mean()
        assert torch.allclose(stopped[name], expected, atol=1e-7, rtol=1e-6), name
    ratio_max = seen[-1]["max"]["ratio_max"]
    assert float(stopped["ratio_max"]) == pytest.approx(float(ratio_max[:2].max()))
    assert float(ratio_max[2:].max()) > float(ratio_max[:2].max())  # the refused steps' left out


def test_finiteness_gate_skips_only_affected_minibatches():
    config = small_config(update_epochs=1, num_minibatches=4)
    state, batch = make_case(config)
    rewards, terminated = batch.rewards.clone(), batch.terminated.clone()
    # A terminal first step: the infinite reward reaches no other step's advantage, so exactly
    # one sample, and so one minibatch, is affected.
    rewards[0, 1], terminated[0, 1] = math.inf, True
    bad = batch._replace(rewards=rewards, terminated=terminated)
    _, metrics = make_update_fn(config)(state, bad)
    assert float(metrics["nonfinite_skips"]) == 1.0
    assert float(metrics["updates_applied"]) == 3.0
    assert math.isfinite(float(metrics["loss"]))


def only_ops_0_and_1(batch):
    """``batch`` with op 2 masked out everywhere and every taken op 0: heads b and c are then
    never relevant, and c never available (only op 2 uses it). Op 0's row of the op-conditioned
    head a is widened to allow the a action already taken, so every action stays valid."""
    op_mask = batch.masks["op"].clone()
    op_mask[..., 2] = False
    op_mask[..., 0] = True
    a_mask = batch.masks["a"].clone()
    a_mask[..., 0, :] |= batch.actions["a"].unsqueeze(-1) == torch.arange(a_mask.shape[-1])
    actions = dict(batch.actions, op=torch.zeros_like(batch.actions["op"]))
    return batch._replace(actions=actions, masks=dict(batch.masks, op=op_mask, a=a_mask))


def test_head_grad_norm_is_nan_when_head_never_relevant():
    config = small_config()
    state, batch = make_case(config)
    _, metrics = make_update_fn(config)(state, only_ops_0_and_1(batch))
    assert math.isnan(float(metrics["grad_norm/c"]))
    assert math.isnan(float(metrics["grad_norm/b"]))
    assert math.isfinite(float(metrics["grad_norm/op"]))
    assert float(metrics["relevant_fraction/c"]) == 0.0


@pytest.mark.parametrize("accum", [1, 2])
def test_entropy_floor_of_a_head_never_available_adds_nothing(accum):
    config = small_config(update_epochs=1, grad_accum_steps=accum)
    state, batch = make_case(config)
    batch = only_ops_0_and_1(batch)
    plain_state, plain = make_update_fn(config)(state, batch)
    floored = config.replace(entropy_floor={"c": 0.5}, entropy_floor_coef=1.0)
    floor_state, metrics = make_update_fn(floored)(state, batch)
    assert float(metrics["entropy_floor_penalty"]) == 0.0
    assert float(metrics["loss"]) == pytest.approx(float(plain["loss"]), abs=1e-6)
    assert max_diff(floor_state.params, plain_state.params) < 1e-6


@pytest.mark.slow
def test_recurrent_update_runs_compiled_and_matches_eager(device):
    config = small_config(recurrent=True, bptt_len=4, update_epochs=1, num_minibatches=2)
    state, batch = make_case(config, device=device)
    e_state, e_metrics = make_update_fn(config)(state, batch)
    compiled = make_update_fn(config.replace(compile=True), backend="aot_eager")
    c_state, _ = compiled(state, batch)
    assert max_diff(c_state.params, e_state.params) < 1e-5
    # On-policy first step with rollout hidden states: the ratio starts at exactly 1.
    assert float(e_metrics["updates_applied"]) == 2.0
    assert max_diff(e_state.params, state.params) > 0.0


def test_recurrent_first_step_is_on_policy():
    config = small_config(
        recurrent=True, bptt_len=T, update_epochs=1, num_minibatches=1, target_kl=1e-9
    )
    state, batch = make_case(config)
    _, metrics = make_update_fn(config)(state, batch)
    assert float(metrics["approx_kl"]) < 1e-10
    assert float(metrics["updates_applied"]) == 1.0


def test_bad_batch_errors_name_the_argument():
    config = small_config()
    state, batch = make_case(config)
    update = make_update_fn(config)
    with pytest.raises(ValueError, match=r"batch\.obs"):
        update(state, batch._replace(obs=batch.obs[..., :3]))
    with pytest.raises(ValueError, match=r"batch\.actions\['b'\]"):
        update(state, batch._replace(actions=dict(batch.actions, b=batch.actions["b"].float())))
    with pytest.raises(ValueError, match=r"batch\.terminated"):
        update(state, batch._replace(terminated=batch.terminated.float()))
    with pytest.raises(ValueError, match="num_minibatches=5"):
        make_update_fn(config.replace(num_minibatches=5))(state, batch)
    with pytest.raises(ValueError, match="device"):
        update(state, batch._replace(rewards=batch.rewards.to("meta")))
    with pytest.raises(ValueError, match="compile_scope"):
        make_update_fn(config, compile_scope="epoch")


@pytest.mark.slow
def test_vmapped_compiled_matches_vmapped_eager(device):
    # The minibatch scope's loop over a vmapped step (the scan of vmapped steps: above).
    config = small_config(update_epochs=1)
    states = init_train_state(jr.split(jr.key(5, device), 2), config)
    params0 = optree.tree_map(lambda x: x[0], states.params)
    batch = synthetic_batch(config, params0, jr.key(6, device), T, B)
    batches = optree.tree_map(lambda x: torch.stack([x, x]), batch, none_is_leaf=False)
    e_state, e_metrics = make_update_fn(config, num_seeds=2)(states, batches)
    compiled = make_update_fn(
        config.replace(compile=True), num_seeds=2, compile_scope="minibatch", backend="aot_eager"
    )
    c_state, c_metrics = compiled(states, batches)
    assert max_diff(c_state.params, e_state.params) < 1e-5
    assert torch.allclose(c_metrics["loss"], e_metrics["loss"], atol=1e-5)


# Gradient accumulation (docs/design.md) ---------------------------------------------------------

# Floors of 1.0 are active at every step (normalised entropy < 1); the op head's 0.0 never is.
FLOORS = (("a", 1.0), ("c", 1.0), ("op", 0.0))


def assert_metrics_equal(got, expected, atol=1e-5):
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert torch.allclose(got[name], value, atol=atol, rtol=0, equal_nan=True), name


@pytest.mark.parametrize("recurrent", [False, True])
@pytest.mark.parametrize("floor", [(), FLOORS])
def test_grad_accumulation_equals_whole_minibatch(recurrent, floor):
    # target_kl stops the MLP in its second epoch, before its third step: the early-stop check
    # must see the whole-minibatch KL for the stop to land on the same step.
    config = small_config(
        recurrent=recurrent,
        bptt_len=4,
        entropy_floor=floor,
        entropy_floor_coef=20.0,
        target_kl=None if recurrent else 5e-4,
    )
    state, batch = make_case(config)
    whole_state, whole = make_update_fn(config)(state, batch)
    if floor:
        assert float(whole["entropy_floor_penalty"]) > 1e-3
    for k in (2, 4):
        acc_state, acc = make_update_fn(config.replace(grad_accum_steps=k))(state, batch)
        assert max_diff(acc_state.params, whole_state.params) < 1e-5, k
        assert max_diff(acc_state.opt_state, whole_state.opt_state) < 1e-5, k
        assert_metrics_equal(acc, whole)
    assert float(whole["updates_applied"]) == (4.0 if recurrent else 2.0)
    assert float(whole["stop_epoch"]) == (2.0 if recurrent else 1.0)


def test_grad_accumulation_keeps_the_finiteness_gate_per_minibatch():
    config = small_config(update_epochs=1, num_minibatches=4, entropy_floor=FLOORS)
    state, batch = make_case(config)
    rewards, terminated = batch.rewards.clone(), batch.terminated.clone()
    rewards[0, 1], terminated[0, 1] = math.inf, True  # one sample, so one minibatch, affected
    bad = batch._replace(rewards=rewards, terminated=terminated)
    whole_state, whole = make_update_fn(config)(state, bad)
    acc_state, acc = make_update_fn(config.replace(grad_accum_steps=4))(state, bad)
    assert float(acc["nonfinite_skips"]) == 1.0
    assert max_diff(acc_state.params, whole_state.params) < 1e-5
    assert_metrics_equal(acc, whole)


def test_grad_accumulation_runs_each_forward_on_one_micro_batch(monkeypatch):
    import funcppo.training.update as update_module

    seen = []

    def spy(params, config, obs, hidden, episode_start):
        seen.append((obs.shape[1], torch.is_grad_enabled()))
        return policy_apply(params, config, obs, hidden, episode_start)

    monkeypatch.setattr(update_module, "policy_apply", spy)
    config = small_config(
        recurrent=True, bptt_len=4, update_epochs=1, num_minibatches=2, grad_accum_steps=4
    )
    state, batch = make_case(config)
    make_update_fn(config)(state, batch)
    # 16 sequences, 8 per minibatch, 2 per micro-batch: 4 forward-backward passes each.
    assert seen == [(2, True)] * 8
    seen.clear()
    make_update_fn(config.replace(entropy_floor=FLOORS))(state, batch)
    # With a floor, a no-grad pre-pass over the micro-batches first.
    assert seen == ([(2, False)] * 4 + [(2, True)] * 4) * 2


def test_grad_accumulation_vmapped_seeds_match_each_seed_alone(device):
    config = small_config(update_epochs=1, entropy_floor=FLOORS, target_kl=0.02)
    states = init_train_state(jr.split(jr.key(9, device), 2), config)
    batches = [
        synthetic_batch(
            config, optree.tree_map(lambda x, i=i: x[i], states.params), jr.key(i, device), T, B
        )
        for i in range(2)
    ]
    batch = optree.tree_map(lambda *xs: torch.stack(xs), *batches, none_is_leaf=False)
    accumulating = config.replace(grad_accum_steps=2)
    v_state, v_metrics = make_update_fn(accumulating, num_seeds=2)(states, batch)
    for i in range(2):
        s_state, s_metrics = make_update_fn(config)(
            optree.tree_map(lambda x, i=i: x[i], states), batches[i]
        )
        assert max_diff(optree.tree_map(lambda x, i=i: x[i], v_state), s_state) < 1e-5
        assert_metrics_equal({k: v[i] for k, v in v_metrics.items()}, s_metrics)


@pytest.mark.slow
def test_grad_accumulation_compiled_matches_eager_whole_minibatch(device):
    config = small_config(update_epochs=1, entropy_floor=FLOORS, target_kl=0.05)
    state, batch = make_case(config, device=device)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    accumulating = config.replace(grad_accum_steps=2, compile=True)
    c_state, c_metrics = make_update_fn(accumulating, backend="aot_eager")(state, batch)
    e_state, e_metrics = make_update_fn(config)(state, batch)
    assert sum(counters["graph_break"].values()) == 0
    assert max_diff(c_state.params, e_state.params) < 1e-5
    assert_metrics_equal(c_metrics, e_metrics)


def test_bad_grad_accum_steps_names_the_field():
    config = small_config(grad_accum_steps=3)  # 64 sequences, 32 per minibatch
    state, batch = make_case(config)
    with pytest.raises(ValueError, match=r"grad_accum_steps.*32 sequences.*got 3"):
        make_update_fn(config)(state, batch)
    recurrent = small_config(recurrent=True, bptt_len=4, grad_accum_steps=16)  # 8 per minibatch
    state, batch = make_case(recurrent)
    with pytest.raises(ValueError, match=r"grad_accum_steps.*8 sequences.*got 16"):
        make_update_fn(recurrent)(state, batch)
