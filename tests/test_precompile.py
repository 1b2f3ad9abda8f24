"""Precompiled functions: the key's fingerprint, and files written, read back and replaced."""

import dataclasses
import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from funcppo.accel import precompile
from funcppo.accel.compiling import CompileSettings, compile_fn
from funcppo.accel.precompile import PRECOMPILE_ENV, fingerprint
from funcppo.core.atomic import temporary_name
from funcppo.core.config import TENSOR_HYPERPARAMS
from funcppo.training.state import Hyperparams
from funcppo.training.update import make_update_fn
from test_update import make_case, max_diff, small_config

SCALE = 2.0
# The CPU's settings with inductor's Python wrapper: the tiny functions here compile faster.
CPU = CompileSettings.for_device("cpu").replace(cpp_wrapper=False)


@dataclasses.dataclass(frozen=True)
class Settings:
    rate: float
    sizes: tuple[int, ...]
    table: torch.Tensor


def make_fn(settings: Settings):
    def fn(x):
        return (x * settings.rate + settings.table.sum()) * SCALE

    return fn


def settings(rate=0.5, table=(1.0, 2.0)) -> Settings:
    return Settings(rate, (3, 4), torch.tensor(table))


def test_fingerprint_follows_what_the_code_reads(monkeypatch):
    base = fingerprint(make_fn(settings()))
    assert base is not None
    assert fingerprint(make_fn(settings())) == base  # equal values built apart: one key
    assert fingerprint(make_fn(settings(rate=0.25))) != base  # a config field
    assert fingerprint(make_fn(settings(table=(1.0, 3.0)))) != base  # a tensor's values
    monkeypatch.setitem(globals(), "SCALE", 3.0)
    assert fingerprint(make_fn(settings())) != base  # a plain global the code names

    def other(x):
        return (x * settings().rate - settings().table.sum()) * SCALE

    assert fingerprint(other) != base  # other code


def test_fingerprint_refuses_what_it_does_not_know():
    lock = threading.Lock()

    def locked(x):
        with lock:
            return x

    generator = torch.Generator()

    def drawn(x):
        return x + torch.rand(x.shape, generator=generator)

    assert fingerprint(lambda x: x) is not None
    assert fingerprint(locked) is None  # a closure over an object of an unknown kind
    assert fingerprint(drawn) is None  # torch's, but known only by its address


@pytest.fixture
def precompile_dir(tmp_path):
    return tmp_path


def saving(directory) -> CompileSettings:
    """``CPU`` with precompiled files kept in ``directory``."""
    return CPU.replace(precompile_dir=directory)


def test_written_once_then_read_back(precompile_dir):
    fn = make_fn(settings())
    x = torch.linspace(-1, 1, 7)
    torch.testing.assert_close(compile_fn(fn, "tiny", saving(precompile_dir))(x), fn(x))
    (path,) = precompile_dir.iterdir()
    written = path.stat().st_mtime_ns

    # A new compiled function (as in a new process) reads the file instead of compiling.
    again = compile_fn(make_fn(settings()), "tiny", saving(precompile_dir))
    torch.testing.assert_close(again(x), fn(x))
    assert path.stat().st_mtime_ns == written and len(list(precompile_dir.iterdir())) == 1

    # Another shape is another file; each call runs the code made for its own arguments.
    y = torch.ones(2, 3)
    torch.testing.assert_close(again(y), fn(y))
    torch.testing.assert_close(again(x), fn(x))
    assert len(list(precompile_dir.iterdir())) == 2

    # Another closure value is another file, with its own result.
    other = make_fn(settings(rate=-1.0))
    torch.testing.assert_close(compile_fn(other, "tiny", saving(precompile_dir))(x), other(x))
    assert len(list(precompile_dir.iterdir())) == 3


def test_unreadable_file_is_replaced(precompile_dir):
    fn = make_fn(settings(rate=1.5))
    x = torch.arange(5.0)
    compile_fn(fn, "tiny", saving(precompile_dir))(x)
    (path,) = precompile_dir.iterdir()
    path.write_bytes(b"not a compiled function")
    torch.testing.assert_close(compile_fn(fn, "tiny", saving(precompile_dir))(x), fn(x))
    assert path.stat().st_size > 100


