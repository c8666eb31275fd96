"""The recall experiment (`recall_experiment.py`): does a memory file carry facts into a new session?

Procedure, for one model folder (a MAC export / run's `final/`, or a `package_model.py` wrapper) and each
update rule R (none, ema, surprise):

1. **Session 1** (a fresh model load): a short text of facts about a fictitious country (invented names the
model
   cannot know) is read `repeats` times with memory updates under rule R, nothing is generated, and the memory
   is saved with the model's own `save_memory` (a MAC model flushes its unfinished memory chunk into the
   file).
2. **Session 2** (another fresh model load, empty context): the memory file is loaded and each question is
asked on
   its own, starting from the loaded memory (questions do not see each other, and the memory is read-only
   while they are answered: update rule "none", so every question meets exactly the saved memory).

Measured per rule, against a **baseline** with no memory loaded (the model's initial memory: a MAC student's
initial fast weights, an empty wrapper memory):

- teacher-forced answer NLL: mean negative log-probability (nats per answer token, over all answer tokens) of
the
  correct answer tokens right after the question prompt, and the improvement over the baseline in nats;
- exact recall: the greedy answer (`max_new_tokens` tokens) contains the answer string (case-insensitive);
- fact-text NLL: nats per token of reading the session-1 text once more (read-only) in the new session, a
direct
  measure of what the memory holds, independent of the model's skill at answering questions.

A reference row reads the facts in the context instead (the fact text `repeats` times followed by the
question, one sequence, memory empty and read-only): what a perfect memory could give at best.

Prompts: with the chat template the facts are one user message and each question another conversation's user
turn, the answer following the assistant header; without it the facts are plain text and the question is
"Question: ...\\nAnswer:" with the answer after a space. Files are safetensors or JSON; nothing is ever
unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import torch

from .cli import POSITIVE, _quiet_libraries, load_dtype_option, trust_remote_code_option, user_errors
from .errors import UserError, translated
from .flags import option
from .generate import load_model, model_kind
from .model_folder import atomic_file, check_output_file, check_output_path
from .models.neural_memory import UPDATE_RULES

PLAIN_QUESTION = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class Fact:
    fact: str
    question: str
    answer: str


# a fictitious country: every name is invented, so the model cannot know the answers
DEFAULT_FACTS = (
    Fact("The capital of Quillara is Dravenholt.", "What is the capital of Quillara?", "Dravenholt"),
    Fact("The currency of Quillara is the zennet.", "What is the currency of Quillara?", "zennet"),
    Fact(
        "The national animal of Quillara is the marbok.", "What is the national animal of Quillara?", "marbok"
    ),
    Fact(
        "The longest river of Quillara is the Suvanne.", "What is the longest river of Quillara?", "Suvanne"
    ),
    Fact("Quillara was founded by Orrin Talvesk.", "Who founded Quillara?", "Orrin Talvesk"),
    Fact("Quillara was founded in the year 1487.", "In which year was Quillara founded?", "1487"),
    Fact(
        "The people of Quillara speak Veshtani.",
        "Which language do the people of Quillara speak?",
        "Veshtani",
    ),
    Fact(
        "The national dish of Quillara is plommet stew.",
        "What is the national dish of Quillara?",
        "plommet stew",
    ),
)


@dataclass
class Facts:
    """The session-1 text and the questions about it."""

    text: str
    items: tuple[Fact, ...]


def default_facts() -> Facts:
    return Facts(" ".join(f.fact for f in DEFAULT_FACTS), DEFAULT_FACTS)


# ----------------------------------------------------------------------------------------------- input


def parse_rules(text: str) -> tuple[str, ...]:
    """'none,ema,surprise' -> ('none', 'ema', 'surprise'); one-line `UserError` for unknown, repeated or no
    rules."""
    rules = [r.strip() for r in text.split(",") if r.strip()]
    choices = ", ".join(UPDATE_RULES)
    if not rules:
        raise UserError(f"--rules {text!r} names no update rule; give a comma-separated list of {choices}")
    for rule in rules:
        if rule not in UPDATE_RULES:
            raise UserError(f"--rules: unknown update rule {rule!r}; choose from {choices}")
        if rules.count(rule) > 1:
            raise UserError(f"--rules: {rule} is listed twice")
    return tuple(rules)


def read_facts(path) -> Facts:
    """A JSON file: a list of {"fact", "question", "answer"} objects (session 1 reads the facts joined by
    spaces), or {"text": "...", "facts": [{"question", "answer"}, ...]} (session 1 reads `text`; "fact" is
    then optional). Every answer must occur in what session 1 reads (case-insensitive), or the experiment
    would measure nothing."""
    shape = (
        'a non-empty list of {"fact", "question", "answer"} objects, or {"text": ..., "facts": '
        '[{"question", "answer"}, ...]}'
    )
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UserError(f"--facts {path} is a folder; give a JSON file")
    if not os.path.isfile(path):
        raise UserError(f"--facts {path} does not exist")
    with translated(f"--facts {path}", "save it as UTF-8 JSON", (OSError, UnicodeDecodeError)):
        raw = Path(path).read_bytes().decode("utf-8")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise UserError(f"--facts {path} is not valid JSON ({str(err).splitlines()[0]})") from None
    text = None
    if isinstance(data, dict):
        if set(data) - {"text", "facts"}:
            raise UserError(
                f"--facts {path}: unknown keys {sorted(set(data) - {'text', 'facts'})}; it must hold {shape}"
            )
        text, data = data.get("text"), data.get("facts")
        if text is not None and (not isinstance(text, str) or not text.strip()):
            raise UserError(f'--facts {path}: "text" must be a non-empty string')
    if not isinstance(data, list) or not data or not all(isinstance(item, dict) for item in data):
        raise UserError(f"--facts {path} must hold {shape}")
    items = []
    for n, item in enumerate(data, 1):
        needed = ("question", "answer") if text is not None else ("fact", "question", "answer")
        for key in needed:
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise UserError(f'--facts {path}: item {n} needs a non-empty string "{key}"')
        unknown = set(item) - {"fact", "question", "answer"}
        if unknown:
            raise UserError(f"--facts {path}: item {n} has unknown keys {sorted(unknown)}")
        items.append(Fact(item.get("fact", "").strip(), item["question"].strip(), item["answer"].strip()))
    if text is None:
        text = " ".join(f.fact for f in items)
    for n, item in enumerate(items, 1):
        if item.answer.lower() not in text.lower():
            raise UserError(
                f"--facts {path}: the answer {item.answer!r} of item {n} does not occur in the text session "
                "1 reads"
            )
    return Facts(text.strip(), tuple(items))


# ----------------------------------------------------------------------------------------------- token ids


def fact_ids(tokenizer, text: str, chat_template: bool) -> list[int]:
    """What session 1 reads once: the facts as a user message (chat template) or as plain text with a blank
    line."""
    if chat_template:
        templated = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
        return tokenizer(templated, add_special_tokens=False)["input_ids"]
    return tokenizer(text + "\n\n")["input_ids"]


def question_ids(tokenizer, question: str, chat_template: bool) -> list[int]:
    """A question as the first turn of a new session (as `Session.turn_ids` builds it)."""
    if chat_template:
        templated = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(templated, add_special_tokens=False)["input_ids"]
    return tokenizer(PLAIN_QUESTION.format(question=question))["input_ids"]


def answer_ids(tokenizer, answer: str, chat_template: bool) -> list[int]:
    """The correct answer's tokens right after the question prompt."""
    return tokenizer(answer if chat_template else " " + answer, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------- memory


def check_memory_model(model, model_path) -> str:
    kind = model_kind(model)
    if kind == "llama":
        raise UserError(
            f"--model-path {model_path} has no memory (model_type {model.config.model_type!r}); use a MAC "
            "export or a package_model.py folder"
        )
    return kind


def empty_memory(model):
    """The no-memory baseline's memory handle: a MAC student's initial memory (a fresh `MACCache`), a
    wrapper's emptied memory (None: its memory lives inside the model)."""
    if hasattr(model, "reset_memory"):
        model.reset_memory()
        return None
    return model.memory_cache()


@torch.no_grad()
def write_memory(model, blocks: list[list[int]], rule: str):
    """Session 1: read each block of token ids with memory updates under `rule`; returns the memory handle
    (see `empty_memory`). MAC: the blocks are one stream (one `MACCache`); wrapper: one sequence per block, as
    `Session` feeds turns."""
    handle = empty_memory(model)
    for ids in blocks:
        model(torch.tensor([ids], device=model.device), **_memory_kwargs(model, handle, rule, fresh=False))
    return handle


def short_text_warning(model, tokens: int, rules: tuple[str, ...]) -> str | None:
    """One line when session 1 writes too few tokens for part of the memory to change. A MAC model's
    `save_memory` flushes the unfinished chunk (even a text shorter than one chunk reaches the saved weights:
    nothing to say); a wrapper's keeps it pending, so with fewer tokens than one chunk its neural memory
    ("surprise") saves its initial weights, and only the key/value slots hold the text."""
    chunk = getattr(model.config, "memory_chunk_size", None)
    if not hasattr(model, "reset_memory") or "surprise" not in rules or not chunk or tokens >= chunk:
        return None
    return (
        f"warning: session 1 writes {tokens} tokens, fewer than one neural-memory chunk ({chunk}): under "
        f"surprise its fast weights are saved unchanged (only the key/value slots hold the facts); pass "
        f"--repeats {-(-chunk // max(tokens, 1))} or longer facts"
    )


def save_memory_file(model, handle, path) -> None:
    """The model's own `save_memory` (MAC: the cache's memory, flushed)."""
    model.save_memory(path, *(() if handle is None else (handle,)))


def load_memory_file(model, path):
    """The memory handle of a file written by `save_memory_file` for this model (`UserError` otherwise)."""
    try:
        return model.load_memory(path)  # MAC: a fresh MACCache; wrapper: None (loaded into the model)
    except ValueError as err:
        raise UserError(str(err)) from None


def _memory_kwargs(model, handle, rule: str = "none", fresh: bool = True) -> dict:
    """Forward / generate arguments that read the memory `handle` under `rule` ("none": without changing it).
    MAC: a fresh copy of the handle's cache (`fresh`) or the handle itself (a stream that continues)."""
    if handle is None:  # a wrapper: the memory is inside the model
        return (
            dict(use_memory=True, update_rule=rule)
            if fresh
            else dict(use_memory=True, update_rule=rule, use_cache=False)
        )
    return dict(
        past_key_values=model.memory_cache(handle) if fresh else handle, use_cache=True, update_rule=rule
    )


def _pad_id(model, tokenizer):
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    eos = model.generation_config.eos_token_id
    return eos[0] if isinstance(eos, list) else eos


# ----------------------------------------------------------------------------------------------- measuring


@torch.no_grad()
def score(
    model,
    tokenizer,
    facts: Facts,
    handle,
    chat_template: bool,
    max_new_tokens: int = 16,
    context: list[int] | None = None,
    text: list[int] | None = None,
) -> dict:
    """Ask every question on its own, starting from the memory `handle` (read-only), after `context` tokens
    (none by default). Per question: log p(answer tokens | prompt) teacher-forced, and the greedy answer. With
    `text` (the fact block's ids) also `text_nll`: nats per token of re-reading the block (after `context`)
    from that memory, a direct measure of what the memory holds that does not depend on answering
    questions."""
    device = model.device
    context = list(context or [])
    text_nll = None
    if text:
        ids = torch.tensor([context + list(text)], device=device)
        logits = model(ids, **_memory_kwargs(model, handle)).logits[0, len(context) : -1].float()
        targets = torch.tensor(text[1:], device=device)
        text_nll = -logits.log_softmax(-1).gather(-1, targets[:, None]).mean().item()
    rows = []
    for item in facts.items:
        prompt = context + question_ids(tokenizer, item.question, chat_template)
        answer = answer_ids(tokenizer, item.answer, chat_template)
        ids = torch.tensor([prompt + answer], device=device)
        logits = model(ids, **_memory_kwargs(model, handle)).logits[0, len(prompt) - 1 : -1].float()
        logp = logits.log_softmax(-1).gather(-1, torch.tensor(answer, device=device)[:, None])[:, 0]
        prompt_ids = torch.tensor([prompt], device=device)
        out = model.generate(
            prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=_pad_id(model, tokenizer),
            **_memory_kwargs(model, handle),
        )
        greedy = tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)
        rows.append(
            {
                "question": item.question,
                "answer": item.answer,
                "answer_tokens": len(answer),
                "logprob": logp.sum().item(),
                "greedy": greedy,
                "greedy_raw": tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=False),
                "recalled": item.answer.lower() in greedy.lower(),
            }
        )
    return summarize(rows, text_nll)


