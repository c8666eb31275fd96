"""The `tasks` and `reasoning` stages and `llm-check`: an LLM behind any OpenAI-compatible endpoint (by
default `bin/serve`'s, on this machine) writes a task description per commit and a first-person reasoning
per changed function.

Requests go through the `openai` client, whose own retries (connection errors, timeouts, 408/409/429/5xx;
exponential back-off from 0.5 s to 8 s, honouring Retry-After) run `--retries` times; an endpoint still down
after them stops the stage with one line. An answer with no usable text (no choices, no message, empty, a body
that is no chat completion) is asked again up to `--retries` times; a commit whose answer stays unusable is
left undone (the stage ends non-zero, a rerun retries it). Diffs longer than `--max-prompt-chars` are cut into
chunks at change boundaries, each summarised, and the task is written from the summaries."""

from __future__ import annotations

import concurrent.futures
import difflib
import os
import threading
import time
import zlib
from dataclasses import dataclass

from ..errors import UserError
from .changes import StageReport
from .workspace import Workspace, read_json, write_json

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"  # bin/serve's host and port
DEFAULT_KEY_ENV = "OPENAI_API_KEY"

# The instruction comes last in the user message: the embedded 135M teacher follows it there, and answered a
# prompt ending in "The task:" with that line repeated (README, "Build a dataset from git history").
SYSTEM = "You are a senior software engineer."
TASK_ASK = (
    "Write the task the developer was given, as one sentence that starts with a verb such as Add, Fix, Make "
    "or Remove."
)
SUMMARY_ASK = "Summarise in one or two sentences what these code changes do."
REASONING_ASK = (
    'You made this change. Explain in the first person ("I ..."), in two or three sentences, why you changed '
    "the code this way."
)
# An answer that compresses this well is one line or phrase repeated: a small model looping, no text.
MIN_COMPRESSION = 0.2


class UnusableAnswer(Exception):
    """The endpoint answered this request, but with nothing to use (or refused this one request)."""


def repetitive(text: str) -> bool:
    return len(text) >= 200 and len(zlib.compress(text.encode())) < MIN_COMPRESSION * len(text.encode())


@dataclass(frozen=True)
class LLMSettings:
    base_url: str
    model: str | None
    key_env: str
    retries: int
    timeout: float
    max_tokens: int
    temperature: float
    frequency_penalty: float


class LLM:
    """A chat model behind an OpenAI-compatible endpoint; every failure to reach it is a `UserError`."""

    def __init__(self, settings: LLMSettings) -> None:
        try:
            import openai
        except ImportError:
            raise UserError(
                "the tasks and reasoning stages need openai; pip install 'titans-distil[data]'"
            ) from None
        self.openai = openai
        self.settings = settings
        self.client = openai.OpenAI(
            base_url=settings.base_url,
            api_key=os.environ.get(settings.key_env) or "EMPTY",  # a local vLLM takes any key
            max_retries=settings.retries,
            timeout=settings.timeout,
        )
        self.model = settings.model or self._only_model()

    def _failure(self, err: Exception) -> UserError:
        openai, url = self.openai, self.settings.base_url
        if isinstance(err, openai.APIConnectionError):
            cause = err.__cause__ or err
            detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            return UserError(
                f"no answer from {url} after {self.settings.retries} retries ({detail}); start the server "
                "(bin/serve MODEL_DIR) or pass --base-url"
            )
        if isinstance(err, openai.AuthenticationError):
            return UserError(f"{url} refused the key (401); set ${self.settings.key_env} to a valid key")
        if isinstance(err, openai.NotFoundError):
            return UserError(
                f"{url} answered 404 ({_detail(err)}); "
                "check --base-url (it ends in /v1) and --served-model (`llm-check` lists the served models)"
            )
        if isinstance(err, openai.APIStatusError):
            retried = err.status_code in (408, 409, 429) or err.status_code >= 500  # the client's retry rule
            after = f" after {self.settings.retries} retries" if retried else ""
            return UserError(f"{url} answered {err.status_code}{after} ({_detail(err)}); check the server")
        return UserError(f"{url} gave no OpenAI API answer ({type(err).__name__}); check --base-url")

    def models(self) -> list[str]:
        try:
            return sorted(model.id for model in self.client.models.list())
        except self.openai.APIError as err:
            raise self._failure(err) from None

    def _only_model(self) -> str:
        models = self.models()
        if not models:
            raise UserError(f"{self.settings.base_url} serves no model; pass --served-model")
        if len(models) > 1:
            raise UserError(
                f"{self.settings.base_url} serves {', '.join(models)}; pick one with --served-model"
            )
        return models[0]

    def ask(self, prompt: str) -> str:
        """The answer's text; `UnusableAnswer` when every try gave nothing to use, or the endpoint refused
        this request (a 400: too long for its context, say) while it answers others."""
        reason = "no usable text"
        for _ in range(self.settings.retries + 1):
            try:
                response = self.client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                    max_tokens=self.settings.max_tokens,
                    temperature=self.settings.temperature,
                    frequency_penalty=self.settings.frequency_penalty,
                )
            except self.openai.APIResponseValidationError:
                reason = "a body that is no chat completion"
                continue
            except self.openai.BadRequestError as err:
                raise UnusableAnswer(f"refused with 400: {_detail(err)}") from None
            except self.openai.APIError as err:
                raise self._failure(err) from None
            try:
                text = response.choices[0].message.content
            except (AttributeError, IndexError, TypeError, KeyError):
                reason = "a completion without choices"
                continue
            if not isinstance(text, str) or not text.strip():
                reason = "an empty answer"
            elif repetitive(text):
                reason = "one phrase repeated"
            else:
                return text.strip()
        raise UnusableAnswer(reason)