def test_written_file_follows_the_umask_and_clears_dead_writers_temporaries(precompile_dir):
    fn = make_fn(settings(rate=2.5))
    x = torch.arange(6.0)
    before = os.umask(0o027)
    try:
        compile_fn(fn, "tiny", saving(precompile_dir))(x)
        (path,) = precompile_dir.iterdir()
        assert path.stat().st_mode & 0o777 == 0o640  # as torch.save's files, not mkstemp's 0600
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        stale = precompile_dir / temporary_name(path, dead.pid)
        stale.write_bytes(b"the part a killed writer wrote")
        path.unlink()
        torch.testing.assert_close(compile_fn(fn, "tiny", saving(precompile_dir))(x), fn(x))
    finally:
        os.umask(before)
    assert [p.name for p in precompile_dir.iterdir()] == [path.name]


class Killed(BaseException):
    """A kill that Python sees (KeyboardInterrupt, SystemExit): no ``except Exception`` stops it."""


def test_an_interrupted_write_leaves_no_temporary(precompile_dir, monkeypatch):
    fsync = os.fsync

    def killed_at_fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(f"{precompile_dir}{os.sep}"):
            raise Killed  # written in full, not yet renamed
        fsync(fd)

    monkeypatch.setattr(os, "fsync", killed_at_fsync)
    with pytest.raises(Killed):
        compile_fn(make_fn(settings(rate=0.75)), "tiny", saving(precompile_dir))(torch.arange(4.0))
    assert list(precompile_dir.iterdir()) == []


def test_unknown_closure_is_compiled_as_usual(precompile_dir):
    lock = threading.Lock()

    def fn(x):
        assert lock is not None
        return x * 2

    x = torch.arange(4.0)
    torch.testing.assert_close(compile_fn(fn, "locked", saving(precompile_dir))(x), x * 2)
    assert not list(precompile_dir.iterdir())


def test_off_without_a_folder(monkeypatch, tmp_path):
    # The environment variable is the command line's, not the library's: settings decide.
    monkeypatch.setenv(PRECOMPILE_ENV, str(tmp_path))
    assert CPU.precompile_dir is None
    fn = make_fn(settings(rate=3.0))
    x = torch.arange(3.0)
    compiled = compile_fn(fn, "tiny", CPU)
    assert not isinstance(compiled, precompile.Precompiled)
    torch.testing.assert_close(compiled(x), fn(x))
    assert list(tmp_path.iterdir()) == []


def test_hyperparameter_values_are_not_in_the_key_and_do_not_reach_the_update():
    """The update reads TENSOR_HYPERPARAMS from the state's tensors, never from the config, so
    code saved for one learning rate (or clip, gamma, ...) is right for another."""
    assert Hyperparams._fields == TENSOR_HYPERPARAMS
    a = small_config(target_kl=0.5)
    b = a.replace(
        learning_rate=0.3, ent_coef=0.7, clip_coef=0.05, vf_coef=3.0, gamma=0.5,
        gae_lambda=0.1, max_grad_norm=0.01, target_kl=9.0,
    )  # fmt: skip
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(a.replace(update_epochs=3))
    assert fingerprint(a) != fingerprint(a.replace(target_kl=None))  # whether it is set counts
    state, batch = make_case(a)
    got_a = make_update_fn(a)(state, batch)
    got_b = make_update_fn(b, hparams="state")(state, batch)  # the default refuses b's values
    assert max_diff(got_a, got_b) == 0.0


def test_the_command_lines_folder_and_the_settings_field(monkeypatch, tmp_path):
    monkeypatch.setenv(PRECOMPILE_ENV, str(tmp_path / "named"))
    assert precompile.default_precompile_dir() == tmp_path / "named"
    monkeypatch.delenv(PRECOMPILE_ENV)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    assert precompile.default_precompile_dir() == tmp_path / "inductor" / "funcppo"
    # Kept on every device, as a plain string whatever path-like was given.
    for device in ("cpu", "cuda"):
        chosen = CompileSettings.for_device(device, precompile_dir=tmp_path)
        assert chosen.precompile_dir == str(tmp_path)
    assert CompileSettings.for_device("cpu").precompile_dir is None


def test_savable_guards_by_kind():
    from types import SimpleNamespace as Entry

    assert precompile.savable(Entry(guard_type="TENSOR_MATCH", derived_guard_types=()))
    assert not precompile.savable(Entry(guard_type="CLASS_MATCH", derived_guard_types=()))
    assert not precompile.savable(Entry(guard_type="TYPE_MATCH", derived_guard_types=("ID_MATCH",)))
    assert precompile.savable(Entry(guard_type="TYPE_MATCH", derived_guard_types=None))


