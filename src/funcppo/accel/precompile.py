"""Compiled functions kept on disk whole, so that a later process skips dynamo's tracing.

Inductor's and AOTAutograd's on-disk caches start after dynamo has traced a function's Python;
for funcppo's vmapped pieces that tracing was most of a warm start (about 16 of the 18 s to
the end of 8 CartPole seeds' first update: dynamo interprets vmap's and the pytrees' Python,
leaf by leaf). torch's AOT precompile (``torch.compile(...).aot_compile``, experimental in torch
2.13) saves the traced graph, its guards and the compiled code in one file; loading it took
the same first update to 2 s here (benchmarks/RESULTS.md).

Off unless the compile settings name a folder (``CompileSettings.precompile_dir``; the command
line names one by default: ``FUNCPPO_PRECOMPILE_DIR``, else a folder of inductor's cache,
``default_precompile_dir``). A file is found by a hash of everything the compiled code depends
on and its guards do not check: torch's and Python's versions, the CPU, the thread count, the
model of each GPU the arguments live on, funcppo's source, inductor's options, the function's
closure (walked: functions' code, their closures and the plain globals they name, configs,
tensors) and the arguments' structure, dtypes, shapes, devices, strides and aliasing. A closure
holding a value the walk does not know, or a function whose guards or closure cannot be saved,
is compiled as usual (with a warning in the latter case).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import getpass
import hashlib
import os
import re
import sys
import tempfile
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optree
import torch
import torch.utils._pytree as pytree

from funcppo.core.atomic import write_atomic

__all__ = [
    "PRECOMPILE_ENV",
    "Precompiled",
    "accelerator_models",
    "default_precompile_dir",
    "fingerprint",
    "precompile_key",
    "savable",
]

PRECOMPILE_ENV = "FUNCPPO_PRECOMPILE_DIR"


def default_precompile_dir() -> Path:
    """The folder of precompiled files of the command line and the agents:
    ``FUNCPPO_PRECOMPILE_DIR`` when set, else ``funcppo`` in inductor's cache folder
    (``TORCHINDUCTOR_CACHE_DIR`` or its default, worked out as inductor does without importing
    it: importing inductor loads dynamo, which ahead-of-time code never needs)."""
    chosen = os.environ.get(PRECOMPILE_ENV)
    if chosen:
        return Path(chosen)
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if cache is None:
        try:
            user = getpass.getuser()
        except (KeyError, ModuleNotFoundError, OSError):
            getuid = getattr(os, "getuid", None)
            user = f"uid_{getuid()}" if callable(getuid) else "unknown_user"
        user = re.sub(r'[\\/:*?"<>|]', "_", user)
        cache = os.path.join(tempfile.gettempdir(), "torchinductor_" + user)
    return Path(os.path.abspath(cache)) / "funcppo"


# Guards that torch 2.13 cannot write to a file (CheckFunctionManager's list): dropped from a
# precompiled function; what they check (classes, closures) is in the file's name instead.
UNSAVABLE_GUARDS = frozenset(
    {
        "DICT_VERSION",
        "NN_MODULE",
        "ID_MATCH",
        "FUNCTION_MATCH",
        "CLASS_MATCH",
        "MODULE_MATCH",
        "CLOSURE_MATCH",
        "WEAKREF_ALIVE",
        "BUILTIN_MATCH",
    }
)

_PLAIN = (int, float, bool, complex, str, bytes, type(None), type(Ellipsis))


def savable(entry: Any) -> bool:
    """Whether torch can write a guard (a ``guard_filter_fn`` entry) to a file."""
    kinds = (entry.guard_type, *(entry.derived_guard_types or ()))
    return not any(kind in UNSAVABLE_GUARDS for kind in kinds)


class _Unknown(Exception):
    pass


def fingerprint(obj: Any) -> str | None:
    """A hash of ``obj`` and everything reachable from it that a compiled graph could have
    read as a constant, or None when it holds a value of a kind the walk does not know."""
    digest = hashlib.sha256()
    try:
        _walk(obj, digest, {}, strict=True)
    except _Unknown:
        return None
    return digest.hexdigest()


def _put(digest, *parts) -> None:
    digest.update(repr(parts).encode())


def _walk(obj: Any, digest, seen: dict, strict: bool) -> None:
    if isinstance(obj, _PLAIN):
        _put(digest, type(obj).__name__, obj)
        return
    if id(obj) in seen:  # shared or cyclic; seen keeps obj alive so that ids stay unique
        _put(digest, "seen", seen[id(obj)][0])
        return
    seen[id(obj)] = (len(seen), obj)
    kind = type(obj)
    _put(digest, kind.__module__, kind.__qualname__)
    if isinstance(obj, torch.Tensor):
        x = obj.detach().cpu().contiguous()
        _put(digest, x.dtype, tuple(x.shape), str(obj.device), obj.requires_grad)
        digest.update(x.view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, (torch.dtype, torch.device, enum.Enum, optree.PyTreeSpec)):
        _put(digest, repr(obj))
    elif isinstance(obj, pytree.TreeSpec):
        _put(digest, str(obj))
    elif isinstance(obj, (tuple, list, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        for item in items:
            _walk(item, digest, seen, strict)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _walk(key, digest, seen, strict)
            _walk(value, digest, seen, strict)
    elif callable(getattr(obj, "compile_key", None)) and not isinstance(obj, type):
        _walk(obj.compile_key(), digest, seen, strict)  # PPOConfig: hyperparameter values left out
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            _walk(getattr(obj, field.name), digest, seen, strict)
    elif isinstance(obj, types.FunctionType):
        _function(obj, digest, seen)
    elif isinstance(obj, functools.partial):
        _walk((obj.func, obj.args, obj.keywords), digest, seen, strict)
    elif isinstance(obj, types.MethodType):
        _walk((obj.__func__, obj.__self__), digest, seen, strict)
    elif isinstance(obj, (type, types.ModuleType, types.BuiltinFunctionType)):
        _put(digest, getattr(obj, "__module__", None), getattr(obj, "__qualname__", obj.__name__))
    elif kind.__module__.startswith("torch") and " at 0x" not in repr(obj):
        _put(digest, repr(obj))  # torch's own objects (ops, ...), named: its version is keyed
    elif strict:  # an unknown kind, or one known only by its address: no key
        raise _Unknown(kind)


def _function(fn: types.FunctionType, digest, seen: dict) -> None:
    """A function's code, defaults and closure; and the globals its code names: plain values
    and funcppo's functions walked, torch's named (its version is in the key), others skipped."""
    code = fn.__code__
    _code(code, digest)
    _walk((fn.__defaults__, fn.__kwdefaults__), digest, seen, strict=True)
    for cell in fn.__closure__ or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            _put(digest, "empty cell")
            continue
        _walk(value, digest, seen, strict=True)
    for name in sorted(_global_names(code)):
        if name not in fn.__globals__:
            continue
        value = fn.__globals__[name]
        _put(digest, "global", name)
        if isinstance(value, types.FunctionType) and not value.__module__.startswith("funcppo"):
            _put(digest, value.__module__, value.__qualname__)
        else:
            _walk(value, digest, seen, strict=False)


def _code(code: types.CodeType, digest) -> None:
    _put(digest, code.co_name, code.co_code, code.co_names, code.co_varnames, code.co_freevars)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code(const, digest)
        else:
            _put(digest, const)


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


@functools.cache
def _source_hash() -> str:
    digest = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _signature(args: tuple) -> list:
    """The arguments' structure, and per tensor its dtype, shape, strides, device and the first
    earlier tensor it shares memory with (dynamo guards on aliasing)."""
    leaves, spec = optree.tree_flatten(args, none_is_leaf=True)
    owners: dict[int, int] = {}
    parts: list = [repr(spec)]
    for i, x in enumerate(leaves):
        if isinstance(x, torch.Tensor):
            ptr = x.untyped_storage().data_ptr()
            parts.append(
                (
                    x.dtype,
                    tuple(x.shape),
                    x.stride(),
                    str(x.device),
                    x.requires_grad,
                    owners.get(ptr, -1),
                )
            )
            owners.setdefault(ptr, i)
        else:
            parts.append((type(x).__qualname__, x if isinstance(x, _PLAIN) else None))
    return parts


def accelerator_models(args: tuple) -> tuple[tuple[str, str], ...]:
    """``(device type, model)`` of every non-CPU device that ``args`` live on: code that
    inductor generated for one GPU (its Triton kernels, tuned for its architecture) need not
    run on another of another model, and the guards check only the device's index."""
    found = set()
    for x in optree.tree_leaves(args, none_is_leaf=True):
        if isinstance(x, torch.Tensor) and x.device.type != "cpu":
            cuda = x.device.type == "cuda"
            found.add((x.device.type, torch.cuda.get_device_name(x.device) if cuda else ""))
    return tuple(sorted(found))


