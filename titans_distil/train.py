"""The distillation loop: teacher and student over packed token blocks, through Accelerate.

One optimizer step = `grad_accum` micro-batches of `batch_size` blocks per process. Every process draws the
same global batch of block indices from a seeded, resumable sampler and keeps its own slice, so the data
order does not depend on the process count and a resumed run sees exactly the blocks it would have seen.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .data import LONG_RANGE_ROOM, BlockSampler, load_blocks, mix_long_range
from .errors import UserError
from .long_range import KINDS
from .losses import IGNORE_INDEX, DenseTeacher, distillation_loss
from .model_folder import (
    atomic_file,
    atomic_folder,
    check_output_path,
    check_run_config,
    kind_of,
    read_config,
    remove_stale_temporaries,
    save_with_model_code,
)
from .models.configuration_mac_llama import MACLlamaConfig
from .models.neural_memory import NeuralMemory
from .pairs import load_pairs, pairs_source
from .run_folder import CHECKPOINTS
from .student import CALIBRATION_BLOCKS, build_student, calibrate_memory, pick_layers, student_config
from .teacher import load_teacher, load_teacher_config
from .teacher_cache import TeacherCache

# The fresh memory parts start from scratch (the read-out gate nearly closed) while the backbone starts from
# the teacher's weights, so by default they learn this many times faster.
MEMORY_LR_FACTOR = 10.0
# Optimizer groups by role; "backbone" (the teacher-initialised rest) comes first and is always present.
GROUPS = ("backbone", "memory", "persistent", "gate")

# Fields that may differ when a run is resumed; every other field must match the run's config.json.
RESUMABLE_FIELDS = {
    "max_steps",
    "num_epochs",
    "eval_every",
    "eval_batches",
    "save_every",
    "tracker",
    "resume",
    "overwrite",
}
# Where the run folder is: not part of its identity (a moved or renamed run folder resumes where it is now).
LOCATION_FIELDS = {"output_dir", "run_name"}
# Fields whose values are paths: the same file spelled differently (relative, absolute) is the same value.
PATH_FIELDS = {"teacher", "data", "teacher_cache"}


@dataclass
class DistilConfig:
    teacher: str = "embedded"
    data: str = "stdlib"
    student_layers: str = "6"
    use_mac: bool = False
    segment_len: int = MACLlamaConfig.segment_len  # the MAC fields default to the model config's
    persistent_tokens: int = MACLlamaConfig.num_persistent_tokens
    memory_layers: str | None = None
    memory_chunk_size: int = MACLlamaConfig.memory_chunk_size
    memory_depth: int = MACLlamaConfig.memory_depth
    update_rule: str = MACLlamaConfig.update_rule
    max_length: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int | None = None
    num_epochs: float | None = None
    lr: float = 5e-4
    memory_lr: float | None = None  # None: MEMORY_LR_FACTOR x lr
    freeze_backbone_steps: int = 0
    long_range_rate: float = 0.0
    long_range_kinds: str = ",".join(KINDS)
    long_range_distance: int | None = None  # None: 2 x segment_len
    layer_loss_weight: float = 0.0
    layer_loss_target: str = "hidden"
    answer_loss_weight: float = 1.0
    warmup: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    alpha: float = 0.9
    loss: str = "kl"
    kd_chunk_size: int = 256
    precision: str = "auto"
    gradient_checkpointing: bool = False
    teacher_cache: str | None = None
    max_train_blocks: int | None = None
    validation_fraction: float = 0.05
    run_name: str = "student"
    output_dir: str = "runs"
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    tracker: str = "none"
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100

    def identity(self) -> dict:
        skip = RESUMABLE_FIELDS | LOCATION_FIELDS
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

    def mac_settings(self) -> dict | None:
        if not self.use_mac:
            return None
        settings = {
            "segment_len": self.segment_len,
            "num_persistent_tokens": self.persistent_tokens,
            "memory_chunk_size": self.memory_chunk_size,
            "memory_depth": self.memory_depth,
            "update_rule": self.update_rule,
        }
        if self.memory_layers is not None:
            try:
                settings["memory_layers"] = [int(i) for i in self.memory_layers.split(",") if i.strip()]
            except ValueError:
                raise UserError(
                    f"--memory-layers {self.memory_layers!r} is not a comma-separated list of student layer "
                    "indices (e.g. 1,4)"
                ) from None
        return settings

    def long_range(self) -> tuple[list[str], int]:
        """(kinds, distance) of the mixed long-range items; the default distance puts the question two MAC
        segments after the fact, beyond what segment-local attention sees."""
        kinds = [k.strip() for k in self.long_range_kinds.split(",") if k.strip()]
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise UserError(
                f"--long-range-kinds {self.long_range_kinds!r} names no or unknown kinds {unknown}; "
                f"pass a comma-separated subset of {','.join(KINDS)}"
            )
        distance = self.long_range_distance if self.long_range_distance is not None else 2 * self.segment_len
        return kinds, distance


def check_recipe(cfg: DistilConfig, has_memory: bool, pairs: bool = False) -> None:
    """Refuse recipe settings that are out of range or would silently do nothing (click lets nan through)."""
    if pairs and cfg.long_range_rate:
        raise UserError(
            "--long-range-rate rewrites packed text blocks, and --data holds input/output pairs; drop "
            "--long-range-rate or train on a text source"
        )
    if pairs and cfg.teacher_cache:
        raise UserError(
            "--teacher-cache holds targets of packed text blocks, and --data holds input/output pairs; drop "
            "--teacher-cache (pairs train with the live teacher)"
        )
    if cfg.memory_lr is not None and not (math.isfinite(cfg.memory_lr) and cfg.memory_lr > 0):
        example = MEMORY_LR_FACTOR * cfg.lr
        raise UserError(f"--memory-lr {cfg.memory_lr} is not positive; pass e.g. --memory-lr {example:g}")
    if not has_memory and (cfg.memory_lr is not None or cfg.freeze_backbone_steps):
        flag = "--freeze-backbone-steps" if cfg.freeze_backbone_steps else "--memory-lr"
        raise UserError(
            f"{flag} needs a student with memory (nothing else would train); add --use-mac or drop {flag}"
        )
    if cfg.freeze_backbone_steps < 0:
        raise UserError(
            f"--freeze-backbone-steps {cfg.freeze_backbone_steps} is negative; pass 0 (no freeze) or more"
        )
    if cfg.max_steps is not None and cfg.freeze_backbone_steps > cfg.max_steps:
        raise UserError(
            f"--freeze-backbone-steps {cfg.freeze_backbone_steps} exceeds --max-steps {cfg.max_steps}; "
            f"pass at most {cfg.max_steps}"
        )
    weight = cfg.layer_loss_weight
    if not (math.isfinite(weight) and weight >= 0):
        raise UserError(f"--layer-loss-weight {weight} is not a number >= 0; pass e.g. 0.1 (0: off)")
    if weight and cfg.teacher_cache:
        raise UserError(
            "--layer-loss-weight needs the teacher's hidden states, which a --teacher-cache does not hold; "
            "drop one of the two flags"
        )
    if cfg.layer_loss_target not in LAYER_LOSS_STAT:
        raise UserError(
            f"--layer-loss-target {cfg.layer_loss_target!r} is unknown; "
            f"pass one of {', '.join(LAYER_LOSS_STAT)}"
        )
    if cfg.layer_loss_target == "attention" and not has_memory:
        raise UserError(
            "--layer-loss-target attention pulls the memory layers' attention output; add --use-mac or pass "
            "--layer-loss-target hidden"
        )
    if cfg.layer_loss_target != "hidden" and not weight:
        raise UserError(
            f"--layer-loss-target {cfg.layer_loss_target} does nothing while --layer-loss-weight is 0; "
            "add e.g. --layer-loss-weight 1"
        )
    answer = cfg.answer_loss_weight
    if not (math.isfinite(answer) and answer > 0):
        raise UserError(f"--answer-loss-weight {answer} is not a number > 0; pass e.g. 10 (1: plain mean)")
    if answer != 1 and not cfg.long_range_rate:
        raise UserError(
            f"--answer-loss-weight {answer} weights the answers of long-range items, and --long-range-rate "
            "is 0; add e.g. --long-range-rate 0.5 or drop --answer-loss-weight"
        )
    rate = cfg.long_range_rate
    if not (math.isfinite(rate) and 0 <= rate <= 1):
        raise UserError(f"--long-range-rate {rate} is not a fraction in [0, 1]; pass e.g. 0.1 (0: no mixing)")
    _, distance = cfg.long_range()
    if rate and cfg.teacher_cache:
        raise UserError(
            "--long-range-rate rewrites training blocks, which the teacher targets stored in --teacher-cache "
            "would no longer match; drop one of the two flags"
        )
    if rate and distance < 0:
        raise UserError(f"--long-range-distance {distance} is negative; pass 0 or more")
    if rate and distance + LONG_RANGE_ROOM > cfg.max_length:
        raise UserError(
            f"--long-range-distance {distance} needs {distance + LONG_RANGE_ROOM} tokens per item (distance "
            f"+ {LONG_RANGE_ROOM}) but --max-length is {cfg.max_length}; pass a larger --max-length or a "
            "smaller --long-range-distance"
        )


def parameter_groups(student) -> dict[str, list[torch.nn.Parameter]]:
    """The student's parameters by role (GROUPS order, empty groups left out): each role gets its own lr."""
    memory = {id(p) for m in student.modules() if isinstance(m, NeuralMemory) for p in m.parameters()}
    groups: dict[str, list[torch.nn.Parameter]] = {name: [] for name in GROUPS}
    for name, param in student.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if id(param) in memory:
            groups["memory"].append(param)
        elif leaf == "persistent_tokens":
            groups["persistent"].append(param)
        elif leaf == "memory_gate":
            groups["gate"].append(param)
        else:
            groups["backbone"].append(param)
    return {name: params for name, params in groups.items() if params}


