"""The `titans-distil` console script: every root script's command under one group."""

import click

from .cli import distil
from .dataset_build.cli import build_dataset
from .evaluate import evaluate_command
from .export_cli import export_llama, export_mac, push
from .generate import no_vllm_inference
from .inspect_cli import inspect_model
from .package import package
from .plot import plot_command
from .quantize import quantize_command
from .recall import recall_experiment
from .serving import vllm_inference


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """titans-distil: distil Llama teachers into Titans-memory students, export, push, inspect, quantize,
    package, evaluate, generate with and serve them; build training data from git history."""


main.add_command(distil, "distil")
main.add_command(export_mac, "export-mac")
main.add_command(export_llama, "export-llama")
main.add_command(push, "push")
main.add_command(inspect_model, "inspect")
main.add_command(quantize_command, "quantize")
main.add_command(package, "package")
main.add_command(no_vllm_inference, "generate")
main.add_command(vllm_inference, "vllm")
main.add_command(recall_experiment, "recall")
main.add_command(plot_command, "plot")
main.add_command(evaluate_command, "eval")
main.add_command(build_dataset, "data")
