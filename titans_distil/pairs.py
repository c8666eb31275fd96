"""Input/output pairs for training with the loss on the output tokens only (teacher and student see it all).

A ``--data`` source is read as pairs when its first row has ``input`` and ``output`` fields (or one of them
and no ``text``/``content``/``code`` field, so a missing one is named) and no ``#field`` picks a text field:
a ``.jsonl`` or ``.parquet`` file (split into train / validation by row, with the same
hash rule as documents, see `data.split_documents`) or a dataset folder ``folder:config`` such as the output
of ``build_dataset.py fim`` (its own ``train`` and ``validation`` splits, made by commit or repository, so
``--validation-fraction`` does not apply: the command refuses it). Pairs cannot be mixed with other sources.

One example per block: the prompt tokens, the output tokens, then pad tokens up to ``max_length``. Padding
is on the right, so under causal attention no real token ever sees a pad or another example, and no
attention mask is needed (the MAC students take none). Examples longer than ``max_length`` are dropped and
counted, never truncated (a cut answer would teach stopping mid-way, a cut prompt an answer to another
question). The loss weight of a position is 1 where it predicts an output token, 0 elsewhere (prompt and
pads).

- Chat template, where the tokenizer has one: the user turn is the input, the assistant turn the output;
  the prompt is the template with the generation prompt, the output the rest of the rendered conversation
  (for SmolLM2: the answer, ``<|im_end|>`` and a newline). Without a template: ``input + "\\n"``, then
  ``output`` and the eos token.
- FIM rows (with ``prefix`` and ``suffix`` fields) are never chat-templated: the input is rebuilt as
  prefix-sentinel, prefix, suffix-sentinel, suffix, middle-sentinel with the tokenizer's own FIM tokens when
  its vocabulary has a known set (StarCoder's ``<fim_prefix>``..., Qwen's ``<|fim_prefix|>``...), else with
  StarCoder's names as plain text, which the embedded SmolLM2 tokenizer splits into ordinary tokens (no new
  embedding rows to learn from scratch; the same strings part 1 writes). The output is the middle + eos.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from .data import (
    _ROW_FIELDS,
    DataError,
    _encode,
    _resolve_source,
    _Source,
    dataset_configs,
    parse_data_spec,
    split_documents,
)
from .dataset_build.samples import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX

#: Between input and output when the tokenizer has no chat template.
PLAIN_SEPARATOR = "\n"
#: FIM token sets (prefix, suffix, middle) used when a tokenizer's vocabulary holds all three; the first is
#: also the plain-text fallback.
FIM_TOKENS = ((FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE), ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"))


@dataclass
class PairBlocks:
    """One example per block: ``blocks`` (n, max_length) int64, ``weights`` (n, max_length - 1) float32 (1
    where the position predicts an output token); of the split's ``examples``, ``dropped`` were too long."""

    blocks: torch.Tensor
    weights: torch.Tensor
    examples: int
    dropped: int


def _has_pair_fields(names) -> bool:
    """Both pair fields, or one of them and no text field (a pairs file whose first row lacks the other)."""
    pair = {"input", "output"} & set(names)
    return len(pair) == 2 or (bool(pair) and not set(_ROW_FIELDS) & set(names))


def pairs_source(spec: str) -> _Source | None:
    """The pairs source of a ``--data`` spec, or None when it reads text; refuses pairs in a mixture."""
    sources = parse_data_spec(spec).sources
    found = [src for src in (_resolve_source(name) for name, _ in sources) if _is_pairs(src)]
    if found and len(sources) > 1:
        raise DataError(
            f"--data mixes input/output pairs ({found[0].spec}) with other sources; train on the pairs "
            "source alone"
        )
    return found[0] if found else None


def _is_pairs(src: _Source) -> bool:
    if src.kind == "dataset":
        return True
    if src.field is not None:
        return False
    if src.kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return _has_pair_fields(pq.read_schema(src.path).names)
        except Exception:  # noqa: BLE001 - the text reader names the broken file
            return False
    if src.kind == "jsonl":
        with open(src.path, "rb") as fh:
            for line in fh:
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError:
                        return False  # the text reader names the bad line
                    return isinstance(row, dict) and _has_pair_fields(row)
    return False


def _check_row(row: Any, where: str) -> dict:
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("input", "output")):
        raise DataError(
            f"{where}: no 'input' and 'output' strings; every row of a pairs source needs both, fix or "
            "drop the row"
        )
    if not row["output"].strip():
        raise DataError(f"{where}: empty 'output'; a pair trains on its output only, fix or drop the row")
    return row


