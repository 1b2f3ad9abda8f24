import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optree
import pytest
import torch

from funcppo import random as jr
from funcppo.checkpoint import (
    CHECKPOINT_VERSION,
    config_from_dict,
    config_to_dict,
    load_checkpoint,
    save_checkpoint,
    upgrade_checkpoint,
)
from funcppo.config import PPOConfig, esper_config
from funcppo.spec import ActionSpec, lifecycle_spec
from funcppo.state import TrainState, init_train_state
from funcppo.synthetic import synthetic_batch
from funcppo.update import make_update_fn

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
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_config_mismatch_names_the_field(tmp_path):
    config = mlp_config()
    save_checkpoint(tmp_path / "c.pt", init_train_state(jr.key(0), config), config)
    with pytest.raises(ValueError, match=r"config.obs_dim: checkpoint has 4, expected 8"):
        load_checkpoint(tmp_path / "c.pt", config.replace(obs_dim=8))
    with pytest.raises(ValueError, match=r"config.torso_sizes: checkpoint has \[8\], expected"):
        load_checkpoint(tmp_path / "c.pt", config.replace(torso_sizes=(8, 8)))
    with pytest.raises(ValueError, match=r"config.learning_rate"):
        load_checkpoint(tmp_path / "c.pt", config.replace(learning_rate=1e-3))
    # compile does not change results: it may differ, and the caller's config comes back.
    _, got, _ = load_checkpoint(tmp_path / "c.pt", config.replace(compile=True))
    assert got.compile is True


def test_tensor_shape_mismatch_names_the_leaf(tmp_path):
    config = mlp_config()
    save_checkpoint(tmp_path / "c.pt", init_train_state(jr.key(0), config), config)
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    good = raw["state"]["params['torso']['w0']"]
    raw["state"]["params['torso']['w0']"] = torch.zeros(5, 8)
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(
        ValueError, match=r"state\[\"params\['torso'\]\['w0'\]\"\].*\[4, 8\].*\[5, 8\]"
    ):
        load_checkpoint(tmp_path / "bad.pt")
    raw["state"]["params['torso']['w0']"] = good
    raw["state"]["step"] = raw["state"]["step"].float()
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"state\['step'\]: expected torch.int64"):
        load_checkpoint(tmp_path / "bad.pt")
    raw["state"]["step"] = raw["step"]
    del raw["state"]["key"]
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"state\['key'\]: missing"):
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
    with pytest.raises(ValueError, match=r"version 2.*upgrade funcppo"):
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
    with pytest.raises(ValueError, match="expected a version 0"):
        upgrade_checkpoint(old, config)


_CHILD = """
import os, sys, time
from pathlib import Path
from funcppo import random as jr
from funcppo.checkpoint import save_checkpoint
from funcppo.config import PPOConfig
from funcppo.spec import ActionSpec
from funcppo.state import init_train_state

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
