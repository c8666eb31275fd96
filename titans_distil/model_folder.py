"""The one place that knows a model folder: its config, its kind, the class that loads it, the files an export
ships, and how a folder is written (atomically) and where it may go.

Kinds (one vocabulary across the project): ``"mac"`` (a `MACLlamaForCausalLM`, model_type ``mac_llama``),
``"memory"`` (a package_model.py wrapper, model_type ``memory_llama``) and ``"llama"`` (a plain Llama).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import click

from . import __version__, models
from .errors import UserError, describe, translated, write_error

KIND_OF_MODEL_TYPE = {"mac_llama": "mac", "memory_llama": "memory", "llama": "llama"}
# The model files a trust_remote_code folder of each kind ships (they import only torch, transformers,
# stdlib).
SHIPPED_FILES = {
    "mac": ("configuration_mac_llama.py", "modeling_mac_llama.py", "neural_memory.py", "memory_file.py"),
    "memory": (
        "configuration_memory_llama.py",
        "modeling_memory_llama.py",
        "neural_memory.py",
        "memory_file.py",
    ),
}
MODELS_DIR = (
    Path(models.__file__).resolve().parent
)  # the installed titans_distil.models (root folder models/)


def config_errors() -> tuple[type[BaseException], ...]:
    """What building a config from bad values raises: plain Python errors and huggingface_hub's
    strict-dataclass validation (transformers validates some config fields through it)."""
    from huggingface_hub.errors import StrictDataclassError

    return TypeError, ValueError, StrictDataclassError


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def read_config(folder: str | os.PathLike, fix: str = "pass an intact model folder") -> dict:
    """`folder/config.json` as a dict; an unreadable or malformed file is a one-line `UserError` ending in
    `fix` (the caller has already checked that the file exists, with its own wording of what to pass)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({first_line(err)}); {fix}") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not valid JSON (a {type(config).__name__}, not an object); {fix}")
    return config


def kind_of(config: dict) -> str | None:
    """ "mac", "memory" or "llama" from a config dict (or object); None for any other model type."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return KIND_OF_MODEL_TYPE.get(model_type)


def config_class(config: dict):
    """The class `from_pretrained` builds a config dict with: the project's own for MAC / memory folders,
    transformers' for a model type it knows; None for an unknown model type (the caller refuses it)."""
    kind = kind_of(config)
    if kind == "mac":
        from .models.configuration_mac_llama import MACLlamaConfig

        return MACLlamaConfig
    if kind == "memory":
        from .models.configuration_memory_llama import MemoryLlamaConfig

        return MemoryLlamaConfig
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    return (
        CONFIG_MAPPING[model_type] if isinstance(model_type, str) and model_type in CONFIG_MAPPING else None
    )


def check_config(
    folder: str | os.PathLike,
    config: dict | None = None,
    fix: str = "correct that field, or pass an intact model folder",
):
    """The config object of `folder`, built from config.json as `from_pretrained` builds it; a field of the
    wrong type or value is a one-line `UserError` naming the file and the field (None for an unknown model
    type)."""
    config = read_config(folder) if config is None else config
    cls = config_class(config)
    if cls is None:
        return None
    with translated(display(Path(folder) / "config.json"), fix, config_errors()):
        return cls.from_dict(dict(config))


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_NAME = "model.safetensors.index.json"


def convert_hint(folder: str | os.PathLike) -> str:
    return (
        f'convert them once, where you trust the file: python -c "from transformers import '
        f"AutoModelForCausalLM as M; M.from_pretrained('{folder}', use_safetensors=False)"
        f".save_pretrained('{folder}-safetensors')\", and pass {folder}-safetensors"
    )


def check_weights(folder: str | os.PathLike) -> list[Path]:
    """The safetensors weight files of a model folder, each with a readable header that covers the whole file.
    A folder with only pickle weights (never unpickled here), a truncated or corrupt file, or a shard missing
    from the index is a one-line `UserError`."""
    from safetensors import safe_open

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise UserError(
                f"{display(folder)} holds only pickle weights ({pickles[0]}), which are never unpickled "
                f"here: safetensors are needed; {convert_hint(display(folder))}"
            )
        raise UserError(f"{display(folder)} holds no weights (*.safetensors); pass a saved model folder")
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise UserError(
                f"{display(index)} is not a valid safetensors index; copy or export the folder again"
            ) from None
        missing = sorted(name for name in shards if not (folder / str(name)).is_file())
        if missing:
            raise UserError(
                f"{display(folder)} is incomplete: shard {missing[0]} named in {INDEX_NAME} is "
                "missing; copy or export the whole folder again"
            )
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as err:  # safetensors raises its own type for a truncated or corrupt header
            raise UserError(
                f"{display(file)} is unreadable ({describe(err)}); the file is truncated or corrupt, "
                "copy or export the folder again"
            ) from None
    return files


