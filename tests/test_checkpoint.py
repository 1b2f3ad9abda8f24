import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path

import optree
import pytest
import torch

from funcppo.core import random as jr
from funcppo.core.config import PPOConfig
from funcppo.core.spec import ActionSpec
from funcppo.envs.lifecycle_spec import esper_config, lifecycle_spec
from funcppo.training.checkpoint import (
    CHECKPOINT_VERSION,
    CheckpointError,
    config_from_dict,
    config_to_dict,
    load_checkpoint,
    save_checkpoint,
    upgrade_checkpoint,
)
from funcppo.training.state import TrainState, init_train_state
from funcppo.training.synthetic import synthetic_batch
from funcppo.training.update import make_update_fn

SMALL = {"torso_sizes": (8,), "lstm_size": 8, "bptt_len": 4, "compile": False}
SMALL |= {"update_epochs": 2, "num_minibatches": 2}


def _spec():
    causal = ({"a"}, {"a", "b"}, {"b"})
    return ActionSpec({"op": 3, "a": 2, "b": 4}, "op", causal, op_conditioned=("b",))


def mlp_config(**kw):
    return PPOConfig(**({"obs_dim": 4, "spec": _spec()} | SMALL | kw))


def lstm_config(**kw):
    kw = {"recurrent": True, "entropy_floor": {"slot": 0.1}, "target_kl": 0.02} | kw
    return PPOConfig(**({"obs_dim": 5, "spec": lifecycle_spec(2)} | SMALL | kw))


CONFIGS = {"mlp": mlp_config, "lstm": lstm_config}


def _perturb(state, seed=1):
    """Every float leaf moved by noise, so zero-initialised moments are not trivially equal."""
    g = torch.Generator().manual_seed(seed)
    return optree.tree_map(
        lambda x: x + torch.randn(x.shape, generator=g) if x.is_floating_point() else x + 3,
        state,
        none_is_leaf=False,
    )


def assert_states_equal(a, b):
    pa, la, sa = optree.tree_flatten_with_path(a, none_is_leaf=False)
    pb, lb, sb = optree.tree_flatten_with_path(b, none_is_leaf=False)
    assert sa == sb and pa == pb
    for path, x, y in zip(pa, la, lb, strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y), path