def cosine_with_warmup(warmup: int, total: int):
    """Linear warm-up then cosine decay to 0 (transformers' get_cosine_schedule_with_warmup factor)."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


def lr_factors(names, warmup: int, total: int, freeze_backbone_steps: int) -> list:
    """Per-group lr factors of the step. A frozen backbone has lr 0 (AdamW leaves it exactly unchanged), then
    its own warm-up and decay over the remaining steps, so it is not jolted at full lr. Pure functions of the
    step: a resumed scheduler recomputes them exactly."""
    memory = cosine_with_warmup(warmup, total)
    if not freeze_backbone_steps:
        return [memory for _ in names]
    later = cosine_with_warmup(warmup, total - freeze_backbone_steps)

    def backbone(step: int) -> float:
        return 0.0 if step < freeze_backbone_steps else later(step - freeze_backbone_steps)

    return [backbone if name == "backbone" else memory for name in names]


def resolve_precision(precision: str) -> str:
    """'auto' means bf16 where the hardware has it (CUDA with bf16, or a CPU with AVX-512 bf16 / AMX)."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    cpu_flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "bf16" if ("avx512_bf16" in cpu_flags or "amx_bf16" in cpu_flags) else "fp32"


def has_accelerator() -> bool:
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available()) or bool(xpu and xpu.is_available())


