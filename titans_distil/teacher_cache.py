"""Offline distillation: run the teacher once, keep its top-k logits per position, train from them later.

Layout of a cache folder: `manifest.json` (what it was made from) and `shard-00000.safetensors`, ... each
holding `values` (blocks, positions, k) in bf16 and `indices` (blocks, positions, k) int32 for
`blocks_per_shard` consecutive training blocks. At k = 64 a 512-token block costs 512*64*6 bytes = 197 kB,
against 100 MB for its full fp32 logits.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .errors import UserError
from .losses import TopKTeacher
from .model_folder import atomic_folder

MANIFEST = "manifest.json"
MATCHING_FIELDS = ("data", "max_length", "seed", "validation_fraction", "max_train_blocks")


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(vocab.encode()).hexdigest()[:16]


def eta_line(done: int, total: int, seconds: float) -> str:
    """The estimate printed after the first batch: its speed and the time the whole cache will take."""
    rate = done / max(seconds, 1e-9)
    left = (total - done) / rate
    return (
        f"first batch: {done:,} positions in {seconds:.1f} s ({rate:,.0f} tokens/s); estimated "
        f"{_duration(left)} for the remaining {total - done:,}"
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@torch.inference_mode()
def write_teacher_cache(
    teacher,
    tokenizer,
    blocks: torch.Tensor,
    out_dir: Path,
    *,
    top_k: int,
    batch_size: int,
    blocks_per_shard: int,
    manifest: dict,
    device: torch.device | str = "cpu",
) -> Path:
    """Run the teacher over `blocks` and write the cache folder atomically (temp folder, then rename)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} is not empty; choose a new --output folder for the teacher cache")
    total = len(blocks) * (blocks.shape[1] - 1)
    tqdm.write(
        f"running the teacher over {len(blocks)} sequences x {blocks.shape[1]} tokens ({total:,} positions, "
        f"batches of {batch_size}); an estimate of the time follows the first batch",
        file=sys.stderr,
    )
    with atomic_folder(out_dir) as tmp:
        shards = []
        bar = tqdm(total=total, desc="teacher top-k", unit="tok", unit_scale=True)
        started = time.perf_counter()
        for shard_start in range(0, len(blocks), blocks_per_shard):
            values, indices = [], []
            for start in range(shard_start, min(shard_start + blocks_per_shard, len(blocks)), batch_size):
                ids = blocks[start : min(start + batch_size, shard_start + blocks_per_shard)].to(device)
                logits = teacher(input_ids=ids).logits[:, :-1].float()
                top = logits.topk(top_k, dim=-1)
                values.append(top.values.to(torch.bfloat16).cpu())
                indices.append(top.indices.to(torch.int32).cpu())
                if bar.n == 0:  # the first batch: the ETA before most of the work
                    bar.write(
                        eta_line(ids[:, 1:].numel(), total, time.perf_counter() - started), file=sys.stderr
                    )
                bar.update(ids[:, 1:].numel())
            name = f"shard-{len(shards):05d}.safetensors"
            save_file({"values": torch.cat(values), "indices": torch.cat(indices)}, str(tmp / name))
            shards.append(name)
        bar.close()
        record = {
            **manifest,
            "top_k": top_k,
            "n_blocks": len(blocks),
            "blocks_per_shard": blocks_per_shard,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "shards": shards,
        }
        (tmp / MANIFEST).write_text(json.dumps(record, indent=2))
    return out_dir


class TeacherCache:
    """Read access to a teacher cache: top-k targets for any set of training blocks."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise UserError(
                f"--teacher-cache {path} holds no {MANIFEST}; create one with `distil.py cache-teacher "
                f"--output {path}`"
            )
        self.manifest = json.loads(manifest.read_text())
        self._handles: dict[str, object] = {}

    def check_compatible(self, cfg, tokenizer, n_blocks: int) -> None:
        for field in MATCHING_FIELDS:
            if self.manifest.get(field) != getattr(cfg, field):
                raise UserError(
                    f"--teacher-cache {self.path} was made with {field}={self.manifest.get(field)!r}, this "
                    f"run uses {getattr(cfg, field)!r}; rebuild the cache or use the same flags"
                )
        if self.manifest["tokenizer"] != tokenizer_fingerprint(tokenizer):
            raise UserError(
                f"--teacher-cache {self.path} was made with another tokenizer than --teacher {cfg.teacher}; "
                "student and cache must share the teacher's vocabulary"
            )
        if self.manifest["n_blocks"] != n_blocks:
            raise UserError(
                f"--teacher-cache {self.path} covers {self.manifest['n_blocks']} blocks, the data now gives "
                f"{n_blocks}; rebuild the cache"
            )

    def _shard(self, index: int):
        name = self.manifest["shards"][index]
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.path / name), framework="pt")
        return self._handles[name]

    def targets(self, block_indices: list[int], device) -> TopKTeacher:
        per_shard = self.manifest["blocks_per_shard"]
        values, indices = [], []
        for block in block_indices:
            shard = self._shard(block // per_shard)
            row = block % per_shard
            values.append(shard.get_slice("values")[row : row + 1])
            indices.append(shard.get_slice("indices")[row : row + 1])
        values, indices = torch.cat(values), torch.cat(indices)
        return TopKTeacher(
            values.reshape(-1, values.shape[-1]).to(device), indices.reshape(-1, indices.shape[-1]).to(device)
        )
