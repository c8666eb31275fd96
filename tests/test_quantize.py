"""quantize.py: bitsandbytes 8-bit and nf4 round trips on a tiny Llama and tiny MAC students (memory modules
stay float32 and are no bnb layers; the saved folder reloads with the logits of the in-memory quantized model;
surprise and ema updates run on the quantized MAC model), the CLI table, and each bad input with its exact
message."""

import json
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from titans_distil.models.configuration_mac_llama import MACLlamaConfig
from titans_distil.models.modeling_mac_llama import MACLlamaForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from titans_distil.model_folder import SHIPPED_FILES, save_with_model_code
from titans_distil.quantize import (
    DEFAULT_INT8_THRESHOLD,
    _cpu_packed_layers,
    inspect_source,
    load_quantized,
    memory_footprint,
    parse_spec,
    quantize_command,
    quantize_model,
    save_quantized,
    weight_bytes,
)

bnb = pytest.importorskip("bitsandbytes")

LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
# hidden 64 / 4 heads / 2 KV heads: every linear has >= 32 outputs (bitsandbytes' CPU 4-bit kernel packs by 32
# rows)
BASE = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
SEG, CHUNK = 32, 8
MEMORY_LAYERS = [1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(embedded_dir):
    return AutoTokenizer.from_pretrained(embedded_dir)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**BASE, num_hidden_layers=2)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_mac():
    torch.manual_seed(0)
    model = MACLlamaForCausalLM(
        MACLlamaConfig(
            **BASE,
            num_hidden_layers=3,
            segment_len=SEG,
            memory_chunk_size=CHUNK,
            num_persistent_tokens=4,
            memory_layers=MEMORY_LAYERS,
        )
    ).eval()
    with torch.no_grad():  # open the read-out gates so the memory path shows in the logits
        for layer in model.model.layers:
            if layer.memory_gate is not None:
                layer.memory_gate.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def mac_dir(tmp_path_factory, tokenizer):
    """An exported MAC student: model files next to the weights, auto_map in config.json."""
    out = tmp_path_factory.mktemp("tiny-mac-export")
    model = tiny_mac()
    save_with_model_code(model, out)
    tokenizer.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["auto_map"]
    return out


@pytest.fixture(scope="module")
def mac_final_dir(tmp_path_factory, tokenizer):
    """A MAC run's final/ folder: weights and config only (no model files, no auto_map)."""
    out = tmp_path_factory.mktemp("tiny-mac-final")
    tiny_mac().save_pretrained(out)
    tokenizer.save_pretrained(out)
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real Python source as one .txt file (documents split on blank lines: hundreds of them)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("quant-corpus") / "code.txt"
    out.write_text(
        "\n\n".join(
            (stdlib / f"{name}.py").read_text() for name in ("textwrap", "shlex", "fnmatch", "calendar")
        )
    )
    return out


@pytest.fixture(scope="module")
def dirs(llama_dir, mac_dir, mac_final_dir):
    return {"llama": llama_dir, "mac": mac_dir, "mac-final": mac_final_dir}


def ids(length=2 * SEG + 5, seed=1):
    return torch.randint(3, 1000, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x, **kwargs):
    return model(x, use_cache=False, **kwargs).logits


