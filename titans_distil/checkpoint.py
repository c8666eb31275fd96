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
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import UserError
from .model_folder import atomic_folder, remove_stale_temporaries
from .run_folder import step_dir, step_dirs


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


class UnreadableCheckpoint(UserError):
    """A checkpoint file is missing, truncated or corrupt (a resume may fall back to an older checkpoint)."""


def _read_optimizer(path: Path) -> tuple[dict[int, dict], list[dict]]:
    """(per-parameter state, param_groups) of `optimizer.safetensors`; `UnreadableCheckpoint` if damaged."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["optimizer"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        state: dict[int, dict] = {}
        for key, value in list(tensors.items()) + list(meta["scalars"].items()):
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        groups = meta["param_groups"]
    except Exception as err:  # safetensors' own errors, OSError, bad JSON, missing keys: a damaged file
        raise UnreadableCheckpoint(f"{path.name} is unreadable ({_first_line(err)})") from err
    return state, groups


def _load_optimizer(optimizer: torch.optim.Optimizer, path: Path, read=None) -> None:
    state, groups = read if read is not None else _read_optimizer(path)
    # Groups are named by role; a checkpoint from before the groups holds one unnamed group.
    saved = [group.get("name") for group in groups]
    current = [group.get("name") for group in optimizer.param_groups]
    if len(saved) != len(current) or any(name not in (None, now) for name, now in zip(saved, current)):
        raise UserError(
            f"checkpoint {path.parent} holds optimizer groups {saved} but this run has {current}; it was "
            "written by an older titans-distil: resume it with that version or start a new run"
        )
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


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
    """Write `checkpoints/step-N/` atomically and return its path (leftovers of killed saves are removed)."""
    final = step_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final.parent)
    with atomic_folder(final) as tmp:
        model.save_pretrained(tmp)
        tensors, meta = _optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"), metadata={"optimizer": json.dumps(meta)})
        (tmp / "trainer_state.json").write_text(
            json.dumps({"step": step, **trainer_state, "rng": rng_state()})
        )
        for path in tmp.iterdir():  # make the contents durable before the rename publishes them
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    return final


def read_checkpoint(checkpoint: Path) -> dict:
    """Everything a resume needs from a checkpoint folder, read into memory and checked for readability
    (nothing is applied yet): an `UnreadableCheckpoint` names the first missing, truncated or corrupt file."""
    checkpoint = Path(checkpoint)
    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        raise UnreadableCheckpoint("model.safetensors is missing")
    try:
        model_state = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise UnreadableCheckpoint(f"model.safetensors is unreadable ({_first_line(err)})") from err
    optimizer_path = checkpoint / "optimizer.safetensors"
    if not optimizer_path.is_file():
        raise UnreadableCheckpoint("optimizer.safetensors is missing")
    optimizer = _read_optimizer(optimizer_path)
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        missing = [key for key in ("step", "rng", "scheduler", "sampler") if key not in state]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as err:
        raise UnreadableCheckpoint(f"trainer_state.json is unreadable ({_first_line(err)})") from err
    if missing:
        raise UnreadableCheckpoint(f"trainer_state.json lacks {missing}")
    return {"folder": checkpoint, "model": model_state, "optimizer": optimizer, "state": state}


def newest_readable_checkpoint(run_dir: Path, warn=print) -> dict | None:
    """`read_checkpoint` of the newest checkpoint that reads, with a one-line `warn` for each newer broken
    one; None when the run has no checkpoint; a one-line `UserError` when it has some but none reads."""
    found = [folder for _, folder in reversed(step_dirs(run_dir))]  # newest first
    broken = []
    for folder in found:
        try:
            return read_checkpoint(folder)
        except UnreadableCheckpoint as err:
            broken.append(f"{folder.name}: {err}")
            warn(f"checkpoint {folder} is damaged ({err}); trying the one before it")
    if found:
        raise UserError(
            f"--resume: no checkpoint of {run_dir} is readable ({'; '.join(broken[:2])}); "
            "start the run again with --overwrite, or restore a checkpoint folder"
        )
    return None


def load_model_weights(model, checkpoint: Path, state: dict | None = None) -> None:
    """Load `model.safetensors` into `model`; tied weights absent from the file are fine, anything else is
    not."""
    if state is None:
        path = Path(checkpoint) / "model.safetensors"
        if not path.is_file():
            raise UserError(
                f"checkpoint {checkpoint} has no model.safetensors; pass a folder written by distil.py"
            )
        try:
            state = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
            raise UserError(
                f"checkpoint weights {path} are unreadable ({err}); the file is truncated or corrupt, use "
                "another checkpoint"
            ) from err
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise UserError(
            f"checkpoint {checkpoint} does not fit this model (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {unexpected[:3]}); it belongs to another architecture or size"
        )


def load_checkpoint(checkpoint: Path | dict, model, optimizer) -> dict:
    """Restore model and optimizer from a checkpoint folder (or what `read_checkpoint` read from one); return
    the trainer state (RNG already restored)."""
    read = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    folder = read["folder"]
    load_model_weights(model, folder, read["model"])
    _load_optimizer(optimizer, folder / "optimizer.safetensors", read["optimizer"])
    set_rng_state(read["state"]["rng"])
    return read["state"]
