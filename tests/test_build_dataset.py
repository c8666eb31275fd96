"""build_dataset.py (issue 14, part 1): every stage on a small fixture repository made here with GitPython,
checked against hand-computed expectations, and the bad input of each stage.

The fixture's history (oldest first): c1 adds app.py (keep, change_me, remove_me, old_name, class Box with
size), script.lua; c2 modifies change_me, deletes remove_me, renames old_name to new_name, adds added_fn,
edits script.lua, adds the binary icon.png; c3 leaves a syntax error in app.py (and edits keep); c4 fixes it;
c5 adds lib.rs and a submodule entry; a side branch from c4 adds feature.py (c6), merged into main (c7).

The LLM stages talk to a small OpenAI-compatible server in this process (`FakeLLM`: /v1/models and
/v1/chat/completions, answers scripted per test: a 503, a malformed body, an empty answer); a real vLLM server
is the README's documented recipe, too slow to start for the suite. Nothing is downloaded."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import git
import pytest
from click.testing import CliRunner
from git_history import write_history

from titans_distil.commands import main
from titans_distil.dataset_build.llm import REASONING_ASK, SUMMARY_ASK, TASK_ASK
from titans_distil.dataset_build.samples import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, deduplicate

ROOT = Path(__file__).resolve().parents[1]

APP_V1 = """def keep():
    return 1


def change_me(x):
    y = x + 1
    return y


def remove_me():
    return "bye"


def old_name(a, b):
    total = a + b
    return total * 2


class Box:
    def size(self):
        return 3
"""
APP_V2 = """def keep():
    return 1


def change_me(x):
    y = x + 2
    return y


def new_name(a, b):
    total = a + b
    return total * 2


class Box:
    def size(self):
        return 3


def added_fn():
    return [1, 2]
"""
APP_BROKEN = APP_V2.replace("def keep():\n    return 1", "def keep(:\n    return 11")
APP_V4 = APP_V2.replace("return 1\n", "return 111\n", 1)
LIB_RS = """struct Counter {
    n: u32,
}

impl Counter {
    fn new() -> Counter {
        Counter { n: 0 }
    }
}

