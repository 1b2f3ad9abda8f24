"""Whole CartPole runs with 1, 8 and 32 seeds, compiled and eager: wall-clock and steps/s.

Each run is the main job in a process of its own (the CLI, timed from outside), so that
compile time is counted as a user sees it:

    python benchmarks/seeds_runs.py --seeds 1 8 32 --modes compiled eager --out runs/seeds

writes ``runs/seeds/<mode>_<seeds>/`` (the CLI's outputs) and ``runs/seeds/summary.json``, and
prints a markdown table. The columns: the whole command's wall-clock; the time to the end of
the first update (compilation included when compiled; the rest is one steady update); the
steady state (env steps per second per seed and over all seeds, from the per-update times of
every update after the first); the mean over seeds of each seed's training return over its
last 10 updates; the evaluation return (``evaluation.json``). ``--total-steps`` shortens a run
(the default is the main job's 500k per seed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run_one(seeds: int, mode: str, total_steps: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "funcppo", "train", "--env", "cartpole", "--seeds", str(seeds)]
    cmd += ["--total-steps", str(total_steps), "--out", str(out)]
    cmd += ["--no-compile"] if mode == "eager" else []
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    first = re.search(r"the first update in ([0-9.]+) s", done.stderr)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_per_update = records[0]["env_steps"]
    steady = [r["update_seconds"] for r in records[1:]]
    per_seed_rate = steps_per_update / statistics.median(steady) if steady else float("nan")
    last = records[-10:]
    per_seed_return = [
        statistics.fmean(
            r["episode_return"][s] for r in last if r["episode_return"][s] == r["episode_return"][s]
        )
        for s in range(seeds)
    ]
    evaluation = json.loads((out / "evaluation.json").read_text())["episode_return"]
    return {
        "seeds": seeds,
        "mode": mode,
        "total_steps_per_seed": steps_per_update * len(records),
        "wall_s": wall,
        "first_update_s": float(first.group(1)) if first else float("nan"),
        "steady_steps_per_s_per_seed": per_seed_rate,
        "steady_steps_per_s_all_seeds": per_seed_rate * seeds,
        "train_return": statistics.fmean(per_seed_return),
        "eval_return": statistics.fmean(evaluation),
        "load_1min_end": os.getloadavg()[0],
        "command": " ".join(["python", *cmd[1:]]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--modes", nargs="+", default=["compiled", "eager"])
    parser.add_argument("--total-steps", type=int, default=500_000)
    parser.add_argument("--out", default="runs/seeds")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    rows = json.loads(summary_path.read_text()) if summary_path.exists() else []
    for mode in args.modes:
        for seeds in args.seeds:
            row = run_one(seeds, mode, args.total_steps, out / f"{mode}_{seeds}")
            rows = [r for r in rows if (r["mode"], r["seeds"]) != (mode, seeds)] + [row]
            summary_path.write_text(json.dumps(rows, indent=1))
            print(json.dumps(row), flush=True)
    print(
        "\n| mode | seeds | wall-clock | first update | steady steps/s per seed | over all seeds "
        "| train return | eval return |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    for r in sorted(rows, key=lambda r: (r["mode"], r["seeds"])):
        print(
            f"| {r['mode']} | {r['seeds']} | {r['wall_s']:.1f} s | {r['first_update_s']:.1f} s "
            f"| {r['steady_steps_per_s_per_seed']:,.0f} | {r['steady_steps_per_s_all_seeds']:,.0f} "
            f"| {r['train_return']:.1f} | {r['eval_return']:.1f} |"
        )


if __name__ == "__main__":
    main()
