"""Where the compiled update's time goes: matmuls, generated kernels, the rest; and its compile.

The update-step benchmark's workload (``update_step.py``: observation 64, heads 3/5/4/6 with
masks, 8 envs x 128 steps, 4 epochs x 4 minibatches, MLP 2 x 128 or ``--lstm``), one seed,
the default compile scope. Inductor's kernel profiling (``cpp.enable_kernel_profile``) records
every generated kernel's calls, so ``torch.profiler`` sees, per update:

* the matmuls (``mm``/``addmm``/``bmm`` calls from the generated code);
* the generated kernels (``cpp_fused_*``);
* the rest of the compiled graphs: buffer allocation, other library calls, the scan's loop;
* everything outside the compiled graphs: input checks, the eager shuffle, dynamo's guards,
  Python.

The profiled build is compiled separately (the recording changes the generated code) and runs
under the profiler: its total is shown beside the plain build's median. With ``--cold``, the
plain build compiles into an empty inductor cache and the script prints the compile's phases
from dynamo's timers (they nest: each line includes the lines it calls).

    python benchmarks/update_breakdown.py [--lstm] [--threads 2] [--updates 20] [--cold]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch
import torch._inductor.config as inductor_config
from torch._dynamo.utils import compile_times
from torch.profiler import ProfilerActivity, profile

from funcppo.training.update import make_update_fn
from update_step import make_config, make_inputs, time_calls

MATMULS = ("aoti_torch_cpu_mm_out", "aoti_torch_cpu_addmm_out", "aoti_torch_cpu_bmm_out")
MATMULS += ("aten::mm", "aten::addmm", "aten::bmm")
# dynamo's timers for the compile's phases, outermost first.
PHASES = (
    ("_compile.compile_inner", "all of it"),
    ("bytecode_tracing", "dynamo: tracing the Python"),
    ("create_aot_dispatcher_function", "AOT autograd and everything below"),
    ("GraphLowering.run", "inductor: lowering"),
    ("Scheduler.__init__", "inductor: fusion"),
    ("GraphLowering.codegen", "inductor: code generation"),
    ("compile_file", "C++ compiler runs"),
    ("PyCodeCache.load_by_key_path", "loading the compiled modules"),
)


def breakdown(update, state, batch, count: int) -> dict[str, float]:
    """Milliseconds per update by category, from ``count`` profiled updates."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(count):
            update(state, batch)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    graphs = sum(e.cpu_time_total for e in events if e.key.startswith("## Call CompiledFxGraph"))
    matmuls = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    kernels = sum(e.self_cpu_time_total for e in events if "cpp_fused" in e.key)
    per_update = 1e-3 / count  # profiler times are in microseconds
    return {
        "total (profiled)": wall * 1e3 / count,
        "compiled graphs": graphs * per_update,
        "  matmuls": matmuls * per_update,
        "  generated kernels": kernels * per_update,
        "  the rest (allocation, other calls, loop)": (graphs - matmuls - kernels) * per_update,
        "outside the graphs (checks, shuffle, guards, Python)": wall * 1e3 / count
        - graphs * per_update,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lstm", action="store_true", help="the LSTM of 128, not the MLP")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--updates", type=int, default=20, help="timed and profiled updates")
    parser.add_argument("--cold", action="store_true", help="compile into an empty cache")
    args = parser.parse_args()
    # Removed when the script ends (or by its finaliser).
    cold = tempfile.TemporaryDirectory(prefix="inductor-cold-") if args.cold else None
    if cold is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cold.name
    torch.set_num_threads(args.threads)
    print(
        f"device: cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{'lstm' if args.lstm else 'mlp'}, default compile scope"
    )
    cpu = torch.device("cpu")
    config = make_config(args.lstm, True)
    state, batch = make_inputs(config, None, cpu)

    plain = make_update_fn(config)
    first, median = time_calls(plain, (state, batch), args.updates, cpu)
    print(f"first call (compile{', empty cache' if args.cold else ''}): {first:.1f} s")
    if args.cold:
        names, seconds = compile_times(repr="csv", aggregate=True)
        timers = dict(zip(names, seconds, strict=True))
        for key, label in PHASES:
            if key in timers:
                print(f"  {label:40s} {float(timers[key]):7.1f} s")

    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        profiled = make_update_fn(config)
        time_calls(profiled, (state, batch), 3, cpu)  # compiled, then warmed
    print(f"median update, not profiled: {median * 1e3:.1f} ms")
    for label, ms in breakdown(profiled, state, batch, args.updates).items():
        print(f"  {label:52s} {ms:7.2f} ms")


if __name__ == "__main__":
    main()