fn add(a: u32, b: u32) -> u32 {
    a + b
}
"""
FEATURE = "def feature():\n    return 'on'\n"


def _commit(repo, files: dict, message: str, day: int, remove=()):
    root = Path(repo.working_tree_dir)
    for path, content in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content if isinstance(content, bytes) else content.encode())
    if files:
        repo.index.add(list(files))
    if remove:
        repo.index.remove(list(remove), working_tree=True)
    stamp = f"2026-01-{day:02d}T12:00:00"
    actor = git.Actor("Fixture Author", "fixture@example.invalid")
    return repo.index.commit(message, author=actor, committer=actor, author_date=stamp, commit_date=stamp)


@pytest.fixture(scope="module")
def fixture_repo(tmp_path_factory):
    path = tmp_path_factory.mktemp("fixture") / "proj"
    repo = git.Repo.init(path, initial_branch="main")
    shas = {}
    shas["c1"] = _commit(repo, {"app.py": APP_V1, "script.lua": "print('a')\n"}, "Add the app", 1).hexsha
    shas["c2"] = _commit(
        repo,
        {"app.py": APP_V2, "script.lua": "print('b')\n", "icon.png": b"\x89PNG\r\n\x1a\n\x00\x00binary"},
        "Rework the helpers",
        2,
    ).hexsha
    shas["c3"] = _commit(repo, {"app.py": APP_BROKEN}, "Half-finished edit", 3).hexsha
    shas["c4"] = _commit(repo, {"app.py": APP_V4}, "Fix the syntax error", 4).hexsha
    repo.git.checkout("-b", "side")
    shas["c6"] = _commit(repo, {"feature.py": FEATURE}, "Add the feature flag", 6).hexsha
    repo.git.checkout("main")
    # a submodule entry (gitlink) without a .gitmodules remote: only its mode matters here
    repo.git.update_index("--add", "--cacheinfo", f"160000,{shas['c1']},vendor/dep")
    shas["c5"] = _commit(repo, {"lib.rs": LIB_RS}, "Add the Rust counter", 5).hexsha
    stamp = "2026-01-07T12:00:00"
    repo.git.merge(
        "side", "--no-ff", "-m", "Merge side", env={"GIT_AUTHOR_DATE": stamp, "GIT_COMMITTER_DATE": stamp}
    )
    shas["c7"] = repo.head.commit.hexsha
    return path, shas


def cli(*args, env=None):
    result = CliRunner().invoke(main, ["data", *map(str, args)], env=env)
    return result


def ok(*args, env=None):
    result = cli(*args, env=env)
    assert result.exit_code == 0, result.output
    return result.output


def refused(*args, env=None) -> str:
    result = cli(*args, env=env)
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return lines[-1]


def stage(ws: Path, repo: str, sha: str, name: str) -> dict:
    return json.loads((ws / "commits" / repo / sha / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def built(fixture_repo, tmp_path_factory):
    """A workspace with the fixture tracked and `ast` + `diffs` run (read-only for the tests using it)."""
    path, shas = fixture_repo
    ws = tmp_path_factory.mktemp("ws")
    ok("repos", "add", path, "--output-dir", ws)
    ok("ast", "--output-dir", ws)
    ok("diffs", "--output-dir", ws)
    return ws, shas


# ----------------------------------------------------------------------------------------------- repos


def test_repos_add_list_remove_and_bad_sources(fixture_repo, tmp_path):
    path, _ = fixture_repo
    ws = tmp_path / "ws"
    out = ok("repos", "add", path, "--output-dir", ws)
    assert "tracking proj" in out and "has submodules: they are not followed" in out
    assert "already tracked" in ok("repos", "add", path, "--output-dir", ws)
    assert "a repository named proj is already tracked" in refused(
        "repos", "add", tmp_path, "--name", "proj", "--output-dir", ws
    )
    # a clone URL: a bare clone under clones/, shallow with --depth (its boundary commit is skipped later)
    out = ok("repos", "add", f"file://{path}", "--name", "shallow", "--depth", "2", "--output-dir", ws)
    assert "shallow: the commits at its boundary are skipped" in out
    clone = ws / "clones" / "shallow"
    assert (clone / "HEAD").is_file() and not (clone / "app.py").exists()
    listed = ok("repos", "list", "--output-dir", ws)
    assert listed.splitlines()[0].startswith(f"proj\t{path}\trev HEAD")
    assert "shallow\tfile://" in listed
    ok("ast", "--repo", "shallow", "--output-dir", ws)
    # depth 2 from the merge: the merge, its two parents (c5, c6), whose own parents were not fetched
    skipped = sorted(
        str(json.loads(p.read_text())["skipped"]) for p in (ws / "commits" / "shallow").glob("*/ast.json")
    )
    assert skipped == ["merge commit", *["shallow clone boundary (parent not fetched)"] * 2]
    out = ok("repos", "remove", "shallow", "--output-dir", ws)
    assert "its outputs stay in" in out and not clone.exists()
    assert "shallow" not in ok("repos", "list", "--output-dir", ws)

    assert "is not a git repository" in refused("repos", "add", tmp_path, "--output-dir", ws)
    assert "does not exist" in refused("repos", "add", tmp_path / "nowhere", "--output-dir", ws)
    assert "--depth only applies to clone URLs" in refused(
        "repos", "add", path, "--depth", "1", "--output-dir", ws
    )
    assert "is not a revision" in refused(
        "repos", "add", path, "--name", "x", "--rev", "nope", "--output-dir", ws
    )
    assert "cannot clone file:///no/such/repo" in refused(
        "repos", "add", "file:///no/such/repo", "--output-dir", ws
    )
    assert not (ws / "clones" / "repo").exists()
    assert "not tracked" in refused("repos", "remove", "ghost", "--output-dir", ws)
    assert "--repo ghost: not tracked" in refused("ast", "--repo", "ghost", "--output-dir", ws)
    assert "no repositories are tracked" in refused("ast", "--output-dir", tmp_path / "empty")
    (tmp_path / "a-file").write_text("")
    assert "is a file; pass a folder" in refused("repos", "list", "--output-dir", tmp_path / "a-file")
    assert "which is a file, not a folder" in refused("ast", "--output-dir", tmp_path / "a-file" / "ws")


# ------------------------------------------------------------------------------------------------- ast


def test_ast_statuses_and_declarations(built):
    ws, shas = built
    c1 = stage(ws, "proj", shas["c1"], "ast")
    files = {f["after_path"]: f for f in c1["files"]}
    assert files["script.lua"]["status"] == "unsupported language"
    app = files["app.py"]
    assert (app["status"], app["change"], app["before"]) == ("parsed", "added", None)
    assert [
        (d["qualname"], d["kind"], d["start_line"], d["end_line"]) for d in app["after"]["declarations"]
    ] == [
        ("keep", "function", 1, 2),
        ("change_me", "function", 5, 7),
        ("remove_me", "function", 10, 11),
        ("old_name", "function", 14, 16),
        ("Box", "class", 19, 21),
        ("Box.size", "method", 20, 21),
    ]
    c2 = {f["after_path"]: f["status"] for f in stage(ws, "proj", shas["c2"], "ast")["files"]}
    assert c2 == {"app.py": "parsed", "icon.png": "binary", "script.lua": "unsupported language"}
    assert [f["status"] for f in stage(ws, "proj", shas["c3"], "ast")["files"]] == ["syntax error"]
    assert [f["status"] for f in stage(ws, "proj", shas["c4"], "ast")["files"]] == ["syntax error"]
    c5 = {f["after_path"]: f for f in stage(ws, "proj", shas["c5"], "ast")["files"]}
    assert c5["vendor/dep"]["status"] == "submodule"
    rust = [(d["qualname"], d["kind"]) for d in c5["lib.rs"]["after"]["declarations"]]
    assert rust == [("Counter", "class"), ("Counter.new", "method"), ("add", "function")]
    merge = stage(ws, "proj", shas["c7"], "ast")
    assert (merge["skipped"], merge["files"]) == ("merge commit", [])
    assert merge["parent"] == shas["c5"] and merge["message"] == "Merge side"


def test_ast_is_idempotent_and_force_redoes(built, fixture_repo, tmp_path):
    ws, shas = built
    out = ok("ast", "--output-dir", ws)
    assert "ast proj: 0 commits done, 7 already on disk" in out
    # --force on a copy, so the shared workspace stays as it is
    path, _ = fixture_repo
    copy = tmp_path / "ws"
    ok("repos", "add", path, "--output-dir", copy)
    ok("ast", "--max-commits", "2", "--output-dir", copy)
    assert len(list((copy / "commits" / "proj").glob("*/ast.json"))) == 2  # the newest two: c7 and c6/c5
    target = copy / "commits" / "proj" / shas["c7"] / "ast.json"
    before = target.stat().st_mtime_ns
    assert "2 commits done" in ok("ast", "--max-commits", "2", "--force", "--output-dir", copy)
    assert target.stat().st_mtime_ns != before


def test_unknown_language_and_stage_order(built, fixture_repo, tmp_path):
    ws, _ = built
    assert refused("ast", "--languages", "python,cobol", "--output-dir", ws) == (
        "Error: --languages: unknown language cobol; pick from c, cpp, go, java, javascript, python, rust, "
        "tsx, typescript"
    )
    path, _ = fixture_repo
    fresh = tmp_path / "ws"
    ok("repos", "add", path, "--output-dir", fresh)
    out = cli("diffs", "--output-dir", fresh).output
    assert "diffs proj: 0 commits done, 0 already on disk, 7 waiting for an earlier stage" in out
    assert out.strip().splitlines()[-1].startswith("Error: diffs left commits undone in proj: run `ast`")
    ok("ast", "--languages", "rust", "--output-dir", fresh)
    c1 = stage(fresh, "proj", fixture_repo[1]["c1"], "ast")
    assert {f["after_path"]: f["status"] for f in c1["files"]}["app.py"] == "not selected"


# ----------------------------------------------------------------------------------------------- diffs


def _ops(diffs: dict) -> list[tuple]:
    return [(c["operation"], c["kind"], c["before_name"], c["after_name"]) for c in diffs["changes"]]


def test_diffs_function_level_changes(built):
    ws, shas = built
    c1 = stage(ws, "proj", shas["c1"], "diffs")
    # a new file: each top-level declaration added once; Box.size is part of the added class
    assert _ops(c1) == [
        ("added", "class", None, "Box"),
        ("added", "function", None, "change_me"),
        ("added", "function", None, "keep"),
        ("added", "function", None, "old_name"),
        ("added", "function", None, "remove_me"),
    ]
    c2 = stage(ws, "proj", shas["c2"], "diffs")
    assert (c2["commit"], c2["parent"], c2["author"], c2["message"]) == (
        shas["c2"],
        shas["c1"],
        "Fixture Author",
        "Rework the helpers",
    )
    assert c2["date"].startswith("2026-01-02T12:00:00")
    assert _ops(c2) == [
        ("added", "function", None, "added_fn"),
        ("modified", "function", "change_me", "change_me"),
        ("renamed", "function", "old_name", "new_name"),
        ("deleted", "function", "remove_me", None),
    ]
    by_op = {c["operation"]: c for c in c2["changes"]}
    assert by_op["modified"]["before_code"] == "def change_me(x):\n    y = x + 1\n    return y"
    assert by_op["modified"]["after_code"] == "def change_me(x):\n    y = x + 2\n    return y"
    assert (by_op["modified"]["after_lines"], by_op["modified"]["changed_lines"]) == ([5, 7], [[6, 6]])
    assert (by_op["renamed"]["before_lines"], by_op["renamed"]["after_lines"]) == ([14, 16], [10, 12])
    assert by_op["renamed"]["changed_lines"] == [[10, 10]]
    assert (by_op["added"]["after_lines"], by_op["added"]["changed_lines"]) == ([20, 21], [[20, 21]])
    assert by_op["deleted"]["after_code"] is None and by_op["deleted"]["changed_lines"] == []
    assert by_op["deleted"]["id"] == "app.py:remove_me"
    assert {f["path"]: (f["status"], f["parsed"]) for f in c2["files"]} == {
        "app.py": ("parsed", True),
        "icon.png": ("binary", False),
        "script.lua": ("unsupported language", False),
    }
    # the syntax error and its fix contribute no changes (half-parsed files would show deletions)
    assert stage(ws, "proj", shas["c3"], "diffs")["changes"] == []
    assert stage(ws, "proj", shas["c4"], "diffs")["changes"] == []
    # Rust methods live in the impl block, outside the struct: an added change of their own
    assert _ops(stage(ws, "proj", shas["c5"], "diffs")) == [
        ("added", "class", None, "Counter"),
        ("added", "method", None, "Counter.new"),
        ("added", "function", None, "add"),
    ]
    assert _ops(stage(ws, "proj", shas["c6"], "diffs")) == [("added", "function", None, "feature")]
    merge = stage(ws, "proj", shas["c7"], "diffs")
    assert (merge["skipped"], merge["changes"]) == ("merge commit", [])


def test_coverage_per_language(built):
    ws, _ = built
    rows = {row["language"]: row for row in json.loads(ok("coverage", "--json", "--output-dir", ws))}
    assert sorted(rows) == ["(no grammar)", "python", "rust"]
    python = rows["python"]
    # app.py in c1..c4 (c3, c4 with a syntax error), feature.py in c6
    assert (python["changed_files"], python["parsed_files"]) == (5, 3)
    assert python["not_parsed"] == {"syntax error": 2}
    assert python["function_changes"] == 5 + 4 + 1
    assert rows["rust"]["function_changes"] == 3 and rows["rust"]["files_parsed_share"] == 1.0
    assert rows["(no grammar)"]["not_parsed"] == {"binary": 1, "submodule": 1, "unsupported language": 2}
    table = ok("coverage", "--output-dir", ws)
    assert table.splitlines()[0].startswith("| language | changed files | parsed |")
    assert "| python | 5 | 3 (60%) |" in table


# -------------------------------------------------------------------------------------------- the LLM


class FakeLLM:
    """An OpenAI-compatible endpoint on 127.0.0.1: `script` lists what the next chat requests get ("503",
    "400", "malformed", "empty", "loop": one phrase repeated); after it, a deterministic answer."""

    def __init__(self):
        self.script: list[str] = []
        self.requests: list[dict] = []
        self.always: tuple[str, str] | None = None  # (a text in the prompt, the behaviour its requests get)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: bytes):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(
                        200,
                        json.dumps(
                            {"object": "list", "data": [{"id": "fake-coder", "object": "model"}]}
                        ).encode(),
                    )
                else:
                    self._send(404, b'{"error": {"message": "no such route"}}')

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                behaviour = fake.script.pop(0) if fake.script else "ok"
                prompt = body["messages"][-1]["content"]
                if fake.always and fake.always[0] in prompt:
                    behaviour = fake.always[1]
                if behaviour in ("503", "400"):
                    message = {"503": "busy", "400": "prompt too long for the context"}[behaviour]
                    self._send(int(behaviour), json.dumps({"error": {"message": message}}).encode())
                    return
                if behaviour == "malformed":
                    self._send(200, b'{"id": "x", "object": "chat.completion", "choices": []}')
                    return
                text = {"empty": "", "loop": "The task:\n\n" * 40}.get(behaviour) or fake.answer(prompt)
                text = "" if behaviour == "empty" else text
                answer = {
                    "id": "cmpl-1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                }
                self._send(200, json.dumps(answer).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def answer(prompt: str) -> str:
        """By the instruction on the prompt's last line (titans_distil.dataset_build.llm)."""
        if prompt.endswith(SUMMARY_ASK):
            return f"Summary of {prompt.splitlines()[0]}"
        if prompt.endswith(TASK_ASK):
            return "Task: " + re.search(r"^Commit message: (.*)$", prompt, re.M)[1]
        if prompt.endswith(REASONING_ASK):
            operations = ("added", "modified", "renamed", "deleted", "moved")
            head = next(line for line in prompt.splitlines() if line.split(" ")[0] in operations)
            return f"I {head}."
        return "OK"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_llm():
    server = FakeLLM()
    yield server
    server.close()


