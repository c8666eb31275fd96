"""Export a distilled student as a self-contained Hugging Face folder, and push it to the Hub.

Two kinds:

* ``mac``: a `MACLlamaForCausalLM` (Titans memory) loaded with ``trust_remote_code=True``. The folder carries
  ``configuration_mac_llama.py``, ``modeling_mac_llama.py``, ``neural_memory.py`` and ``memory_file.py``
  (torch + transformers + stdlib only) and ``auto_map`` entries for ``AutoConfig`` / ``AutoModelForCausalLM``.
* ``llama``: a student without memory as a plain `LlamaForCausalLM` that stock transformers and vLLM load.

Both get the run's tokenizer (with its chat template), ``generation_config.json``, safetensors weights
(sharded above ``max_shard_size``) and a ``README.md`` model card built from the run's ``config.json`` and
``metrics.jsonl``. The folder is written next to its target under a temporary name, checked (weights reload
bit-exactly, tokenizer loads, model code imports nothing but torch/transformers/stdlib) and only then renamed
into place, so a failed export never leaves half a folder and never replaces a good one.

Weights are read with safetensors only (never unpickled). Every problem with the user's input is a
`UserError` with a one-line message naming the fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .card import EMBEDDED_HUB_ID, EMBEDDED_LICENSE, model_card, read_eval_report, teacher_card_facts  # noqa: F401
from .errors import UserError, describe, network_errors
from .model_folder import (
    atomic_folder,
    check_output,
    display,
    quiet_transformers,
    read_config,
    save_with_model_code,
    status,
)
from .run_folder import Checkpoint, Run, check_kind, load_run, resolve_checkpoint, run_tokenizer
from .verify import file_hashes, foreign_imports
from .weights import ARCHITECTURE_FIELDS, INDEX_NAME, index_shards, load_student, make_config, read_weights

KINDS = ("mac", "llama")


# ------------------------------------------------------------------------------------------------ model card


def _generation_config(run: Run, checkpoint: Checkpoint, config, tokenizer):
    from transformers import GenerationConfig

    for folder in (checkpoint.folder, run.dir / "final"):
        if folder is not None and (folder / "generation_config.json").is_file():
            with contextlib.suppress(OSError, ValueError):
                return GenerationConfig.from_pretrained(folder)
    generation = GenerationConfig.from_model_config(config)
    generation.eos_token_id = (
        generation.eos_token_id if generation.eos_token_id is not None else tokenizer.eos_token_id
    )
    return generation


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


def export_model(
    run_dir,
    kind: str,
    checkpoint: str = "latest",
    output=None,
    *,
    max_shard_size="5GB",
    dtype=None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    eval_results=None,
    log=print,
) -> ExportResult:
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
    eval_report = read_eval_report(eval_results) if eval_results else None
    out = Path(output).expanduser() if output else default_output(run, kind)
    protect = [run.dir, *([ckpt.folder] if ckpt.folder else ckpt.files)]
    check_output(out, overwrite, protect)
    torch_dtype = {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        None: None,
    }[dtype]
    status(f"loading the student of run {run.name} ({ckpt.label}) ...")
    model = load_student(run, ckpt, torch_dtype)
    bad = next(
        (
            name
            for name, tensor in model.state_dict().items()
            if tensor.is_floating_point() and not bool(tensor.isfinite().all())
        ),
        None,
    )
    if bad is not None:
        raise UserError(
            f"checkpoint {ckpt.label} holds NaN or Inf weights ({bad}); export an earlier checkpoint"
        )
    tokenizer = run_tokenizer(run)
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(
            f"the run's tokenizer has {len(tokenizer)} tokens but the student only "
            f"{model.config.vocab_size} embeddings; the run folder mixes two teachers"
        )
    model.generation_config = _generation_config(run, ckpt, model.config, tokenizer)
    model.config.architectures = [type(model).__name__]
    model.config._name_or_path = (
        ""  # not the local path of the run (make_config already dropped the saved one)
    )

    status(f"writing {display(out)} ...")
    with atomic_folder(out) as tmp:
        with quiet_transformers():
            if kind == "mac":
                save_with_model_code(model, tmp, max_shard_size=max_shard_size)
            else:
                model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        card = model_card(run, ckpt, kind, model.config, push_to_hub, out.name, eval_report)
        (tmp / "README.md").write_text(card)
        if eval_report is not None:
            (tmp / "eval.json").write_text(json.dumps(eval_report, indent=2) + "\n")
        status(
            "checking the export: weights reload bit-exactly, tokenizer loads, model code self-contained ..."
        )
        _check_export(tmp, model, tokenizer, kind)
        files = file_hashes(tmp)
    shards = sum(1 for f in files if f.endswith(".safetensors"))
    log(
        f"exported {'MAC' if kind == 'mac' else 'Llama'} student of run {run.name} "
        f"({'step ' + str(ckpt.step) if ckpt.step is not None else ckpt.label}) to {display(out)}: "
        f"{len(files)} files, {shards} weight shard{'s' if shards != 1 else ''}"
    )
    result = ExportResult(out, kind, ckpt, files)
    if push_to_hub:
        status(f"pushing {display(out)} to the Hub as {push_to_hub} ...")
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


def _check_export(folder: Path, model, tokenizer, kind: str) -> None:
    """Before publishing: the written weights reload bit-exactly, the tokenizer loads, the code is
    self-contained."""
    import torch

    config = read_config(folder)
    if kind == "mac":
        foreign = foreign_imports(folder)
        if foreign:
            raise UserError(
                f"export check failed: the model files import {foreign[0]}, which a user without "
                "titans-distil lacks; this is a bug, please report it"
            )
    elif "auto_map" in config or config.get("model_type") != "llama":
        raise UserError(
            "export check failed: a plain Llama export must not need remote code; this is a bug, please "
            "report it"
        )
    written = make_config(config, kind)
    diffs = [k for k in ARCHITECTURE_FIELDS if getattr(written, k, None) != getattr(model.config, k, None)]
    files = (
        [folder / "model.safetensors"]
        if (folder / "model.safetensors").is_file()
        else index_shards(folder / INDEX_NAME, str(folder))
    )
    saved, original = read_weights(files), model.state_dict()
    if written.tie_word_embeddings:
        original.pop("lm_head.weight", None)
    different = [k for k in original if k not in saved or not torch.equal(saved[k], original[k])]
    if diffs or different or set(saved) != set(original):
        raise UserError(
            f"export check failed: {diffs[:1] or different[:1] or sorted(set(saved) ^ set(original))[:1]} "
            "did not survive the round trip; this is a bug, please report it"
        )
    type(tokenizer).from_pretrained(folder)  # the class itself: AutoTokenizer would ask about the remote code


# ------------------------------------------------------------------------------------------------ the Hub


def check_repo_id(repo_id: str, flag: str = "--push-to-hub") -> None:
    if not re.fullmatch(r"[\w][\w.-]*/[\w][\w.-]*", repo_id) or ".." in repo_id or repo_id.endswith(".git"):
        raise UserError(
            f"{flag} {repo_id!r} is not a Hub repo id; use OWNER/NAME (letters, digits, '-', '_', '.')"
        )


def hub_token(flag: str = "--push-to-hub", again: str = "export again") -> str:
    """The Hub token from HF_TOKEN or the stored login (never printed)."""
    from huggingface_hub import get_token

    try:
        token = os.environ.get("HF_TOKEN") or get_token()
    except Exception:  # e.g. an OIDC exchange that failed: treat as no token, the message says what to do
        token = None
    if not token:
        raise UserError(
            f"{flag} needs a Hugging Face token; set HF_TOKEN or run `hf auth login`, then {again}"
        )
    return token


EXPORT_HINT = "pass a folder written by export_mac_model.py, export_llama_model.py or package_model.py"


def check_export_folder(folder) -> str:
    """The kind ('mac', 'llama' or 'memory') of an export folder; anything else is a one-line `UserError`."""
    from .model_folder import check_weights, kind_of

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise UserError(f"{display(folder)} {what}; {EXPORT_HINT}")
    if not (folder / "config.json").is_file():
        raise UserError(f"{display(folder)} is not an export (no config.json); {EXPORT_HINT}")
    kind = kind_of(read_config(folder, fix=EXPORT_HINT))
    if kind is None:
        raise UserError(
            f"{display(folder)} is not an export (not a Llama, MAC or memory model); {EXPORT_HINT}"
        )
    if (folder / "trainer_state.json").is_file() or (folder / "optimizer.safetensors").is_file():
        raise UserError(
            f"{display(folder)} is a training checkpoint, not an export; export it first "
            "(export_mac_model.py / export_llama_model.py --checkpoint ...), then push the export"
        )
    if not (folder / "README.md").is_file():
        raise UserError(f"{display(folder)} is not an export (no README.md model card); {EXPORT_HINT}")
    check_weights(folder)
    return kind


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    kind: str = "mac",
    revision: str | None = None,
    commit_message: str | None = None,
    repo_type: str = "model",
) -> str:
    """Create the repo (a model's, or with `repo_type` "dataset" a dataset's) if needed (and the branch
    `revision`) and upload the folder in one commit; return the repo URL. Every Hub or network failure is a
    one-line `UserError` (the token never shown)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    token = token or hub_token()
    held = "dataset" if repo_type == "dataset" else "export"
    if constants.is_offline_mode():
        raise UserError(
            f"HF_HUB_OFFLINE is set, so nothing can be pushed; unset it and push again (the {held} is in "
            f"{display(Path(folder))})"
        )
    what = {"mac": "MAC student", "llama": "Llama student", "memory": "memory-wrapped Llama"}.get(
        kind, repo_type
    )
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type=repo_type,
            revision=revision,
            commit_message=commit_message or f"Upload {what} exported by titans-distil",
        )
    except (HfHubHTTPError, OSError, ValueError, *network_errors()) as err:
        first = next((line for line in describe(err).splitlines() if line.strip()), type(err).__name__)
        first = first.replace(token, "***")
        raise UserError(
            f"push to {repo_id} failed ({first}); the {held} is in {display(Path(folder))}, fix the cause "
            "and push again"
        ) from None
    return str(url)


def push_export(
    folder,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    log=print,
) -> str:
    """`titans-distil push FOLDER REPO_ID`: push an existing export (checked first) with `push_folder`."""
    check_repo_id(repo_id, "REPO_ID")
    folder = Path(folder).expanduser()
    kind = check_export_folder(folder)
    token = hub_token("push", "push again")
    url = push_folder(
        folder,
        repo_id,
        private=private,
        token=token,
        kind=kind,
        revision=revision,
        commit_message=commit_message,
    )
    log(
        f"pushed {display(folder)} to {url}{'@' + revision if revision else ''} "
        f"({'private' if private else 'public'})"
    )
    return url
