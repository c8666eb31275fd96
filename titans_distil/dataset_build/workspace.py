"""The output folder of the pipeline: the tracked repositories (`repos.json`), clones of URLs, and one folder
per repository and commit holding each stage's output (`commits/NAME/SHA/STAGE.json`).

Every file is written atomically (a temporary beside it, then a rename), so a stage killed at any point leaves
each commit either done or untouched: a rerun skips what is on disk and redoes the rest."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, translated
from ..model_folder import atomic_file, check_output_path, display

EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"  # git's id of the empty tree: a root commit's base
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def git_module():
    try:
        import git
    except ImportError:
        raise UserError("the dataset pipeline needs GitPython; pip install 'titans-distil[data]'") from None
    return git


def write_json(path: Path, value) -> None:
    with atomic_file(path, ".json") as tmp:
        tmp.write_text(json.dumps(value, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: Path, fix: str):
    with translated(f"cannot read {display(path)}", fix, (OSError, ValueError, UnicodeDecodeError)):
        return json.loads(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Repository:
    """A tracked repository: `path` is the working copy read (the user's own for a local source, our clone
    for a URL), `rev` the revision whose history is read."""

    name: str
    source: str
    path: str
    rev: str
    cloned: bool


class Workspace:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"--output-dir {root} is a file; pass a folder")
        check_output_path(self.root, "--output-dir", container=True)  # under a file, or not writable

    @property
    def registry(self) -> Path:
        return self.root / "repos.json"

    def repositories(self) -> dict[str, Repository]:
        if not self.registry.is_file():
            return {}
        entries = read_json(self.registry, "fix or delete it, then `repos add` again")
        return {name: Repository(name=name, **entry) for name, entry in sorted(entries.items())}

    def save_repositories(self, repos: dict[str, Repository]) -> None:
        entries = {
            name: {"source": r.source, "path": r.path, "rev": r.rev, "cloned": r.cloned}
            for name, r in sorted(repos.items())
        }
        write_json(self.registry, entries)

    def selected(self, names: tuple[str, ...]) -> list[Repository]:
        """The repositories `--repo` names (all tracked ones without it); an unknown name is refused."""
        repos = self.repositories()
        if not repos:
            raise UserError(
                f"no repositories are tracked in {display(self.root)}; add one with `repos add PATH_OR_URL`"
            )
        unknown = [name for name in names if name not in repos]
        if unknown:
            raise UserError(
                f"--repo {', '.join(unknown)}: not tracked in {display(self.root)}; tracked: "
                f"{', '.join(repos)} (`repos add` adds one)"
            )
        return [repos[name] for name in (names or repos)]

    def clone_dir(self, name: str) -> Path:
        return self.root / "clones" / name

    def commit_dir(self, repo: str, sha: str) -> Path:
        return self.root / "commits" / repo / sha

    def stage_file(self, repo: str, sha: str, stage: str) -> Path:
        return self.commit_dir(repo, sha) / f"{stage}.json"

    def remove_outputs(self, repo: str) -> None:
        shutil.rmtree(self.root / "commits" / repo, ignore_errors=True)

    @property
    def dataset_dir(self) -> Path:
        return self.root / "dataset"


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise UserError(
            f"--name {name!r} cannot name a repository folder; use letters, digits, '.', '_' and '-'"
        )
    return name


def open_repo(path: str):
    """A GitPython `Repo`; anything that is no git repository is one line."""
    git = git_module()
    try:
        return git.Repo(path)
    except git.NoSuchPathError:
        raise UserError(f"{path} does not exist; pass a git repository's folder or a clone URL") from None
    except git.InvalidGitRepositoryError:
        raise UserError(
            f"{path} is not a git repository (no .git); pass a repository's folder or a clone URL"
        ) from None


def shallow_boundary(repo) -> set[str]:
    """The commits whose parents a shallow clone left out: git shows them as root commits, so their diff
    would claim every file as added. Stages skip them."""
    shallow = Path(repo.git_dir) / "shallow"
    if not shallow.is_file():
        return set()
    return set(shallow.read_text().split())


def commits(repo_entry: Repository, max_commits: int | None):
    """The commits of a repository's `rev`, oldest first (the newest `max_commits` of them when given), and
    the open `Repo`."""
    git = git_module()
    repo = open_repo(repo_entry.path)
    try:
        listed = list(repo.iter_commits(repo_entry.rev, max_count=max_commits))
    except (git.GitCommandError, ValueError) as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise UserError(
            f"{repo_entry.name}: cannot read the history of {repo_entry.rev!r} ({first.strip()}); "
            "`repos remove` it and add it again with a valid --rev"
        ) from None
    return repo, listed[::-1]


def skip_reason(commit, boundary: set[str]) -> str | None:
    """Why a commit has no changes of its own to learn from: a merge (its changes are its branches'
    commits, also in the history) or the edge of a shallow clone (its parent is missing)."""
    if len(commit.parents) > 1:
        return "merge commit"
    if commit.hexsha in boundary:
        return "shallow clone boundary (parent not fetched)"
    return None


def commit_metadata(repo_name: str, commit) -> dict:
    return {
        "repository": repo_name,
        "commit": commit.hexsha,
        "parent": commit.parents[0].hexsha if commit.parents else None,
        "author": commit.author.name,
        "date": commit.authored_datetime.isoformat(),
        "message": commit.message.strip(),
    }


def _is_url(source: str) -> bool:
    return "://" in source or re.fullmatch(r"[\w.-]+@[\w.-]+:.+", source) is not None


def _default_name(source: str) -> str:
    tail = source.rstrip("/").replace(":", "/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._-]", "-", tail.removesuffix(".git")) or "repository"


def _clone(url: str, target: Path, depth: int | None) -> None:
    """A bare clone (the pipeline reads objects, never a checkout), written aside and renamed into place."""
    from ..model_folder import atomic_folder

    git = git_module()
    with atomic_folder(target) as tmp:
        try:
            git.Repo.clone_from(url, tmp, bare=True, **({"depth": depth} if depth else {}))
        except git.GitCommandError as err:
            lines = [line.strip() for line in str(err.stderr).splitlines() if line.strip()]
            detail = lines[-1].strip("'") if lines else f"git exited with {err.status}"
            raise UserError(f"cannot clone {url} ({detail}); check the URL and the network") from None


def add_repository(
    ws: Workspace, source: str, name: str | None, rev: str, depth: int | None, log
) -> Repository:
    """Track a local repository (read where it is) or a clone URL (cloned under `clones/`)."""
    git = git_module()
    url = _is_url(source)
    if depth is not None and not url:
        raise UserError(f"--depth only applies to clone URLs; {source} is read as it is")
    name = check_name(name or _default_name(source))
    repos = ws.repositories()
    if name in repos:
        if repos[name].source == (source if url else str(Path(source).expanduser().resolve())):
            log(f"{name} is already tracked ({repos[name].source})")
            return repos[name]
        raise UserError(
            f"a repository named {name} is already tracked ({repos[name].source}); pass another --name"
        )
    if url:
        path = ws.clone_dir(name)
        if path.exists():
            raise UserError(f"{display(path)} already exists; remove it or pass another --name")
        log(f"cloning {source} into {display(path)} ...")
        _clone(source, path, depth)
        entry = Repository(name, source, str(path.resolve()), rev, cloned=True)
    else:
        local = Path(source).expanduser().resolve()
        open_repo(str(local))
        entry = Repository(name, str(local), str(local), rev, cloned=False)
    repo = open_repo(entry.path)
    try:
        repo.commit(rev)
    except (git.BadName, ValueError, git.GitCommandError):
        if entry.cloned:
            shutil.rmtree(entry.path, ignore_errors=True)
        raise UserError(
            f"--rev {rev!r} is not a revision of {source}; pass a branch, tag or commit"
        ) from None
    notes = []
    if shallow_boundary(repo):
        notes.append("shallow: the commits at its boundary are skipped (their parents were not fetched)")
    if any(line.startswith("160000") for line in repo.git.ls_tree("-r", rev).splitlines()):
        notes.append("has submodules: they are not followed (add each as a repository of its own)")
    ws.save_repositories({**repos, name: entry})
    log(f"tracking {name}: {entry.source} at {rev}" + "".join(f"; {note}" for note in notes))
    return entry


def remove_repository(ws: Workspace, name: str, purge: bool, log) -> None:
    """Stop tracking a repository: its clone (never a local repository) goes, and with `purge` its stage
    outputs too (tasks and reasoning cost LLM time, so they stay by default)."""
    repos = ws.repositories()
    if name not in repos:
        raise UserError(f"{name} is not tracked; tracked: {', '.join(repos) or 'none'}")
    entry = repos.pop(name)
    ws.save_repositories(repos)
    if entry.cloned:
        shutil.rmtree(entry.path, ignore_errors=True)
    outputs = ws.root / "commits" / name
    if purge:
        ws.remove_outputs(name)
        log(f"removed {name} and its outputs")
    else:
        kept = f"; its outputs stay in {display(outputs)} (--purge removes them)" if outputs.exists() else ""
        log(f"removed {name}{kept}")
