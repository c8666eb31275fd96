"""Throughput of build_dataset.py's `ast` + `diffs` stages, in commits per second, on a repository of a few
hundred commits; with --base-url also the `tasks` stage's requests per second against a served LLM.

By default the repository is a synthetic history written with `git fast-import` from real standard-library
modules (tests/git_history.py: each commit edits, renames or deletes one function of one file, or adds a
file); --repo reads an existing local repository instead (e.g. this project's own). Stages run through the
library, timed each on its own, from a fresh output folder.

python benchmarks/bench_build_dataset.py --commits 300
python benchmarks/bench_build_dataset.py --repo . --max-commits 300
python benchmarks/bench_build_dataset.py --commits 60 --base-url http://127.0.0.1:8000/v1 --concurrency 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))

from git_history import write_history  # noqa: E402

from titans_distil.dataset_build import changes, llm  # noqa: E402
from titans_distil.dataset_build.workspace import (  # noqa: E402
    Workspace,
    add_repository,
    commits,
    read_json,
    shallow_boundary,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commits", type=int, default=300, help="Commits of the synthetic history.")
    parser.add_argument("--repo", default=None, help="A local git repository instead of the synthetic one.")
    parser.add_argument("--max-commits", type=int, default=None, help="With --repo: its newest N commits.")
    parser.add_argument("--base-url", default=None, help="Also time `tasks` against this endpoint.")
    parser.add_argument("--served-model", default=None)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--llm-commits", type=int, default=32, help="Commits sent to the `tasks` stage.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(args.repo).resolve() if args.repo else Path(tmp) / "history"
        if not args.repo:
            start = time.perf_counter()
            write_history(source, args.commits)
            print(f"synthetic history: {args.commits} commits in {time.perf_counter() - start:.1f} s")
        ws = Workspace(Path(tmp) / "ws")
        entry = add_repository(ws, str(source), "bench", "HEAD", None, lambda line: None)
        repo, history = commits(entry, args.max_commits)
        boundary = shallow_boundary(repo)

        start = time.perf_counter()
        changes.run_ast(ws, entry, repo, history, (), 1_000_000, False, boundary)
        ast_seconds = time.perf_counter() - start
        start = time.perf_counter()
        changes.run_diffs(ws, entry, repo, history, False)
        diffs_seconds = time.perf_counter() - start
        rows = changes.coverage_table(ws, [entry])
        n = len(history)
        print(f"repository: {source if args.repo else 'synthetic'} ({n} commits)")
        print(f"ast:   {ast_seconds:.2f} s, {n / ast_seconds:.1f} commits/s")
        print(f"diffs: {diffs_seconds:.2f} s, {n / diffs_seconds:.1f} commits/s")
        print(f"ast + diffs: {n / (ast_seconds + diffs_seconds):.1f} commits/s")
        print(changes.coverage_markdown(rows, ws.root))

        if args.base_url:
            client = llm.LLM(
                llm.LLMSettings(
                    args.base_url, args.served_model, llm.DEFAULT_KEY_ENV, 3, 300.0, 160, 0.2, 0.3
                )
            )
            chosen = history[-args.llm_commits :]
            start = time.perf_counter()
            report = llm.run_tasks(ws, entry, chosen, client, 4000, args.concurrency, False)
            seconds = time.perf_counter() - start
            # one request per commit, plus one per chunk when its diff was summarised in chunks first
            chunked = [read_json(path, "")["chunks"] for path in (ws.root / "commits").glob("*/*/task.json")]
            requests = sum(1 + (n if n > 1 else 0) for n in chunked)
            print(
                f"tasks: {report.done} commits ({report.failed} failed), {requests} requests in "
                f"{seconds:.1f} s with concurrency {args.concurrency}: {requests / seconds:.2f} requests/s "
                f"({client.model})"
            )


if __name__ == "__main__":
    main()