def _digest(x):
    """The checksum the format documents: sha256 of dtype, shape and the bytes, in order."""
    x = x.detach().contiguous()
    digest = hashlib.sha256(f"{x.dtype} {list(x.shape)}".encode())
    digest.update(x.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _reseal(raw):
    """``raw`` with checksums that match its contents, as a writer of the format makes them."""
    meta = {k: raw[k] for k in ("format", "version", "config", "architecture", "batch_shape")}
    checksums = {
        "meta": hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest(),
        "state": {name: _digest(x) for name, x in raw["state"].items()},
        "extra": {name: _digest(x) for name, x in raw["extra"].items()},
    }
    return raw | {"checksums": checksums}


def _shown(error):
    """Everything a traceback of ``error`` prints: its message and any chained exceptions."""
    return "".join(traceback.format_exception(error))


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("seeds", [None, 3])
def test_round_trip_is_bit_exact(tmp_path, kind, seeds):
    config = CONFIGS[kind]()
    keys = jr.key(7) if seeds is None else jr.split(jr.key(7), seeds)
    state = _perturb(init_train_state(keys, config))
    extra = {"obs_mean": torch.arange(4.0)}
    save_checkpoint(tmp_path / "c.pt", state, config, extra)
    loaded, loaded_config, loaded_extra = load_checkpoint(tmp_path / "c.pt", config)
    assert isinstance(loaded, TrainState)
    assert_states_equal(loaded, state)
    assert loaded_config == config
    assert loaded_extra.keys() == {"obs_mean"} and torch.equal(
        loaded_extra["obs_mean"], extra["obs_mean"]
    )
    # Without a config the stored one comes back, equal field by field.
    _, stored, _ = load_checkpoint(tmp_path / "c.pt")
    assert stored == config
    # The file is tensors and JSON only: plain torch.load in weights-only mode reads it.
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["version"] == CHECKPOINT_VERSION
    assert json.loads(raw["config"])["obs_dim"] == config.obs_dim
    assert raw["batch_shape"] == ([] if seeds is None else [seeds])


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_resume_is_bit_exact(tmp_path, kind):
    config = CONFIGS[kind]()
    update = make_update_fn(config)

    def run(state, start, stop):
        for i in range(start, stop):
            batch = synthetic_batch(config, state.params, jr.fold_in(jr.key(3), i), 8, 4)
            state, _ = update(state, batch)
        return state

    start = init_train_state(jr.key(0), config)
    straight = run(start, 0, 4)
    half = run(start, 0, 2)
    save_checkpoint(tmp_path / "c.pt", half, config)
    resumed, _, _ = load_checkpoint(tmp_path / "c.pt", config)
    resumed = run(resumed, 2, 4)
    assert_states_equal(resumed, straight)
    assert int(resumed.step) == 4
    assert not torch.equal(half.params["torso"]["w0"], straight.params["torso"]["w0"])


def test_config_dict_round_trip_through_json():
    for config in (mlp_config(), lstm_config(), esper_config(obs_dim=3, torso_sizes=(4, 4))):
        data = json.loads(json.dumps(config_to_dict(config)))
        assert config_from_dict(data) == config
    spec = config_to_dict(lstm_config())["spec"]
    assert spec["causal"][3] == ["alpha_curve", "alpha_speed", "op", "slot"]
    assert spec["op_conditioned"] == ["slot"] and spec["op_names"][0] == "WAIT"
    with pytest.raises(ValueError, match="unknown fields"):
        config_from_dict(config_to_dict(mlp_config()) | {"bogus": 1})


class _Payload:
    """Unpickling this runs ``Path(marker).touch()``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"version": CHECKPOINT_VERSION, "payload": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="not a funcppo checkpoint") as error:
        load_checkpoint(path)
    assert not marker.exists()
    assert "weights_only" not in _shown(error.value)  # never the advice to unpickle it
    # The payload is live: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"obs_dim": 8}, r"config.obs_dim: the checkpoint's architecture has 4, this config 8"),
        ({"torso_sizes": (8, 8)}, r"config.torso_sizes: .* has \[8\], this config \[8, 8\]"),
        ({"activation": "relu"}, r"config.activation: .* has 'tanh', this config 'relu'"),
        ({"shared_torso": True}, r"config.shared_torso: .* has False, this config True"),
        ({"recurrent": True}, r"config.recurrent: .* has False, this config True"),
        ({"spec": ActionSpec({"op": 3, "a": 2, "b": 4}, "op", ({"a"}, {"a", "b"}, {"b"}))},
         r"config.spec.op_conditioned: .* has \['b'\], this config \[\]"),
    ],
)  # fmt: skip
def test_another_architecture_is_refused_naming_the_field(tmp_path, change, message):
    config = mlp_config()
    save_checkpoint(tmp_path / "c.pt", init_train_state(jr.key(0), config), config)
    with pytest.raises(ValueError, match=message + r".*must match"):
        load_checkpoint(tmp_path / "c.pt", config.replace(**change))


def test_another_lstm_size_is_refused(tmp_path):
    config = lstm_config()
    save_checkpoint(tmp_path / "c.pt", init_train_state(jr.key(0), config), config)
    with pytest.raises(ValueError, match=r"config.lstm_size: .* has 8, this config 16"):
        load_checkpoint(tmp_path / "c.pt", config.replace(lstm_size=16))


@pytest.mark.parametrize("seeds", [None, 2])
def test_run_time_settings_may_differ_and_hparams_follow_the_config(tmp_path, seeds):
    """Fine-tuning with another learning rate, another number of epochs or a compiled update
    loads; the state's hyperparameters take the new config's values where it changed them and
    keep the stored ones (a sweep's per-seed values) where it did not."""
    config = mlp_config(target_kl=0.02)
    keys = jr.key(0) if seeds is None else jr.split(jr.key(0), seeds)
    lrs = {} if seeds is None else {"learning_rate": torch.tensor([1e-3, 2e-3])}
    fresh = init_train_state(keys, config, **lrs)
    state = _perturb(fresh)._replace(hparams=fresh.hparams)
    save_checkpoint(tmp_path / "c.pt", state, config)
    runtime = {"update_epochs": 3, "num_minibatches": 4, "bptt_len": 2, "compile": True}
    runtime |= {"adam_eps": 1e-8, "weight_decay": 0.1, "norm_adv": False, "lstm_size": 32}
    loaded, got, _ = load_checkpoint(tmp_path / "c.pt", config.replace(**runtime))
    assert got == config.replace(**runtime)
    assert_states_equal(loaded, state)  # no hyperparameter changed: every stored value kept
    tuned = config.replace(learning_rate=5e-4, clip_coef=0.1, target_kl=None, **runtime)
    loaded, _, _ = load_checkpoint(tmp_path / "c.pt", tuned)
    hp = loaded.hparams
    assert torch.equal(hp.learning_rate, torch.full_like(state.hparams.learning_rate, 5e-4))
    assert torch.equal(hp.clip_coef, torch.full_like(state.hparams.clip_coef, 0.1))
    assert torch.equal(hp.target_kl, torch.full_like(state.hparams.target_kl, float("inf")))
    assert torch.equal(hp.gamma, state.hparams.gamma)  # unchanged: the stored value
    assert_states_equal(loaded._replace(hparams=state.hparams), state)
    # The update takes the loaded state under the config it was loaded with.
    if seeds is None:
        batch = synthetic_batch(mlp_config(), state.params, jr.key(5), 8, 4)
        new, _ = make_update_fn(tuned.replace(compile=False))(loaded, batch)
        assert int(new.step) == int(state.step) + 1


def test_tensor_shape_mismatch_names_the_leaf(tmp_path):
    config = mlp_config()
    save_checkpoint(tmp_path / "c.pt", init_train_state(jr.key(0), config), config)
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    good = raw["state"]["params['torso']['w0']"]
    raw["state"]["params['torso']['w0']"] = torch.zeros(5, 8)
    torch.save(_reseal(raw), tmp_path / "bad.pt")
    with pytest.raises(
        CheckpointError,
        match=r"bad.pt: state\[\"params\['torso'\]\['w0'\]\"\].*\[4, 8\].*\[5, 8\]",
    ):
        load_checkpoint(tmp_path / "bad.pt")
    raw["state"]["params['torso']['w0']"] = good
    raw["state"]["step"] = raw["state"]["step"].float()
    torch.save(_reseal(raw), tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"state\['step'\]: expected torch.int64"):
        load_checkpoint(tmp_path / "bad.pt")
    raw["state"]["step"] = raw["step"]
    del raw["state"]["key"]
    torch.save(_reseal(raw), tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"state\['key'\]: missing"):
        load_checkpoint(tmp_path / "bad.pt")


def test_save_refuses_a_state_of_another_config(tmp_path):
    state = init_train_state(jr.key(0), mlp_config())
    with pytest.raises(ValueError, match=r"params\['critic'\]\['w0'\].*\[6, 8\].*\[4, 8\]"):
        save_checkpoint(tmp_path / "c.pt", state, mlp_config(obs_dim=6))
    assert list(tmp_path.iterdir()) == []


def test_versions_are_refused_with_the_way_to_upgrade(tmp_path):
    config = mlp_config()
    state = _perturb(init_train_state(jr.split(jr.key(0), 2), config))
    save_checkpoint(tmp_path / "c.pt", state, config)
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    torch.save(raw | {"version": CHECKPOINT_VERSION + 1}, tmp_path / "new.pt")
    with pytest.raises(
        CheckpointError, match=rf"version {CHECKPOINT_VERSION + 1}.*upgrade funcppo"
    ):
        load_checkpoint(tmp_path / "new.pt")
    old = tmp_path / "old.pt"
    torch.save({"params": state.params, "step": state.step, "config": "TrainConfig(...)"}, old)
    with pytest.raises(ValueError, match=r"version 0.*upgrade_checkpoint"):
        load_checkpoint(old)
    with pytest.raises(ValueError, match="params\\['torso'\\]\\['w0'\\]"):
        upgrade_checkpoint(old, mlp_config(obs_dim=6))
    upgrade_checkpoint(old, config)
    upgraded, _, _ = load_checkpoint(old, config)
    assert_states_equal(upgraded.params, state.params)
    assert torch.equal(upgraded.step, state.step)
    fresh = init_train_state(jr.split(jr.key(0), 2), config)
    assert_states_equal(upgraded.opt_state, fresh.opt_state)
    with pytest.raises(ValueError, match=rf"old.pt: already version {CHECKPOINT_VERSION}"):
        upgrade_checkpoint(old, config)


_CHILD = """
import os, sys, time
from pathlib import Path
from funcppo.core import random as jr
from funcppo.training.checkpoint import save_checkpoint
from funcppo.core.config import PPOConfig
from funcppo.core.spec import ActionSpec
from funcppo.training.state import init_train_state

path, flag = Path(sys.argv[1]), Path(sys.argv[2])
causal = ({"a"}, {"a", "b"}, {"b"})
spec = ActionSpec({"op": 3, "a": 2, "b": 4}, "op", causal, op_conditioned=("b",))
config = PPOConfig(obs_dim=4, spec=spec, torso_sizes=(8,), compile=False)

def stuck_replace(src, dst):
    flag.touch()
    time.sleep(120)

os.replace = stuck_replace
save_checkpoint(path, init_train_state(jr.key(99), config), config)
"""


def test_a_save_killed_midway_leaves_the_previous_file(tmp_path):
    config = mlp_config()
    old = _perturb(init_train_state(jr.key(0), config))
    path, flag = tmp_path / "c.pt", tmp_path / "flag"
    save_checkpoint(path, old, config)
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_CHILD), str(path), str(flag)],
        env=os.environ.copy(),
    )
    deadline = time.monotonic() + 60
    while not flag.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert flag.exists(), "the child never reached the rename"
    child.send_signal(signal.SIGKILL)
    child.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".c.pt.")
    loaded, _, _ = load_checkpoint(path, config)
    assert_states_equal(loaded, old)
    # The killed writer's full-size temporary goes with the next save of the same file.
    save_checkpoint(path, old, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "flag"]


