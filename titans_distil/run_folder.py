"""The one place that knows a training run folder (written by distil.py): its `config.json` and
`metrics.jsonl`, its checkpoints `checkpoints/step-N/` (`step_dirs`, `step_dir`) and `final/`, which weights a
checkpoint name means (`resolve_checkpoint`), and the run's student config and tokenizer.

Every problem with the user's input is a `UserError` with a one-line message naming the fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .model_folder import check_run_config, display, kind_of, quiet_transformers, read_config
from .weights import INDEX_NAME, PICKLE_SUFFIXES, has_weights, make_config, weight_files

SCRIPTS = {"mac": "export_mac_model.py", "llama": "export_llama_model.py"}  # the exporter of each kind
CHECKPOINTS = "checkpoints"  # the run's checkpoint folders are CHECKPOINTS/step-N (N zero-padded to 6 digits)
STEP_NAME = re.compile(r"step-(\d+)")


# ------------------------------------------------------------------------------------------------ runs


@dataclass
class Run:
    """A training run folder written by distil.py."""

    dir: Path
    config: dict
    metrics: list[dict]

    @property
    def name(self) -> str:
        return self.config.get("run_name") or self.dir.name

    @property
    def kind(self) -> str:
        return "mac" if self.config.get("use_mac") else "llama"

    def model_config(self) -> dict:
        """The student's model config as the run saved it (final/ or its newest checkpoint)."""
        for folder in [self.dir / "final", *[p for _, p in reversed(step_dirs(self.dir))]]:
            path = folder / "config.json"
            if path.is_file():
                with contextlib.suppress(json.JSONDecodeError):
                    return json.loads(path.read_text())
        raise UserError(
            f"run {self.dir} has no saved student (no final/ and no checkpoints/step-N with a config.json); "
            "let it train until a checkpoint is saved"
        )


