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
        help="'latest' (newest of checkpoints/step-N and final/), 'final', a step number, a checkpoint folder or a .safetensors file.",
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
    @click.option("--overwrite", is_flag=True, help="Replace a non-empty --output folder.")
    @user_errors
    def command(run_dir, checkpoint, output, max_shard_size, dtype, push_to_hub, private, overwrite):
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
            log=click.echo,
        )
        for path, digest in result.files.items():
            click.echo(f"  {digest[:16]}  {path}")

    return command


export_mac = _export_command(
    "mac",
    "export_mac_model.py",
    "Export a MAC (Titans memory) student as a Hugging Face folder loaded with trust_remote_code=True: config with "
    "auto_map, the self-contained model files, safetensors weights, tokenizer with chat template, generation config "
    "and a model card.",
    "  python export_mac_model.py --run runs/demo\n"
    "  python export_mac_model.py --run runs/demo --checkpoint 50 --output exports/demo-50 --dtype bfloat16\n"
    "  python export_mac_model.py --run runs/demo --push-to-hub me/demo-mac --private",
)

export_llama = _export_command(
    "llama",
    "export_llama_model.py",
    "Export a student without memory as a plain LlamaForCausalLM folder that stock transformers and vLLM load "
    "(no plugin, no trust_remote_code).",
    "  python export_llama_model.py --run runs/plain\n"
    "  python export_llama_model.py --run runs/plain --checkpoint final --output exports/plain --push-to-hub me/plain",
)
