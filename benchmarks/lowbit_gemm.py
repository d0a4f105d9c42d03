"""dsv4.numerics.gemm on V4-Flash's GEMM shapes, against the machine's read bandwidth and against the
dense path it replaces.

Decode (M = 1, 4, 16): a GEMM with few activation rows is bound by reading the weight, so the figure of merit
is checkpoint bytes read per second, as a percentage of the measured read bandwidth (the better of a
``torch.sum`` and a ``torch.dot`` over 1 GiB). Calls cycle through enough distinct copies of the weight
(``--rotate-gb``) that each reads it from memory, not from the last-level cache, as a real decode's weights
do; each call is timed on its own, and the table shows the best and the median call. Prefill (M = 2048):
GFLOP/s, against MKL's fp32 GEMM on the dense weight, best of ``--repeats``.

"dense" is what ``dsv4.model.linear.Linear`` computed before the compact weights: ``F.linear`` against a
cached fp32 copy of the dequantised weight (formats.quantized_linear without simulation), 4x the FP8 and 8x
the FP4 checkpoint bytes (2x for bf16) - its GB/s column still counts checkpoint bytes, so the two columns'
ratio is the time ratio.

    python benchmarks/lowbit_gemm.py                 # 2 threads, all shapes
    python benchmarks/lowbit_gemm.py --threads 1     # timed with thread CPU time: steady on a busy machine

With one thread the times are the calling thread's CPU time (time.thread_time), which other processes on a
shared machine do not inflate; with more, wall-clock time, in which a call whose second thread was not
scheduled costs a scheduler slice (milliseconds): on a busy machine read the best column.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dsv4.numerics import formats as Q
from dsv4.numerics import gemm, kernels

# (format, N, K): V4-Flash's FP8 projections, FP4 routed experts, bf16 head.
SHAPES = [
    ("fp8", 1024, 4096),
    ("fp8", 32768, 1024),
    ("fp8", 4096, 8192),
    ("fp8", 8192, 4096),
    ("fp4", 2048, 4096),
    ("fp4", 4096, 2048),
    ("bf16", 129280, 4096),
]
DECODE_M = (1, 4, 16)


def clock_for(threads: int) -> Callable[[], float]:
    return time.thread_time if threads == 1 else time.perf_counter


def best_time(fn: Callable[[], object], repeats: int, clock: Callable[[], float]) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = clock()
        fn()
        best = min(best, clock() - t)
    return best


def call_times(fn: Callable[..., object], args: list[tuple], repeats: int, clock: Callable[[], float]) -> list[float]:
    """Seconds of each call fn(*a), for every a in args, ``repeats`` times over, sorted."""
    times = []
    for _ in range(repeats):
        for a in args:
            t = clock()
            fn(*a)
            times.append(clock() - t)
    return sorted(times)


def read_bandwidth(threads: int, repeats: int) -> float:
    """Bytes/s of the better of a sum and a dot product over 1 GiB of fp32 (read-only, streaming)."""
    a = torch.ones(1 << 28)
    clock = clock_for(threads)
    best = min(best_time(a.sum, repeats, clock), best_time(functools.partial(torch.dot, a, a), repeats, clock))
    return a.numel() * 4 / best


def make_weight(fmt: str, n: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A random weight in checkpoint format with realistic scales."""
    if fmt == "fp8":
        return Q.quant_fp8_weight(torch.randn(n, k, generator=g) * 0.02)
    if fmt == "fp4":
        return Q.quant_fp4_weight(torch.randn(n, k, generator=g) * 0.02)
    return (torch.randn(n, k, generator=g) * 0.02).bfloat16(), None


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def dense_of(fmt: str, w: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    if fmt == "fp8":
        return Q.dequant_fp8_weight(w, s)
    if fmt == "fp4":
        return Q.dequant_fp4_weight(w, s)
    return w.float()


def ours(fmt: str, x: torch.Tensor, xs: torch.Tensor | None, w: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    if fmt == "fp8":
        return gemm.fp8_linear(x, xs, w, s)
    if fmt == "fp4":
        return gemm.fp4_linear(x, xs, w, s)
    return gemm.bf16_linear(x, w)


def activations(fmt: str, m: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FP8-quantised activations with their scales (the simulated modes), raw fp32 for the bf16 head."""
    x = torch.randn(m, k, generator=g)
    if fmt == "bf16":
        return x, None
    q, s = Q.act_quant(x, 128)
    return q.float(), s


def copies(budget_bytes: float, each: int) -> int:
    return max(1, int(budget_bytes // each))


def scaled(x: torch.Tensor, xs: torch.Tensor | None) -> torch.Tensor:
    """The activations the dense path multiplies: FP8 values times their block scales."""
    return x * xs.repeat_interleave(128, 1)[:, : x.shape[1]] if xs is not None else x


def decode_rows(fmt: str, n: int, k: int, args: argparse.Namespace, bw: float, g: torch.Generator) -> None:
    clock = clock_for(args.threads)
    w, s = make_weight(fmt, n, k, g)
    size = nbytes(w, s)
    weights = [(w, s)] + [(w.clone(), s) for _ in range(copies(args.rotate_gb * 1e9, size) - 1)]
    dense = []
    if not args.no_dense:
        d = dense_of(fmt, w, s)
        dense = [d] + [d.clone() for _ in range(copies(2 * args.rotate_gb * 1e9, nbytes(d)) - 1)]
    for m in DECODE_M:
        x, xs = activations(fmt, m, k, g)
        t = call_times(functools.partial(ours, fmt, x, xs), weights, args.repeats, clock)
        line = f"{fmt} {n}x{k}".ljust(20) + f"{m:>4}" + rates(size, t, bw)
        if dense:
            xd = scaled(x, xs)
            t_dense = call_times(functools.partial(F.linear, xd), [(d,) for d in dense], args.repeats, clock)
            line += rates(size, t_dense, bw) + f"{t_dense[0] / t[0]:>10.2f}x"
        print(line, flush=True)


def rates(size: int, times: list[float], bw: float) -> str:
    """Best and median call as GB/s, and the best as % of the read bandwidth."""
    best, median = size / times[0], size / times[len(times) // 2]
    return f"{best / 1e9:>8.2f}{median / 1e9:>8.2f}{100 * best / bw:>5.0f}%"


def prefill_row(fmt: str, n: int, k: int, args: argparse.Namespace, g: torch.Generator) -> None:
    clock = clock_for(args.threads)
    repeats = max(2, args.repeats // 2)
    w, s = make_weight(fmt, n, k, g)
    x, xs = activations(fmt, args.prefill_m, k, g)
    flop = 2 * args.prefill_m * n * k
    t_ours = best_time(functools.partial(ours, fmt, x, xs, w, s), repeats, clock)
    t_mkl = best_time(functools.partial(F.linear, scaled(x, xs), dense_of(fmt, w, s)), repeats, clock)
    name = f"{fmt} {n}x{k}".ljust(20)
    print(f"{name}{flop / t_ours / 1e9:>10.1f}{flop / t_mkl / 1e9:>10.1f}{t_mkl / t_ours:>10.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rotate-gb", type=float, default=1.0, help="checkpoint bytes cycled through per decode pass")
    ap.add_argument("--prefill-m", type=int, default=2048)
    ap.add_argument("--formats", default="fp8,fp4,bf16")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense fp32 baseline (it needs 4-8x memory)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(
        f"dsv4 low-bit GEMMs: kernel {kernels.kernel_isa()}, torch {torch.__version__}, {args.threads} thread(s), "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    bw = read_bandwidth(args.threads, args.repeats)
    print(f"read bandwidth (best of torch.sum, torch.dot over 1 GiB): {bw / 1e9:.2f} GB/s\n")
    shapes = [shape for shape in SHAPES if shape[0] in args.formats.split(",")]
    print("decode: checkpoint GB/s of the best and the median call, best as % of read bandwidth;")
    print("dense = F.linear on a cached fp32 weight; ratio = dense's best time / ours")
    head = f"{'best':>8}{'median':>8}{'%bw':>6}"
    print(f"{'':<24}{'ours':^22}{'dense':^22}")
    print(f"{'shape':<20}{'M':>4}{head}{head}{'ratio':>11}")
    for fmt, n, k in shapes:
        decode_rows(fmt, n, k, args, bw, g)
    print(f"\nprefill M={args.prefill_m}: GFLOP/s; MKL = fp32 F.linear on the dense weight")
    print(f"{'shape':<20}{'ours':>10}{'MKL':>10}{'ours/MKL':>10}")
    for fmt, n, k in shapes:
        # The head's rows are all alike: a 16384-row slice keeps its dense copy small.
        prefill_row(fmt, min(n, 16384) if fmt == "bf16" else n, k, args, g)


if __name__ == "__main__":
    main()