def _copy_built(built, tmp_path) -> Path:
    import shutil

    ws = tmp_path / "ws"
    shutil.copytree(built[0], ws)
    return ws


def test_llm_check_tasks_and_reasoning(built, fake_llm, tmp_path):
    ws, shas = _copy_built(built, tmp_path), built[1]
    out = ok("llm-check", "--base-url", fake_llm.url)
    assert out.startswith(f"{fake_llm.url}: models fake-coder; fake-coder answered 'OK' in ")
    fake_llm.requests.clear()
    out = ok("tasks", "--base-url", fake_llm.url, "--output-dir", ws)
    # commits with function changes: c1, c2, c5, c6 (c3, c4: syntax errors; c7: the merge)
    assert "tasks proj: 4 commits done, 0 already on disk" in out
    assert len(fake_llm.requests) == 4
    task = stage(ws, "proj", shas["c2"], "task")
    assert task == {
        "task": "Task: Rework the helpers",
        "chunks": 1,
        "model": "fake-coder",
        "base_url": fake_llm.url,
    }
    assert not (ws / "commits" / "proj" / shas["c3"] / "task.json").exists()
    assert "0 commits done, 4 already on disk" in ok("tasks", "--base-url", fake_llm.url, "--output-dir", ws)

    fake_llm.requests.clear()
    out = ok("reasoning", "--base-url", fake_llm.url, "--concurrency", "2", "--output-dir", ws)
    assert "reasoning proj: 4 commits done" in out
    assert len(fake_llm.requests) == 5 + 4 + 3 + 1  # one per changed declaration
    reasoning = stage(ws, "proj", shas["c2"], "reasoning")["reasoning"]
    assert reasoning == {
        "app.py:added_fn": "I added function added_fn.",
        "app.py:change_me": "I modified function change_me.",
        "app.py:new_name": "I renamed function new_name.",
        "app.py:remove_me": "I deleted function remove_me.",
    }
    assert any(
        r["messages"][1]["content"].startswith("Task: Task: Rework the helpers\n") for r in fake_llm.requests
    )

    # chunking: with small chunks c1's diff (5 added declarations) is summarised part by part first
    fake_llm.requests.clear()
    ok(
        "tasks",
        "--repo",
        "proj",
        "--max-prompt-chars",
        "500",
        "--force",
        "--base-url",
        fake_llm.url,
        "--output-dir",
        ws,
    )
    c1 = stage(ws, "proj", shas["c1"], "task")
    assert c1["chunks"] > 1 and c1["task"] == "Task: Add the app"
    summaries = [r for r in fake_llm.requests if r["messages"][1]["content"].endswith(SUMMARY_ASK)]
    finals = [r for r in fake_llm.requests if r["messages"][1]["content"].endswith(TASK_ASK)]
    chunked = [stage(ws, "proj", shas[c], "task")["chunks"] for c in ("c1", "c2", "c5", "c6")]
    assert len(finals) == 4 and len(summaries) == sum(n for n in chunked if n > 1)
    assert all(len(r["messages"][1]["content"]) < 700 for r in summaries)

    # clean: --dry-run lists, then removes; the rerun asks again
    out = ok("clean", "--tasks", "--reasoning", "--dry-run", "--output-dir", ws)
    assert out.splitlines()[-1] == "would remove 8 files (task, reasoning)"
    assert len(list((ws / "commits").glob("*/*/task.json"))) == 4
    assert ok("clean", "--reasoning", "--output-dir", ws).splitlines()[-1] == "removed 4 files (reasoning)"
    assert not list((ws / "commits").glob("*/*/reasoning.json")) and list(
        (ws / "commits").glob("*/*/task.json")
    )
    assert "clean needs --tasks and/or --reasoning" in refused("clean", "--output-dir", ws)


