"""Serving throughput and memory-update latency of a MAC export, in one run:

1. vLLM on the MAC export vs vLLM on a plain Llama student with the same layers (the MAC weights without the
   memory parts, saved as a stock LlamaForCausalLM): output tokens/s on a batch of prompts (target >= 0.8x),
   and again with --long-prompt-tokens prompts (prompt + output tokens/s; MAC attends within 256-token
   segments, Llama over the whole prompt);
2. vLLM vs transformers `generate()` on the same MAC export and prompts, memory frozen on both sides as vLLM
   serves it (target >= 5x): transformers once with the prompts as one batch (possible here because they have
   equal lengths; MAC models refuse left padding) and once one prompt at a time (what `no_vllm_inference.py`
   does, and what prompts of different lengths need);
3. transformers generation latency of one prompt with the `surprise` update rule vs `none` (target <= 1.5x);
4. the memory learning per request in vLLM: vLLM MAC with `surprise` and with `ema` vs `none` (target >= 0.7x
   for surprise), and vLLM vs transformers `generate()` with `surprise` on the same prompts (target >= 5x), as
   one batch and one prompt at a time.

Prompts are real standard-library source cut to exactly --prompt-tokens tokens, so transformers can batch them
without padding; every request generates exactly --max-new-tokens tokens (EOS ignored), greedy. Times are
medians of
--repeats runs after one warm-up; the vLLM engines are started once each (~30 s apiece on CPU, not timed).

    .venv/bin/python export_mac_model.py --run runs/demo            # once: exports/demo-mac
    .venv/bin/python benchmarks/bench_serving.py                      # ~6 minutes on 2 cores
    .venv/bin/python benchmarks/bench_serving.py --model-path exports/demo-mac --prompts 16 --dtype float32
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_serving.py --random-mac-heads 9 --dtype float32 \
        --long-prompt-tokens 0                                    # no export needed (random weights)
"""

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
# vLLM's spawned processes load the plugin from this checkout too, not from an installed copy
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