def _inherited(name: str) -> bool:
    """Whether the parent process (the launcher) had `name` in its environment when it started (Linux)."""
    try:
        environ = Path(f"/proc/{os.getppid()}/environ").read_bytes()
    except OSError:
        return False
    return any(entry.startswith(name.encode() + b"=") for entry in environ.split(b"\0"))


def _quiet_launcher_at_exit() -> None:
    """Accelerate's simple launcher answers a child's non-zero exit with a traceback of its own (unless `-q`),
    which would bury our one line. It exits quietly (status 143) on SIGTERM: send it one once our message is
    out, and only when the parent really is `accelerate launch` (read from Linux /proc), never any other
    parent. Our stderr is first pointed at the launcher's, so the message does not depend on its tee."""
    parent = os.getppid()
    try:
        argv = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    launcher = any(a.endswith(b"accelerate") for a in argv[:2]) and b"launch" in argv[:3]
    if launcher or b"accelerate.commands.launch" in argv[:3]:
        # The launcher tees our stderr through a pipe, and a SIGTERM can stop it between reading a chunk and
        # writing it: write to where the launcher's own stderr goes instead, so that nothing rides on the tee.
        with contextlib.suppress(OSError):
            target = os.open(f"/proc/{parent}/fd/2", os.O_WRONLY | os.O_APPEND)
            sys.stderr.flush()
            os.dup2(target, 2)
            os.close(target)

        def stop_launcher() -> None:
            sys.stderr.flush()
            with contextlib.suppress(OSError):
                os.kill(parent, signal.SIGTERM)

        atexit.register(stop_launcher)


def check_launch_environment() -> None:
    """Refuse Accelerate's simple launcher when it was asked for several processes but started one.

    `accelerate launch --num_processes N` (N > 1) without `--multi_gpu` on a host with fewer than N GPUs, or
    with `--cpu` and no MPI, runs the script once: it sets ACCELERATE_USE_CPU and MASTER_ADDR (the latter only
    for N > 1) but none of the variables that a real multi-process start sets (WORLD_SIZE, or MPI's sizes). A
    MASTER_ADDR the launcher inherited from the shell says nothing about N, so it is not taken as a request.
    """
    env = os.environ
    simple_launcher = "ACCELERATE_USE_CPU" in env
    asked_for_many = simple_launcher and "MASTER_ADDR" in env and not _inherited("MASTER_ADDR")
    started_many = any(
        k in env for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    )
    if not asked_for_many or started_many:
        return
    fix = (
        "use `accelerate launch --multi_gpu --num_processes N distil.py ...` or "
        "`torchrun --nproc_per_node N distil.py ...`, which run over gloo on CPU"
    )
    _quiet_launcher_at_exit()
    if env["ACCELERATE_USE_CPU"].lower() in ("true", "1"):
        raise UserError(
            "`accelerate launch --cpu --num_processes N` started a single process (Accelerate needs MPI for "
            f"that); {fix}"
        )
    raise UserError(
        "`accelerate launch --num_processes N` without --multi_gpu started a single process here (WORLD_SIZE "
        f"is unset: this host has fewer than N GPUs); {fix}"
    )


# --tracker NAME -> the package it needs (Accelerate silently drops a tracker it cannot import).
TRACKERS = ("tensorboard", "mlflow", "wandb")  # each also the name of the package it needs
# The MLFLOW_TRACKING_URI this module set for a run (mlflow.set_tracking_uri also exports it): not the user's.
_mlflow_uri_ours: str | None = None


def check_tracker(tracker: str) -> None:
    """--tracker NAME is known and its package installed; if not, one line naming the install."""
    if tracker == "none":
        return
    if tracker not in TRACKERS:
        raise UserError(f"--tracker {tracker} is not one of none, {', '.join(TRACKERS)}")
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    available = {
        "tensorboard": is_tensorboard_available,
        "mlflow": is_mlflow_available,
        "wandb": is_wandb_available,
    }
    if not available[tracker]():
        raise UserError(
            f"--tracker {tracker} needs the {tracker} package, which is not installed: "
            f"pip install {tracker} (or pass --tracker none)"
        )


