"""`titans-distil plot`: PNGs from a run's metrics.jsonl, torn lines tolerated, bad input in one line."""

import json

import pytest
from click.testing import CliRunner

from titans_distil.plot import plot_command, plot_run, read_metrics


def _run(tmp_path, lines):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return run


RECORDS = [json.dumps({"step": 0, "val_ppl": 900.0, "teacher_val_ppl": 8.0})] + [
    json.dumps(
        {
            "step": s,
            "loss": 5.0 / s,
            "kd": 4.0 / s,
            "ce": 6.0 / s,
            "lr": 1e-4,
            "grad_norm": 1.5,
            "tokens_per_s": 300.0,
            "mem_surprise_norm": 0.1 * s,
        }
    )
    for s in range(1, 6)
]


def test_plot_writes_one_png_per_logged_family(tmp_path):
    run = _run(tmp_path, RECORDS)
    paths = plot_run(run)
    assert sorted(p.name for p in paths) == [
        "loss.png",
        "memory.png",
        "optim.png",
        "throughput.png",
        "val_ppl.png",
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_leaves_out_families_never_logged(tmp_path):
    run = _run(tmp_path, [json.dumps({"step": 1, "loss": 2.0})])
    assert [p.name for p in plot_run(run, tmp_path / "out")] == ["loss.png"]


def test_torn_last_line_is_skipped(tmp_path):
    run = _run(tmp_path, RECORDS + ['{"step": 6, "loss": 0.'])
    records, torn = read_metrics(run / "metrics.jsonl")
    assert (len(records), torn) == (6, 1)
    result = CliRunner().invoke(plot_command, [str(run)])
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable line" in result.output


@pytest.mark.parametrize(
    "setup, fragment",
    [
        ("missing", "is not a folder"),
        ("no-metrics", "has no metrics.jsonl"),
        ("empty", "holds no metrics yet"),
        ("output-is-file", "is a file; pass a folder"),
    ],
)
def test_bad_input_is_one_line(tmp_path, setup, fragment):
    run, args = tmp_path / "run", []
    if setup != "missing":
        run.mkdir()
    if setup == "empty":
        (run / "metrics.jsonl").write_text("\n")
    if setup == "output-is-file":
        (run / "metrics.jsonl").write_text(RECORDS[1] + "\n")
        (tmp_path / "file").write_text("x")
        args = ["--output", str(tmp_path / "file")]
    result = CliRunner().invoke(plot_command, [str(run), *args])
    assert result.exit_code == 1
    assert fragment in result.output and len(result.output.strip().splitlines()) == 1
