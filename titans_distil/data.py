"""Training / validation corpus for knowledge distillation: sources, document split, packing, sampling.

A *data spec* (the ``--data`` flag) names one source or a weighted mixture of sources::

    stdlib                                  the interpreter's standard-library .py files (the default)
    path/to/folder                          every code/text file below it (one document per file)
    notes.txt                               documents separated by blank lines
    rows.jsonl  rows.jsonl#body             one document per line; field `text`, `content` or `code`
    rows.parquet  rows.parquet#body         same field rules, read with pyarrow
    hf:<name>[:<config>][#field]            a Hub dataset through `datasets` (streamed, bounded)
    path/to/dataset:<config>                a dataset folder with a card (`build_dataset.py fim`): pairs only
    codesearchnet[:<lang>]  the-stack[:<lang>]  apps      presets for common code sets (Hub)
    stdlib:0.7,notes.jsonl:0.3              a mixture: comma-separated `source:weight` pairs

Parsing rules: sources are separated by commas (a path may not contain one); a trailing ``:<number>`` is the
weight (so ``hf:org/set:python`` is a config, ``hf:org/set:python:0.5`` a config with weight); weights are
normalised to sum to 1 and a source without one weighs 1. ``#field`` picks the text field of row sources
(a path that exists with its ``#`` is taken as a path). The names ``stdlib`` and the presets always mean
the source, never a file or folder of that name: write ``./stdlib`` for one.

Split: every source's documents are split into train / validation **by document** with a salted blake2b
hash of the document id (path relative to the folder, paragraph or row number): a document whose hash
score is below ``validation_fraction`` is validation. If that picks none, the lowest-scoring document is
held out anyway (at least one validation document); if it picks all, the highest-scoring one is trained on.
The split depends on nothing else: not the seed, the machine, the Python hash seed or the other documents,
so validation text is never trained on and adding files rarely moves existing ones.

Packing: a split's documents are tokenized in hash order (a fixed pseudo-random order, so a capped run
reads a sample of the source, not its first directory), each followed by the eos token, concatenated into
one token stream and cut into blocks of exactly ``max_length`` tokens (the tail is dropped). The stream of
each (source, split, tokenizer, eos, validation fraction, max_documents) is cached as a safetensors file;
it does not depend on ``max_length`` or the seed, and a capped stream is exactly a prefix of the full one.
Cache files live in ``cache_dir`` (default ``$TITANS_DISTIL_CACHE/data`` or ``~/.cache/titans-distil/data``),
are keyed by a sha256 of the source identity and file fingerprint (relative path, size, mtime of every file
read), split, validation fraction, max_documents, a content hash of the tokenizer, the eos id and the token
cap, and are written atomically (temp file, then ``os.replace``). Editing a file invalidates its source.

Mixture: with ``N`` blocks in total (the sum of the sources' blocks, or ``max_blocks``), source *i*
contributes ``round(w_i * N)`` blocks (largest remainder) chosen with the seed; a training source with
fewer blocks than that is repeated (and a warning logged), a validation source never is. The blocks of a
mixture are then shuffled together with the seed; a single source keeps its stream order.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import re
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError
from .long_range import KINDS, Item, item_rng, make_item
from .model_folder import atomic_file

__all__ = [
    "DEFAULT_DATA_SPEC",
    "DEFAULT_HUB_MAX_DOCUMENTS",
    "DEFAULT_VALIDATION_FRACTION",
    "PRESETS",
    "BlockSampler",
    "DataError",
    "DataSpec",
    "HubPreset",
    "default_cache_dir",
    "load_blocks",
    "mix_long_range",
    "parse_data_spec",
    "read_documents",
    "split_documents",
]

log = logging.getLogger(__name__)

DEFAULT_DATA_SPEC = "stdlib"
DEFAULT_VALIDATION_FRACTION = 0.05
# : Rows read from a Hub source when ``max_documents`` is not given (the set is streamed, never downloaded
# whole).
DEFAULT_HUB_MAX_DOCUMENTS = 20_000
#: Characters of text above which tokenization shows a tqdm progress bar (~1 s with a fast tokenizer).
_PROGRESS_MIN_CHARS = 4_000_000
_CACHE_FORMAT = 1
_SPLIT_SALT = b"titans-distil/split/v1\0"
_SPLITS = ("train", "validation")

#: Files a folder source reads (by suffix, lower-case); everything else is skipped.
TEXT_SUFFIXES = frozenset(
    ".py .pyi .md .txt .rst .js .jsx .mjs .ts .tsx .c .h .cc .cpp .cxx .hpp .hh .java .kt .scala .go .rs"
    " .rb .php .swift .cs .m .lua .pl .r .jl .hs .ml .ex .exs .erl .clj .sql .json .toml .yaml .yml .ini"
    " .cfg .sh .bash .zsh .ps1 .html .css .scss .xml .tex .cmake .proto .ipynb".split()
)
_TEXT_FILENAMES = frozenset({"Makefile", "Dockerfile", "CMakeLists.txt", "README", "LICENSE"})
#: Folder names a folder source never enters (besides hidden ones, which start with ".").
_FOLDER_SKIPPED_DIRS = frozenset({"__pycache__", "node_modules", "site-packages", "dist-packages"})
#: Folder names the stdlib source never enters: tests, IDLE, installed packages and build leftovers.
_STDLIB_SKIPPED_DIRS = _FOLDER_SKIPPED_DIRS | {"test", "tests", "idle_test", "idlelib"}
_ROW_FIELDS = ("text", "content", "code")
_NUMBER_RE = re.compile(r"[-+]?(?:\d[\d_]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf|infinity)", re.I)


class DataError(UserError):
    """A data problem the user can fix; the message is one line naming the problem and the fix."""


# --------------------------------------------------------------------------------------------------------
# Spec parsing
# --------------------------------------------------------------------------------------------------------


@dataclass
class DataSpec:
    """A parsed ``--data`` spec: ``(source, weight)`` pairs, weights normalised to sum to 1."""

    sources: list[tuple[str, float]]

    def __str__(self) -> str:
        if len(self.sources) == 1:
            return self.sources[0][0]
        return ",".join(f"{name}:{weight:.6g}" for name, weight in self.sources)


def parse_data_spec(spec: str) -> DataSpec:
    """Parse a ``--data`` spec and check each source (files and folders must exist; Hub is not contacted)."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(
            f"empty --data spec; use {DEFAULT_DATA_SPEC!r}, a folder, a .txt/.jsonl/.parquet file, "
            "a preset or hf:<dataset>"
        )
    pairs: list[tuple[str, float]] = []
    seen: set[str] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise DataError(
                f"empty source in --data {spec!r}; separate sources with single commas, "
                "e.g. stdlib:0.7,notes.jsonl:0.3"
            )
        name, weight = _split_weight(part)
        _resolve_source(name)  # validates the source now, so a typo fails before any work
        if name in seen:
            raise DataError(
                f"data source {name!r} appears twice in --data; give each source once with its total weight"
            )
        seen.add(name)
        pairs.append((name, weight))
    total = math.fsum(w for _, w in pairs)
    return DataSpec([(name, w / total) for name, w in pairs])