def _saved(tmp_path, name="c.pt", seeds=None):
    config = mlp_config()
    keys = jr.key(0) if seeds is None else jr.split(jr.key(0), seeds)
    state = _perturb(init_train_state(keys, config))
    extra = {"env_mean": torch.linspace(-1, 1, 16, dtype=torch.float64)}
    save_checkpoint(tmp_path / name, state, config, extra)
    return tmp_path / name, state, config


@pytest.mark.parametrize(
    ("entry", "where"),
    [("params['torso']['w0']", "state"), ("opt_state[1].mu['critic']['w0']", "state"),
     ("env_mean", "extra")],
)  # fmt: skip
def test_flipped_bytes_in_a_tensor_are_refused_naming_the_entry(tmp_path, entry, where):
    path, _, config = _saved(tmp_path)
    raw = torch.load(path, weights_only=True)
    data = path.read_bytes()
    at = data.find(raw[where][entry].numpy().tobytes())
    assert at > 0 and data.count(raw[where][entry].numpy().tobytes()) == 1
    flipped = bytearray(data)
    flipped[at + 8 : at + 24] = bytes(b ^ 0xFF for b in flipped[at + 8 : at + 24])
    path.write_bytes(bytes(flipped))
    torch.load(path, weights_only=True)  # torch alone reads the damaged file without a word
    with pytest.raises(CheckpointError, match="checksum") as error:
        load_checkpoint(path, config)
    assert str(path) in str(error.value) and f"{where}[{entry!r}]" in str(error.value)