def tracker_setup(tracker: str, run_dir: Path, run_name: str, is_main: bool) -> dict:
    """Keep a tracker's local files in the run folder, not the working directory; the init_kwargs to pass.

    mlflow: unless MLFLOW_TRACKING_URI is set, the runs go to `RUN/mlflow/mlflow.db` (sqlite) and their
    artifacts to `RUN/mlflow/artifacts` (MLflow's default is `mlflow.db` and `mlruns/` in the working
    directory). wandb: its files go to `RUN/wandb/`, the project is $WANDB_PROJECT or `titans-distil`, the
    W&B run is named after the run (WANDB_MODE=offline keeps it local). tensorboard already writes into RUN.
    """
    global _mlflow_uri_ours
    if tracker == "mlflow":
        given = os.environ.get("MLFLOW_TRACKING_URI")
        if given and given != _mlflow_uri_ours:
            return {}
        import mlflow

        folder = run_dir / "mlflow"
        if is_main:
            folder.mkdir(parents=True, exist_ok=True)
        _mlflow_uri_ours = f"sqlite:///{(folder / 'mlflow.db').resolve()}"
        mlflow.set_tracking_uri(_mlflow_uri_ours)
        return {"mlflow": {"logging_dir": str((folder / "artifacts").resolve())}}
    if tracker == "wandb":
        return {"wandb": {"dir": str(run_dir.resolve()), "name": run_name}}
    return {}


def tracker_teardown(tracker: str) -> None:
    """Undo tracker_setup's process-wide MLflow URI, so that the next run in this process picks its own."""
    global _mlflow_uri_ours
    if tracker == "mlflow" and _mlflow_uri_ours and os.environ.get("MLFLOW_TRACKING_URI") == _mlflow_uri_ours:
        import mlflow

        mlflow.set_tracking_uri(None)
        _mlflow_uri_ours = None


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _same_value(field: str, stored, given) -> bool:
    if stored == given:
        return True
    if field in PATH_FIELDS and isinstance(stored, str) and isinstance(given, str):
        a, b = Path(stored).expanduser(), Path(given).expanduser()
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    return False


def read_run_config(run_dir: Path) -> dict:
    if not (Path(run_dir) / "config.json").is_file():
        raise UserError(f"--resume: {run_dir} holds no run to resume; drop --resume to start it")
    return check_run_config(
        read_config(run_dir, fix="the run folder is damaged"), Path(run_dir) / "config.json"
    )


def resumed_config(output_dir: str, run_name: str, given: dict, explicit: set[str]) -> DistilConfig:
    """The config of `--resume`: the run's stored config, with the resumable fields the user set explicitly
    (`explicit`, values in `given`) changed. An explicit non-resumable flag whose value differs from the
    stored one is a one-line `UserError` naming the field and both values. The run is the folder where it is
    now: `output_dir` and `run_name` come from this command, never from the stored config."""
    run_dir = Path(output_dir) / run_name
    stored = read_run_config(run_dir)
    known = [f.name for f in dataclasses.fields(DistilConfig)]
    # A field the stored config lacks was added since the run started; it ran with the field's default.
    values = {**dataclasses.asdict(DistilConfig()), **{k: v for k, v in stored.items() if k in known}}
    for field in [k for k in known if k in explicit - RESUMABLE_FIELDS - LOCATION_FIELDS]:
        if not _same_value(field, values[field], given[field]):
            raise UserError(
                f"--resume: {run_dir} was started with a different config ({field}: run has "
                f"{values[field]!r}, {flag(field)} gives {given[field]!r}); drop {flag(field)} to keep the "
                "run's value, or choose a new --run-name"
            )
    if explicit & {"max_steps", "num_epochs"}:  # one of the two sets the length of the run
        values["max_steps"], values["num_epochs"] = given["max_steps"], given["num_epochs"]
    for field in explicit & (RESUMABLE_FIELDS - {"max_steps", "num_epochs"}):
        values[field] = given[field]
    values.update(output_dir=str(output_dir), run_name=run_name, resume=True)
    return DistilConfig(**values)


def prepare_run_dir(cfg: DistilConfig, is_main: bool) -> Path:
    """Refuse to clobber another run; on --resume insist the config is the same."""
    run_dir = Path(cfg.output_dir) / cfg.run_name
    config_file = run_dir / "config.json"
    if cfg.resume:
        if not config_file.is_file():
            raise UserError(f"--resume: {run_dir} holds no run to resume; drop --resume to start it")
        # A field the saved config lacks was added since the run started; it ran with the field's default
        # behaviour (a MAC run from before optimizer groups is caught when its optimizer state is loaded).
        saved = {**DistilConfig().identity(), **read_run_config(run_dir)}
        diff = {
            k: (saved.get(k), v) for k, v in cfg.identity().items() if not _same_value(k, saved.get(k), v)
        }
        if diff:
            shown = ", ".join(f"{k}: run has {a!r}, now {b!r}" for k, (a, b) in list(diff.items())[:3])
            raise UserError(
                f"--resume: {run_dir} was started with a different config ({shown}); use the same flags or "
                "a new --run-name"
            )
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not cfg.overwrite:
            raise UserError(
                f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                "or choose another --run-name"
            )
        if is_main:
            shutil.rmtree(run_dir)
    return run_dir


