"""The command line: mistakes answered before torch is imported and before anything is written,
a cheap ``import funcppo`` and ``--help``, Ctrl-C at any moment, a folder per run, the first
compile's notice and heartbeat, and the progress line and summary.

Runs of the real program are subprocesses; their timeouts only guard against a hang.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import funcppo
from funcppo.cli import args as cli_args
from funcppo.cli import main as cli
from funcppo.cli.args import fill_defaults, make_out_dir
from funcppo.cli.main import _HelpFormatter, _parsers
from funcppo.cli.report import FirstCompile, Progress, Recorder, print_summary, write_plot
from funcppo.training.checkpoint import load_checkpoint

HANG = 600  # seconds: a guard against a hang, never a measure of speed
TINY = ["--num-envs", "2", "--num-steps", "16", "--no-compile"]

try:
    import matplotlib  # noqa: F401

    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False


def imported_modules(importtime_stderr: str) -> set[str]:
    """The modules ``python -X importtime`` reports as imported."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in importtime_stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def run_cli(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, set[str]]:
    """``python -m funcppo ARGS``, and the modules it imported."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "funcppo", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    return done, imported_modules(done.stderr)


def no_torch(modules: set[str]) -> bool:
    return not any(m == "torch" or m.startswith("torch.") for m in modules)


def only_message(stderr: str) -> str:
    return "\n".join(line for line in stderr.splitlines() if not line.startswith("import time:"))


# --- mistakes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "0"], "--seeds: expected an int >= 1, got 0"),
        (["--total-steps", "-5"], "--total-steps: expected an int >= 1, got -5"),
        (
            ["--total-steps", "100"],
            "--total-steps: expected at least one rollout per seed (--num-envs x --num-steps "
            "= 4 x 128 = 512 env steps), got 100",
        ),
        (
            ["--total-steps", "100", "--num-envs", "8", "--num-steps", "16"],
            "--total-steps: expected at least one rollout per seed (--num-envs x --num-steps "
            "= 8 x 16 = 128 env steps), got 100",
        ),
        (["--num-envs", "0"], "--num-envs: expected an int >= 1, got 0"),
        (["--num-steps", "-1"], "--num-steps: expected an int >= 1, got -1"),
        (["--threads", "0"], "--threads: expected an int >= 1, got 0"),
        (["--rollout-threads", "0"], "--rollout-threads: expected an int >= 1, got 0"),
        (["--dist-timeout", "0"], "--dist-timeout: expected seconds > 0, got 0.0"),
        (["--env", "nope"], "--env: expected one of ['cartpole', 'cartpole-pomdp', 'lifecycle']"),
        (
            ["--env", "gym:NoSuchEnv-v0"],
            "--env: expected gym: and a registered gymnasium ID, got gym:NoSuchEnv-v0",
        ),
        (["--env", "gym:CartPole-v1", "--seeds", "0"], "--seeds: expected an int >= 1, got 0"),
        (
            ["--env", "gym:CartPole-v1", "--total-steps", "10"],
            "--total-steps: expected at least one rollout per seed",
        ),
        (["--sweep", "lr=1"], "--sweep: expected NAME=V1,V2,... with NAME one of"),
        (["--sweep", "gamma=0.9,x"], "--sweep: expected comma-separated numbers after '='"),
        (
            ["--seeds", "2", "--sweep", "gamma=0.9,0.99,0.999"],
            "--sweep: expected between 1 and --seeds=2 values, got 3",
        ),
    ],
)
def test_a_mistake_exits_2_with_one_line_before_torch_and_before_writing(tmp_path, args, message):
    out = tmp_path / "out"
    done, modules = run_cli(["train", *args, "--out", str(out)], tmp_path)
    stderr = only_message(done.stderr)
    assert done.returncode == 2, stderr
    assert stderr.startswith("usage: python -m funcppo train"), stderr
    assert f"python -m funcppo train: error: {message}" in stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not out.exists() and not (tmp_path / "runs").exists()
    assert no_torch(modules), sorted(m for m in modules if m.startswith("torch"))


def test_an_out_that_is_a_file_or_holds_files_is_refused(tmp_path):
    file = tmp_path / "file"
    file.write_text("mine")
    done, modules = run_cli(["train", "--out", str(file)], tmp_path)
    assert done.returncode == 2 and no_torch(modules)
    assert f"error: --out: expected a folder, got {str(file)!r}, which is a file" in done.stderr
    full = tmp_path / "full"
    full.mkdir()
    (full / "metrics.jsonl").write_text("an earlier run\n")
    done, modules = run_cli(["train", "--out", str(full)], tmp_path)
    assert done.returncode == 2 and no_torch(modules) and "Traceback" not in done.stderr
    assert f"error: --out: expected a new or empty folder, got {str(full)!r}" in done.stderr
    assert "--overwrite" in done.stderr
    assert (full / "metrics.jsonl").read_text() == "an earlier run\n"
    assert file.read_text() == "mine"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sweep", "gamma=0.9,2"], "--sweep: gamma: expected a number in (0.0, 1.0], got 2.0"),
        (
            ["--env", "gym:Pendulum-v1", "--seeds", "1"],
            "--env gym:Pendulum-v1: action_space: expected Discrete or MultiDiscrete, got Box",
        ),
        (["--device", "nonsense"], "--device: expected cpu, cuda or cuda:N, got 'nonsense'"),
        (["--device", "meta"], "--device: expected cpu, cuda or cuda:N, got 'meta'"),
        # No machine has 100 GPUs: refused with or without CUDA.
        (["--device", "cuda:99"], "--device: expected a device this machine has, got 'cuda:99'"),
        (
            ["--env", "gym:CartPole-v1", "--seeds", "1", "--device", "cuda:99"],
            "--device: expected a device this machine has, got 'cuda:99'",
        ),
    ],
)
def test_a_mistake_seen_only_by_the_library_still_writes_nothing(tmp_path, args, message):
    # These need the PPO config or the env itself, so torch is imported; still no folder.
    done = subprocess.run(
        [sys.executable, "-m", "funcppo", "train", *args, *TINY, "--total-steps", "32"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert done.returncode == 2, done.stderr
    assert f"python -m funcppo train: error: {message}" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


# --- a cheap import and --help ---------------------------------------------------------------


def test_help_answers_without_torch_and_says_what_the_program_does(tmp_path):
    done, modules = run_cli(["--help"], tmp_path)
    assert done.returncode == 0 and no_torch(modules)
    assert "funcppo trains PPO agents" in done.stdout
    assert "examples:" in done.stdout and "python -m funcppo train --env cartpole" in done.stdout
    done, modules = run_cli(["train", "--help"], tmp_path)
    assert done.returncode == 0 and no_torch(modules)
    assert "--seeds SEEDS" in done.stdout and "how many independent agents" in done.stdout


def test_help_gives_every_options_default():
    _, train = _parsers()
    formatter = _HelpFormatter("python -m funcppo train")
    for action in train._actions:
        if action.dest == "help":
            continue
        text = formatter._get_help_string(action) or ""
        assert "default" in text, (action.option_strings, text)
    shown = train.format_help()
    assert "(default: 8)" in shown and "(default: 500000)" in shown
    assert "(default: None)" not in shown


def test_import_parse_and_check_leave_torch_out():
    code = """
