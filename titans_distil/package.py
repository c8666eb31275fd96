"""Package any Llama with an inference-time memory: `package_model.py` / `package_llama_with_memory()`.

The result is a `trust_remote_code` folder that plain transformers loads with no titans-distil installed:

    config.json                     MemoryLlamaConfig (model_type "memory_llama", auto_map for AutoConfig and
                                    AutoModelForCausalLM, the memory settings and the model fingerprint)
    configuration_memory_llama.py   the remote code (copied from `models/`, torch + transformers + stdlib
    only) modeling_memory_llama.py
    neural_memory.py
    memory_file.py                  memory files (save_memory / load_memory), shared with MAC exports
    model.safetensors               the wrapped Llama's weights (unchanged) + the memory's fixed parameters
    generation_config.json, tokenizer files, chat template, README.md (model card)

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    model.generate(**inputs, max_new_tokens=50, use_memory=True, update_rule="ema")
    model.save_memory("memory.safetensors"); model.load_memory("memory.safetensors"); model.reset_memory()

Design choices (details in `models/modeling_memory_llama.py`):
- The wrapped weights are copied unchanged and keep Llama's parameter names; with the memory off or empty the
  packaged model computes exactly the Llama's logits.
- Nothing is trained: the memory stores keys/values of the model's own layers (the "ema" and "surprise" slot
  policies) and a Titans neural memory with fixed, identity-like projections ("surprise").
- The fingerprint stored in config.json (a sha256 of the weights' names, shapes and a fixed sample of values,
  taken at packaging time) identifies the wrapped model whatever dtype it is later loaded in; memory files
  carry it, and `load_memory` refuses files written by another model.
- The folder is written to a temporary sibling and renamed into place, so a failed run leaves nothing
half-written;
  an existing non-empty folder is replaced only with `overwrite=True`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click
import torch

from .cli import NON_NEGATIVE, POSITIVE, _quiet_libraries, user_errors
from .errors import UserError
from .flags import option
from .model_folder import (
    MODELS_DIR,
    SHIPPED_FILES,
    atomic_folder,
    check_config,
    check_output,
    check_weights,
    config_errors,
)
from .models.neural_memory import UPDATE_RULES

AUTO_MAP = {
    "AutoConfig": "configuration_memory_llama.MemoryLlamaConfig",
    "AutoModelForCausalLM": "modeling_memory_llama.MemoryLlamaForCausalLM",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# config.json keys of the wrapped model that must not be carried into the wrapper's config
_DROP_KEYS = (
    "model_type",
    "architectures",
    "auto_map",
    "quantization_config",
    "_name_or_path",
    "_model_name_or_path",
    "transformers_version",
)


def _as_model_error(err: UserError) -> UserError:
    """`teacher.py` speaks of the teacher; here the wrapped model is meant."""
    message = str(err)
    if message.startswith("teacher "):
        message = "model " + message[len("teacher ") :]
    return UserError(message)


def _load_base(spec: str, dtype: str):
    """(model, tokenizer, config) of the Llama to wrap; one-line UserErrors for missing or non-Llama
    models."""
    from transformers import AutoConfig

    from .teacher import SUPPORTED_MODEL_TYPES, load_teacher, resolve_teacher

    try:
        source = resolve_teacher(spec)
    except UserError as err:
        raise _as_model_error(err) from None
    if Path(source).is_dir():  # a local folder: wrong field types in one line
        check_config(source)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, *config_errors()) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"cannot load model {spec!r} ({first}); check the name, your network or HF_TOKEN, or pass a "
            "local folder"
        ) from None
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"model {spec} is a {getattr(config, 'model_type', 'unknown')!r} model; package_model.py wraps "
            f"Llama-family causal LMs (model_type {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if Path(source).is_dir():  # pickle-only (never unpickled) or truncated weights in one line
        check_weights(source)
    if dtype == "auto":
        torch_dtype = getattr(config, "dtype", None) or torch.float32
        if isinstance(torch_dtype, str):
            torch_dtype = DTYPES.get(torch_dtype, torch.float32)
    else:
        torch_dtype = DTYPES[dtype]
    try:
        model, tokenizer = load_teacher(spec, dtype=torch_dtype)
    except UserError as err:
        raise _as_model_error(err) from None
    return model, tokenizer, config


def parse_memory_layers(text: str | None, num_layers: int) -> list[int] | None:
    """'all' / None -> None (the default: every layer); 'none' -> []; '10,12,14' -> [10, 12, 14] (checked)."""
    if text is None or text.strip().lower() == "all":
        return None
    if text.strip().lower() == "none":
        return []
    try:
        layers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UserError(
            f"--memory-layers {text!r} is not a comma-separated list of layer indices (e.g. 10,12,14), "
            "'all' or 'none'"
        ) from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise UserError(
            f"--memory-layers {text} holds {bad}, outside 0..{num_layers - 1}; the model has {num_layers} "
            "layers"
        )
    return layers


def wrap_llama(model, memory_options: dict, base_name: str):
    """A `MemoryLlamaForCausalLM` sharing `model`'s weight tensors (no copy), with the memory's fixed
    parameters and the weights' fingerprint in its config."""
    from .models.configuration_memory_llama import MemoryLlamaConfig
    from .models.modeling_memory_llama import (
        MemoryLlamaForCausalLM,
        fixed_neural_parameters,
        weights_fingerprint,
    )

    values = {k: v for k, v in model.config.to_dict().items() if k not in _DROP_KEYS}
    try:
        config = MemoryLlamaConfig(**values, **memory_options, memory_base_model=base_name)
    except ValueError as err:
        raise UserError(str(err).splitlines()[0]) from None
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["MemoryLlamaForCausalLM"]
    with torch.device("meta"):  # no allocation, no random initialisation: every tensor is replaced below
        wrapped = MemoryLlamaForCausalLM(config)
    missing, unexpected = wrapped.load_state_dict(model.state_dict(), strict=False, assign=True)
    if unexpected:
        raise UserError(
            f"model {base_name} has weights a Llama does not have ({', '.join(unexpected[:3])}); it cannot "
            "be wrapped"
        )
    wrapped.model.rotary_emb = model.model.rotary_emb  # non-persistent RoPE tables: take the loaded model's
    device = next(model.parameters()).device
    for memory in wrapped.memory_modules().values():
        memory.neural.to_empty(device=device)
        with torch.no_grad():
            for name, param in memory.neural.named_parameters():
                param.copy_(fixed_neural_parameters(memory.neural)[name].to(param.dtype))
    left = [n for n, t in list(wrapped.named_parameters()) + list(wrapped.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"internal error: parameters left uninitialised while wrapping: {left[:5]}")
    wrapped.tie_weights()
    wrapped.generation_config = model.generation_config
    wrapped.config.memory_fingerprint = weights_fingerprint(wrapped)
    return wrapped.eval()


MODEL_CARD = """---
library_name: transformers
tags: [llama, titans, inference-memory, custom_code]
---

# {name} with inference memory

{base} (a `LlamaForCausalLM`, weights unchanged) wrapped by titans-distil's `package_model.py`
in `MemoryLlamaForCausalLM`: at {layers} its attention also reads a memory of key/value
slots (and, with the `surprise` rule, a Titans neural memory) that persists across `generate()` calls until
`reset_memory()`. With the memory off or empty the logits are exactly the base model's.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{folder}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{folder}", trust_remote_code=True)  # reads config.json
inputs = tokenizer("Velmora's capital is Tarsk.", return_tensors="pt")
model.generate(**inputs, max_new_tokens=50, use_memory=True, update_rule="ema")   # read + write the memory
model.save_memory("memory.safetensors")                   # later, in another process:
model.load_memory("memory.safetensors")                   # refused if written by another model
model.generate(**tokenizer("The capital of Velmora is", return_tensors="pt"), max_new_tokens=5)
model.reset_memory()
```

- `update_rule`: `ema` (default: the last {recent} tokens verbatim, older ones kept verbatim in {pool} more
  slots, then merged into the most similar slot), `surprise` (the same slots, but tokens the neural memory
  finds surprising replace the least surprising; the neural memory is trained on every token and read by every
  query), `none` (read only). `use_memory=False`: the plain base model.
- Memory files are safetensors with the model fingerprint `{fingerprint}`.
- Nothing here was trained: the memory works with the base model's own keys and values. What was measured (on
  SmolLM2-135M-Instruct): a text that fits the slots is recalled about as well as if it were still in
  context; beyond the slots the memory is lossy (recent tokens exact, older ones merged); the neural memory's
  read-out has no measurable benefit with its fixed projections. Details in `modeling_memory_llama.py`.
"""


def package_llama_with_memory(
    model_spec: str,
    output,
    *,
    memory_layers: str | list[int] | None = None,
    memory_slots: int = 512,
    recent_slots: int | None = None,
    update_rule: str = "ema",
    dtype: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Write the trust_remote_code folder for `model_spec` (Hub id, folder, .gguf or 'embedded'); returns
    it."""
    output = Path(output).expanduser()
    check_output(output, overwrite)
    if dtype not in ("auto", *DTYPES):
        raise UserError(f"--dtype {dtype} is not one of auto, {', '.join(DTYPES)}")
    model, tokenizer, config = _load_base(model_spec, dtype)
    if isinstance(memory_layers, str) or memory_layers is None:
        memory_layers = parse_memory_layers(memory_layers, config.num_hidden_layers)
    options = {
        "memory_layers": memory_layers,
        "memory_slots": memory_slots,
        "memory_recent_slots": recent_slots,
        "update_rule": update_rule,
    }
    wrapped = wrap_llama(model, options, model_spec)

    with atomic_folder(output) as tmp:
        wrapped.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name in SHIPPED_FILES["memory"]:
            shutil.copy2(MODELS_DIR / name, tmp / name)
        cfg = wrapped.config
        recent = cfg.memory_slots // 2 if cfg.memory_recent_slots is None else cfg.memory_recent_slots
        layers = cfg.memory_layers
        (tmp / "README.md").write_text(
            MODEL_CARD.format(
                name=Path(str(model_spec)).name if model_spec != "embedded" else "SmolLM2-135M-Instruct",
                base=model_spec
                if model_spec != "embedded"
                else "SmolLM2-135M-Instruct (titans-distil's embedded teacher)",
                folder=output.name,
                recent=recent,
                pool=cfg.memory_slots - recent,
                fingerprint=cfg.memory_fingerprint[:16],
                layers="every layer" if layers == list(range(cfg.num_hidden_layers)) else f"layers {layers}",
            )
        )
    return output


@click.command(
    name="package_model.py",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@option(
    "--model-path",
    "model_spec",
    default="embedded",
    show_default=True,
    help="The Llama to wrap: 'embedded' (SmolLM2-135M-Instruct), a Hub id, a local HF folder or a .gguf "
    "file.",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False),
    required=True,
    help="Folder for the trust_remote_code model.",
)
@click.option(
    "--memory-layers",
    default=None,
    help="Layers whose attention reads the memory: 'all', 'none' or a list like 10,12,14. [default: all]",
)
@click.option(
    "--memory-slots",
    type=POSITIVE,
    default=512,
    show_default=True,
    help="Key/value slots per memory layer and KV head.",
)
@click.option(
    "--recent-slots",
    type=NON_NEGATIVE,
    default=None,
    help="Of these, slots holding the most recent tokens verbatim. [default: half]",
)
@click.option(
    "--update-rule",
    type=click.Choice(UPDATE_RULES),
    default="ema",
    show_default=True,
    help="Default memory update at inference (generate() can override it per call).",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", *DTYPES]),
    default="auto",
    show_default=True,
    help="Weight dtype of the package (auto: the model's).",
)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --output folder.")
@user_errors
def package(model_spec, output, memory_layers, memory_slots, recent_slots, update_rule, dtype, overwrite):
    """Wrap any Llama in an inference-time memory and write a trust_remote_code folder.

    \b
    Examples:
      python package_model.py --output packaged/smol-memory
      python package_model.py --model-path HuggingFaceTB/SmolLM2-360M-Instruct --output packaged/smol360
      --update-rule surprise python package_model.py --model-path model.Q8_0.gguf --output packaged/q8
      --memory-layers 8,12,16 --memory-slots 1024
    """
    _quiet_libraries()
    if recent_slots is not None and recent_slots > memory_slots:
        raise UserError(f"--recent-slots {recent_slots} exceeds --memory-slots {memory_slots}")
    out = package_llama_with_memory(
        model_spec,
        output,
        memory_layers=memory_layers,
        memory_slots=memory_slots,
        recent_slots=recent_slots,
        update_rule=update_rule,
        dtype=dtype,
        overwrite=overwrite,
    )
    click.echo(
        f"packaged {model_spec} with inference memory (update rule {update_rule}, {memory_slots} slots) "
        f"in {out}"
    )