def _split_weight(part: str) -> tuple[str, float]:
    """``"src:0.3"`` -> ``("src", 0.3)``; a trailing ``:<text>`` that is not a number belongs to the
    source."""
    head, sep, tail = part.rpartition(":")
    if not sep:
        return part, 1.0
    tail = tail.strip()
    if (tail and not _NUMBER_RE.fullmatch(tail)) or head.strip() == "hf":
        return part, 1.0  # e.g. hf:org/name:config, or hf: itself
    head = head.strip()
    if not head:
        raise DataError(
            f"missing data source before ':{tail}' in --data; write source:weight, "
            "e.g. stdlib:0.7,notes.jsonl:0.3"
        )
    try:
        weight = float(tail)
    except ValueError:
        weight = float("nan")
    if not (math.isfinite(weight) and weight > 0):
        raise DataError(
            f"bad mixture weight {tail!r} for data source {head!r}; weights must be positive "
            "numbers, e.g. stdlib:0.7,notes.jsonl:0.3"
        )
    return head, weight


# --------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubPreset:
    """How to read a Hub dataset: ``datasets.load_dataset(path, name, data_dir=, data_files=, split=)``."""

    path: str
    name: str | None = None
    data_dir: str | None = None
    data_files: str | None = None
    split: str = "train"
    #: Text fields: the first one present is used (a list value is joined with blank lines).
    fields: tuple[str, ...] = _ROW_FIELDS
    #: Optional row -> text conversion that replaces ``fields`` (e.g. APPS question + solutions).
    to_text: Callable[[dict], str | None] | None = field(default=None, compare=False)
    note: str = ""


def _apps_text(row: dict, max_solutions: int = 3) -> str | None:
    """APPS row -> the problem statement followed by up to ``max_solutions`` reference solutions."""
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        return None
    solutions = row.get("solutions") or "[]"
    try:
        solutions = json.loads(solutions) if isinstance(solutions, str) else list(solutions)
    except (ValueError, TypeError):
        solutions = []
    parts = [question.strip()] + [
        s.strip() for s in solutions[:max_solutions] if isinstance(s, str) and s.strip()
    ]
    return "\n\n".join(parts)


#: Presets for code sets users name. ``<preset>:<lang>`` picks another language where the set has several.
PRESETS: dict[str, HubPreset] = {
    # CodeSearchNet (parquet, one config per language); whole_func_string = a function with its docstring.
    "codesearchnet": HubPreset(
        "code-search-net/code_search_net",
        name="python",
        fields=("whole_func_string",),
        note="configs: python java javascript go ruby php",
    ),
    # The Stack smol: 10k files per language under data/<lang>; gated: accept its terms and log in first.
    "the-stack": HubPreset(
        "bigcode/the-stack-smol",
        data_dir="data/python",
        fields=("content",),
        note="gated: accept the terms on the Hub and set HF_TOKEN",
    ),
    # APPS: its repository still holds a loading script (unsupported by datasets>=4), so read train.jsonl.
    "apps": HubPreset(
        "json",
        data_files="hf://datasets/codeparrot/apps/train.jsonl",
        fields=("question", "solutions"),
        to_text=_apps_text,
    ),
}


