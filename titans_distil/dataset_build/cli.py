"""`build_dataset.py` / `titans-distil data`: one command per stage of the git-history dataset pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..cli import NON_NEGATIVE, POSITIVE, finite, user_errors
from ..errors import UserError
from ..flags import option
from ..model_folder import display, status
from .workspace import Workspace

DEFAULT_OUTPUT_DIR = "dataset-build"


def _output_dir_option(fn):
    """--output-dir: the pipeline's folder, the same for every command."""
    return click.option(
        "--output-dir",
        default=DEFAULT_OUTPUT_DIR,
        show_default=True,
        help="The pipeline's folder: repos.json, clones/, commits/NAME/SHA/*.json, dataset/.",
    )(fn)


def _repo_option(fn):
    return click.option(
        "--repo",
        "repo_names",
        multiple=True,
        help="A tracked repository's name (repeatable). [default: every tracked repository]",
    )(fn)


def _max_commits_option(fn):
    return click.option(
        "--max-commits",
        type=POSITIVE,
        default=None,
        help="Only the newest N commits of each repository's revision. [default: all]",
    )(fn)


def _commit_options(fn):
    """--repo, --max-commits and --force: which commits a stage reads, and whether it redoes them."""
    fn = _max_commits_option(_repo_option(fn))
    return click.option("--force", is_flag=True, help="Redo commits whose output is already on disk.")(fn)


def _llm_options(fn):
    from .llm import DEFAULT_BASE_URL, DEFAULT_KEY_ENV

    options = [
        click.option(
            "--base-url",
            default=DEFAULT_BASE_URL,
            show_default=True,
            help="An OpenAI-compatible endpoint (bin/serve's by default).",
        ),
        click.option(
            "--served-model",
            default=None,
            help="The model name the endpoint serves. [default: the one model it lists]",
        ),
        click.option(
            "--api-key-env",
            default=DEFAULT_KEY_ENV,
            show_default=True,
            help="The environment variable holding the API key (unset: any key, as a local vLLM takes).",
        ),
        click.option(
            "--retries", type=NON_NEGATIVE, default=3, show_default=True, help="Retries per request."
        ),
        click.option(
            "--timeout", type=finite(min=0, min_open=True), default=300.0, show_default=True, help="Seconds."
        ),
        option("--max-new-tokens", type=POSITIVE, default=160, show_default=True, help="Per answer."),
        click.option("--temperature", type=finite(min=0), default=0.2, show_default=True),
        click.option(
            "--frequency-penalty",
            type=finite(min=-2, max=2),
            default=0.3,
            show_default=True,
            help="OpenAI's penalty on repeated tokens (small models loop without one).",
        ),
    ]
    for decorate in reversed(options):
        fn = decorate(fn)
    return fn


