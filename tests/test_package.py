"""package_model.py / MemoryLlamaForCausalLM: any Llama wrapped with an inference memory.

- the packaged folder loads with plain transformers (trust_remote_code) in a child process that cannot import
this
  project, equals the base Llama with the memory off or empty, generates with every update rule, and
  round-trips its memory through a file;
- exactness, persistence, snapshot semantics (cached generation = recomputation, one call = token-by-token
  streaming), memory-file checks (exact messages, never unpickled), config validation;
- the memory has a measurable effect on the embedded SmolLM2 teacher (numbers printed: run with -s);
- bad input: one-line errors.
Tiny float32 models; one thread (the cores are shared)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from titans_distil.models.configuration_memory_llama import MemoryLlamaConfig
from titans_distil.models.modeling_memory_llama import MemoryLlamaForCausalLM
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM

from titans_distil.errors import UserError
from titans_distil.package import package, package_llama_with_memory, wrap_llama

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=None,
    eos_token_id=None,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def llama(seed=0, **overrides):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**BASE, **overrides})).eval()


def wrapped(base, **memory):
    """The base Llama's weights in a MemoryLlama (small slots so that rings and pools overflow quickly)."""
    memory = {"memory_slots": 12, "memory_recent_slots": 4, "memory_chunk_size": 4, **memory}
    return wrap_llama(base, memory, "test")


def tokens(batch, length, seed=1):
    return torch.randint(
        0, BASE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed)
    )


@torch.no_grad()
def logits(model, ids, **kwargs):
    return model(ids, use_cache=False, **kwargs).logits


def state_of(model):
    return {k: v.clone() for k, v in model.memory_state_dict().items()}


# ------------------------------------------------------------------------------------ exactness and semantics


@pytest.mark.parametrize("tied,attn", [(False, "sdpa"), (True, "eager")])
def test_memory_off_or_empty_is_exactly_llama(tied, attn):
    base = llama(tie_word_embeddings=tied)
    base.config._attn_implementation = attn
    model = wrapped(base)
    model.config._attn_implementation = attn
    ids = tokens(2, 30)
    ref = logits(base, ids)
    torch.testing.assert_close(logits(model, ids, use_memory=False), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        logits(model, ids, update_rule="ema"), ref, rtol=0, atol=1e-5
    )  # empty: read nothing
    assert model.memory_info()["slot_tokens"] == 60  # ... and wrote both rows
    assert (logits(model, ids, update_rule="none") - ref).abs().max() > 1e-3  # now the memory is read
    torch.testing.assert_close(logits(model, ids, use_memory=False), ref, rtol=0, atol=1e-5)
    model.reset_memory()
    torch.testing.assert_close(logits(model, ids, update_rule="surprise"), ref, rtol=0, atol=1e-5)


def test_state_dict_is_llamas_plus_fixed_memory_parameters():
    base = llama()
    model = wrapped(base, memory_layers=[1, 3])
    extra = set(model.state_dict()) - set(base.state_dict())
    assert set(base.state_dict()) <= set(model.state_dict())
    assert extra and all(".self_attn.memory.neural." in name for name in extra)
    assert {name.split(".")[2] for name in extra} == {"1", "3"}
    # a fresh model gets the same fixed values as the wrapped one
    fresh = MemoryLlamaForCausalLM(model.config)
    for name in extra:
        torch.testing.assert_close(fresh.state_dict()[name], model.state_dict()[name], rtol=0, atol=0)


@pytest.mark.parametrize("rule", ["ema", "surprise"])
def test_one_call_equals_token_by_token_streaming(rule):
    """Reads use the memory as it was when the sequence started, and writes are sequential: a text read in one
    call or token by token through the cache gives the same logits and the same memory afterwards."""
    base = llama()
    one, stream = wrapped(base), wrapped(base)
    warm = tokens(1, 20, seed=3)
    for model in (one, stream):
        with torch.no_grad():
            model(warm, update_rule=rule)  # a non-empty memory (and overflowing slots) before the text
    ids = tokens(1, 25)
    with torch.no_grad():
        full = one(ids, update_rule=rule).logits
        cache, pieces = None, []
        for t in range(ids.shape[1]):
            out = stream(ids[:, t : t + 1], past_key_values=cache, use_cache=True, update_rule=rule)
            cache = out.past_key_values
            pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)
    a, b = state_of(one), state_of(stream)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("rule", ["ema", "surprise"])
