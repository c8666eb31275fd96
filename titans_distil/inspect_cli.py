"""`inspect_model.py`: look inside weights, runs and exports, and verify exports.

python inspect_model.py weights PATH           names, dtypes, shapes, norms (safetensors only, never
unpickled) python inspect_model.py architecture FOLDER    config vs weights: missing / unexpected / shape
mismatches python inspect_model.py verify EXPORT --run R  reload the export without titans-distil, compare
with the checkpoint python inspect_model.py tokenizers --run R     teacher vs student vs export tokenizer:
vocab, special tokens, template python inspect_model.py compare --run R        student vs teacher on
validation text: KL, top-1 agreement, perplexity python inspect_model.py examples --run R       decode a few
training blocks
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sysconfig
import tempfile
from pathlib import Path

import click

from .cli import _quiet_libraries, finite, trust_remote_code_option, user_errors
from .errors import UserError
from .flags import option
from .model_folder import kind_of, quiet_transformers, read_config, status, trust_remote_code_for
from .run_folder import load_run, resolve_checkpoint, run_tokenizer
from .verify import file_hashes, foreign_imports, run_isolated, sha256_file
from .weights import (
    PICKLE_SUFFIXES,
    check_fit,
    index_shards,
    instantiate,
    load_student,
    make_config,
    model_classes,
    model_shapes,
    read_headers,
    read_weights,
    unreadable,
    weight_files,
)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


@click.group(context_settings=CONTEXT)
def inspect_model():
    """Inspect weights, runs and exports; verify that an export reproduces its checkpoint."""


# ------------------------------------------------------------------------------------------------ helpers


def _weights_of(path: str) -> tuple[list[Path], str]:
    """Weight files behind PATH: a .safetensors file, an index, a folder holding them, or a run (latest
    checkpoint)."""
    target = Path(path).expanduser()
    if not target.exists():
        raise UserError(
            f"{path} does not exist; pass a .safetensors file, a model/checkpoint folder or a run folder"
        )
    if target.is_file():
        if target.suffix in PICKLE_SUFFIXES:
            raise UserError(
                f"{path} is a pickle file; it is never unpickled here (loading pickle can run code), "
                "convert it to safetensors"
            )
        if target.name.endswith(".index.json"):
            return index_shards(target, path), path
        if target.suffix != ".safetensors":
            raise UserError(
                f"{path} is not a .safetensors file; pass a .safetensors file, a model/checkpoint folder or "
                "a run folder"
            )
        return [target], path
    config = target / "config.json"
    if (
        config.is_file()
        and "teacher" in json.loads(config.read_text())
        and not (target / "model.safetensors").exists()
    ):
        checkpoint = resolve_checkpoint(load_run(target), "latest")
        return checkpoint.files, checkpoint.label
    return weight_files(target, path), path


def _folder_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(
            f"{folder} has no config.json; pass a model folder (an export, a checkpoint or final/)"
        )
    config = read_config(folder, "the folder is damaged")
    if kind_of(config) not in ("llama", "mac"):
        raise UserError(
            f"{folder} holds a {config.get('model_type')!r} model; only llama and mac_llama folders are "
            "inspected here"
        )
    return config


def folder_tokenizer(folder: Path, values: dict):
    """A model folder's tokenizer without running its remote code: AutoTokenizer would import the folder's
    configuration file (trust_remote_code) just to learn the model type; hand it the project's config
    instead."""
    from transformers import AutoTokenizer

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(folder, config=make_config(values, kind_of(values)))


def load_folder_model(folder: Path, dtype=None):
    """A model folder (export, checkpoint, final/) loaded with the project's classes (no remote code run)."""
    values = _folder_config(folder)
    kind = kind_of(values)
    config = make_config(values, kind)
    files = weight_files(Path(folder), str(folder))
    headers = read_headers(files, str(folder))
    fit = check_fit(
        model_shapes(config), {n: s for n, (_, s) in headers.items()}, bool(config.tie_word_embeddings)
    )
    if not fit.ok:
        raise UserError(
            f"the weights in {folder} do not fit its config.json ({fit.summary()}); the folder is damaged, "
            "export it again"
        )
    return instantiate(model_classes(kind)[1], config, read_weights(files, str(folder)), dtype)


def _probe_ids(tokenizer, length: int):
    """`length` tokens of real text (a standard-library module), the same on every machine with this
    Python."""
    import torch

    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < length:
        ids = ids + ids
    return torch.tensor([ids[:length]])


# ------------------------------------------------------------------------------------------------ weights