def _detail(err) -> str:
    """The server's own message of an API error (its JSON body's), on one line."""
    body = err.body
    if isinstance(body, dict):
        inner = body.get("error")
        body = body.get("message") or (inner.get("message") if isinstance(inner, dict) else inner)
    lines = str(body or err.message or "").strip().splitlines()
    return lines[0] if lines else "no detail"


# ---------------------------------------------------------------------------------------------- prompts


def change_diff(change: dict) -> str:
    """A unified diff of one changed declaration, headed by what changed."""
    before, after = change["before_code"] or "", change["after_code"] or ""
    head = f"{change['operation']} {change['kind']} {change['after_name'] or change['before_name']}"
    body = difflib.unified_diff(
        before.splitlines(keepends=True),
        after.splitlines(keepends=True),
        fromfile=f"a/{change['before_path'] or change['after_path']}",
        tofile=f"b/{change['after_path'] or change['before_path']}",
    )
    return f"{head}\n{''.join(body)}"


def chunks(pieces: list[str], max_chars: int) -> list[str]:
    """`pieces` packed into chunks of at most `max_chars`; a piece longer than that is cut at line ends."""
    lines = []
    for piece in pieces:
        while len(piece) > max_chars:
            cut = piece.rfind("\n", 0, max_chars)
            cut = cut + 1 if cut > 0 else max_chars
            lines.append(piece[:cut])
            piece = piece[cut:]
        lines.append(piece)
    packed: list[str] = []
    for piece in lines:
        if packed and len(packed[-1]) + 1 + len(piece) <= max_chars:
            packed[-1] += "\n" + piece
        else:
            packed.append(piece)
    return packed


def clip(text: str, max_chars: int) -> str:
    """`text` within `max_chars`, its middle left out (said so) when longer."""
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters left out ...]\n{text[-half:]}"


def write_task(llm: LLM, diffs: dict, max_chars: int) -> dict:
    parts = chunks([change_diff(c) for c in diffs["changes"]], max_chars)
    message = clip(diffs["message"], 1000)
    if len(parts) == 1:
        context = f"Changes:\n{parts[0]}"
    else:
        summaries = [
            llm.ask(f"Changes (part {i + 1} of {len(parts)}):\n{p}\n\n{SUMMARY_ASK}")
            for i, p in enumerate(parts)
        ]
        context = "Summaries of the changes, part by part:\n" + "\n".join(f"- {s}" for s in summaries)
    task = llm.ask(f"A developer changed this code.\n\nCommit message: {message}\n\n{context}\n\n{TASK_ASK}")
    return {"task": task, "chunks": len(parts), "model": llm.model, "base_url": llm.settings.base_url}