def test_cached_greedy_generation_equals_recomputation(rule):
    base = llama()
    model = wrapped(base)
    with torch.no_grad():
        model(tokens(1, 40, seed=5), update_rule=rule)  # both stores written, slots overflowing
    prompt = tokens(1, 9)
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False, update_rule="none")
    recomputed = model.generate(
        prompt, max_new_tokens=12, do_sample=False, update_rule="none", use_cache=False
    )
    assert torch.equal(cached, recomputed)
    plain = base.generate(prompt, max_new_tokens=12, do_sample=False)
    assert not torch.equal(cached, plain)  # the memory is read
    # with writes, generation equals a step-by-step recomputation that reads the memory as of the prompt
    before = state_of(model)
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False, update_rule=rule)
    assert torch.equal(
        generated[:, :15], cached[:, :15]
    )  # the snapshot: this call's writes are not read back
    assert model.memory_info()["slot_tokens"] == 40 + 9 + 5  # prompt + generated tokens fed back
    assert any(not torch.equal(before[k], v) for k, v in state_of(model).items())


def test_memory_persists_across_calls_until_reset_and_rules_are_checked():
    base = llama()
    model = wrapped(base)
    prompt = tokens(1, 8)
    greedy = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True)
    first = model.generate(prompt, use_memory=True, update_rule="ema", **greedy)
    plain = base.generate(prompt, **greedy)
    assert torch.equal(first.sequences, plain.sequences)  # the memory was empty
    torch.testing.assert_close(first.logits[0], plain.logits[0], rtol=0, atol=1e-5)
    second = model.generate(prompt, **greedy)  # config defaults: memory on, rule ema
    assert model.config.update_rule == "ema" and model.memory_info()["slot_tokens"] == 30
    assert (second.logits[0] - first.logits[0]).abs().max() > 1e-3  # the first call's tokens are read
    model.reset_memory()
    assert model.memory_info()["slot_tokens"] == 0
    torch.testing.assert_close(model.generate(prompt, **greedy).logits[0], plain.logits[0], rtol=0, atol=1e-5)
    message = "update_rule must be one of 'surprise', 'none', 'ema'; got 'fast'"
    with pytest.raises(ValueError, match=message):
        model.generate(prompt, max_new_tokens=2, update_rule="fast")
    with pytest.raises(ValueError, match=message):
        model(prompt, update_rule="fast")
    with pytest.raises(ValueError, match="use_memory must be True or False, got 'yes'"):
        model(prompt, use_memory="yes")
    with pytest.raises(ValueError, match="update_rule must be one of surprise, none, ema; got 'x'"):
        MemoryLlamaConfig(**BASE, update_rule="x")
    with pytest.raises(ValueError, match=r"memory_layers \[7\] holds indices \[7\] outside 0..3"):
        MemoryLlamaConfig(**BASE, memory_layers=[7])
    with pytest.raises(ValueError, match="memory_recent_slots must be None"):
        MemoryLlamaConfig(**BASE, memory_slots=4, memory_recent_slots=5)


def test_padding_is_not_written_and_batches_share_the_memory():
    base = llama()
    model = wrapped(base, memory_slots=64, memory_recent_slots=32)
    ids = tokens(2, 10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 13)
    assert (
        model.memory_info()["slot_tokens"] == 10 + 6 + 2 * 2
    )  # real prompt tokens, then 2 fed-back tokens per row


# ----------------------------------------------------------------------------------------------- memory files


