"""Training checkpoints without pickle: weights and optimizer tensors in safetensors, the rest in JSON.

A checkpoint is a folder `checkpoints/step-000040/` holding `model.safetensors` + `config.json` (a loadable
Hugging Face folder), `optimizer.safetensors` and `trainer_state.json` (step, data position, scheduler, RNG).
It is written into a temporary sibling folder and renamed into place, so a run killed at any moment leaves
either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import UserError
from .model_folder import atomic_folder

STEP_DIR = re.compile(r"step-(\d+)")


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["optimizer"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    # Groups are named by role; a checkpoint from before the groups holds one unnamed group.
    saved = [group.get("name") for group in meta["param_groups"]]
    current = [group.get("name") for group in optimizer.param_groups]
    if len(saved) != len(current) or any(name not in (None, now) for name, now in zip(saved, current)):
        raise UserError(
            f"checkpoint {path.parent} holds optimizer groups {saved} but this run has {current}; it was "
            "written by an older titans-distil: resume it with that version or start a new run"
        )
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> dict:
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save_checkpoint(run_dir: Path, step: int, model, optimizer, trainer_state: dict) -> Path:
    """Write `checkpoints/step-N/` atomically and return its path."""
    parent = Path(run_dir) / "checkpoints"
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / f"step-{step:06d}"
    with atomic_folder(final) as tmp:
        model.save_pretrained(tmp)
        tensors, meta = _optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"), metadata={"optimizer": json.dumps(meta)})
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state, "rng": rng_state()}))
        for path in tmp.iterdir():  # make the contents durable before the rename publishes them
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    steps = [(int(m.group(1)), p) for p in (Path(run_dir) / "checkpoints").glob("step-*") if (m := STEP_DIR.fullmatch(p.name))]
    return max(steps)[1] if steps else None


def load_model_weights(model, checkpoint: Path) -> None:
    """Load `model.safetensors` into `model`; tied weights absent from the file are fine, anything else is not."""
    path = Path(checkpoint) / "model.safetensors"
    if not path.is_file():
        raise UserError(f"checkpoint {checkpoint} has no model.safetensors; pass a folder written by distil.py")
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise UserError(f"checkpoint weights {path} are unreadable ({err}); the file is truncated or corrupt, use another checkpoint") from err
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise UserError(f"checkpoint {checkpoint} does not fit this model (missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]}); it belongs to another architecture or size")


def load_checkpoint(checkpoint: Path, model, optimizer) -> dict:
    """Restore model and optimizer from a checkpoint folder; return the trainer state (RNG already restored)."""
    load_model_weights(model, checkpoint)
    _load_optimizer(optimizer, Path(checkpoint) / "optimizer.safetensors")
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    set_rng_state(state["rng"])
    return state