def summarize(rows: list[dict], text_nll: float | None = None) -> dict:
    tokens = sum(r["answer_tokens"] for r in rows)
    return {
        "nll": -sum(r["logprob"] for r in rows) / tokens,  # nats per answer token, over all answer tokens
        "text_nll": text_nll,
        "answer_logprob": sum(r["logprob"] for r in rows) / len(rows),  # mean log p(whole answer)
        "recalled": sum(r["recalled"] for r in rows),
        "questions": len(rows),
        "per_question": rows,
    }


def run(
    model_path: str,
    facts: Facts,
    rules: tuple[str, ...],
    repeats: int = 1,
    chat_template: bool | None = None,
    max_new_tokens: int = 16,
    memory_dir=None,
    dtype: str = "auto",
    log=print,
    trust_remote_code: bool = False,
) -> dict:
    """The whole experiment on one model folder (see the module docstring); returns the results as a dict."""
    start = time.perf_counter()
    model, tokenizer = load_model(model_path, dtype, trust_remote_code)
    kind = check_memory_model(model, model_path)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template and not has_template:
        raise UserError(f"--chat-template: the tokenizer of {model_path} has no chat template")
    chat_template = has_template if chat_template is None else chat_template
    block = fact_ids(tokenizer, facts.text, chat_template)
    blocks = [block] * repeats
    results = {
        "model_path": str(model_path),
        "model_kind": kind,
        "model_type": model.config.model_type,
        "chat_template": chat_template,
        "repeats": repeats,
        "max_new_tokens": max_new_tokens,
        "fact_tokens": len(block) * repeats,
        "text": facts.text,
        "facts": [asdict(f) for f in facts.items],
        "rules": {},
    }
    log(
        f"{model_path} ({kind}): {len(facts.items)} questions, session 1 reads {len(block)} tokens x "
        f"{repeats}"
    )
    warning = short_text_warning(model, len(block) * repeats, rules)
    if warning:
        log(warning)

    results["baseline"] = score(
        model, tokenizer, facts, empty_memory(model), chat_template, max_new_tokens, text=block
    )
    log(
        f"  no memory: NLL {results['baseline']['nll']:.3f}, recall "
        f"{results['baseline']['recalled']}/{len(facts.items)}, fact-text NLL "
        f"{results['baseline']['text_nll']:.3f}"
    )
    context = [t for b in blocks for t in b]
    results["in_context"] = score(
        model,
        tokenizer,
        facts,
        empty_memory(model),
        chat_template,
        max_new_tokens,
        context=context,
        text=block,
    )
    log(
        f"  facts in context: NLL {results['in_context']['nll']:.3f}, recall "
        f"{results['in_context']['recalled']}/{len(facts.items)}, fact-text NLL "
        f"{results['in_context']['text_nll']:.3f}"
    )
    del model

    with tempfile.TemporaryDirectory(prefix="recall-") as tmp:
        folder = Path(memory_dir) if memory_dir else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for rule in rules:
            path = folder / f"memory-{rule}.safetensors"
            writer, _ = load_model(model_path, dtype, trust_remote_code)  # session 1
            save_memory_file(writer, write_memory(writer, blocks, rule), path)
            del writer
            reader, _ = load_model(
                model_path, dtype, trust_remote_code
            )  # session 2: a new model, empty context
            result = score(
                reader,
                tokenizer,
                facts,
                load_memory_file(reader, path),
                chat_template,
                max_new_tokens,
                text=block,
            )
            del reader
            result["improvement"] = results["baseline"]["nll"] - result["nll"]
            result["memory_file"] = str(path) if memory_dir else None
            results["rules"][rule] = result
            log(
                f"  {rule}: NLL {result['nll']:.3f} ({result['improvement']:+.3f} nats vs no memory), "
                f"recall {result['recalled']}/{len(facts.items)}, fact-text NLL {result['text_nll']:.3f}"
            )
    results["seconds"] = time.perf_counter() - start
    return results


