"""The `fim` stage: fill-in-the-middle samples and input/output pairs as a Hugging Face dataset folder.

Three configs, each split into train / validation / test by repository or by commit (never by sample: two
samples of one commit are near-duplicates, and one in each split would leak), exact duplicates dropped first
(whitespace-normalised input + output; the first in history order kept):

- `fim`: one sample per run of changed lines of an added, modified, renamed or moved declaration, taken from
  the new file: `prefix` (up to `--context-lines` lines before it), `middle` (the changed lines themselves),
  `suffix`; `input` = FIM_PREFIX + prefix + FIM_SUFFIX + suffix + FIM_MIDDLE, `output` = middle, `text` =
  input + output (prefix-suffix-middle order, the sentinels as plain text: the trainer decides whether they
  become special tokens, and appends the end-of-sequence token).
- `pairs`: task + the declaration before the commit -> the declaration after it (added, modified, renamed).
- `pairs_reasoning`: the same input -> the first-person reasoning, a blank line, the declaration after.

Saved as parquet under `NAME/SPLIT.parquet` with a README.md dataset card whose YAML declares the configs, so
`datasets.load_dataset(folder, "fim")` reads it and `--push-to-hub` uploads the folder as it is."""

from __future__ import annotations

import hashlib
from collections import Counter

from ..errors import UserError
from ..model_folder import atomic_folder
from .workspace import Workspace, commits, read_json

FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<fim_prefix>", "<fim_suffix>", "<fim_middle>"
CONFIGS = ("fim", "pairs", "pairs_reasoning")
SPLITS = ("train", "validation", "test")
PAIR_OPERATIONS = ("added", "modified", "renamed")


def pair_input(task: str, change: dict) -> str:
    name, path = change["after_name"], change["after_path"]
    if change["before_code"] is None:
        code = f"The {change['kind']} `{name}` does not exist yet."
    else:
        fence = f"```{change['language']}"
        code = f"The {change['kind']} `{change['before_name']}` now:\n{fence}\n{change['before_code']}\n```"
    return f"Task: {task}\nFile: {path}\n{code}\nWrite the {change['kind']} `{name}` after the change."


def _lines_of(repo, blob: str, cache: dict) -> list[str]:
    if blob not in cache:
        cache.clear()  # one file at a time: the changes of a file are next to each other
        cache[blob] = repo.odb.stream(bytes.fromhex(blob)).read().decode("utf-8").splitlines(keepends=True)
    return cache[blob]


def fim_rows(repo, change: dict, context_lines: int, cache: dict) -> list[dict]:
    lines = _lines_of(repo, change["after_blob"], cache)
    rows = []
    for start, end in change["changed_lines"]:
        middle = "".join(lines[start - 1 : end])
        if not middle.strip():
            continue
        first = 0 if context_lines == 0 else max(0, start - 1 - context_lines)
        last = len(lines) if context_lines == 0 else end + context_lines
        prefix, suffix = "".join(lines[first : start - 1]), "".join(lines[end:last])
        model_input = f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}"
        rows.append(
            {
                "prefix": prefix,
                "middle": middle,
                "suffix": suffix,
                "input": model_input,
                "output": middle,
                "text": model_input + middle,
                "middle_lines": [start, end],
            }
        )
    return rows


def _meta(diffs: dict, change: dict) -> dict:
    return {
        "repository": diffs["repository"],
        "commit": diffs["commit"],
        "path": change["after_path"] or change["before_path"],
        "language": change["language"],
        "operation": change["operation"],
        "kind": change["kind"],
        "name": change["after_name"] or change["before_name"],
    }


def split_of(group: str, validation: float, test: float) -> str:
    """A stable split for a repository or commit: the first 8 hex digits of its SHA-256 as a share of 1."""
    share = int(hashlib.sha256(group.encode()).hexdigest()[:8], 16) / 16**8
    return "test" if share < test else "validation" if share < test + validation else "train"


def _dedup_key(row: dict) -> str:
    return hashlib.sha256(
        (" ".join(row["input"].split()) + "\0" + " ".join(row["output"].split())).encode()
    ).hexdigest()