@dataclass(frozen=True)
class _Source:
    spec: str  # as the user wrote it (without weight)
    kind: str  # stdlib | folder | txt | jsonl | parquet | hub | dataset
    path: Path | None = None
    field: str | None = None
    hub: HubPreset | None = None
    config: str | None = None  # of a dataset folder

    def identity(self) -> dict[str, Any]:
        """What the source reads, for the cache key (no file contents: those enter via the fingerprint)."""
        ident: dict[str, Any] = {"kind": self.kind, "field": self.field}
        if self.path is not None:
            ident["path"] = str(self.path)
        if self.hub is not None:
            h = self.hub
            ident["hub"] = [
                h.path,
                h.name,
                h.data_dir,
                h.data_files,
                h.split,
                list(h.fields),
                getattr(h.to_text, "__name__", None),
            ]
        return ident


def _resolve_source(name: str) -> _Source:
    spec = name
    if not name:
        raise DataError(
            "empty data source in --data; use stdlib, a folder, a .txt/.jsonl/.parquet file, "
            "a preset or hf:<dataset>"
        )
    if name.startswith("hf:"):
        rest, _, hub_field = name[3:].partition("#")
        ds_name, _, config = rest.partition(":")
        ds_name, config, hub_field = ds_name.strip(), config.strip() or None, hub_field.strip()
        if not ds_name:
            raise DataError(
                f"missing dataset name in {spec!r}; write hf:<name>[:<config>][#field], "
                "e.g. hf:bigcode/the-stack-smol#content"
            )
        fields = (hub_field,) if hub_field else _ROW_FIELDS
        return _Source(
            spec, "hub", field=hub_field or None, hub=HubPreset(ds_name, name=config, fields=fields)
        )
    fld: str | None = None
    base = name
    if "#" in name and not Path(name).expanduser().exists():
        base, _, fld = name.rpartition("#")
        fld = fld.strip()
        if not fld:
            raise DataError(f"empty field after '#' in {spec!r}; write file.jsonl#<field>")
    preset_name, _, lang = base.partition(":")
    if preset_name.lower() in PRESETS:
        preset = PRESETS[preset_name.lower()]
        if lang:
            if preset_name.lower() == "codesearchnet":
                preset = HubPreset(preset.path, name=lang.lower(), fields=preset.fields, note=preset.note)
            elif preset_name.lower() == "the-stack":
                preset = HubPreset(
                    preset.path, data_dir=f"data/{lang.lower()}", fields=preset.fields, note=preset.note
                )
            else:
                raise DataError(
                    f"preset {preset_name!r} has no variants, got {spec!r}; write {preset_name!r}"
                )
        if fld:
            preset = HubPreset(
                preset.path,
                preset.name,
                preset.data_dir,
                preset.data_files,
                preset.split,
                fields=(fld,),
                note=preset.note,
            )
        return _Source(spec, "hub", field=fld, hub=preset)
    if base == "stdlib":
        if fld:
            raise DataError(
                f"'#field' applies to .jsonl, .parquet and Hub sources, not {spec!r}; drop '#{fld}'"
            )
        return _Source(spec, "stdlib", path=Path(sysconfig.get_paths()["stdlib"]).resolve())
    folder, colon, config = base.rpartition(":")
    if folder and colon and not Path(base).expanduser().exists() and Path(folder).expanduser().is_dir():
        return _dataset_source(spec, Path(folder).expanduser().resolve(), config, fld)
    path = Path(base).expanduser()
    if not path.exists():
        if any(c in base for c in "/\\.~") or os.sep in base:
            raise DataError(f"data file or folder not found: {base!r}; check the path given to --data")
        raise DataError(
            f"unknown data source {base!r}; use stdlib, a preset ({', '.join(PRESETS)}), "
            "hf:<dataset>[:<config>], or a path to a folder or .txt/.jsonl/.parquet file"
        )
    path = path.resolve()
    if path.is_dir():
        configs = dataset_configs(path)
        if configs:
            raise DataError(
                f"{base!r} is a dataset folder (configs: {', '.join(configs)}); name one as "
                f"{base}:{next(iter(configs))}"
            )
        kind = "folder"
    else:
        suffix = path.suffix.lower()
        kind = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}.get(suffix)
        if kind is None:
            raise DataError(
                f"unsupported data file type {suffix or path.name!r} for {base!r}; use a .txt, "
                ".jsonl or .parquet file, or a folder of code/text files"
            )
    if fld and kind not in ("jsonl", "parquet"):
        raise DataError(f"'#field' applies to .jsonl, .parquet and Hub sources, not {spec!r}; drop '#{fld}'")
    return _Source(spec, kind, path=path, field=fld)