def precompile_key(
    fn: Callable, context: str, args: tuple, closure: str | None = None
) -> str | None:
    """The name of ``fn``'s compiled file for ``args`` (see the module), or None when its
    closure cannot be fingerprinted. ``context``: the settings that change the generated
    code; ``closure``: ``fingerprint(fn)`` when already known."""
    closure = fingerprint(fn) if closure is None else closure
    if not closure:
        return None
    parts = (
        "funcppo precompile 1",
        torch.__version__,
        sys.version,
        torch.backends.cpu.get_cpu_capability(),
        torch.get_num_threads(),
        _source_hash(),
        context,
        closure,
        _signature(args),
    )
    accelerators = accelerator_models(args)
    if accelerators:  # CPU-only arguments keep the key they had without this part
        parts += (accelerators,)
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


class Precompiled:
    """``torch.compile(fn, fullgraph=True, ...)`` whose compiled code, once made, is written to
    ``directory`` and read back by later processes; one file per argument signature.

    ``compiled`` is the ordinary compiled function: used when precompiling is off, when the
    closure cannot be fingerprinted, or when saving fails.
    """

    def __init__(
        self,
        fn: Callable,
        name: str,
        compiled: Callable,
        make_savable: Callable,
        context: str,
        directory: Path,
        load_options: dict[str, Any] | None = None,
    ):
        self._fn, self._name, self._compiled, self._directory = fn, name, compiled, directory
        # Inductor's config while a file is loaded: loading runs some of inductor's checks
        # again, and without the CPU's trusted instruction sets (``cpp.vec_isa_ok``) it proves
        # each in a fresh Python process: 1.3 s of a process that loads six files here.
        self._load_options = load_options or {}
        self._make_savable = make_savable  # () -> torch.compile(...) with savable guards only
        self._context = context  # settings that change the generated code
        self._entries: list = []
        self._closure: str | None = None
        self._plain = False

    def __call__(self, *args):
        for entry in self._entries:
            if entry.guard_check(*args):
                return entry.fn(*args)
        if self._plain:
            return self._compiled(*args)
        entry = self._entry(self._directory, args)
        if entry is None:
            self._plain = True
            return self._compiled(*args)
        self._entries.append(entry)
        return entry.fn(*args)

    def _key(self, args: tuple) -> str | None:
        if self._closure is None:
            self._closure = fingerprint(self._fn) or ""
        return precompile_key(self._fn, self._context, args, closure=self._closure)

    def _entry(self, directory: Path, args: tuple):
        key = self._key(args)
        if key is None:
            return None
        path = directory / f"{self._name}-{key}.pt2"
        if path.exists():
            try:
                entry = _load(path, self._load_options)
                if entry.guard_check(*args):
                    return entry
            except Exception:  # an unreadable or foreign file: compile again and replace it
                pass
        try:
            entry = self._make_savable().aot_compile((args, {}))
            directory.mkdir(parents=True, exist_ok=True)
            # The bytes save_compiled_function would write, written by write_atomic: torch's
            # own writer gives the file mode 0600 and leaves its temporary file behind when
            # interrupted.
            data = type(entry).serialize(entry).serialized_data
            write_atomic(path, lambda file: file.write(data))
        except Exception as error:
            warnings.warn(
                f"funcppo: {self._name} compiled as usual, not precompiled ({error!r:.200})",
                stacklevel=3,
            )
            return None
        return entry


def _load(path: Path, options: dict[str, Any]):
    import torch._inductor.config as inductor_config

    # torch 2.13 rebuilds the guards' sources on load, and one kind registers a guard with the
    # current trace as it is made: give it an empty trace context to register with.
    context = torch._guards.TracingContext(None)
    with (
        path.open("rb") as file,
        torch._guards.tracing(context),
        inductor_config.patch(options),
    ):
        return torch.compiler.load_compiled_function(file)
