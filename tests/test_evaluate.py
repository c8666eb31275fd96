"""`evaluate.py` / `titans-distil eval`: perplexity by position bucket and recall against direct computations,
the memory-off rows really running update rule none, the command end to end and its bad-input messages. Tiny
models with the real tokenizer; nothing is downloaded."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from tiny_models import save_mac_folder, tiny_mac
from transformers import AutoTokenizer, LlamaForCausalLM

from titans_distil.commands import main
from titans_distil.data import load_blocks
from titans_distil.evaluate import (
    Variant,
    evaluate_command,
    load_any,
    perplexity,
    position_buckets,
    recall,
    variants,
)
from titans_distil.long_range import make_items
from titans_distil.package import package_llama_with_memory

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher_dir):
    return AutoTokenizer.from_pretrained(tiny_teacher_dir)


@pytest.fixture(scope="module")
def llama(tiny_teacher_dir):
    return LlamaForCausalLM.from_pretrained(tiny_teacher_dir).eval()


@pytest.fixture(scope="module")
def mac_dir(tiny_teacher_dir, tmp_path_factory):
    return save_mac_folder(tiny_mac(), tiny_teacher_dir, tmp_path_factory.mktemp("eval") / "tiny-mac")


@pytest.fixture(scope="module")
def code_filler(tokenizer, small_corpus):
    return load_blocks(
        str(small_corpus), tokenizer, 128, "validation", validation_fraction=0.2, use_cache=False
    ).reshape(-1)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """The data cache of the command goes to a temporary folder, not the user's."""
    monkeypatch.setenv("TITANS_DISTIL_CACHE", str(tmp_path / "cache"))


def invoke(command, *args):
    result = CliRunner().invoke(command, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr.strip()


def test_position_buckets():
    assert [b[0] for b in position_buckets(4096)] == ["0-256", "256-1K", "1K-2K", "2K-4K"]
    assert position_buckets(2048)[-1] == ("1K-2K", 1024, 2048)
    assert position_buckets(600) == [("0-256", 0, 256), ("256-1K", 256, 600)]  # cut at the context
    assert position_buckets(256) == [("0-256", 0, 256)]  # buckets beyond the context are left out


@torch.no_grad()
def test_perplexity_buckets_equal_a_direct_computation(llama, code_filler):
    blocks = code_filler[: 2 * 300].view(2, 300)
    result = perplexity(Variant("tiny", llama, "llama"), blocks)
    logits = llama(blocks).logits[:, :-1]
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1), reduction="none"
    ).view(2, -1)
    # nll[:, t - 1] is the loss of the token at position t
    assert result["0-256"]["loss"] == pytest.approx(nll[:, :255].mean().item(), rel=1e-5)
    assert result["256-1K"]["loss"] == pytest.approx(nll[:, 255:].mean().item(), rel=1e-5)
    assert result["all"]["loss"] == pytest.approx(nll.mean().item(), rel=1e-5)
    assert result["256-1K"]["tokens"] == 2 * 44 and set(result) == {"0-256", "256-1K", "all"}