def _llm(
    base_url, served_model, api_key_env, retries, timeout, max_new_tokens, temperature, frequency_penalty
):
    from .llm import LLM, LLMSettings

    return LLM(
        LLMSettings(
            base_url,
            served_model,
            api_key_env,
            retries,
            timeout,
            max_new_tokens,
            temperature,
            frequency_penalty,
        )
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def build_dataset():
    """Training data from git history: repos → ast → diffs → tasks → reasoning → fim (a Hugging Face
    dataset), with clean and coverage. Every stage skips what is on disk (--force redoes it)."""


@build_dataset.group("repos")
def repos_group():
    """The repositories to read: local folders (read in place) or clone URLs (cloned into the output
    folder)."""


@repos_group.command("add")
@click.argument("source")
@click.option(
    "--name", default=None, help="The repository's name here. [default: the folder or URL's last part]"
)
@click.option(
    "--rev", default="HEAD", show_default=True, help="The branch, tag or commit whose history is read."
)
@click.option(
    "--depth", type=POSITIVE, default=None, help="Clone URLs shallowly (the oldest commit is skipped)."
)
@_output_dir_option
@user_errors
def repos_add(source, name, rev, depth, output_dir):
    from .workspace import add_repository

    add_repository(Workspace(output_dir), source, name, rev, depth, click.echo)


@repos_group.command("list")
@_output_dir_option
@user_errors
def repos_list(output_dir):
    ws = Workspace(output_dir)
    repos = ws.repositories()
    if not repos:
        click.echo(f"no repositories tracked in {display(ws.root)}")
    for entry in repos.values():
        where = f" (cloned into {display(Path(entry.path))})" if entry.cloned else ""
        done = len(list((ws.root / "commits" / entry.name).glob("*/diffs.json")))
        click.echo(f"{entry.name}\t{entry.source}{where}\trev {entry.rev}\t{done} commits with diffs")


@repos_group.command("remove")
@click.argument("name")
@click.option("--purge", is_flag=True, help="Also delete its stage outputs (tasks and reasoning included).")
@_output_dir_option
@user_errors
def repos_remove(name, purge, output_dir):
    from .workspace import remove_repository

    remove_repository(Workspace(output_dir), name, purge, click.echo)


def _each_repository(stage: str, run):
    """Run `run(ws, entry, repo, history)` over the selected repositories, print each closing line, and end
    non-zero when commits are left waiting or failed."""

    def command(output_dir, repo_names, max_commits, force, **options):
        from .workspace import commits

        ws = Workspace(output_dir)
        left = []
        for entry in ws.selected(repo_names):
            repo, history = commits(entry, max_commits)
            report = run(ws, entry, repo, history, force=force, **options)
            click.echo(report.line(stage, entry.name))
            if report.missing_input or report.failed:
                left.append(entry.name)
        if left:
            before = {"diffs": "ast", "tasks": "diffs", "reasoning": "tasks (and diffs)"}[stage]
            raise UserError(
                f"{stage} left commits undone in {', '.join(left)}: run `{before}` for the waiting ones, "
                f"and `{stage}` again for the failed ones"
            )

    return command


@build_dataset.command("ast")
@_output_dir_option
@_commit_options
@click.option(
    "--languages",
    default="",
    help="Comma-separated grammars to parse (python, rust, go, javascript, typescript, tsx, c, cpp, java). "
    "[default: all]",
)
@click.option("--max-file-bytes", type=POSITIVE, default=1_000_000, show_default=True)
@user_errors
def ast_command(languages, max_file_bytes, **options):
    """Parse both versions of each commit's changed source files into declarations (functions, methods,
    classes with their spans)."""
    from .changes import run_ast
    from .declarations import check_languages
    from .workspace import shallow_boundary

    chosen = check_languages(tuple(name.strip() for name in languages.split(",") if name.strip()))

    def run(ws, entry, repo, history, force):
        boundary = shallow_boundary(repo)
        return run_ast(ws, entry, repo, _progress(history, "ast"), chosen, max_file_bytes, force, boundary)

    _each_repository("ast", run)(**options)


def _progress(history, stage: str):
    from tqdm import tqdm

    return tqdm(history, desc=stage, unit="commit", disable=None, leave=False)


@build_dataset.command("diffs")
@_output_dir_option
@_commit_options
@user_errors
def diffs_command(**options):
    """Function-level changes of each commit against its first parent (from the `ast` outputs)."""
    from .changes import run_diffs

    def run(ws, entry, repo, history, force):
        return run_diffs(ws, entry, repo, _progress(history, "diffs"), force)

    _each_repository("diffs", run)(**options)


def _llm_stage(stage: str, runner_name: str):
    @_output_dir_option
    @_commit_options
    @_llm_options
    @click.option(
        "--max-prompt-chars",
        type=click.IntRange(min=500),
        default=4000,
        show_default=True,
        help="Longer diffs are cut into chunks of this size (tasks) or clipped in the middle (reasoning).",
    )
    @click.option("--concurrency", type=POSITIVE, default=4, show_default=True, help="Requests in flight.")
    @user_errors
    def command(max_prompt_chars, concurrency, output_dir, repo_names, max_commits, force, **llm_options):
        from . import llm as llm_module

        llm = _llm(**llm_options)
        status(f"{stage}: {llm.model} at {llm.settings.base_url}")
        runner = getattr(llm_module, runner_name)

        def run(ws, entry, repo, history, force):
            return runner(ws, entry, history, llm, max_prompt_chars, concurrency, force)

        _each_repository(stage, run)(
            output_dir=output_dir, repo_names=repo_names, max_commits=max_commits, force=force
        )

    return command


build_dataset.command(
    "tasks", help="A task description per commit with function changes, written by the LLM."
)(_llm_stage("tasks", "run_tasks"))
build_dataset.command(
    "reasoning", help="A first-person reasoning per changed function, written by the LLM (needs `tasks`)."
)(_llm_stage("reasoning", "run_reasoning"))


@build_dataset.command("llm-check")
@_llm_options
@user_errors
def llm_check(**llm_options):
    """Ask the endpoint for its models and one short answer."""
    from .llm import check

    llm = _llm(**llm_options)
    result = check(llm)
    click.echo(
        f"{llm.settings.base_url}: models {', '.join(result['models'])}; {result['model']} answered "
        f"{result['answer']!r} in {result['seconds']:.2f} s"
    )


@build_dataset.command("fim")
@_output_dir_option
@_repo_option
@click.option(
    "--max-commits", type=POSITIVE, default=None, help="Only the newest N commits of each repository."
)
@click.option(
    "--context-lines",
    type=NON_NEGATIVE,
    default=200,
    show_default=True,
    help="Lines of the file kept before and after a FIM middle (0: the whole file).",
)
@click.option("--split-by", type=click.Choice(["commit", "repository"]), default="commit", show_default=True)
@click.option("--validation-fraction", type=finite(min=0, max=1), default=0.1, show_default=True)
@click.option("--test-fraction", type=finite(min=0, max=1), default=0.1, show_default=True)
@click.option("--output", default=None, help="The dataset folder. [default: OUTPUT_DIR/dataset]")
@click.option("--push-to-hub", default=None, metavar="REPO_ID", help="Also upload it as a Hub dataset repo.")
@click.option("--private", is_flag=True, help="With --push-to-hub: a private repo.")
@click.option("--force", is_flag=True, help="Rebuild a dataset folder that exists.")
@user_errors
def fim_command(
    output_dir,
    repo_names,
    max_commits,
    context_lines,
    split_by,
    validation_fraction,
    test_fraction,
    output,
    push_to_hub,
    private,
    force,
):
    """Fill-in-the-middle samples and input/output pairs as a Hugging Face dataset folder (parquet + card)."""
    from ..export import check_repo_id, hub_token, push_folder
    from ..model_folder import check_output_path
    from .samples import build

    if private and not push_to_hub:
        raise UserError("--private only applies with --push-to-hub REPO_ID")
    ws = Workspace(output_dir)
    out = check_output_path(Path(output) if output else ws.dataset_dir, "--output")
    token = None
    if push_to_hub:
        check_repo_id(push_to_hub)
        token = hub_token(again="run `fim` again")
    repos = ws.selected(repo_names)
    if out.is_dir() and any(out.iterdir()) and not force:
        click.echo(f"fim: {display(out)} already holds a dataset (--force rebuilds it)")
    else:
        counts, dropped, missing = build(
            ws,
            repos,
            output=out,
            max_commits=max_commits,
            context_lines=context_lines,
            split_by=split_by,
            validation=validation_fraction,
            test=test_fraction,
            log=status,
        )
        for name, splits in counts.items():
            shown = ", ".join(f"{split} {n}" for split, n in splits.items())
            click.echo(f"fim: {name}: {shown} ({dropped[name]} duplicates dropped)")
        for what, count in sorted(missing.items()):
            click.echo(f"fim: {what}: {count}")
        click.echo(f"fim: wrote {display(out)}")
    if push_to_hub:
        url = push_folder(out, push_to_hub, private=private, token=token, repo_type="dataset")
        click.echo(f"pushed {display(out)} to {url}")


@build_dataset.command("clean")
@_output_dir_option
@_repo_option
@click.option(
    "--tasks",
    is_flag=True,
    help="Remove the task descriptions (the reasoning written from them stays unless --reasoning too).",
)
@click.option("--reasoning", is_flag=True, help="Remove the reasoning.")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@user_errors
def clean_command(output_dir, repo_names, tasks, reasoning, dry_run):
    """Remove LLM outputs, e.g. to write them again with another model."""
    if not (tasks or reasoning):
        raise UserError("clean needs --tasks and/or --reasoning (what to remove)")
    ws = Workspace(output_dir)
    stages = [stage for stage, chosen in (("task", tasks), ("reasoning", reasoning)) if chosen]
    found = [
        path
        for entry in ws.selected(repo_names)
        for stage in stages
        for path in sorted((ws.root / "commits" / entry.name).glob(f"*/{stage}.json"))
    ]
    for path in found:
        if dry_run:
            click.echo(f"would remove {display(path)}")
        else:
            path.unlink()
    click.echo(f"{'would remove' if dry_run else 'removed'} {len(found)} files ({', '.join(stages)})")


@build_dataset.command("coverage")
@_output_dir_option
@_repo_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a markdown table.")
@user_errors
def coverage_command(output_dir, repo_names, as_json):
    """Per language: the share of changed files that were parsed and of changed lines inside a declaration."""
    from .changes import coverage_markdown, coverage_table

    ws = Workspace(output_dir)
    rows = coverage_table(ws, ws.selected(repo_names))
    click.echo(json.dumps(rows, indent=1) if as_json else coverage_markdown(rows, ws.root / "commits"))