def test_memory_file_round_trip_and_refusals(tmp_path, monkeypatch):
    import pickle

    def no_pickle(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)

    base = llama()
    model = wrapped(base)
    with torch.no_grad():
        model(tokens(1, 30, seed=7), update_rule="surprise")
        model(
            tokens(1, 7, seed=8), update_rule="ema"
        )  # leaves a pending (incomplete) neural chunk: 30 % 4 = 2
    path = tmp_path / "memory.safetensors"
    model.save_memory(path)
    ids = tokens(1, 12)
    expected = logits(model, ids, update_rule="none")

    other = wrapped(base)  # same weights: same fingerprint
    other.load_memory(path)
    torch.testing.assert_close(logits(other, ids, update_rule="none"), expected, rtol=0, atol=0)
    assert other.memory_info() == model.memory_info()
    # continuing from the loaded memory equals continuing from the original
    with torch.no_grad():
        a = model(ids, update_rule="surprise").logits
        b = other(ids, update_rule="surprise").logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)

    def refused(target, file, message):
        before = state_of(target)
        with pytest.raises(ValueError) as err:
            target.load_memory(file)
        assert str(err.value) == message
        after = state_of(target)
        assert all(torch.equal(before[k], after[k]) for k in before)  # nothing half-loaded

    stranger = wrapped(llama(seed=1))
    mine, theirs = stranger.memory_fingerprint()[:16], model.memory_fingerprint()[:16]
    refused(
        stranger,
        path,
        f"{path} was saved from a different model (fingerprint {theirs}, this model has {mine}); "
        "load it into the model that wrote it, or call reset_memory() to start empty",
    )
    bigger = wrapped(base, memory_slots=16)
    refused(
        bigger,
        path,
        f"{path}: tensor layers.0.pool_keys has shape (2, 8, 16), this model expects (2, 12, 16) "
        "(memory_slots=16, key/value heads=2, head_dim=16)",
    )
    fewer = wrapped(base, memory_layers=[0, 1])
    refused(
        fewer,
        path,
        f"{path} holds tensors this model does not have: layers.2.key_mean, layers.2.key_rms, "
        "layers.2.neural.momentum.0",
    )
    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors["layers.1.pool_values"] = tensors["layers.1.pool_values"].half()
    save_file(tensors, tmp_path / "half.safetensors", metadata=metadata)
    refused(
        other,
        tmp_path / "half.safetensors",
        f"{tmp_path / 'half.safetensors'}: tensor layers.1.pool_values has dtype torch.float16, this "
        "model expects torch.float32",
    )
    save_file({"x": torch.zeros(2)}, tmp_path / "weights.safetensors")
    refused(
        other,
        tmp_path / "weights.safetensors",
        f"{tmp_path / 'weights.safetensors'} is not a memory file of this model type (format None, "
        "expected 'memory-llama-memory/1')",
    )
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match=r"junk.safetensors is not a safetensors memory file \("):
        other.load_memory(tmp_path / "junk.safetensors")
    refused(
        other,
        tmp_path / "missing.safetensors",
        f"memory file {tmp_path / 'missing.safetensors'} does not exist; give a file written by save_memory",
    )


