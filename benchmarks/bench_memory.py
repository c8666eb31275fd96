"""Benchmark our chunked Titans NeuralMemory against titans-pytorch's NeuralMemory (the dev extra pins 0.5.5).

Both run in one process at the same configuration (default: dim 384, chunk 64, memory MLP depth 2 with hidden
2*dim, input (2, 1024, 384), float32, CPU): an inference forward (write + read, no grad tracking) and a
training step (forward + backward of a scalar loss on the read-outs). Prints the median and min wall time over
the repeats after warm-up, tokens/s, peak RSS growth during each phase (Linux: /proc/self/clear_refs resets
the high-water mark) and the tokens/s ratio ours / peer (target: >= 10x).

Note: the peer's default memory model is depth 2 with expansion 4 plus a residual LayerNorm wrapper and
RMSNorms on its inputs; here it is configured with depth 2 / expansion 2 to match ours (--peer-expansion 4
times it at its own default), the rest left at its defaults. Close other CPU-heavy processes first: with 2
cores, OpenMP threads of two busy processes stall each other (use --threads 1 on a shared machine).

    python benchmarks/bench_memory.py --help
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

try:
    from titans_distil.models.neural_memory import NeuralMemory
except ImportError:  # plain checkout: the models folder is importable as `models`
    from models.neural_memory import NeuralMemory


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--depth", type=int, default=2, help="memory MLP depth (both implementations)")
    p.add_argument("--expansion", type=float, default=2.0, help="memory MLP hidden width / dim (both)")
    p.add_argument(
        "--peer-expansion",
        type=float,
        default=None,
        help="peer's memory MLP expansion (default: --expansion; titans-pytorch's own default is 4)",
    )
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--peer-repeats", type=int, default=None, help="repeats for the (slow) peer; default --repeats"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    p.add_argument(
        "--no-train", action="store_true", help="skip the training-step (forward+backward) timings"
    )
    p.add_argument("--no-peer", action="store_true", help="time only our implementation")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> int | None:
    """Reset the peak-RSS high-water mark; return the current RSS (kB) or None if unsupported."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_kb("VmRSS")


def measure(fn, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        fn()
    base = _reset_peak()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    peak = _status_kb("VmHWM") if base is not None else None
    return {
        "median": statistics.median(times),
        "min": min(times),
        "peak_mb": None if peak is None else max(0, peak - base) / 1024,
    }


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x = torch.randn(args.batch, args.seq_len, args.dim)
    tokens = args.batch * args.seq_len

    impls = {}
    ours = NeuralMemory(args.dim, depth=args.depth, expansion=args.expansion, chunk_size=args.chunk_size)
    impls["ours"] = (ours, lambda m, t: m(t)[0])
    peer_version = None
    if not args.no_peer:
        import importlib.metadata

        import titans_pytorch

        peer_version = importlib.metadata.version("titans-pytorch")
        peer_expansion = args.expansion if args.peer_expansion is None else args.peer_expansion
        peer = titans_pytorch.NeuralMemory(
            dim=args.dim,
            chunk_size=args.chunk_size,
            default_model_kwargs=dict(depth=args.depth, expansion_factor=peer_expansion),
        )
        impls["titans-pytorch"] = (peer, lambda m, t: m(t)[0])

    print(
        f"config: x {tuple(x.shape)} float32 | dim {args.dim} chunk {args.chunk_size} depth {args.depth} "
        f"expansion {args.expansion} | torch {torch.__version__} threads {torch.get_num_threads()}"
        + (f" | titans-pytorch {peer_version} (expansion {peer_expansion})" if peer_version else "")
    )
    rows = []
    for name, (model, call) in impls.items():
        reps = args.repeats if name == "ours" or args.peer_repeats is None else args.peer_repeats
        n_params = sum(p.numel() for p in model.parameters())

        def infer(model=model, call=call):
            with torch.no_grad():
                call(model, x)

        def train(model=model, call=call):
            model.zero_grad(set_to_none=True)
            call(model, x).square().mean().backward()

        rows.append((name, "forward (no grad)", n_params, measure(infer, args.warmup, reps)))
        if not args.no_train:
            rows.append((name, "train step (fwd+bwd)", n_params, measure(train, args.warmup, reps)))

    print(
        f"{'impl':<15} {'mode':<21} {'params':>9} {'median s':>9} {'min s':>8} {'tokens/s':>10} "
        f"{'peak RSS +MB':>13}"
    )
    for name, mode, n_params, r in rows:
        peak = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        print(
            f"{name:<15} {mode:<21} {n_params:>9,} {r['median']:>9.3f} {r['min']:>8.3f} "
            f"{tokens / r['median']:>10,.0f} {peak:>13}"
        )
    if not args.no_peer:
        for mode in ("forward (no grad)", "train step (fwd+bwd)"):
            t = {name: r["median"] for name, m, _, r in rows if m == mode}
            if len(t) == 2:
                ratio = t["titans-pytorch"] / t["ours"]
                verdict = "meets" if ratio >= 10 else "MISSES"
                print(f"speed-up ours / titans-pytorch, {mode}: {ratio:.1f}x ({verdict} the 10x target)")


if __name__ == "__main__":
    main()
