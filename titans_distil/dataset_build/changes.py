"""The `ast` and `diffs` stages and `coverage`.

`ast` lists each commit's changed files against its first parent (git's own rename detection) and parses both
versions of every source file into declarations. `diffs` turns those into function-level changes: added,
modified (its own code changed: a class counts as modified when the code outside its methods changed, each
method on its own), deleted, renamed (a deleted and an added declaration of the same kind whose code, name
masked, is at least RENAME_SIMILARITY alike) and moved (the same, under the same name in another file). A
declaration inside an added or deleted one is part of that change, not one of its own. A file version with a
syntax error yields no changes: a half-parsed file would show its functions as deleted."""

from __future__ import annotations

import difflib
import functools
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

from ..model_folder import display
from .declarations import Declaration, language_of, parse
from .workspace import EMPTY_TREE, Workspace, commit_metadata, read_json, skip_reason, write_json

RENAME_SIMILARITY = 0.8
# Fuzzy rename matching compares every deleted with every added declaration; beyond this many pairs in one
# commit (a vendored tree replaced) only exact matches are looked for.
MAX_RENAME_PAIRS = 20_000
SUBMODULE_MODE = 0o160000
_GIT_CHANGES = {"A": "added", "D": "deleted", "M": "modified", "R": "renamed", "T": "modified"}


@dataclass
class StageReport:
    """What a stage did over one repository: its closing line, and whether work is left (the command then
    exits non-zero saying what to run)."""

    done: int = 0
    skipped_existing: int = 0
    missing_input: int = 0  # commits whose earlier stage has not run
    failed: int = 0  # commits whose work failed (an LLM answer that stayed unusable)
    failure: str | None = None  # the first failure's reason

    def line(self, stage: str, repo: str) -> str:
        parts = [f"{stage} {repo}: {self.done} commits done", f"{self.skipped_existing} already on disk"]
        if self.missing_input:
            parts.append(f"{self.missing_input} waiting for an earlier stage")
        if self.failed:
            parts.append(f"{self.failed} failed (first: {self.failure}; rerun to retry them)")
        return ", ".join(parts)


def _blob_bytes(blob) -> bytes:
    return blob.data_stream.read()


def _binary(data: bytes) -> bool:
    """git's own test: a NUL byte in the first 8000 bytes (or, here, text that is not UTF-8)."""
    if b"\0" in data[:8000]:
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _side(blob, path: str, language: str, parse_blob) -> dict:
    return {"path": path, "blob": blob.hexsha, **parse_blob(blob, language)}


def commit_ast(repo, commit, languages: tuple[str, ...], max_file_bytes: int, parse_blob) -> list[dict]:
    """The changed files of `commit` against its first parent, each with its status and, for parsed source
    files, the declarations of both versions."""
    base = commit.parents[0] if commit.parents else repo.tree(EMPTY_TREE)
    files = []
    for entry in base.diff(commit, M=True):
        change = _GIT_CHANGES.get(entry.change_type, "modified")
        before = entry.a_blob if change != "added" else None
        after = entry.b_blob if change != "deleted" else None
        path = entry.b_path if after is not None else entry.a_path
        language = language_of(path)
        record = {
            "change": change,
            "before_path": entry.a_path if before is not None else None,
            "after_path": entry.b_path if after is not None else None,
            "language": language,
        }
        blobs = [blob for blob in (before, after) if blob is not None]
        if SUBMODULE_MODE in (entry.a_mode, entry.b_mode):
            files.append({**record, "status": "submodule"})
            continue
        if any(blob.size > max_file_bytes for blob in blobs):
            files.append({**record, "status": "too large"})
            continue
        if language is None:
            binary = any(_binary(_blob_bytes(blob)) for blob in blobs)
            files.append({**record, "status": "binary" if binary else "unsupported language"})
            continue
        if languages and language not in languages:
            files.append({**record, "status": "not selected"})
            continue
        sides = {
            name: _side(blob, record[f"{name}_path"], language, parse_blob) if blob is not None else None
            for name, blob in (("before", before), ("after", after))
        }
        parses = {side["parse"] for side in sides.values() if side is not None}
        status = "binary" if "binary" in parses else "syntax error" if "syntax error" in parses else "parsed"
        files.append({**record, "status": status, **sides})
    return files


