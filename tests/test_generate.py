"""`no_vllm_inference.py`: transformers generation with a per-user memory (MAC cache memory, packaged wrapper
memory, plain Llama without memory). Tiny models with the real tokenizer; nothing is downloaded."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import TINY_MAC, save_mac_folder, tiny_mac
from transformers import AutoModelForCausalLM, AutoTokenizer

import titans_distil
from titans_distil.errors import UserError
from titans_distil.generate import Session, load_model, no_vllm_inference
from titans_distil.model_folder import trust_remote_code_for
from titans_distil.package import package_llama_with_memory

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mac_dir(tiny_teacher_dir, tmp_path_factory):
    return save_mac_folder(tiny_mac(), tiny_teacher_dir, tmp_path_factory.mktemp("gen") / "tiny-mac")


def invoke(*args, input=None):
    result = CliRunner().invoke(no_vllm_inference, [str(a) for a in args], input=input)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout.strip(), result.stderr.strip()


def ids_for(length, seed):
    return torch.randint(
        3, TINY_MAC["vocab_size"], (1, length), generator=torch.Generator().manual_seed(seed)
    )


@torch.no_grad()
def next_logits(model, states, ids, rule="surprise"):
    """Next-token logits of a session seeded with `states` (a cache or {layer: state}; None = the initial
    memory) reading `ids`."""
    return model(ids, past_key_values=model.memory_cache(states), use_cache=True, update_rule=rule).logits[
        0, -1
    ]


# ----------------------------------------------------------------------------------------------- memory files


@pytest.mark.parametrize("rule", ["surprise", "ema"])
def test_mac_memory_file_round_trip_gives_identical_logits(tmp_path, rule):
    model = tiny_mac()
    cache = model.memory_cache()
    with torch.no_grad():  # 37 tokens: 2 segments + a partial one, a pending (incomplete) memory chunk
        model(ids_for(37, seed=1), past_key_values=cache, use_cache=True, update_rule=rule)
    states = model.memory_states(cache)
    assert states[1].pending.shape[1] == 37 % TINY_MAC["memory_chunk_size"] and states[1].position == 37
    model.save_memory(tmp_path / "alice.safetensors", cache, keep_pending=True)
    loaded = model.load_memory_states(tmp_path / "alice.safetensors")
    for a, b in zip(
        states[1].weights + states[1].momentum + (states[1].pending,),
        loaded[1].weights + loaded[1].momentum + (loaded[1].pending,),
    ):
        assert torch.equal(a, b)

    probe = ids_for(21, seed=2)
    remembered = next_logits(model, states, probe, rule)
    assert torch.equal(next_logits(model, loaded, probe, rule), remembered)
    other = tiny_mac()
    assert torch.equal(
        next_logits(other, other.load_memory(tmp_path / "alice.safetensors"), probe, rule), remembered
    )
    assert (next_logits(model, None, probe, rule) - remembered).abs().max() > 1e-3  # the memory matters


def test_session_save_then_load_continues_with_the_same_memory(mac_dir, tmp_path):
    model, tokenizer = load_model(str(mac_dir))
    session = Session(model, tokenizer, update_rule="surprise")
    session.generate("def add(a, b):", max_new_tokens=5)
    session.generate("return a + b", max_new_tokens=3)
    # every prompt and generated token went through the cache (and its memory)
    assert session.cache.seen_tokens == len(session.ids)
    session.save_memory(tmp_path / "m.safetensors")
    other = Session(*load_model(str(mac_dir)), update_rule="surprise")
    other.load_memory(tmp_path / "m.safetensors")
    probe = torch.tensor([tokenizer("class Stack:")["input_ids"]])
    flushed = {
        i: model.model.layers[i].memory.flush(state)
        for i, state in model.memory_states(session.cache).items()
    }
    expected = next_logits(model, flushed, probe)
    assert torch.equal(next_logits(other.model, other.seed, probe), expected)
    with torch.no_grad():
        out = other.model(probe, past_key_values=other.cache, use_cache=True, update_rule="surprise").logits[
            0, -1
        ]
    assert torch.equal(out, expected)


def test_wrong_model_and_wrong_shape_memory_files_are_refused(tmp_path):
    model = tiny_mac()
    path = tmp_path / "m.safetensors"
    model.save_memory(path)

    other = tiny_mac(seed=1)
    with pytest.raises(ValueError) as err:
        other.load_memory(path)
    assert str(err.value) == (
        f"{path} was saved from a different model (fingerprint {model.memory_fingerprint()[:16]}, "
        f"this model has {other.memory_fingerprint()[:16]}); load it into the model that wrote it, "
        "or start from the model's initial memory (no memory file)"
    )

    with safe_open(path, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    good_shape = tuple(tensors["layers.1.weights.0"].shape)
    bad = dict(tensors, **{"layers.1.weights.0": torch.zeros(1, good_shape[1] + 1, good_shape[2])})
    save_file(bad, tmp_path / "shape.safetensors", metadata=metadata)
    with pytest.raises(ValueError) as err:
        model.load_memory(tmp_path / "shape.safetensors")
    assert str(err.value) == (
        f"{tmp_path / 'shape.safetensors'}: tensor layers.1.weights.0 has shape "
        f"{(1, good_shape[1] + 1, good_shape[2])}, this model expects {good_shape}"
    )

    bad = dict(tensors, **{"layers.1.momentum.1": tensors["layers.1.momentum.1"].double()})
    save_file(bad, tmp_path / "dtype.safetensors", metadata=metadata)
    with pytest.raises(
        ValueError,
        match=r"tensor layers\.1\.momentum\.1 has dtype torch\.float64, this model expects torch\.float32$",
    ):
        model.load_memory(tmp_path / "dtype.safetensors")

    (tmp_path / "evil.safetensors").write_bytes(b"\x80\x04K\x01.")  # a pickle
    with pytest.raises(ValueError, match="is not a safetensors memory file"):
        model.load_memory(tmp_path / "evil.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        model.load_memory(tmp_path / "nope.safetensors")


def write_version1_mac_memory(model, cache, path):
    """The writer of format version 1 (titans_distil/generate.py before the models saved their own memory): a
    64-sample fingerprint, no phase / pending_rule tensors, states not flushed (as recall_experiment.py
    saved)."""
    import hashlib
    import json

    fields = (
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "segment_len",
        "num_persistent_tokens",
        "memory_layers",
        "memory_chunk_size",
        "memory_depth",
        "memory_expansion",
        "memory_dim",
        "memory_max_lr",
        "memory_max_grad_norm",
    )
    config = model.config.to_dict()
    fields += (
        ("memory_version", "memory_heads", "memory_update_bound")
        if config.get("memory_version", 1) >= 2
        else ()
    )
    digest = hashlib.sha256()
    digest.update(json.dumps({k: config.get(k) for k in fields}, sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        count = flat.numel()
        steps = min(count, 64)
        idx = torch.arange(steps, dtype=torch.int64) * max(count - 1, 0) // max(steps - 1, 1)
        digest.update(f"{name}|{tuple(tensor.shape)}|".encode())
        digest.update(flat[idx].float().cpu().numpy().tobytes() if count else b"")
    tensors = {}
    for i, layer in enumerate(model.model.layers):
        if layer.memory is not None:
            state = cache.layers[i].state
            for j, (w, m) in enumerate(zip(state.weights, state.momentum)):
                tensors[f"layers.{i}.weights.{j}"], tensors[f"layers.{i}.momentum.{j}"] = (
                    w.contiguous(),
                    m.contiguous(),
                )
            tensors[f"layers.{i}.pending"] = state.pending.contiguous()
            tensors[f"layers.{i}.position"] = torch.tensor(state.position, dtype=torch.int64)
    save_file(
        tensors,
        str(path),
        metadata={
            "format": "titans-distil-mac-memory/1",
            "fingerprint": digest.hexdigest(),
            "memory_layers": json.dumps(sorted({int(k.split(".")[1]) for k in tensors})),
            "dtype": "float32",
        },
    )


@pytest.mark.parametrize("rule", ["surprise", "ema"])
def test_version1_mac_memory_files_still_load(tmp_path, rule):
    model = tiny_mac()
    cache = model.memory_cache()
    with torch.no_grad():
        model(ids_for(37, seed=1), past_key_values=cache, use_cache=True, update_rule=rule)
    write_version1_mac_memory(model, cache, tmp_path / "old.safetensors")
    loaded = tiny_mac().load_memory_states(tmp_path / "old.safetensors")
    states = model.memory_states(cache)
    for i, state in states.items():
        for a, b in zip(
            state.weights + state.momentum + (state.pending,),
            loaded[i].weights + loaded[i].momentum + (loaded[i].pending,),
        ):
            assert torch.equal(a, b)
        assert loaded[i].position == 37 and loaded[i].chunk_phase() == state.pending.shape[1] > 0
    probe = ids_for(9, seed=2)  # continuing with the same rule equals continuing the original stream's memory
    assert torch.equal(next_logits(model, loaded, probe, rule), next_logits(model, states, probe, rule))
    with pytest.raises(ValueError, match="was saved from a different model"):
        tiny_mac(seed=1).load_memory(tmp_path / "old.safetensors")


def test_save_memory_flushes_the_unfinished_chunk_unless_keep_pending(tmp_path):
    model = tiny_mac()
    C = TINY_MAC["memory_chunk_size"]
    cache = model.memory_cache()
    with torch.no_grad():
        model(ids_for(37, seed=1), past_key_values=cache, use_cache=True, update_rule="surprise")
    before = model.memory_states(cache)
    model.save_memory(tmp_path / "flushed.safetensors", cache)
    model.save_memory(tmp_path / "exact.safetensors", cache, keep_pending=True)
    assert model.memory_states(cache) == before  # the live stream is not changed
    flushed = model.load_memory_states(tmp_path / "flushed.safetensors")
    exact = model.load_memory_states(tmp_path / "exact.safetensors")
    for i, state in before.items():
        assert state.pending.shape[1] == 37 % C > 0
        expected = model.model.layers[i].memory.flush(state)
        assert flushed[i].pending.shape[1] == 0 and flushed[i].phase == 0 and flushed[i].position == 37
        for a, b in zip(flushed[i].weights + flushed[i].momentum, expected.weights + expected.momentum):
            assert torch.equal(a, b)
        assert not torch.equal(
            flushed[i].weights[0], state.weights[0]
        )  # the pending rows reached the weights
        assert torch.equal(exact[i].pending, state.pending) and exact[i].chunk_phase() == 37 % C
    # a session from the flushed file starts on a chunk boundary, like its segments
    fresh = model.load_memory(tmp_path / "flushed.safetensors")
    with torch.no_grad():
        model(ids_for(C, seed=3), past_key_values=fresh, use_cache=True, update_rule="surprise")
    assert all(s.pending.shape[1] == 0 and s.phase == 0 for s in model.memory_states(fresh).values())


def test_save_memory_is_atomic(tmp_path, monkeypatch):
    import transformers.modeling_utils

    model = tiny_mac()
    path = tmp_path / "m.safetensors"
    model.save_memory(path)
    good = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_memory(path)
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


# ------------------------------------------------------------------------------------------------ the command


@pytest.mark.parametrize("rule", ["none", "ema", "surprise"])
def test_cli_greedy_generation_of_a_mac_folder(mac_dir, rule):
    code, out, err = invoke(
        "--model-path",
        mac_dir,
        "--use-mac",
        "--update-rule",
        rule,
        "--prompt",
        "def add(a, b):",
        "--no-chat-template",
        "--max-new-tokens",
        6,
    )
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(mac_dir, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(mac_dir)
    ids = tok("def add(a, b):", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False, update_rule=rule, pad_token_id=2)
    text = tok.decode(expected[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert out and out == text


def test_cli_memory_out_then_in_and_interactive(mac_dir, tmp_path):
    mem = tmp_path / "alice.safetensors"
    code, out, err = invoke(
        "--model-path",
        mac_dir,
        "--update-rule",
        "surprise",
        "--prompt",
        "My name is Alice.",
        "--max-new-tokens",
        4,
        "--memory-out",
        mem,
    )
    assert (
        code == 0 and err == f"memory saved to {mem}" and mem.is_file()
    )  # (a random model may print only newlines)
    code, out, err = invoke(
        "--model-path",
        mac_dir,
        "--update-rule",
        "surprise",
        "--memory-in",
        mem,
        "--interactive",
        "--max-new-tokens",
        3,
        input=f"What is my name?\n/save {tmp_path / 'b.safetensors'}\n/reset\nhi\n\n",
    )
    assert code == 0 and err.count("> ") >= 4, err  # a prompt for each of the four lines before the empty one
    assert f"(memory saved to {tmp_path / 'b.safetensors'})" in err and "(memory cleared)" in err
    model, _ = load_model(str(mac_dir))
    model.load_memory(tmp_path / "b.safetensors")  # a valid memory file of this model


def test_cli_packaged_wrapper_uses_its_own_memory_files(tiny_teacher_dir, tmp_path):
    package = package_llama_with_memory(
        str(tiny_teacher_dir), tmp_path / "pkg", memory_slots=16, recent_slots=8
    )
    mem = tmp_path / "w.safetensors"
    code, out, err = invoke(
        "--model-path",
        package,
        "--update-rule",
        "ema",
        "--prompt",
        "Velmora is a city.",
        "--no-chat-template",
        "--max-new-tokens",
        4,
        "--memory-out",
        mem,
    )
    assert code == 0 and out, err
    model = AutoModelForCausalLM.from_pretrained(package, trust_remote_code=True)
    model.load_memory(mem)
    assert model.memory_info()["slots_filled"] > 0
    code, out, err = invoke(
        "--model-path",
        package,
        "--update-rule",
        "surprise",
        "--prompt",
        "Where?",
        "--max-new-tokens",
        3,
        "--no-chat-template",
        "--memory-in",
        mem,
        "--temperature",
        0.8,
        "--top-p",
        0.9,
    )
    assert code == 0 and out, err
    code, out, err = invoke("--model-path", package, "--use-mac", "--prompt", "x")
    assert code == 1 and err == f"Error: --use-mac: {package} is not a MAC model (model_type 'memory_llama')"


def test_cli_refuses_memory_for_a_plain_llama_and_bad_memory_files(tiny_teacher_dir, mac_dir, tmp_path):
    d = tiny_teacher_dir
    code, out, err = invoke("--model-path", d, "--update-rule", "surprise", "--prompt", "x")
    assert code == 1 and err == (
        "Error: --update-rule surprise: this model has no memory (model_type 'llama'); use "
        "--update-rule none, a MAC export or a package_model.py folder"
    )
    (tmp_path / "m.safetensors").write_bytes(b"")
    code, out, err = invoke("--model-path", d, "--memory-in", tmp_path / "m.safetensors", "--prompt", "x")
    assert code == 1 and err == (
        f"Error: --memory-in: {d} has no memory (model_type 'llama'); use a MAC export or a "
        "package_model.py folder"
    )
    code, out, err = invoke("--model-path", d, "--use-mac", "--prompt", "x")
    assert code == 1 and err == f"Error: --use-mac: {d} is not a MAC model (model_type 'llama')"
    code, out, err = invoke(
        "--model-path", d, "--prompt", "x", "--max-new-tokens", 3
    )  # no memory: plain generation
    assert code == 0 and out, err

    other = save_mac_folder(tiny_mac(seed=3), d, tmp_path / "other-mac")
    mem = tmp_path / "other.safetensors"
    assert (
        invoke(
            "--model-path",
            other,
            "--update-rule",
            "ema",
            "--prompt",
            "x",
            "--max-new-tokens",
            2,
            "--memory-out",
            mem,
        )[0]
        == 0
    )
    code, out, err = invoke("--model-path", mac_dir, "--memory-in", mem, "--prompt", "x")
    assert (
        code == 1
        and err.startswith(f"Error: {mem} was saved from a different model (fingerprint ")
        and "\n" not in err
    )
    code, out, err = invoke("--model-path", mac_dir)
    assert code == 1 and err == "Error: nothing to do: give --prompt, --prompts-file or --interactive"
    for flag in ("--memory-in", "--memory-out"):  # one line, before any model loads
        code, out, err = invoke("--model-path", mac_dir, flag, tmp_path, "--prompt", "x")
        assert code == 1 and err == f"Error: {flag} {tmp_path} is a folder; give a memory file (.safetensors)"
    code, out, err = invoke(
        "--model-path", mac_dir, "--memory-in", tmp_path / "missing.safetensors", "--prompt", "x"
    )
    assert code == 1 and err == (
        f"Error: --memory-in {tmp_path / 'missing.safetensors'} does not exist; give a file "
        "written with --memory-out or /save"
    )


def test_root_script_runs_the_command(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "no_vllm_inference.py"),
            "--model-path",
            str(tmp_path / "nope"),
            "--prompt",
            "x",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        == f"Error: --model-path {tmp_path / 'nope'} is not a model folder (no config.json)"
    )


# -------------------------------------------------------------------------------------------- whose code runs


def evil_folder(root: Path) -> tuple[Path, Path]:
    """A tiny Llama config whose auto_map points at model files that, once imported, write a sentinel file."""
    folder, sentinel = root / "evil", root / "sentinel"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": 64,
                "hidden_size": 8,
                "intermediate_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "auto_map": {
                    "AutoConfig": "configuration_evil.EvilConfig",
                    "AutoModelForCausalLM": "modeling_evil.EvilModel",
                },
            }
        )
    )
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (folder / name).write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    (folder / "model.safetensors").write_bytes(b"")  # quantize.py looks for weights before it loads anything
    return folder, sentinel


def refusal(folder, files) -> str:
    return (
        f"Error: {folder} carries its own model code ({', '.join(files)}) that differs from this "
        "titans-distil's; pass --trust-remote-code to run it"
    )


def cli_args(command: str, folder: Path, tmp_path: Path) -> tuple:
    """(click command, arguments) that load `folder`, for each command that takes a user's model folder."""
    from titans_distil.evaluate import evaluate_command
    from titans_distil.inspect_cli import inspect_model
    from titans_distil.quantize import quantize_command
    from titans_distil.recall import recall_experiment
    from titans_distil.serving import vllm_inference

    return {
        "no_vllm_inference": (
            no_vllm_inference,
            ["--model-path", folder, "--prompt", "x", "--max-new-tokens", 2],
        ),
        "vllm_inference": (vllm_inference, ["--model-path", folder, "--prompt", "x"]),
        "vllm_inference --serve": (vllm_inference, ["--model-path", folder, "--serve"]),
        "evaluate": (evaluate_command, [folder, "--blocks", 0, "--items", 1]),
        "recall_experiment": (recall_experiment, ["--model-path", folder, "--rules", "none"]),
        "quantize": (quantize_command, ["--model-path", folder, "--bits", 8, "--output", tmp_path / "q"]),
        "inspect_model verify": (inspect_model, ["verify", folder]),
    }[command]


