"""Does the Titans memory store? Storage and stability of `NeuralMemory` on real teacher hidden states.

Inputs are hidden states (output of layer ``--layer``, RMS-normalised as the MAC host feeds them) of the
embedded SmolLM2-135M teacher on the running interpreter's standard-library Python source; the memory is built
as a MAC layer builds it (``memory_from_config`` of a ``MACLlamaConfig`` at the teacher's width, D = 576), in
one run for the version-1 memory (C = 64, the settings before ``memory_version``) and the default version 2 (C
= 32, its input centre calibrated on 2048 tokens of files no measurement uses).
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
from models.modeling_mac_llama import memory_from_config  # noqa: E402
from models.neural_memory import unit_rms  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--layer", type=int, default=15, help="teacher layer whose output feeds the memory")
    p.add_argument("--long-tokens", type=int, default=16384, help="tokens of the NaN/inf check (d)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
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
        return unit_rms(torch.cat(out).float())


def stream_of(hs: HiddenStates, files: list[Path], n: int) -> tuple[torch.Tensor, int]:
    """n tokens of code hidden states, files concatenated (each file embedded alone); returns files used."""
    rows, used = [], 0
    while sum(r.shape[0] for r in rows) < n:
        rows.append(hs(hs.tokens(files[used])[:2048]))
        used += 1
    return torch.cat(rows)[:n], used


# the MAC memory before memory_version 2 (what checkpoints without memory_version still run)
VERSION_1 = dict(
    memory_version=1,
    memory_chunk_size=64,
    memory_max_lr=0.004,
    memory_max_grad_norm=1.0,
    memory_update_bound=None,
)


@torch.no_grad()
def written_ratio(memory, stream: torch.Tensor, written: torch.Tensor, fresh: torch.Tensor) -> float:
    """Error ratio after writing `stream` once (the unfinished chunk flushed, as a session's end does)."""
    _, state, _ = memory(stream[None], update_rule="surprise")
    state = memory.flush(state)
    return (
        memory.recall_error(state, written[None]).mean() / memory.recall_error(state, fresh[None]).mean()
    ).item()


def measure(memory, streams: dict, long: torch.Tensor) -> dict:
    out = {name: written_ratio(memory, *args) for name, args in streams.items()}
    finite, state = True, None
    with torch.no_grad():  # streamed in 1024-token pieces as a session would
        for s in range(0, long.shape[0], 1024):
            y, state, _ = memory(long[None, s : s + 1024], state, update_rule="surprise")
            finite &= bool(torch.isfinite(y).all()) and all(
                bool(torch.isfinite(w).all()) for w in state.weights
            )
    out[f"(d) finite over {long.shape[0]} tokens"] = finite
    x = torch.randn(1, 1024, memory.dim)
    with torch.no_grad():
        memory(x)
        t0 = time.perf_counter()
        memory(x)
        out["forward (1, 1024, D) s"] = time.perf_counter() - t0
    out["state per sequence per layer (MB)"] = sum(w.numel() * 4 * 2 for w in memory.initial_weights) / 2**20
    return out


def peer_seconds(cfg: MACLlamaConfig) -> float:
    import titans_pytorch

    peer = titans_pytorch.NeuralMemory(
        dim=cfg.hidden_size,
        chunk_size=cfg.memory_chunk_size,
        default_model_kwargs=dict(depth=cfg.memory_depth, expansion_factor=cfg.memory_expansion),
    )
    x = torch.randn(1, 1024, cfg.hidden_size)
    with torch.no_grad():
        peer(x)
        t0 = time.perf_counter()
        peer(x)
        return time.perf_counter() - t0


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    hs = HiddenStates(args.layer)
    files = stdlib_files(args.seed)

    # a pool of "other" rows: one random token from each of many other files (distinct snippets)
    code, used = stream_of(hs, files, 1024)
    pool = []
    for f in files[used : used + 64]:
        h = hs(hs.tokens(f)[:256])
        pool.append(h[torch.randperm(h.shape[0])[:24]])
    pool = torch.cat(pool)[torch.randperm(sum(p.shape[0] for p in pool))]
    fresh, others = pool[:512], pool[512:]
    long, used_long = stream_of(hs, files[used + 64 :], args.long_tokens)
    # calibration (version 2's input centre) on files no measurement uses
    calibration, _ = stream_of(hs, files[used + 64 + used_long :], 2048)

    needles = others[:8]
    stream = code.clone()
    stream[rng.sample(range(1024), 8)] = needles
    distinct = others[8:520]
    few = others[520:552]
    rounds = torch.cat([few[torch.randperm(32)] for _ in range(16)])
    streams = {
        "(a) 8 needles once in 1024 code tokens": (stream, needles, fresh),
        "(b) 512 distinct pairs once": (distinct, distinct, fresh),
        "(c) 32 pairs x 16": (rounds, few, fresh),
    }

    shape = dict(
        hidden_size=hs.model.config.hidden_size,
        num_hidden_layers=1,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
    )
    columns, peers = {}, {}
    for label, overrides in (("version 1", VERSION_1), ("version 2", {})):
        cfg = MACLlamaConfig(**shape, **overrides)
        torch.manual_seed(args.seed)
        memory = memory_from_config(cfg).eval()
        if memory.input_centre is not None:
            memory.calibrate_centre(calibration)
        columns[f"{label} (C={cfg.memory_chunk_size})"] = measure(memory, streams, long)
        if not args.no_peer:
            peers[label] = peer_seconds(cfg)
            columns[f"{label} (C={cfg.memory_chunk_size})"]["forward (1, 1024, D) s, titans-pytorch"] = peers[
                label
            ]

    print(
        f"teacher layer {args.layer} hidden states, D = {shape['hidden_size']}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}; error ratio = written / fresh (1.00: nothing stored)"
    )
    names = list(columns)
    print(f"| {'measure':<48} | " + " | ".join(f"{n:>20}" for n in names) + " |")
    print(f"|{'-' * 50}|" + "|".join("-" * 22 for _ in names) + "|")
    for row in columns[names[0]]:
        cells = []
        for n in names:
            value = columns[n][row]
            cells.append(f"{value!s:>20}" if isinstance(value, bool) else f"{value:>20.3f}")
        print(f"| {row:<48} | " + " | ".join(cells) + " |")
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