def test_changed_metadata_or_a_removed_entry_is_refused(tmp_path):
    path, _, _ = _saved(tmp_path)
    raw = torch.load(path, weights_only=True)
    stored = json.loads(raw["config"])
    torch.save(raw | {"config": json.dumps(stored | {"gamma": 0.5})}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match=r"meta.pt: .*metadata.*checksum"):
        load_checkpoint(tmp_path / "meta.pt")
    raw["extra"].pop("env_mean")
    torch.save(raw, tmp_path / "gone.pt")
    with pytest.raises(CheckpointError, match=r"gone.pt: extra\['env_mean'\]: missing"):
        load_checkpoint(tmp_path / "gone.pt")
    raw = torch.load(path, weights_only=True)
    torch.save(raw | {"step": raw["step"] + 1}, tmp_path / "step.pt")
    with pytest.raises(CheckpointError, match=r"step.pt: step: .*state\['step'\]"):
        load_checkpoint(tmp_path / "step.pt")
    torch.save(_reseal(raw | {"batch_shape": ["2"]}), tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"shape.pt: .*batch_shape: expected positive"):
        load_checkpoint(tmp_path / "shape.pt")
    raw.pop("checksums")
    torch.save(raw, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match=r"bare.pt: checksums: missing"):
        load_checkpoint(tmp_path / "bare.pt")


