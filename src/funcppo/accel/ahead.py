"""Functions compiled ahead of time: traced once per argument signature, compiled by
AOTInductor into a package and called through torch's C++ runner.

An agent drives its compiled pieces from Python, one call per env step. Through
``torch.compile`` every process imports dynamo (1.2 s here) before it can load a precompiled
file, and every call runs dynamo's guards and AOTAutograd's wrappers (54 us per acting call on
CartPole). A package made here is a shared library that torch's
C++ runner (``torch._C._aoti``) loads in milliseconds without importing the compiler; a call
flattens the arguments, checks their dtypes, shapes, strides and devices against the
signature it was compiled for (a new signature is compiled anew, as a guard failure would
be), runs, and rebuilds the output tree: 60 us on CartPole, of which the runner 24, so the
gain is the start, not the call.

Tracing: ``make_fx`` (which goes through ``torch.func``'s ``vmap`` and ``grad``) gives a
graph of aten ops, ``torch.export`` lifts its constants, and AOTInductor compiles it with
the settings' inductor config. Non-tensor leaves of the arguments (None, numbers, strings) are
part of the signature, as dynamo's guards would make them; any other kind of leaf goes to
``torch.compile``. The packages are kept in the settings'
``precompile_dir`` under the key that ``funcppo.accel.precompile`` gives whole compiled
functions (without one, in a temporary folder of this process). A function that cannot be
traced or compiled this way (data-dependent control flow, outputs that are not tensors) is
compiled by ``torch.compile`` instead, with a warning.
"""

from __future__ import annotations

import base64
import os
import pickle
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optree
import torch
from torch import Tensor

from funcppo.accel.precompile import precompile_key
from funcppo.core.atomic import write_atomic

__all__ = ["AheadOfTime", "load_package"]

_SPEC_KEY = "funcppo_output_spec"
_PLAIN = (bool, int, float, str, type(None))


def _layout(leaves: list) -> tuple:
    """What a call must match: per tensor its dtype, shape, strides and device; other leaves
    by type and value."""
    return tuple(
        (x.dtype, x.shape, x.stride(), x.device) if isinstance(x, Tensor) else (type(x), x)
        for x in leaves
    )


class _Entry:
    """One compiled signature: the argument tree, the layout of its leaves, the C++ runner
    and the output tree."""

    def __init__(self, spec: Any, layout: tuple, runner: Any, out_spec: Any):
        self.spec, self.layout, self.runner, self.out_spec = spec, layout, runner, out_spec

    def __call__(self, leaves: list) -> Any:
        tensors = [x for x in leaves if isinstance(x, Tensor)]
        return optree.tree_unflatten(self.out_spec, self.runner.run(tensors))


def load_package(path: str | os.PathLike) -> tuple[Any, Any]:
    """``(runner, output spec)`` of a package written by ``AheadOfTime``."""
    runner = torch._C._aoti.AOTIModelPackageLoader(os.fspath(path), "model", True, 1, -1)
    out_spec = pickle.loads(base64.b64decode(runner.get_metadata()[_SPEC_KEY]))
    return runner, out_spec


class AheadOfTime:
    """``fn`` compiled ahead of time per argument signature (see the module); ``fallback()``
    gives the ``torch.compile`` form, used for every call once tracing or compiling fails."""

    def __init__(self, fn: Callable, name: str, settings: Any, fallback: Callable[[], Callable]):
        self._fn, self._name, self._settings = fn, name, settings
        self._make_fallback = fallback
        self._fallback: Callable | None = None
        self._entries: list[_Entry] = []
        self._temporary: tempfile.TemporaryDirectory | None = None

    def __call__(self, *args: Any) -> Any:
        if self._fallback is not None:
            return self._fallback(*args)
        leaves, spec = optree.tree_flatten(args, none_is_leaf=True)
        layout = _layout(leaves)
        for entry in self._entries:
            if entry.layout == layout and entry.spec == spec:
                return entry(leaves)
        entry = self._entry(args, leaves, spec, layout)
        if entry is None:
            self._fallback = self._make_fallback()
            return self._fallback(*args)
        self._entries.append(entry)
        return entry(leaves)

    def _folder(self) -> Path:
        if self._settings.precompile_dir is not None:
            return Path(self._settings.precompile_dir)
        if self._temporary is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="funcppo-aot-")
        return Path(self._temporary.name)

    def _entry(self, args: tuple, leaves: list, spec: Any, layout: tuple) -> _Entry | None:
        devices = {x.device.type for x in leaves if isinstance(x, Tensor)}
        if devices - {"cpu"}:
            warnings.warn(
                f"funcppo: {self._name} compiled by torch.compile: ahead-of-time code runs on "
                f"the CPU only here, got tensors on {sorted(devices - {'cpu'})}",
                stacklevel=3,
            )
            return None
        odd = {type(x).__name__ for x in leaves if not isinstance(x, (Tensor, *_PLAIN))}
        if odd:  # a value the trace would bake in and the key would not tell apart
            warnings.warn(
                f"funcppo: {self._name} compiled by torch.compile: arguments hold "
                f"{sorted(odd)}, neither tensors nor plain values",
                stacklevel=3,
            )
            return None
        s = self._settings
        context = repr((sorted(s.inductor_options), s.rewrites, "ahead of time"))
        key = precompile_key(self._fn, context, args)
        if key is None:
            return None
        folder = self._folder()
        path = folder / f"{self._name}-aot-{key}.pt2"
        if path.exists():
            try:
                runner, out_spec = load_package(path)
                return _Entry(spec, layout, runner, out_spec)
            except Exception:  # an unreadable or foreign file: compile again and replace it
                pass
        try:
            data = self._compile(leaves, spec)
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(path, lambda file: file.write(data))
            runner, out_spec = load_package(path)
        except Exception as error:
            warnings.warn(
                f"funcppo: {self._name} compiled by torch.compile, not ahead of time "
                f"({error!r:.300})",
                stacklevel=3,
            )
            return None
        return _Entry(spec, layout, runner, out_spec)

    def _compile(self, leaves: list, spec: Any) -> bytes:
        """The package's bytes: ``fn`` traced on these arguments and compiled by AOTInductor."""
        import torch._inductor
        from torch.fx.experimental.proxy_tensor import make_fx

        where = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]
        out_specs: list = []

        def flat_fn(*tensors: Tensor) -> list[Tensor]:
            filled = list(leaves)
            for i, x in zip(where, tensors, strict=True):
                filled[i] = x
            out, out_spec = optree.tree_flatten(self._fn(*optree.tree_unflatten(spec, filled)))
            if not all(isinstance(x, Tensor) for x in out):
                raise TypeError(f"{self._name}: outputs must be tensors, got {out_spec}")
            out_specs[:] = [out_spec]
            return out

        tensors = tuple(leaves[i] for i in where)
        graph = make_fx(flat_fn, tracing_mode="fake")(*tensors)
        program = torch.export.export(graph, tensors, strict=False)
        config = self._settings.inductor_config() | {
            "aot_inductor.metadata": {
                _SPEC_KEY: base64.b64encode(pickle.dumps(out_specs[0])).decode()
            }
        }
        with tempfile.TemporaryDirectory(prefix="funcppo-aot-") as scratch:
            package = os.path.join(scratch, "package.pt2")
            torch._inductor.aoti_compile_and_package(
                program, package_path=package, inductor_configs=config
            )
            return Path(package).read_bytes()