@inspect_model.command(short_help="Tensor names, dtypes, shapes, norms (safetensors only).")
@click.argument("path")
@click.option(
    "--filter", "pattern", default=None, help="Only tensors whose name matches this regular expression."
)
@click.option(
    "--no-stats", is_flag=True, help="Headers only (names, dtypes, shapes): no tensor data is read."
)
@user_errors
def weights(path, pattern, no_stats):
    """Names, dtypes, shapes and norms of the tensors in PATH (a .safetensors file, a model or checkpoint
    folder, or a run folder for its latest checkpoint). Only safetensors are read; pickle files are
    refused."""
    from safetensors import safe_open

    files, label = _weights_of(path)
    headers = read_headers(files, label)
    try:
        regex = re.compile(pattern) if pattern else None
    except re.error as err:
        raise UserError(f"--filter {pattern!r} is not a valid regular expression ({err})") from None
    for file in files:
        click.echo(f"{file}  sha256 {sha256_file(file)}  {file.stat().st_size:,} bytes")
    names = [n for n in headers if regex is None or regex.search(n)]
    width = max((len(n) for n in names), default=4)
    click.echo(
        f"{'tensor':<{width}}  {'dtype':<5}  {'shape':<16}  {'params':>12}"
        + ("" if no_stats else f"  {'L2 norm':>12}  {'max |x|':>10}")
    )
    total, nonfinite = 0, []
    owner = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    owner[name] = file
        except Exception as err:
            raise unreadable(file, label, err) from err
    for name in names:
        dtype, shape = headers[name]
        count = math.prod(shape)
        total += count
        line = f"{name:<{width}}  {dtype:<5}  {str(list(shape)):<16}  {count:>12,}"
        if not no_stats:
            with safe_open(str(owner[name]), framework="pt") as handle:
                tensor = handle.get_tensor(name).double()
            finite = bool(tensor.isfinite().all())
            if not finite:
                nonfinite.append(name)
            norm = tensor.norm().item() if tensor.numel() else 0.0
            peak = tensor.abs().max().item() if tensor.numel() else 0.0
            line += f"  {norm:>12.4f}  {peak:>10.4f}" + ("" if finite else "  NON-FINITE")
        click.echo(line)
    click.echo(
        f"{len(names)} tensors, {total:,} parameters" + (f" (of {len(headers)} tensors)" if regex else "")
    )
    if nonfinite:
        raise UserError(
            f"{len(nonfinite)} tensors hold NaN or Inf (first: {nonfinite[0]}); use an earlier checkpoint"
        )


# ------------------------------------------------------------------------------------------------
# architecture


@inspect_model.command(short_help="Config vs weights: missing, unexpected, mis-shaped.")
@click.argument("folder")
@click.option(
    "--weights",
    "weights_path",
    default=None,
    help="Check these weights (file or folder) against FOLDER's config instead of FOLDER's own.",
)
@user_errors
def architecture(folder, weights_path):
    """Check a model folder's config.json against its weights: missing, unexpected and mis-shaped tensors."""
    values = _folder_config(Path(folder))
    kind = kind_of(values)
    config = make_config(values, kind)
    files, label = _weights_of(weights_path or folder)
    expected = model_shapes(config)
    found = {n: s for n, (_, s) in read_headers(files, label).items()}
    fit = check_fit(expected, found, bool(config.tie_word_embeddings))
    click.echo(
        f"config   {folder}/config.json: {values.get('architectures', ['?'])[0]} (model_type "
        f"{values['model_type']}), {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"vocab {config.vocab_size}, tied embeddings {config.tie_word_embeddings}"
        + (f", memory layers {config.memory_layers}" if kind == "mac" else "")
    )
    click.echo(
        f"weights  {label}: {len(found)} tensors, {sum(math.prod(s) for s in found.values()):,} "
        f"parameters (the config expects {len(expected)} "
        f"tensors{', lm_head tied to the embeddings' if config.tie_word_embeddings else ''})"
    )
    for title, items in (("missing", fit.missing), ("unexpected", fit.unexpected)):
        for name in items[:20]:
            click.echo(f"  {title:<10} {name}")
    for name, want, got in fit.mismatched[:20]:
        click.echo(f"  shape      {name}: config {list(want)}, weights {list(got)}")
    if not fit.ok:
        raise UserError(f"the weights do not fit the config ({fit.summary()})")
    click.echo("OK: every tensor the config needs is present with the right shape, and nothing else")


# ------------------------------------------------------------------------------------------------ verify


