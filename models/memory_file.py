"""Memory files: the one safetensors format of the memories this project's models carry across processes (a
MAC model's per-stream Titans memory, `modeling_mac_llama.py`; the packaged wrapper's memory,
`modeling_memory_llama.py`).

This file travels inside exported and packaged checkpoints: it imports only torch, transformers and the
standard library (safetensors is reached through `transformers.modeling_utils`, which loads model weights with
it).

A memory file holds tensors `layers.<i>.<name>` per memory layer and string metadata: `format` (the kind and
version of the model code that wrote it), `fingerprint` (of the model that wrote it, `weights_fingerprint`)
and `memory_layers`. `read_memory_file` and `check_tensors` check, in order: the file exists, its safetensors
header is valid, its format is one the model reads, the fingerprint matches, and every tensor's name, dtype
and shape match what the model expects; each failure is a one-line ValueError that names the problem and the
fix. Nothing is ever unpickled. `write_memory_file` writes atomically: a temporary file in the target's folder
is renamed over the target, so an interrupted save never leaves a partial memory file (the old file, if any,
stays intact).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = [
    "FINGERPRINT_SAMPLES",
    "check_tensors",
    "read_memory_file",
    "weights_fingerprint",
    "write_memory_file",
]

FINGERPRINT_SAMPLES = 4096  # values sampled per weight tensor (evenly spaced, first and last included)

Shape = tuple  # of ints, or `range`s for a dimension that may take any value in the range (e.g. pending rows)


def weights_fingerprint(
    model: nn.Module,
    fields: dict | None = None,
    exclude: str | None = None,
    samples: int = FINGERPRINT_SAMPLES,
) -> str:
    """sha256 over `fields` (JSON, e.g. the config fields that decide the memory's layout) and, for every
    entry of `model.state_dict()` whose name does not contain `exclude`, its name, shape and a fixed sample of
    `samples` values as float32: cheap for any model size, and a memory file never meets another model."""
    digest = hashlib.sha256()
    if fields is not None:
        digest.update(json.dumps(fields, sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        if exclude and exclude in name:
            continue
        flat = tensor.detach().reshape(-1)
        count = flat.numel()
        steps = min(count, samples)
        idx = torch.arange(steps, dtype=torch.int64) * max(count - 1, 0) // max(steps - 1, 1)
        sample = flat[idx.to(flat.device)].float().cpu().numpy().tobytes() if count else b""
        digest.update(f"{name}|{tuple(tensor.shape)}|".encode())
        digest.update(sample)
    return digest.hexdigest()


def write_memory_file(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write `tensors` (moved to the CPU) and `metadata` to the safetensors file `path`, atomically: a
    temporary name in the same folder, then a rename; the temporary file is removed if anything fails."""
    from transformers.modeling_utils import safe_save_file

    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        safe_save_file(
            {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=metadata
        )
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_memory_file(
    path, fingerprints: dict[str, Callable[[], str]], fix: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the memory file `path`, after the file checks: it exists, is safetensors, has
    one of the formats in `fingerprints` (format -> this model's fingerprint for files of that format; the
    first one is the current format) and was written by this model (`fix` ends the fingerprint error)."""
    from transformers.modeling_utils import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"memory file {path} does not exist; give a file written by save_memory")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(
            f"{path} is not a safetensors memory file ({str(err).splitlines()[0]}); give a file "
            "written by save_memory"
        ) from None
    fmt = metadata.get("format")
    if fmt not in fingerprints:
        raise ValueError(
            f"{path} is not a memory file of this model type (format {fmt!r}, expected "
            f"{next(iter(fingerprints))!r})"
        )
    mine, theirs = fingerprints[fmt](), metadata.get("fingerprint", "")
    if theirs != mine:
        raise ValueError(
            f"{path} was saved from a different model (fingerprint {theirs[:16]}, this model has "
            f"{mine[:16]}); {fix}"
        )
    return tensors, metadata


def _fits(shape: tuple, expected: Shape) -> bool:
    return len(shape) == len(expected) and all(
        n in e if isinstance(e, range) else n == e for n, e in zip(shape, expected)
    )


def _show(expected: Shape) -> str:
    parts = [f"n < {e.stop}" if isinstance(e, range) else str(e) for e in expected]
    return f"({', '.join(parts)}{',' if len(parts) == 1 else ''})"


def check_tensors(
    path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    layout: dict[str, tuple[Shape, torch.dtype]],
    memory_layers: Iterable[int],
    optional: Iterable[str] = (),
    note: str = "",
) -> None:
    """Check the names, dtypes and shapes of a file's tensors against `layout` (name -> (shape, dtype); names
    in `optional` may be missing); `memory_layers` are this model's, `note` is added to shape errors."""
    path, optional = os.fspath(path), set(optional)
    for key, (shape, dtype) in layout.items():
        if key not in tensors:
            if key in optional:
                continue
            raise ValueError(
                f"{path} has no tensor {key}; it holds memory for layers "
                f"{metadata.get('memory_layers', '?')}, this model's memory layers are {list(memory_layers)}"
            )
        tensor = tensors[key]
        if tensor.dtype != dtype:
            raise ValueError(f"{path}: tensor {key} has dtype {tensor.dtype}, this model expects {dtype}")
        if not _fits(tuple(tensor.shape), shape):
            raise ValueError(
                f"{path}: tensor {key} has shape {tuple(tensor.shape)}, this model expects "
                f"{_show(shape)}{note}"
            )
    extra = sorted(set(tensors) - set(layout))
    if extra:
        raise ValueError(f"{path} holds tensors this model does not have: {', '.join(extra[:3])}")
