"""A synthetic but realistic git history made from real Python sources (the standard library's), written with
`git fast-import` (hundreds of commits in a second): each commit edits one function of one file, and now and
then adds a file, renames a function or deletes one. Used by the interrupted-stage test and the benchmark."""

from __future__ import annotations

import ast
import random
import subprocess
import sysconfig
from pathlib import Path


def stdlib_sources(count: int, max_bytes: int = 60_000) -> list[tuple[str, str]]:
    """`count` standard-library modules (path relative to the library, text) that parse, smallest first
    beyond 2 KB so that commits stay quick to write."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in sorted(root.glob("*.py")):
        size = path.stat().st_size
        if 2_000 <= size <= max_bytes:
            text = path.read_text(encoding="utf-8", errors="replace")
            try:
                ast.parse(text)
            except SyntaxError:
                continue
            found.append((path.name, text))
        if len(found) == count:
            break
    return found


def _functions(text: str) -> list[ast.FunctionDef]:
    return [
        node
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.body[0].lineno > node.lineno
    ]


def _edit(text: str, step: int, rng: random.Random) -> tuple[str, str]:
    """One edit of one function of `text`: insert a statement (most commits), rename it, or delete it."""
    functions = _functions(text)
    if not functions:
        return text + f"\n\ndef added_{step}():\n    return {step}\n", f"add added_{step}"
    fn = rng.choice(functions)
    lines = text.splitlines(keepends=True)
    roll = rng.random()
    if roll < 0.08 and len(functions) > 3:
        start = min([fn.lineno, *(d.lineno for d in fn.decorator_list)]) - 1
        del lines[start : fn.end_lineno]
        return "".join(lines), f"delete {fn.name}"
    if roll < 0.16:
        line = lines[fn.lineno - 1]
        lines[fn.lineno - 1] = line.replace(f"def {fn.name}(", f"def {fn.name}_v{step}(", 1)
        return "".join(lines), f"rename {fn.name}"
    first = fn.body[0]
    indent = " " * first.col_offset
    lines.insert(first.lineno - 1, f"{indent}_step_{step} = {step}  # edit {step}\n")
    return "".join(lines), f"edit {fn.name}"


def write_history(repo: Path, commits: int, files: int = 40, seed: int = 0) -> None:
    """A fresh repository at `repo` with `commits` commits on `main`."""
    rng = random.Random(seed)
    sources = stdlib_sources(files)
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    tree: dict[str, str] = {}
    stream = []
    pending = list(sources)
    for step in range(commits):
        changes: dict[str, str] = {}
        if pending and (not tree or step % 8 == 0):
            name, text = pending.pop(0)
            changes[f"lib/{name}"] = text
            message = f"add {name}"
        else:
            path = rng.choice(sorted(tree))
            changes[path], message = _edit(tree[path], step, rng)
        tree.update(changes)
        msg = message.encode()
        stream.append(
            f"commit refs/heads/main\nmark :{step + 1}\n"
            f"committer Bench <bench@example.invalid> {1_700_000_000 + step * 60} +0000\n"
            f"data {len(msg)}\n".encode()
            + msg
            + b"\n"
        )
        if step:
            stream.append(f"from :{step}\n".encode())
        for path, text in changes.items():
            data = text.encode()
            stream.append(f"M 100644 inline {path}\ndata {len(data)}\n".encode() + data + b"\n")
        stream.append(b"\n")
    subprocess.run(["git", "fast-import", "--quiet"], cwd=repo, input=b"".join(stream), check=True)
