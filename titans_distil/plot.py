"""`titans-distil plot RUN`: the curves of a run's metrics.jsonl as PNGs, for a person who would rather look.

One figure per family of metrics that the run logged (losses, validation perplexity, learning rate and
gradient norm, throughput, memory statistics); a family the run never logged is left out, not drawn empty.
"""

from __future__ import annotations

import math
from pathlib import Path

import click

from .errors import UserError
from .run_folder import read_metrics

# family name -> (keys, y-axis label, log scale)
FAMILIES = {
    "loss": (("loss", "kd", "ce"), "nats / token", False),
    "val_ppl": (("val_ppl",), "validation perplexity", True),
    "optim": (("lr", "grad_norm"), "value", True),
    "throughput": (("tokens_per_s",), "tokens / s", False),
}
MEMORY_PREFIX = "mem_"


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [
        (r["step"], float(r[key]))
        for r in records
        if isinstance(r.get(key), int | float) and math.isfinite(r[key])
    ]
    return [s for s, _ in points], [v for _, v in points]


def plot_run(run_dir: str | Path, output_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per metric family of `run_dir/metrics.jsonl` into `output_dir` (default:
    `run_dir/plots`)."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise UserError(
            f"{run_dir} is not a folder; pass a run folder written by distil.py (runs/<run-name>)"
        )
    if not metrics.is_file():
        raise UserError(
            f"{run_dir} has no metrics.jsonl; pass a run folder written by distil.py (runs/<run-name>)"
        )
    records, torn = read_metrics(metrics)
    if not records:
        raise UserError(f"{metrics} holds no metrics yet; plot again once the run has logged a step")
    out = Path(output_dir) if output_dir is not None else run_dir / "plots"
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; pass a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {out} ({err.strerror}); pass a writable --output folder") from None

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logged = {key for record in records for key in record}
    families = dict(FAMILIES)
    memory_keys = tuple(sorted(k for k in logged if k.startswith(MEMORY_PREFIX)))
    if memory_keys:
        families["memory"] = (memory_keys, "value", True)
    written = []
    for name, (keys, ylabel, log_scale) in families.items():
        keys = [k for k in keys if k in logged]
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            steps, values = _series(records, key)
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        if name == "val_ppl":
            teacher = [r["teacher_val_ppl"] for r in records if "teacher_val_ppl" in r]
            if teacher:
                ax.axhline(teacher[0], linestyle="--", color="gray", label=f"teacher ({teacher[0]:.2f})")
        if log_scale and all(v > 0 for key in keys for v in _series(records, key)[1]):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{run_dir.name}: {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if torn:
        click.echo(
            f"warning: skipped {torn} unreadable line(s) of {metrics} (a run killed while writing leaves "
            "one)",
            err=True,
        )
    return written


@click.command(
    name="plot", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}
)
@click.argument("run_dir", metavar="RUN")
@click.option("--output", default=None, metavar="DIR", help="Folder for the PNGs. [default: RUN/plots]")
def plot_command(run_dir, output):
    """Plot a run's metrics.jsonl (loss, validation perplexity, lr, throughput, memory statistics) as PNGs.

    \b
    Example:
      titans-distil plot runs/demo            # -> runs/demo/plots/loss.png, val_ppl.png, ...
    """
    try:
        for path in plot_run(run_dir, output):
            click.echo(path)
    except UserError as err:
        raise click.ClickException(str(err)) from None