def _rows(src: _Source, split: str, validation_fraction: float) -> list[dict]:
    """The split's rows: a dataset folder's own split, a file's rows split by the document hash rule."""
    import pyarrow.parquet as pq

    if src.kind == "dataset":
        files = (dataset_configs(src.path) or {}).get(src.config, {}).get(split)
        if not files:
            raise DataError(
                f"dataset folder {src.spec!r} has no {split} split; build it with a validation fraction > 0"
            )
        return [
            _check_row(row, f"{file.name} row {i}")
            for file in files
            for i, row in enumerate(pq.read_table(file).to_pylist())
        ]
    if src.kind == "parquet":
        rows = {f"row:{i}": row for i, row in enumerate(pq.read_table(src.path).to_pylist())}
    else:
        rows = {}
        with open(src.path, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows[f"line:{lineno}"] = json.loads(line)
                    except ValueError as e:
                        raise DataError(
                            f"{src.path.name}:{lineno}: invalid JSON ({e}); each line of a .jsonl file "
                            "must be one JSON object"
                        ) from None
    for doc_id, row in rows.items():
        _check_row(row, f"{src.path.name}:{doc_id.partition(':')[2]}")
    train_ids, val_ids = split_documents(list(rows), validation_fraction)
    return [rows[i] for i in (train_ids if split == "train" else val_ids)]


def fim_tokens(tokenizer) -> tuple[str, str, str]:
    """The tokenizer's own FIM tokens if its vocabulary has a known set, else the plain-text sentinels."""
    vocab = tokenizer.get_vocab()
    return next((t for t in FIM_TOKENS if all(s in vocab for s in t)), FIM_TOKENS[0])


def prompt_and_output(tokenizer, row: dict, fim: tuple[str, str, str]) -> tuple[str, str, bool]:
    """(prompt text, output text, whether eos must follow) of a row, as the module docstring says."""
    if isinstance(row.get("prefix"), str) and isinstance(row.get("suffix"), str):
        prefix, suffix, middle = fim
        return f"{prefix}{row['prefix']}{suffix}{row['suffix']}{middle}", row["output"], True
    if not getattr(tokenizer, "chat_template", None):
        return row["input"] + PLAIN_SEPARATOR, row["output"], True
    user = [{"role": "user", "content": row["input"]}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        user + [{"role": "assistant", "content": row["output"]}], tokenize=False
    )
    if not full.startswith(prompt):
        raise DataError(
            "the tokenizer's chat template does not render the prompt as the start of the conversation, so "
            "the output tokens cannot be told apart; use a tokenizer whose template does"
        )
    return prompt, full[len(prompt) :], False


def load_pairs(
    spec: str,
    tokenizer,
    max_length: int,
    split: str,
    *,
    validation_fraction: float,
    max_blocks: int | None = None,
) -> PairBlocks:
    """The padded blocks and output weights of a pairs source's split (see the module docstring)."""
    src = pairs_source(spec)
    assert src is not None, "load_pairs needs a pairs source"
    rows = _rows(src, split, validation_fraction)
    if not rows:
        raise DataError(
            f"pairs source {src.spec!r} has no {split} examples; add rows or change --validation-fraction"
        )
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if eos is None:
        raise DataError("the tokenizer has no eos token to end an output; use a tokenizer with one")
    fim = fim_tokens(tokenizer)
    texts = [prompt_and_output(tokenizer, row, fim) for row in rows]
    prompts = _encode(tokenizer, [p for p, _, _ in texts])
    outputs = _encode(tokenizer, [o for _, o, _ in texts])
    kept, lengths = [], []
    for prompt, output, (_, _, add_eos) in zip(prompts, outputs, texts, strict=True):
        ids = prompt + output + ([eos] if add_eos else [])
        lengths.append(len(ids))
        if len(ids) <= max_length and (max_blocks is None or len(kept) < max_blocks):
            kept.append((ids, len(prompt)))
    dropped = sum(n > max_length for n in lengths)
    if not kept:
        raise DataError(
            f"all {len(rows)} {split} pairs of {src.spec!r} are longer than --max-length {max_length} "
            f"tokens (the shortest takes {min(lengths)}); pass --max-length {min(lengths)} or more"
        )
    blocks = torch.full((len(kept), max_length), pad, dtype=torch.int64)
    weights = torch.zeros(len(kept), max_length - 1)
    for i, (ids, n_prompt) in enumerate(kept):
        blocks[i, : len(ids)] = torch.tensor(ids)
        weights[i, n_prompt - 1 : len(ids) - 1] = 1.0  # position p predicts token p + 1
    return PairBlocks(blocks, weights, len(rows), dropped)
