"""Model weights on disk and the models that hold them: which files of a folder hold the weights, their
safetensors headers and tensors (never unpickled), whether they fit a model's shapes (`Fit`), the project's
model classes and configs, and a run's student built from its own config (`load_student`).

Every problem with the user's input is a `UserError` with a one-line message naming the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError, describe
from .model_folder import config_errors, display, kind_of

if TYPE_CHECKING:
    from .run_folder import Checkpoint, Run

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_NAME = "model.safetensors.index.json"
# Config fields that decide which weights exist and their shapes (plus the MAC behaviour fields): a checkpoint
# whose config.json differs from the run's in one of them belongs to another run.
ARCHITECTURE_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
    "memory_layers",
    "num_persistent_tokens",
    "memory_depth",
    "memory_expansion",
    "memory_dim",
    "segment_len",
    "memory_chunk_size",
)
# Keys of a saved config that describe where it came from rather than the model.
DROPPED_CONFIG_KEYS = (
    "architectures",
    "auto_map",
    "_name_or_path",
    "_model_name_or_path",
    "transformers_version",
    "model_type",
    "quantization_config",
    "_commit_hash",
)


# ----------------------------------------------------------------------------------------------- weight files


def weight_files(folder: Path, label: str) -> list[Path]:
    """The safetensors files holding a folder's weights (one file or an index's shards); pickles are
    refused."""
    single, index = folder / "model.safetensors", folder / INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        return index_shards(index, label)
    pickles = (
        sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    )
    if pickles:
        raise UserError(
            f"checkpoint {label} holds only pickle weights ({pickles[0]}); they are never unpickled here, "
            "convert them to safetensors"
        )
    raise UserError(
        f"checkpoint {label} has no model.safetensors; pass a checkpoint folder written by distil.py, a "
        ".safetensors file, 'final' or 'latest'"
    )


def index_shards(index: Path, label: str) -> list[Path]:
    """The shard files a `model.safetensors.index.json` names, all present."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(
            f"checkpoint {label}: {index.name} is not a valid safetensors index; the file is truncated or "
            "corrupt, use another checkpoint"
        ) from None
    shards = sorted({index.parent / name for name in weight_map.values()})
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise UserError(
            f"checkpoint {label} is incomplete: shard {missing[0]} named in {index.name} is missing; copy "
            "the whole folder"
        )
    return shards