@pytest.mark.parametrize(
    "command",
    [
        "no_vllm_inference",
        "vllm_inference",
        "vllm_inference --serve",
        "evaluate",
        "recall_experiment",
        "quantize",
        "inspect_model verify",
    ],
)
def test_foreign_model_code_is_refused_without_the_flag(tmp_path, command):
    folder, sentinel = evil_folder(tmp_path)
    cli, args = cli_args(command, folder, tmp_path)
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines()[-1] == refusal(
        folder, ["configuration_evil.py", "modeling_evil.py"]
    )
    assert not sentinel.exists() and not (tmp_path / "q").exists()
    assert trust_remote_code_for(folder, allow=True) is True  # --trust-remote-code: the user's call
    assert not sentinel.exists()


def test_a_folder_without_auto_map_runs_no_remote_code(tiny_teacher_dir):
    assert trust_remote_code_for(tiny_teacher_dir, allow=False) is False
    assert trust_remote_code_for(tiny_teacher_dir, allow=True) is False


def flip_one_byte(path: Path) -> None:
    """Change the case of the first letter of the file (in its docstring): still valid Python, other bytes."""
    data = bytearray(path.read_bytes())
    i = next(i for i, b in enumerate(data) if chr(b).isalpha())
    data[i] ^= 0x20
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def package_dir(tiny_teacher_dir, tmp_path_factory):
    return package_llama_with_memory(
        str(tiny_teacher_dir), tmp_path_factory.mktemp("trust") / "pkg", memory_slots=16, recent_slots=8
    )