@pytest.mark.parametrize(
    "entry", ["params['heads']['op']['w']", "opt_state[1].nu['torso']['b0']", "hparams.gamma"]
)
def test_non_finite_values_are_refused_naming_the_entry(tmp_path, entry):
    path, state, config = _saved(tmp_path)
    raw = torch.load(path, weights_only=True)
    raw["state"][entry] = raw["state"][entry].clone()
    raw["state"][entry].view(-1)[0] = float("nan")
    torch.save(_reseal(raw), tmp_path / "nan.pt")  # intact, so only the values are at fault
    with pytest.raises(CheckpointError, match=r"nan.pt: state\[.*non-finite") as error:
        load_checkpoint(tmp_path / "nan.pt", config)
    assert f"state[{entry!r}]: 1 non-finite" in str(error.value)
    # save refuses such a state too: the file could never be loaded.
    names = dict(zip(_names(state), optree.tree_leaves(state, none_is_leaf=False), strict=True))
    bad = optree.tree_unflatten(
        optree.tree_structure(state, none_is_leaf=False),
        [raw["state"][n] if n == entry else x for n, x in names.items()],
    )
    with pytest.raises(ValueError, match=r"state\[.*1 non-finite"):
        save_checkpoint(tmp_path / "never.pt", bad, config)
    assert not (tmp_path / "never.pt").exists()
    # target_kl None is stored as +inf: infinite, yet valid.
    no_kl = mlp_config(target_kl=None)
    save_checkpoint(tmp_path / "inf.pt", init_train_state(jr.key(0), no_kl), no_kl)
    assert float(load_checkpoint(tmp_path / "inf.pt")[0].hparams.target_kl) == float("inf")


def _names(state):
    accessors, _, _ = optree.tree_flatten_with_accessor(state, none_is_leaf=False)
    return [a.codify("").removeprefix(".") for a in accessors]


