"""The machine a benchmark ran on, as the benchmarks name it in their output."""

from __future__ import annotations

import platform


def cpu_name() -> str:
    """The CPU's model from /proc/cpuinfo (the platform's name where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