def test_memory_files_of_the_wrapper_written_before_memory_file_py_still_load(tmp_path):
    """The writer of `memory-llama-memory/1` as it was inline in modeling_memory_llama.py (its own 4096-sample
    fingerprint, a plain save_file): the shared reader and fingerprint accept its files unchanged."""
    import hashlib

    base = llama()
    model = wrapped(base)
    with torch.no_grad():
        model(tokens(1, 30, seed=7), update_rule="surprise")
        model(tokens(1, 7, seed=8), update_rule="ema")
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if ".memory.neural." in name:
            continue
        flat = tensor.detach().reshape(-1)
        count = flat.numel()
        steps = min(count, 4096)
        idx = torch.arange(steps, dtype=torch.int64) * max(count - 1, 0) // max(steps - 1, 1)
        digest.update(f"{name}|{tuple(tensor.shape)}|".encode())
        digest.update(flat[idx].float().cpu().numpy().tobytes() if count else b"")
    old = {
        f"layers.{i}.{name}": t.detach().cpu().contiguous()
        for i, memory in model.memory_modules().items()
        for name, t in memory.current_state().items()
    }
    path = tmp_path / "old.safetensors"
    save_file(
        old,
        path,
        metadata={
            "format": "memory-llama-memory/1",
            "fingerprint": digest.hexdigest(),
            "memory_layers": json.dumps(list(model.config.memory_layers)),
        },
    )
    other = wrapped(base)
    other.config.memory_fingerprint = None  # computed from the weights, as the inline writer did
    other.load_memory(path)
    ids = tokens(1, 12)
    torch.testing.assert_close(
        logits(other, ids, update_rule="none"), logits(model, ids, update_rule="none"), rtol=0, atol=0
    )


def test_memory_modules_never_unpickle():
    import re

    for name in ("modeling_memory_llama.py", "configuration_memory_llama.py"):
        source = (ROOT / "models" / name).read_text(encoding="utf-8")
        assert not re.search(r"\bpickle\b|torch\.load\(|allow_pickle=True", source), name


# ---------------------------------------------------------------------------- the package, in a clean process

