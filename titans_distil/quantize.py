"""bitsandbytes 8-bit (LLM.int8()) and 4-bit (nf4 / fp4) quantization of teachers, plain students and MAC
students.

The linear layers of the Llama blocks (attention q/k/v/o, MLP gate/up/down) are quantized through
transformers' `BitsAndBytesConfig`; everything else keeps the checkpoint's precision: embeddings, norms,
`lm_head` and, in MAC students, the Titans memory modules (`model.layers.{i}.memory.*`, listed in
`llm_int8_skip_modules`), the persistent tokens and the read-out gates. The memory keeps learning at test time
(surprise / ema updates), so its projections stay full precision; its fast-weight math runs in float32 anyway.

The quantized folder reloads with `AutoModelForCausalLM.from_pretrained(folder)` (MAC folders with
`trust_remote_code=True`: the model files are copied next to the weights and config.json keeps its
`auto_map`).

How a run goes (`quantize`): everything cheap is validated first (options, bitsandbytes, the source folder,
the output folder), then the unquantized model is measured, the quantized model is saved into a temporary
folder next to `--output` before it ever runs, reloaded from there and measured, and only then moved into
place.

Saving before running matters on CPUs with AVX512-bf16: bitsandbytes 0.50.2 re-packs 4-bit weights for its CPU
kernel on the first eval forward, and `state_dict()` after that writes the 4-bit block scales transposed (or,
with double quantization, re-quantized): a silently corrupted checkpoint. `save_quantized` refuses such a
model instead of writing it. The same re-packed kernel passes no gradient to its input, so to train the memory
parts of a 4-bit MAC model on such a CPU call `model.train()` before its first forward (train-mode layers are
never re-packed).
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .model_folder import (
    atomic_folder,
    check_config,
    check_output,
    check_tokenizer_fits,
    check_weights,
    first_line,
    kind_of,
    read_config,
    save_with_model_code,
    trust_remote_code_for,
)
from .model_folder import load_model as load_folder

BITS = (8, 4)
# LLM.int8() outlier threshold: activation columns holding a value >= this are multiplied in 16-bit, the rest
# in int8. bitsandbytes' 6.0 comes from the outlier features of >= 6.7B models (LLM.int8() paper); on
# SmolLM2-135M (8 x 512 stdlib validation tokens) it costs +1.76% perplexity, 2.0 costs +0.38%, 1.0 +0.14%:
# same footprint, more CPU time as fewer columns stay int8.
DEFAULT_INT8_THRESHOLD = 2.0
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KIND_NAMES = {"llama": "Llama", "mac": "MAC"}  # the kinds (`model_folder.kind_of`) quantized here
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

# A fixed prompt set for greedy agreement: prose, instructions and Python (the embedded corpus is Python
# source).
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\ndef main():\n",
    "Water boils at a temperature of",
    "class Stack:\n    def __init__(self):\n",
    "The three primary colors are",
    "for i, line in enumerate(lines):\n",
    "Question: What is 12 times 12?\nAnswer:",
)


# ------------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize to: 8-bit LLM.int8(), or 4-bit nf4/fp4 with optional double quantization."""

    bits: int
    quant_type: str | None = None  # 4-bit only
    double_quant: bool = False  # 4-bit only
    compute_dtype: str = "float32"  # 4-bit only
    int8_threshold: float = DEFAULT_INT8_THRESHOLD  # 8-bit only

    @property
    def label(self) -> str:
        if self.bits == 8:
            return (
                "int8"
                if self.int8_threshold == DEFAULT_INT8_THRESHOLD
                else f"int8(t={self.int8_threshold:g})"
            )
        return self.quant_type + ("+dq" if self.double_quant else "")

    def bnb_config(self, skip_modules: list[str]):
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            return BitsAndBytesConfig(
                load_in_8bit=True,
                llm_int8_threshold=float(self.int8_threshold),
                llm_int8_skip_modules=list(skip_modules),
            )
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=COMPUTE_DTYPES[self.compute_dtype],
            llm_int8_skip_modules=list(skip_modules),
        )