def test_llm_retries_503_and_malformed_answers(built, fake_llm, tmp_path):
    ws, shas = _copy_built(built, tmp_path), built[1]
    fake_llm.script = ["503", "malformed", "empty", "loop"]
    out = ok("tasks", "--concurrency", "1", "--base-url", fake_llm.url, "--output-dir", ws)
    assert "4 commits done" in out
    # the 503 is retried by the client; the malformed, empty and looping answers are asked again: 4 + 4
    assert len(fake_llm.requests) == 8
    assert all(not stage(ws, "proj", shas[c], "task")["task"].startswith("The task:") for c in ("c1", "c2"))
    # an answer that stays malformed: that commit is left undone, the others are written, exit non-zero
    fake_llm.always = ("Rework the helpers", "malformed")
    out = cli("tasks", "--force", "--retries", "1", "--base-url", fake_llm.url, "--output-dir", ws).output
    assert (
        "tasks proj: 3 commits done, 0 already on disk, 1 failed (first: a completion without choices; rerun "
        "to retry them)"
    ) in out
    assert out.strip().splitlines()[-1].startswith("Error: tasks left commits undone in proj")
    fake_llm.always = None
    (ws / "commits" / "proj" / shas["c2"] / "task.json").unlink(missing_ok=True)
    assert "1 commits done, 3 already on disk" in ok("tasks", "--base-url", fake_llm.url, "--output-dir", ws)
    # a request the endpoint refuses (400) fails alone; reasoning keeps what it got, and only the missing
    # answer is asked for again
    fake_llm.always = ("new_name", "400")
    out = cli("reasoning", "--base-url", fake_llm.url, "--output-dir", ws).output
    assert "1 failed (first: refused with 400: prompt too long for the context; rerun" in out
    assert "app.py:new_name" not in stage(ws, "proj", shas["c2"], "reasoning")["reasoning"]
    assert len(stage(ws, "proj", shas["c2"], "reasoning")["reasoning"]) == 3
    fake_llm.always = None
    fake_llm.requests.clear()
    assert "1 commits done, 3 already on disk" in ok(
        "reasoning", "--base-url", fake_llm.url, "--output-dir", ws
    )
    assert len(fake_llm.requests) == 1
    assert len(stage(ws, "proj", shas["c2"], "reasoning")["reasoning"]) == 4


