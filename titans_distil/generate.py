"""Generation with transformers (no vLLM) and a per-user memory: `no_vllm_inference.py`.

Three kinds of model folder are served:

* **MAC** (`model_type: mac_llama`, an `export_mac_model.py` folder or a run's `final/`): the Titans memory
lives
  in the `MACCache` that carries the stream through `generate()`. A *session* is one stream: it starts at
  position 0 with a fresh `MACCache` whose memory layers are seeded from a memory file (or the model's initial
  memory), and every prompt and generated token of the session passes through the cache (turns continue the
  same stream). Memory files go through the model's own `save_memory(path, cache)` / `load_memory(path)`
  (shipped in the export, `modeling_mac_llama.py`): per memory layer the fast-weight state after the session,
  flushed (the unfinished chunk's written rows are applied), and metadata with a model fingerprint; a later
  session seeded from it retrieves from exactly that state.
* **Packaged wrapper** (`model_type: memory_llama`, `package_model.py`): its memory lives in the model and
persists
  across `generate()` calls; files go through its own `save_memory` / `load_memory`.
* **Plain Llama**: no memory (only `--update-rule none`, no memory files).

Memory files are safetensors (`memory_file.py`, one format for both kinds) and are never unpickled.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import click
import torch

from .cli import (
    _quiet_libraries,
    finite,
    load_dtype_option,
    max_new_tokens_option,
    read_prompts_file,
    trust_remote_code_option,
    user_errors,
)
from .errors import UserError, describe, write_error
from .flags import option
from .model_folder import (
    check_output_file,
    check_tokenizer_fits,
    first_line,
    kind_of,
    read_config,
    trust_remote_code_for,
)
from .model_folder import load_model as load_folder
from .models.neural_memory import UPDATE_RULES

QUIT_WORDS = ("", "/quit", "/exit", "quit", "exit")  # and EOF (Ctrl-D): how --interactive is left


# ----------------------------------------------------------------------------------------------- loading


def model_kind(model) -> str:
    """'mac', 'memory' (packaged wrapper) or 'llama' (anything else: no memory)."""
    kind = kind_of(model.config)
    if kind == "mac" or (kind == "memory" and hasattr(model, "load_memory")):
        return kind
    return "llama"


def load_model(path: str, dtype: str = "auto", trust_remote_code: bool = False):
    """(model, tokenizer) from a model folder; a MAC folder without `auto_map` (a run's checkpoint, an older
    run's `final/`) is loaded with the project's own classes. The folder's own code runs only as
    `trust_remote_code_for` decides (the flag, or files identical to the shipped ones)."""
    from transformers import AutoTokenizer

    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"--model-path {path} is not a model folder (no config.json)")
    config = read_config(folder)
    kwargs = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
    trust = trust_remote_code_for(folder, trust_remote_code, config)
    try:
        model = load_folder(folder, config, trust_remote_code=trust_remote_code, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
    except UserError:
        raise
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load {path}: {first_line(err)}") from None
    check_tokenizer_fits(tokenizer, model.config.vocab_size, path)
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------------------------- sessions


@dataclass
class Session:
    """One user's stream: the tokens fed so far, the generation cache and (MAC) the memory inside it."""

    model: object
    tokenizer: object
    update_rule: str = "none"
    chat_template: bool = False
    kind: str = field(init=False)
    ids: list = field(default_factory=list)
    cache: object = None
    seed: object = None  # MAC: the never-fed MACCache the session's streams start from (None: initial memory)
    history: list = field(default_factory=list)
    fed_text: str = ""

    def __post_init__(self):
        self.kind = model_kind(self.model)
        if self.kind == "llama" and self.update_rule != "none":
            raise UserError(
                f"--update-rule {self.update_rule}: this model has no memory (model_type "
                f"{self.model.config.model_type!r}); use --update-rule none, a MAC export or a "
                "package_model.py folder"
            )
        self.reset()

    # -- memory (the models' own save_memory / load_memory: a MAC memory lives in the cache, a wrapper's in
    # the model)

    def reset(self, keep_seed: bool = False) -> None:
        """Start a new stream; the memory goes back to the seed (keep_seed) or to empty."""
        if not keep_seed:
            self.seed = None
            if self.kind == "memory":
                self.model.reset_memory()
        self.ids, self.history, self.fed_text = [], [], ""
        self.cache = self.model.memory_cache(self.seed) if self.kind == "mac" else None

    def load_memory(self, path) -> None:
        if self.kind == "llama":
            raise UserError(
                f"--memory-in {path}: this model has no memory (model_type {self.model.config.model_type!r})"
            )
        try:
            self.seed = self.model.load_memory(
                path
            )  # MAC: a fresh cache; wrapper: None (loaded into the model)
        except ValueError as err:
            raise UserError(str(err)) from None
        self.reset(keep_seed=True)

    def save_memory(self, path) -> None:
        """The memory after every token of the session; MAC: flushed (the file's weights hold every token
        written, and a session from it starts a new chunk), the live session is not changed."""
        if self.kind == "llama":
            raise UserError(
                f"cannot save {path}: this model has no memory (model_type {self.model.config.model_type!r})"
            )
        try:
            self.model.save_memory(path, *((self.cache,) if self.kind == "mac" else ()))
        except (OSError, ValueError) as err:
            raise UserError(f"cannot save {path}: {first_line(err)}") from None
        except Exception as err:  # safetensors reports a full disk in its own type
            if not write_error(err):
                raise
            raise UserError(f"cannot save {path}: {describe(err)}") from None

    # -- prompts

    def turn_ids(self, prompt: str) -> list[int]:
        """Tokens that continue the stream with a new user turn."""
        tok = self.tokenizer
        if self.chat_template:
            messages = self.history + [{"role": "user", "content": prompt}]
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            previous = tok.apply_chat_template(self.history, tokenize=False) if self.history else ""
            for prefix in (self.fed_text, previous):
                if prefix and text.startswith(prefix):
                    text = text[len(prefix) :]
                    break
            self.history = messages
            self.fed_text += text
            return tok(text, add_special_tokens=False)["input_ids"]
        if not self.ids:
            self.fed_text += prompt
            return tok(prompt)["input_ids"]
        text = prompt if self.fed_text[-1:].isspace() else "\n" + prompt
        self.fed_text += text
        return tok(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def generate(
        self, prompt: str, max_new_tokens: int, streamer=None, do_sample=False, temperature=1.0, top_p=1.0
    ) -> str:
        new = self.turn_ids(prompt)
        if self.kind == "memory":  # the memory carries the earlier turns; the model sees this turn only
            ids, past = new, None
        else:
            ids, past = self.ids + new, self.cache
        self.check_length(len(ids), max_new_tokens)
        if self.kind == "llama" and past is None:
            from transformers import DynamicCache

            past = self.cache = DynamicCache(config=self.model.config)
        input_ids = torch.tensor([ids], device=self.model.device)
        kwargs = dict(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            streamer=streamer,
            attention_mask=torch.ones_like(input_ids),
            pad_token_id=self._pad_id(),
        )
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.kind == "mac":
            kwargs.update(update_rule=self.update_rule, past_key_values=past)
        elif self.kind == "memory":
            kwargs.update(use_memory=True, update_rule=self.update_rule)
        else:
            kwargs.update(past_key_values=past)
        out = self.model.generate(input_ids, **kwargs)[0].tolist()
        generated = out[len(ids) :]
        if self.kind == "mac" and generated:
            # generate() never feeds its last token back; feed it so the memory (and the stream) hold every
            # token
            self.model(
                torch.tensor([generated[-1:]], device=self.model.device),
                past_key_values=self.cache,
                use_cache=True,
                update_rule=self.update_rule,
            )
        self.ids = out if self.kind != "memory" else []
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        self.fed_text += self.tokenizer.decode(generated, skip_special_tokens=False)
        if self.chat_template:
            self.history = self.history + [{"role": "assistant", "content": text}]
        return text

    def positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def check_length(self, tokens: int, max_new_tokens: int) -> None:
        """The stream (`tokens` so far, this turn's prompt included) plus `max_new_tokens` must fit the
        model's positions (max_position_embeddings): a MAC model too, whose rotary positions count the whole
        stream."""
        limit = self.positions()
        if limit and tokens + max_new_tokens > limit:
            room = max(limit - tokens, 0)
            what = "the prompt" if not self.ids or self.kind == "memory" else "the conversation"
            raise UserError(
                f"--max-new-tokens {max_new_tokens}: {what} ({tokens} tokens) + {max_new_tokens} new "
                f"exceeds the model's {limit} positions (max_position_embeddings); pass --max-new-tokens "
                f"{room} or less" + ("" if what == "the prompt" else ", or /reset")
            )

    def _pad_id(self):
        tok = self.tokenizer
        if tok.pad_token_id is not None:
            return tok.pad_token_id
        eos = self.model.generation_config.eos_token_id
        return eos[0] if isinstance(eos, list) else eos


# ----------------------------------------------------------------------------------------------- command


@click.command(
    name="no_vllm_inference.py",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@option(
    "--model-path",
    "model_path",
    required=True,
    type=click.Path(file_okay=False),
    help="A MAC export / run's final folder, a package_model.py folder or a plain Llama folder.",
)
@option("--use-mac", "use_mac", is_flag=True, help="Require a MAC (Titans memory) model.")
@click.option(
    "--update-rule",
    type=click.Choice(UPDATE_RULES),
    default="none",
    show_default=True,
    help="Memory update while reading the prompt and generating (none: read only).",
)
@click.option("--prompt", default=None, help="Prompt (the first turn of the session).")
@click.option(
    "--prompts-file",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="A text file of prompts, one per non-empty line: further turns of the same session.",
)
@max_new_tokens_option
@click.option(
    "--temperature",
    type=finite(min=0.0),
    default=None,
    help="Sample with this temperature (default: greedy).",
)
@click.option(
    "--top-p", type=finite(0.0, 1.0, min_open=True), default=None, help="Nucleus sampling (implies sampling)."
)
@click.option(
    "--chat-template/--no-chat-template",
    default=None,
    help="Wrap prompts in the tokenizer's chat template. [default: on when the tokenizer has one]",
)
@click.option(
    "--interactive",
    is_flag=True,
    help="Chat on stdin: /reset clears the memory, /save FILE writes it; "
    "/quit, /exit, quit, exit, an empty line or Ctrl-D (EOF) leaves.",
)
@click.option("--memory-in", type=click.Path(), default=None, help="Start from this memory file.")
@click.option(
    "--memory-out", type=click.Path(), default=None, help="Write the memory here after the session."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (sampling).")
@load_dtype_option
@trust_remote_code_option
@user_errors
def no_vllm_inference(
    model_path,
    use_mac,
    update_rule,
    prompt,
    prompts_file,
    max_tokens,
    temperature,
    top_p,
    chat_template,
    interactive,
    memory_in,
    memory_out,
    seed,
    dtype,
    trust_remote_code,
):
    """Generate with transformers, carrying a per-user memory through prompts and generated tokens.

    \b
    Examples:
      python no_vllm_inference.py --model-path exports/demo-mac --use-mac --update-rule surprise --prompt "def
      f(x):" python no_vllm_inference.py --model-path exports/demo-mac --prompts-file notes.txt --update-rule
      surprise --memory-out alice.safetensors python no_vllm_inference.py --model-path exports/demo-mac
      --memory-in alice.safetensors --interactive python no_vllm_inference.py --model-path
      packaged/smol-memory --update-rule ema --temperature 0.7 --top-p 0.9 --prompt "Hi"
    """
    _quiet_libraries()
    prompts = [prompt] if prompt is not None else []
    if prompts_file:
        prompts += read_prompts_file(prompts_file)
    if not prompts and not interactive:
        raise UserError("nothing to do: give --prompt, --prompts-file or --interactive")
    for flag, path in (("--memory-in", memory_in), ("--memory-out", memory_out)):
        if path and Path(path).is_dir():
            raise UserError(f"{flag} {path} is a folder; give a memory file (.safetensors)")
    if memory_in and not Path(memory_in).is_file():
        raise UserError(
            f"--memory-in {memory_in} does not exist; give a file written with --memory-out or /save"
        )
    if memory_out:
        check_output_file(memory_out, "--memory-out")  # before the model loads and the session runs
    from transformers import TextStreamer, set_seed

    model, tokenizer = load_model(model_path, dtype, trust_remote_code)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and max_tokens >= limit:
        raise UserError(
            f"--max-new-tokens {max_tokens} exceeds what {model_path} can hold: {limit} positions "
            f"(max_position_embeddings) minus the prompt; pass --max-new-tokens {limit - 1} or less"
        )
    kind = model_kind(model)
    if use_mac and kind != "mac":
        raise UserError(
            f"--use-mac: {model_path} is not a MAC model (model_type {model.config.model_type!r})"
        )
    if kind == "llama" and (memory_in or memory_out):
        flag = "--memory-in" if memory_in else "--memory-out"
        raise UserError(
            f"{flag}: {model_path} has no memory (model_type {model.config.model_type!r}); "
            "use a MAC export or a package_model.py folder"
        )
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template and not has_template:
        raise UserError(f"--chat-template: the tokenizer of {model_path} has no chat template")
    session = Session(
        model,
        tokenizer,
        update_rule=update_rule,
        chat_template=has_template if chat_template is None else chat_template,
    )
    if memory_in:
        session.load_memory(memory_in)
    set_seed(seed)
    sample = temperature is not None or top_p is not None
    if temperature == 0:
        sample = False
    options = dict(do_sample=sample, temperature=temperature if temperature else 1.0, top_p=top_p or 1.0)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    for text in prompts:
        if interactive or len(prompts) > 1:
            click.echo(f"> {text}")
        session.generate(text, max_tokens, streamer=streamer, **options)
    if interactive:
        click.echo(
            "(interactive: /reset clears the memory, /save FILE writes it; /quit, an empty line or Ctrl-D "
            "leaves)",
            err=True,
        )
        while True:
            click.echo("> ", nl=False, err=True)
            line = sys.stdin.readline()
            if not line or line.strip() in QUIT_WORDS:
                break
            line = line.strip()
            if line == "/reset":
                session.reset()
                click.echo("(memory cleared)", err=True)
                continue
            if line.startswith("/save"):
                target = line[len("/save") :].strip()
                if not target:
                    click.echo("usage: /save FILE", err=True)
                    continue
                try:  # a failed /save is reported and the session goes on
                    check_output_file(target, "/save")
                    session.save_memory(target)
                    click.echo(f"(memory saved to {target})", err=True)
                except UserError as err:
                    click.echo(f"Error: {err}", err=True)
                continue
            try:  # a turn too long for the model is reported and the session goes on
                session.generate(line, max_tokens, streamer=streamer, **options)
            except UserError as err:
                click.echo(f"Error: {err}", err=True)
    if memory_out:
        session.save_memory(memory_out)
        click.echo(f"memory saved to {memory_out}", err=True)