from titans_distil.flags import add_argument  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_argument(
        parser,
        "--model-path",
        help="a MAC export folder (export_mac_model.py; default exports/demo-mac unless --random-mac-heads)",
    )
    parser.add_argument(
        "--random-mac-heads",
        type=int,
        help="benchmark a random MAC built here instead of an export, with this many memory heads: 6 "
        "layers, D 576, 9 attention heads (3 K/V), memory in layers 1 and 4, segments of 256, memory chunks "
        "of 32, 16 persistent tokens, the embedded teacher's tokenizer (speed only: the weights are random)",
    )
    parser.add_argument("--prompts", type=int, default=16, help="batch of prompts")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    add_argument(parser, "--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--long-prompt-tokens",
        type=int,
        default=1024,
        help="also compare vLLM MAC vs plain Llama with prompts this long (0: skip)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    return parser.parse_args(argv)


def make_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` windows of exactly `length` tokens from the standard library's own sources."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in sorted(stdlib.glob("*.py")):
        ids = tokenizer(name.read_text(encoding="utf-8", errors="replace")).input_ids
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == count:
            return out
    raise SystemExit(f"not enough standard-library files of {length} tokens")


def plain_llama_twin(mac_dir: Path, out: Path) -> Path:
    """The MAC export's Llama weights (no memory, persistent tokens or gates) as a stock LlamaForCausalLM
    folder."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, LlamaConfig

    config = json.loads((mac_dir / "config.json").read_text())
    llama_fields = LlamaConfig().to_dict().keys()
    llama = LlamaConfig(
        **{k: v for k, v in config.items() if k in llama_fields and k not in ("model_type", "architectures")}
    )
    llama.architectures = ["LlamaForCausalLM"]
    llama.save_pretrained(out)
    weights = {}
    for shard in sorted(mac_dir.glob("*.safetensors")):
        weights.update(
            {
                k: v
                for k, v in load_file(shard).items()
                if not any(part in k for part in (".memory.", ".memory_gate", ".persistent_tokens"))
            }
        )
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    AutoTokenizer.from_pretrained(mac_dir, trust_remote_code=True).save_pretrained(out)
    return out


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def vllm_throughput(path: Path, prompts, args, overrides=None) -> float:
    """Output tokens/s of one vLLM engine on `prompts` (token id lists of equal length)."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        str(path),
        trust_remote_code=True,
        dtype=args.dtype,
        enforce_eager=True,
        seed=0,
        max_num_seqs=len(prompts),
        hf_overrides=overrides,
        max_model_len=len(prompts[0]) + args.max_new_tokens,
    )
    params = SamplingParams(temperature=0, max_tokens=args.max_new_tokens, ignore_eos=True)
    batch = [{"prompt_token_ids": ids} for ids in prompts]
    seconds = median_time(lambda: llm.generate(batch, params, use_tqdm=False), args.repeats)
    # free the engine's processes and KV cache before the next one starts
    llm.llm_engine.engine_core.shutdown()
    gc.collect()
    return len(prompts) * args.max_new_tokens / seconds


def main(argv=None):
    args = parse_args(argv)
    if args.random_mac_heads is not None and args.model_path is not None:
        raise SystemExit(
            "--random-mac-heads builds the model to benchmark: give it or --model-path, not both"
        )
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    with tempfile.TemporaryDirectory() as tmp:
        if args.random_mac_heads is not None:
            mac_dir = random_mac(args.random_mac_heads, Path(tmp) / "mac")
        else:
            mac_dir = Path(args.model_path or "exports/demo-mac")
            if not (mac_dir / "config.json").is_file():
                raise SystemExit(
                    f"{mac_dir} is not an export; run: .venv/bin/python export_mac_model.py --run runs/demo"
                )
        run(args, mac_dir, Path(tmp))


def random_mac(memory_heads: int, out: Path) -> Path:
    """The random MAC of --random-mac-heads, saved as export_mac_model.py saves an export."""
    from titans_distil.models.configuration_mac_llama import MACLlamaConfig
    from titans_distil.models.modeling_mac_llama import MACLlamaForCausalLM
    from transformers import AutoTokenizer

    from titans_distil.model_folder import save_with_model_code
    from titans_distil.teacher import embedded_teacher_dir

    config = MACLlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        segment_len=256,
        memory_chunk_size=32,
        memory_layers=[1, 4],
        num_persistent_tokens=16,
        memory_heads=memory_heads,
    )
    torch.manual_seed(0)
    save_with_model_code(MACLlamaForCausalLM(config).eval(), out)
    AutoTokenizer.from_pretrained(embedded_teacher_dir()).save_pretrained(out)
    return out


def run(args, mac_dir: Path, tmp: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(mac_dir, trust_remote_code=True)
    prompts = make_prompts(tokenizer, args.prompts, args.prompt_tokens)
    frozen = {"update_rule": "none"}
    name = mac_dir if args.random_mac_heads is None else f"random MAC, {args.random_mac_heads} memory heads"
    print(
        f"{name}: {args.prompts} prompts x {args.prompt_tokens} tokens, {args.max_new_tokens} new tokens "
        f"each, {args.dtype}, torch threads {torch.get_num_threads()}, median of {args.repeats}",
        flush=True,
    )

    plain_dir = plain_llama_twin(mac_dir, tmp / "plain")
    vllm_mac = vllm_throughput(mac_dir, prompts, args, frozen)
    vllm_learning = {
        rule: vllm_throughput(mac_dir, prompts, args, {"update_rule": rule}) for rule in ("surprise", "ema")
    }
    vllm_plain = vllm_throughput(plain_dir, prompts, args)
    if args.long_prompt_tokens:
        long_prompts = make_prompts(tokenizer, args.prompts, args.long_prompt_tokens)
        long_mac = vllm_throughput(mac_dir, long_prompts, args, frozen)
        long_plain = vllm_throughput(plain_dir, long_prompts, args)

    model = AutoModelForCausalLM.from_pretrained(
        mac_dir, trust_remote_code=True, dtype=getattr(torch, args.dtype)
    ).eval()
    batch = torch.tensor(prompts)

    def hf_generate(ids, rule):
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.max_new_tokens,
                min_new_tokens=args.max_new_tokens,
                do_sample=False,
                update_rule=rule,
                pad_token_id=tokenizer.eos_token_id,
            )

    def hf_throughput(rule: str) -> tuple[float, float]:
        """Output tokens/s of transformers with `rule`: the prompts as one batch, and one at a time."""
        tokens = len(prompts) * args.max_new_tokens
        one_batch = median_time(lambda: hf_generate(batch, rule), args.repeats)
        one_by_one = median_time(
            lambda: [hf_generate(batch[i : i + 1], rule) for i in range(len(prompts))], 1
        )
        return tokens / one_batch, tokens / one_by_one

    hf_mac, hf_one_by_one = hf_throughput("none")
    hf_surprise, hf_surprise_one_by_one = hf_throughput("surprise")
    latency = {
        rule: median_time(lambda rule=rule: hf_generate(batch[:1], rule), args.repeats)
        for rule in ("none", "surprise")
    }

    rows = [
        ("vLLM MAC vs vLLM plain Llama (same layers), output tok/s", vllm_mac, vllm_plain, ">= 0.8x"),
        *(
            [
                (
                    f"the same with {args.long_prompt_tokens}-token prompts, tok/s (prefill + decode)",
                    long_mac * (1 + args.long_prompt_tokens / args.max_new_tokens),
                    long_plain * (1 + args.long_prompt_tokens / args.max_new_tokens),
                    "(info)",
                )
            ]
            if args.long_prompt_tokens
            else []
        ),
        (
            "vLLM MAC vs transformers generate (MAC, one batch of equal-length prompts), output tok/s",
            vllm_mac,
            hf_mac,
            ">= 5x",
        ),
        (
            "vLLM MAC vs transformers generate (MAC, one prompt at a time), output tok/s",
            vllm_mac,
            hf_one_by_one,
            ">= 5x",
        ),
        (
            "transformers latency of 1 prompt, surprise vs none, s",
            latency["surprise"],
            latency["none"],
            "<= 1.5x",
        ),
        (
            "vLLM MAC, memory learning per request (surprise) vs frozen (none), output tok/s",
            vllm_learning["surprise"],
            vllm_mac,
            ">= 0.7x",
        ),
        ("the same with ema vs none, output tok/s", vllm_learning["ema"], vllm_mac, "(info)"),
        (
            "vLLM MAC surprise vs transformers generate surprise (one batch of equal-length prompts), tok/s",
            vllm_learning["surprise"],
            hf_surprise,
            ">= 5x",
        ),
        (
            "vLLM MAC surprise vs transformers generate surprise (one prompt at a time), tok/s",
            vllm_learning["surprise"],
            hf_surprise_one_by_one,
            ">= 5x",
        ),
    ]
    print("| comparison | ours | baseline | ratio | target |\n|---|---|---|---|---|")
    for name, ours, base, target in rows:
        print(f"| {name} | {ours:.3g} | {base:.3g} | {ours / base:.2f}x | {target} |")


if __name__ == "__main__":  # vLLM's engine runs in spawned processes that re-import this module
    main()