def blob_parser(cache_size: int = 4096):
    """parse_blob(blob, language) with a cache (GitPython blobs hash by their id): a commit's new version of a
    file is the next commit's old one, parsed once."""

    @functools.lru_cache(maxsize=cache_size)
    def parse_blob(blob, language: str) -> dict:
        data = _blob_bytes(blob)
        if _binary(data):
            return {"parse": "binary", "declarations": []}
        parsed = parse(data, language)
        return {
            "parse": "syntax error" if parsed.syntax_error else "parsed",
            "declarations": [d.to_json() for d in parsed.declarations],
        }

    return parse_blob


def run_ast(
    ws: Workspace,
    repo_entry,
    repo,
    commits,
    languages: tuple[str, ...],
    max_file_bytes: int,
    force: bool,
    boundary: set[str],
) -> StageReport:
    report = StageReport()
    parse_blob = blob_parser()
    for commit in commits:
        path = ws.stage_file(repo_entry.name, commit.hexsha, "ast")
        if path.is_file() and not force:
            report.skipped_existing += 1
            continue
        reason = skip_reason(commit, boundary)
        files = [] if reason else commit_ast(repo, commit, languages, max_file_bytes, parse_blob)
        write_json(path, {**commit_metadata(repo_entry.name, commit), "skipped": reason, "files": files})
        report.done += 1
    return report


# ------------------------------------------------------------------------------------------- function changes


def _decls(side: dict | None) -> list[Declaration]:
    return [Declaration(**d) for d in side["declarations"]] if side else []


def _own_code(source: bytes, decl: Declaration, decls: list[Declaration]) -> bytes:
    """A declaration's code with the declarations nested in it cut out: a class changes when its own lines
    do, not when one of its methods does (that method is a change of its own)."""
    pieces, cursor = [], decl.start_byte
    for inner in decls:  # in source order; one nested in an already cut one starts before `cursor`
        if inner is decl or inner.start_byte < cursor or inner.end_byte > decl.end_byte:
            continue
        pieces += [source[cursor : inner.start_byte], b"\0"]
        cursor = inner.end_byte
    pieces.append(source[cursor : decl.end_byte])
    return b"".join(pieces)


def _outermost(candidates: list[Declaration]) -> list[Declaration]:
    """Drop the declarations that lie inside another of `candidates` (a method of an added class)."""
    return [
        d
        for d in candidates
        if not any(
            o is not d and o.start_byte <= d.start_byte and d.end_byte <= o.end_byte for o in candidates
        )
    ]


def changed_after_lines(before: str, after: str) -> list[tuple[int, int]]:
    """The 1-based inclusive line ranges of `after` that differ from `before` (inserted or replaced)."""
    matcher = difflib.SequenceMatcher(None, before.splitlines(), after.splitlines(), autojunk=False)
    return [(j1 + 1, j2) for tag, _, _, j1, j2 in matcher.get_opcodes() if tag in ("replace", "insert")]


def changed_before_lines(before: str, after: str) -> list[tuple[int, int]]:
    matcher = difflib.SequenceMatcher(None, before.splitlines(), after.splitlines(), autojunk=False)
    return [(i1 + 1, i2) for tag, i1, i2, _, _ in matcher.get_opcodes() if tag in ("replace", "delete")]


def _clip(ranges: list[tuple[int, int]], start: int, end: int) -> list[list[int]]:
    return [[max(s, start), min(e, end)] for s, e in ranges if s <= end and e >= start]


def _lines_inside(ranges: list[tuple[int, int]], decls: list[Declaration]) -> int:
    lines = {line for s, e in ranges for line in range(s, e + 1)}
    return sum(1 for line in lines if any(d.start_line <= line <= d.end_line for d in decls))


def _masked(code: str, name: str) -> str:
    simple = name.rsplit(".", 1)[-1].rsplit("::", 1)[-1]
    return re.sub(rf"\b{re.escape(simple)}\b", "\0", code) if simple else code


@dataclass
class _Side:
    """One version of a declaration in one file (`index`: the file's place in the commit's list)."""

    file: dict
    index: int
    decl: Declaration
    code: str