@inspect_model.command(short_help="Reload an export without titans-distil; compare with the checkpoint.")
@click.argument("export_dir", metavar="EXPORT")
@click.option(
    "--run",
    "run_dir",
    default=None,
    help="Compare with this run's checkpoint (default: with the export's own weights in titans-distil's "
    "classes).",
)
@click.option(
    "--checkpoint", default="latest", show_default=True, help="Checkpoint of --run to compare with."
)
@click.option(
    "--tokens",
    type=click.IntRange(min=2),
    default=None,
    help="Prompt length. [default: two MAC segments + 8, or 64]",
)
@option(
    "--max-new-tokens",
    "new_tokens",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Greedy tokens generated per update rule.",
)
@click.option(
    "--atol",
    type=finite(min=0.0),
    default=1e-5,
    show_default=True,
    help="Largest allowed |logit difference|.",
)
@trust_remote_code_option
@user_errors
def verify(export_dir, run_dir, checkpoint, tokens, new_tokens, atol, trust_remote_code):
    """Reload EXPORT in a separate Python that cannot import titans-distil (only torch + transformers, with
    trust_remote_code for MAC), compare its logits and greedy generations with the checkpoint, print sha256
    hashes. The export's model code runs only when identical to this titans-distil's, or with
    --trust-remote-code."""
    _quiet_libraries()
    import torch

    from .models.neural_memory import UPDATE_RULES

    export = Path(export_dir)
    values = _folder_config(export)
    kind = kind_of(values)
    trust = trust_remote_code_for(export, trust_remote_code, values)
    click.echo(f"{export}: {values.get('architectures', ['?'])[0]} export")
    for path, digest in file_hashes(export).items():
        click.echo(f"  sha256 {digest}  {path}")
    if kind == "mac":
        foreign = foreign_imports(export)
        click.echo(
            "model files import only torch, transformers and the standard library"
            if not foreign
            else f"model files import {foreign}"
        )
        if foreign:
            raise UserError(
                f"the export's model files need {foreign[0]}; a user without titans-distil cannot load it, "
                "re-export it"
            )
    if run_dir:
        run = load_run(run_dir)
        ckpt = resolve_checkpoint(run, checkpoint)
        stored = {dtype for dtype, _ in read_headers(weight_files(export, str(export)), str(export)).values()}
        dtype = {"BF16": torch.bfloat16, "F16": torch.float16}.get(stored.pop()) if len(stored) == 1 else None
        # the checkpoint cast to the export's dtype (--dtype bfloat16 exports compare with a bf16 reference)
        status(f"loading the reference: checkpoint {ckpt.label} of run {run.name} ...")
        reference, where = (
            load_student(run, ckpt, dtype),
            f"checkpoint {ckpt.label}" + (f" cast to {str(dtype).removeprefix('torch.')}" if dtype else ""),
        )
    else:
        status(f"loading the reference: {export}'s weights in titans-distil's own classes ...")
        reference, where = load_folder_model(export), "the export's weights in titans-distil's own classes"
    tokenizer = folder_tokenizer(export, values)
    length = tokens or (
        min(2 * reference.config.segment_len + 8, reference.config.max_position_embeddings - new_tokens)
        if kind == "mac"
        else 64
    )
    ids = _probe_ids(tokenizer, length)
    rules = list(UPDATE_RULES) if kind == "mac" else [None]
    status(
        f"loading the export in a separate Python without titans-distil ({length} tokens, "
        f"{len(rules)} greedy generation{'s' * (len(rules) > 1)} of {new_tokens} tokens) ..."
    )
    with tempfile.TemporaryDirectory(prefix="titans-verify-") as work:
        report, logits = run_isolated(
            export, ids, trust_remote_code=trust, rules=rules, new_tokens=new_tokens, workdir=Path(work)
        )
    click.echo(f"loaded in a separate Python without titans-distil as {report['class']}")
    with torch.no_grad():
        want = reference(ids, use_cache=False).logits.float()
    diff = (logits - want).abs().max().item()
    problems = []
    click.echo(f"logits on {length} tokens vs {where}: max |diff| {diff:.3g} (tolerance {atol:g})")
    if not diff <= atol:
        problems.append(f"logits differ by {diff:.3g} > {atol:g}")
    status("generating greedily with the reference to compare ...")
    for rule in rules:
        extra = {} if rule is None else {"update_rule": rule}
        with torch.no_grad():
            expected = reference.generate(ids[:1], max_new_tokens=new_tokens, do_sample=False, **extra)[
                0, ids.shape[1] :
            ].tolist()
        got = report["generated"][str(rule)]
        same = got == expected
        label = "greedy generation" + (f" (update_rule={rule})" if rule else "")
        click.echo(f"{label}: {'same' if same else 'DIFFERENT'} {len(got)} tokens {tokenizer.decode(got)!r}")
        if not same:
            problems.append(f"{label} differs")
    if problems:
        raise UserError(f"verify failed: {'; '.join(problems)}; re-export from the checkpoint")
    click.echo("OK: the export reproduces " + where)