class Pair(NamedTuple):
    a: torch.Tensor
    b: torch.Tensor


def test_saved_guards_leave_out_the_closure_and_this_process_scopes(precompile_dir):
    """A namedtuple's ``__new__`` has globals of no module: dynamo guards them as
    ``G['___unnamed_scope_<id>_c<n>']``, a name that only this process has. The saved file
    keeps neither those guards nor the closure's, or no later process could load it."""
    import funcppo.accel.compiling

    fn = make_fn(settings(rate=1.25))

    def paired(x):
        p = Pair(x, x * 2)
        return fn(p.a) + p.b

    x = torch.arange(3.0)
    torch.testing.assert_close(compile_fn(paired, "tiny", saving(precompile_dir))(x), paired(x))
    # dynamo installed such a scope where the compiled trampoline looks up its globals
    assert any(name.startswith("___unnamed_scope") for name in vars(funcppo.accel.compiling))
    (path,) = precompile_dir.iterdir()
    with path.open("rb") as file, torch._guards.tracing(torch._guards.TracingContext(None)):
        loaded = torch.compiler.load_compiled_function(file)
    guards = loaded._artifacts.guard_manager.code_parts
    assert any("L['args'][0]" in g for g in guards)  # the argument stays guarded
    assert not [g for g in guards if "___unnamed_scope" in g or "L['fn']" in g]


def test_accelerator_models_name_every_device_but_the_cpu():
    cpu = (torch.zeros(2), {"b": torch.ones(1)}, None, 3)
    assert precompile.accelerator_models(cpu) == ()  # a CPU-only key has no such part
    meta = (torch.zeros(2), [torch.zeros(2, device="meta")] * 2)
    assert precompile.accelerator_models(meta) == (("meta", ""),)


# One compiled update in a process of its own: the folders come from the environment, the
# funcppo imported is whichever the parent's PYTHONPATH names.
CHILD = """
import hashlib, sys
import optree, torch
import torch._dynamo.utils
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
import funcppo
from funcppo.training.update import make_update_fn
from test_update import make_case, small_config

config = small_config(compile=True, update_epochs=1, num_minibatches=2)
state, batch = make_case(config)
from funcppo import CompileSettings
from funcppo.accel.precompile import default_precompile_dir
compiler = CompileSettings.for_device("cpu", precompile_dir=default_precompile_dir())
new_state, _ = make_update_fn(config, compile_scope="scan", compiler=compiler)(state, batch)
digest = hashlib.sha256()
for leaf in optree.tree_leaves(new_state.params):
    digest.update(leaf.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
print("funcppo", funcppo.__file__)
print("graphs", torch._dynamo.utils.counters["stats"]["unique_graphs"])
print("params", digest.hexdigest())
"""


def run_update_process(env: dict) -> dict[str, str]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(Path(__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # a hang guard only
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [line.split(" ", 1) for line in done.stdout.splitlines()]
    return {key: value for key, value in lines if key in ("funcppo", "graphs", "params")}


def files(directory: Path) -> dict[str, tuple[int, int, str]]:
    """Each file's size, modification time and content hash, by name."""
    return {
        path.name: (
            path.stat().st_size,
            path.stat().st_mtime_ns,
            hashlib.sha256(path.read_bytes()).hexdigest(),
        )
        for path in directory.iterdir()
    }


@pytest.mark.slow
def test_a_new_process_loads_the_precompiled_update_instead_of_compiling(tmp_path):
    """Guards that fail on load (a KeyError on an unnamed scope's global, say) made every run
    compile again and rewrite its file, silently: the files must be reused across processes."""
    saved, caches = tmp_path / "precompiled", tmp_path / "inductor"
    env = dict(os.environ, **{PRECOMPILE_ENV: str(saved), "TORCHINDUCTOR_CACHE_DIR": str(caches)})

    first = run_update_process(env)
    written = files(saved)
    assert written and all(name.endswith(".pt2") for name in written), written.keys()
    assert int(first["graphs"]) > 0  # it compiled

    second = run_update_process(env)
    assert second["funcppo"] == first["funcppo"]
    assert files(saved) == written  # read back: no file added, rewritten or touched
    assert int(second["graphs"]) == 0  # and dynamo traced nothing
    assert second["params"] == first["params"]