def _change(op: str, before: _Side | None, after: _Side | None, after_changes) -> dict:
    some = after or before
    record = {
        "operation": op,
        "kind": some.decl.kind,
        "language": some.file["language"],
        "before_path": before.file["before_path"] if before else None,
        "after_path": after.file["after_path"] if after else None,
        "before_name": before.decl.qualname if before else None,
        "after_name": after.decl.qualname if after else None,
        "before_code": before.code if before else None,
        "after_code": after.code if after else None,
        "before_lines": [before.decl.start_line, before.decl.end_line] if before else None,
        "after_lines": [after.decl.start_line, after.decl.end_line] if after else None,
        "after_blob": after.file["after"]["blob"] if after else None,
        # the lines of the new file this change wrote: the middles of the fill-in-the-middle samples
        "changed_lines": _clip(after_changes(after.index), after.decl.start_line, after.decl.end_line)
        if after
        else [],
    }
    record["id"] = (
        f"{record['after_path'] or record['before_path']}:{record['after_name'] or record['before_name']}"
    )
    return record


def _match_moves(deleted: list[_Side], added: list[_Side]) -> list[tuple[_Side, _Side]]:
    """Pair deleted with added declarations of the same language and kind whose code (name masked) is alike:
    exact matches first, then the most similar pairs above RENAME_SIMILARITY."""
    pairs, used_d, used_a = [], set(), set()
    masked_d = [_masked(s.code, s.decl.name) for s in deleted]
    masked_a = [_masked(s.code, s.decl.name) for s in added]
    by_code = defaultdict(list)
    for j, code in enumerate(masked_a):
        by_code[(added[j].file["language"], added[j].decl.kind, code)].append(j)
    for i, side in enumerate(deleted):
        for j in by_code.get((side.file["language"], side.decl.kind, masked_d[i]), []):
            if j not in used_a:
                pairs.append((side, added[j]))
                used_d.add(i)
                used_a.add(j)
                break
    rest_d = [i for i in range(len(deleted)) if i not in used_d]
    rest_a = [j for j in range(len(added)) if j not in used_a]
    if len(rest_d) * len(rest_a) > MAX_RENAME_PAIRS:
        return pairs
    scored = []
    for i in rest_d:
        for j in rest_a:
            if (deleted[i].file["language"], deleted[i].decl.kind) != (
                added[j].file["language"],
                added[j].decl.kind,
            ):
                continue
            matcher = difflib.SequenceMatcher(None, masked_d[i], masked_a[j], autojunk=False)
            if matcher.real_quick_ratio() >= RENAME_SIMILARITY and matcher.quick_ratio() >= RENAME_SIMILARITY:
                ratio = matcher.ratio()
                if ratio >= RENAME_SIMILARITY:
                    scored.append((-ratio, i, j))
    for _, i, j in sorted(scored):
        if i not in used_d and j not in used_a:
            pairs.append((deleted[i], added[j]))
            used_d.add(i)
            used_a.add(j)
    return pairs


def commit_changes(repo, files: list[dict]) -> tuple[list[dict], list[dict]]:
    """The function-level changes of one commit's parsed files, and per file its changed-line coverage."""
    texts: dict[str, bytes] = {}

    def source(side: dict | None) -> bytes:
        if side is None:
            return b""
        if side["blob"] not in texts:
            texts[side["blob"]] = repo.odb.stream(bytes.fromhex(side["blob"])).read()
        return texts[side["blob"]]

    @functools.cache
    def line_changes(index: int) -> tuple[list, list]:
        file = files[index]
        before = source(file.get("before")).decode("utf-8")
        after = source(file.get("after")).decode("utf-8")
        return changed_before_lines(before, after), changed_after_lines(before, after)

    def after_changes(index: int) -> list:
        return line_changes(index)[1]

    changes, coverage = [], []
    added: list[_Side] = []
    deleted: list[_Side] = []
    for index, file in enumerate(files):
        if file["status"] != "parsed":
            coverage.append({**_file_key(file), "parsed": False, "changed_lines": None})
            continue
        before_src, after_src = source(file.get("before")), source(file.get("after"))
        before_decls, after_decls = _decls(file.get("before")), _decls(file.get("after"))
        before_by = {d.qualname: d for d in before_decls}
        after_by = {d.qualname: d for d in after_decls}

        def side(decl, src, file=file, index=index):
            return _Side(file, index, decl, src[decl.start_byte : decl.end_byte].decode("utf-8"))

        for name in after_by.keys() & before_by.keys():
            b, a = before_by[name], after_by[name]
            if _own_code(before_src, b, before_decls) != _own_code(after_src, a, after_decls):
                changes.append(_change("modified", side(b, before_src), side(a, after_src), after_changes))
        added += [
            side(d, after_src) for d in _outermost([after_by[n] for n in after_by.keys() - before_by.keys()])
        ]
        deleted += [
            side(d, before_src)
            for d in _outermost([before_by[n] for n in before_by.keys() - after_by.keys()])
        ]
        removed, written = line_changes(index)
        coverage.append(
            {
                **_file_key(file),
                "parsed": True,
                "changed_lines": sum(e - s + 1 for s, e in removed + written),
                "changed_lines_in_declarations": _lines_inside(removed, before_decls)
                + _lines_inside(written, after_decls),
            }
        )
    moves = _match_moves(deleted, added)
    paired = {id(s) for pair in moves for s in pair}
    for before, after in moves:
        op = "moved" if before.decl.qualname == after.decl.qualname else "renamed"
        changes.append(_change(op, before, after, after_changes))
    changes += [_change("added", None, s, after_changes) for s in added if id(s) not in paired]
    changes += [_change("deleted", s, None, after_changes) for s in deleted if id(s) not in paired]
    order = {op: i for i, op in enumerate(("added", "modified", "renamed", "moved", "deleted"))}
    changes.sort(key=lambda c: (c["after_path"] or c["before_path"], order[c["operation"]], c["id"]))
    return changes, coverage