CHILD = r"""
import importlib.util, json, os, sys
root = sys.argv[1]
def _module(f):
    return (f.__module__ if isinstance(f, type) else type(f).__module__) or ""
sys.meta_path[:] = [f for f in sys.meta_path if not _module(f).startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path_importer_cache.clear()
def _in_repository(p):
    return p == root or (p.startswith(root + os.sep) and not p.startswith(os.path.join(root, ".venv")))
sys.path[:] = [p for p in sys.path if not _in_repository(p)]
assert importlib.util.find_spec("titans_distil") is None and importlib.util.find_spec("models") is None
assert not os.getcwd().startswith(root)

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
torch.set_num_threads(1)
package, base_dir, memory_file = sys.argv[2], sys.argv[3], sys.argv[4]
out = {}
model = AutoModelForCausalLM.from_pretrained(package, trust_remote_code=True).eval()
base = LlamaForCausalLM.from_pretrained(base_dir).eval()
tokenizer = AutoTokenizer.from_pretrained(package, trust_remote_code=True)
out["class"] = type(model).__module__ + "." + type(model).__name__
out["chat"] = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
inputs = tokenizer("The capital of Velmora is Tarsk. The capital of Velmora is", return_tensors="pt")
ids = inputs["input_ids"]
with torch.no_grad():
    ref = base(ids).logits
    out["off"] = (model(ids, use_memory=False).logits - ref).abs().max().item()
    out["empty"] = (model(ids, use_memory=True, update_rule="none").logits - ref).abs().max().item()
for rule in ("ema", "surprise", "none"):
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_memory=True, update_rule=rule)
    out["generated_" + rule] = generated.shape[1] - ids.shape[1]
out["info"] = model.memory_info()
with torch.no_grad():
    out["read"] = (model(ids, update_rule="none").logits - ref).abs().max().item()
    out["off_after"] = (model(ids, use_memory=False).logits - ref).abs().max().item()
    expected = model(ids, update_rule="none").logits[0, -1]
model.save_memory(memory_file)
fresh = AutoModelForCausalLM.from_pretrained(package, trust_remote_code=True).eval()
fresh.load_memory(memory_file)
with torch.no_grad():
    out["reloaded"] = (fresh(ids, update_rule="none").logits[0, -1] - expected).abs().max().item()
try:
    model.generate(**inputs, max_new_tokens=2, update_rule="bogus")
except ValueError as err:
    out["bad_rule"] = str(err)
out["still_hidden"] = importlib.util.find_spec("titans_distil") is None
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def tiny_package(tiny_teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("packages") / "tiny-memory"
    return package_llama_with_memory(
        str(tiny_teacher_dir), out, memory_slots=32, recent_slots=16, update_rule="surprise"
    )


def test_package_folder_contents(tiny_package, tiny_teacher_dir):
    names = {p.name for p in tiny_package.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "README.md",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "configuration_memory_llama.py",
        "modeling_memory_llama.py",
        "neural_memory.py",
        "memory_file.py",
    } <= names
    config = json.loads((tiny_package / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_memory_llama.MemoryLlamaConfig",
        "AutoModelForCausalLM": "modeling_memory_llama.MemoryLlamaForCausalLM",
    }
    assert config["model_type"] == "memory_llama" and config["architectures"] == ["MemoryLlamaForCausalLM"]
    assert config["memory_layers"] == [0, 1, 2, 3] and config["update_rule"] == "surprise"
    assert (
        config["memory_slots"] == 32
        and config["memory_recent_slots"] == 16
        and len(config["memory_fingerprint"]) == 64
    )
    weights = load_file(tiny_package / "model.safetensors")
    base = load_file(tiny_teacher_dir / "model.safetensors")
    for name, tensor in base.items():
        assert torch.equal(weights[name], tensor), name  # the wrapped weights, unchanged
    for name in ("modeling_memory_llama.py", "neural_memory.py", "memory_file.py"):
        assert (tiny_package / name).read_bytes() == (ROOT / "models" / name).read_bytes()
    assert "trust_remote_code=True" in (tiny_package / "README.md").read_text()


def test_package_loads_in_a_process_that_cannot_see_the_project(tiny_package, tiny_teacher_dir, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            str(ROOT),
            str(tiny_package),
            str(tiny_teacher_dir),
            str(tmp_path / "memory.safetensors"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["class"].startswith("transformers_modules.") and out["class"].endswith(
        ".MemoryLlamaForCausalLM"
    )
    assert "<|im_start|>user" in out["chat"]
    assert out["off"] <= 1e-5 and out["empty"] <= 1e-5
    assert out["generated_ema"] == out["generated_surprise"] == out["generated_none"] == 6
    assert out["info"]["surprise_tokens"] > 0 and out["info"]["slot_tokens"] > out["info"]["surprise_tokens"]
    assert out["read"] > 1e-3 and out["off_after"] <= 1e-5
    assert out["reloaded"] == 0.0
    assert out["bad_rule"] == "update_rule must be one of 'surprise', 'none', 'ema'; got 'bogus'"
    assert out["still_hidden"]


# -------------------------------------------------------------------------------------------- a real effect


FACTS = (
    "Velmora is a small island country in the Sunset Sea. The capital of Velmora is Tarsk, a harbour city "
    "famous for its glass towers. Velmora's national animal is the silver otter, and its currency is the "
    "velmark. The country is ruled by Queen Odalys the Third. Every spring, Velmorans celebrate the Lantern "
    "Tide festival by floating paper boats on the harbour."
)


def test_memory_changes_the_loss_of_the_embedded_teacher(embedded_dir):
    """Read a text with memory updates, then measure the loss on a new reading of the same text (numbers:
    -s)."""
    from transformers import AutoTokenizer

    base = LlamaForCausalLM.from_pretrained(embedded_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    ids = tokenizer(FACTS, return_tensors="pt").input_ids
    question = tokenizer(
        "Question: What is the capital of Velmora?\nAnswer: Tarsk", return_tensors="pt"
    ).input_ids
    answer = len(tokenizer(" Tarsk").input_ids)

    def measure(model, **kwargs):
        with torch.no_grad():
            text = model(ids, labels=ids, **kwargs).loss.item()
            logp = model(question, **kwargs).logits[0, :-1].log_softmax(-1)
            target = question[0, 1:]
            recall = logp[-answer:].gather(-1, target[-answer:, None]).sum().item()
        return text, recall

    base_loss, base_recall = measure(base)
    model = wrap_llama(base, {}, "embedded")
    results = {}
    for rule in ("ema", "surprise"):
        model.reset_memory()
        assert measure(model, update_rule="none") == pytest.approx((base_loss, base_recall), abs=1e-4)
        with torch.no_grad():
            model(ids, update_rule=rule)
        results[rule] = measure(model, update_rule="none")
    print(
        f"\nembedded teacher, {ids.shape[1]}-token text: loss {base_loss:.3f} without memory; after "
        "reading it once: "
        + ", ".join(f"{rule} {loss:.3f}" for rule, (loss, _) in results.items())
        + f"\nlog p(' Tarsk' | question): {base_recall:.2f} without memory; "
        + ", ".join(f"{rule} {recall:.2f}" for rule, (_, recall) in results.items())
    )
    for rule, (loss, recall) in results.items():
        assert loss < base_loss - 2.0, rule  # the text fits the slots: remembered verbatim
        assert recall > base_recall + 3.0, rule


# -------------------------------------------------------------------------------------------------- bad input


def invoke(*args):
    result = CliRunner().invoke(package, [str(a) for a in args])
    return result.exit_code, result.output.strip()


def test_bad_input_is_one_line_error_and_touches_nothing(tiny_teacher_dir, tmp_path):
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10).save_pretrained(gpt2)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("precious")
    cases = [
        (
            ["--model-path", tmp_path / "nope", "--output", tmp_path / "o"],
            f"Error: model {tmp_path / 'nope'} does not exist; pass an existing folder, a .gguf file, a Hub "
            "id or 'embedded'",
        ),
        (
            ["--model-path", tmp_path / "nope.gguf", "--output", tmp_path / "o"],
            f"Error: model file {tmp_path / 'nope.gguf'} does not exist; pass an existing .gguf file, a "
            "model folder, a Hub id or 'embedded'",
        ),
        (
            ["--model-path", gpt2, "--output", tmp_path / "o"],
            f"Error: model {gpt2} is a 'gpt2' model; package_model.py wraps Llama-family causal LMs "
            "(model_type llama)",
        ),
        (
            ["--model-path", tiny_teacher_dir, "--output", busy],
            f"Error: --output {busy} is not empty; pass --overwrite to replace it, or choose another "
            "--output",
        ),
        (
            ["--model-path", tiny_teacher_dir, "--output", tmp_path / "o", "--memory-layers", "1,9"],
            "Error: --memory-layers 1,9 holds [9], outside 0..3; the model has 4 layers",
        ),
        (
            [
                "--model-path",
                tiny_teacher_dir,
                "--output",
                tmp_path / "o",
                "--memory-slots",
                "8",
                "--recent-slots",
                "9",
            ],
            "Error: --recent-slots 9 exceeds --memory-slots 8",
        ),
    ]
    for args, message in cases:
        code, out = invoke(*args)
        assert code == 1 and out == message, (args, out)
    assert not (tmp_path / "o").exists() and [p.name for p in busy.iterdir()] == ["keep.txt"]
    code, out = invoke(
        "--model-path",
        tiny_teacher_dir,
        "--output",
        busy,
        "--overwrite",
        "--memory-layers",
        "2",
        "--memory-slots",
        "8",
    )
    assert (
        code == 0
        and out == f"packaged {tiny_teacher_dir} with inference memory (update rule ema, 8 slots) in {busy}"
    )
    assert not (busy / "keep.txt").exists() and json.loads((busy / "config.json").read_text())[
        "memory_layers"
    ] == [2]
    assert not list(tmp_path.glob("*.tmp-*"))
    with pytest.raises(UserError, match="--memory-layers 'x' is not a comma-separated list"):
        package_llama_with_memory(str(tiny_teacher_dir), tmp_path / "p", memory_layers="x")


def test_root_script_runs_the_command(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "package_model.py"),
            "--model-path",
            str(tmp_path / "nope"),
            "--output",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"Error: model {tmp_path / 'nope'} does not exist; pass an existing folder, a .gguf "
        "file, a Hub id or 'embedded'"
    )