import sys
import funcppo
import funcppo.cli.main
from funcppo.cli.main import _parsers
from funcppo.cli.args import UsageError, check_args, fill_defaults

parser, _ = _parsers()
args = parser.parse_args(["train", "--env", "gym:CartPole-v1", "--seeds", "2"])
fill_defaults(args)
check_args(args)
bad = parser.parse_args(["train", "--seeds", "0"])
fill_defaults(bad)
try:
    check_args(bad)
except UsageError:
    pass
else:
    raise SystemExit("no UsageError")
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_every_public_name_resolves_lazily():
    assert set(funcppo.__all__) <= set(dir(funcppo))
    for name in funcppo.__all__:
        assert getattr(funcppo, name) is not None, name
    from funcppo import PPOAgent, make_train
    from funcppo import random as jr

    assert PPOAgent.__module__ == "funcppo.agent.agent"
    assert make_train.__module__ == "funcppo.training.train"
    assert jr is sys.modules["funcppo.core.random"] and callable(jr.key)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        funcppo.nope  # noqa: B018
    # The PPO API a user calls, not every name of every layer.
    assert 30 <= len(funcppo.__all__) <= 45


def test_names_copied_to_keep_the_cli_torch_free_match_the_library():
    from funcppo.accel.precompile import PRECOMPILE_ENV
    from funcppo.envs import ENVS
    from funcppo.training.state import Hyperparams

    assert Hyperparams._fields == cli.SWEEPABLE
    assert cli.PRECOMPILE_ENV == PRECOMPILE_ENV
    assert set(cli.PRESETS) == set(ENVS)


# --- Ctrl-C ----------------------------------------------------------------------------------