def collect(ws: Workspace, repos, max_commits: int | None, context_lines: int) -> tuple[dict, Counter]:
    """The rows of every config in history order, and what was missing (commits without diffs, tasks,
    reasoning) for the card and the closing line."""
    rows = {name: [] for name in CONFIGS}
    missing: Counter = Counter()
    for entry in repos:
        repo, history = commits(entry, max_commits)
        cache: dict = {}
        for commit in history:
            folder = ws.commit_dir(entry.name, commit.hexsha)
            if not (folder / "diffs.json").is_file():
                missing["commits without diffs"] += 1
                continue
            diffs = read_json(folder / "diffs.json", "rerun `diffs --force`")
            if not diffs["changes"]:
                continue
            task = (
                read_json(folder / "task.json", "rerun `tasks --force`")["task"]
                if (folder / "task.json").is_file()
                else None
            )
            reasoning = (
                read_json(folder / "reasoning.json", "rerun `reasoning --force`")["reasoning"]
                if (folder / "reasoning.json").is_file()
                else {}
            )
            if task is None:
                missing["commits without a task"] += 1
            for change in diffs["changes"]:
                meta = _meta(diffs, change)
                if change["after_code"] is not None:
                    rows["fim"] += [{**meta, **row} for row in fim_rows(repo, change, context_lines, cache)]
                if task is None or change["operation"] not in PAIR_OPERATIONS:
                    continue
                model_input = pair_input(task, change)
                rows["pairs"].append({**meta, "input": model_input, "output": change["after_code"]})
                if change["id"] in reasoning:
                    output = f"{reasoning[change['id']]}\n\n{change['after_code']}"
                    rows["pairs_reasoning"].append({**meta, "input": model_input, "output": output})
                else:
                    missing["changes without reasoning"] += 1
    return rows, missing


def deduplicate(rows: list[dict]) -> tuple[list[dict], int]:
    seen, kept = set(), []
    for row in rows:
        key = _dedup_key(row)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept, len(rows) - len(kept)


def _table(title: str, counts: Counter) -> list[str]:
    lines = [f"| {title} | samples |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in sorted(counts.items())]
    return lines + [""]


def dataset_card(built: dict, dropped: dict, missing: Counter, split_by: str, fractions: tuple) -> str:
    yaml = ["---", "configs:"]
    for name, splits in built.items():
        yaml.append(f"- config_name: {name}")
        yaml.append("  data_files:")
        for split in splits:
            yaml += [f"  - split: {split}", f"    path: {name}/{split}.parquet"]
    yaml += ["tags:", "- code", "- titans-distil", "---", ""]
    body = [
        "# Code-history dataset built by titans-distil",
        "",
        "Function-level changes of git histories (`build_dataset.py`): fill-in-the-middle samples from the "
        "exact changed lines (`fim`: `prefix`, `middle`, `suffix`; `input` = "
        f"`{FIM_PREFIX}` prefix `{FIM_SUFFIX}` suffix `{FIM_MIDDLE}`, `output` = middle, `text` = input + "
        "output) and input/output pairs (`pairs`: task + code before -> code after; `pairs_reasoning`: the "
        "same with the developer's first-person reasoning before the code). Tasks and reasoning were written "
        "by an LLM.",
        "",
        f"Splits by {split_by} (validation {fractions[0]:g}, test {fractions[1]:g}, by a hash of the "
        f"{split_by}), never by sample; exact duplicates (whitespace-normalised input + output) dropped.",
        "",
    ]
    for name, splits in built.items():
        rows = [row for split_rows in splits.values() for row in split_rows]
        body += [f"## {name}: {len(rows)} samples", ""]
        body.append(
            ", ".join(f"{split} {len(r)}" for split, r in splits.items())
            + f"; {dropped[name]} duplicates dropped"
        )
        body.append("")
        for field in ("repository", "language", "operation"):
            body += _table(field, Counter(row[field] for row in rows))
    empty = [name for name in CONFIGS if name not in built]
    if empty or missing:
        body += ["## Not included", ""]
        body += [f"- {name}: no samples" for name in empty]
        body += [f"- {what}: {count}" for what, count in sorted(missing.items())]
        body.append("")
    return "\n".join(yaml + body)


def build(
    ws: Workspace,
    repos,
    *,
    output,
    max_commits: int | None,
    context_lines: int,
    split_by: str,
    validation: float,
    test: float,
    log,
):
    """Write the dataset folder; return the samples per config and split, the duplicates dropped per config
    and what was missing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if validation + test >= 1:
        raise UserError("--validation-fraction plus --test-fraction must stay below 1, or train is empty")
    rows, missing = collect(ws, repos, max_commits, context_lines)
    built, dropped = {}, {}
    for name in CONFIGS:
        kept, dropped[name] = deduplicate(rows[name])
        splits = {split: [] for split in SPLITS}
        for row in kept:
            # by the commit's id alone: the same commit in a fork lands in the same split
            group = row["repository"] if split_by == "repository" else row["commit"]
            splits[split_of(group, validation, test)].append(row)
        splits = {split: r for split, r in splits.items() if r}
        if splits:
            built[name] = splits
    if not built:
        raise UserError("no samples: run `ast` and `diffs` first (and `tasks`, `reasoning` for the pairs)")
    if split_by == "repository" and len(repos) == 1:
        log("note: --split-by repository with one repository puts every sample in one split")
    with atomic_folder(output) as tmp:
        for name, splits in built.items():
            (tmp / name).mkdir()
            for split, split_rows in splits.items():
                pq.write_table(pa.Table.from_pylist(split_rows), tmp / name / f"{split}.parquet")
        (tmp / "README.md").write_text(
            dataset_card(built, dropped, missing, split_by, (validation, test)), encoding="utf-8"
        )
    counts = {name: {split: len(r) for split, r in splits.items()} for name, splits in built.items()}
    return counts, dropped, missing
