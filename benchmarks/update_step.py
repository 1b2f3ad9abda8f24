"""Update-step benchmark: eager against compiled, vmapped seeds against a loop, MLP and LSTM.

Workload: observation 64; heads of sizes 3, 5, 4, 6 with random masks
(at least one valid action per row, the slot-like head conditioned on the op); 8 envs x 128
steps; 4 epochs x 4 minibatches; MLP 2 x 128 tanh, and the same with an LSTM of 128.

Everything compared runs in this one process, side by side; the script prints medians, ratios,
compile times and peak resident memory, and names the device.

    python benchmarks/update_step.py            # the full table
    python benchmarks/update_step.py --quick    # fewer repeats, no 32-seed rows
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

import optree
import torch

from funcppo.core import random as jr
from funcppo.core.config import PPOConfig
from funcppo.core.spec import ActionSpec
from funcppo.training.state import init_train_state
from funcppo.training.synthetic import synthetic_batch
from funcppo.training.update import make_update_fn

SPEC = ActionSpec(
    {"op": 3, "a": 5, "b": 4, "c": 6}, "op", [(), ("a",), ("a", "b", "c")], op_conditioned=("a",)
)
NUM_STEPS, NUM_ENVS = 128, 8


def make_config(recurrent: bool, compile_: bool) -> PPOConfig:
    return PPOConfig(
        obs_dim=64,
        spec=SPEC,
        torso_sizes=(128, 128),
        recurrent=recurrent,
        lstm_size=128,
        bptt_len=16,
        update_epochs=4,
        num_minibatches=4,
        target_kl=None,
        compile=compile_,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stack(trees):
    return optree.tree_map(lambda *xs: torch.stack(xs), *trees, none_is_leaf=False)


def make_inputs(config: PPOConfig, num_seeds: int | None, device: torch.device):
    keys = jr.split(jr.key(0, device), num_seeds or 1)
    if num_seeds is None:
        state = init_train_state(keys[0], config)
        return state, synthetic_batch(config, state.params, jr.key(1, device), NUM_STEPS, NUM_ENVS)
    states = init_train_state(keys, config)
    batches = [
        synthetic_batch(
            config,
            optree.tree_map(lambda x, i=i: x[i], states.params),
            jr.fold_in(jr.key(1, device), i),
            NUM_STEPS,
            NUM_ENVS,
        )
        for i in range(num_seeds)
    ]
    return states, stack(batches)


def time_calls(fn, args, repeats: int, device: torch.device) -> tuple[float, float]:
    """(first call seconds, median of ``repeats`` later calls)."""
    sync(device)
    start = time.perf_counter()
    fn(*args)
    sync(device)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args)
        optree.tree_map(lambda x: x.sum(), out[1])
        sync(device)
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def loop_over_seeds(update, num_seeds: int):
    def run(states, batches):
        outs = [
            update(
                optree.tree_map(lambda x, i=i: x[i], states),
                optree.tree_map(lambda x, i=i: x[i], batches, none_is_leaf=False),
            )
            for i in range(num_seeds)
        ]
        return stack([o[0] for o in outs]), stack([o[1] for o in outs])

    return run


def matmul_floor(repeats: int, device: torch.device) -> float:
    """Median seconds for the matmuls alone of one MLP update: 16 minibatch steps of 256 rows,
    each the 14 products policy_apply's forward and its backward run (first layers fused,
    heads fused, value), on random matrices. No other op, no framework: a floor for the
    compiled update on this device and thread count."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    rows, obs, width, heads = 256, 64, 128, sum(size for _, size in SPEC.heads)
    x, h, y = rand(rows, obs), rand(rows, width), rand(rows, 2 * width)
    w0, w1, wh, wv = rand(obs, 2 * width), rand(width, width), rand(width, heads), rand(width, 1)
    gh, gv, g1 = rand(rows, heads), rand(rows, 1), rand(rows, width)

    def update():
        for _ in range(16):
            x @ w0, h @ w1, h @ w1, h @ wh, h @ wv  # forward
            x.T @ y, h.T @ g1, h.T @ g1, h.T @ gh, h.T @ gv  # weight gradients
            g1 @ w1.T, g1 @ w1.T, gh @ wh.T, gv @ wv.T  # input gradients

    for _ in range(3):
        update()
    times = []
    for _ in range(max(repeats, 5)):
        sync(device)
        start = time.perf_counter()
        update()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats, seeds 1 and 8 only")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--whole",
        action="store_true",
        help="also compile the whole update as one graph (slow to compile)",
    )
    parser.add_argument("--skip-lstm", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1 is fastest for these sizes on CPU)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = 3 if args.quick else args.repeats
    seed_counts = (1, 8) if args.quick else (1, 8, 32)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"device: {device} ({name or platform.machine()}), torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    rows = []

    def record(label, first, median, baseline=None):
        ratio = "" if baseline is None else f"{baseline / median:6.2f}x"
        rows.append((label, first, median, ratio, peak_rss_mib()))
        print(
            f"{label:48s} first {first:8.2f} s  median {median * 1e3:9.1f} ms {ratio:>8s}"
            f"  peak RSS {rows[-1][4]:7.0f} MiB",
            flush=True,
        )

    floor = matmul_floor(repeats, device)
    print(f"{'mlp matmuls alone (floor)':48s} median {floor * 1e3:9.1f} ms", flush=True)
    rows.append(("mlp matmuls alone (floor)", 0.0, floor, "", peak_rss_mib()))
    for recurrent in (False, True):
        if recurrent and args.skip_lstm:
            continue
        kind = "lstm" if recurrent else "mlp"
        eager_cfg = make_config(recurrent, False)
        state, batch = make_inputs(eager_cfg, None, device)
        eager = make_update_fn(eager_cfg)
        _, eager_median = time_calls(eager, (state, batch), repeats, device)
        record(f"{kind} eager", 0.0, eager_median)
        compiled = make_update_fn(make_config(recurrent, True), compile_scope="minibatch")
        first, median = time_calls(compiled, (state, batch), repeats, device)
        record(f"{kind} compiled (minibatch scope)", first, median, eager_median)
        # The same steps as one scan: one compiled call per update instead of one per step.
        scanned = make_update_fn(make_config(recurrent, True), compile_scope="scan")
        first, s_median = time_calls(scanned, (state, batch), repeats, device)
        record(f"{kind} compiled (scan scope, the default; vs minibatch)", first, s_median, median)
        # The whole-update graph unrolls 16 minibatch steps; with the LSTM each also unrolls
        # bptt_len cells, which takes far longer to compile than the benchmark is worth.
        if args.whole and not recurrent:
            whole = make_update_fn(make_config(recurrent, True), compile_scope="update")
            first, median = time_calls(whole, (state, batch), repeats, device)
            record(f"{kind} compiled (whole-update scope)", first, median, eager_median)
        # The seed rows take the default scope, the scan; the loop over seeds calls the same
        # scope's single-seed update.
        for num_seeds in seed_counts:
            states, batches = make_inputs(eager_cfg, num_seeds, device)
            vmapped = make_update_fn(make_config(recurrent, True), num_seeds=num_seeds)
            first, v_median = time_calls(vmapped, (states, batches), repeats, device)
            loop = loop_over_seeds(scanned, num_seeds)
            _, l_median = time_calls(loop, (states, batches), max(1, repeats // 2), device)
            record(f"{kind} loop over {num_seeds} seeds (compiled)", 0.0, l_median)
            record(f"{kind} vmap {num_seeds} seeds (compiled)", first, v_median, l_median)

    print("\n| case | first call (s) | median (ms) | speed-up | peak RSS (MiB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, first, median, ratio, rss in rows:
        print(f"| {label} | {first:.1f} | {median * 1e3:.1f} | {ratio.strip()} | {rss:.0f} |")


if __name__ == "__main__":
    main()