def test_unreachable_endpoint_is_one_line(built, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    start = time.perf_counter()
    message = refused("llm-check", "--base-url", url, "--retries", "1")
    assert message.startswith(f"Error: no answer from {url} after 1 retries (")
    assert message.endswith("start the server (bin/serve MODEL_DIR) or pass --base-url")
    assert time.perf_counter() - start < 10
    ws = _copy_built(built, tmp_path)
    assert refused("tasks", "--base-url", url, "--retries", "0", "--output-dir", ws).startswith(
        f"Error: no answer from {url}"
    )
    assert not list((ws / "commits").glob("*/*/task.json"))


def test_endpoint_that_stays_busy_or_is_the_wrong_url(built, fake_llm, tmp_path):
    ws = _copy_built(built, tmp_path)
    fake_llm.script = ["503"] * 8
    message = refused(
        "tasks", "--concurrency", "1", "--retries", "1", "--base-url", fake_llm.url, "--output-dir", ws
    )
    assert message == f"Error: {fake_llm.url} answered 503 after 1 retries (busy); check the server"
    # the stage stops at the first: at most the one job the single worker had already taken also ran
    assert len(fake_llm.requests) in (2, 4) and not list((ws / "commits").glob("*/*/task.json"))
    root = fake_llm.url.removesuffix("/v1")
    assert refused("llm-check", "--base-url", root) == (
        f"Error: {root} answered 404 (no such route); check --base-url (it ends in /v1) and --served-model "
        "(`llm-check` lists the served models)"
    )


# ------------------------------------------------------------------------------------------- the dataset


def test_fim_and_pairs_dataset(built, fake_llm, tmp_path):
    import pyarrow.parquet as pq

    ws, shas = _copy_built(built, tmp_path), built[1]
    out = ok("fim", "--validation-fraction", "0", "--test-fraction", "0", "--output-dir", ws)
    assert "fim: fim: train 12 (0 duplicates dropped)" in out  # no pairs before the tasks
    assert "fim: commits without a task: 4" in out
    assert "already holds a dataset" in ok("fim", "--output-dir", ws)
    ok("tasks", "--base-url", fake_llm.url, "--output-dir", ws)
    ok("reasoning", "--base-url", fake_llm.url, "--output-dir", ws)
    out = ok("fim", "--force", "--validation-fraction", "0", "--test-fraction", "0", "--output-dir", ws)
    data = ws / "dataset"
    fim = pq.read_table(data / "fim" / "train.parquet").to_pylist()
    # one sample per run of changed lines of each added/modified/renamed declaration: c1 5, c2 3, c5 3, c6 1
    assert len(fim) == 12
    change_me = next(r for r in fim if r["commit"] == shas["c2"] and r["name"] == "change_me")
    lines = APP_V2.splitlines(keepends=True)
    assert change_me["middle"] == "    y = x + 2\n"
    assert change_me["prefix"] == "".join(lines[:5]) and change_me["suffix"] == "".join(lines[6:])
    assert (
        change_me["input"]
        == f"{FIM_PREFIX}{change_me['prefix']}{FIM_SUFFIX}{change_me['suffix']}{FIM_MIDDLE}"
    )
    assert (
        change_me["output"] == change_me["middle"]
        and change_me["text"] == change_me["input"] + change_me["middle"]
    )
    narrow = tmp_path / "narrow"
    ok(
        "fim",
        "--context-lines",
        "1",
        "--validation-fraction",
        "0",
        "--test-fraction",
        "0",
        "--output",
        narrow,
        "--output-dir",
        ws,
    )
    narrowed = pq.read_table(narrow / "fim" / "train.parquet").to_pylist()
    one = next(r for r in narrowed if r["commit"] == shas["c2"] and r["name"] == "change_me")
    assert (one["prefix"], one["middle"], one["suffix"]) == (lines[4], lines[5], lines[6])
    renamed = next(r for r in fim if r["operation"] == "renamed")
    assert renamed["middle"] == "def new_name(a, b):\n" and renamed["middle_lines"] == [10, 10]
    assert not [r for r in fim if r["operation"] == "deleted"]
    pairs = pq.read_table(data / "pairs" / "train.parquet").to_pylist()
    assert len(pairs) == 5 + 3 + 3 + 1  # added, modified, renamed (not deleted)
    pair = next(r for r in pairs if r["name"] == "change_me" and r["commit"] == shas["c2"])
    assert pair["input"] == (
        "Task: Task: Rework the helpers\nFile: app.py\nThe function `change_me` now:\n```python\n"
        "def change_me(x):\n    y = x + 1\n    return y\n```\n"
        "Write the function `change_me` after the change."
    )
    assert pair["output"] == "def change_me(x):\n    y = x + 2\n    return y"
    reasoned = pq.read_table(data / "pairs_reasoning" / "train.parquet").to_pylist()
    assert len(reasoned) == len(pairs)
    assert next(r for r in reasoned if r["name"] == "change_me" and r["commit"] == shas["c2"])[
        "output"
    ].startswith("I modified function change_me.\n\ndef change_me(x):")
    card = (data / "README.md").read_text()
    assert "- config_name: fim" in card and "path: pairs_reasoning/train.parquet" in card
    assert "| python | 9 |" in card and "| rust | 3 |" in card and "| renamed | 1 |" in card

    # the folder is a Hugging Face dataset: load_dataset reads its card's configs (offline, from disk)
    from datasets import load_dataset

    loaded = load_dataset(str(data), "pairs", split="train")
    assert loaded.num_rows == len(pairs) and {"input", "output"} <= set(loaded.column_names)


def test_splits_by_commit_and_repository_and_deduplication(built, fixture_repo, tmp_path):
    import pyarrow.parquet as pq

    ws = _copy_built(built, tmp_path)
    ok("fim", "--validation-fraction", "0.4", "--test-fraction", "0.3", "--output-dir", ws)
    commits = {}
    for split in ("train", "validation", "test"):
        path = ws / "dataset" / "fim" / f"{split}.parquet"
        if path.is_file():
            for row in pq.read_table(path).to_pylist():
                commits.setdefault(row["commit"], set()).add(split)
    assert all(len(splits) == 1 for splits in commits.values())  # a commit never spans two splits
    # a second repository with the same history: every sample is a duplicate of the first one's
    ok("repos", "add", fixture_repo[0], "--name", "twin", "--output-dir", ws)
    ok("ast", "--repo", "twin", "--output-dir", ws)
    ok("diffs", "--repo", "twin", "--output-dir", ws)
    out = ok("fim", "--force", "--split-by", "repository", "--output-dir", ws)
    assert "(12 duplicates dropped)" in out
    rows = [
        row for path in (ws / "dataset" / "fim").glob("*.parquet") for row in pq.read_table(path).to_pylist()
    ]
    assert {row["repository"] for row in rows} == {"proj"}
    assert len({path.stem for path in (ws / "dataset" / "fim").glob("*.parquet")}) == 1
    kept, dropped = deduplicate([{"input": "a  b", "output": "c"}, {"input": "a b", "output": "c\n"}])
    assert (len(kept), dropped) == (1, 1)


def test_fim_refusals_and_push(built, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    ws = _copy_built(built, tmp_path)
    assert "must stay below 1" in refused(
        "fim", "--validation-fraction", "0.5", "--test-fraction", "0.5", "--output-dir", ws
    )
    assert "--private only applies with --push-to-hub" in refused("fim", "--private", "--output-dir", ws)
    assert "is not a Hub repo id" in refused("fim", "--push-to-hub", "no-owner", "--output-dir", ws)
    assert not (ws / "dataset").exists()  # refused before any work

    calls = []

    class FakeHfApi:  # the Hub client, recorded: tests never touch the network
        def __init__(self, token=None):
            assert token == "hf_dummy"

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs["repo_type"], kwargs["private"]))
            return f"https://hub.invalid/datasets/{repo_id}"

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs["repo_type"], kwargs["folder_path"]))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    env = {"HF_TOKEN": "hf_dummy"}
    out = ok("fim", "--push-to-hub", "me/history", "--private", "--output-dir", ws, env=env)
    assert out.splitlines()[-1] == f"pushed {ws / 'dataset'} to https://hub.invalid/datasets/me/history"
    assert calls == [
        ("create_repo", "me/history", "dataset", True),
        ("upload_folder", "me/history", "dataset", str(ws / "dataset")),
    ]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = refused("fim", "--push-to-hub", "me/history", "--output-dir", ws, env=env)
    assert message.startswith("Error: HF_HUB_OFFLINE is set, so nothing can be pushed")
    assert message.endswith(f"(the dataset is in {ws / 'dataset'})")


