"""The one place that knows a model folder: its config, its kind, the class that loads it, the files an export
ships, and how a folder is written (atomically) and where it may go.

Kinds (one vocabulary across the project): ``"mac"`` (a `MACLlamaForCausalLM`, model_type ``mac_llama``),
``"memory"`` (a package_model.py wrapper, model_type ``memory_llama``) and ``"llama"`` (a plain Llama).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from . import models
from .errors import UserError

KIND_OF_MODEL_TYPE = {"mac_llama": "mac", "memory_llama": "memory", "llama": "llama"}
# The model files a trust_remote_code folder of each kind ships (they import only torch, transformers, stdlib).
SHIPPED_FILES = {
    "mac": ("configuration_mac_llama.py", "modeling_mac_llama.py", "neural_memory.py", "memory_file.py"),
    "memory": ("configuration_memory_llama.py", "modeling_memory_llama.py", "neural_memory.py", "memory_file.py"),
}
MODELS_DIR = Path(models.__file__).resolve().parent  # the installed titans_distil.models (root folder models/)


def config_errors() -> tuple[type[BaseException], ...]:
    """What building a config from bad values raises: plain Python errors and huggingface_hub's strict-dataclass
    validation (transformers validates some config fields through it)."""
    from huggingface_hub.errors import StrictDataclassError

    return TypeError, ValueError, StrictDataclassError


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def read_config(folder: str | os.PathLike, fix: str = "pass an intact model folder") -> dict:
    """`folder/config.json` as a dict; an unreadable or malformed file is a one-line `UserError` ending in `fix`
    (the caller has already checked that the file exists, with its own wording of what to pass)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({first_line(err)}); {fix}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not valid JSON (a {type(config).__name__}, not an object); {fix}")
    return config


def kind_of(config: dict) -> str | None:
    """"mac", "memory" or "llama" from a config dict (or object); None for any other model type."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return KIND_OF_MODEL_TYPE.get(model_type)


def is_remote(folder: str | os.PathLike, config: dict) -> bool:
    """A self-contained trust_remote_code folder: `auto_map` for the model and its shipped files beside it."""
    files = SHIPPED_FILES.get(kind_of(config), ())
    return "AutoModelForCausalLM" in (config.get("auto_map") or {}) and all((Path(folder) / f).is_file() for f in files)


def load_model(folder: str | os.PathLike, config: dict | None = None, **kwargs):
    """`from_pretrained` with the right class: the folder's own code when it ships it, the project's MAC class for
    a MAC folder without `auto_map` (a run's checkpoint or `final/`), stock transformers otherwise."""
    from transformers import AutoModelForCausalLM

    config = read_config(folder) if config is None else config
    if kind_of(config) == "mac" and "AutoModelForCausalLM" not in (config.get("auto_map") or {}):
        from .models.modeling_mac_llama import MACLlamaForCausalLM

        return MACLlamaForCausalLM.from_pretrained(folder, **kwargs)
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=bool(config.get("auto_map")), **kwargs)


def save_with_model_code(model, out, **save_kwargs) -> None:
    """`save_pretrained` that also copies the model's code files and writes `auto_map` (a trust_remote_code folder).

    transformers does that only for classes registered for an auto class; the registration is undone afterwards so
    later plain saves of the same classes stay plain. A class loaded as remote code is registered already.
    """
    config_class, model_class = type(model.config), type(model)
    if model_class._auto_class is not None:
        model.save_pretrained(out, **save_kwargs)
    else:
        before = (config_class._auto_class, model_class._auto_class)
        try:
            config_class.register_for_auto_class()
            model_class.register_for_auto_class("AutoModelForCausalLM")
            model.save_pretrained(out, **save_kwargs)
        finally:
            config_class._auto_class, model_class._auto_class = before
    config = read_config(out)
    missing = [name for name in SHIPPED_FILES[kind_of(config)] if not (Path(out) / name).is_file()]
    if missing or "AutoModelForCausalLM" not in (config.get("auto_map") or {}):
        raise RuntimeError(f"{out} is not self-contained (missing {missing}, auto_map {config.get('auto_map')}); "
                           "this is a bug, please report it")


def check_output(output: str | os.PathLike, overwrite: bool, protect: list[Path] = (), flag: str = "--output") -> Path:
    """Where a folder may be written: not a file, not a folder the command reads (or one holding it), and not a
    non-empty folder unless `overwrite`."""
    out = Path(output).expanduser()
    resolved = out.resolve()
    for path in protect:
        path = Path(path).resolve()
        if resolved == path or resolved in path.parents:
            raise UserError(f"{flag} {output} would replace {display(path)}, which this command reads; "
                            f"choose another {flag}")
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {output} is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{flag} {output} is not empty; pass --overwrite to replace it, or choose another {flag}")
    return out


def display(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    return str(path)


@contextlib.contextmanager
def atomic_folder(output: str | os.PathLike, keep_existing: bool = False):
    """Yield a temporary folder beside `output`; when the block succeeds it becomes `output` by a rename.

    An existing `output` is first renamed aside (never deleted before the new folder is in place) and removed
    after; with `keep_existing` an existing `output` wins instead (another process finished first). When the
    block fails the temporary folder is removed and `output` is untouched."""
    output = Path(output).expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        yield tmp
        if keep_existing and output.exists():
            return
        if output.is_dir() and not any(output.iterdir()):
            output.rmdir()
        old = None
        if output.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent)) / output.name
            os.replace(output, old)
        try:
            os.replace(tmp, output)
        except OSError:
            if old is not None:
                os.replace(old, output)
            raise
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