def _file_key(file: dict) -> dict:
    return {
        "path": file["after_path"] or file["before_path"],
        "language": file["language"],
        "status": file["status"],
    }


def run_diffs(ws: Workspace, repo_entry, repo, commits, force: bool) -> StageReport:
    report = StageReport()
    for commit in commits:
        path = ws.stage_file(repo_entry.name, commit.hexsha, "diffs")
        if path.is_file() and not force:
            report.skipped_existing += 1
            continue
        ast_path = ws.stage_file(repo_entry.name, commit.hexsha, "ast")
        if not ast_path.is_file():
            report.missing_input += 1
            continue
        ast = read_json(ast_path, "rerun `ast --force` for this repository")
        changes, coverage = commit_changes(repo, ast["files"])
        meta = {
            key: ast[key]
            for key in ("repository", "commit", "parent", "author", "date", "message", "skipped")
        }
        write_json(path, {**meta, "changes": changes, "files": coverage})
        report.done += 1
    return report


# ------------------------------------------------------------------------------------------------ coverage


def coverage_table(ws: Workspace, repos) -> list[dict]:
    """Per language: changed files, how many were parsed, changed lines (of parsed files) and how many lay
    inside a declaration, and the function changes found; from the `diffs` outputs on disk."""
    rows: dict[str, Counter] = defaultdict(Counter)
    statuses: dict[str, Counter] = defaultdict(Counter)
    for repo in repos:
        folder = ws.root / "commits" / repo.name
        for path in sorted(folder.glob("*/diffs.json")) if folder.is_dir() else []:
            diffs = read_json(path, "rerun `diffs --force`")
            for file in diffs["files"]:
                language = file["language"] or "(no grammar)"
                row = rows[language]
                row["files"] += 1
                statuses[language][file["status"]] += 1
                if file["parsed"]:
                    row["parsed"] += 1
                    row["lines"] += file["changed_lines"]
                    row["lines_in_declarations"] += file["changed_lines_in_declarations"]
            for change in diffs["changes"]:
                rows[change["language"]]["changes"] += 1
    return [
        {
            "language": language,
            "changed_files": row["files"],
            "parsed_files": row["parsed"],
            "files_parsed_share": row["parsed"] / row["files"] if row["files"] else 0.0,
            "changed_lines": row["lines"],
            "changed_lines_in_declarations": row["lines_in_declarations"],
            "lines_in_declarations_share": row["lines_in_declarations"] / row["lines"]
            if row["lines"]
            else 0.0,
            "function_changes": row["changes"],
            "not_parsed": {k: v for k, v in sorted(statuses[language].items()) if k != "parsed"},
        }
        for language, row in sorted(rows.items())
    ]


def coverage_markdown(rows: list[dict], where) -> str:
    if not rows:
        return f"no `diffs` outputs in {display(where)} yet; run `ast` and `diffs` first"
    lines = [
        "| language | changed files | parsed | changed lines (parsed files) | in a declaration "
        "| function changes | not parsed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        why = ", ".join(f"{k} {v}" for k, v in r["not_parsed"].items()) or ""
        lines.append(
            f"| {r['language']} | {r['changed_files']} | {r['parsed_files']} ({r['files_parsed_share']:.0%}) "
            f"| {r['changed_lines']} | {r['changed_lines_in_declarations']} "
            f"({r['lines_in_declarations_share']:.0%}) | {r['function_changes']} | {why} |"
        )
    return "\n".join(lines)