def resumed_metrics(path: Path, step: int, warn) -> list[str]:
    """The lines of `metrics.jsonl` logged at or before `step` (later steps run again). A torn last line (the
    run was killed while writing it) is dropped with a `warn`ing; a bad line before it is a one-line error."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    kept = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem = None if isinstance(record, dict) and isinstance(record.get("step"), int) else "no step"
        except json.JSONDecodeError as err:
            problem = f"{err.msg} at column {err.colno}"
        if problem is not None:
            if i == last:
                warn(
                    f"{path} line {i + 1} is torn ({problem}; the run was killed while writing it); "
                    "dropped it"
                )
                continue
            raise UserError(
                f"--resume: {path} line {i + 1} is not a metrics record ({problem}); "
                "fix or delete that line, then resume again"
            )
        if record["step"] <= step:
            kept.append(line)
    return kept


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


LAYER_LOSS_STAT = {"hidden": "layer_mse", "attention": "attention_mse"}


@contextlib.contextmanager
def layer_outputs(layers, indices, part: str = "hidden"):
    """Record, for each i in ``indices``, what ``layers[i]`` produced during the forward passes in the block.

    ``hidden``: the raw decoder-layer output (Hugging Face's ``hidden_states[i + 1]``, except that its last
    entry is the final-normed one, which would not match a student whose last layer is a middle teacher
    layer). ``attention``: what the attention sublayer adds to the residual stream (for a MAC layer the
    attention over persistent, retrieved and segment tokens plus the gated memory read-out), taken as the
    post-attention norm's input minus the layer's input, so Llama and MAC layers are read the same way."""
    captured, inputs, indices = {}, {}, list(indices)

    def recorder(index):
        def hook(module, args, output):
            captured[index] = output[0] if isinstance(output, tuple) else output

        return hook

    def input_recorder(index):
        def hook(module, args, kwargs):
            inputs[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    def attention_recorder(index):
        def hook(module, args):
            captured[index] = args[0] - inputs[index]

        return hook

    if part == "hidden":
        handles = [layers[i].register_forward_hook(recorder(i)) for i in indices]
    else:
        handles = [layers[i].register_forward_pre_hook(input_recorder(i), with_kwargs=True) for i in indices]
        for i in indices:
            norm = layers[i].post_attention_layernorm
            handles.append(norm.register_forward_pre_hook(attention_recorder(i)))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def layer_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, part: str) -> torch.Tensor:
    """``hidden``: plain MSE. ``attention``: MSE relative to the teacher output's mean square (1 = as far as
    zero), so layers of different scales weigh alike and a few massive channels do not dominate."""
    error = F.mse_loss(student_out.float(), teacher_out.float())
    return error if part == "hidden" else error / teacher_out.float().square().mean().clamp_min(1e-12)


class Distiller(torch.nn.Module):
    """Student + loss in one module, so DDP sees the whole student forward (including the chunked head)."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(
        self,
        input_ids,
        teacher_targets,
        *,
        kind,
        temperature,
        alpha,
        chunk_size,
        layer_targets=None,
        layer_part="hidden",
        layer_weight=0.0,
        position_weights=None,
    ):
        """(loss, kd, ce, stats). With ``layer_targets`` ({student layer: what its teacher layer produced,
        see `layer_outputs`}) the loss adds ``layer_weight`` x the layers' mean `layer_loss`, reported as
        ``stats[LAYER_LOSS_STAT[layer_part]]``; the other stats are the memory's. ``position_weights``
        (B, T - 1) weight the loss of each predicted position (see `next_token_labels` for weight 0)."""
        layers = self.student.model.layers
        with layer_outputs(layers, list(layer_targets or ()), layer_part) as captured:
            out = self.student.model(input_ids=input_ids)
        hidden = out.last_hidden_state[:, :-1].reshape(-1, out.last_hidden_state.shape[-1])
        labels = next_token_labels(input_ids, position_weights)
        loss, kd, ce = distillation_loss(
            hidden,
            self.student.lm_head.weight,
            labels,
            teacher_targets,
            kind=kind,
            temperature=temperature,
            alpha=alpha,
            chunk_size=chunk_size,
            weights=None if position_weights is None else position_weights.reshape(-1),
        )
        stats = dict(getattr(out, "memory_stats", None) or {})
        if layer_targets:
            errors = [layer_loss(captured[s], t, layer_part) for s, t in layer_targets.items()]
            mean_error = torch.stack(errors).mean()
            loss = loss + layer_weight * mean_error
            stats[LAYER_LOSS_STAT[layer_part]] = mean_error.detach()
        return loss, kd, ce, stats


def next_token_labels(input_ids: torch.Tensor, position_weights: torch.Tensor | None) -> torch.Tensor:
    """The flat next-token labels; a position of weight 0 (a pair's prompt or pad) gets IGNORE_INDEX, so it
    is out of KD and CE alike and the reported means and perplexities are over the positions that count."""
    labels = input_ids[:, 1:]
    if position_weights is not None:
        labels = labels.masked_fill(position_weights == 0, IGNORE_INDEX)
    return labels.reshape(-1)


def answer_weights(shape: tuple[int, int], items, weight: float) -> torch.Tensor | None:
    """Loss weights (n, length - 1) of the predicted positions: ``weight`` where the next token is the answer
    of a mixed long-range item, 1 elsewhere; None for weight 1 (the plain mean)."""
    if weight == 1:
        return None
    weights = torch.ones(shape[0], shape[1] - 1)
    for index, item in items:
        start, end = item.answer
        weights[index, start - 1 : end - 1] = weight  # position p predicts token p + 1
    return weights


def teacher_targets(teacher, input_ids: torch.Tensor) -> DenseTeacher:
    with torch.inference_mode():
        hidden = teacher.model(input_ids=input_ids).last_hidden_state[:, :-1]
    return DenseTeacher(hidden.reshape(-1, hidden.shape[-1]), teacher.lm_head.weight)