# ----------------------------------------------------------------------------------------- interrupted


def _outputs(ws: Path) -> dict:
    return {
        str(p.relative_to(ws)): p.read_bytes() for p in sorted((ws / "commits").rglob("*")) if p.is_file()
    }


def test_sigkill_then_rerun_duplicates_and_loses_nothing(tmp_path):
    history = tmp_path / "history"
    write_history(history, 120, files=12)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    for ws in (reference, killed):
        ok("repos", "add", history, "--output-dir", ws)
    ok("ast", "--output-dir", reference)
    ok("diffs", "--output-dir", reference)

    for stage_name in ("ast", "diffs"):
        command = [sys.executable, str(ROOT / "build_dataset.py"), stage_name, "--output-dir", str(killed)]
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while (
            len(list((killed / "commits").glob(f"*/*/{stage_name}.json"))) < 5 and time.monotonic() < deadline
        ):
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
        partial = len(list((killed / "commits").glob(f"*/*/{stage_name}.json")))
        assert 5 <= partial < 120, partial  # killed part-way
        out = ok(stage_name, "--output-dir", killed)
        assert f"{120 - partial} commits done, {partial} already on disk" in out
    assert _outputs(killed) == _outputs(reference)  # nothing lost, nothing duplicated, no temporaries left


LANGUAGE_SAMPLES = {
    "python": (
        "@dec\ndef f(x):\n    def g():\n        pass\n    return g\n\n\n"
        "class A:\n    @property\n    def p(self):\n        return 1\n\n    @p.setter\n    def p(self, v):\n"
        "        pass\n",
        [
            ("f", "function", 1, 5),
            ("f.g", "function", 3, 4),
            ("A", "class", 8, 15),
            ("A.p", "method", 9, 11),
            ("A.p#2", "method", 13, 15),
        ],
    ),
    "rust": (
        "struct S {\n    a: i32,\n}\nimpl S {\n    fn new() -> S {\n        S { a: 1 }\n    }\n}\n"
        "trait T {\n    fn d(&self) {}\n}\nfn main() {}\n",
        [
            ("S", "class", 1, 3),
            ("S.new", "method", 5, 7),
            ("T", "class", 9, 11),
            ("T.d", "method", 10, 10),
            ("main", "function", 12, 12),
        ],
    ),
    "go": (
        "package m\n\ntype S struct {\n\ta int\n}\n\nfunc (s *S) M() int {\n\treturn 1\n}\n\nfunc F() {}\n",
        [("S", "class", 3, 5), ("S.M", "method", 7, 9), ("F", "function", 11, 11)],
    ),
    "javascript": (
        "function f() {}\nconst g = () => 1;\nclass A {\n  m() {}\n  static s() {}\n}\n",
        [
            ("f", "function", 1, 1),
            ("g", "function", 2, 2),
            ("A", "class", 3, 6),
            ("A.m", "method", 4, 4),
            ("A.s", "method", 5, 5),
        ],
    ),
    "typescript": (
        "interface I {\n  x: number;\n}\nfunction f(a: number): number {\n  return a;\n}\n"
        "class A {\n  m(): void {}\n}\n",
        [("I", "class", 1, 3), ("f", "function", 4, 6), ("A", "class", 7, 9), ("A.m", "method", 8, 8)],
    ),
    "c": (
        "struct P {\n  int x;\n};\nint add(int a, int b) {\n  return a + b;\n}\n"
        "static int *ptr(void) { return 0; }\n",
        [("P", "class", 1, 3), ("add", "function", 4, 6), ("ptr", "function", 7, 7)],
    ),
    "cpp": (
        "namespace n {\nclass A {\n public:\n  int m() { return 1; }\n};\n}\nint A::k() { return 2; }\n"
        "int f(int) { return 0; }\nint f(double) { return 1; }\n",
        [
            ("n.A", "class", 2, 5),
            ("n.A.m", "method", 4, 4),
            ("A::k", "function", 7, 7),
            ("f", "function", 8, 8),
            ("f#2", "function", 9, 9),
        ],
    ),
    "java": (
        "class A {\n  A() {}\n  int m(int x) {\n    return x;\n  }\n  interface I {}\n}\n",
        [("A", "class", 1, 7), ("A.A", "method", 2, 2), ("A.m", "method", 3, 5), ("A.I", "class", 6, 6)],
    ),
}


