"""Variants of the training loop timed side by side in one process (compile_options.py,
threads.py): rounds of every variant in turn from the same keys, then one table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import optree


def run_rounds(
    trains: dict[str, Callable], keys, rounds: int, before: Callable[[str], None]
) -> tuple[dict[str, list[float]], dict[str, float], dict]:
    """``(update seconds after the first two of each round, first round's seconds, final
    params)`` per variant; ``before(name)`` runs before each variant's turn."""
    times: dict[str, list[float]] = {name: [] for name in trains}
    first: dict[str, float] = {}
    params = {}
    for r in range(rounds):
        for name, train in trains.items():
            before(name)
            seconds: list[float] = []
            start = time.perf_counter()
            state, _ = train(keys, callback=lambda u, m, s=seconds: s.append(m["update_seconds"]))
            if r == 0:
                first[name] = time.perf_counter() - start
            times[name] += seconds[2:]
            params[name] = state.params
    return times, first, params


def print_table(label: str, base: str, times: dict, first: dict, params: dict) -> None:
    """One markdown row per variant: first round, median update, speed and largest parameter
    difference against the variant ``base``."""
    reference = statistics.median(times[base])
    print(f"| {label} | first round (s) | median update (ms) | vs {base} | max param diff |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, values in times.items():
        diff = max(
            float((a - b).abs().max())
            for a, b in zip(
                optree.tree_leaves(params[name]), optree.tree_leaves(params[base]), strict=True
            )
        )
        median = statistics.median(values)
        print(
            f"| {name} | {first[name]:.1f} | {1000 * median:.1f} | {reference / median:.2f}x | "
            f"{diff:.1e} |"
        )