def has_weights(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() or (folder / INDEX_NAME).is_file()


# ------------------------------------------------------------------------------------------------ reading


def read_headers(files: list[Path], label: str | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from safetensors headers only (no tensor data read)."""
    from safetensors import safe_open

    headers: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    sliced = handle.get_slice(name)
                    headers[name] = (sliced.get_dtype(), tuple(sliced.get_shape()))
        except Exception as err:  # safetensors raises its own error type for truncated/corrupt headers
            raise unreadable(path, label, err) from err
    return headers


def read_weights(files: list[Path], label: str | None = None) -> dict:
    """The tensors of a (possibly sharded) safetensors checkpoint."""
    from safetensors.torch import load_file

    state = {}
    for path in files:
        try:
            state.update(load_file(str(path)))
        except Exception as err:
            raise unreadable(path, label, err) from err
    return state


def unreadable(path: Path, label: str | None, err: Exception) -> UserError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    what = f"checkpoint {label}: weights {path.name}" if label else f"weights {display(path)}"
    return UserError(
        f"{what} are unreadable ({first}); the file is truncated or corrupt, use another checkpoint"
    )


@dataclass
class Fit:
    """How a set of weights fits a model: names the model lacks, names it has that the weights lack,
    shapes."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(
        default_factory=list
    )  # (name, model shape, weights shape)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 3) -> str:
        parts = []
        if self.missing:
            parts.append(
                f"missing {len(self.missing)} "
                f"({', '.join(self.missing[:limit])}{', ...' if len(self.missing) > limit else ''})"
            )
        if self.unexpected:
            parts.append(
                f"unexpected {len(self.unexpected)} "
                f"({', '.join(self.unexpected[:limit])}{', ...' if len(self.unexpected) > limit else ''})"
            )
        if self.mismatched:
            shown = ", ".join(f"{n} {list(a)} vs {list(b)}" for n, a, b in self.mismatched[:limit])
            parts.append(
                f"shape mismatch {len(self.mismatched)} "
                f"({shown}{', ...' if len(self.mismatched) > limit else ''})"
            )
        return "; ".join(parts) or "all weights fit"


def check_fit(model_shapes: dict[str, tuple], weight_shapes: dict[str, tuple], tied: bool) -> Fit:
    """Compare the parameter shapes a model expects with those a checkpoint holds (tied lm_head may be
    absent)."""
    fit = Fit()
    for name, shape in model_shapes.items():
        if name not in weight_shapes:
            if not (tied and name == "lm_head.weight"):
                fit.missing.append(name)
        elif tuple(weight_shapes[name]) != tuple(shape):
            fit.mismatched.append((name, tuple(shape), tuple(weight_shapes[name])))
    fit.unexpected = sorted(name for name in weight_shapes if name not in model_shapes)
    return fit


def model_classes(kind: str):
    """(config class, model class) of a kind, from the project's own model files."""
    if kind == "mac":
        from .models.configuration_mac_llama import MACLlamaConfig
        from .models.modeling_mac_llama import MACLlamaForCausalLM

        return MACLlamaConfig, MACLlamaForCausalLM
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaConfig, LlamaForCausalLM


def make_config(values: dict, kind: str):
    config_class, _ = model_classes(kind)
    clean = {k: v for k, v in values.items() if k not in DROPPED_CONFIG_KEYS}
    try:
        return config_class(**clean)
    except config_errors() as err:
        raise UserError(
            f"the model config is invalid for a {kind} student ({describe(err)}); pass a checkpoint written "
            "by distil.py"
        ) from None


def empty_model(config):
    """The model of `config` on the meta device: parameter names and shapes without allocating them."""
    import torch

    _, model_class = model_classes(kind_of(config))
    with torch.device("meta"):
        return model_class(config)


def model_shapes(config) -> dict[str, tuple]:
    return {name: tuple(t.shape) for name, t in empty_model(config).state_dict().items()}


def build_model(model_class, config, dtype):
    """`model_class(config)` with parameters in `dtype` the way `from_pretrained` builds it: under that
    default dtype, so buffers computed in float32 on purpose (rotary frequencies) stay float32. (`.to(dtype)`
    would round them too, and a bf16 model would then not match the same export loaded by transformers.)"""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    model.config.dtype = dtype
    return model


def _describe(config: dict) -> str:
    arch = "MACLlamaForCausalLM" if kind_of(config) == "mac" else "LlamaForCausalLM"
    return f"{arch}, {config.get('num_hidden_layers')} layers, hidden {config.get('hidden_size')}"


def load_student(run: Run, checkpoint: Checkpoint, dtype=None):
    """The run's student (built from the run's own config) holding the checkpoint's weights, in eval mode."""

    reference = run.model_config()
    if kind_of(reference) != run.kind:
        raise UserError(
            f"run {run.dir}: its saved student is a {_describe(reference)} but config.json says "
            f"use_mac={run.config.get('use_mac')}; the run folder is inconsistent"
        )
    own = checkpoint.config
    if own is not None:
        diffs = [
            f"{k} {own.get(k)!r} vs {reference.get(k)!r}"
            for k in ARCHITECTURE_FIELDS
            if own.get(k) != reference.get(k)
        ]
        if diffs:
            raise UserError(
                f"checkpoint {checkpoint.label} does not fit run {run.dir} ({', '.join(diffs[:3])}); it "
                "belongs to another architecture or size, pass a checkpoint of this run"
            )
    config = make_config(reference, run.kind)
    headers = read_headers(checkpoint.files, checkpoint.label)
    fit = check_fit(
        model_shapes(config), {n: s for n, (_, s) in headers.items()}, bool(config.tie_word_embeddings)
    )
    if not fit.ok:
        raise UserError(
            f"checkpoint {checkpoint.label} does not fit run {run.dir}'s {_describe(reference)} "
            f"({fit.summary()}); it belongs to another architecture or size, pass a checkpoint of this run"
        )
    state = read_weights(checkpoint.files, checkpoint.label)
    return instantiate(model_classes(run.kind)[1], config, state, dtype)


def instantiate(model_class, config, state: dict, dtype=None):
    """A model of `model_class` holding `state` (weights already checked to fit), in the stored or given
    dtype."""
    import torch

    stored = {t.dtype for t in state.values() if t.is_floating_point()}
    torch_dtype = dtype or (stored.pop() if len(stored) == 1 else torch.float32)
    model = build_model(model_class, config, torch_dtype)
    model.load_state_dict(
        {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()}, strict=False
    )
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
