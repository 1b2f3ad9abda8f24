"""make_train and the CLI: reproducible runs, seeds vmapped against seeds alone, compiled
against eager, truncation bootstrap values, Ctrl-C, learning on a small budget."""

import json
import math

import optree
import pytest
import torch
from torch.func import vmap

from funcppo.accel.compiling import CompileSettings
from funcppo.cli import main as cli
from funcppo.cli.main import main, parse_sweep
from funcppo.cli.report import smooth
from funcppo.core import random as jr
from funcppo.core.config import PPOConfig
from funcppo.core.networks import policy_apply
from funcppo.envs import make_env
from funcppo.training.checkpoint import load_checkpoint
from funcppo.training.train import (
    TrainConfig,
    contiguous_outputs,
    init_runner,
    make_env_step,
    make_rollout,
    make_train,
    with_threads,
)


def cartpole_config(**changes) -> TrainConfig:
    env = make_env("cartpole", 2)
    ppo = PPOConfig(obs_dim=env.obs_dim, spec=env.spec, compile=False, torso_sizes=(16, 16))
    base = dict(env="cartpole", ppo=ppo, num_envs=2, num_steps=16, total_steps=2 * 16 * 3)
    base.update(changes)
    return TrainConfig(**base)


def max_diff(a, b):
    return max(
        float((x.float() - y.float()).abs().max())
        for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True)
    )


def test_same_key_same_run_and_different_keys_differ():
    train = make_train(cartpole_config())
    s1, h1 = train(jr.key(0))
    s2, h2 = train(jr.key(0))
    s3, _ = train(jr.key(1))
    assert max_diff(s1.params, s2.params) == 0.0
    assert torch.equal(h1["loss"], h2["loss"])
    assert max_diff(s1.params, s3.params) > 0.0
    assert h1["loss"].shape == (3,)


@pytest.mark.parametrize("normalize_obs", [False, True])
def test_seed_alone_matches_seed_in_vmapped_run(normalize_obs, device):
    config = cartpole_config(normalize_obs=normalize_obs)
    keys = jr.split(jr.key(5, device), 3)
    v_state, v_hist = make_train(config, num_seeds=3)(keys)
    alone = make_train(config)
    for i in range(3):
        s_state, s_hist = alone(keys[i])
        assert max_diff(optree.tree_map(lambda x, i=i: x[i], v_state.params), s_state.params) < 1e-5
        assert torch.allclose(v_hist["loss"][:, i], s_hist["loss"], atol=1e-5)
        assert torch.equal(v_hist["episodes"][:, i], s_hist["episodes"])
        stats = optree.tree_map(lambda x, i=i: x[i], v_state.obs_stats)
        assert max_diff(stats, s_state.obs_stats) < 1e-9 if normalize_obs else stats == ()


def test_sweep_seed_matches_a_run_alone_with_its_setting(device):
    # One program, two learning rates and two entropy coefficients: seed i of the sweep is the
    # run of key i with a config that holds seed i's values.
    config = cartpole_config()
    keys = jr.split(jr.key(8, device), 2)
    lrs, ents = torch.tensor([1e-3, 4e-3]), torch.tensor([0.0, 0.05])
    v_state, v_hist = make_train(config, num_seeds=2)(
        keys, hparams={"learning_rate": lrs, "ent_coef": ents}
    )
    for i in range(2):
        ppo = config.ppo.replace(learning_rate=float(lrs[i]), ent_coef=float(ents[i]))
        s_state, s_hist = make_train(config.replace(ppo=ppo))(keys[i])
        assert max_diff(optree.tree_map(lambda x, i=i: x[i], v_state.params), s_state.params) < 1e-5
        assert torch.allclose(v_hist["loss"][:, i], s_hist["loss"], atol=1e-5)
        # The state keeps each seed's own (unannealed) setting.
        assert float(v_state.hparams.learning_rate[i]) == pytest.approx(float(lrs[i]))
    # The two settings gave two different runs.
    assert not torch.allclose(v_hist["loss"][:, 0], v_hist["loss"][:, 1])