# ------------------------------------------------------------------------------------------------ tokenizers


PROBE_TEXT = 'def greet(name: str) -> str:\n    return f"Hello, {name}!"  # café ✓\n'


def _tokenizer_facts(tokenizer) -> dict:
    vocab = tokenizer.get_vocab()
    template = (
        tokenizer.chat_template
        if isinstance(tokenizer.chat_template, str)
        else json.dumps(tokenizer.chat_template, sort_keys=True)
        if tokenizer.chat_template
        else None
    )
    specials = {}
    for role in ("bos", "eos", "pad", "unk"):
        token = getattr(tokenizer, f"{role}_token", None)
        specials[role] = (
            f"{token} ({tokenizer.convert_tokens_to_ids(token)})" if token is not None else "none"
        )
    return {
        "tokens": str(len(tokenizer)),
        "vocab sha256": hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16],
        **specials,
        "added tokens": str(len(tokenizer.get_added_vocab())),
        "chat template": hashlib.sha256(template.encode()).hexdigest()[:16] if template else "none",
        "probe encoding": hashlib.sha256(
            json.dumps(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]).encode()
        ).hexdigest()[:16],
    }


@inspect_model.command(short_help="Teacher vs student vs export tokenizer.")
@click.option(
    "--run", "run_dir", required=True, help="Run folder: its teacher's tokenizer and the student's (final/)."
)
@click.option(
    "--export", "export_dir", default=None, help="Also check this export folder's tokenizer and config."
)
@user_errors
def tokenizers(run_dir, export_dir):
    """Check that teacher, student and export share one tokenizer: vocabulary, special tokens, chat template,
    and that it fits the models' embeddings."""
    _quiet_libraries()
    from .teacher import load_tokenizer

    run = load_run(run_dir)
    columns = {"teacher": load_tokenizer(run.config["teacher"]), "student": run_tokenizer(run)}
    vocab_sizes = {"student": run.model_config().get("vocab_size")}
    if export_dir:
        values = _folder_config(Path(export_dir))
        columns["export"] = folder_tokenizer(Path(export_dir), values)
        vocab_sizes["export"] = values.get("vocab_size")
    facts = {name: _tokenizer_facts(tok) for name, tok in columns.items()}
    rows = list(next(iter(facts.values())))
    widths = {name: max(len(name), *(len(f[r]) for r in rows)) for name, f in facts.items()}
    click.echo((f"{'':<16}" + "  ".join(f"{name:<{widths[name]}}" for name in facts)).rstrip())
    problems = []
    for row in rows:
        values_row = [facts[name][row] for name in facts]
        mark = "" if len(set(values_row)) == 1 else "  <- differs"
        if mark:
            problems.append(row)
        click.echo(
            (f"{row:<16}" + "  ".join(f"{facts[name][row]:<{widths[name]}}" for name in facts)).rstrip()
            + mark
        )
    for name, size in vocab_sizes.items():
        fits = size is not None and len(columns[name]) <= size
        click.echo(
            f"{name} embeddings: {size} rows for {len(columns[name])} tokens: "
            f"{'fit' if fits else 'DO NOT FIT'}"
        )
        if not fits:
            problems.append(f"{name} embeddings")
    if problems:
        raise UserError(
            f"tokenizers are not aligned ({', '.join(problems)}); export from the run again so it carries "
            "the teacher's tokenizer"
        )
    click.echo("OK: one tokenizer throughout")


# ------------------------------------------------------------------------------------------------ compare