def dataset_configs(folder: Path) -> dict[str, dict[str, list[Path]]] | None:
    """{config: {split: parquet files}} that the folder's README.md dataset card declares (the YAML
    `configs:` that `datasets.load_dataset(folder, config)` reads), or None for a folder without one."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---\n") or "\n---" not in text[3:]:
        return None
    import yaml

    try:
        meta = yaml.safe_load(text[4 : text.index("\n---", 3)])
    except yaml.YAMLError:
        return None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    if not isinstance(configs, list):
        return None
    found: dict[str, dict[str, list[Path]]] = {}
    for entry in configs:
        if not isinstance(entry, dict) or not isinstance(entry.get("data_files"), list):
            continue
        splits: dict[str, list[Path]] = {}
        for files in entry["data_files"]:
            paths = files.get("path") if isinstance(files, dict) else None
            for pattern in [paths] if isinstance(paths, str) else paths or []:
                splits.setdefault(str(files.get("split", "train")), []).extend(sorted(folder.glob(pattern)))
        found[str(entry.get("config_name", "default"))] = splits
    return found or None


def _dataset_source(spec: str, folder: Path, config: str, fld: str | None) -> _Source:
    configs = dataset_configs(folder)
    if not configs:
        raise DataError(
            f"{str(folder)!r} has no dataset card declaring configs (README.md with YAML 'configs:'); "
            "point --data at the folder itself for its code/text files"
        )
    if config not in configs:
        raise DataError(
            f"dataset folder {str(folder)!r} has no config {config!r}; use one of {', '.join(configs)}"
        )
    if fld:
        raise DataError(
            f"a dataset folder is read as input/output pairs, so '#{fld}' does not apply to {spec!r}; "
            f"for plain text point --data at one of its .parquet files with #{fld}"
        )
    return _Source(spec, "dataset", path=folder, config=config)


# --------------------------------------------------------------------------------------------------------
# Reading documents
# --------------------------------------------------------------------------------------------------------


def _walk_files(
    root: Path, skipped_dirs: frozenset[str], accept: Callable[[str], bool]
) -> list[tuple[str, Path]]:
    """``(relative posix path, path)`` of accepted files below ``root``, sorted, hidden dirs/files skipped."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skipped_dirs)
        for fname in filenames:
            if fname.startswith(".") or not accept(fname):
                continue
            full = Path(dirpath, fname)
            if full.is_file():
                found.append((full.relative_to(root).as_posix(), full))
    found.sort(key=lambda item: item[0])
    return found


def _source_files(src: _Source) -> list[tuple[str, Path]]:
    assert src.path is not None
    if src.kind == "stdlib":
        return _walk_files(src.path, _STDLIB_SKIPPED_DIRS, lambda f: f.endswith(".py"))
    if src.kind == "folder":
        return _walk_files(
            src.path,
            _FOLDER_SKIPPED_DIRS,
            lambda f: Path(f).suffix.lower() in TEXT_SUFFIXES or f in _TEXT_FILENAMES,
        )
    return [(src.path.name, src.path)]


def _decode_text(raw: bytes) -> str | None:
    """UTF-8 text with normalised newlines, or None for binary / undecodable bytes."""
    if b"\0" in raw[:8192]:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def _row_text(row: Any, fields: Sequence[str]) -> str | None:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        return None
    for name in fields:
        value = row.get(name)
        if isinstance(value, str):
            return value
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            return "\n\n".join(value)
    return None


def _fields_for(src: _Source) -> tuple[str, ...]:
    return (src.field,) if src.field else _ROW_FIELDS


def _no_field_error(src: _Source, found: Sequence[str]) -> DataError:
    where = src.spec.rpartition("#")[0] if src.field else src.spec
    wanted = f"field {src.field!r}" if src.field else "'text', 'content' or 'code' field"
    seen = ", ".join(sorted(found)[:12]) or "none"
    return DataError(
        f"no documents with a {wanted} in {where!r} (fields seen: {seen}); "
        f"name the text field as {where}#<field>"
    )


def _read_jsonl(src: _Source, max_documents: int | None) -> list[tuple[str, str]]:
    assert src.path is not None
    docs: list[tuple[str, str]] = []
    keys: set[str] = set()
    n_rows = 0
    with open(src.path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if max_documents is not None and n_rows >= max_documents:
                break
            n_rows += 1
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(
                    f"{src.path.name}:{lineno}: invalid JSON ({e}); each line of a .jsonl file "
                    "must be one JSON object"
                ) from None
            if isinstance(row, dict):
                keys.update(row)
            text = _row_text(row, _fields_for(src))
            if text is not None and text.strip():
                docs.append((f"line:{lineno}", text))
    if not docs and n_rows:
        raise _no_field_error(src, list(keys))
    return docs


def _read_parquet(src: _Source, max_documents: int | None) -> list[tuple[str, str]]:
    import pyarrow.parquet as pq  # comes with datasets; reading parquet never unpickles

    assert src.path is not None
    try:
        pfile = pq.ParquetFile(src.path)
    except Exception as e:  # noqa: BLE001 - any pyarrow failure means the same thing to the user
        raise DataError(
            f"cannot read parquet file {src.spec!r} ({type(e).__name__}: {_first_line(e)}); "
            "check that it is a valid .parquet file"
        ) from None
    names = pfile.schema_arrow.names
    column = next((f for f in _fields_for(src) if f in names), None)
    if column is None:
        raise _no_field_error(src, names)
    docs: list[tuple[str, str]] = []
    row = 0
    for batch in pfile.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if max_documents is not None and row >= max_documents:
                return docs
            text = _row_text({column: value}, (column,))
            if text is not None and text.strip():
                docs.append((f"row:{row}", text))
            row += 1
    return docs


def _read_txt(src: _Source) -> list[tuple[str, str]]:
    assert src.path is not None
    text = _decode_text(src.path.read_bytes())
    if text is None:
        raise DataError(f"{src.spec!r} is not UTF-8 text; convert it to UTF-8 or use a folder of text files")
    # One document per blank-line-separated block; the id is the block's ordinal (stable for an unchanged
    # file).
    blocks = [b.strip("\n") for b in re.split(r"\n(?:[ \t]*\n)+", text)]
    return [(f"para:{i}", b) for i, b in enumerate(b for b in blocks if b.strip())]


def _read_hub(src: _Source, max_documents: int | None) -> list[tuple[str, str]]:
    preset = src.hub
    assert preset is not None
    limit = DEFAULT_HUB_MAX_DOCUMENTS if max_documents is None else max_documents
    where = (
        preset.data_files if preset.data_files else preset.path + (f":{preset.name}" if preset.name else "")
    )
    docs: list[tuple[str, str]] = []
    keys: set[str] = set()
    try:
        import datasets

        stream = datasets.load_dataset(
            preset.path,
            preset.name,
            data_dir=preset.data_dir,
            data_files=preset.data_files,
            split=preset.split,
            streaming=True,
        )
        for i, row in enumerate(itertools.islice(stream, limit)):
            if not keys and isinstance(row, dict):
                keys.update(row)
            text = preset.to_text(row) if preset.to_text else _row_text(row, preset.fields)
            if text is not None and text.strip():
                docs.append((f"row:{i}", text))
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - offline, gated, unknown set, bad config: all re-raised as one line
        hint = f" ({preset.note})" if preset.note else ""
        raise DataError(
            f"cannot load Hub dataset {where!r} for data source {src.spec!r} "
            f"({type(e).__name__}: {_first_line(e)}){hint}; check the name and your network/HF "
            "token, or use a local folder or .jsonl/.parquet file"
        ) from None
    if not docs and keys:
        if preset.to_text is None:
            raise _no_field_error(src, list(keys))
    return docs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else "no message")[:200]