def write_reasoning(llm: LLM, task: str, change: dict, max_chars: int) -> str:
    return llm.ask(f"Task: {task}\n\n{clip(change_diff(change), max_chars)}\n\n{REASONING_ASK}")


# ----------------------------------------------------------------------------------------------- stages


def _run_parallel(jobs, concurrency: int, report: StageReport) -> None:
    """Run the jobs (callables returning nothing) on `concurrency` threads; an unusable answer counts as a
    failure, an endpoint error stops everything."""
    lock = threading.Lock()

    def run(job):
        try:
            job()
        except UnusableAnswer as err:
            with lock:
                report.failed += 1
                report.failure = report.failure or str(err)
            return
        with lock:
            report.done += 1

    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(run, job) for job in jobs]
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def run_tasks(ws: Workspace, repo_entry, commits, llm: LLM, max_chars: int, concurrency: int, force: bool):
    report, jobs = StageReport(), []
    for commit in commits:
        sha = commit.hexsha
        out = ws.stage_file(repo_entry.name, sha, "task")
        diffs_path = ws.stage_file(repo_entry.name, sha, "diffs")
        if out.is_file() and not force:
            report.skipped_existing += 1
            continue
        if not diffs_path.is_file():
            report.missing_input += 1
            continue
        diffs = read_json(diffs_path, "rerun `diffs --force`")
        if not diffs["changes"]:
            continue  # nothing to learn from: no task needed
        jobs.append(lambda diffs=diffs, out=out: write_json(out, write_task(llm, diffs, max_chars)))
    _run_parallel(jobs, concurrency, report)
    return report


def run_reasoning(
    ws: Workspace, repo_entry, commits, llm: LLM, max_chars: int, concurrency: int, force: bool
):
    """One reasoning per changed declaration; a commit's file is rewritten as its answers arrive, so a rerun
    asks only for the ones still missing."""
    report, jobs = StageReport(), []
    for commit in commits:
        sha = commit.hexsha
        out = ws.stage_file(repo_entry.name, sha, "reasoning")
        diffs_path = ws.stage_file(repo_entry.name, sha, "diffs")
        task_path = ws.stage_file(repo_entry.name, sha, "task")
        if not diffs_path.is_file():
            report.missing_input += 1
            continue
        diffs = read_json(diffs_path, "rerun `diffs --force`")
        if not diffs["changes"]:
            continue
        if not task_path.is_file():
            report.missing_input += 1
            continue
        task = read_json(task_path, "rerun `tasks --force`")["task"]
        have = {} if force or not out.is_file() else read_json(out, "rerun `reasoning --force`")["reasoning"]
        todo = [c for c in diffs["changes"] if c["id"] not in have]
        if not todo:
            report.skipped_existing += 1
            continue

        def job(todo=todo, have=have, task=task, out=out):
            have, failure = dict(have), None
            for change in todo:
                try:
                    have[change["id"]] = write_reasoning(llm, task, change, max_chars)
                except UnusableAnswer as err:
                    failure = err
                    continue
                write_json(out, {"model": llm.model, "base_url": llm.settings.base_url, "reasoning": have})
            if failure is not None:
                raise failure

        jobs.append(job)
    _run_parallel(jobs, concurrency, report)
    return report


def check(llm: LLM) -> dict:
    """`llm-check`: the served models, and one short answer with its latency."""
    models = llm.models()
    start = time.perf_counter()
    try:
        answer = llm.ask("Say OK.")
    except UnusableAnswer as err:
        raise UserError(
            f"{llm.settings.base_url} gave {llm.model} {err} ({llm.settings.retries + 1} tries); check the "
            "server's logs"
        ) from None
    return {"models": models, "model": llm.model, "answer": answer, "seconds": time.perf_counter() - start}
