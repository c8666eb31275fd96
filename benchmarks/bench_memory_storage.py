"""Does the Titans memory store? Storage and stability of `NeuralMemory` on real teacher hidden states.

Inputs are hidden states (output of layer ``--layer``, RMS-normalised as the MAC host feeds them) of the embedded
SmolLM2-135M teacher on the running interpreter's standard-library Python source; the memory is built as a MAC
layer builds it (``memory_from_config`` of a default ``MACLlamaConfig`` at the teacher's width, D = 576, C = 64).
A "pair" is one input row x: key k(x), value v(x); its error is ||M(k(x)) - v(x)||^2 with the FINAL memory.
Error ratio = mean error on written rows / mean error on fresh rows never written (1.00: nothing stored).

    (a) 8 needles (rows from 8 other files) written once at random places inside 1024 tokens of real code
    (b) 512 distinct rows (random positions of many files) written once
    (c) 32 rows written 16 times each (shuffled rounds, 512 tokens)
    (d) NaN/inf anywhere in read-outs or state over 16K tokens of code
    speed: forward (no grad) on (1, 1024, 576) vs titans-pytorch's NeuralMemory at equal width and chunk size

    python benchmarks/bench_memory_storage.py --threads 1
"""

from __future__ import annotations

import argparse
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from models.configuration_mac_llama import MACLlamaConfig  # noqa: E402
from models.modeling_mac_llama import _unit_rms, memory_from_config  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--layer", type=int, default=15, help="teacher layer whose output feeds the memory")
    p.add_argument("--long-tokens", type=int, default=16384, help="tokens of the NaN/inf check (d)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-peer", action="store_true", help="skip the titans-pytorch speed comparison")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def stdlib_files(seed: int) -> list[Path]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in lib.glob("*.py") if f.stat().st_size > 4000)
    random.Random(seed).shuffle(files)
    return files


class HiddenStates:
    """Output of one teacher layer (the layers above it are dropped), RMS-normalised, float32."""

    def __init__(self, layer: int):
        from transformers import AutoTokenizer, LlamaForCausalLM

        from titans_distil.teacher import embedded_teacher_dir

        folder = embedded_teacher_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.model.model.layers = self.model.model.layers[: layer + 1]
        self.captured = None
        self.model.model.layers[layer].register_forward_hook(lambda m, i, o: setattr(self, "captured", o))

    def tokens(self, path: Path) -> list[int]:
        return self.tokenizer(path.read_text(errors="replace"))["input_ids"]

    @torch.no_grad()
    def __call__(self, ids: list[int], piece: int = 1024) -> torch.Tensor:
        out = []
        for s in range(0, len(ids), piece):
            self.model.model(torch.tensor([ids[s : s + piece]]))
            h = self.captured[0] if isinstance(self.captured, tuple) else self.captured
            out.append(h[0])
        return _unit_rms(torch.cat(out).float())


def stream_of(hs: HiddenStates, files: list[Path], n: int) -> tuple[torch.Tensor, int]:
    """n tokens of code hidden states, files concatenated (each file embedded alone); returns files used."""
    rows, used = [], 0
    while sum(r.shape[0] for r in rows) < n:
        rows.append(hs(hs.tokens(files[used])[:2048]))
        used += 1
    return torch.cat(rows)[:n], used


@torch.no_grad()
def pair_error(memory, state, x: torch.Tensor) -> torch.Tensor:
    """||M(k(x)) - v(x)||^2 per row of x (N, D) with the state's fast weights (batch element 0)."""
    k = memory._keys(x[None])
    v = memory._linear(x[None], memory.to_values)
    out, _, _ = memory._mlp([w[:1] for w in state.weights], k)
    return (out - v).square().sum(-1)[0]


@torch.no_grad()
def written_ratio(memory, stream: torch.Tensor, written: torch.Tensor, fresh: torch.Tensor) -> float:
    _, state, _ = memory(stream[None], update_rule="surprise")
    return (pair_error(memory, state, written).mean() / pair_error(memory, state, fresh).mean()).item()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    hs = HiddenStates(args.layer)
    cfg = MACLlamaConfig(hidden_size=hs.model.config.hidden_size, num_hidden_layers=1, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536)
    memory = memory_from_config(cfg).eval()
    files = stdlib_files(args.seed)

    # a pool of "other" rows: one random token from each of many other files (distinct snippets)
    code, used = stream_of(hs, files, 1024)
    pool = []
    for f in files[used : used + 64]:
        h = hs(hs.tokens(f)[:256])
        pool.append(h[torch.randperm(h.shape[0])[:24]])
    pool = torch.cat(pool)[torch.randperm(sum(p.shape[0] for p in pool))]
    fresh = pool[:512]
    others = pool[512:]

    results = []
    # (a) 8 needles inside 1024 tokens of code
    needles = others[:8]
    stream = code.clone()
    places = rng.sample(range(1024), 8)
    stream[places] = needles
    results.append(("(a) 8 needles once in 1024 code tokens", written_ratio(memory, stream, needles, fresh)))
    # (b) 512 distinct rows once
    distinct = others[8:520]
    results.append(("(b) 512 distinct pairs once", written_ratio(memory, distinct, distinct, fresh)))
    # (c) 32 rows x 16
    few = others[520:552]
    rounds = torch.cat([few[torch.randperm(32)] for _ in range(16)])
    results.append(("(c) 32 pairs x 16", written_ratio(memory, rounds, few, fresh)))

    # (d) 16K tokens, streamed in 1024-token pieces as a session would
    long, _ = stream_of(hs, files[used + 64 :], args.long_tokens)
    finite, state = True, None
    with torch.no_grad():
        for s in range(0, long.shape[0], 1024):
            y, state, _ = memory(long[None, s : s + 1024], state, update_rule="surprise")
            finite &= bool(torch.isfinite(y).all()) and all(bool(torch.isfinite(w).all()) for w in state.weights)

    speed = {}
    x = torch.randn(1, 1024, cfg.hidden_size)
    impls = {"ours": memory}
    if not args.no_peer:
        import titans_pytorch

        impls["titans-pytorch"] = titans_pytorch.NeuralMemory(
            dim=cfg.hidden_size, chunk_size=cfg.memory_chunk_size,
            default_model_kwargs=dict(depth=cfg.memory_depth, expansion_factor=cfg.memory_expansion),
        )
    for name, m in impls.items():
        with torch.no_grad():
            m(x)
            t0 = time.perf_counter()
            m(x)
            speed[name] = time.perf_counter() - t0

    state_mb = sum(w.numel() * 4 * 2 for w in memory.initial_weights) / 2**20  # weights + momentum, fp32
    print(f"teacher layer {args.layer} hidden states, D = {cfg.hidden_size}, C = {cfg.memory_chunk_size}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'measure':<54} {'value':>10}")
    for name, r in results:
        print(f"{name + ' (error ratio)':<54} {r:>10.3f}")
    label = f"(d) finite over {long.shape[0]} tokens"
    print(f"{label:<54} {str(finite):>10}")
    print(f"{'state per sequence per layer (MB)':<54} {state_mb:>10.1f}")
    for name, t in speed.items():
        print(f"{'forward (1, 1024, D) s, ' + name:<54} {t:>10.3f}")
    if "titans-pytorch" in speed:
        print(f"{'speed-up ours / titans-pytorch':<54} {speed['titans-pytorch'] / speed['ours']:>9.1f}x")
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