def check_model_folder(folder: str | os.PathLike, config: dict | None = None):
    """Everything cheap that `from_pretrained` would otherwise fail on with a traceback: the config's field
    types (`check_config`) and the weight files (`check_weights`). Returns the config object (or None)."""
    config = read_config(folder) if config is None else config
    built = check_config(folder, config)
    check_weights(folder)
    return built


# A model's embedding matrix may be larger than its tokenizer: vocabularies are padded up to a multiple of 64
# or 128 for fast matmuls. More rows than that padding, or fewer rows than tokens, means the folder holds
# another model's tokenizer: the ids it makes would index garbage rows, or past the matrix.
VOCAB_PADDING = 128


def check_tokenizer_fits(tokenizer, vocab_size: int, where: str) -> None:
    """Refuse a tokenizer that does not belong to a model with `vocab_size` embeddings: len(tokenizer) must be
    <= vocab_size, and vocab_size at most len(tokenizer) rounded up to a multiple of VOCAB_PADDING."""
    tokens = len(tokenizer)
    padded = -(-tokens // VOCAB_PADDING) * VOCAB_PADDING
    if tokens > vocab_size or vocab_size > padded:
        relation = "more tokens than" if tokens > vocab_size else "far fewer tokens than"
        raise UserError(
            f"{where}: the tokenizer has {tokens} tokens, {relation} the model's {vocab_size} "
            f"embeddings (at most a padding to a multiple of {VOCAB_PADDING} is allowed); it is another "
            "model's tokenizer: save the model's own tokenizer into the folder"
        )


_ANNOTATION_TYPES = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "None": (type(None),),
}


def check_run_config(config: dict, path: str | os.PathLike) -> dict:
    """A distil.py run config (runs/NAME/config.json) whose known fields have the types DistilConfig gives
    them; a wrong one (`"teacher": 5`) is a one-line `UserError` naming the file and the field."""
    import dataclasses

    from .train import DistilConfig

    for field in dataclasses.fields(DistilConfig):
        if field.name not in config:
            continue
        names = [part.strip() for part in str(field.type).split("|")]
        allowed = tuple(t for name in names for t in _ANNOTATION_TYPES.get(name, (object,)))
        value = config[field.name]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            wanted = " or ".join("null" if name == "None" else name for name in names)
            raise UserError(
                f"{display(Path(path))}: field {field.name!r} should be {wanted}, not "
                f"{json.dumps(value)}; the run folder is damaged, correct that field"
            )
    return config


TRUST_FLAG = "--trust-remote-code"
_ANNOUNCED: set[Path] = (
    set()
)  # folders whose "trusting" line was printed already (one line per folder and run)


def _auto_map_files(auto_map) -> set[str]:
    """The code files an `auto_map` names ("module.Class" -> module.py; tokenizers map to [slow, fast] pairs);
    a reference to another Hub repo ("owner/repo--module.Class") stays as written: it is never a shipped
    file."""
    refs = [] if not isinstance(auto_map, dict) else auto_map.values()
    names = set()
    for ref in refs:
        for one in ref if isinstance(ref, (list, tuple)) else [ref]:
            if isinstance(one, str) and one:
                names.add(one if "--" in one else one.rsplit(".", 1)[0] + ".py")
    return names


def remote_code_files(folder: str | os.PathLike, config: dict | None = None) -> list[str]:
    """The code `from_pretrained(..., trust_remote_code=True)` could run from `folder`: the files named by the
    `auto_map` of config.json and tokenizer_config.json, and every .py file in the folder. Empty without
    `auto_map`."""
    folder = Path(folder)
    config = read_config(folder) if config is None else config
    names = _auto_map_files(config.get("auto_map"))
    with contextlib.suppress(OSError, ValueError):  # an unreadable tokenizer config runs nothing either
        names |= _auto_map_files(
            json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("auto_map")
        )
    if not names:
        return []
    return sorted(names | {p.name for p in folder.glob("*.py")})