@torch.no_grad()
def test_recall_is_one_for_an_oracle_and_matches_a_direct_computation(llama, tokenizer, code_filler):
    items = make_items("code", tokenizer, code_filler, 40, 4, seed=0) + make_items(
        "passkey", tokenizer, code_filler, 20, 3, seed=1
    )

    class Oracle(Variant):
        def score(self, ids, start=1):  # knows every next token
            return torch.zeros(len(ids) - start), torch.tensor(ids[start:])

    assert recall(Oracle("oracle", None, "llama"), items) == {
        "accuracy": 1.0,
        "correct": 7,
        "items": 7,
        "answer_loss": 0.0,
    }
    correct, losses = 0, []
    for item in items:
        start, end = item.answer
        logits = llama(torch.tensor([item.ids])).logits[0, start - 1 : end - 1]
        target = torch.tensor(item.ids[start:end])
        correct += bool((logits.argmax(-1) == target).all())
        losses += F.cross_entropy(logits, target, reduction="none").tolist()
    result = recall(Variant("tiny", llama, "llama"), items)
    assert result["correct"] == correct and result["accuracy"] == correct / 7
    assert result["answer_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


@torch.no_grad()
def test_memory_off_rows_run_update_rule_none(mac_dir, tiny_teacher_dir, llama, tmp_path):
    ids = torch.randint(3, 49152, (80,), generator=torch.Generator().manual_seed(0))
    model, _, name = load_any(str(mac_dir))
    on, off = variants(model, name, "surprise", 512)
    assert (on.update_rule, off.update_rule) == ("surprise", "none") and off.label.endswith("[no memory]")
    direct = model.model(input_ids=ids[None], update_rule="none").last_hidden_state[0]
    torch.testing.assert_close(off.hidden(ids), direct)
    assert not torch.allclose(on.hidden(ids), off.hidden(ids))  # the memory changes the numbers

    package = package_llama_with_memory(
        str(tiny_teacher_dir), tmp_path / "pkg", memory_slots=16, recent_slots=8
    )
    wrapper, _, name = load_any(str(package))
    on, off = variants(wrapper, name, "ema", 32)
    windows = torch.cat(
        [llama.model(input_ids=ids[None, s : s + 32]).last_hidden_state[0] for s in range(0, 80, 32)]
    )
    torch.testing.assert_close(off.hidden(ids), windows)  # memory off: each window alone
    assert not torch.allclose(on.hidden(ids), windows)  # memory on: later windows read the earlier ones
    assert variants(llama, "tiny", "surprise", 512)[0].update_rule is None  # no memory: one row


def test_cli_end_to_end_writes_json_and_png(mac_dir, small_corpus, tmp_path, isolated_cache):
    png = tmp_path / "out" / "eval.png"
    args = [
        mac_dir,
        "--context",
        "128,300",
        "--blocks",
        "1",
        "--distances",
        "16,64",
        "--items",
        "2",
        "--data",
        small_corpus,
        "--validation-fraction",
        "0.2",
        "--plot",
        png,
    ]
    code, out, err = invoke(main, "eval", *args)
    assert code == 0, err
    report = json.loads(png.with_suffix(".json").read_text())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = report["results"]
    assert [r["update_rule"] for r in rows] == ["surprise", "none"]
    assert set(rows[0]["perplexity"]) == {"128", "300"} and set(rows[0]["perplexity"]["300"]) == {
        "0-256",
        "256-1K",
        "all",
    }
    assert set(rows[0]["recall"]) == {"passkey", "code"} and rows[0]["recall"]["code"]["64"]["items"] == 2
    assert (
        report["settings"]["contexts"] == [128, 300] and "| model | context | 0-256 | 256-1K | all |" in out
    )
    assert "| model | passkey @16 | passkey @64 | code @16 | code @64 |" in out
    assert rows[0]["perplexity"] != rows[1]["perplexity"]


def test_cli_evaluates_a_run_a_checkpoint_folder_and_a_teacher(tiny_teacher_dir, tmp_path, isolated_cache):
    run = tmp_path / "runs" / "demo"
    step = run / "checkpoints" / "step-000002"
    tiny_mac().save_pretrained(step)
    (run / "config.json").write_text(json.dumps({"teacher": str(tiny_teacher_dir), "use_mac": True}))
    output = tmp_path / "r.json"
    fast = ["--blocks", "0", "--kinds", "passkey", "--distances", "8", "--items", "2"]
    code, out, err = invoke(
        evaluate_command,
        step,
        run,
        "--checkpoint",
        "2",
        "--teacher",
        tiny_teacher_dir,
        *fast,
        "--update-rule",
        "ema",
        "--output",
        output,
    )
    assert code == 0, err
    rows = json.loads(output.read_text())["results"]
    assert [(r["name"], r["update_rule"]) for r in rows] == [
        ("demo@step-000002", "ema"),
        ("demo@step-000002", "none"),
        ("demo@step-000002", "ema"),
        ("demo@step-000002", "none"),
        (f"teacher ({tiny_teacher_dir})", None),
    ]
    assert rows[0]["recall"] == rows[2]["recall"]  # the run's checkpoint 2 is that folder


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("missing", "does not exist; pass a model folder"),
        ("file", "is a file, not a model folder"),
        ("no-config", "is not a model folder (no config.json)"),
        ("bert", "holds a 'bert' model; evaluate takes Llama"),
        ("distance", "a recall item at distance 1100 is"),
        ("context", "--context 2048 exceeds the 1024 positions of"),
        ("empty-data", "is empty"),
        ("short-data", "its validation split holds fewer than --context 256 tokens"),
        ("short-filler", "the code filler"),
        ("bad-context", "--context 'abc' is not a comma-separated list of integers"),
        ("bad-kind", "--kinds 'needle': choose from passkey, kv, code"),
        ("output-folder", "is a folder; give a .json file name"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(case, fragment, tiny_teacher_dir, tmp_path, isolated_cache):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "short.txt").write_text("first document\n\nsecond document\n\nthird one\n")
    (tmp_path / "folder.json").mkdir()
    model, fast = (
        tiny_teacher_dir,
        ["--blocks", "0", "--kinds", "passkey", "--distances", "8", "--items", "1"],
    )
    args = {
        "missing": [tmp_path / "nope"],
        "file": [tmp_path / "short.txt"],
        "no-config": [tmp_path / "empty"],
        "bert": [tmp_path / "bert"],
        "distance": [model, "--blocks", "0", "--kinds", "passkey", "--distances", "1100"],
        "context": [model, "--context", "2048", "--items", "0"],
        "empty-data": [model, "--items", "0", "--context", "256", "--data", tmp_path / "empty"],
        "short-data": [
            model,
            "--items",
            "0",
            "--context",
            "256",
            "--data",
            tmp_path / "short.txt",
            "--validation-fraction",
            "0.5",
        ],
        "short-filler": [
            model,
            "--blocks",
            "0",
            "--kinds",
            "code",
            "--data",
            tmp_path / "short.txt",
            "--validation-fraction",
            "0.5",
        ],
        "bad-context": [model, "--context", "abc"],
        "bad-kind": [model, "--kinds", "needle"],
        "output-folder": [model, *fast, "--output", tmp_path / "folder.json"],
    }[case]
    outputs = [tmp_path / "res.json", tmp_path / "res.png"]
    if case != "output-folder":
        args += ["--output", outputs[0], "--plot", outputs[1]]
    code, out, err = invoke(evaluate_command, *args)
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    # one line of ours, the last (after progress notes such as "loading MODEL ...")
    assert code != 0 and len(errors) == 1 and fragment in errors[0] and err.endswith(errors[0]), err
    assert not any(p.exists() for p in outputs)


def test_root_script_runs_the_command(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith(f"Error: {tmp_path / 'nope'} does not exist; pass a model folder")
