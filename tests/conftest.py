"""Shared test settings.

The networks in these tests are tiny: one intra-op thread is faster than two (OpenMP's
hand-off costs more than the work), and it leaves the second core to the compiler's workers.

Tests marked ``slow`` compile with inductor, learn, or run whole training processes; a case
parametrised with the inductor backend is slow too. ``python -m pytest -m "not slow"`` runs the
rest: the eager and ``aot_eager`` checks.

The cross-checks that matter on an accelerator (compiled against eager, vmapped against a loop,
one update against a plain torch reference) take the ``device`` fixture: the device named by
``FUNCPPO_TEST_DEVICE`` (``cpu`` when unset), e.g. ``FUNCPPO_TEST_DEVICE=cuda python -m pytest``.
Naming a device this machine does not have stops the run with an error before any test, so a
GPU run cannot pass by quietly testing the CPU. Tests of files, subprocesses and gymnasium stay
on the CPU.
"""

import os

import pytest
import torch

torch.set_num_threads(1)
# Inductor's own compiles (a plain torch.compile in a test) take the CPU's vector instruction
# sets from its flags, as CompileSettings.for_device("cpu") does, instead of proving each with a
# compiled probe: 14 s of the suite's first compile into an empty cache. Read when inductor's
# config is first imported, here or in a test's subprocess; a value the user set is kept.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")

DEVICE_ENV = "FUNCPPO_TEST_DEVICE"
_DEVICE_KEY = pytest.StashKey[torch.device]()


def _test_device() -> torch.device:
    name = os.environ.get(DEVICE_ENV, "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise pytest.UsageError(
            f"{DEVICE_ENV}: expected a torch device name such as cpu, cuda or cuda:1, got {name!r}"
        ) from None
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if device.type != "cpu" and (available is None or not available()):
        raise pytest.UsageError(
            f"{DEVICE_ENV}: expected a device this machine has, got {name!r}, and torch "
            f"{torch.__version__} sees no {device.type} device here"
        )
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise pytest.UsageError(
            f"{DEVICE_ENV}: expected a {device.type} index below {count()}, got {name!r}"
        )
    current = getattr(backend, "current_device", None)
    if device.type != "cpu" and device.index is None and current is not None:
        # The tensors made on "cuda" report "cuda:0": compare placements with the index.
        return torch.device(device.type, current())
    return device


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_DEVICE_KEY] = _test_device()


def pytest_report_header(config: pytest.Config) -> str:
    return f"funcppo test device: {config.stash[_DEVICE_KEY]} (set {DEVICE_ENV} to change it)"


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    """Where the cross-checks build their states and batches (``FUNCPPO_TEST_DEVICE``)."""
    return request.config.stash[_DEVICE_KEY]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "inductor" in callspec.id.split("-"):
            item.add_marker(pytest.mark.slow)
