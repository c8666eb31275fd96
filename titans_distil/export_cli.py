"""Command-line front ends of the exporters: `export_mac_model.py` and `export_llama_model.py`."""

from __future__ import annotations

import click

from .cli import _quiet_libraries, user_errors

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _export_command(kind: str, name: str, summary: str, examples: str):
    @click.command(name=name, context_settings=CONTEXT, help=f"{summary}\n\n\b\nExamples:\n{examples}")
    @click.option(
        "--run",
        "run_dir",
        required=True,
        metavar="DIR",
        help="Run folder written by distil.py (runs/<run-name>).",
    )
    @click.option(
        "--checkpoint",
        default="latest",
        show_default=True,
        metavar="SPEC",
        help="'latest' (newest of checkpoints/step-N and final/), 'final', a step number, a checkpoint "
        "folder or a .safetensors file.",
    )
    @click.option(
        "--output", default=None, metavar="DIR", help=f"Folder to write. [default: exports/<run-name>-{kind}]"
    )
    @click.option(
        "--max-shard-size",
        default="5GB",
        show_default=True,
        help="Split the weights into safetensors shards of at most this size.",
    )
    @click.option(
        "--dtype",
        type=click.Choice(["float32", "bfloat16", "float16"]),
        default=None,
        help="Cast the weights. [default: as stored in the checkpoint]",
    )
    @click.option(
        "--push-to-hub",
        "push_to_hub",
        default=None,
        metavar="OWNER/NAME",
        help="Also upload the folder to this Hub model repo (token from HF_TOKEN or `hf auth login`).",
    )
    @click.option(
        "--private", is_flag=True, help="Create the Hub repo private (an existing repo keeps its visibility)."
    )
    @click.option(
        "--eval-results",
        default=None,
        metavar="FILE.json",
        help="An evaluate.py --output report of this model: its tables go into the model card, the file into "
        "the folder as eval.json.",
    )
    @click.option("--overwrite", is_flag=True, help="Replace a non-empty --output folder.")
    @user_errors
    def command(
        run_dir, checkpoint, output, max_shard_size, dtype, push_to_hub, private, eval_results, overwrite
    ):
        _quiet_libraries()
        from .export import export_model

        result = export_model(
            run_dir,
            kind,
            checkpoint,
            output,
            max_shard_size=max_shard_size,
            dtype=dtype,
            overwrite=overwrite,
            push_to_hub=push_to_hub,
            private=private,
            eval_results=eval_results,
            log=click.echo,
        )
        for path, digest in result.files.items():
            click.echo(f"  {digest[:16]}  {path}")

    return command


export_mac = _export_command(
    "mac",
    "export_mac_model.py",
    "Export a MAC (Titans memory) student as a Hugging Face folder loaded with "
    "trust_remote_code=True: config with auto_map, the self-contained model files, safetensors "
    "weights, tokenizer with chat template, generation config and a model card.",
    "  python export_mac_model.py --run runs/demo\n"
    "  python export_mac_model.py --run runs/demo --checkpoint 50 --output exports/demo-50 --dtype bfloat16\n"
    "  python export_mac_model.py --run runs/demo --push-to-hub me/demo-mac --private",
)

export_llama = _export_command(
    "llama",
    "export_llama_model.py",
    "Export a student without memory as a plain LlamaForCausalLM folder that stock transformers and vLLM "
    "load (no plugin, no trust_remote_code).",
    "  python export_llama_model.py --run runs/plain\n"
    "  python export_llama_model.py --run runs/plain --checkpoint final --output exports/plain "
    "--push-to-hub me/plain",
)


@click.command(name="push", context_settings=CONTEXT)
@click.argument("folder", metavar="FOLDER")
@click.argument("repo_id", metavar="REPO_ID")
@click.option(
    "--private", is_flag=True, help="Create the Hub repo private (an existing repo keeps its visibility)."
)
@click.option("--revision", default=None, metavar="BRANCH", help="Push to this branch (created if needed).")
@click.option(
    "--commit-message",
    default=None,
    help="The Hub commit message. [default: Upload ... exported by titans-distil]",
)
@user_errors
def push(folder, repo_id, private, revision, commit_message):
    """Upload an existing export (an export_mac_model.py, export_llama_model.py or package_model.py folder)
    to the Hugging Face Hub model repo REPO_ID (OWNER/NAME): create_repo + upload_folder, one commit. The
    token comes from HF_TOKEN or `hf auth login` and is never printed.

    \b
    Examples:
      titans-distil push exports/demo-mac me/demo-mac --private
      titans-distil push exports/demo-llama me/demo-llama --revision step-200 --commit-message "200 steps"
    """
    from .export import push_export

    push_export(
        folder, repo_id, private=private, revision=revision, commit_message=commit_message, log=click.echo
    )