def trust_remote_code_for(
    folder: str | os.PathLike, allow: bool, config: dict | None = None, quiet: bool = False
) -> bool:
    """Whether loading `folder` may run the model code it carries (transformers' / vLLM's
    `trust_remote_code`).

    False for a folder without `auto_map` (nothing to run). True when the user passed --trust-remote-code
    (`allow`), or when the folder is a MAC / memory-wrapper folder whose code files are all byte-identical to
    the ones this titans-distil ships in `models/` (one "trusting" line on stderr per folder, unless `quiet`).
    Anything else is refused with a one-line `UserError` naming the flag. Every loader asks here."""
    folder = Path(folder)
    config = read_config(folder) if config is None else config
    files = remote_code_files(folder, config)
    if not files:
        return False
    if allow:
        return True
    shipped = SHIPPED_FILES.get(kind_of(config), ())
    if all(
        name in shipped
        and (folder / name).is_file()
        and (folder / name).read_bytes() == (MODELS_DIR / name).read_bytes()
        for name in files
    ):
        if not quiet and folder.resolve() not in _ANNOUNCED:
            _ANNOUNCED.add(folder.resolve())
            click.echo(
                f"note: trusting {display(folder)}: its model files are identical to titans-distil "
                f"{__version__}'s",
                err=True,
            )
        return True
    raise UserError(
        f"{display(folder)} carries its own model code ({', '.join(files)}) that differs from this "
        f"titans-distil's; pass {TRUST_FLAG} to run it"
    )


def load_model(
    folder: str | os.PathLike,
    config: dict | None = None,
    *,
    trust_remote_code: bool = False,
    quiet: bool = False,
    **kwargs,
):
    """`from_pretrained` with the right class: the folder's own code when it ships it and may run it
    (`trust_remote_code_for`; `trust_remote_code` is the user's --trust-remote-code), the project's MAC class
    for a MAC folder without `auto_map` (a run's checkpoint, or the `final/` of an older run), stock
    transformers otherwise."""
    from transformers import AutoModelForCausalLM

    config = read_config(folder) if config is None else config
    check_config(folder, config)
    trust = trust_remote_code_for(folder, trust_remote_code, config, quiet=quiet)
    check_weights(folder)
    if kind_of(config) == "mac" and "AutoModelForCausalLM" not in (config.get("auto_map") or {}):
        from .models.modeling_mac_llama import MACLlamaForCausalLM

        return MACLlamaForCausalLM.from_pretrained(folder, **kwargs)
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust, **kwargs)


def save_with_model_code(model, out, **save_kwargs) -> None:
    """`save_pretrained` that also copies the model's code files and writes `auto_map` (a trust_remote_code
    folder).

    transformers does that only for classes registered for an auto class; the registration is undone
    afterwards so later plain saves of the same classes stay plain. A class loaded as remote code is
    registered already.
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
        raise RuntimeError(
            f"{out} is not self-contained (missing {missing}, auto_map {config.get('auto_map')}); "
            "this is a bug, please report it"
        )


def check_output_path(output: str | os.PathLike, flag: str = "--output", container: bool = False) -> Path:
    """Whether `output` (a file or a folder, existing or not) can be written, checked before the costly work:
    the nearest existing folder above it (with `container`, a folder that will hold the output: from `output`
    itself) must be a folder, not a file, and writable. What an existing target means (refused, replaced with
    --overwrite) is each command's own rule."""
    out = Path(output).expanduser()
    parent = out.absolute() if container else out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        where = "is" if parent == out.absolute() else f"is under {display(parent)}, which is"
        raise UserError(f"{flag} {output} {where} a file, not a folder; choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(
            f"{flag} {output}: the folder {display(parent)} is not writable; choose another {flag}"
        )
    return out


def check_output(
    output: str | os.PathLike, overwrite: bool, protect: list[Path] = (), flag: str = "--output"
) -> Path:
    """Where a folder may be written: somewhere writable (`check_output_path`), not a file, not a folder the
    command reads (or one holding it), and not a non-empty folder unless `overwrite`."""
    out = check_output_path(output, flag)
    resolved = out.resolve()
    for path in protect:
        path = Path(path).resolve()
        if resolved == path or resolved in path.parents:
            raise UserError(
                f"{flag} {output} would replace {display(path)}, which this command reads; "
                f"choose another {flag}"
            )
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {output} is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"{flag} {output} is not empty; pass --overwrite to replace it, or choose another {flag}"
        )
    return out


def check_output_file(output: str | os.PathLike, flag: str = "--output") -> Path:
    """Where a file may be written: somewhere writable (`check_output_path`) and not an existing folder."""
    out = check_output_path(output, flag)
    if out.is_dir():
        raise UserError(f"{flag} {output} is a folder; give a file name")
    return out


