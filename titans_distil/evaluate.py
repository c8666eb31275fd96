"""`evaluate.py` / `titans-distil eval`: held-out perplexity by position and long-range recall, for every kind
of model folder the project makes or loads, memory on and off in one run.

Models: a plain Llama folder (a teacher, an `export_llama_model.py` folder), a MAC export or a run's `final/`,
a `package_model.py` wrapper, a run folder (its `--checkpoint`, default the latest) or one of its
`checkpoints/step-N` folders. Every model is run the way it is meant to run over a long sequence:

* a Llama reads the whole sequence in one forward (full causal attention);
* a MAC model reads it in one forward too: its attention is segment-local and its neural memory carries the
  stream from segment to segment, under the update rule asked for;
* a packaged wrapper reads it in windows of `window` tokens, one forward each: its memory holds what earlier
  windows wrote (a wrapper's memory only serves later calls; inside one call it is plain full attention).

A memory model is measured twice: with memory updates (`update_rule`, default surprise) and with update rule
"none", the windowed baseline (MAC: segment-local attention over the initial memory; wrapper: each window
alone). The difference is what the memory brings.

Measures, on text no training run saw:

1. Perplexity by position: validation blocks of `--data` (the document split of `data.py`, as `distil` makes
it)
   of exactly `context` tokens; the next-token loss of each target position is averaged within position
   buckets (0-256, 256-1K, 1K-2K, 2K-4K, ...). A bucket that starts at or beyond the context is left out.
2. Recall: `long_range.py` items (a passkey in prose filler, a code needle in held-out code) with `distance`
   tokens between the fact and the question. One forward per item, teacher-forced: an item is recalled when
   the greedy (argmax) prediction of every answer token is right given everything before it; the answer loss
   is in nats per answer token over all items of a (kind, distance).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import torch

from .cli import NON_NEGATIVE, POSITIVE, _quiet_libraries, finite, trust_remote_code_option, user_errors
from .data import DEFAULT_DATA_SPEC, DEFAULT_VALIDATION_FRACTION, DataError, load_blocks
from .errors import UserError
from .generate import load_model, model_kind
from .long_range import KINDS, make_items
from .model_folder import atomic_file, check_output_file, display, kind_of, read_config, status
from .models.neural_memory import UPDATE_RULES
from .run_folder import CHECKPOINTS

# the classic passkey-retrieval filler (Mohtashami & Jaggi 2023): prose with nothing to remember
PROSE_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# where each kind of item takes its filler from
FILLER_OF_KIND = {"passkey": "prose", "kv": "prose", "code": "code"}
DEFAULT_CONTEXTS = (2048, 4096)
DEFAULT_DISTANCES = (512, 1024, 2048, 4096)
FILLER_MIN_TOKENS = 16384  # filler read (when the split has it) for every distance
HEAD_CHUNK = 512  # positions per chunk of full-vocabulary logits (peak memory: one chunk)
FOLDER_HINT = (
    "pass a model folder (a Llama/teacher folder, an export, a package_model.py folder, a run's final/), "
    "a run folder or a run's checkpoint folder"
)


# ----------------------------------------------------------------------------------------------- models


@dataclass
class Variant:
    """One model under one memory setting: one row of the results."""

    name: str
    model: object
    kind: str  # "mac", "memory" or "llama"
    update_rule: str | None = None  # None: a model without memory
    window: int = 512  # wrapper only: tokens per forward call

    @property
    def label(self) -> str:
        if self.update_rule is None:
            return self.name
        return f"{self.name} [{'no memory' if self.update_rule == 'none' else 'memory ' + self.update_rule}]"

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    @torch.no_grad()
    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states (T, H) of a (T,) token sequence, read as this kind of model reads a long
        text."""
        model, ids = self.model, ids.to(self.model.device)[None]
        if self.kind == "llama":
            return model.model(input_ids=ids, use_cache=False).last_hidden_state[0]
        if self.kind == "mac":
            return model.model(
                input_ids=ids, use_cache=False, update_rule=self.update_rule
            ).last_hidden_state[0]
        model.reset_memory()
        try:
            pieces = [
                model(
                    ids[:, start : start + self.window],
                    use_memory=True,
                    update_rule=self.update_rule,
                    use_cache=False,
                    logits_to_keep=1,
                    output_hidden_states=True,
                ).hidden_states[-1][0]
                for start in range(0, ids.shape[1], self.window)
            ]
        finally:
            model.reset_memory()
        return torch.cat(pieces)

    @torch.no_grad()
    def score(self, ids, start: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token loss (nats) and greedy prediction of every token from position `start` on, each given
        all tokens before it: two (T - start,) tensors. The head runs in chunks, so full logits never exist at
        once."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        hidden = self.hidden(ids)[start - 1 : -1]
        targets = ids[start:].to(hidden.device)
        head = self.model.get_output_embeddings()
        nll, pred = [], []
        for i in range(0, len(targets), HEAD_CHUNK):
            logp = head(hidden[i : i + HEAD_CHUNK]).float().log_softmax(-1)
            nll.append(-logp.gather(-1, targets[i : i + HEAD_CHUNK, None])[:, 0])
            pred.append(logp.argmax(-1))
        return torch.cat(nll).cpu(), torch.cat(pred).cpu()


def _is_run(folder: Path) -> bool:
    """A distil.py run folder (its config.json is a run config, not a model config)."""
    if not (folder / "config.json").is_file():
        return False
    config = read_config(folder)
    return "teacher" in config and kind_of(config) is None


def load_any(path: str, checkpoint: str = "latest", dtype: str = "auto", trust_remote_code: bool = False):
    """(model, tokenizer, name) of any folder the project makes or loads; one-line `UserError` otherwise
    (`trust_remote_code`: the user's --trust-remote-code, see `model_folder.trust_remote_code_for`)."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise UserError(f"{path} does not exist; {FOLDER_HINT}")
    if not folder.is_dir():
        raise UserError(f"{path} is a file, not a model folder; {FOLDER_HINT}")
    if not (folder / "config.json").is_file():
        raise UserError(f"{path} is not a model folder (no config.json); {FOLDER_HINT}")
    run_dir, spec = None, None
    if _is_run(folder):
        run_dir, spec = folder, checkpoint
    elif folder.parent.name == CHECKPOINTS and _is_run(folder.parent.parent):
        run_dir, spec = folder.parent.parent, str(folder)
    if run_dir is not None:  # weights of a run: built from the run's own config, as the exporters do
        from .run_folder import load_run, resolve_checkpoint, run_tokenizer
        from .weights import load_student

        run = load_run(run_dir)
        ckpt = resolve_checkpoint(run, spec)
        status(f"loading {path} ({ckpt.label}) ...")
        model = load_student(run, ckpt, None if dtype == "auto" else getattr(torch, dtype))
        return model, run_tokenizer(run), f"{run.name}@{Path(ckpt.label).name}"
    config = read_config(folder)
    if kind_of(config) is None:
        raise UserError(
            f"{path} holds a {config.get('model_type')!r} model; evaluate takes Llama, MAC (mac_llama) "
            "and package_model.py (memory_llama) folders"
        )
    status(f"loading {path} ...")
    model, tokenizer = load_model(str(folder), dtype, trust_remote_code)
    return model, tokenizer, short_name(folder)


def short_name(folder: Path) -> str:
    """How rows are named: the path relative to the working directory, else its last two parts."""
    name = display(folder)
    return name if not Path(name).is_absolute() else "/".join(Path(name).parts[-2:])


def variants(model, name: str, update_rule: str, window: int) -> list[Variant]:
    """The rows of one model: memory on (`update_rule`) and off ("none") for a memory model, one row
    otherwise."""
    kind = model_kind(model)
    if kind == "llama":
        return [Variant(name, model, kind)]
    rules = [update_rule] if update_rule == "none" else [update_rule, "none"]
    return [Variant(name, model, kind, rule, window) for rule in rules]


# ---------------------------------------------------------------------------------------------- held-out text


def position_buckets(context: int) -> list[tuple[str, int, int]]:
    """(label, start, end) of the position buckets a sequence of `context` tokens reaches: 0-256, 256-1K, then
    doubling; the last one is cut at the context."""
    edges = [0, 256, 1024]
    while edges[-1] < context:
        edges.append(edges[-1] * 2)
    label = lambda n: f"{n // 1024}K" if n >= 1024 else str(n)  # noqa: E731
    return [
        (f"{label(lo)}-{label(hi)}", lo, min(hi, context)) for lo, hi in zip(edges, edges[1:]) if lo < context
    ]


def _too_short(err: DataError) -> bool:
    """`load_blocks`' error for a split shorter than one block (worded for distil's --max-length)."""
    return "fewer than --max-length" in str(err)


def held_out_blocks(data: str, tokenizer, context: int, blocks: int, validation_fraction: float, seed: int):
    """`blocks` validation sequences of `context` tokens of `data` (fewer if the split holds fewer)."""
    try:
        return load_blocks(
            data,
            tokenizer,
            context,
            "validation",
            seed=seed,
            validation_fraction=validation_fraction,
            max_blocks=blocks,
        )
    except DataError as err:
        if _too_short(err):
            raise UserError(
                f"--data {data}: its validation split holds fewer than --context {context} tokens; use "
                "a larger --data or --validation-fraction, or a smaller --context"
            ) from None
        raise


def filler_stream(
    source: str, data: str | None, tokenizer, tokens: int, validation_fraction: float, seed: int
):
    """A 1-D token stream of at least `tokens` filler tokens: the repeated prose sentences, or the validation
    split of `data` (the code corpus, or `--prose-data`). Up to 4x more is read when the split has it, so
    items at the longest distance do not all cut the same stretch of text."""
    if source == "prose" and data is None:
        unit = tokenizer(PROSE_FILLER, add_special_tokens=False)["input_ids"]
        return torch.tensor(unit * (tokens // len(unit) + 1))
    block = 128
    try:
        stream = load_blocks(
            data,
            tokenizer,
            block,
            "validation",
            seed=seed,
            validation_fraction=validation_fraction,
            max_blocks=math.ceil(max(4 * tokens, FILLER_MIN_TOKENS) / block),
        ).reshape(-1)
    except DataError as err:
        if _too_short(err):
            raise UserError(
                f"the {source} filler {data} has fewer than {block} validation tokens; use a larger data "
                "source or --validation-fraction"
            ) from None
        raise
    if len(stream) < tokens:
        raise UserError(
            f"the {source} filler {data} has {len(stream)} validation tokens, fewer than the {tokens} the "
            "longest distance needs; use a larger data source, a larger --validation-fraction or smaller "
            "--distances"
        )
    return stream


# ----------------------------------------------------------------------------------------------- measures


def perplexity(variant: Variant, blocks: torch.Tensor, progress=None) -> dict:
    """{bucket: {"loss", "ppl", "tokens"}} over `blocks` (n, context): mean next-token loss per target
    position bucket, and the whole sequence as "all"."""
    context = blocks.shape[1]
    sums = torch.zeros(context, dtype=torch.float64)
    for block in blocks:
        nll, _ = variant.score(block)
        sums[1:] += nll.double()
        if progress:
            progress(context)
    out = {}
    for label, lo, hi in position_buckets(context) + [("all", 0, context)]:
        lo = max(lo, 1)  # position 0 has nothing before it
        tokens = (hi - lo) * len(blocks)
        loss = sums[lo:hi].sum().item() / tokens
        out[label] = {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": tokens}
    return out


def recall(variant: Variant, items: list, progress=None) -> dict:
    """Teacher-forced exact match of the answer spans of `items` and their loss (nats per answer token)."""
    correct, nll_sum, answer_tokens = 0, 0.0, 0
    for item in items:
        start, end = item.answer
        nll, pred = variant.score(item.ids, start)
        correct += bool((pred[: end - start] == torch.tensor(item.ids[start:end])).all())
        nll_sum += nll[: end - start].sum().item()
        answer_tokens += end - start
        if progress:
            progress(len(item.ids))
    return {
        "accuracy": correct / len(items),
        "correct": correct,
        "items": len(items),
        "answer_loss": nll_sum / answer_tokens,
    }


# ----------------------------------------------------------------------------------------------- the run


@dataclass
class Settings:
    """What an evaluation measures (all of it goes into the results JSON)."""

    contexts: tuple[int, ...] = DEFAULT_CONTEXTS
    blocks: int = 4
    distances: tuple[int, ...] = DEFAULT_DISTANCES
    kinds: tuple[str, ...] = ("passkey", "code")
    items: int = 8
    data: str = DEFAULT_DATA_SPEC
    prose_data: str | None = None
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION
    update_rule: str = "surprise"
    window: int = 512
    seed: int = 0


def check_positions(rows: list[Variant], contexts: tuple[int, ...], items: dict) -> None:
    """Every sequence must fit every model's positions (max_position_embeddings); refused before anything
    runs."""
    longest = max((i for group in items.values() for i in group), key=lambda i: len(i.ids), default=None)
    for row in rows:
        limit = row.max_positions
        if limit and contexts and max(contexts) > limit:
            raise UserError(
                f"--context {max(contexts)} exceeds the {limit} positions of {row.name} "
                "(max_position_embeddings); pass a smaller --context"
            )
        if limit and longest is not None and len(longest.ids) > limit:
            raise UserError(
                f"a recall item at distance {longest.distance} is {len(longest.ids)} tokens long with its "
                f"fact, question and answer, more than the {limit} positions of {row.name} "
                "(max_position_embeddings); pass smaller --distances"
            )


def recall_items(settings: Settings, tokenizer) -> dict:
    """{(kind, distance): items}, the same for every model; each kind takes its filler from its own source."""
    items, fillers = {}, {}
    if not settings.items:
        return items
    for kind in settings.kinds:
        source = FILLER_OF_KIND[kind]
        if source not in fillers:
            data = settings.data if source == "code" else settings.prose_data
            fillers[source] = filler_stream(
                source,
                data,
                tokenizer,
                max(settings.distances) + 1,
                settings.validation_fraction,
                settings.seed,
            )
        for distance in settings.distances:
            items[kind, distance] = make_items(
                kind, tokenizer, fillers[source], distance, settings.items, settings.seed, domain="eval"
            )
    return items


def evaluate(
    rows: list[Variant], tokenizer, settings: Settings, meta: dict | None = None, progress: bool = True
) -> dict:
    """Run every measure on every row; return the results (settings, `meta` and one entry per row)."""
    contexts = settings.contexts if settings.blocks else ()
    check_positions(rows, contexts, {})
    items = recall_items(settings, tokenizer)
    check_positions(rows, (), items)
    blocks = {
        c: held_out_blocks(
            settings.data, tokenizer, c, settings.blocks, settings.validation_fraction, settings.seed
        )
        for c in contexts
    }
    per_row = sum(b.numel() for b in blocks.values()) + sum(len(i.ids) for g in items.values() for i in g)
    from tqdm.auto import tqdm

    results = []
    with tqdm(
        total=per_row * len(rows),
        unit="tok",
        unit_scale=True,
        desc="evaluate",
        dynamic_ncols=True,
        disable=not progress,
    ) as bar:
        for row in rows:
            bar.set_postfix_str(row.label)
            started = time.perf_counter()
            entry = {
                "name": row.name,
                "label": row.label,
                "kind": row.kind,
                "update_rule": row.update_rule,
                "window": row.window if row.kind == "memory" else None,
                "perplexity": {},
                "recall": {},
            }
            for context, data in blocks.items():
                entry["perplexity"][str(context)] = perplexity(row, data, bar.update)
            for (kind, distance), group in items.items():
                entry["recall"].setdefault(kind, {})[str(distance)] = recall(row, group, bar.update)
            seconds = time.perf_counter() - started
            entry.update(seconds=round(seconds, 2), tokens_per_s=round(per_row / max(seconds, 1e-9), 1))
            results.append(entry)
    settings_out = (
        asdict(settings) | (meta or {}) | {"blocks_per_context": {str(c): len(b) for c, b in blocks.items()}}
    )
    return {"settings": settings_out, "results": results}


# ----------------------------------------------------------------------------------------------- reporting


def markdown_table(report: dict) -> str:
    """README tables: loss (perplexity) per position bucket, and recall accuracy (answer loss) per
    distance."""
    lines = []
    results = report["results"]
    contexts = sorted({int(c) for r in results for c in r["perplexity"]})
    if contexts:
        buckets = [label for label, _, _ in position_buckets(max(contexts))] + ["all"]
        lines += ["| model | context | " + " | ".join(buckets) + " |", "|---|---|" + "---|" * len(buckets)]
        for r in results:
            for context in contexts:
                cells = r["perplexity"][str(context)]
                lines.append(
                    f"| {r['label']} | {context} | "
                    + " | ".join(
                        f"{cells[b]['loss']:.3f} ({_ppl(cells[b]['ppl'])})" if b in cells else ""
                        for b in buckets
                    )
                    + " |"
                )
        lines.append("")
        lines.append("Loss in nats per token (perplexity) by target position.")
    columns = sorted(
        {(kind, int(d)) for r in results for kind, by in r["recall"].items() for d in by},
        key=lambda c: (KINDS.index(c[0]), c[1]),
    )
    if columns:
        if lines:
            lines.append("")
        lines += [
            "| model | " + " | ".join(f"{kind} @{d}" for kind, d in columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for r in results:
            cells = [r["recall"][kind][str(d)] for kind, d in columns]
            lines.append(
                f"| {r['label']} | "
                + " | ".join(f"{c['correct']}/{c['items']} ({c['answer_loss']:.2f})" for c in cells)
                + " |"
            )
        lines.append("")
        lines.append(
            "Recall: items whose whole answer is the greedy prediction (answer loss, nats per token)."
        )
    return "\n".join(lines)


def _ppl(value: float) -> str:
    return f"{value:.1f}" if value < 1e4 else f"{value:.2e}"


def plot(report: dict, path: Path) -> None:
    """Two panels: recall accuracy vs distance (a line per model/variant and kind), loss vs position bucket (a
    line per model/variant and context)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles, markers = ["-", "--", ":", "-."], ["o", "s", "^", "D"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, r in enumerate(report["results"]):
        color = colors[n % len(colors)]
        for k, (kind, by) in enumerate(r["recall"].items()):
            distances = sorted(int(d) for d in by)
            left.plot(
                distances,
                [by[str(d)]["accuracy"] for d in distances],
                linestyle=styles[k % 4],
                marker=markers[k % 4],
                color=color,
                label=f"{r['label']} {kind}",
            )
        for k, (context, cells) in enumerate(r["perplexity"].items()):
            labels = [b for b in cells if b != "all"]
            right.plot(
                labels,
                [cells[b]["loss"] for b in labels],
                linestyle=styles[k % 4],
                marker=markers[k % 4],
                color=color,
                label=f"{r['label']} @{context}",
            )
    left.set(
        xlabel="distance (tokens between fact and question)",
        ylabel="recall accuracy",
        ylim=(-0.05, 1.05),
        title="recall vs distance",
    )
    distances = sorted({int(d) for r in report["results"] for by in r["recall"].values() for d in by})
    if distances and distances[0] > 0:
        left.set_xscale("log", base=2)
    left.set_xticks(distances, [str(d) for d in distances])
    left.minorticks_off()
    right.set(xlabel="target position", ylabel="loss (nats / token)", title="held-out loss by position")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def write_json(report: dict, path: Path) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")


# ----------------------------------------------------------------------------------------------- command


def parse_ints(text: str, flag: str, minimum: int) -> tuple[int, ...]:
    """'2048,4096' -> (2048, 4096), sorted, duplicates dropped; one-line `UserError` for anything else."""
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UserError(
            f"{flag} {text!r} is not a comma-separated list of integers, e.g. {flag} 512,1024"
        ) from None
    if not values:
        raise UserError(f"{flag} {text!r} names no value; give a comma-separated list of integers")
    if values[0] < minimum:
        raise UserError(f"{flag}: {values[0]} is below {minimum}")
    return tuple(values)


def parse_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise UserError(f"--kinds {text!r}: choose from {', '.join(KINDS)}")
    return kinds


def _output_path(value: str | None, flag: str, suffix: str) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_dir():
        raise UserError(f"{flag} {value} is a folder; give a {suffix} file name")
    check_output_file(path, flag)  # under a file, in a read-only folder: before any model loads
    if path.suffix.lower() != suffix:
        raise UserError(f"{flag} {value} does not end in {suffix}; give a {suffix} file name")
    return path


@click.command(
    name="evaluate.py", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}
)
@click.argument("models", nargs=-1, required=True, metavar="MODEL...")
@click.option(
    "--context",
    "contexts",
    default=",".join(map(str, DEFAULT_CONTEXTS)),
    show_default=True,
    help="Sequence lengths of the perplexity measure, comma-separated; each reports its position buckets "
    "(0-256, 256-1K, 1K-2K, 2K-4K, ...) up to its length.",
)
@click.option(
    "--blocks",
    type=NON_NEGATIVE,
    default=4,
    show_default=True,
    help="Held-out sequences per context (0 skips the perplexity measure).",
)
@click.option(
    "--distances",
    default=",".join(map(str, DEFAULT_DISTANCES)),
    show_default=True,
    help="Recall: tokens of filler between the fact and the question, comma-separated.",
)
@click.option(
    "--items",
    type=NON_NEGATIVE,
    default=8,
    show_default=True,
    help="Recall items per kind and distance (0 skips the recall measure).",
)
@click.option(
    "--kinds",
    default="passkey,code",
    show_default=True,
    help=f"Recall item kinds ({', '.join(KINDS)}): passkey and kv in prose filler, code in held-out code.",
)
@click.option(
    "--update-rule",
    type=click.Choice(UPDATE_RULES),
    default="surprise",
    show_default=True,
    help="Memory models: the update rule of the memory-on rows; a memory-off row (none) is always added.",
)
@click.option(
    "--window",
    type=POSITIVE,
    default=512,
    show_default=True,
    help="package_model.py wrappers: tokens per forward call (the memory carries earlier windows). MAC "
    "models use their own segment length, Llama models the whole sequence.",
)
@click.option(
    "--teacher",
    default=None,
    help="Also evaluate this Llama with full context, the ceiling: 'embedded', a folder or a .gguf file. "
    "[default: none]",
)
@click.option(
    "--checkpoint",
    default="latest",
    show_default=True,
    help="Run folders: which weights ('latest', 'final', a step number or a checkpoint folder).",
)
@click.option(
    "--data",
    default=DEFAULT_DATA_SPEC,
    show_default=True,
    help="Corpus whose validation split is the held-out text and the code filler (a distil --data spec; "
    "use the run's own).",
)
@click.option(
    "--prose-data",
    default=None,
    help="Corpus whose validation split is the prose filler. [default: the classic passkey sentences]",
)
@click.option(
    "--validation-fraction",
    type=finite(0.0, 0.5, min_open=True),
    default=DEFAULT_VALIDATION_FRACTION,
    show_default=True,
    help="Share of documents held out, as in distil (the same value gives the same held-out documents).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the recall items.")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16"]),
    default="auto",
    show_default=True,
    help="Load the weights in this dtype.",
)
@click.option(
    "--output",
    default=None,
    metavar="FILE.json",
    help="Write the results here. [default: beside --plot, else only the printed tables]",
)
@click.option(
    "--plot",
    "plot_path",
    default=None,
    metavar="FILE.png",
    help="Draw recall vs distance and loss vs position into this PNG.",
)
@trust_remote_code_option
@user_errors
def evaluate_command(
    models,
    contexts,
    blocks,
    distances,
    items,
    kinds,
    update_rule,
    window,
    teacher,
    checkpoint,
    data,
    prose_data,
    validation_fraction,
    seed,
    dtype,
    output,
    plot_path,
    trust_remote_code,
):
    """Held-out perplexity by position and long-range recall of model folders, memory on and off.

    \b
    MODEL: a Llama/teacher folder, a MAC export or run final/, a package_model.py folder, a run folder
    (--checkpoint) or a run's checkpoints/step-N folder. Memory models get two rows: memory on
    (--update-rule) and off (none, the windowed baseline).

    \b
    Examples:
      python evaluate.py exports/demo-mac --teacher embedded --plot eval/demo.png
      python evaluate.py runs/demo --checkpoint 200 --context 2048 --distances 512,1024 --items 16
      python evaluate.py packaged/smol-memory --update-rule ema --window 256 --output eval/wrapper.json
    """
    _quiet_libraries()
    settings = Settings(
        contexts=parse_ints(contexts, "--context", 2),
        blocks=blocks,
        distances=parse_ints(distances, "--distances", 0),
        kinds=parse_kinds(kinds),
        items=items,
        data=data,
        prose_data=prose_data,
        validation_fraction=validation_fraction,
        update_rule=update_rule,
        window=window,
        seed=seed,
    )
    if not blocks and not items:
        raise UserError("nothing to measure: --blocks 0 and --items 0")
    output = _output_path(output, "--output", ".json")
    plot_path = _output_path(plot_path, "--plot", ".png")
    if output is None and plot_path is not None:
        output = plot_path.with_suffix(".json")

    rows, tokenizer, vocab = [], None, None
    for path in models:
        model, tok, name = load_any(path, checkpoint, dtype, trust_remote_code)
        rows += variants(_on_device(model), name, update_rule, window)
        tokenizer, vocab = _same_tokenizer(tokenizer, vocab, tok, name)
    if teacher is not None:
        from .teacher import load_teacher

        status(f"loading the teacher from {teacher} ...")
        model, tok = load_teacher(teacher, dtype=torch.float32 if dtype == "auto" else getattr(torch, dtype))
        name = f"teacher ({teacher})"
        rows.append(Variant(name, _on_device(model), "llama"))
        _same_tokenizer(tokenizer, vocab, tok, name)
    from .train import resolve_precision

    meta = {
        "models": list(models),
        "teacher": teacher,
        "checkpoint": checkpoint,
        "dtype": dtype,
        "device": str(rows[0].model.device),
        "torch_threads": torch.get_num_threads(),
        "precision_auto": resolve_precision("auto"),  # bf16 where the hardware has it: speeds depend on it
    }
    report = evaluate(rows, tokenizer, settings, meta)
    click.echo(markdown_table(report))
    for path, write in ((output, write_json), (plot_path, plot)):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write(report, path)
            click.echo(f"wrote {path}", err=True)


def _on_device(model):
    """A GPU when there is one (quantized models stay where their loader put them)."""
    if torch.cuda.is_available() and not getattr(model, "is_quantized", False):
        return model.to("cuda")
    return model


def _same_tokenizer(first, vocab, tok, name):
    """All models read the same token ids: their tokenizers must agree."""
    if first is None:
        return tok, tok.get_vocab()
    if tok.get_vocab() != vocab:
        raise UserError(
            f"{name} has another tokenizer than the first model; evaluate models of one teacher together"
        )
    return first, vocab