def read_documents(source: str, *, max_documents: int | None = None) -> list[tuple[str, str]]:
    """All documents of one source (no weight) as ``(doc_id, text)`` pairs, in listing order.

    Empty / whitespace-only documents and (in folders) binary or non-UTF-8 files are skipped.
    ``max_documents`` keeps the first N documents of the listing (rows for row sources; Hub sources default
    to :data:`DEFAULT_HUB_MAX_DOCUMENTS`). Raises :class:`DataError` when nothing is left.
    """
    return _read_documents(_resolve_source(source), max_documents)


def _read_documents(
    src: _Source, max_documents: int | None, files: list[tuple[str, Path]] | None = None
) -> list[tuple[str, str]]:
    if src.kind in ("stdlib", "folder"):
        docs = []
        for rel, path in files if files is not None else _source_files(src):
            if max_documents is not None and len(docs) >= max_documents:
                break
            try:
                text = _decode_text(path.read_bytes())
            except OSError:
                continue
            if text is not None and text.strip():
                docs.append((rel, text))
    elif src.kind == "txt":
        docs = _read_txt(src)[:max_documents]
    elif src.kind == "jsonl":
        docs = _read_jsonl(src, max_documents)
    elif src.kind == "parquet":
        docs = _read_parquet(src, max_documents)
    elif src.kind == "dataset":
        raise DataError(
            f"dataset folder {src.spec!r} holds input/output pairs, which only distil.py trains on; for "
            "plain text point --data at one of its .parquet files"
        )
    else:
        docs = _read_hub(src, max_documents)
    if not docs:
        what = {
            "stdlib": f"no .py files found under {src.path}",
            "folder": "no readable code/text files (.py .md .txt .js ...)",
        }.get(src.kind, "no non-empty documents")
        raise DataError(f"data source {src.spec!r} is empty: {what}; point --data at a source with text")
    return docs


# --------------------------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------------------------


