"""Crash leftovers and resume (issue 12): stale temporaries of killed writers, torn metrics lines, damaged
checkpoints, `--resume` from the stored config (also of a moved run folder), the model card's total after a
resume, and folder modes that follow the umask. Tiny in-process runs of two steps."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from titans_distil.cli import distil
from titans_distil.model_folder import (
    LEGACY_STALE_SECONDS,
    atomic_file,
    atomic_folder,
    remove_stale_temporaries,
)

pytestmark = pytest.mark.usefixtures("one_thread")
HOST = "".join(c for c in socket.gethostname() if c.isalnum())[:32]


def invoke(*args):
    result = CliRunner().invoke(distil, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output.strip()


def run_args(teacher, corpus, *extra):
    """A run that keeps every default it can: --resume must find the rest in the stored config."""
    return [
        "--teacher",
        teacher,
        "--data",
        corpus,
        "--student-layers",
        2,
        "--max-length",
        32,
        "--batch-size",
        2,
        "--validation-fraction",
        0.2,
        "--eval-batches",
        2,
        "--precision",
        "fp32",
        "--lr",
        "3e-3",
        "--max-steps",
        2,
        "--save-every",
        1,
        "--eval-every",
        0,
        *extra,
    ]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def two_step_run(tiny_teacher_dir, small_corpus, tmp_path_factory):
    """An uninterrupted 2-step run with checkpoints at steps 1 and 2 (each test damages a copy)."""
    out = tmp_path_factory.mktemp("resume") / "runs"
    code, text = invoke(*run_args(tiny_teacher_dir, small_corpus), "--output-dir", out, "--run-name", "full")
    assert code == 0, text
    return out / "full"


def copy_run(run: Path, where: Path) -> Path:
    shutil.copytree(run, where)
    return where


# ------------------------------------------------------------------------------------------------ temporaries


def test_stale_temporaries_are_removed_and_live_ones_kept(tmp_path, sleeper):
    target = tmp_path / "model"
    dead = tmp_path / f".model.tmp-{dead_pid()}@{HOST}-abcd1234"
    live = tmp_path / f".model.tmp-{sleeper}@{HOST}-abcd1234"
    foreign = tmp_path / f".model.tmp-{dead_pid()}@someotherhost-abcd1234"
    legacy_old, legacy_new = tmp_path / ".model.tmp-k2j4h5g6", tmp_path / ".model.tmp-zzzzzzzz"
    other_target = tmp_path / f".other.tmp-{dead_pid()}@{HOST}-abcd1234"
    for path in (dead, live, foreign, legacy_old, legacy_new, other_target):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
    an_hour_ago = time.time() - LEGACY_STALE_SECONDS - 60
    os.utime(legacy_old, (an_hour_ago, an_hour_ago))
    with atomic_folder(target) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (target / "config.json").is_file()
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"model", live.name, foreign.name, legacy_new.name, other_target.name}
    # without a target, every stale temporary of the folder goes
    assert remove_stale_temporaries(tmp_path) == [other_target]


def test_a_writer_killed_between_its_renames_gets_its_folder_back(tmp_path):
    parked = tmp_path / f".model.old-{dead_pid()}@{HOST}-abcd1234"
    (parked / "model").mkdir(parents=True)
    (parked / "model" / "config.json").write_text('{"good": true}')
    remove_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (tmp_path / "model" / "config.json").read_text() == '{"good": true}'


def test_atomic_file_cleans_up_and_replaces(tmp_path):
    stale = tmp_path / f".out.json.tmp-{dead_pid()}@{HOST}-abcd1234"
    stale.write_text("{")
    with atomic_file(tmp_path / "out.json") as tmp:
        tmp.write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_folders_get_the_modes_of_the_umask(tmp_path, mask):
    before = os.umask(mask)
    try:
        with atomic_folder(tmp_path / "export") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "weights.bin").write_bytes(b"x")
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(before)
    out = tmp_path / "export"
    assert (out.stat().st_mode & 0o777) == 0o777 & ~mask
    assert ((out / "sub").stat().st_mode & 0o777) == 0o777 & ~mask
    for name in ("config.json", "sub/weights.bin"):
        assert ((out / name).stat().st_mode & 0o777) == 0o666 & ~mask


# ------------------------------------------------------------------------------------------------ resume


def test_resume_after_a_crash_mid_save_and_mid_log(two_step_run, tmp_path, monkeypatch, sleeper):
    """Killed while writing step 2: a torn metrics line, a truncated optimizer in step-2 and a temporary of
    the killed save. `--resume` with only --run-name falls back to step 1 and reproduces the losses."""
    monkeypatch.chdir(tmp_path)
    run = copy_run(two_step_run, tmp_path / "runs" / "demo")
    optimizer = run / "checkpoints" / "step-000002" / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "loss": 1.2')  # killed mid-write
    stale = run / "checkpoints" / f".step-000003.tmp-{dead_pid()}@{HOST}-abcd1234"
    live = run / "checkpoints" / f".step-000003.tmp-{sleeper}@{HOST}-abcd1234"
    for path in (stale, live):
        path.mkdir()
    code, out = invoke("--run-name", "demo", "--resume")
    assert code == 0, out
    shown = Path("runs", "demo")  # as the user named it
    damaged = shown / "checkpoints" / "step-000002"
    assert f"warning: checkpoint {damaged} is damaged (optimizer.safetensors is unreadable" in out
    assert f"warning: {shown / 'metrics.jsonl'} line 4 is torn" in out
    assert f"resumed {shown} from step-000001" in out
    assert not stale.exists() and live.exists()
    assert losses(run) == losses(two_step_run)
    assert [r["step"] for r in records(run)] == [0, 1, 2]  # every line parses

    # a later resume that trains on appends cleanly; the card counts the steps the run now has
    code, out = invoke("--run-name", "demo", "--resume", "--max-steps", 3, "--save-every", 3)
    assert code == 0, out
    assert [r["step"] for r in records(run)] == [0, 1, 2, 3]
    config = json.loads((run / "config.json").read_text())
    assert config["max_steps"] == 3 and config["save_every"] == 3
    from titans_distil.export import export_model

    export_model(run, "llama", "3", tmp_path / "export", log=lambda line: None)
    assert "| training steps | 3 run (max steps 3) |" in (tmp_path / "export" / "README.md").read_text()


def test_resume_refuses_a_changed_recipe_in_one_line(two_step_run, tmp_path):
    out_dir = tmp_path / "runs"
    copy_run(two_step_run, out_dir / "demo")
    code, out = invoke("--output-dir", out_dir, "--run-name", "demo", "--resume", "--lr", "0.1")
    assert code == 1 and "\n" not in out, out
    assert out == (
        f"Error: --resume: {out_dir / 'demo'} was started with a different config (lr: run has "
        "0.003, --lr gives 0.1); drop --lr to keep the run's value, or choose a new --run-name"
    )
    code, out = invoke("--output-dir", out_dir, "--run-name", "demo", "--resume", "--use-mac")
    assert code == 1 and "(use_mac: run has False, --use-mac gives True)" in out, out
    # the same value given again is no change
    same = ("--lr", "3e-3", "--batch-size", 2)
    code, out = invoke("--output-dir", out_dir, "--run-name", "demo", "--resume", *same)
    assert code == 0 and "resumed" in out, out


def test_a_moved_run_folder_resumes_where_it_is(two_step_run, tmp_path):
    moved = copy_run(two_step_run, tmp_path / "elsewhere" / "renamed")
    shutil.rmtree(moved / "checkpoints" / "step-000002")
    code, out = invoke("--output-dir", tmp_path / "elsewhere", "--run-name", "renamed", "--resume")
    assert code == 0 and "resumed" in out, out
    assert losses(moved) == losses(two_step_run)
    config = json.loads((moved / "config.json").read_text())
    assert config["output_dir"] == str(tmp_path / "elsewhere") and config["run_name"] == "renamed"
    assert not (two_step_run.parent / "renamed").exists()


def test_damaged_metrics_in_the_middle_and_no_readable_checkpoint_are_one_line_errors(two_step_run, tmp_path):
    run = copy_run(two_step_run, tmp_path / "runs" / "demo")
    args = ("--output-dir", tmp_path / "runs", "--run-name", "demo", "--resume")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], '{"step": 1, "lo', *lines[1:]]) + "\n")
    code, out = invoke(*args)
    assert code == 1 and "\n" not in out, out
    assert f"{run / 'metrics.jsonl'} line 2 is not a metrics record" in out

    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    for step in (1, 2):
        (run / "checkpoints" / f"step-00000{step}" / "model.safetensors").write_bytes(b"\0" * 16)
    code, out = invoke(*args)
    assert code == 1, out
    error = out.splitlines()[-1]
    assert error.startswith(f"Error: --resume: no checkpoint of {run} is readable (step-000002: model.")
    assert [line for line in out.splitlines() if not line.startswith("warning: ")] == [error]