def memory_modules(model):
    return {name: module for name, module in model.named_modules() if name.endswith(".memory")}


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize(
    "kind, bits, quant_type",
    [
        ("llama", 8, None),
        ("llama", 4, "nf4"),
        ("mac", 8, None),
        ("mac", 4, "nf4"),
        ("mac-final", 4, "fp4"),
    ],
)
def test_round_trip(dirs, tokenizer, tmp_path, kind, bits, quant_type):
    source = inspect_source(str(dirs[kind]))
    spec = parse_spec(bits, quant_type)
    original = load_quantized(dirs[kind]) if kind == "mac" else None  # the exported model, unquantized
    model = quantize_model(source, spec)

    # the Llama block linears are bnb layers of the asked kind; lm_head is not
    bnb_class = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    modules = dict(model.named_modules())
    for i in range(model.config.num_hidden_layers):
        for name in LLAMA_LINEARS:
            layer = modules[f"model.layers.{i}.{name}"]
            assert isinstance(layer, bnb_class), (i, name, type(layer))
            if bits == 4:
                assert layer.weight.quant_state.quant_type == quant_type
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32

    # memory modules, persistent tokens and gates: float32, plain torch modules, values untouched
    memories = memory_modules(model)
    assert sorted(memories) == (
        [f"model.layers.{i}.memory" for i in MEMORY_LAYERS] if kind != "llama" else []
    )
    for name, memory in memories.items():
        for sub_name, sub in memory.named_modules():
            assert not isinstance(sub, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)), f"{name}.{sub_name}"
            if isinstance(sub, torch.nn.Linear):
                assert type(sub) is torch.nn.Linear
        assert all(p.dtype == torch.float32 for p in memory.parameters())
        layer = modules[name.removesuffix(".memory")]
        assert layer.persistent_tokens.dtype == layer.memory_gate.dtype == torch.float32
    if original is not None:
        reference = original.state_dict()
        kept = {
            k: v
            for k, v in model.state_dict().items()
            if ".memory." in k or k.endswith(("persistent_tokens", "memory_gate"))
        }
        assert kept and all(torch.equal(v, reference[k]) for k, v in kept.items())

    # saved (before the first forward, see save_quantized) -> reloaded: the logits of the in-memory model
    out = save_quantized(model, tmp_path / "q", tokenizer)
    x = ids()
    before = logits(model, x)
    reloaded = load_quantized(out)
    # the footprint counts bitsandbytes' scales too: it matches the weight file (which adds a JSON header)
    assert 0 < weight_bytes(out) - memory_footprint(reloaded) < 0.01 * weight_bytes(out)
    torch.testing.assert_close(logits(reloaded, x), before, rtol=0, atol=0)
    assert isinstance(dict(reloaded.named_modules())["model.layers.0.mlp.down_proj"], bnb_class)
    assert all(p.dtype == torch.float32 for m in memory_modules(reloaded).values() for p in m.parameters())
    assert torch.isfinite(before).all()

    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_8bit"] == (bits == 8)
    assert qc["llm_int8_skip_modules"] == ["lm_head"] + [
        f"model.layers.{i}.memory" for i in MEMORY_LAYERS if kind != "llama"
    ]
    assert (out / "tokenizer.json").is_file()
    if (
        kind != "llama"
    ):  # trust_remote_code folder: model files + auto_map, even from a final/ folder without them
        assert set(SHIPPED_FILES["mac"]) <= {p.name for p in out.iterdir()}
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mac_llama.MACLlamaForCausalLM"
        assert type(reloaded).__module__.startswith("transformers_modules.")
        assert MACLlamaForCausalLM._auto_class is None  # the temporary registration was undone