@pytest.mark.parametrize("language", sorted(LANGUAGE_SAMPLES))
def test_declarations_of_every_language(language):
    from titans_distil.dataset_build.declarations import parse

    source, expected = LANGUAGE_SAMPLES[language]
    parsed = parse(source.encode(), language)
    assert not parsed.syntax_error
    assert [(d.qualname, d.kind, d.start_line, d.end_line) for d in parsed.declarations] == expected
    assert parse(b"def f(:\n    pass\n", "python").syntax_error


def test_whole_pipeline_on_a_history_of_real_code(tmp_path, fake_llm):
    """Every stage over 60 commits of standard-library modules (tests/git_history.py): the dataset holds
    exactly what the diffs promise, and every changed declaration got its reasoning."""
    import pyarrow.parquet as pq

    history, ws = tmp_path / "history", tmp_path / "ws"
    write_history(history, 60, files=8)
    ok("repos", "add", history, "--output-dir", ws)
    for name in ("ast", "diffs"):
        assert "60 commits done" in ok(name, "--output-dir", ws)
    for name in ("tasks", "reasoning"):
        ok(name, "--base-url", fake_llm.url, "--output-dir", ws)
    diffs = [json.loads(p.read_text()) for p in sorted((ws / "commits").glob("*/*/diffs.json"))]
    changes = [c for d in diffs for c in d["changes"]]
    assert len(changes) > 60 and {c["operation"] for c in changes} >= {
        "added",
        "modified",
        "renamed",
        "deleted",
    }
    for d in diffs:
        if d["changes"]:
            folder = ws / "commits" / d["repository"] / d["commit"]
            reasoning = json.loads((folder / "reasoning.json").read_text())["reasoning"]
            assert set(reasoning) == {c["id"] for c in d["changes"]}
    out = ok("fim", "--validation-fraction", "0", "--test-fraction", "0", "--output-dir", ws)
    counts = {
        name: (int(kept), int(dropped))
        for name, kept, dropped in re.findall(r"fim: (\w+): train (\d+) \((\d+) duplicates dropped\)", out)
    }

    def middle_is_text(change, start, end):  # the FIM middle, read from the declaration's own code
        first = change["after_lines"][0]
        return "".join(
            change["after_code"].splitlines(keepends=True)[start - first : end - first + 1]
        ).strip()

    middles = sum(1 for c in changes for s, e in c["changed_lines"] if middle_is_text(c, s, e))
    pairs = sum(1 for c in changes if c["operation"] in ("added", "modified", "renamed"))
    assert sum(counts["fim"]) == middles and sum(counts["pairs"]) == pairs
    assert counts["pairs_reasoning"] == counts["pairs"]
    fim = pq.read_table(ws / "dataset" / "fim" / "train.parquet").to_pylist()
    assert len(fim) == counts["fim"][0]
    for row in fim:
        assert (
            row["text"]
            == f"{FIM_PREFIX}{row['prefix']}{FIM_SUFFIX}{row['suffix']}{FIM_MIDDLE}{row['middle']}"
        )