@pytest.mark.parametrize(
    "kind, change",
    [
        ("mac", "modeling_mac_llama.py"),
        ("mac", "neural_memory.py"),
        ("mac", "extra.py"),
        ("memory", "modeling_memory_llama.py"),
        ("memory", "configuration_memory_llama.py"),
    ],
)
def test_project_folders_are_trusted_until_a_byte_of_their_code_changes(
    mac_dir, package_dir, tmp_path, kind, change
):
    folder = tmp_path / kind
    shutil.copytree(mac_dir if kind == "mac" else package_dir, folder)
    code, out, err = invoke(
        "--model-path", folder, "--prompt", "x", "--max-new-tokens", 2, "--no-chat-template"
    )
    assert code == 0 and out, err
    assert (
        err.splitlines().count(
            f"note: trusting {folder}: its model files are identical to titans-distil "
            f"{titans_distil.__version__}'s"
        )
        == 1
    ), err
    assert trust_remote_code_for(folder, allow=False) is True

    if change == "extra.py":
        (folder / change).write_text("x = 1\n")
    else:
        flip_one_byte(folder / change)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".py"))
    code, out, err = invoke(
        "--model-path", folder, "--prompt", "x", "--max-new-tokens", 2, "--no-chat-template"
    )
    assert code == 1 and err.splitlines()[-1] == refusal(folder, files)
    with pytest.raises(UserError, match="pass --trust-remote-code to run it"):
        trust_remote_code_for(folder, allow=False)
    code, out, err = invoke(
        "--model-path",
        folder,
        "--prompt",
        "x",
        "--max-new-tokens",
        2,
        "--no-chat-template",
        "--trust-remote-code",
    )
    assert code == 0 and out and "note: trusting" not in err, err