@pytest.mark.parametrize("bits, quant_type", [(8, None), (4, "nf4")])
def test_surprise_and_ema_updates_run_on_quantized_mac(mac_dir, tmp_path, bits, quant_type):
    out = save_quantized(
        quantize_model(inspect_source(str(mac_dir)), parse_spec(bits, quant_type)), tmp_path / "q"
    )
    model = load_quantized(out)
    x = ids(2 * SEG)
    memory_before = {k: v.clone() for k, v in model.state_dict().items() if ".memory." in k}
    outputs = {rule: model(x, use_cache=False, update_rule=rule) for rule in ("surprise", "ema", "none")}
    assert (
        outputs["surprise"].memory_stats["updated_tokens"]
        == outputs["ema"].memory_stats["updated_tokens"]
        == 2 * SEG
    )
    assert outputs["none"].memory_stats["updated_tokens"] == 0
    assert outputs["surprise"].memory_stats["surprise_norm"] > 0
    # the first memory chunk reads the initial memory under every rule; later tokens read what each rule
    # wrote. (LLM.int8() picks its 16-bit outlier columns over all tokens of a call, so with 8 bits the later
    # tokens move the first ones slightly: a property of bitsandbytes' int8 matmul, not of the memory)
    for rule in ("surprise", "ema"):
        first = (outputs[rule].logits[:, :CHUNK] - outputs["none"].logits[:, :CHUNK]).abs().max()
        later = (outputs[rule].logits[:, SEG:] - outputs["none"].logits[:, SEG:]).abs().max()
        assert first <= (0 if bits == 4 else 0.01) and later > max(10 * first, 1e-3), (rule, first, later)
    prompt = x[:, : SEG - 4]
    for rule in ("surprise", "ema"):  # generation through the MACCache crosses a segment boundary
        generated = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=SEG,
            do_sample=False,
            update_rule=rule,
            pad_token_id=2,
        )
        assert generated.shape == (1, 2 * SEG - 4) and torch.equal(generated[:, : prompt.shape[1]], prompt)
    # the memory's parameters are the meta-learned initial state: test-time updates live in the cache, not
    # here
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in memory_before.items())


@pytest.mark.parametrize("bits, quant_type", [(8, None), (4, "nf4")])
def test_memory_parameters_train_through_the_quantized_model(mac_dir, bits, quant_type):
    """The full-precision memory parts keep learning by autograd (bnb layers frozen, gradients pass through
    them). train() before the first forward: bitsandbytes 0.50.2 re-packs eval-mode 4-bit CPU weights into a
    kernel that passes no gradient to its input."""
    model = quantize_model(inspect_source(str(mac_dir)), parse_spec(bits, quant_type)).train()
    trainable = {
        n: p.requires_grad_(True)
        for n, p in model.named_parameters()
        if ".memory." in n or n.endswith(("persistent_tokens", "memory_gate"))
    }
    assert len(trainable) == 12 * len(
        MEMORY_LAYERS
    )  # 10 memory tensors (with the two centres), persistent tokens, gate
    x = ids(2 * SEG)
    model(x, use_cache=False, labels=x).loss.backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
        for p in trainable.values()
    )