@torch.no_grad()
def perplexity(
    model,
    blocks: torch.Tensor,
    batch_size: int,
    accelerator: Accelerator,
    chunk_size: int,
    weights: torch.Tensor | None = None,
) -> float:
    """exp(mean next-token cross-entropy) over `blocks` (only the positions of non-zero `weights`, e.g. the
    outputs of pairs), computed with the chunked head (no full logits)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size].to(accelerator.device)
        labels = next_token_labels(ids, None if weights is None else weights[start : start + batch_size])
        with accelerator.autocast():
            hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
            _, _, ce = distillation_loss(
                hidden.reshape(-1, hidden.shape[-1]),
                model.lm_head.weight,
                labels.to(accelerator.device),
                None,
                alpha=0.0,
                chunk_size=chunk_size,
            )
        n = int((labels != IGNORE_INDEX).sum())
        total, count = total + ce.item() * n, count + n
    model.train(was_training)
    return math.exp(total / max(count, 1))


def _text_blocks(
    cfg: DistilConfig, tokenizer, accelerator: Accelerator, val_cap: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed (train, validation) blocks of a text --data; the main process tokenizes (and caches)
    first."""
    with accelerator.main_process_first():
        return tuple(
            load_blocks(
                cfg.data,
                tokenizer,
                cfg.max_length,
                split,
                seed=cfg.seed,
                validation_fraction=cfg.validation_fraction,
                max_blocks=cap,
            )
            for split, cap in (("train", cfg.max_train_blocks), ("validation", val_cap))
        )


