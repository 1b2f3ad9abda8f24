"""What a training run started from the command line shows and keeps: the first compile's
notice and heartbeat, the progress line, each update's record (``metrics.jsonl``, TensorBoard,
the curve), the learning-curve plot and the summary; and Ctrl-C held back while a record or an
output file is being written, so that what is kept is whole."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from funcppo.agent.callbacks import summary_writer
from funcppo.envs.lifecycle import REFERENCE_RETURN

__all__ = [
    "FirstCompile",
    "Progress",
    "Recorder",
    "held_interrupts",
    "print_summary",
    "report_end",
    "tensorboard",
    "write_plot",
]

# Returns drawn on the learning curve: Lifecycle's hand-written heuristic.
REFERENCE_RETURNS = {"lifecycle": REFERENCE_RETURN}

# How long a first compile takes: the main job's pieces took 1-2 minutes on a 2-core CPU
# (benchmarks/RESULTS.md), and a run that finds their precompiled files ends its first
# update in about 2 s.
USUAL_COMPILE = "usually 1-3 minutes on a first run, seconds when precompiled files exist"


@contextlib.contextmanager
def held_interrupts() -> Iterator[list[int]]:
    """Within the block, Ctrl-C (SIGINT) is noted in the yielded list instead of raised, so
    that the block finishes what it writes; the caller decides what a noted one means."""
    received: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except ValueError:  # not the main thread, which alone receives signals
        previous = None
    try:
        yield received
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _stderr(*parts: object, end: str = "\n") -> None:
    print(*parts, end=end, file=sys.stderr, flush=True)


def _precompiled_files(folder: Path | None) -> dict[str, int]:
    if folder is None or not folder.is_dir():
        return {}
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.pt2")}


class FirstCompile:
    """The first update's wait: said before it starts, its elapsed time printed every ``every``
    seconds while it runs (a background thread, one whole line each, so that a log reads as
    well as a terminal), and at the end whether its code was compiled or loaded.

    ``precompiled`` is the folder of precompiled files (None: precompiling off). Compiling a
    function there writes its file and loading one writes nothing (``funcppo.accel.precompile``), so
    a file that is new or rewritten after the first update means the code was compiled.
    """

    def __init__(
        self, compiling: bool, precompiled: Path | None, usual: str = USUAL_COMPILE, every=10.0
    ) -> None:
        self.compiling, self.precompiled, self.usual, self.every = (
            compiling,
            precompiled,
            usual,
            every,
        )
        self._before: dict[str, int] = {}
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0.0

    def start(self) -> None:
        if not self.compiling:
            _stderr("running eagerly (--no-compile)")
            return
        self._before = _precompiled_files(self.precompiled)
        self._start = time.perf_counter()
        thread = threading.Thread(target=self._beat, name="compile-heartbeat", daemon=True)
        thread.start()
        self._thread = thread  # only once started: stop() may come at any moment (Ctrl-C)
        where = f" (in {self.precompiled})" if self.precompiled is not None else ""
        _stderr(f"compiling the first update: {self.usual}{where}")

    def _beat(self) -> None:
        while not self._done.wait(self.every):
            _stderr(f"  still compiling: {time.perf_counter() - self._start:.0f} s")

    def stop(self) -> str:
        """Ends the heartbeat; what the first update did, as the start of a sentence."""
        self._done.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if not self.compiling:
            return "ran"
        if self.precompiled is None:
            return "compiled and ran"
        after = _precompiled_files(self.precompiled)
        if any(self._before.get(name) != stamp for name, stamp in after.items()):
            return "compiled (saved for later runs) and ran"
        return "loaded precompiled code and ran"


class Progress:
    """The progress line on stderr: updates done, env steps/s per seed and over all seeds, the
    mean return over seeds, and the ETA once a rate is known (from the second update on: the
    first includes compiling). On a terminal the line is rewritten in place; elsewhere (a
    log, a pipe) a whole line is printed for the first and last updates and every ``every``
    seconds between them. ``clock`` tells the time in seconds."""

    def __init__(
        self,
        total_updates: int,
        steps_per_update: int,
        num_seeds: int,
        first: FirstCompile,
        every: float = 10.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.total, self.steps, self.seeds = total_updates, steps_per_update, num_seeds
        self.first, self.every, self.clock = first, every, clock
        self.terminal = sys.stderr.isatty()
        self.done = 0
        self.start_time = self.first_done = self.last_done = self._printed = 0.0
        self._open_line = False

    def start(self) -> None:
        self.start_time = self.clock()
        self.first.start()

    def __call__(self, u: int, mean_return: float) -> None:
        now = self.clock()
        if self.done == 0:
            self.first_done = now
            _stderr(f"{self.first.stop()} the first update in {now - self.start_time:.1f} s")
        self.done, self.last_done = u + 1, now
        parts = [f"update {self.done}/{self.total}"]
        rate = self.rate_per_seed()
        if rate is not None:
            parts.append(f"{rate:,.0f} env steps/s per seed ({rate * self.seeds:,.0f} in all)")
        parts.append(f"return {mean_return:.2f}")
        if rate is not None and self.done < self.total:
            parts.append(f"ETA {(self.total - self.done) * self.steps / rate:.0f} s")
        line = "  ".join(parts)
        if self.terminal:
            _stderr(f"\r{line}\033[K", end="")
            self._open_line = True
        elif self.done in (1, self.total) or now - self._printed >= self.every:
            _stderr(line)
            self._printed = now

    def rate_per_seed(self) -> float | None:
        """Env steps per second per seed after the first update (None before a second)."""
        if self.done < 2 or self.last_done <= self.first_done:
            return None
        return (self.done - 1) * self.steps / (self.last_done - self.first_done)

    def stop(self) -> None:
        """Ends the heartbeat (when no update finished) and the in-place line."""
        self.first.stop()
        if self._open_line:
            _stderr()
            self._open_line = False

    def throughput(self) -> str:
        """Wall time and env steps/s of the updates that finished, over all seeds and per seed."""
        if self.done == 0:
            return "no update finished"
        wall = max(self.last_done - self.start_time, 1e-9)
        steps = self.done * self.steps
        per_seed = steps / wall
        first = "compiling" if self.first.compiling else "eager"
        return (
            f"{self.done} updates, {steps:,} env steps per seed, in {wall:.1f} s wall time "
            f"(the first update, {first}, {self.first_done - self.start_time:.1f} s): "
            f"{per_seed * self.seeds:,.0f} env steps/s over all {self.seeds} seeds, "
            f"{per_seed:,.0f} per seed"
        )


class Recorder:
    """Keeps each finished update: its line of ``metrics.jsonl`` (every metric per seed), the
    mean return over seeds to TensorBoard under ``tb_dir`` (opened at the first finished
    update, so a run stopped before it leaves no event file; None: no TensorBoard), the returns
    for the curve and the summary, and the progress line. A Ctrl-C that comes while it writes
    is held until the update is kept whole, then raised, which ends the run after that update."""

    def __init__(self, log, tb_dir: Path | None, progress: Progress, steps_per_update: int) -> None:
        self.log, self.tb_dir, self.progress, self.steps = log, tb_dir, progress, steps_per_update
        self.writer = None
        self.returns: list[list[float]] = []

    def __call__(self, u: int, metrics: dict) -> None:
        with held_interrupts() as held:
            env_steps = (u + 1) * self.steps
            self.log.write(json.dumps({"update": u, "env_steps": env_steps, **metrics}) + "\n")
            self.log.flush()
            self.returns.append(metrics["episode_return"])
            finite = [r for r in metrics["episode_return"] if not math.isnan(r)]
            mean_return = sum(finite) / len(finite) if finite else float("nan")
            if self.writer is None and self.tb_dir is not None:
                self.writer = tensorboard(self.tb_dir)
                self.tb_dir = None
            if self.writer is not None:
                self.writer.add_scalar("episode_return", mean_return, env_steps)
                self.writer.flush()
            self.progress(u, mean_return)
        if held:
            raise KeyboardInterrupt


def tensorboard(log_dir: Path):
    """A TensorBoard writer to ``log_dir``, or None where tensorboard is not installed: the
    command line logs to TensorBoard only when it can."""
    try:
        return summary_writer(log_dir)
    except ImportError:
        return None


def sweep_groups(sweep: tuple[str, list[float]]) -> list[tuple[float, torch.Tensor]]:
    """Each distinct swept value, in first-seen order, with the bool mask of its seeds."""
    values = sweep[1]
    return [(v, torch.tensor([x == v for x in values])) for v in dict.fromkeys(values)]


def smooth(returns: torch.Tensor, points: int = 100) -> torch.Tensor:
    """``[U, S]`` per-update returns as a trailing mean over about ``U / points`` updates per
    seed, skipping updates in which no episode finished (NaN)."""
    window = max(1, returns.shape[0] // points)
    finite = torch.isfinite(returns)
    zeros = returns.new_zeros(1, returns.shape[1])
    total = torch.cat([zeros, torch.where(finite, returns, 0.0).cumsum(0)])
    count = torch.cat([zeros, finite.double().cumsum(0)])
    start = (torch.arange(returns.shape[0]) + 1 - window).clamp(min=0)
    end = torch.arange(returns.shape[0]) + 1
    n = count[end] - count[start]
    return torch.where(n > 0, (total[end] - total[start]) / n.clamp(min=1), torch.nan)


def write_plot(
    path: Path, returns: list[list[float]], steps_per_update: int, env: str, sweep=None
) -> bool:
    """The learning curve: mean and 10th-90th percentile over seeds, or with a sweep one
    mean curve per swept value (its seeds' mean). False when there is nothing to draw (no
    update finished) or no matplotlib."""
    if not returns:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    data = smooth(torch.tensor(returns, dtype=torch.float64))
    x = (torch.arange(data.shape[0]) + 1) * steps_per_update
    mean = torch.nanmean(data, 1)
    lo = torch.nanquantile(data, 0.1, dim=1) if data.shape[1] > 1 else mean
    hi = torch.nanquantile(data, 0.9, dim=1) if data.shape[1] > 1 else mean
    fig, ax = plt.subplots(figsize=(7, 4))
    window = max(1, data.shape[0] // 100)
    smoothing = f", trailing mean of {window} updates" if window > 1 else ""
    if sweep is None:
        ax.plot(x, mean, label=f"mean over {data.shape[1]} seeds{smoothing}")
        ax.fill_between(x, lo, hi, alpha=0.3, label="10th-90th percentile")
    else:
        name = sweep[0]
        for v, mine in sweep_groups(sweep):
            label = f"{name}={v:g}, mean over {int(mine.sum())} seeds{smoothing}"
            ax.plot(x, torch.nanmean(data[:, mine], 1), label=label)
    reference = REFERENCE_RETURNS.get(env)
    if reference is not None:
        ax.axhline(reference, color="k", linestyle="--", label="reference return")
    ax.set_xlabel("environment steps per seed")
    ax.set_ylabel("episode return")
    ax.set_title(f"funcppo PPO on {env}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def print_summary(returns: list[list[float]], progress: Progress, sweep=None) -> None:
    """The table of each seed's mean return over the last 10 updates (a row per swept value
    too), then wall time and throughput."""
    if returns:
        last = torch.tensor(returns[-10:], dtype=torch.float64)
        per_seed = torch.nanmean(last, 0)
        if sweep is None:
            print("\n| seed | mean return, last 10 updates |\n| ---: | ---: |")
            for i, r in enumerate(per_seed.tolist()):
                print(f"| {i} | {r:.1f} |")
        else:
            name, values = sweep
            print(f"\n| seed | {name} | mean return, last 10 updates |\n| ---: | ---: | ---: |")
            for i, r in enumerate(per_seed.tolist()):
                print(f"| {i} | {values[i]:g} | {r:.1f} |")
            for v, mine in sweep_groups(sweep):
                group = per_seed[mine]
                print(f"| {name}={v:g} | | {group.mean():.1f} +- {group.std(correction=0):.1f} |")
        print(f"| all | {per_seed.mean():.1f} +- {per_seed.std(correction=0):.1f} |")
    print(progress.throughput())


def report_end(kept: list[Path], done: int, total: int, interrupted: bool) -> int:
    """The files kept, and on Ctrl-C how far the run got; the exit status (130 for Ctrl-C, as
    a shell reports a process that SIGINT ended)."""
    if interrupted:
        _stderr(f"interrupted after {done} of {total} updates")
    print(f"wrote {', '.join(str(p) for p in kept)}")
    return 130 if interrupted else 0