@inspect_model.command(short_help="Student vs teacher: KL, top-1 agreement, perplexity.")
@click.option(
    "--run", "run_dir", required=True, help="Run folder (teacher, data and split come from its config)."
)
@click.option("--checkpoint", default="latest", show_default=True, help="Student checkpoint of the run.")
@click.option(
    "--export", "export_dir", default=None, help="Compare this export folder instead of a checkpoint."
)
@click.option("--blocks", type=click.IntRange(min=1), default=4, show_default=True, help="Validation blocks.")
@click.option(
    "--max-length", type=click.IntRange(min=2), default=None, help="Tokens per block. [default: the run's]"
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Compute dtype of both models.",
)
@user_errors
def compare(run_dir, checkpoint, export_dir, blocks, max_length, dtype):
    """Student vs teacher on the run's validation text: KL(teacher||student) per token, top-1 agreement,
    perplexity."""
    _quiet_libraries()
    import torch
    import torch.nn.functional as F

    from .data import load_blocks
    from .teacher import load_teacher

    run = load_run(run_dir)
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    if export_dir:
        status(f"loading the student: export {export_dir} ...")
        student, label = load_folder_model(Path(export_dir), torch_dtype), f"export {export_dir}"
    else:
        ckpt = resolve_checkpoint(run, checkpoint)
        status(f"loading the student: checkpoint {ckpt.label} of run {run.name} ...")
        student, label = load_student(run, ckpt, torch_dtype), f"checkpoint {ckpt.label}"
    status(f"loading the teacher from {run.config['teacher']} ...")
    teacher, tokenizer = load_teacher(run.config["teacher"], dtype=torch_dtype)
    length = max_length or int(run.config.get("max_length", 512))
    data = load_blocks(
        run.config["data"],
        tokenizer,
        length,
        "validation",
        seed=int(run.config.get("seed", 0)),
        validation_fraction=float(run.config.get("validation_fraction", 0.05)),
        max_blocks=blocks,
    )
    totals = {"kl": 0.0, "agree": 0, "ce_teacher": 0.0, "ce_student": 0.0, "n": 0}
    from tqdm.auto import tqdm

    with torch.no_grad():
        for block in tqdm(data, desc="compare", unit="block", dynamic_ncols=True):
            ids = block[None]
            hidden_t = teacher.model(input_ids=ids).last_hidden_state[0, :-1]
            hidden_s = student.model(input_ids=ids).last_hidden_state[0, :-1]
            labels = ids[0, 1:]
            for start in range(
                0, len(labels), 256
            ):  # bounded memory: 256 positions of full-vocabulary logits
                sl = slice(start, start + 256)
                lt = F.log_softmax(teacher.lm_head(hidden_t[sl]).float(), -1)
                ls = F.log_softmax(student.lm_head(hidden_s[sl]).float(), -1)
                totals["kl"] += (lt.exp() * (lt - ls)).sum().item()
                totals["agree"] += (lt.argmax(-1) == ls.argmax(-1)).sum().item()
                totals["ce_teacher"] -= lt.gather(-1, labels[sl, None]).sum().item()
                totals["ce_student"] -= ls.gather(-1, labels[sl, None]).sum().item()
                totals["n"] += len(labels[sl])
    n = max(totals["n"], 1)
    click.echo(
        f"student: {label}; teacher: {run.config['teacher']}; data: {run.config['data']} validation, "
        f"{len(data)} blocks x {length} tokens ({n} predicted tokens, {dtype})"
    )
    click.echo(f"  KL(teacher || student)  {totals['kl'] / n:.4f} nats/token")
    click.echo(f"  top-1 agreement         {100 * totals['agree'] / n:.2f} %")
    click.echo(f"  perplexity teacher      {math.exp(totals['ce_teacher'] / n):,.3f}")
    click.echo(f"  perplexity student      {math.exp(min(totals['ce_student'] / n, 700)):,.3f}")


# ------------------------------------------------------------------------------------------------ examples


@inspect_model.command(short_help="Decode a few training blocks of a run.")
@click.option(
    "--run", "run_dir", required=True, help="Run folder (data, tokenizer and split come from its config)."
)
@click.option("--count", type=click.IntRange(min=1), default=3, show_default=True, help="Blocks to show.")
@click.option("--split", type=click.Choice(["train", "validation"]), default="train", show_default=True)
@click.option(
    "--max-chars",
    type=click.IntRange(min=0),
    default=400,
    show_default=True,
    help="Characters shown per block (0: all).",
)
@user_errors
def examples(run_dir, count, split, max_chars):
    """Decode the first training (or validation) blocks of a run, exactly as the student saw them."""
    _quiet_libraries()
    from .data import load_blocks

    run = load_run(run_dir)
    tokenizer = run_tokenizer(run)
    cap = run.config.get("max_train_blocks") if split == "train" else None
    data = load_blocks(
        run.config["data"],
        tokenizer,
        int(run.config.get("max_length", 512)),
        split,
        seed=int(run.config.get("seed", 0)),
        validation_fraction=float(run.config.get("validation_fraction", 0.05)),
        max_blocks=min(count, cap) if cap else count,
    )
    for index, block in enumerate(data):
        text = tokenizer.decode(block.tolist())
        shown = (
            text
            if not max_chars or len(text) <= max_chars
            else text[:max_chars] + f"... [{len(text) - max_chars} more characters]"
        )
        click.echo(f"--- {split} block {index}: {len(block)} tokens, first ids {block[:8].tolist()} ---")
        click.echo(shown)
