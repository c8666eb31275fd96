"""bitsandbytes quantization of the embedded teacher and a MAC student: footprint, perplexity, greedy
agreement.

For each model (the embedded teacher SmolLM2-135M-Instruct; the MAC student `--mac-path`, which must exist
when given; without it `runs/demo/final` if it exists, else a fresh one built with `build_student(teacher, [0,
6, 12, 17, 23, 29], {"segment_len": 256})`) and each quantization (default: int8 at our outlier threshold and
at bitsandbytes' own 6.0, nf4, nf4 with double quantization, fp4), the model is quantized exactly as
`quantize.py` does it (memory modules and lm_head skipped), saved before it runs, reloaded from the folder and
measured against the unquantized model:

- memory footprint (parameters, buffers and bitsandbytes' quantization constants: `quantize.memory_footprint`)
and
  its ratio to float32 (target nf4 <= 0.40);
- weight-file size;
- validation perplexity on the embedded corpus (stdlib, validation split) and its change (targets: nf4 <= +5%,
  8-bit <= +1%);
- greedy agreement: the quantized model's argmax vs the float32 model's along the float32 model's greedy
  continuations of 8 fixed prompts (teacher-forced), and how many continuations are reproduced exactly;
- MAC: tokens written per memory layer by a surprise and an ema forward on the quantized model.

Footprints, sizes and perplexities do not depend on machine load; the seconds column does (2 shared cores).

    .venv/bin/python benchmarks/bench_quantize.py                    # both models, ~10-15 minutes on 2 cores
    .venv/bin/python benchmarks/bench_quantize.py --models teacher --quants int8,nf4 --eval-blocks 4
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from titans_distil.cli import _quiet_libraries  # noqa: E402
from titans_distil.data import load_blocks  # noqa: E402
from titans_distil.flags import add_argument  # noqa: E402
from titans_distil.quantize import (  # noqa: E402
    DEFAULT_INT8_THRESHOLD,
    PROMPTS,
    greedy_agreement,
    greedy_reference,
    inspect_source,
    load_model,
    load_quantized,
    memory_footprint,
    memory_rule_check,
    parse_spec,
    perplexity,
    quantize_model,
    require_bitsandbytes,
    save_quantized,
    weight_bytes,
)

QUANTS = {
    "int8": dict(bits=8),
    "int8-t6": dict(bits=8, int8_threshold=6.0),
    "nf4": dict(bits=4, quant_type="nf4"),
    "nf4-dq": dict(bits=4, quant_type="nf4", double_quant=True),
    "fp4": dict(bits=4, quant_type="fp4"),
}
STUDENT_LAYERS = [0, 6, 12, 17, 23, 29]
DEFAULT_MAC = ROOT / "runs" / "demo" / "final"
TARGETS = {8: (None, 1.0), 4: (0.40, 5.0)}  # bits -> (footprint ratio to fp32, perplexity change in %)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--models", default="teacher,mac", help="comma list of teacher, mac")
    p.add_argument(
        "--quants", default="int8,int8-t6,nf4,nf4-dq,fp4", help=f"comma list of {', '.join(QUANTS)}"
    )
    p.add_argument(
        "--mac-path",
        default=None,
        help=f"MAC student folder (must exist) [default: {DEFAULT_MAC.relative_to(ROOT)} if it exists, "
        "else a fresh student built from the teacher]",
    )
    p.add_argument("--eval-blocks", type=int, default=8)
    p.add_argument("--eval-length", type=int, default=512)
    add_argument(p, "--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return p.parse_args()


def _is_mac_folder(path: Path) -> bool:
    config = path / "config.json"
    try:
        return (
            config.is_file()
            and json.loads(config.read_text(encoding="utf-8")).get("model_type") == "mac_llama"
        )
    except (OSError, ValueError, AttributeError):
        return False


def check_mac_path(args) -> Path | None:
    """The MAC student folder to quantize, checked before any work: a --mac-path given must be a MAC folder
    (one line and exit 1 otherwise, never a silent fallback to an untrained student); without it
    runs/demo/final if it is one, else None (a fresh student is built)."""
    if args.mac_path is None:
        return DEFAULT_MAC if _is_mac_folder(DEFAULT_MAC) else None
    path = Path(args.mac_path).expanduser()
    fix = (
        "pass a MAC student folder (runs/<name>/final or an export_mac_model.py folder), "
        "or leave --mac-path out"
    )
    if not path.exists():
        sys.exit(f"error: --mac-path {args.mac_path} does not exist; {fix}")
    if not _is_mac_folder(path):
        sys.exit(
            f"error: --mac-path {args.mac_path} is not a MAC student folder (no mac_llama config.json); {fix}"
        )
    return path


def mac_student_dir(args, work: Path) -> tuple[str, str]:
    """(folder, description) of the MAC student to quantize."""
    path = check_mac_path(args)
    if path is not None:
        return str(path), f"MAC student {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
    from titans_distil.student import build_student
    from titans_distil.teacher import load_teacher

    teacher, tokenizer = load_teacher("embedded")
    student = build_student(teacher, STUDENT_LAYERS, {"segment_len": 256})
    out = work / "mac-student"
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del teacher, student
    return str(out), f"fresh MAC student (teacher layers {STUDENT_LAYERS}, untrained memory)"


def fp32_bytes(model) -> int:
    return sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()])


def main() -> None:
    args = parse_args()
    if "mac" in [m.strip() for m in args.models.split(",")]:
        check_mac_path(args)  # a --mac-path that is not a MAC folder: one line before any model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    _quiet_libraries()
    bnb_version = require_bitsandbytes()
    quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    unknown = [q for q in quants if q not in QUANTS]
    if unknown:
        sys.exit(f"unknown --quants {unknown}; pick from {', '.join(QUANTS)}")
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        work = Path(tmp)
        models = []
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            if name == "teacher":
                models.append(("embedded", "embedded teacher SmolLM2-135M-Instruct"))
            elif name == "mac":
                models.append(mac_student_dir(args, work))
            else:
                sys.exit(f"unknown model {name!r}; use teacher and/or mac")
        for model_path, description in models:
            source = inspect_source(model_path)
            t0 = time.perf_counter()
            reference = load_model(source)
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=source.remote)
            blocks = load_blocks(
                "stdlib", tokenizer, args.eval_length, "validation", max_blocks=args.eval_blocks
            )
            ref = greedy_reference(reference, tokenizer, PROMPTS, args.max_new_tokens)
            base_ppl = perplexity(reference, blocks)
            base_fp, base_fp32 = memory_footprint(reference), fp32_bytes(reference)
            base_files = weight_bytes(source.path)
            dtype = str(reference.dtype).removeprefix("torch.")
            rows.append(
                (
                    description,
                    dtype,
                    f"{base_fp / 1e6:.1f}",
                    f"{base_fp / base_fp32:.2f}",
                    f"{base_files / 1e6:.1f}",
                    f"{base_ppl:.3f}",
                    "",
                    "100%",
                    f"{len(PROMPTS)}/{len(PROMPTS)}",
                    "",
                    f"{time.perf_counter() - t0:.0f}",
                    "",
                )
            )
            print(
                f"{description}: {dtype}, {base_fp / 1e6:.1f} MB, ppl {base_ppl:.3f} "
                f"({len(blocks)}x{args.eval_length} tokens)",
                flush=True,
            )
            del reference
            gc.collect()
            for quant in quants:
                spec = parse_spec(**QUANTS[quant])
                out = work / f"{Path(model_path).name}-{quant}"
                t0 = time.perf_counter()
                save_quantized(quantize_model(source, spec), out, tokenizer)
                gc.collect()
                model = load_quantized(out)
                footprint = memory_footprint(model)  # before the first forward (see memory_footprint)
                ppl = perplexity(model, blocks)
                agree, total, identical = greedy_agreement(model, ref)
                memory = ""
                if source.is_mac and source.memory_layers:
                    written = memory_rule_check(model, blocks[0])
                    memory = " ".join(f"{rule}:{n:.0f}" for rule, n in written.items())
                seconds = time.perf_counter() - t0
                ratio, change = footprint / base_fp32, 100 * (ppl / base_ppl - 1)
                max_ratio, max_change = TARGETS[spec.bits]
                targets = [f"ppl <= +{max_change:g}%: {'met' if change <= max_change else 'MISSED'}"]
                if max_ratio is not None:
                    targets.insert(
                        0, f"x fp32 <= {max_ratio:.2f}: {'met' if ratio <= max_ratio else 'MISSED'}"
                    )
                rows.append(
                    (
                        "",
                        spec.label,
                        f"{footprint / 1e6:.1f}",
                        f"{ratio:.2f}",
                        f"{weight_bytes(out) / 1e6:.1f}",
                        f"{ppl:.3f}",
                        f"{change:+.2f}%",
                        f"{100 * agree / total:.1f}%",
                        f"{identical}/{len(PROMPTS)}",
                        memory,
                        f"{seconds:.0f}",
                        "; ".join(targets),
                    )
                )
                print(
                    f"  {spec.label}: {footprint / 1e6:.1f} MB (x{ratio:.2f} of fp32), ppl {ppl:.3f} "
                    f"({change:+.2f}%), agreement {100 * agree / total:.1f}% ({identical}/{len(PROMPTS)} "
                    f"identical) {memory}",
                    flush=True,
                )
                del model
                gc.collect()
            notes.append(f"{description}: {source.path}")

    header = (
        "model",
        "weights",
        "footprint MB",
        "x fp32",
        "files MB",
        "val ppl",
        "ppl change",
        "greedy agree",
        "identical",
        "MAC memory tokens written",
        "s",
        "targets",
    )
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    print()
    print(
        f"bitsandbytes {bnb_version}, torch {torch.__version__}; ppl on "
        f"{args.eval_blocks}x{args.eval_length} stdlib validation tokens; greedy agreement over "
        f"{len(PROMPTS)} prompts x {args.max_new_tokens} tokens; int8 = LLM.int8() with outlier "
        f"threshold {DEFAULT_INT8_THRESHOLD:g}, int8(t=6) = bitsandbytes' default"
    )
    for r in table:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if r is header:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