def test_save_refuses_a_4bit_model_repacked_by_a_cpu_forward(llama_dir, tmp_path):
    """bitsandbytes 0.50.2 re-packs 4-bit weights for its AVX512-bf16 CPU kernel on the first eval forward and
    then saves the block scales transposed; save_quantized refuses instead of writing a corrupted folder."""
    model = quantize_model(inspect_source(str(llama_dir)), parse_spec(4))
    before = logits(model, ids())
    if not _cpu_packed_layers(
        model
    ):  # a CPU without AVX512-bf16 (or a GPU): nothing is re-packed, saving is fine
        torch.testing.assert_close(
            logits(load_quantized(save_quantized(model, tmp_path / "q")), ids()), before
        )
        return
    with pytest.raises(RuntimeError, match="re-packed for bitsandbytes' CPU kernel"):
        save_quantized(model, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_spec_defaults():
    assert parse_spec(4) == parse_spec(4, "nf4", False, "float32")
    assert parse_spec(4, "fp4", True, "bfloat16").label == "fp4+dq"
    assert parse_spec(8).label == "int8" and parse_spec(8, int8_threshold=6).label == "int8(t=6)"
    assert parse_spec(8).bnb_config(["lm_head"]).llm_int8_threshold == DEFAULT_INT8_THRESHOLD
    assert (
        parse_spec(4, "nf4", compute_dtype="bfloat16").bnb_config(["lm_head"]).bnb_4bit_compute_dtype
        == torch.bfloat16
    )


# ------------------------------------------------------------------------------------------ command line


def invoke(*args):
    result = CliRunner().invoke(quantize_command, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def eval_args(corpus):
    return ("--data", corpus, "--eval-blocks", 2, "--eval-length", 2 * SEG, "--max-new-tokens", 6)


def test_cli_quantizes_a_mac_student_and_prints_the_table(mac_dir, corpus, tmp_path):
    out = tmp_path / "mac-nf4"
    code, text = invoke("--model-path", mac_dir, "--bits", 4, "--output", out, *eval_args(corpus))
    assert code == 0, text
    lines = text.splitlines()
    assert any(
        line.startswith(f"quantized {mac_dir} (MAC, 3 layers) to nf4 with bitsandbytes") for line in lines
    )
    rows = {line.split("  ")[0]: line for line in lines}
    assert {
        "memory footprint",
        "weight files",
        "validation perplexity (2x64 tokens)",
        "greedy agreement (8 prompts)",
    } <= set(rows)
    assert "before (float32)" in text and "after (nf4)" in text
    assert (
        "kept in float32: embeddings, norms, lm_head (tied to the embeddings), memory modules, "
        "persistent tokens and read-out gates of layer 1" in text
    )
    assert (
        "MAC memory updates on the quantized model: surprise ok (64 tokens written per memory layer), "
        "ema ok (64 tokens" in text
    )
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mac-nf4"]  # no temporary folder left behind


def test_cli_llama_int8_and_overwrite(llama_dir, corpus, tmp_path):
    out = tmp_path / "llama-int8"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, text = invoke("--model-path", llama_dir, "--bits", 8, "--output", out, *eval_args(corpus))
    assert (
        code == 1
        and text
        == f"Error: --output {out} is not empty; pass --overwrite to replace it, or choose another --output\n"
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, text = invoke(
        "--model-path", llama_dir, "--bits", 8, "--output", out, "--overwrite", *eval_args(corpus)
    )
    assert code == 0, text
    assert "after (int8)" in text and "MAC memory" not in text
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-int8"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["load_in_8bit"] is True


@pytest.fixture(scope="module")
def quantized_dir(llama_dir, tmp_path_factory):
    return save_quantized(
        quantize_model(inspect_source(str(llama_dir)), parse_spec(4)), tmp_path_factory.mktemp("q") / "q"
    )


@pytest.mark.parametrize(
    "case",
    [
        "already-quantized",
        "8-bit-nf4",
        "8-bit-double-quant",
        "8-bit-compute-dtype",
        "4-bit-int8-threshold",
        "bits-3",
        "type-int4",
        "missing-path",
        "no-config",
        "gpt2",
        "output-is-source",
        "output-is-file",
    ],
)
def test_bad_input_one_line_error_and_nothing_written(case, llama_dir, quantized_dir, tmp_path):
    out = tmp_path / "out"
    args = {
        "already-quantized": ["--model-path", quantized_dir, "--bits", 4],
        "8-bit-nf4": ["--model-path", llama_dir, "--bits", 8, "--quant-type", "nf4"],
        "8-bit-double-quant": ["--model-path", llama_dir, "--bits", 8, "--double-quant"],
        "8-bit-compute-dtype": ["--model-path", llama_dir, "--bits", 8, "--compute-dtype", "bfloat16"],
        "4-bit-int8-threshold": ["--model-path", llama_dir, "--bits", 4, "--int8-threshold", 1],
        "bits-3": ["--model-path", llama_dir, "--bits", 3],
        "type-int4": ["--model-path", llama_dir, "--bits", 4, "--quant-type", "int4"],
        "missing-path": ["--model-path", tmp_path / "nope", "--bits", 4],
        "no-config": ["--model-path", tmp_path, "--bits", 4],
        "gpt2": ["--model-path", tmp_path / "gpt2", "--bits", 4],
        "output-is-source": ["--model-path", llama_dir, "--bits", 4],
        "output-is-file": ["--model-path", llama_dir, "--bits", 4],
    }[case]
    expected = {
        "already-quantized": f"--model-path {quantized_dir} is already quantized (bitsandbytes nf4); pass "
        "the unquantized model folder it was made from",
        "8-bit-nf4": "--bits 8 --quant-type nf4 is not a bitsandbytes format: nf4 is 4-bit; pass --bits 4 "
        "--quant-type nf4, or drop --quant-type for 8-bit LLM.int8()",
        "8-bit-double-quant": "--double-quant applies to 4-bit only (it quantizes the 4-bit block scales); "
        "pass --bits 4, or drop --double-quant",
        "8-bit-compute-dtype": "--compute-dtype applies to 4-bit only (8-bit layers use bitsandbytes' int8 "
        "kernels); pass --bits 4, or drop --compute-dtype",
        "4-bit-int8-threshold": "--int8-threshold applies to 8-bit only (LLM.int8() outlier columns); pass "
        "--bits 8, or drop --int8-threshold",
        "bits-3": "--bits 3 is not supported; pass --bits 8 (LLM.int8()) or --bits 4 (nf4 or fp4)",
        "type-int4": "--quant-type int4 is not supported; pass --quant-type nf4 or --quant-type fp4 (with "
        "--bits 4)",
        "missing-path": f"--model-path {tmp_path / 'nope'} does not exist; pass a model folder (with "
        "config.json), a .gguf file or 'embedded'",
        "no-config": f"--model-path {tmp_path} has no config.json; pass a Hugging Face model folder (e.g. "
        "runs/NAME/final), a .gguf file or 'embedded'",
        "gpt2": f"--model-path {tmp_path / 'gpt2'} is a 'gpt2' model; quantize.py handles Llama teachers "
        "and students (model_type 'llama') and MAC students (model_type 'mac_llama')",
        "output-is-source": f"--output {llama_dir} would replace {llama_dir}, which this command reads; "
        "choose another --output",
        "output-is-file": f"--output {tmp_path / 'file.bin'} is a file; pass a folder path",
    }[case]
    if case == "gpt2":
        (tmp_path / "gpt2").mkdir()
        (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    output = {"output-is-source": llama_dir, "output-is-file": tmp_path / "file.bin"}.get(case, out)
    if case == "output-is-file":
        output.write_bytes(b"x")
    source_files = {p.name: p.stat().st_mtime_ns for p in Path(llama_dir).iterdir()}
    overwrite = ["--overwrite"] if case == "output-is-source" else []  # refused even with --overwrite
    code, text = invoke(*args, "--output", output, *overwrite)
    assert (code, text) == (1, f"Error: {expected}\n")
    assert not out.exists()
    assert {p.name: p.stat().st_mtime_ns for p in Path(llama_dir).iterdir()} == source_files


def test_missing_bitsandbytes_is_one_line(llama_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    code, text = invoke("--model-path", llama_dir, "--bits", 4, "--output", tmp_path / "out")
    assert (code, text) == (
        1,
        "Error: bitsandbytes is not installed; install it with `pip install 'titans-distil[quant]'` "
        "(or `pip install bitsandbytes`), or run bin/setup\n",
    )
    assert not (tmp_path / "out").exists()


def test_help_says_vllm_does_not_serve_bitsandbytes_folders():
    code, text = invoke("--help")
    assert code == 0 and "the CPU build pinned here does not load bitsandbytes weights" in " ".join(
        text.split()
    )


def test_bench_quantize_refuses_a_mac_path_that_is_not_a_mac_folder(tmp_path):
    """A --mac-path given must be a MAC folder: one line and exit 1 before any model loads, never a silent
    benchmark of a fresh untrained student."""
    import subprocess

    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quantize.py"
    for path, fragment in (
        (tmp_path / "nope", "does not exist"),
        (tmp_path / "llama", "is not a MAC student folder"),
    ):
        proc = subprocess.run(
            [sys.executable, str(bench), "--models", "mac", "--mac-path", str(path)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 1 and proc.stdout == "", proc
        assert proc.stderr.strip() == (
            f"error: --mac-path {path} {fragment}"
            + ("" if fragment == "does not exist" else " (no mac_llama config.json)")
            + "; pass a MAC student folder (runs/<name>/final or an export_mac_model.py folder), "
            "or leave --mac-path out"
        ), proc.stderr