def distil(cfg: DistilConfig) -> Path:
    """Run (or resume) a distillation; return the folder holding the final student."""
    precision = resolve_precision(cfg.precision)
    check_launch_environment()
    check_tracker(cfg.tracker)
    # Accelerate keeps its mixed-precision choice in a process-wide singleton: a second distil() in one
    # process (a notebook, the tests) with another precision would be refused. Reset that choice only; the
    # distributed state (PartialState: process group, ranks) is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        # cpu=True on hosts without an accelerator: Accelerate then joins torchrun's processes over gloo
        # (with cpu=False it would treat each of them as a lone single-process run).
        cpu=not has_accelerator(),
        mixed_precision="no" if precision == "fp32" else precision,
        log_with=None if cfg.tracker == "none" else cfg.tracker,
        project_dir=cfg.output_dir,
    )
    is_main = accelerator.is_main_process
    # Validate everything cheap before touching the run folder.
    check_output_path(cfg.output_dir, "--output-dir", container=True)  # a file, read-only: before any work
    teacher_config = load_teacher_config(cfg.teacher)
    if cfg.max_length > teacher_config.max_position_embeddings:
        raise UserError(
            f"--max-length {cfg.max_length} exceeds the teacher's {teacher_config.max_position_embeddings} "
            f"positions; pass --max-length {teacher_config.max_position_embeddings} or less"
        )
    layers = pick_layers(teacher_config.num_hidden_layers, cfg.student_layers)
    # invalid memory settings fail here, not later
    config = student_config(teacher_config, layers, cfg.mac_settings())
    pairs = pairs_source(cfg.data) is not None
    check_recipe(cfg, has_memory=bool(getattr(config, "memory_layers", None)), pairs=pairs)
    # student layer -> the teacher layer whose output it is pulled to (attention: the memory layers only)
    matched = config.memory_layers if cfg.layer_loss_target == "attention" else range(len(layers))
    layer_pairs = {s: layers[s] for s in matched}
    layer_stat = LAYER_LOSS_STAT[cfg.layer_loss_target]
    if cfg.teacher_cache and cfg.loss != "kl":
        raise UserError(
            f"--loss {cfg.loss} needs the full teacher distribution; a --teacher-cache holds only top-k "
            "logits, use --loss kl"
        )
    run_dir = prepare_run_dir(cfg, is_main)
    if is_main:  # leftovers of a run killed while it wrote a checkpoint, final/ or a metrics rewrite
        for folder in (run_dir, run_dir / CHECKPOINTS):
            remove_stale_temporaries(folder)
    accelerator.wait_for_everyone()

    set_seed(cfg.seed)
    teacher_dtype = (
        torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else torch.float32
    )
    teacher, tokenizer = load_teacher(cfg.teacher)  # fp32: the student starts from exact teacher weights
    if len(tokenizer) > teacher.config.vocab_size:
        raise UserError(
            f"the teacher's tokenizer has {len(tokenizer)} tokens but its embeddings only "
            f"{teacher.config.vocab_size}; use the tokenizer that belongs to this teacher"
        )
    val_weights = position_weights = None
    val_cap = cfg.eval_batches * cfg.batch_size * accelerator.num_processes
    if pairs:  # one example per block; the weights keep the loss on the outputs
        train = load_pairs(
            cfg.data,
            tokenizer,
            cfg.max_length,
            "train",
            validation_fraction=cfg.validation_fraction,
            max_blocks=cfg.max_train_blocks,
        )
        val = load_pairs(
            cfg.data, tokenizer, cfg.max_length, "validation", validation_fraction=cfg.validation_fraction
        )
        train_blocks, position_weights = train.blocks, train.weights
        val_blocks, val_weights = val.blocks[:val_cap], val.weights[:val_cap]
        accelerator.print(
            f"pairs: {len(train_blocks)} training and {len(val.blocks)} validation examples "
            f"({len(val_blocks)} evaluated), one per block padded to {cfg.max_length} tokens; longer ones "
            f"dropped: {train.dropped} of {train.examples} training, {val.dropped} of {val.examples} "
            "validation"
        )
    else:
        train_blocks, val_blocks = _text_blocks(cfg, tokenizer, accelerator, val_cap)
    calibration_blocks = train_blocks[
        :CALIBRATION_BLOCKS
    ]  # before mixing: the student's init ignores the mix
    if cfg.long_range_rate:
        kinds, distance = cfg.long_range()
        rate = cfg.long_range_rate
        train_blocks, items = mix_long_range(train_blocks, tokenizer, rate, kinds, distance, cfg.seed)
        accelerator.print(
            f"long-range items ({','.join(kinds)}, distance {distance}) in {len(items)} of "
            f"{len(train_blocks)} training blocks"
        )
        position_weights = answer_weights(train_blocks.shape, items, cfg.answer_loss_weight)
    cache = None
    if cfg.teacher_cache:
        cache = TeacherCache(cfg.teacher_cache)
        cache.check_compatible(cfg, tokenizer, len(train_blocks))
    student = build_student(teacher, layers, cfg.mac_settings())
    calibrate_memory(student, calibration_blocks)
    teacher.to(teacher_dtype)
    if cache is not None:
        del teacher  # the cache stands in for the teacher: it is never run
        teacher = None
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    student.train()

    global_batch = cfg.batch_size * accelerator.num_processes
    sampler = BlockSampler(len(train_blocks), global_batch, seed=cfg.seed)
    steps_per_epoch = max(len(sampler) // cfg.grad_accum, 1)
    total_steps = (
        cfg.max_steps if cfg.max_steps is not None else math.ceil((cfg.num_epochs or 1.0) * steps_per_epoch)
    )
    if cfg.freeze_backbone_steps > total_steps:
        raise UserError(
            f"--freeze-backbone-steps {cfg.freeze_backbone_steps} exceeds the run's {total_steps} steps; "
            f"pass at most {total_steps}"
        )

    distiller = Distiller(student)
    groups = parameter_groups(student)
    memory_lr = cfg.memory_lr if cfg.memory_lr is not None else MEMORY_LR_FACTOR * cfg.lr
    optimizer = torch.optim.AdamW(
        [
            {"params": params, "lr": cfg.lr if name == "backbone" else memory_lr, "name": name}
            for name, params in groups.items()
        ],
        weight_decay=cfg.weight_decay,
    )
    factors = lr_factors(groups, cfg.warmup, total_steps, cfg.freeze_backbone_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    distiller, optimizer = accelerator.prepare(distiller, optimizer)
    if teacher is not None:
        teacher.to(accelerator.device)

    step, metrics_file = 0, run_dir / "metrics.jsonl"
    say = warn if is_main else (lambda message: None)
    if cfg.resume and (latest := ckpt.newest_readable_checkpoint(run_dir, warn=say)) is not None:
        state = ckpt.load_checkpoint(latest, accelerator.unwrap_model(distiller).student, optimizer)
        step = state["step"]
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        kept = resumed_metrics(metrics_file, step, say)  # every process: a bad line stops them all
        if is_main:  # forget metrics logged after the checkpoint (those steps run again) and any torn line
            with atomic_file(metrics_file) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept))
            # the stored config records the run as it now continues (length, logging, where it is)
            stored = read_run_config(run_dir)
            kept_fields = (RESUMABLE_FIELDS - {"resume", "overwrite"}) | LOCATION_FIELDS
            updated = {**stored, **{k: getattr(cfg, k) for k in kept_fields}}
            if updated != stored:
                with atomic_file(run_dir / "config.json") as tmp:
                    tmp.write_text(json.dumps(updated, indent=2))
        accelerator.print(f"resumed {run_dir} from {latest['folder'].name}")
    elif is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(
            json.dumps(
                {**dataclasses.asdict(cfg), "teacher_layers": layers, "precision_resolved": precision},
                indent=2,
            )
        )
        metrics_file.write_text("")
    if cfg.tracker != "none":
        init_kwargs = tracker_setup(cfg.tracker, run_dir, cfg.run_name, is_main)
        # the project: tensorboard's subfolder of --output-dir (= the run folder), mlflow's experiment name
        project = os.environ.get("WANDB_PROJECT", "titans-distil") if cfg.tracker == "wandb" else cfg.run_name
        accelerator.init_trackers(
            project,
            config={k: v for k, v in dataclasses.asdict(cfg).items() if v is not None},
            init_kwargs=init_kwargs,
        )

    def log(record: dict) -> None:
        if is_main:
            with open(metrics_file, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if cfg.tracker != "none":
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def evaluate() -> dict:
        unwrapped = accelerator.unwrap_model(distiller).student
        settings = (val_blocks, cfg.batch_size, accelerator, cfg.kd_chunk_size, val_weights)
        record = {"val_ppl": perplexity(unwrapped, *settings)}
        if not cfg.resume and step == 0 and teacher is not None:
            record["teacher_val_ppl"] = perplexity(teacher, *settings)
        return record

    if step == 0:
        log({"step": 0, **evaluate()})
    batches = sampler.forever()
    rank = accelerator.process_index
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc=f"distil {cfg.run_name}",
        unit="step",
        disable=not is_main,
        dynamic_ncols=True,
    )
    tokens_per_step = global_batch * cfg.grad_accum * cfg.max_length
    while step < total_steps:
        started = time.perf_counter()
        frozen = step < cfg.freeze_backbone_steps
        if (
            accelerator.num_processes == 1
        ):  # DDP needs a fixed set of trainable parameters: it only drops grads
            for param in groups.get("backbone", []):
                param.requires_grad_(not frozen)
        totals = {"loss": 0.0, "kd": 0.0, "ce": 0.0, **({layer_stat: 0.0} if cfg.layer_loss_weight else {})}
        stats_sum: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            indices = next(batches)
            mine = indices[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
            ids = train_blocks[mine].to(accelerator.device)
            weights = None if position_weights is None else position_weights[mine].to(accelerator.device)
            layer_targets = None
            if cfg.alpha == 0 and not cfg.layer_loss_weight:  # cross-entropy only: the teacher is not needed
                targets = None
            elif cache is not None:
                targets = cache.targets(mine, accelerator.device)
            else:
                pairs = layer_pairs if cfg.layer_loss_weight else {}
                with layer_outputs(teacher.model.layers, pairs.values(), cfg.layer_loss_target) as captured:
                    targets = teacher_targets(teacher, ids)
                if pairs:  # cloned: inference tensors cannot enter the student's graph
                    layer_targets = {s: captured[t].clone() for s, t in pairs.items()}
            sync = micro == cfg.grad_accum - 1
            with (
                accelerator.no_sync(distiller) if not sync else contextlib.nullcontext(),
                accelerator.autocast(),
            ):
                loss, kd, ce, stats = distiller(
                    ids,
                    targets,
                    kind=cfg.loss,
                    temperature=cfg.temperature,
                    alpha=cfg.alpha,
                    chunk_size=cfg.kd_chunk_size,
                    layer_targets=layer_targets,
                    layer_part=cfg.layer_loss_target,
                    layer_weight=cfg.layer_loss_weight,
                    position_weights=weights,
                )
                accelerator.backward(loss / cfg.grad_accum)
            losses = {"loss": loss, "kd": kd, "ce": ce}
            if layer_targets is not None:
                losses[layer_stat] = stats.pop(layer_stat)
            for key, value in losses.items():
                totals[key] += accelerator.reduce(value.detach(), "mean").item() / cfg.grad_accum
            for key, value in stats.items():
                stats_sum[key] = stats_sum.get(key, 0.0) + float(value) / cfg.grad_accum
        if frozen:  # a frozen backbone's gradients must not shrink the memory's share of the clipped norm
            for param in groups.get("backbone", []):
                param.grad = None
        grad_norm = accelerator.clip_grad_norm_(distiller.parameters(), cfg.max_grad_norm)
        lrs = dict(zip(groups, scheduler.get_last_lr(), strict=True))  # the lrs this step's update uses
        finite = math.isfinite(totals["loss"]) and math.isfinite(float(grad_norm))
        if finite:
            optimizer.step()
        else:  # one bad batch must not poison the weights: skip the update, keep the data position moving
            bar.write(f"step {step + 1}: non-finite loss or gradient, update skipped")
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.perf_counter() - started
        record = {
            "step": step,
            **{k: round(v, 6) for k, v in totals.items()},
            "lr": lrs["backbone"],
            **{f"lr_{name}": lr for name, lr in lrs.items() if name != "backbone"},
            "grad_norm": round(float(grad_norm), 4),
            **({} if finite else {"skipped": True}),
            "tokens_per_s": round(tokens_per_step / elapsed, 1),
            **{f"mem_{k}": round(v, 6) for k, v in stats_sum.items()},
        }
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == total_steps):
            record.update(evaluate())
        log(record)
        bar.set_postfix(
            {
                "loss": f"{totals['loss']:.3f}",
                "kd": f"{totals['kd']:.3f}",
                "tok/s": f"{record['tokens_per_s']:.0f}",
                **({"val_ppl": f"{record['val_ppl']:.2f}"} if "val_ppl" in record else {}),
                **({"surprise": f"{stats_sum['surprise_norm']:.3g}"} if "surprise_norm" in stats_sum else {}),
            }
        )
        bar.update(1)
        if cfg.save_every and (step % cfg.save_every == 0 or step == total_steps):
            accelerator.wait_for_everyone()
            if is_main:
                ckpt.save_checkpoint(
                    run_dir,
                    step,
                    accelerator.unwrap_model(distiller).student,
                    optimizer,
                    {
                        "scheduler": scheduler.state_dict(),
                        "sampler": sampler.state_dict(),
                        "total_steps": total_steps,
                    },
                )
    bar.close()

    final = run_dir / "final"
    accelerator.wait_for_everyone()
    if is_main:
        student = accelerator.unwrap_model(distiller).student
        with atomic_folder(final) as tmp:
            if kind_of(student.config) == "mac":  # a from_pretrained folder: auto_map and the model files
                save_with_model_code(student, tmp)
            else:
                student.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    accelerator.end_training()
    tracker_teardown(cfg.tracker)
    return final