def parse_spec(
    bits: int,
    quant_type: str | None = None,
    double_quant: bool = False,
    compute_dtype: str | None = None,
    int8_threshold: float | None = None,
) -> QuantSpec:
    """Check a bits / type combination; UserError names the problem and the fix."""
    if bits not in BITS:
        raise UserError(
            f"--bits {bits} is not supported; pass --bits 8 (LLM.int8()) or --bits 4 (nf4 or fp4)"
        )
    if quant_type is not None and quant_type not in QUANT_TYPES:
        raise UserError(
            f"--quant-type {quant_type} is not supported; pass --quant-type nf4 or --quant-type fp4 (with "
            "--bits 4)"
        )
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise UserError(
            f"--compute-dtype {compute_dtype} is not supported; pass one of {', '.join(COMPUTE_DTYPES)}"
        )
    if bits == 8:
        if quant_type is not None:
            raise UserError(
                f"--bits 8 --quant-type {quant_type} is not a bitsandbytes format: {quant_type} is 4-bit; "
                f"pass --bits 4 --quant-type {quant_type}, or drop --quant-type for 8-bit LLM.int8()"
            )
        if double_quant:
            raise UserError(
                "--double-quant applies to 4-bit only (it quantizes the 4-bit block scales); "
                "pass --bits 4, or drop --double-quant"
            )
        if compute_dtype is not None:
            raise UserError(
                "--compute-dtype applies to 4-bit only (8-bit layers use bitsandbytes' int8 kernels); "
                "pass --bits 4, or drop --compute-dtype"
            )
        if int8_threshold is not None and not int8_threshold > 0:
            raise UserError(
                f"--int8-threshold {int8_threshold:g} must be > 0 (bitsandbytes' default is 6.0, ours "
                f"{DEFAULT_INT8_THRESHOLD:g})"
            )
        return QuantSpec(
            8, int8_threshold=DEFAULT_INT8_THRESHOLD if int8_threshold is None else float(int8_threshold)
        )
    if int8_threshold is not None:
        raise UserError(
            "--int8-threshold applies to 8-bit only (LLM.int8() outlier columns); pass --bits 8, or drop "
            "--int8-threshold"
        )
    return QuantSpec(4, quant_type or "nf4", bool(double_quant), compute_dtype or "float32")


def require_bitsandbytes() -> str:
    """Import bitsandbytes (quietly) and return its version; UserError if it is missing or broken."""
    # bitsandbytes logs a warning on import when the optional `kernels` package is absent, and its 8-bit CPU
    # path warns on every matmul that it casts inputs to float16: neither is actionable here.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast")
    try:
        import bitsandbytes
    except ImportError:
        raise UserError(
            "bitsandbytes is not installed; install it with `pip install 'titans-distil[quant]'` "
            "(or `pip install bitsandbytes`), or run bin/setup"
        ) from None
    except Exception as err:  # a broken install (missing native library, ...)
        first = first_line(err)
        raise UserError(
            f"bitsandbytes is installed but fails to import ({first}); reinstall it with "
            "`pip install --force-reinstall bitsandbytes`"
        ) from None
    return getattr(bitsandbytes, "__version__", "unknown")


# ------------------------------------------------------------------------------------------ source and output


@dataclass
class Source:
    """A model folder to quantize."""

    spec: str  # what the user passed
    path: Path
    config: dict
    kind: str  # "llama" or "mac" (`model_folder.kind_of`)
    remote: (
        bool  # a folder whose own model code may run (`trust_remote_code_for`): loaded with trust_remote_code
    )
    trust_remote_code: bool = False  # the user's --trust-remote-code

    @property
    def is_mac(self) -> bool:
        return self.kind == "mac"

    @property
    def memory_layers(self) -> list[int]:
        if not self.is_mac:
            return []
        layers = self.config.get("memory_layers")
        if layers is None:  # the config's default, resolved the same way the model does
            from .models.configuration_mac_llama import mac_memory_layers

            layers = mac_memory_layers(int(self.config["num_hidden_layers"]))
        return sorted(int(i) for i in layers)


def _describe_quantization(qc: dict) -> str:
    method = qc.get("quant_method", "unknown method")
    if method == "bitsandbytes":
        if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
            return "bitsandbytes 8-bit"
        return f"bitsandbytes {qc.get('bnb_4bit_quant_type', '4-bit')}"
    return str(method)