def load_run(run_dir: str | os.PathLike) -> Run:
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise UserError(
            f"run folder {run_dir} does not exist; pass a folder written by distil.py (runs/<run-name>)"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(
            f"{run_dir} holds no run (no config.json); pass a folder written by distil.py (runs/<run-name>)"
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(
            f"{config_file} is not valid JSON ({err.msg} at line {err.lineno}); the run folder is damaged"
        ) from None
    if not isinstance(config, dict) or "teacher" not in config:
        raise UserError(
            f"{config_file} is not a distil.py run config; pass a folder written by distil.py "
            "(runs/<run-name>)"
        )
    check_run_config(config, config_file)
    metrics_file = path / "metrics.jsonl"
    metrics = read_metrics(metrics_file)[0] if metrics_file.is_file() else []
    return Run(path, config, metrics)


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """The records of a metrics.jsonl, and how many torn lines were skipped (a killed run may leave the last
    one)."""
    records, torn = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            torn += 1
    return records, torn


def check_kind(run: Run, kind: str) -> None:
    """Refuse to export a run with the exporter of the other kind, naming the right one."""
    if run.kind == kind:
        return
    if kind == "mac":
        raise UserError(
            f"run {run.dir} trained a plain Llama student (no neural memory); export it with "
            f"{SCRIPTS['llama']}"
        )
    raise UserError(
        f"run {run.dir} trained a MAC student with neural memory, which a plain LlamaForCausalLM cannot "
        f"hold; export it with {SCRIPTS['mac']}"
    )


# ------------------------------------------------------------------------------------------------ checkpoints


def step_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the run's checkpoint of `step` is (or goes)."""
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


def step_dirs(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of the run's `checkpoints/step-N` folders, oldest first."""
    found = []
    for path in (Path(run_dir) / CHECKPOINTS).glob("step-*"):
        match = STEP_NAME.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


@dataclass
class Checkpoint:
    """Weights to export: one safetensors file or the shards of an index, plus the folder around them."""

    files: list[Path]
    folder: (
        Path | None
    )  # the folder holding config.json / trainer_state.json / generation_config.json, if any
    label: str  # how to name it to the user
    step: int | None = None

    @property
    def config(self) -> dict | None:
        if self.folder is not None and (self.folder / "config.json").is_file():
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads((self.folder / "config.json").read_text())
        return None


def resolve_checkpoint(run: Run, spec: str | os.PathLike = "latest") -> Checkpoint:
    """`spec`: 'latest' (the newest of checkpoints/step-N and final/), 'final', a step number, a checkpoint
    folder or a .safetensors file (absolute, relative to the working directory, or relative to the run)."""
    spec = str(spec)
    steps = step_dirs(run.dir)
    final = run.dir / "final"
    last_logged = max((r["step"] for r in run.metrics), default=None)

    def from_folder(folder: Path, step: int | None) -> Checkpoint:
        label = display(folder)
        if step is None and (folder / "trainer_state.json").is_file():
            with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
                step = int(json.loads((folder / "trainer_state.json").read_text())["step"])
        if step is None and folder.resolve() == final.resolve():
            step = last_logged
        return Checkpoint(weight_files(folder, label), folder, label, step)

    if spec == "latest":
        candidates = [(step, path) for step, path in steps if has_weights(path)]
        newest = candidates[-1][1] if candidates else None
        if has_weights(final) and (newest is None or _mtime(final) >= _mtime(newest)):
            return from_folder(final, None)
        if newest is None:
            raise UserError(
                f"run {run.dir} has no checkpoint yet; let it train until one is saved (every --save-every "
                "steps) or pass --checkpoint FILE"
            )
        return from_folder(newest, None)
    if spec == "final":
        if not final.is_dir():
            raise UserError(
                f"run {run.dir} has no final/ folder (training has not finished); pass --checkpoint latest "
                "or a step"
            )
        return from_folder(final, None)
    if re.fullmatch(r"(step-)?\d+", spec):
        number = int(spec.removeprefix("step-"))
        for step, path in steps:
            if step == number:
                return from_folder(path, step)
    for candidate in (Path(spec).expanduser(), run.dir / spec, run.dir / "checkpoints" / spec):
        if candidate.is_dir():
            return from_folder(candidate, None)
        if candidate.is_file():
            if candidate.suffix in PICKLE_SUFFIXES:
                raise UserError(
                    f"checkpoint {spec} is a pickle file; it is never unpickled here, pass a .safetensors "
                    "file"
                )
            if candidate.name == INDEX_NAME:
                return from_folder(candidate.parent, None)
            if candidate.suffix != ".safetensors":
                raise UserError(
                    f"checkpoint {spec} is neither a folder nor a .safetensors file; pass a checkpoint "
                    "folder, a .safetensors file, 'final' or 'latest'"
                )
            folder = candidate.parent if candidate.name == "model.safetensors" else None
            step = None
            if folder is not None and (folder / "trainer_state.json").is_file():
                with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
                    step = int(json.loads((folder / "trainer_state.json").read_text())["step"])
            return Checkpoint([candidate], folder, display(candidate), step)
    available = [p.name for _, p in steps] + (["final"] if final.is_dir() else [])
    hint = f" (this run has: {', '.join(available[-5:])})" if available else " (this run has none yet)"
    raise UserError(
        f"checkpoint {spec} not found{hint}; pass a checkpoint folder or .safetensors file, a step "
        "number, 'final' or 'latest'"
    )


def _mtime(folder: Path) -> float:
    path = folder / "model.safetensors"
    return (path if path.is_file() else folder / INDEX_NAME).stat().st_mtime


def run_tokenizer(run: Run):
    """The run's tokenizer: the copy in final/ if training finished, else the teacher's."""
    from transformers import AutoTokenizer

    final = run.dir / "final"
    if (final / "tokenizer_config.json").is_file():
        # a MAC final/config.json names its own code (auto_map): hand AutoTokenizer the project's config
        # instead, or it would ask whether to run that code just to learn the model type
        values = read_config(final) if (final / "config.json").is_file() else {}
        config = make_config(values, kind_of(values)) if kind_of(values) else None
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(final, **({"config": config} if config else {}))
    from .teacher import load_tokenizer

    try:
        return load_tokenizer(run.config["teacher"])
    except UserError:
        raise
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"cannot load the tokenizer of teacher {run.config['teacher']!r} ({first}); make the teacher "
            "available (or its HF cache), then export again"
        ) from None