@contextlib.contextmanager
def writing(target: str | os.PathLike):
    """An error saying that `target` cannot be written (full disk, read-only, ...: `errors.write_error`) met
    inside the block becomes one line naming `target`."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        if not write_error(err):
            raise
        raise UserError(
            f"cannot write {display(Path(target))}: {describe(err, paths=False)}; free some space or choose "
            "another place"
        ) from None


def status(message: str) -> None:
    """A one-line progress note for a long silent step ("loading the teacher from X ..."), on stderr: stdout
    keeps the results."""
    click.echo(message, err=True)


def display(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    return str(path)


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' progress bars and warnings inside the block (saving, loading a tokenizer)."""
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


# Temporaries of the atomic writers are named `.{target}.tmp-{pid}@{host}-{random}` (`.old-` for a replaced
# folder parked aside), so a later writer can tell a crashed writer's leftover from a live one's work.
TEMP_NAME = re.compile(r"\.(?P<target>.+)\.(?P<role>tmp|old)-(?:(?P<pid>\d+)@(?P<host>[A-Za-z0-9]*)-)?[^/]+")
# A temporary named before the pid was part of the name is stale once untouched for this long.
LEGACY_STALE_SECONDS = 3600.0


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32]


def temp_prefix(target: str | os.PathLike, role: str = "tmp") -> str:
    """The name prefix of this process's temporaries for `target` (pass it to mkdtemp/mkstemp as `prefix`)."""
    return f".{Path(target).name}.{role}-{os.getpid()}@{_host()}-"


def temp_path(target: str | os.PathLike, suffix: str = "") -> Path:
    """A fresh path beside `target` for a file to be written and then `os.replace`d onto `target`."""
    target = Path(target)
    return target.with_name(f"{temp_prefix(target)}{os.urandom(4).hex()}{suffix}")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OverflowError:
        return False
    return True


def remove_stale_temporaries(folder: str | os.PathLike, target: str | None = None) -> list[Path]:
    """Remove the leftovers of killed atomic writers in `folder` (only those for `target` when given); return
    them.

    A temporary is stale when its writer (the pid in its name, on this host) is gone; one from another host is
    left alone; one named without a pid (older titans-distil) is stale after LEGACY_STALE_SECONDS untouched.
    A stale `.old-` folder still holding the only copy of its target (the writer died between its two
    renames) is renamed back into place instead of being deleted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        match = TEMP_NAME.fullmatch(path.name)
        if match is None or (target is not None and match["target"] != target):
            continue
        try:
            if match["pid"] is not None:
                if match["host"] != _host() or _process_alive(int(match["pid"])):
                    continue
            elif time.time() - path.lstat().st_mtime < LEGACY_STALE_SECONDS:
                continue
            if match["role"] == "old" and path.is_dir():
                parked, final = path / match["target"], folder / match["target"]
                if parked.exists() and not final.exists():
                    os.replace(parked, final)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:  # another cleaner got there first, or it is not ours to remove: leave it
            continue
        removed.append(path)
    return removed


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: str | os.PathLike) -> None:
    """Give `folder` and everything in it the modes a plain mkdir/open would have (0o777 / 0o666 & ~umask):
    mkdtemp makes 0700, which a server running as another user could not read."""
    mask = umask()
    folder = Path(folder)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    os.chmod(folder, 0o777 & ~mask)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside `path`; when the block succeeds it replaces `path`. Leftovers of killed
    writers of the same file are removed first; on failure the temporary is removed."""
    path = Path(path)
    tmp = temp_path(path, suffix)
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(path.parent, path.name)
            yield tmp
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_folder(output: str | os.PathLike, keep_existing: bool = False):
    """Yield a temporary folder beside `output`; when the block succeeds it becomes `output` by a rename.

    Leftovers of killed writers of `output` are removed first (`remove_stale_temporaries`). The new folder
    gets the modes the user's umask gives. An existing `output` is first renamed aside (never deleted before
    the new folder is in place) and removed after; with `keep_existing` an existing `output` wins instead
    (another process finished first). When the block fails the temporary folder is removed and `output` is
    untouched."""
    output = Path(output).expanduser()
    with writing(output):
        output.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(output.parent, output.name)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(output), dir=output.parent))
    try:
        with writing(output):
            yield tmp
            if keep_existing and output.exists():
                return
            apply_umask(tmp)
            if output.is_dir() and not any(output.iterdir()):
                output.rmdir()
            old = None
            if output.exists():
                old = (
                    Path(tempfile.mkdtemp(prefix=temp_prefix(output, "old"), dir=output.parent)) / output.name
                )
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