def test_sweep_errors_name_the_argument():
    train = make_train(cartpole_config(), num_seeds=2)
    with pytest.raises(ValueError, match=r"hparams: expected fields of Hyperparams.*'lr'"):
        train(jr.split(jr.key(0), 2), hparams={"lr": 1e-3})
    with pytest.raises(
        ValueError, match=r"hparams: learning_rate: expected .*\(2,\) \(one per seed\)"
    ):
        train(jr.split(jr.key(0), 2), hparams={"learning_rate": torch.ones(3)})
    with pytest.raises(ValueError, match=r"hparams: gamma: expected a number in .*got nan"):
        train(jr.split(jr.key(0), 2), hparams={"gamma": float("nan")})
    with pytest.raises(ValueError, match=r"hparams: gamma\[1\]: expected a number in .*1\.5"):
        train(jr.split(jr.key(0), 2), hparams={"gamma": torch.tensor([0.99, 1.5])})
    assert parse_sweep(None, 4) is None
    assert parse_sweep("ent_coef=0,0.5", 5) == ("ent_coef", [0.0, 0.5, 0.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="--sweep: expected NAME=V1,V2"):
        parse_sweep("lr=1", 2)
    with pytest.raises(ValueError, match="--sweep: expected comma-separated numbers"):
        parse_sweep("gamma=0.9,x", 2)
    with pytest.raises(ValueError, match="--sweep: expected between 1 and --seeds=2 values, got 3"):
        parse_sweep("gamma=0.9,0.99,0.999", 2)


@pytest.mark.slow
def test_compiled_matches_eager(device):
    # With the normaliser, whose statistics the compiled rollout carries per seed. The update's
    # default scope, the scan (the minibatch scope's tracing is tested in test_update.py).
    config = cartpole_config(total_steps=2 * 16 * 2, normalize_obs=True)
    keys = jr.split(jr.key(3, device), 2)
    e_state, e_hist = make_train(config, num_seeds=2)(keys)
    compiled = make_train(
        config.replace(ppo=config.ppo.replace(compile=True)),
        num_seeds=2,
        backend="aot_eager",
    )
    c_state, c_hist = compiled(keys)
    assert max_diff(c_state.params, e_state.params) < 1e-5
    with pytest.raises(ValueError, match="compile_scope: expected one of"):
        make_train(config, compile_scope="scans")  # the scope reaches make_update_fn
    assert torch.equal(c_hist["episodes"], e_hist["episodes"])
    assert max_diff(c_state.obs_stats, e_state.obs_stats) < 1e-9


@pytest.mark.parametrize(
    ("env_name", "recurrent", "seeds", "normalize_obs", "backend"),
    [
        ("lifecycle", False, None, False, "aot_eager"),
        ("cartpole-pomdp", True, 2, True, "aot_eager"),
        # Inductor's C++ loop: CartPole's observation is its float32 state, a carry that
        # crashes the loop when each field is carried on its own (hence packed by dtype).
        ("cartpole", False, 2, False, "inductor"),
    ],
)
def test_scanned_rollout_matches_the_python_loop(
    env_name, recurrent, seeds, normalize_obs, backend, device
):
    # The compiled rollout is one scan over time; the eager one a Python loop over the step.
    env = make_env(env_name, 3)
    ppo = PPOConfig(
        obs_dim=env.obs_dim, spec=env.spec, torso_sizes=(8,), recurrent=recurrent, lstm_size=8
    )
    config = TrainConfig(
        env=env_name, ppo=ppo, num_envs=3, num_steps=12, total_steps=36, normalize_obs=normalize_obs
    )
    step = make_env_step(config, env)
    init = lambda key: init_runner(config, env, key)  # noqa: E731
    time_axis = 0
    if seeds is not None:
        step, init = contiguous_outputs(vmap(step)), contiguous_outputs(vmap(init))
        time_axis = 1
    keys = jr.key(5, device) if seeds is None else jr.split(jr.key(5, device), seeds)
    rs = init(keys)
    loop = make_rollout(step, config.num_steps, time_axis, False, "inductor")
    scanned = make_rollout(step, config.num_steps, time_axis, True, backend)
    for _ in range(2):  # the second call starts from a state with episodes under way
        (rs_loop, batch_loop), (rs_scan, batch_scan) = loop(rs), scanned(rs)
        assert optree.tree_structure(batch_loop) == optree.tree_structure(batch_scan)
        for want, got in zip(
            optree.tree_leaves((rs_loop, batch_loop)),
            optree.tree_leaves((rs_scan, batch_scan)),
            strict=True,
        ):
            assert got.shape == want.shape and got.dtype == want.dtype
            assert torch.allclose(got.float(), want.float(), atol=1e-6)
        assert batch_scan.rewards.shape[time_axis] == config.num_steps
        rs = rs_loop


def _constants_in_subgraphs(gm: torch.fx.GraphModule) -> list[str]:
    """Tensor constants read inside the graph's subgraphs (a scan body, after AOT)."""
    found = []
    for name, sub in gm.named_children():
        if isinstance(sub, torch.fx.GraphModule):
            found += [
                f"{name}.{n.target}"
                for n in sub.graph.nodes
                if n.op == "get_attr" and isinstance(getattr(sub, n.target), torch.Tensor)
            ]
            found += _constants_in_subgraphs(sub)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("env_name", ["cartpole", "cartpole-pomdp", "lifecycle"])
def test_scanned_rollout_body_holds_no_tensor_constant(env_name):
    # Inductor's loop lowering leaves a tensor constant inside a scan body unbound (torch
    # 2.13: "non-tensor input" at run time). AOT-trace the rollout, generate no code, look.
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm

    env = make_env(env_name, 2)
    ppo = PPOConfig(obs_dim=env.obs_dim, spec=env.spec, torso_sizes=(8,), lstm_size=8)
    config = TrainConfig(env=env_name, ppo=ppo, num_envs=2, num_steps=4, total_steps=8)
    step = make_env_step(config, env)
    rollout = make_rollout(step, 4, 0, True, aot_autograd(fw_compiler=keep))
    rollout(init_runner(config, env, jr.key(0)))
    assert graphs and "scan" in str(graphs[0].graph)
    assert [c for gm in graphs for c in _constants_in_subgraphs(gm)] == []


@pytest.mark.slow
def test_compiled_rollout_compiles_once():
    # Lifecycle's reset hands out one zero tensor for several state fields; dynamo guards on
    # aliasing, so without care the rollout compiles again once its outputs are distinct.
    env = make_env("lifecycle", 2)
    ppo = PPOConfig(obs_dim=env.obs_dim, spec=env.spec, torso_sizes=(8,))
    config = TrainConfig(env="lifecycle", ppo=ppo, num_envs=2, num_steps=4, total_steps=8)
    step = contiguous_outputs(vmap(make_env_step(config, env)))
    rs = contiguous_outputs(vmap(lambda key: init_runner(config, env, key)))(jr.split(jr.key(0), 2))
    rollout = make_rollout(step, 4, 1, True, "eager")  # dynamo's guards, no code generated
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            rs, batch = rollout(rs)
    assert batch.rewards.shape == (2, 4, 2)


def test_scan_is_marked_cacheable_only_inside_the_rollout_call():
    # Without the mark inductor's caches bypass any graph with a scan (torch 2.13), and every
    # process compiles the rollout afresh.
    from funcppo.accel.compiling import scan_cacheable

    ops = (torch.ops.higher_order.scan, torch.ops.higher_order.while_loop)
    assert not any(op.cacheable() for op in ops)
    with scan_cacheable():
        assert all(op.cacheable() for op in ops)
    assert not any(op.cacheable() for op in ops)


def test_next_value_is_value_of_reached_observation():
    config = cartpole_config()
    env = config.make_env()
    rs = init_runner(config, env, jr.key(0))
    step = make_env_step(config, env)
    for _ in range(40):
        new_rs, tr = step(rs.train.params, rs)
        # The reached observation is the next obs where not done, the final obs where done.
        res = env.step(rs.env_state, tr.actions, jr.split(rs.key, 2)[1])
        expected = policy_apply(rs.train.params, config.ppo, res.final_obs, None, None).value
        assert torch.allclose(tr.next_values, expected, atol=1e-6)
        assert torch.equal(new_rs.episode_start, res.terminated | res.truncated)
        rs = new_rs


def test_ctrl_c_keeps_finished_updates():
    config = cartpole_config(total_steps=2 * 16 * 5)

    def callback(u, metrics):
        if u == 1:
            raise KeyboardInterrupt

    state, hist = make_train(config)(jr.key(0), callback)
    assert hist["loss"].shape == (2,)
    assert int(state.step) == 2


def test_a_callback_returning_false_stops_the_run_and_none_or_true_go_on():
    config = cartpole_config(total_steps=2 * 16 * 4)
    seen = []

    def callback(u, metrics):
        seen.append(u)
        return {0: None, 1: True}.get(u, False)

    state, hist = make_train(config)(jr.key(0), callback)
    assert seen == [0, 1, 2] and hist["loss"].shape == (3,) and int(state.step) == 3


@pytest.mark.slow
def test_cartpole_learns_on_a_small_budget():
    env = make_env("cartpole", 4)
    ppo = PPOConfig(obs_dim=env.obs_dim, spec=env.spec, compile=False, learning_rate=2.5e-3)
    config = TrainConfig("cartpole", ppo, num_envs=4, num_steps=128, total_steps=4 * 128 * 30)
    _, hist = make_train(config, num_seeds=2)(jr.split(jr.key(0), 2))
    first = torch.nanmean(hist["episode_return"][:3])
    last = torch.nanmean(hist["episode_return"][-3:])
    assert last > 2 * first, (float(first), float(last))


def test_cli_writes_metrics_curve_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--env",
            "cartpole",
            "--seeds",
            "2",
            "--total-steps",
            "512",
            "--num-envs",
            "2",
            "--num-steps",
            "64",
            "--no-compile",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    record = json.loads(lines[-1])
    assert len(record["loss"]) == 2 and record["env_steps"] == 512
    assert all(math.isfinite(v) for v in record["loss"])
    state, config, _ = load_checkpoint(out / "checkpoint.pt")
    assert state.step.tolist() == [4, 4]
    assert config.obs_dim == 4 and config.spec.names == ("action",)
    printed = capsys.readouterr().out
    assert "| all |" in printed and "evaluation, one whole episode per env" in printed
    evaluation = json.loads((out / "evaluation.json").read_text())["episode_return"]
    # CartPole pays 1 per step: a seed's mean over its 2 whole episodes is in [1, 500].
    assert len(evaluation) == 2 and all(1.0 <= r <= 500.0 for r in evaluation)


def test_host_reports_name_the_worst_ratio_head_where_the_history_keeps_its_index(tmp_path):
    # The update reports an index; make_train's callback and the CLI's metrics.jsonl give the
    # head's name, as the agent and the gym path's metrics.jsonl do (test_gym_adapter.py).
    names = make_env("lifecycle", 2).spec.names
    out = tmp_path / "run"
    args = ["train", "--env", "lifecycle", "--seeds", "2", "--num-envs", "2", "--num-steps", "32"]
    assert main([*args, "--total-steps", "128", "--no-compile", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    worst = [name for record in records for name in record["ratio_worst_head"]]
    assert len(worst) == 4 and all(name in names for name in worst)
    seen = []
    _, history = make_train(cartpole_config())(
        jr.key(0), lambda u, metrics: seen.append(metrics["ratio_worst_head"])
    )
    assert seen == ["action"] * 3
    assert history["ratio_worst_head"].tolist() == [0.0] * 3


def test_cli_sweep_gives_each_seed_its_value_and_a_row_per_value(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--env", "cartpole", "--seeds", "4", "--total-steps", "128"]
    args += ["--num-envs", "2", "--num-steps", "64", "--no-compile", "--out", str(out)]
    assert main([*args, "--sweep", "clip_coef=0.1,0.3"]) == 0
    state, _, _ = load_checkpoint(out / "checkpoint.pt")
    assert torch.allclose(state.hparams.clip_coef, torch.tensor([0.1, 0.3, 0.1, 0.3]))
    printed = capsys.readouterr().out
    assert "| seed | clip_coef | mean return, last 10 updates |" in printed
    assert "| clip_coef=0.1 |" in printed and "| clip_coef=0.3 |" in printed
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:  # one curve per swept value
        assert (out / "learning_curve.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        main([*args, "--sweep", "clip=0.1"])
    assert "--sweep: expected NAME=V1,V2" in capsys.readouterr().err


def test_target_kl_sweep_works_on_a_config_without_a_target():
    # The config has no KL target (+inf per seed); a sweep gives the second seed a tiny one,
    # which stops it in its first epoch, while the first runs every step.
    train = make_train(cartpole_config(), num_seeds=2)
    targets = torch.tensor([math.inf, 1e-9])
    _, history = train(jr.split(jr.key(0), 2), hparams={"target_kl": targets})
    assert history["early_stopped"].tolist() == [[0.0, 1.0]] * 3


def test_cli_sweep_over_target_kl_turns_early_stopping_on_per_seed(tmp_path):
    # CartPole's config has no KL target; a sweep over it must still stop the seeds it names.
    out = tmp_path / "run"
    args = ["train", "--env", "cartpole", "--seeds", "2", "--total-steps", "256"]
    args += ["--num-envs", "2", "--num-steps", "64", "--no-compile", "--out", str(out)]
    assert main([*args, "--sweep", "target_kl=inf,1e-9"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["early_stopped"] for r in records] == [[0.0, 1.0]] * 2


@pytest.mark.slow
def test_cli_takes_the_envs_preset_unless_told(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--env", "cartpole-pomdp", "--seeds", "1", "--total-steps", "256"]
    assert main([*args, "--no-compile", "--out", str(out)]) == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    # The preset: 8 envs x 32 steps, an LSTM over whole rollouts, twenty epochs, a normaliser.
    state, config, _ = load_checkpoint(out / "checkpoint.pt")
    assert record["env_steps"] == 256 and config.recurrent and config.update_epochs == 20
    assert config.bptt_len == 32 and config.num_minibatches == 1
    assert float(state.obs_stats.count[0]) == pytest.approx(256, abs=1e-3)
    changed = ["--num-envs", "2", "--num-steps", "64", "--no-compile", "--out", str(out)]
    changed += ["--overwrite"]
    assert main([*args, *changed, "--no-normalize-obs"]) == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["env_steps"] == 128 * 2
    assert record["clip_coef"] == [pytest.approx(0.1)]  # the preset anneals it: update 2 of 2
    assert load_checkpoint(out / "checkpoint.pt")[0].obs_stats == ()


@pytest.mark.parametrize("anneal_clip", [False, True])
def test_schedules_anneal_to_one_over_n_and_are_reported(anneal_clip):
    config = cartpole_config(total_steps=2 * 16 * 4, anneal_clip=anneal_clip)
    lrs, clips = torch.tensor([1e-3, 2e-3]), torch.tensor([0.1, 0.3])
    _, history = make_train(config, num_seeds=2)(
        jr.split(jr.key(0), 2), hparams={"learning_rate": lrs, "clip_coef": clips}
    )
    left = torch.tensor([1.0, 0.75, 0.5, 0.25])[:, None]  # 1 - u / 4, per update
    assert torch.allclose(history["learning_rate"], lrs * left)
    want = clips * left if anneal_clip else clips.expand(4, 2)
    assert torch.allclose(history["clip_coef"], want)


def test_cli_anneal_clip_flag(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--env", "cartpole", "--seeds", "1", "--total-steps", "256", "--no-compile"]
    args += ["--num-envs", "2", "--num-steps", "64", "--out", str(out)]
    assert main([*args, "--anneal-clip"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["clip_coef"][0] for line in lines] == pytest.approx([0.2, 0.1])


def test_bad_train_config_names_the_field():
    with pytest.raises(ValueError, match="num_envs"):
        cartpole_config(num_envs=0)
    with pytest.raises(ValueError, match="total_steps"):
        cartpole_config(total_steps=10)
    with pytest.raises(ValueError, match="anneal_clip: expected a bool, got 'yes'"):
        cartpole_config(anneal_clip="yes")
    with pytest.raises(ValueError, match="normalize_obs: expected a bool, got 1"):
        cartpole_config(normalize_obs=1)
    with pytest.raises(ValueError, match="clip_obs: expected a number > 0, got 0"):
        cartpole_config(clip_obs=0)
    with pytest.raises(ValueError, match="obs_dim"):
        make_train(cartpole_config(ppo=cartpole_config().ppo.replace(obs_dim=3)))


def test_with_threads_sets_the_count_for_the_call_and_restores_it():
    seen = []

    def count(fail=False):
        seen.append(torch.get_num_threads())
        if fail:
            raise RuntimeError("boom")
        return "done"

    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    assert with_threads(count, other)() == "done"
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="boom"):
        with_threads(count, other)(True)
    assert torch.get_num_threads() == before
    assert with_threads(count, before)() == "done"
    assert seen == [other, other, before]


def test_rollout_threads_reach_every_env_step_and_leave_the_run_unchanged():
    config = cartpole_config()
    env = config.make_env()
    env_step = make_env_step(config, env)
    seen = []

    def spy(params, rs):
        seen.append(torch.get_num_threads())
        return env_step(params, rs)

    rs = contiguous_outputs(lambda key: init_runner(config, env, key))(jr.key(0))
    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    threaded = CompileSettings.for_device("cpu", rollout_threads=other)
    _, batch = make_rollout(spy, 16, 0, False, compiler=threaded)(rs)
    _, plain = make_rollout(spy, 16, 0, False)(rs)
    # A GPU's settings leave the caller's count, asked for another or not.
    gpu = CompileSettings.for_device("cuda", rollout_threads=other)
    make_rollout(spy, 4, 0, False, compiler=gpu)(rs)
    assert seen == [other] * 16 + [before] * 20
    assert max_diff(batch, plain) == 0.0
    s1, h1 = make_train(config, compiler=threaded)(jr.key(0))
    s2, h2 = make_train(config)(jr.key(0))
    assert max_diff(s1.params, s2.params) == 0.0 and torch.equal(h1["loss"], h2["loss"])


@pytest.mark.slow
def test_compile_settings_reach_the_rollout_and_the_update():
    # make_train's settings compile both halves: a counting aot_eager backend sees the
    # rollout's scan, then the update's pieces, and each graph runs with the thread count
    # the settings give the rollout, the caller's elsewhere. The same run as eager.
    from torch._dynamo.backends.common import aot_autograd

    graphs, threads = [], []

    def count(gm, example_inputs):
        graphs.append(str(gm.graph))
        index = len(graphs) - 1

        def run(*args):
            threads.append((index, torch.get_num_threads()))
            return gm(*args)

        return run

    config = cartpole_config(total_steps=2 * 16 * 2)
    e_state, e_hist = make_train(config)(jr.key(4))
    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    counted = CompileSettings(backend=aot_autograd(fw_compiler=count), rollout_threads=other)
    compiled = make_train(config.replace(ppo=config.ppo.replace(compile=True)), compiler=counted)
    c_state, c_hist = compiled(jr.key(4))
    assert "scan" in graphs[0] and len(graphs) >= 2
    assert {n for i, n in threads if i == 0} == {other}  # the rollout's graph
    assert {n for i, n in threads if i > 0} == {before}  # the update's
    assert torch.get_num_threads() == before
    assert max_diff(c_state.params, e_state.params) < 1e-5
    assert torch.equal(c_hist["episodes"], e_hist["episodes"])


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--env", "cartpole"], 1),
        (["--env", "cartpole", "--rollout-threads", "2"], 2),
        (["--env", "lifecycle"], None),
    ],
)
def test_cli_rollout_threads_default_per_env(monkeypatch, argv, expected):
    seen = []
    monkeypatch.setattr(cli, "run_train", lambda args: seen.append(args.rollout_threads) or 0)
    assert main(["train", *argv]) == 0
    assert seen == [expected]


@pytest.mark.parametrize("flag", ["--threads", "--rollout-threads"])
def test_cli_rejects_a_thread_count_below_one(tmp_path, capsys, flag):
    with pytest.raises(SystemExit):
        main(["train", "--env", "cartpole", "--out", str(tmp_path), flag, "0"])
    assert f"{flag}: expected an int >= 1, got 0" in capsys.readouterr().err


def test_curve_smoothing_is_a_trailing_mean_that_skips_nan():
    returns = torch.tensor([[1.0, 4.0], [float("nan"), 8.0], [5.0, float("nan")], [9.0, 2.0]])
    got = smooth(returns, points=2)  # window of 4 // 2 = 2 updates
    # By hand: seed 0: [1], [1, nan], [nan, 5], [5, 9]; seed 1: [4], [4, 8], [8, nan], [nan, 2].
    expected = torch.tensor([[1.0, 4.0], [1.0, 6.0], [5.0, 8.0], [7.0, 2.0]], dtype=torch.float64)
    assert torch.allclose(got, expected.to(got.dtype))
    ragged = torch.tensor([[float("nan")], [float("nan")], [3.0]])
    assert torch.isnan(smooth(ragged, points=3)[:2]).all() and smooth(ragged, points=3)[2] == 3.0