def markdown_table(all_results: list[dict]) -> str:
    """One row per model x condition: answer NLL, improvement over the no-memory baseline, exact recall."""
    lines = [
        "| model | rule | answer NLL (nats/token) | vs no memory (nats) | mean log p(answer) | exact recall "
        "| fact-text NLL (re-read) |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in all_results:
        name = f"{Path(res['model_path']).name} ({res['model_kind']})"
        base = res["baseline"]["nll"]
        rows = [("no memory (baseline)", res["baseline"])]
        rows += [(rule, r) for rule, r in res["rules"].items()]
        rows += [("facts in context (reference)", res["in_context"])]
        for label, r in rows:
            delta = base - r["nll"]
            lines.append(
                f"| {name} | {label} | {r['nll']:.3f} | {delta:+.3f} | {r['answer_logprob']:.2f} | "
                f"{r['recalled']}/{r['questions']} | {_number(r['text_nll'])} |"
            )
    return "\n".join(lines)


def _number(value) -> str:
    return "" if value is None else f"{value:.3f}"


# ----------------------------------------------------------------------------------------------- command


@click.command(
    name="recall_experiment.py",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@option(
    "--model-path",
    "model_paths",
    required=True,
    multiple=True,
    type=click.Path(),
    help="A MAC export / run's final folder, or a package_model.py folder (repeat for several models).",
)
@click.option(
    "--rules",
    default=",".join(UPDATE_RULES),
    show_default=True,
    help="Memory update rules of session 1, comma-separated.",
)
@click.option(
    "--repeats", type=POSITIVE, default=1, show_default=True, help="Times session 1 reads the facts."
)
@click.option(
    "--facts",
    "facts_file",
    type=click.Path(),
    default=None,
    help='JSON facts: [{"fact", "question", "answer"}, ...] or '
    '{"text": ..., "facts": [{"question", "answer"}, ...]}. '
    "[default: 8 facts about the fictitious country Quillara]",
)
@click.option(
    "--chat-template/--no-chat-template",
    default=None,
    help="Wrap facts and questions in the tokenizer's chat template. [default: on when the tokenizer "
    "has one]",
)
@option(
    "--max-new-tokens",
    type=POSITIVE,
    default=16,
    show_default=True,
    help="Greedy answer length for exact recall.",
)
@click.option(
    "--memory-dir",
    type=click.Path(),
    default=None,
    help="Keep the session-1 memory files here (memory-<rule>.safetensors). [default: a temporary folder]",
)
@click.option(
    "--output",
    type=click.Path(),
    default=None,
    help="Write all results (per question too) to this JSON file.",
)
@click.option("--show-answers", is_flag=True, help="Also print every greedy answer.")
@load_dtype_option
@trust_remote_code_option
@user_errors
def recall_experiment(
    model_paths,
    rules,
    repeats,
    facts_file,
    chat_template,
    max_new_tokens,
    memory_dir,
    output,
    show_answers,
    dtype,
    trust_remote_code,
):
    """Recall experiment: facts read with memory updates in session 1 are saved to a memory file; a new
    session (new model load, empty context) loads the file and answers one question per fact.

    \b
    For each update rule (none, ema, surprise) it reports the teacher-forced NLL of the correct answers (nats
    per answer token) and its improvement over a baseline with no memory loaded, and the exact-recall rate
    (the greedy answer contains the answer, case-insensitive), and the NLL of re-reading the facts text from
    the memory. The questions read the loaded memory without updating it; a
    reference row puts the facts in the context instead. The default facts describe the invented country
    Quillara.

    \b
    Examples:
      python recall_experiment.py --model-path packaged/smol-memory
      python recall_experiment.py --model-path exports/demo-mac --rules ema,surprise --repeats 3
      --no-chat-template python recall_experiment.py --model-path exports/demo-mac --model-path
      packaged/smol-memory --output recall.json python recall_experiment.py --model-path packaged/smol-memory
      --facts my_facts.json --show-answers
    """
    _quiet_libraries()
    rule_list = parse_rules(rules)
    facts = read_facts(facts_file) if facts_file else default_facts()
    if output and Path(output).is_dir():
        raise UserError(f"--output {output} is a folder; give a .json file name")
    if output:
        check_output_file(output)  # under a file, in a read-only folder: before any model loads
    if memory_dir and Path(memory_dir).exists() and not Path(memory_dir).is_dir():
        raise UserError(f"--memory-dir {memory_dir} is a file; give a folder")
    if memory_dir:
        check_output_path(memory_dir, "--memory-dir", container=True)
    if memory_dir and len(model_paths) > 1:
        raise UserError("--memory-dir keeps the files of one model; give one --model-path with it")
    all_results = []
    for path in model_paths:
        all_results.append(
            run(
                path,
                facts,
                rule_list,
                repeats,
                chat_template,
                max_new_tokens,
                memory_dir,
                dtype,
                log=lambda line: click.echo(line, err=True),
                trust_remote_code=trust_remote_code,
            )
        )
    if show_answers:
        for res in all_results:
            conditions = [
                ("no memory", res["baseline"]),
                *res["rules"].items(),
                ("in context", res["in_context"]),
            ]
            for label, r in conditions:
                for q in r["per_question"]:
                    mark = "+" if q["recalled"] else "-"
                    click.echo(
                        f"{mark} [{Path(res['model_path']).name} {label}] {q['question']} -> "
                        f"{q['greedy_raw']!r}"
                    )
    click.echo(markdown_table(all_results))
    if output:
        with atomic_file(output) as tmp:
            tmp.write_text(json.dumps({"results": all_results}, indent=2, allow_nan=False) + "\n")
        click.echo(f"results written to {output}", err=True)


__all__ = [
    "DEFAULT_FACTS",
    "Fact",
    "Facts",
    "answer_ids",
    "default_facts",
    "empty_memory",
    "fact_ids",
    "load_memory_file",
    "markdown_table",
    "parse_rules",
    "question_ids",
    "read_facts",
    "recall_experiment",
    "run",
    "save_memory_file",
    "short_text_warning",
    "score",
    "write_memory",
]
