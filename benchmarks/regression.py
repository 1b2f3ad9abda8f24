"""No regression: this tree's speed against another commit's, in alternating whole processes.

Checks out ``--base`` (a commit, branch or tag) as a git worktree in a temporary folder and
measures both trees the same way, each measurement a fresh process whose ``PYTHONPATH`` starts
with that tree's ``src`` (and, for the update parts, its ``benchmarks``, so each tree runs its
own ``update_step.py``). The trees take turns, the order flipped every round so that a drift of
the machine's speed falls on both. The parts (``--only`` picks some):

* ``update``: the compiled update on the update benchmark's workload (``update_step.py``: MLP
  2 x 128, 8 envs x 128 steps, 4 epochs x 4 minibatches), one seed: the median of ``--calls``
  calls after the first, in ms.
* ``seeds``: the same update vmapped over 8 seeds, median ms.
* ``warm``: the main job's wall time, ``python -m funcppo train --env cartpole`` (8 seeds,
  ``--total-steps`` per seed, 500,000 unless told), whole process from start to exit, after one
  short unmeasured run of the same tree (``--fill-steps``) has filled its own precompile
  folder (``FUNCPPO_PRECOMPILE_DIR``); inductor's cache is the user's usual one.
* ``cold``: the same command's first update (its ``update_seconds`` in ``metrics.jsonl``:
  compilation, tracing and one update) with an empty ``TORCHINDUCTOR_CACHE_DIR`` and an empty
  precompile folder, ``--fill-steps`` long; ``--cold-repeats`` times per tree (1: each takes a
  minute or two on a small CPU).

    python benchmarks/regression.py --base main                          # every part
    python benchmarks/regression.py --base main --only update seeds --repeats 5
    python benchmarks/regression.py --base HEAD~3 --only warm --total-steps 100000

Reading the output: one line per process as it ends (part, tree, seconds), then a table with,
per part, the median over processes of each tree (every process's figure in brackets), the
ratio current / base (below 1 is faster now) and ``WORSE`` where that ratio exceeds
``--tolerance`` (1.10). Noise on a shared machine moves single processes by 10-20%, so a
``WORSE`` on few repeats calls for more repeats before it is believed. The script exits with
status 1 when a part is flagged, 2 when a process fails (its output is shown). ``--json`` writes
every figure to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CURRENT = HERE.parent
PARTS = ("update", "seeds", "warm", "cold")
UPDATE_SEEDS = 8


def worker(part: str, tree: Path, calls: int, threads: int) -> None:
    """One update measurement in this process, with ``tree``'s funcppo and ``update_step``;
    prints one JSON line."""
    # This script's own folder is first on sys.path: the tree's benchmarks must come first.
    rest = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    sys.path[:] = [str(tree / "src"), str(tree / "benchmarks"), *rest]
    import torch

    import funcppo
    import update_step as bench

    for module, folder in ((funcppo, tree / "src"), (bench, tree / "benchmarks")):
        where = Path(module.__file__).resolve()
        if not where.is_relative_to(folder):
            raise RuntimeError(f"{module.__name__} came from {where}, not from {folder}")
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    seeds = UPDATE_SEEDS if part == "seeds" else None
    args = bench.make_inputs(bench.make_config(False, False), seeds, device)
    update = bench.make_update_fn(bench.make_config(False, True), num_seeds=seeds)
    first, median = bench.time_calls(update, args, calls, device)
    print(json.dumps({"seconds": median, "first_s": first}))


def git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(CURRENT), *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def run_process(cmd: list[str], env: dict, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        print(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}")
        print(done.stderr[-3000:], file=sys.stderr)
        sys.exit(2)
    return done, wall


class Runner:
    """Starts the measured processes of one tree: the environment, the folders, the command."""

    def __init__(self, tree: Path, scratch: Path, args: argparse.Namespace) -> None:
        self.tree, self.scratch, self.args = tree, scratch, args
        self.precompiled = scratch / "precompiled"  # the warm runs' folder, filled once
        self.count = 0
        # The venv's own funcppo must not answer for this tree's.
        cmd = [sys.executable, "-c", "import funcppo; print(funcppo.__file__)"]
        done, _ = run_process(cmd, self.env(tree / "src"), scratch)
        where = Path(done.stdout.strip()).resolve()
        if not where.is_relative_to(tree / "src"):
            sys.exit(f"funcppo came from {where}, not from {tree / 'src'}")

    def env(self, *paths: Path, **extra: str) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths)
        env["OMP_NUM_THREADS"] = str(self.args.threads)
        env.pop("FUNCPPO_PRECOMPILE_DIR", None)
        env.update(extra)
        return env

    def update(self, part: str) -> float:
        cmd = [sys.executable, __file__, "--worker", part, "--tree", str(self.tree)]
        cmd += ["--calls", str(self.args.calls), "--threads", str(self.args.threads)]
        env = self.env(self.tree / "src", self.tree / "benchmarks")
        done, _ = run_process(cmd, env, self.tree)
        return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]

    def train(self, steps: int, **extra: str) -> tuple[float, float]:
        """(process wall seconds, first update seconds) of one CLI run on CartPole."""
        self.count += 1
        out = self.scratch / f"run{self.count}"
        cmd = [sys.executable, "-m", "funcppo", "train", "--env", "cartpole"]
        cmd += ["--total-steps", str(steps), "--threads", str(self.args.threads), "--out", str(out)]
        _, wall = run_process(cmd, self.env(self.tree / "src", **extra), self.scratch)
        with open(out / "metrics.jsonl") as f:
            first = json.loads(f.readline())["update_seconds"]
        shutil.rmtree(out, ignore_errors=True)
        return wall, first

    def fill(self) -> None:
        self.train(self.args.fill_steps, FUNCPPO_PRECOMPILE_DIR=str(self.precompiled))

    def warm(self) -> float:
        return self.train(self.args.total_steps, FUNCPPO_PRECOMPILE_DIR=str(self.precompiled))[0]

    def cold(self) -> float:
        empty = Path(tempfile.mkdtemp(dir=self.scratch, prefix="cold"))
        _, first = self.train(
            self.args.fill_steps,
            TORCHINDUCTOR_CACHE_DIR=str(empty / "inductor"),
            FUNCPPO_PRECOMPILE_DIR=str(empty / "precompiled"),
        )
        shutil.rmtree(empty, ignore_errors=True)
        return first


def measure(runners: dict[str, Runner], parts: list[str], args) -> dict[str, dict[str, list]]:
    """Every part's figures per tree, the trees alternating, the order flipped each round."""
    results: dict[str, dict[str, list]] = {part: {name: [] for name in runners} for part in parts}
    order = list(runners)
    if "warm" in parts:
        for name, runner in runners.items():
            start = time.perf_counter()
            runner.fill()
            print(
                f"fill   {name}: precompile folder written in {time.perf_counter() - start:.1f} s",
                flush=True,
            )
    for part in parts:
        rounds = args.cold_repeats if part == "cold" else args.repeats
        for r in range(rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                runner = runners[name]
                if part in ("update", "seeds"):
                    value = runner.update(part)
                else:
                    value = runner.warm() if part == "warm" else runner.cold()
                results[part][name].append(value)
                print(f"{part:6s} {name:7s} round {r + 1}: {value:.4g} s", flush=True)
    return results


def print_table(results: dict[str, dict[str, list]], tolerance: float) -> list[str]:
    """The markdown table; returns the parts whose ratio exceeds ``tolerance``."""
    labels = {
        "update": "compiled update, 1 seed (ms)",
        "seeds": f"compiled update, {UPDATE_SEEDS} vmapped seeds (ms)",
        "warm": "main job, warm, whole process (s)",
        "cold": "main job, cold, first update (s)",
    }
    scale = {"update": 1e3, "seeds": 1e3, "warm": 1.0, "cold": 1.0}
    worse = []
    print("\n| part | base | current | current / base | |\n| --- | ---: | ---: | ---: | --- |")
    for part, per_tree in results.items():
        k = scale[part]
        base, current = (statistics.median(per_tree[n]) for n in ("base", "current"))
        ratio = current / base
        flag = "WORSE" if ratio > tolerance else ""
        if flag:
            worse.append(part)
        cells = [
            f"{median * k:.1f} [{', '.join(f'{v * k:.1f}' for v in per_tree[n])}]"
            for n, median in (("base", base), ("current", current))
        ]
        print(f"| {labels[part]} | {cells[0]} | {cells[1]} | {ratio:.3f} | {flag} |")
    return worse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="the commit to compare against (e.g. main)")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--repeats", type=int, default=3, help="processes per tree and part")
    parser.add_argument("--cold-repeats", type=int, default=1, help="cold processes per tree")
    parser.add_argument("--calls", type=int, default=7, help="timed update calls per process")
    parser.add_argument("--total-steps", type=int, default=500_000, help="warm runs, per seed")
    parser.add_argument(
        "--fill-steps", type=int, default=5120, help="the filling and the cold runs, per seed"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--tolerance", type=float, default=1.10, help="largest accepted ratio")
    parser.add_argument("--json", default="", help="also write every figure to this file")
    parser.add_argument("--worker", choices=("update", "seeds"), help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, Path(args.tree), args.calls, args.threads)
        return
    if not args.base:
        parser.error("--base: expected a commit to compare against, got nothing")
    for flag in ("repeats", "cold_repeats", "calls", "total_steps", "fill_steps", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')}: expected an int >= 1")
    commit = git("rev-parse", "--verify", f"{args.base}^{{commit}}")
    parts = [p for p in PARTS if p in args.only]
    print(f"base {args.base} = {commit}; current: the working tree at {CURRENT.name}")
    with tempfile.TemporaryDirectory(prefix="funcppo-regression-") as scratch:
        scratch = Path(scratch)
        base_tree = scratch / "base-tree"
        git("worktree", "add", "--detach", str(base_tree), commit)
        try:
            runners = {}
            for name, tree in (("base", base_tree), ("current", CURRENT)):
                (scratch / f"{name}-runs").mkdir()
                runners[name] = Runner(tree, scratch / f"{name}-runs", args)
            results = measure(runners, parts, args)
        finally:
            git("worktree", "remove", "--force", str(base_tree))
    worse = print_table(results, args.tolerance)
    if args.json:
        Path(args.json).write_text(json.dumps({"base": commit, "results": results}, indent=1))
    if worse:
        print(f"\nWORSE than {args.tolerance:.2f}x the base: {', '.join(worse)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
