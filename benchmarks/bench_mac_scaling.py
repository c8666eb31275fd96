"""Per-token forward cost of a MAC student vs a plain Llama of the same size, as the sequence grows.

MAC attention is segment-local (plus a constant-size memory per memory layer), so its time per token should
stay flat; a plain Llama's full causal attention grows linearly per token. Both models use SmolLM2-135M's
dimensions (hidden 576, 9 heads / 3 KV heads, MLP 1536, vocab 49152, RoPE theta 1e5, tied embeddings) with
fewer layers, random weights (timing does not depend on them), batch 1, bf16 autocast on CPU, inference mode.
Timed: the transformer stack (`model.model`, i.e. embeddings, layers and final norm; the LM head's cost per
token is the same for both models and is left out, as in the distillation trainer that applies it in chunks).

    .venv/bin/python benchmarks/bench_mac_scaling.py              # 1K..8K tokens, ~2-4 minutes on 2 cores
    .venv/bin/python benchmarks/bench_mac_scaling.py --lengths 1024,2048 --repeats 2
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from titans_distil.models.configuration_mac_llama import MACLlamaConfig  # noqa: E402
from titans_distil.models.modeling_mac_llama import MACLlamaForCausalLM  # noqa: E402

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--lengths", default="1024,2048,4096,8192", help="comma-separated sequence lengths")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of both models")
    parser.add_argument("--memory-layers", default="2,6", help="comma-separated MAC memory layer indices")
    parser.add_argument("--segment-len", type=int, default=256)
    parser.add_argument("--persistent", type=int, default=16, help="persistent tokens per memory layer")
    parser.add_argument("--chunk", type=int, default=64, help="memory chunk size")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per length and model (median reported)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or this process's CPU time (robust when other processes share the cores; "
        "meaningful with --threads 1)",
    )
    parser.add_argument("--no-llama", action="store_true", help="time the MAC student only")
    return parser.parse_args(argv)


@torch.inference_mode()
def run_once(model, ids) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one forward of the transformer stack."""
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.model(input_ids=ids, use_cache=False)
    return time.perf_counter() - wall, time.process_time() - cpu


def per_token_ms(models: dict, length: int, repeats: int) -> dict:
    """{name: (wall, cpu)} median milliseconds per token of each model's `model.model` on one random sequence;
    the models' runs alternate so that load from other processes hits them alike."""
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (1, length))
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(run_once(model, ids))
    return {
        name: tuple(statistics.median(run[i] for run in runs) / length * 1e3 for i in (0, 1))
        for name, runs in times.items()
    }


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [int(n) for n in args.lengths.split(",")]
    memory_layers = [int(i) for i in args.memory_layers.split(",") if i.strip()]
    common = dict(
        SMOLLM2_135M, num_hidden_layers=args.layers, max_position_embeddings=max(8192, max(lengths))
    )
    torch.manual_seed(0)
    mac = MACLlamaForCausalLM(
        MACLlamaConfig(
            **common,
            segment_len=args.segment_len,
            num_persistent_tokens=args.persistent,
            memory_layers=memory_layers,
            memory_chunk_size=args.chunk,
        )
    ).eval()
    llama = None if args.no_llama else LlamaForCausalLM(LlamaConfig(**common)).eval()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"MAC: {args.layers} layers, memory in {memory_layers}, segment {args.segment_len}, "
        f"{args.persistent} persistent tokens, chunk {args.chunk} | Llama: {args.layers} layers, full "
        "attention"
    )
    print(
        f"batch 1, bf16 autocast, {torch.get_num_threads()} threads, median of {args.repeats} "
        f"(load average {load:.1f})\n"
    )
    models = {"mac": mac} if llama is None else {"mac": mac, "llama": llama}
    for model in models.values():  # warm-up (allocator, kernels)
        run_once(model, torch.randint(0, SMOLLM2_135M["vocab_size"], (1, min(lengths))))
    clock = "cpu" if args.clock == "cpu" else "wall"
    print(f"{'tokens':>7} {'MAC ms/token':>13} {'Llama ms/token':>15} {'Llama/MAC':>10}   ({clock} time)")
    mac_times = []
    for length in lengths:
        ms = {
            name: pair[1 if clock == "cpu" else 0]
            for name, pair in per_token_ms(models, length, args.repeats).items()
        }
        mac_times.append(ms["mac"])
        if llama is None:
            print(f"{length:>7} {ms['mac']:>13.3f}", flush=True)
        else:
            print(
                f"{length:>7} {ms['mac']:>13.3f} {ms['llama']:>15.3f} {ms['llama'] / ms['mac']:>10.2f}",
                flush=True,
            )

    spread = max(mac_times) / min(mac_times)
    center = statistics.median(mac_times)
    deviation = max(abs(t - center) / center for t in mac_times)
    verdict = "flat" if deviation <= 0.20 else "NOT flat"
    print(
        f"\nMAC spread over lengths: max/min = {spread:.2f}, max deviation from the median = "
        f"{deviation * 100:.0f}% -> {verdict} (target: within ±20%)"
    )


if __name__ == "__main__":
    main()