def test_version_1_files_load_unverified_and_upgrade(tmp_path):
    """Version 1 wrote the same dict without checksums: it loads as it is (nothing to verify
    it against), and ``upgrade_checkpoint`` rewrites it with them, no config needed."""
    path, state, config = _saved(tmp_path, seeds=2)
    raw = torch.load(path, weights_only=True)
    v1 = {k: v for k, v in raw.items() if k != "checksums"} | {"version": 1}
    v1["architecture"] = json.dumps({"obs_dim": 4, "heads": [["op", 3]]})  # version 1's fields
    torch.save(v1, tmp_path / "v1.pt")
    loaded, got, extra = load_checkpoint(tmp_path / "v1.pt", config)
    assert_states_equal(loaded, state)
    assert got == config and torch.equal(extra["env_mean"], raw["extra"]["env_mean"])
    upgrade_checkpoint(tmp_path / "v1.pt")
    upgraded = torch.load(tmp_path / "v1.pt", weights_only=True)
    assert upgraded["version"] == CHECKPOINT_VERSION and "checksums" in upgraded
    assert_states_equal(load_checkpoint(tmp_path / "v1.pt")[0], state)
    with pytest.raises(ValueError, match=r"config: expected a PPOConfig to upgrade a version 0"):
        old = tmp_path / "old.pt"
        torch.save({"params": state.params, "step": state.step}, old)
        upgrade_checkpoint(old)
    with pytest.raises(ValueError, match=r"v1.pt: already version"):
        upgrade_checkpoint(tmp_path / "v1.pt")


def _truncations(data):
    return {f"cut{n}": data[:n] for n in (1, 100, len(data) // 2, len(data) - 30, len(data) - 1)}


def test_unreadable_files_get_one_clear_error(tmp_path):
    path, _, _ = _saved(tmp_path)
    data = path.read_bytes()
    files = {"empty": b"", "random": os.urandom(4096), "text": b"hello\n", "zeros": bytes(512)}
    files |= _truncations(data)
    for name, content in files.items():
        (tmp_path / f"{name}.pt").write_bytes(content)
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "dict.pt")
    for name in [*files, "list", "dict"]:
        bad = tmp_path / f"{name}.pt"
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(bad)
        message = str(error.value)
        assert message.startswith(f"{bad}: "), (name, message)
        assert "not a funcppo checkpoint or is damaged" in message, (name, message)
        assert "weights_only" not in _shown(error.value), name
    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match=r"missing\.pt") as error:
        load_checkpoint(missing)
    assert error.value.filename == str(missing)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        upgrade_checkpoint(missing)


def test_saved_file_follows_the_umask(tmp_path):
    config = mlp_config()
    state = init_train_state(jr.key(0), config)
    before = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "c.pt", state, config)
        torch.save({}, tmp_path / "torch.pt")
    finally:
        os.umask(before)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "torch.pt").stat().st_mode & 0o777 == 0o640


class _Killed(BaseException):
    pass


def test_an_interrupted_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path, state, config = _saved(tmp_path)
    fsync = os.fsync

    def killed_at_fsync(fd):
        if not os.path.isdir(f"/proc/self/fd/{fd}"):
            raise _Killed  # the temporary is written in full, not yet renamed
        fsync(fd)

    monkeypatch.setattr(os, "fsync", killed_at_fsync)
    with pytest.raises(_Killed):
        save_checkpoint(path, _perturb(state, seed=2), config)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    assert_states_equal(load_checkpoint(path, config)[0], state)


def test_leaves_of_any_layout_round_trip(tmp_path):
    """A one-seed state whose hyperparameters were broadcast from scalars (stride 0) and a
    transposed weight: the checksums read each tensor's values, whatever its memory layout."""
    config = mlp_config()
    state = _perturb(init_train_state(jr.split(jr.key(0), 1), config))
    hparams = state.hparams._replace(gamma=torch.tensor(0.9).expand(1))
    w0 = state.params["torso"]["w0"]
    params = state.params | {"torso": state.params["torso"] | {"w0": w0.mT.contiguous().mT}}
    state = state._replace(params=params, hparams=hparams)
    save_checkpoint(tmp_path / "c.pt", state, config)
    assert_states_equal(load_checkpoint(tmp_path / "c.pt", config)[0], state)
