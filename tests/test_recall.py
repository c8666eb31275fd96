"""`recall_experiment.py`: facts written to a memory file in one session, questions asked in a new session
that loads it. Tiny models with the real tokenizer (MAC student and packaged wrapper); nothing is
downloaded."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny_models import save_mac_folder, tiny_mac

from titans_distil.errors import UserError
from titans_distil.generate import load_model
from titans_distil.package import package_llama_with_memory
from titans_distil.recall import (
    DEFAULT_FACTS,
    Fact,
    Facts,
    empty_memory,
    fact_ids,
    load_memory_file,
    parse_rules,
    read_facts,
    recall_experiment,
    run,
    save_memory_file,
    score,
    write_memory,
)

ROOT = Path(__file__).resolve().parents[1]
# three of the default facts keep the tests short
FACTS = Facts(" ".join(f.fact for f in DEFAULT_FACTS[:3]), DEFAULT_FACTS[:3])

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mac_dir(tiny_teacher_dir, tmp_path_factory):
    return save_mac_folder(tiny_mac(), tiny_teacher_dir, tmp_path_factory.mktemp("recall") / "tiny-mac")


@pytest.fixture(scope="module")
def wrapper_dir(tiny_teacher_dir, tmp_path_factory):
    return package_llama_with_memory(
        str(tiny_teacher_dir),
        tmp_path_factory.mktemp("recall") / "tiny-pkg",
        memory_slots=64,
        recent_slots=32,
    )


def invoke(*args):
    result = CliRunner().invoke(recall_experiment, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout.strip(), result.stderr.strip()


def logprobs(result):
    return [q["logprob"] for q in result["per_question"]]


@pytest.mark.parametrize(
    "kind, rule", [("mac", "surprise"), ("mac", "ema"), ("memory", "ema"), ("memory", "surprise")]
)
def test_fresh_session_with_the_memory_file_scores_exactly_like_the_writing_session(
    mac_dir, wrapper_dir, tmp_path, kind, rule
):
    folder = mac_dir if kind == "mac" else wrapper_dir
    model, tokenizer = load_model(str(folder))
    block = fact_ids(tokenizer, FACTS.text, chat_template=False)
    baseline = score(
        model, tokenizer, FACTS, empty_memory(model), chat_template=False, max_new_tokens=3, text=block
    )
    handle = write_memory(model, [block, block], rule)
    # in the writing session, context empty: the questions read only the memory
    same_session = score(model, tokenizer, FACTS, handle, chat_template=False, max_new_tokens=3, text=block)
    save_memory_file(model, handle, tmp_path / "m.safetensors")

    fresh, _ = load_model(str(folder))  # a new model: nothing carried over but the file
    loaded = score(
        fresh,
        tokenizer,
        FACTS,
        load_memory_file(fresh, tmp_path / "m.safetensors"),
        chat_template=False,
        max_new_tokens=3,
        text=block,
    )
    assert loaded == same_session  # every log-probability, greedy answer and the re-read text's NLL, exactly
    # the memory changed the scores (a random tiny model's are near-uniform: the differences are small but
    # real)
    assert (
        abs(loaded["nll"] - baseline["nll"]) > 1e-5 and abs(loaded["text_nll"] - baseline["text_nll"]) > 1e-5
    )


@pytest.mark.parametrize("kind", ["mac", "memory"])
def test_run_rule_none_equals_the_no_memory_baseline_exactly(mac_dir, wrapper_dir, tmp_path, kind):
    folder = mac_dir if kind == "mac" else wrapper_dir
    results = run(
        str(folder),
        FACTS,
        ("none", "surprise"),
        repeats=2,
        chat_template=False,
        max_new_tokens=2,
        memory_dir=tmp_path,
        log=lambda line: None,
    )
    assert results["model_kind"] == kind and results["repeats"] == 2
    none, surprise, base = results["rules"]["none"], results["rules"]["surprise"], results["baseline"]
    assert logprobs(none) == logprobs(base) and none["improvement"] == 0.0
    assert [q["greedy"] for q in none["per_question"]] == [q["greedy"] for q in base["per_question"]]
    assert logprobs(surprise) != logprobs(base)
    assert (tmp_path / "memory-surprise.safetensors").is_file() and surprise["memory_file"] == str(
        tmp_path / "memory-surprise.safetensors"
    )
    assert none["text_nll"] == base["text_nll"] and surprise["text_nll"] != base["text_nll"]
    assert results["in_context"]["nll"] != base["nll"]


def test_cli_prints_the_table_and_writes_json(mac_dir, tmp_path):
    facts = tmp_path / "facts.json"
    facts.write_text(
        json.dumps(
            {
                "text": "Zorbel lives in Pim. Pim lies on the Grun.",
                "facts": [
                    {"question": "Where does Zorbel live?", "answer": "Pim"},
                    {"question": "Which river is Pim on?", "answer": "Grun"},
                ],
            }
        )
    )
    out = tmp_path / "sub" / "results.json"
    code, stdout, stderr = invoke(
        "--model-path",
        mac_dir,
        "--rules",
        "none,ema",
        "--facts",
        facts,
        "--no-chat-template",
        "--max-new-tokens",
        2,
        "--output",
        out,
    )
    assert code == 0, stderr
    data = json.loads(out.read_text())["results"][0]
    assert list(data["rules"]) == ["none", "ema"] and data["baseline"]["questions"] == 2
    assert stdout.splitlines()[0].startswith("| model | rule | answer NLL")
    name = "tiny-mac (mac)"
    base = data["baseline"]["nll"]
    assert f"| {name} | no memory (baseline) | {base:.3f} | +0.000 |" in stdout
    assert f"| {name} | none | {base:.3f} | +0.000 |" in stdout
    ema = data["rules"]["ema"]
    assert (
        f"| {name} | ema | {ema['nll']:.3f} | {base - ema['nll']:+.3f} | {ema['answer_logprob']:.2f} | "
        f"{ema['recalled']}/2 |" in stdout
    )
    assert f"results written to {out}" in stderr


def test_facts_shorter_than_one_memory_chunk(mac_dir, wrapper_dir, tmp_path, tiny_teacher_dir):
    """A MAC model's save_memory flushes the unfinished chunk: a fact text shorter than one chunk (and one
    segment) still reaches the saved memory, and nothing is said. A wrapper keeps it pending: one warning
    line."""
    short = Facts("Ulm has a zorp.", (Fact("Ulm has a zorp.", "What has Ulm?", "zorp"),))
    short_mac = save_mac_folder(tiny_mac(memory_chunk_size=16), tiny_teacher_dir, tmp_path / "mac16")
    wide = tmp_path / "wrapper-wide-chunk"
    shutil.copytree(wrapper_dir, wide)
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "memory_chunk_size": 64}))
    for folder, warned in ((short_mac, False), (wide, True)):
        lines = []
        results = run(
            str(folder), short, ("surprise",), chat_template=False, max_new_tokens=1, log=lines.append
        )
        tokens = results["fact_tokens"]
        assert tokens < 16, tokens
        warnings = [line for line in lines if line.startswith("warning:")]
        if warned:
            assert warnings == [
                f"warning: session 1 writes {tokens} tokens, fewer than one neural-memory chunk (64): under "
                f"surprise its fast weights are saved unchanged (only the key/value slots hold the facts); "
                f"pass --repeats {-(-64 // tokens)} or longer facts"
            ]
        else:
            assert warnings == [], lines
        # the memory was written either way (MAC: the flushed chunk; wrapper: its key/value slots)
        assert results["rules"]["surprise"]["text_nll"] != results["baseline"]["text_nll"], folder


def test_facts_files(tmp_path):
    path = tmp_path / "f.json"
    path.write_text(
        json.dumps([{"fact": "Ulm has a zorp.", "question": "What does Ulm have?", "answer": "Zorp"}])
    )
    facts = read_facts(path)
    assert facts.text == "Ulm has a zorp." and facts.items[0].answer == "Zorp"

    def error(content):
        path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
        with pytest.raises(UserError) as err:
            read_facts(path)
        return str(err.value)

    shape = (
        'a non-empty list of {"fact", "question", "answer"} objects, or {"text": ..., "facts": '
        '[{"question", "answer"}, ...]}'
    )
    assert error(b"\x80\x04K\x01.") == (  # a pickle is never unpickled: its bytes are not even UTF-8
        f"--facts {path}: not UTF-8 text (byte 0x80 at offset 0); save it as UTF-8 JSON"
    )
    assert error(b"[{'fact': 1}]").startswith(f"--facts {path} is not valid JSON (")
    assert error([]) == f"--facts {path} must hold {shape}"
    assert error({"facts": [{"question": "q", "answer": "a"}], "extra": 1}) == (
        f"--facts {path}: unknown keys ['extra']; it must hold {shape}"
    )
    assert (
        error([{"fact": "A b.", "question": "q?"}])
        == f'--facts {path}: item 1 needs a non-empty string "answer"'
    )
    assert error({"text": "A b.", "facts": [{"question": "q?", "answer": "b", "hint": "x"}]}) == (
        f"--facts {path}: item 1 has unknown keys ['hint']"
    )
    assert error(
        [
            {"fact": "Ulm has a zorp.", "question": "q?", "answer": "Zorp"},
            {"fact": "Pim is wet.", "question": "q?", "answer": "dry"},
        ]
    ) == (f"--facts {path}: the answer 'dry' of item 2 does not occur in the text session 1 reads")
    with pytest.raises(UserError, match=r"^--facts .*nope\.json does not exist$"):
        read_facts(tmp_path / "nope.json")


def test_bad_input_is_one_line_error(tiny_teacher_dir, mac_dir, tmp_path):
    assert parse_rules(" ema , none") == ("ema", "none")
    cases = [
        (
            ["--rules", "ema,bogus"],
            "Error: --rules: unknown update rule 'bogus'; choose from surprise, none, ema",
        ),
        (["--rules", "ema,ema"], "Error: --rules: ema is listed twice"),
        (
            ["--rules", " , "],
            "Error: --rules ' , ' names no update rule; give a comma-separated list of surprise, none, ema",
        ),
        (["--facts", tmp_path / "nope.json"], f"Error: --facts {tmp_path / 'nope.json'} does not exist"),
        (["--output", tmp_path], f"Error: --output {tmp_path} is a folder; give a .json file name"),
        (["--facts", tmp_path], f"Error: --facts {tmp_path} is a folder; give a JSON file"),
        (["--memory-dir", Path(__file__)], f"Error: --memory-dir {Path(__file__)} is a file; give a folder"),
        (
            ["--memory-dir", tmp_path / "m", "--model-path", mac_dir],
            "Error: --memory-dir keeps the files of one model; give one --model-path with it",
        ),
    ]
    for args, message in cases:
        code, out, err = invoke("--model-path", mac_dir, *args)
        assert (code, err) == (1, message)
    code, out, err = invoke("--model-path", tiny_teacher_dir)
    assert (code, err) == (
        1,
        f"Error: --model-path {tiny_teacher_dir} has no memory (model_type 'llama'); use a MAC "
        "export or a package_model.py folder",
    )
    for missing in (tmp_path / "missing", Path(__file__)):
        code, out, err = invoke("--model-path", missing)
        assert (code, err) == (1, f"Error: --model-path {missing} is not a model folder (no config.json)")


def test_root_script(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "recall_experiment.py"),
            "--model-path",
            str(tmp_path),
            "--rules",
            "forget",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert (proc.returncode, proc.stderr.strip()) == (
        1,
        "Error: --rules: unknown update rule 'forget'; choose from surprise, none, ema",
    )