class Run:
    """``python -m funcppo train ARGS`` in ``cwd``, its stderr read line by line; killed if it
    outlives the hang guard."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        env = dict(
            os.environ,
            TORCHINDUCTOR_CACHE_DIR=str(cwd / "inductor"),
            FUNCPPO_PRECOMPILE_DIR=str(cwd / "precompiled"),
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "funcppo", "train", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.guard = threading.Timer(HANG, self.proc.kill)
        self.guard.start()
        self.lines: list[str] = []

    def wait_for(self, text: str) -> str:
        for line in self.proc.stderr:
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"{text!r} never printed:\n{''.join(self.lines)}")

    def interrupt(self) -> tuple[int, str, str]:
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate()
        self.guard.cancel()
        return self.proc.returncode, out, "".join(self.lines) + err

    def folder(self) -> Path:
        line = next(line for line in self.lines if "writing to " in line)
        return Path(line.rsplit("writing to ", 1)[1].strip())


def wait_for_lines(path: Path, n: int) -> None:
    deadline = time.monotonic() + HANG
    while not (path.exists() and len(path.read_text().splitlines()) >= n):
        assert time.monotonic() < deadline, f"{path} never reached {n} lines"
        time.sleep(0.05)


@pytest.mark.slow
def test_ctrl_c_during_the_first_compile_keeps_the_empty_log_and_exits_130(tmp_path):
    run = Run(["--seeds", "2", "--total-steps", "4096", "--out", "out"], tmp_path)
    run.wait_for("compiling the first update")
    code, out, err = run.interrupt()
    assert code == 130, err
    assert "interrupted after 0 of 8 updates" in err and "Traceback" not in err
    assert "no update finished" in out
    assert (tmp_path / "out" / "metrics.jsonl").read_text() == ""
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.jsonl"]


@pytest.mark.slow
def test_ctrl_c_after_some_updates_keeps_them_in_the_runs_own_folder(tmp_path):
    run = Run(["--seeds", "2", "--total-steps", "10000000", *TINY], tmp_path)
    run.wait_for("writing to ")
    out = tmp_path / run.folder()
    assert out.parent == tmp_path / "runs" and out.name.startswith("cartpole-")
    wait_for_lines(out / "metrics.jsonl", 3)
    code, stdout, err = run.interrupt()
    assert code == 130, err
    assert "Traceback" not in err
    done = len((out / "metrics.jsonl").read_text().splitlines())
    assert done >= 3 and f"interrupted after {done} of 312500 updates" in err
    state, _, _ = load_checkpoint(out / "checkpoint.pt")
    assert state.step.tolist() == [done, done]
    assert (out / "learning_curve.png").exists() == HAVE_MATPLOTLIB
    assert not (out / "evaluation.json").exists()  # the run did not end: nothing to evaluate
    assert f"{done} updates, {done * 32:,} env steps per seed" in stdout


@pytest.mark.slow
def test_ctrl_c_on_a_gym_env_keeps_every_finished_update(tmp_path):
    run = Run(
        ["--env", "gym:CartPole-v1", "--seeds", "2", "--total-steps", "10000000", *TINY], tmp_path
    )
    run.wait_for("writing to ")
    out = tmp_path / run.folder()
    assert out.name.startswith("gym-CartPole-v1-")
    wait_for_lines(out / "metrics.jsonl", 2)
    code, _, err = run.interrupt()
    assert code == 130 and "Traceback" not in err, err
    done = len((out / "metrics.jsonl").read_text().splitlines())
    assert f"interrupted after {done} of" in err
    assert {p.name for p in out.glob("checkpoint-*.pt")} == {"checkpoint-0.pt", "checkpoint-1.pt"}
    assert (out / "learning_curve.png").exists() == HAVE_MATPLOTLIB


@pytest.mark.slow
def test_ctrl_c_before_a_gym_agents_first_update_keeps_no_checkpoint(tmp_path):
    run = Run(["--env", "gym:CartPole-v1", "--seeds", "1", "--out", "out"], tmp_path)
    run.wait_for("compiling the first update")
    code, _, err = run.interrupt()
    assert code == 130 and "Traceback" not in err, err
    assert "interrupted after 0 of" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.jsonl"]


def test_a_ctrl_c_while_an_update_is_recorded_waits_for_its_line(tmp_path):
    class Interrupting(io.StringIO):
        def write(self, text: str) -> int:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-record
            return super().write(text)

    progress = Progress(3, 8, 1, FirstCompile(False, None))
    log = Interrupting()
    record = Recorder(log, None, progress, 8)
    with pytest.raises(KeyboardInterrupt):
        record(0, {"episode_return": [1.0], "loss": [0.5]})
    assert json.loads(log.getvalue()) == {
        "update": 0,
        "env_steps": 8,
        "episode_return": [1.0],
        "loss": [0.5],
    }
    assert record.returns == [[1.0]] and progress.done == 1


def test_no_finished_update_draws_no_curve_and_says_so(tmp_path, capsys):
    assert write_plot(tmp_path / "curve.png", [], 8, "cartpole") is False
    assert not (tmp_path / "curve.png").exists()
    print_summary([], Progress(3, 8, 2, FirstCompile(False, None)))
    assert capsys.readouterr().out == "no update finished\n"


# --- the output folder -----------------------------------------------------------------------


def train_args(*argv: str):
    parser, _ = _parsers()
    args = parser.parse_args(["train", *argv])
    fill_defaults(args)
    return args


def test_each_run_gets_a_new_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli_args.time, "strftime", lambda fmt: "20250102-030405")
    args = train_args("--env", "gym:ALE/Pong-v5")
    made = [make_out_dir(args) for _ in range(3)]
    assert [str(p) for p in made] == [
        "runs/gym-ALE-Pong-v5-20250102-030405",
        "runs/gym-ALE-Pong-v5-20250102-030405-2",
        "runs/gym-ALE-Pong-v5-20250102-030405-3",
    ]
    assert all(p.is_dir() for p in made)


def test_overwrite_removes_only_earlier_outputs(tmp_path):
    out = tmp_path / "out"
    (out / "tb").mkdir(parents=True)
    for name in ("metrics.jsonl", "checkpoint.pt", "checkpoint-3.pt", "notes.txt", "tb/events"):
        (out / name).write_text("earlier")
    assert make_out_dir(train_args("--out", str(out), "--overwrite")) == out
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# --- the first compile -----------------------------------------------------------------------


def test_first_compile_is_announced_and_its_time_printed_until_it_ends(capsys):
    first = FirstCompile(True, None, every=0.01)
    first.start()
    seen = ""
    deadline = time.monotonic() + HANG
    while seen.count("still compiling") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
        seen += capsys.readouterr().err
    assert first.stop() == "compiled and ran"
    seen += capsys.readouterr().err
    time.sleep(0.1)  # a heartbeat that outlived stop() would print in this time
    assert capsys.readouterr().err == ""
    notice, *beats = seen.splitlines()
    assert notice.startswith("compiling the first update: usually 1-3 minutes on a first run")
    assert all(line.startswith("  still compiling: ") and line.endswith(" s") for line in beats)
    eager = FirstCompile(False, None)
    eager.start()
    assert eager.stop() == "ran" and capsys.readouterr().err == "running eagerly (--no-compile)\n"


def test_first_compile_tells_loaded_from_compiled_by_the_precompiled_files(tmp_path):
    # A tiny function through the library's precompiled path: the first instance compiles
    # and writes its file, a second one (as a later process would) loads it.
    from funcppo.accel.compiling import CompileSettings, compile_fn

    x = torch.linspace(-1, 1, 5)
    cpu = CompileSettings.for_device("cpu", precompile_dir=tmp_path)
    plain = cpu.replace(cpp_wrapper=False)
    said = []
    for _ in range(2):
        first = FirstCompile(True, tmp_path, every=HANG)
        first.start()
        compile_fn(lambda v: v * 3 + 1, "heartbeat_probe", plain)(x)
        said.append(first.stop())
    assert said == ["compiled (saved for later runs) and ran", "loaded precompiled code and ran"]


# --- progress and summary --------------------------------------------------------------------


def test_progress_labels_its_rates_and_gives_an_eta_only_once_known(capsys):
    clock = iter([0.0, 10.0, 11.0, 12.0, 13.0])  # start, then each update's end
    progress = Progress(4, 100, 4, FirstCompile(False, None), every=0.0, clock=lambda: next(clock))
    progress.start()
    for u in range(4):
        progress(u, float(u))
    progress.stop()
    lines = capsys.readouterr().err.splitlines()
    assert lines[:3] == [
        "running eagerly (--no-compile)",
        "ran the first update in 10.0 s",
        "update 1/4  return 0.00",
    ]
    assert lines[3] == "update 2/4  100 env steps/s per seed (400 in all)  return 1.00  ETA 2 s"
    assert lines[5] == "update 4/4  100 env steps/s per seed (400 in all)  return 3.00"
    assert "nan" not in "".join(lines)
    assert progress.throughput() == (
        "4 updates, 400 env steps per seed, in 13.0 s wall time (the first update, eager, "
        "10.0 s): 123 env steps/s over all 4 seeds, 31 per seed"
    )


@pytest.mark.slow
def test_the_main_job_runs_end_to_end_eagerly(tmp_path):
    args = ["train", "--env", "cartpole", "--seeds", "2", "--total-steps", "64", *TINY]
    done = subprocess.run(
        [sys.executable, "-m", "funcppo", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert done.returncode == 0, done.stderr
    (out,) = (tmp_path / "runs").iterdir()
    assert f"writing to {Path('runs') / out.name}" in done.stderr
    assert "env steps/s over all 2 seeds" in done.stdout and "| all |" in done.stdout
    assert "interrupted" not in done.stderr and "Traceback" not in done.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / "checkpoint.pt").exists() and (out / "evaluation.json").exists()