def inspect_source(model_path: str, trust_remote_code: bool = False) -> Source:
    """Resolve `--model-path` ('embedded', a model folder or a .gguf file) and check that it can be quantized
    (and that its own model code, if any, may run: `trust_remote_code_for`)."""
    from .teacher import EMBEDDED, resolve_teacher

    if model_path == EMBEDDED or model_path.endswith(".gguf"):
        path = Path(
            resolve_teacher(model_path)
        )  # the embedded / GGUF teacher, de-quantised once into the cache
    else:
        path = Path(model_path).expanduser()
        if not path.exists():
            raise UserError(
                f"--model-path {model_path} does not exist; pass a model folder (with config.json), a .gguf "
                "file or 'embedded'"
            )
        if not path.is_dir():
            raise UserError(
                f"--model-path {model_path} is not a folder; pass a model folder (with config.json), a "
                ".gguf file or 'embedded'"
            )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(
            f"--model-path {model_path} has no config.json; pass a Hugging Face model folder (e.g. "
            "runs/NAME/final), a .gguf file or 'embedded'"
        )
    config = read_config(path, "pass an intact model folder")
    qc = config.get("quantization_config")
    if qc:
        raise UserError(
            f"--model-path {model_path} is already quantized ({_describe_quantization(qc)}); "
            "pass the unquantized model folder it was made from"
        )
    kind = kind_of(config)
    if kind not in KIND_NAMES:
        raise UserError(
            f"--model-path {model_path} is a {config.get('model_type')!r} model; quantize.py handles Llama "
            "teachers and students (model_type 'llama') and MAC students (model_type 'mac_llama')"
        )
    check_config(path, config)  # field types in one line
    remote = trust_remote_code_for(path, trust_remote_code, config)
    check_weights(path)  # pickle-only (never unpickled), truncated or missing weights
    return Source(model_path, path, config, kind, remote, trust_remote_code)


def skip_modules(source: Source) -> list[str]:
    """Modules bitsandbytes must leave alone: lm_head and, in MAC students, each layer's neural memory.

    transformers matches an entry `m` against a module name `n` by `re.match(m + "\\.", n)`, `re.match(m, n)`
    or `n.endswith(m)`, so `model.layers.2.memory` covers `model.layers.2.memory.to_keys` etc. The persistent
    tokens and read-out gates are plain parameters, which bitsandbytes never touches."""
    return ["lm_head"] + [f"model.layers.{i}.memory" for i in source.memory_layers]


# ------------------------------------------------------------------------------------- load / quantize / save


def _device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_model(source: Source, quantization_config=None):
    """The source model, unquantized (on the default device) or quantized on load; eval mode, no gradients."""
    kwargs = dict(dtype="auto")
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    # an export with its own code, as a user loads it
    model = load_folder(source.path, source.config, trust_remote_code=source.trust_remote_code, **kwargs)
    if quantization_config is None:
        model.to(_device())
    return model.eval().requires_grad_(False)


def is_bnb_module(module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))


def quantize_model(source: Source, spec: QuantSpec):
    """Load `source` quantized per `spec` (memory modules and lm_head skipped); checks what was converted."""
    require_bitsandbytes()
    model = load_model(source, spec.bnb_config(skip_modules(source)))
    converted = [name for name, module in model.named_modules() if is_bnb_module(module)]
    wrong = [name for name in converted if ".memory." in name or name.startswith("lm_head")]
    if wrong:
        raise RuntimeError(f"bitsandbytes converted modules that must stay full precision: {wrong[:4]}")
    if not converted:
        raise RuntimeError("bitsandbytes converted no layer; nothing would be quantized")
    return model


def _cpu_packed_layers(model) -> list[str]:
    """4-bit layers that bitsandbytes re-packed for its AVX512-bf16 CPU kernel (happens on the first
    forward)."""
    return [
        name
        for name, module in model.named_modules()
        if getattr(
            getattr(getattr(module, "weight", None), "quant_state", None), "packing_format_for_cpu", False
        )
    ]


