"""Shared test settings.

The networks in these tests are tiny: one intra-op thread is faster than two (OpenMP's
hand-off costs more than the work), and it leaves the second core to the compiler's workers.

Tests marked ``slow`` compile with inductor, learn, or run whole training processes; a case
parametrised with the inductor backend is slow too. ``python -m pytest -m "not slow"`` runs the
rest: the eager and ``aot_eager`` checks.
"""

import pytest
import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "inductor" in callspec.id.split("-"):
            item.add_marker(pytest.mark.slow)