def test_methods_classes_and_moves(tmp_path):
    """A method edited inside a class is that method's change alone; a class is modified when its own lines
    change; a function moved unchanged to another file is `moved`, a file renamed with its functions as they
    were yields no change."""
    repo = git.Repo.init(tmp_path / "proj", initial_branch="main")
    shape = (
        "class Shape:\n    sides = 3\n\n    def area(self):\n        return 1\n\n    def name(self):\n"
        "        return 's'\n"
    )
    helper, keep = "def helper(a):\n    return a * 2\n", "def keep_me():\n    return 7\n"
    old = "def stay():\n    return 0\n"
    _commit(repo, {"shape.py": shape, "util.py": f"{helper}\n\n{keep}", "old.py": old}, "one", 1)
    edited = shape.replace("return 1", "return 2").replace("sides = 3", "sides = 4")
    tools = f"def other():\n    return 5\n\n\n{helper}"
    _commit(repo, {"shape.py": edited, "util.py": keep, "tools.py": tools}, "two", 2)
    repo.git.mv("old.py", "new.py")
    stamp = "2026-01-03T12:00:00"
    repo.git.commit("-m", "three", env={"GIT_AUTHOR_DATE": stamp, "GIT_COMMITTER_DATE": stamp})
    ws = tmp_path / "ws"
    ok("repos", "add", tmp_path / "proj", "--output-dir", ws)
    ok("ast", "--output-dir", ws)
    ok("diffs", "--output-dir", ws)
    two = stage(ws, "proj", repo.commit("HEAD~1").hexsha, "diffs")
    assert _ops(two) == [
        ("modified", "class", "Shape", "Shape"),
        ("modified", "method", "Shape.area", "Shape.area"),
        ("added", "function", None, "other"),
        ("moved", "function", "helper", "helper"),
    ]
    moved = two["changes"][3]
    assert (moved["before_path"], moved["after_path"]) == ("util.py", "tools.py")
    three = stage(ws, "proj", repo.head.commit.hexsha, "ast")
    assert [(f["change"], f["before_path"], f["after_path"]) for f in three["files"]] == [
        ("renamed", "old.py", "new.py")
    ]
    assert stage(ws, "proj", repo.head.commit.hexsha, "diffs")["changes"] == []