def save_quantized(model, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """`save_pretrained` a quantized model (and tokenizer); MAC folders get their model files and `auto_map`.

    Refuses a 4-bit model that already ran on an AVX512-bf16 CPU: bitsandbytes 0.50.2 then un-packs its
    weights lossily (block scales written transposed, double-quantized scales re-quantized). Save first, then
    run."""
    packed = _cpu_packed_layers(model)
    if packed:
        raise RuntimeError(
            f"{len(packed)} 4-bit layers (e.g. {packed[0]}) were re-packed for bitsandbytes' CPU kernel by "
            "a forward pass; bitsandbytes 0.50.2 cannot save them intact. Save the model before running it "
            "(or reload it from a saved folder)"
        )
    out = Path(out_dir)
    is_mac = kind_of(model.config) == "mac"
    if is_mac:  # the model files travel with the weights
        save_with_model_code(model, out)
    else:
        model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def load_quantized(folder: str | os.PathLike, trust_remote_code: bool = False, quiet: bool = False):
    """Reload a folder written by `save_quantized` (MAC folders carry their code: see
    `trust_remote_code_for`)."""

    require_bitsandbytes()
    model = load_folder(folder, trust_remote_code=trust_remote_code, quiet=quiet)
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ measurements


def memory_footprint(model) -> int:
    """Bytes held by the model's tensors: parameters and buffers (tied weights once) plus bitsandbytes'
    quantization constants, which live outside them (4-bit block scales `quant_state.absmax`, their own scales
    with double quantization, code books; 8-bit row scales `SCB`). transformers' `get_memory_footprint` counts
    only the former. Measure before the first forward: on AVX512-bf16 CPUs bitsandbytes then converts 4-bit
    scales to bfloat16."""
    seen, total = set(), 0

    def add(tensor) -> None:
        nonlocal total
        if isinstance(tensor, torch.Tensor) and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()

    for tensor in [*model.parameters(), *model.buffers()]:
        add(tensor)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        add(getattr(weight, "SCB", None))
        state = getattr(weight, "quant_state", None)
        while state is not None:  # a 4-bit QuantState, then (double quantization) the state of its scales
            for name in ("absmax", "code", "offset"):
                add(getattr(state, name, None))
            state = getattr(state, "state2", None)
    return total


def weight_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the weight files of a model folder."""
    return sum(
        p.stat().st_size for p in Path(folder).iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES
    )


def _input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) over `blocks` (n, length), one block at a time, float32 loss."""
    device = _input_device(model)
    total, count = 0.0, 0
    for block in blocks:
        ids = block[None].to(device)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return math.exp(total / max(count, 1))


@dataclass
class GreedyReference:
    """The unquantized model's greedy continuations of the prompts and its own (teacher-forced) argmax along
    them."""

    prompt_ids: list[torch.Tensor]
    sequences: list[torch.Tensor]  # prompt + continuation, 1-D
    choices: list[torch.Tensor]  # argmax at each continuation position, teacher-forced


@torch.no_grad()
def _teacher_forced_choices(model, sequence: torch.Tensor, prompt_len: int) -> torch.Tensor:
    logits = model(sequence[None].to(_input_device(model)), use_cache=False).logits[0]
    return logits[prompt_len - 1 : -1].argmax(-1).cpu()


@torch.no_grad()
def greedy_reference(model, tokenizer, prompts=PROMPTS, new_tokens: int = 32) -> GreedyReference:
    """Greedy continuations (one prompt at a time: MAC models take no left padding)."""
    device = _input_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ref = GreedyReference([], [], [])
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids[0]
        out = model.generate(
            ids[None].to(device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
            do_sample=False,
            max_new_tokens=new_tokens,
            pad_token_id=pad,
            temperature=None,
            top_p=None,
            top_k=None,
        )[0].cpu()
        ref.prompt_ids.append(ids)
        ref.sequences.append(out)
        ref.choices.append(_teacher_forced_choices(model, out, len(ids)))
    return ref


def greedy_agreement(model, ref: GreedyReference) -> tuple[int, int, int]:
    """(agreeing positions, positions, identical continuations): `model`'s argmax vs the reference's,
    teacher-forced along the reference's greedy continuations. A prompt agreeing at every position is one
    whose greedy continuation the quantized model reproduces exactly."""
    agree = total = identical = 0
    for ids, seq, choices in zip(ref.prompt_ids, ref.sequences, ref.choices):
        mine = _teacher_forced_choices(model, seq, len(ids))
        same = int((mine == choices).sum())
        agree, total, identical = agree + same, total + len(choices), identical + int(same == len(choices))
    return agree, total, identical


@torch.no_grad()
def memory_rule_check(model, ids: torch.Tensor, new_tokens: int = 4) -> dict[str, float]:
    """Run a MAC model with the surprise and ema rules: tokens written per memory layer by a forward over
    `ids`, after a short greedy generation with the same rule (raises if either fails)."""
    device = _input_device(model)
    ids = ids[None].to(device) if ids.dim() == 1 else ids.to(device)
    written = {}
    for rule in ("surprise", "ema"):
        model.generate(
            ids[:, :8],
            attention_mask=torch.ones_like(ids[:, :8]),
            do_sample=False,
            max_new_tokens=new_tokens,
            update_rule=rule,
            pad_token_id=0,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        stats = model(ids, use_cache=False, update_rule=rule).memory_stats
        written[rule] = float(stats["updated_tokens"]) if stats else 0.0
    return written


@dataclass
class Measurement:
    footprint: int  # bytes of parameters and buffers in memory
    file_bytes: int
    perplexity: float | None
    agreement: tuple[int, int, int] | None  # (agreeing, total, identical prompts)
    dtype: str = ""
    seconds: float = 0.0


@dataclass
class Report:
    source: Source
    spec: QuantSpec
    output: Path
    bnb_version: str
    before: Measurement
    after: Measurement
    kept: list[str] = field(default_factory=list)
    memory_written: dict[str, float] | None = None
    prompts: int = 0
    eval_blocks: int = 0
    eval_length: int = 0


def _dtype_name(model) -> str:
    return str(model.dtype).removeprefix("torch.")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def format_report(r: Report) -> str:
    """The before/after table."""
    b, a = r.before, r.after
    rows = [
        ("", f"before ({b.dtype})", f"after ({r.spec.label})", "change"),
        ("memory footprint", _mb(b.footprint), _mb(a.footprint), f"x{a.footprint / b.footprint:.2f}"),
        ("weight files", _mb(b.file_bytes), _mb(a.file_bytes), f"x{a.file_bytes / b.file_bytes:.2f}"),
    ]
    if b.perplexity is not None:
        rows.append(
            (
                f"validation perplexity ({r.eval_blocks}x{r.eval_length} tokens)",
                f"{b.perplexity:.3f}",
                f"{a.perplexity:.3f}",
                f"{100 * (a.perplexity / b.perplexity - 1):+.2f}%",
            )
        )
    if a.agreement is not None:
        agree, total, identical = a.agreement
        rows.append(
            (
                f"greedy agreement ({r.prompts} prompts)",
                "100%",
                f"{100 * agree / max(total, 1):.1f}%",
                f"{identical}/{r.prompts} continuations identical",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    kind = KIND_NAMES[r.source.kind]
    head = (
        f"quantized {r.source.spec} ({kind}, {r.source.config.get('num_hidden_layers')} layers) to "
        f"{r.spec.label} with bitsandbytes {r.bnb_version} -> {r.output}"
    )
    tail = [f"kept in {b.dtype}: {', '.join(r.kept)}"]
    if r.memory_written is not None:
        tail.append(
            "MAC memory updates on the quantized model: "
            + ", ".join(
                f"{rule} ok ({n:.0f} tokens written per memory layer)" for rule, n in r.memory_written.items()
            )
        )
    return "\n".join([head, *lines, *tail])


def _work_description(blocks, prompts, new_tokens: int) -> str:
    """What measuring one model runs (for the progress log): greedy prompts and perplexity blocks."""
    parts = [f"greedy {len(prompts)} prompts x {new_tokens} tokens"] if prompts else []
    if blocks is not None:
        parts.append(f"perplexity on {len(blocks)} blocks x {blocks.shape[1]} tokens")
    return ", ".join(parts)


def _kept_description(source: Source) -> list[str]:
    kept = [
        "embeddings",
        "norms",
        "lm_head" + (" (tied to the embeddings)" if source.config.get("tie_word_embeddings") else ""),
    ]
    if source.memory_layers:
        layers = ",".join(str(i) for i in source.memory_layers)
        kept.append(
            "memory modules, persistent tokens and read-out gates of "
            f"layer{'s' * (len(source.memory_layers) > 1)} {layers}"
        )
    return kept


def _load_tokenizer(source: Source):
    from transformers import AutoTokenizer

    try:
        # an exported MAC folder's config.json names its own config class (auto_map): without
        # trust_remote_code AutoTokenizer would stop and ask whether to run that code
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=source.remote)
    except (OSError, ValueError, TypeError) as err:
        first = first_line(err)
        raise UserError(
            f"--model-path {source.spec} has no usable tokenizer ({first[:120]}); save the tokenizer into "
            "the folder (students share their teacher's)"
        ) from None
    check_tokenizer_fits(tokenizer, int(source.config["vocab_size"]), f"--model-path {source.spec}")
    return tokenizer


# ------------------------------------------------------------------------------------------ the whole run


def quantize(
    model_path: str,
    output: str,
    spec: QuantSpec,
    *,
    overwrite: bool = False,
    data: str = "stdlib",
    eval_blocks: int = 8,
    eval_length: int = 512,
    new_tokens: int = 32,
    prompts=PROMPTS,
    log=lambda message: None,
    trust_remote_code: bool = False,
) -> Report:
    """Quantize `model_path` into `output` and measure both (see the module docstring for the order of
    steps)."""
    from .data import load_blocks

    bnb_version = require_bitsandbytes()
    source = inspect_source(model_path, trust_remote_code)
    out = check_output(output, overwrite, [source.path])
    max_positions = int(source.config.get("max_position_embeddings") or eval_length)
    if eval_blocks and eval_length > max_positions:
        raise UserError(
            f"--eval-length {eval_length} exceeds the model's {max_positions} positions; pass --eval-length "
            f"{max_positions} or less"
        )
    tokenizer = _load_tokenizer(source)
    blocks = (
        load_blocks(data, tokenizer, eval_length, "validation", max_blocks=eval_blocks)
        if eval_blocks
        else None
    )

    log(f"measuring the unquantized model ({source.path}): loading it ...")
    start = time.perf_counter()
    reference = load_model(source)
    work = _work_description(blocks, prompts, new_tokens)
    if work:
        log(f"  {work} ...")
    ref = greedy_reference(reference, tokenizer, prompts, new_tokens) if prompts else None
    before = Measurement(
        memory_footprint(reference),
        weight_bytes(source.path),
        perplexity(reference, blocks) if blocks is not None else None,
        None,
        _dtype_name(reference),
    )
    before.seconds = time.perf_counter() - start
    del reference

    with atomic_folder(out) as tmp:
        log(f"quantizing to {spec.label} and saving ...")
        quantized = quantize_model(source, spec)
        save_quantized(quantized, tmp, tokenizer)  # before any forward: see save_quantized
        del quantized
        log("measuring the quantized model (reloaded from its folder)")
        start = time.perf_counter()
        # the model code written with the weights is the source's, which was allowed to run above
        model = load_quantized(tmp, source.trust_remote_code, quiet=True)
        if work:
            log(f"  {work} ...")
        after = Measurement(
            memory_footprint(model),
            weight_bytes(tmp),
            perplexity(model, blocks) if blocks is not None else None,
            greedy_agreement(model, ref) if ref is not None else None,
            spec.label,
        )
        written = None
        if source.is_mac and source.memory_layers:
            probe = (
                blocks[0]
                if blocks is not None
                else tokenizer(" ".join(PROMPTS), return_tensors="pt").input_ids[0]
            )
            written = memory_rule_check(model, probe)
        after.seconds = time.perf_counter() - start
        del model
    return Report(
        source,
        spec,
        out,
        bnb_version,
        before,
        after,
        _kept_description(source),
        written,
        len(prompts),
        len(blocks) if blocks is not None else 0,
        eval_length,
    )


# ------------------------------------------------------------------------------------------ command line


def _command():
    import click

    from .cli import FINITE, POSITIVE, _quiet_libraries, trust_remote_code_option, user_errors
    from .flags import option

    @click.command(
        name="quantize.py", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}
    )
    @option(
        "--model-path",
        "model_path",
        required=True,
        help="Model to quantize: 'embedded' (the embedded teacher), a Llama teacher/student folder, an "
        "exported MAC student folder (or runs/NAME/final of a MAC run), or a .gguf file.",
    )
    @click.option("--bits", type=int, required=True, help="8 (LLM.int8()) or 4 (nf4/fp4).")
    @click.option(
        "--quant-type", default=None, help="4-bit data type: nf4 or fp4. [default: nf4 with --bits 4]"
    )
    @click.option(
        "--double-quant",
        is_flag=True,
        help="4-bit: also quantize the block scales (saves ~0.4 bit per weight).",
    )
    @click.option(
        "--compute-dtype",
        default=None,
        help="4-bit: compute dtype of the quantized layers: float32, bfloat16 or float16. [default: float32] "
        "(bitsandbytes' AVX512-bf16 CPU kernel computes in bfloat16 whatever this says.)",
    )
    @click.option(
        "--int8-threshold",
        type=FINITE,
        default=None,
        help=f"8-bit: LLM.int8() outlier threshold; activation columns with a value >= it stay 16-bit. "
        f"Lower is more accurate and slower. [default: {DEFAULT_INT8_THRESHOLD:g}; bitsandbytes' own: 6.0]",
    )
    @click.option(
        "--output", type=click.Path(), required=True, help="Folder for the quantized model (created)."
    )
    @click.option("--overwrite", is_flag=True, help="Replace a non-empty --output folder.")
    @click.option(
        "--data",
        default="stdlib",
        show_default=True,
        help="Corpus for the validation perplexity (any distil.py --data value; stdlib is the embedded "
        "corpus).",
    )
    @click.option(
        "--eval-blocks",
        type=click.IntRange(min=0),
        default=8,
        show_default=True,
        help="Validation blocks for the perplexity (0 skips it).",
    )
    @click.option(
        "--eval-length", type=POSITIVE, default=512, show_default=True, help="Tokens per validation block."
    )
    @option(
        "--max-new-tokens",
        "new_tokens",
        type=POSITIVE,
        default=32,
        show_default=True,
        help="Greedy tokens per prompt for the agreement check (8 fixed prompts).",
    )
    @trust_remote_code_option
    @user_errors
    def command(
        model_path,
        bits,
        quant_type,
        double_quant,
        compute_dtype,
        int8_threshold,
        output,
        overwrite,
        data,
        eval_blocks,
        eval_length,
        new_tokens,
        trust_remote_code,
    ):
        """Quantize a teacher, a plain student or a MAC student with bitsandbytes (8-bit or 4-bit).

        The linear layers of the Llama blocks are quantized; embeddings, norms, lm_head and the Titans memory
        modules, persistent tokens and gates keep their training precision (test-time memory updates need
        them). Prints memory footprint, weight-file size, validation perplexity and greedy agreement before
        and after. The output folder reloads with AutoModelForCausalLM.from_pretrained (trust_remote_code=True
        for MAC).

        vLLM: the CPU build pinned here does not load bitsandbytes weights, and the MAC vLLM model takes
        unquantized weights; vllm_inference.py refuses such folders. Load them with transformers
        (no_vllm_inference.py).

        \b
        Examples:
          python quantize.py --model-path embedded --bits 4 --output quantized/smol-nf4
          python quantize.py --model-path runs/demo/final --bits 8 --output quantized/demo-int8
          python quantize.py --model-path exported/mac --bits 4 --quant-type fp4 --double-quant --output
          q/mac-fp4
        """
        _quiet_libraries()
        spec = parse_spec(bits, quant_type, double_quant, compute_dtype, int8_threshold)
        report = quantize(
            model_path,
            output,
            spec,
            overwrite=overwrite,
            data=data,
            eval_blocks=eval_blocks,
            eval_length=eval_length,
            new_tokens=new_tokens,
            log=lambda m: click.echo(m, err=True),
            trust_remote_code=trust_remote_code,
        )
        click.echo(format_report(report))

    return command


quantize_command = _command()