def _split_score(doc_id: str) -> float:
    digest = hashlib.blake2b(_SPLIT_SALT + doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_documents(
    doc_ids: Sequence[str], validation_fraction: float = DEFAULT_VALIDATION_FRACTION
) -> tuple[list[str], list[str]]:
    """``(train_ids, validation_ids)``, each in hash order (see the module docstring for the rule)."""
    _check_fraction(validation_fraction)
    ranked = sorted(set(doc_ids), key=lambda d: (_split_score(d), d))
    n_val = sum(1 for d in ranked if _split_score(d) < validation_fraction)
    if validation_fraction > 0 and ranked:
        n_val = max(n_val, 1)  # at least one validation document
        if n_val == len(ranked) and len(ranked) > 1:
            n_val -= 1  # and at least one training document when there are two
    return ranked[n_val:], ranked[:n_val]


def _check_fraction(validation_fraction: float) -> None:
    if not (0.0 <= validation_fraction < 1.0):
        raise DataError(f"validation fraction must be in [0, 1), got {validation_fraction}; use e.g. 0.05")


# --------------------------------------------------------------------------------------------------------
# Tokenize, pack, cache
# --------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$TITANS_DISTIL_CACHE/data``, else ``$XDG_CACHE_HOME/titans-distil/data`` (``~/.cache/...``)."""
    base = os.environ.get("TITANS_DISTIL_CACHE")
    if base:
        return Path(base).expanduser() / "data"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "titans-distil" / "data"


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """Content hash of the tokenizer (its full tokenizer.json when fast, else its vocabulary)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        if backend is not None:
            h.update(backend.to_str().encode())
        else:
            h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    except Exception:  # noqa: BLE001 - exotic tokenizers: fall back on their name
        h.update(str(getattr(tokenizer, "name_or_path", repr(tokenizer))).encode())
    return h.hexdigest()[:32]


def _source_fingerprint(src: _Source, files: list[tuple[str, Path]] | None) -> str:
    h = hashlib.sha256()
    if src.kind == "stdlib":
        h.update(sys.version.encode())
    for rel, path in files or []:
        st = path.stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added; same ids as ``tokenizer(texts)``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    encode_fast = getattr(backend, "encode_batch_fast", None)
    if (
        encode_fast is not None
        and backend.truncation is None
        and backend.padding is None
        and bool(backend.encode_special_tokens) == bool(getattr(tokenizer, "split_special_tokens", False))
    ):
        # What a fast tokenizer's __call__ runs, minus the offsets it computes and we drop (~40% faster).
        return [enc.ids for enc in encode_fast(texts, add_special_tokens=False)]
    enc = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return list(enc["input_ids"])


def _tokenize_stream(
    src: _Source, docs: list[tuple[str, str]], split: str, tokenizer: Any, eos_id: int, max_tokens: int | None
) -> tuple[np.ndarray, int, bool]:
    """Token stream of ``docs`` (each + eos), stopping once ``max_tokens`` are reached.

    Returns ``(tokens int32, documents used, complete)``; ``complete`` means every document was tokenized.
    """
    from tqdm.auto import tqdm

    total_chars = sum(len(t) for _, t in docs)
    # ~4 chars per token: with a cap, read small batches so a quick run tokenizes little more than it needs.
    batch_chars = 1 << 20 if max_tokens is None else min(1 << 20, max(1 << 14, 4 * max_tokens))
    show = min(total_chars, 4 * max_tokens if max_tokens else total_chars) >= _PROGRESS_MIN_CHARS
    pieces: list[np.ndarray] = []
    n_tokens = n_docs = 0
    eos = np.asarray([eos_id], dtype=np.int32)
    with tqdm(
        total=total_chars,
        unit="char",
        unit_scale=True,
        disable=not show,
        leave=False,
        desc=f"tokenizing {src.spec} ({split})",
    ) as bar:
        i = 0
        while i < len(docs) and (max_tokens is None or n_tokens < max_tokens):
            j, size = i, 0
            while j < len(docs) and (j == i or size + len(docs[j][1]) <= batch_chars):
                size += len(docs[j][1])
                j += 1
            for ids in _encode(tokenizer, [t for _, t in docs[i:j]]):
                pieces.append(np.asarray(ids, dtype=np.int32))
                pieces.append(eos)
                n_tokens += len(ids) + 1
                n_docs += 1
            bar.update(size)
            i = j
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    complete = n_docs == len(docs)
    if max_tokens is not None and len(stream) > max_tokens:
        stream, complete = stream[:max_tokens], False
    return stream, n_docs, complete


def _cache_path(cache_dir: Path, src: _Source, split: str, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    name = "stdlib" if src.kind == "stdlib" else src.path.name if src.path is not None else src.spec
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:40]
    return cache_dir / f"{slug}-{split}-{digest}.safetensors"


def _cache_load(path: Path) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        from safetensors.torch import load_file

        return load_file(str(path))["tokens"]
    except Exception as e:  # noqa: BLE001 - a bad cache file is rebuilt, never fatal
        log.warning("ignoring unreadable data cache %s (%s)", path, e)
        return None


def _cache_save(path: Path, tokens: torch.Tensor, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    try:
        # atomic: readers see the old file or the complete new one; its mode follows the umask (may be shared)
        with atomic_file(path, suffix=".tmp") as tmp:
            save_file({"tokens": tokens.contiguous()}, str(tmp), metadata=meta)
    except OSError as e:
        log.warning("could not write data cache %s (%s); continuing without it", path, e)


def _source_tokens(
    src: _Source,
    tokenizer: Any,
    eos_id: int,
    split: str,
    validation_fraction: float,
    max_documents: int | None,
    max_tokens: int | None,
    cache_dir: Path | None,
) -> torch.Tensor:
    """The (possibly capped) int32 token stream of one source's split, through the cache."""
    files = _source_files(src) if src.kind in ("stdlib", "folder", "txt", "jsonl", "parquet") else None
    if files is not None and not files:
        _read_documents(src, max_documents, files)  # raises the "empty source" error
    key: dict[str, Any] = {
        "format": _CACHE_FORMAT,
        "source": src.identity(),
        "fingerprint": _source_fingerprint(src, files),
        "split": split,
        "validation_fraction": validation_fraction,
        "max_documents": (max_documents or DEFAULT_HUB_MAX_DOCUMENTS) if src.kind == "hub" else max_documents,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "eos": eos_id,
    }
    full_path = capped_path = None
    if cache_dir is not None:
        full_path = _cache_path(cache_dir, src, split, {**key, "max_tokens": None})
        cached = _cache_load(full_path)
        if cached is not None:
            return cached if max_tokens is None else cached[:max_tokens]
        if max_tokens is not None:
            capped_path = _cache_path(cache_dir, src, split, {**key, "max_tokens": max_tokens})
            cached = _cache_load(capped_path)
            if cached is not None:
                return cached

    docs = _read_documents(src, max_documents, files)
    train_ids, val_ids = split_documents([d for d, _ in docs], validation_fraction)
    wanted = train_ids if split == "train" else val_ids
    if not wanted:
        if split == "validation":
            raise DataError(
                f"data source {src.spec!r} has no validation documents (validation fraction "
                f"{validation_fraction}); use a validation fraction > 0"
            )
        raise DataError(
            f"data source {src.spec!r} has {len(docs)} document(s), all held out for validation; "
            "add documents (a .txt file splits on blank lines) or use validation fraction 0"
        )
    by_id = dict(docs)
    started = time.perf_counter()
    stream, n_docs, complete = _tokenize_stream(
        src, [(d, by_id[d]) for d in wanted], split, tokenizer, eos_id, max_tokens
    )
    log.info(
        "data %r (%s): tokenized %d of %d documents into %d tokens in %.1f s",
        src.spec,
        split,
        n_docs,
        len(wanted),
        len(stream),
        time.perf_counter() - started,
    )
    tokens = torch.from_numpy(stream)
    if cache_dir is not None:
        meta = {"key": json.dumps(key, sort_keys=True), "documents": str(n_docs), "complete": str(complete)}
        target = full_path if complete else capped_path
        assert target is not None
        _cache_save(target, tokens, meta)
    return tokens


def _apportion(weights: Sequence[float], total: int) -> list[int]:
    """Integers proportional to ``weights`` summing to ``total`` (largest remainder, ties to the first)."""
    exact = [w * total for w in weights]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def load_blocks(
    spec: str | DataSpec,
    tokenizer: Any,
    max_length: int,
    split: str = "train",
    *,
    seed: int = 0,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    max_blocks: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    max_documents: int | None = None,
    eos_token_id: int | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Packed ``(n_blocks, max_length)`` int64 token blocks of ``split`` ("train" or "validation").

    ``max_blocks`` caps the result and stops tokenizing once each source has its share (quick runs).
    ``cache_dir`` (default :func:`default_cache_dir`) holds the token streams; ``use_cache=False`` skips it.
    ``max_documents`` caps documents read per source (Hub default :data:`DEFAULT_HUB_MAX_DOCUMENTS`).
    ``eos_token_id`` overrides the separator put after every document (default: the tokenizer's eos).
    """
    parsed = spec if isinstance(spec, DataSpec) else parse_data_spec(spec)
    if split not in _SPLITS:
        raise DataError(f"unknown split {split!r}; use 'train' or 'validation'")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise DataError(
            f"max_length must be a positive integer, got {max_length!r}; pass e.g. --max-length 512"
        )
    if max_blocks is not None and (
        isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 1
    ):
        raise DataError(f"max_blocks must be a positive integer or None, got {max_blocks!r}")
    if max_documents is not None and max_documents < 1:
        raise DataError(f"max_documents must be a positive integer or None, got {max_documents!r}")
    _check_fraction(validation_fraction)
    eos_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    if eos_id is None:
        raise DataError(
            "the tokenizer has no eos token to separate documents; pass eos_token_id= "
            "or use a tokenizer with an eos token"
        )
    cache = None
    if use_cache:
        cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    per_source: list[torch.Tensor] = []
    weights: list[float] = []
    for name, weight in parsed.sources:
        src = _resolve_source(name)
        need = None if max_blocks is None else max(1, math.ceil(weight * max_blocks - 1e-9))
        tokens = _source_tokens(
            src,
            tokenizer,
            int(eos_id),
            split,
            validation_fraction,
            max_documents,
            None if need is None else need * max_length,
            cache,
        )
        n_blocks = len(tokens) // max_length
        if n_blocks == 0:
            raise DataError(
                f"data source {name!r} ({split} split) has {len(tokens)} tokens, fewer than "
                f"--max-length {max_length}; use a larger --data or a smaller --max-length"
            )
        per_source.append(tokens[: n_blocks * max_length].view(n_blocks, max_length))
        weights.append(weight)

    if len(per_source) == 1:
        blocks = per_source[0] if max_blocks is None else per_source[0][:max_blocks]
        return blocks.to(torch.int64).contiguous()

    available = [len(b) for b in per_source]
    total = sum(available) if max_blocks is None else min(max_blocks, sum(available))
    counts = _apportion(weights, total)
    picked: list[torch.Tensor] = []
    for i, (blocks, count) in enumerate(zip(per_source, counts, strict=True)):
        rng = np.random.default_rng([_seed_int(seed), 1 + i])
        n = len(blocks)
        if count > n and split == "validation":
            count = n  # never evaluate a block twice
        if count > n:
            log.warning(
                "data source %r: %d %s blocks repeated to fill %d (weight %.3g); add data or lower "
                "its weight",
                parsed.sources[i][0],
                n,
                split,
                count,
                weights[i],
            )
        reps, rest = divmod(count, n)
        index = [rng.permutation(n) for _ in range(reps)] + [rng.permutation(n)[:rest]]
        picked.append(blocks[torch.from_numpy(np.concatenate(index))])
    mixed = torch.cat(picked)
    order = np.random.default_rng([_seed_int(seed), 0]).permutation(len(mixed))
    return mixed[torch.from_numpy(order)].to(torch.int64).contiguous()


def _seed_int(seed: int) -> int:
    return int(seed) % (1 << 63)


# --------------------------------------------------------------------------------------------------------
# Long-range items mixed into training
# --------------------------------------------------------------------------------------------------------

#: Tokens an item's fact, question and answer may take besides its distance: they are at most ~100 ASCII
#: characters, so even a byte-level tokenizer fits them.
LONG_RANGE_ROOM = 128
_MIX_STREAM = len(KINDS)  # item_rng stream of mixed items; make_items uses the kind indices below it


def mix_long_range(
    blocks: torch.Tensor, tokenizer: Any, rate: float, kinds: Sequence[str], distance: int, seed: int
) -> tuple[torch.Tensor, list[tuple[int, Item]]]:
    """Rewrite ``round(rate * n)`` seeded-chosen training blocks as long-range items (train-domain keys).

    The item is laid into the block's own text: ``text[:lead] + fact + text[distance tokens] + question +
    answer + newline``, then the block's text continues to the block length, so every token besides the
    inserted pieces is the block's, in order. Returns the new blocks (the input is not modified) and
    (block index, item) pairs whose spans are positions in that block.
    """
    n, length = blocks.shape
    if distance + LONG_RANGE_ROOM > length:
        raise DataError(
            f"long-range items at distance {distance} need {distance + LONG_RANGE_ROOM} tokens, more than "
            f"the blocks' {length}; use a smaller distance or a larger --max-length"
        )
    chosen = item_rng(seed, "train", _MIX_STREAM).choice(n, size=round(rate * n), replace=False)
    newline = list(tokenizer("\n", add_special_tokens=False)["input_ids"])  # the answer ends its line
    out = blocks.clone()
    items = []
    for index in sorted(chosen.tolist()):
        text = blocks[index]
        choice = item_rng(seed, "train", _MIX_STREAM, index, 0)
        kind = kinds[int(choice.integers(len(kinds)))]
        # Same generator, same texts: a probe at lead 0 tells the item's length before the lead is drawn.
        texts = (seed, "train", _MIX_STREAM, index, 1)
        probe = make_item(kind, tokenizer, text[:distance], distance, item_rng(*texts), "train")
        free = length - len(probe.ids) - len(newline)
        if free < 0:  # only a tokenizer far less compact than bytes gets here
            raise DataError(
                f"a {kind} item at distance {distance} takes {len(probe.ids)} tokens, too many for the "
                f"blocks' {length}; use a smaller distance or a larger --max-length"
            )
        lead = int(choice.integers(0, free + 1))
        filler = text[: lead + distance]
        item = make_item(kind, tokenizer, filler, distance, item_rng(*texts), "train", lead=lead)
        ids = item.ids + newline
        rest = text[lead + distance : lead + distance + length - len(ids)]
        out[index] = torch.cat([torch.tensor(ids, dtype=blocks.dtype), rest])
        items.append((index, item))
    return out, items


# --------------------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------------------


class BlockSampler:
    """Deterministic, resumable batches of block indices, reshuffled every epoch from ``(seed, epoch)``.

    ``iter(sampler)`` yields the batches of the *current* epoch from the current position, then advances to
    the next epoch and stops; loop ``for epoch ...: for batch in sampler`` (or use :meth:`forever`).
    The position is advanced before each batch is handed out, so ``state_dict()`` taken after a batch was
    used resumes with the next one. Use one iterator at a time.
    """

    def __init__(self, n_blocks: int, batch_size: int, seed: int, drop_last: bool = True):
        if n_blocks < 1:
            raise DataError(f"no blocks to sample (n_blocks={n_blocks}); use a larger --data")
        if batch_size < 1:
            raise DataError(f"batch size must be positive, got {batch_size}")
        if drop_last and batch_size > n_blocks:
            raise DataError(
                f"batch size {batch_size} is larger than the {n_blocks} data blocks; use a smaller "
                "--batch-size, a smaller --max-length or a larger --data"
            )
        self.n_blocks = int(n_blocks)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.index = 0  # batches of `epoch` already handed out

    def __len__(self) -> int:
        if self.drop_last:
            return self.n_blocks // self.batch_size
        return -(-self.n_blocks // self.batch_size)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([_seed_int(self.seed), int(epoch)]).permutation(self.n_blocks)

    def state_dict(self) -> dict:
        if self.index >= len(self):
            return {"epoch": self.epoch + 1, "index": 0}
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not (0 <= index <= len(self)):
            raise DataError(
                f"bad sampler state {dict(state)!r} for {len(self)} batches per epoch; resume with "
                "the same data, --max-length and --batch-size"
            )
        self.epoch, self.index = epoch, index

    def __iter__(self) -> Iterator[list[int]]:
        n_batches = len(self)
        if self.index >= n_batches:
            self.epoch, self.index = self.epoch + 1, 0
        order = self._permutation(self.epoch)
        bs = self.batch_size
        while self.index < n_batches:
            i = self.index
            self.index += 1
            yield order[i * bs : (i + 1) * bs].tolist()
        self.epoch, self.index = self.epoch + 1, 0

    def forever(self) -> Iterator[list[int]]:
        """Batches across epochs without end (resumable through :meth:`state_dict` like ``iter``)."""
        while True:
            yield from self
