"""Export (MAC trust_remote_code folder, plain Llama folder), Hub push, inspection commands and bad input.

The decisive checks load each export in a SEPARATE Python process that cannot import titans-distil (the
editable finder and the repository are removed from its import system, its working directory is outside the
repository) and compare its logits and generations with the checkpoint. Tiny models; the whole file runs in
well under a minute on two cores.
"""

import base64
import http.server
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from titans_distil.models.modeling_mac_llama import MACLlamaForCausalLM
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from titans_distil.cli import distil
from titans_distil.export import teacher_card_facts
from titans_distil.export_cli import export_llama, export_mac
from titans_distil.inspect_cli import inspect_model
from titans_distil.model_folder import SHIPPED_FILES
from titans_distil.verify import file_hashes, foreign_imports

ROOT = Path(__file__).resolve().parents[1]
MAC_FLAGS = (
    "--use-mac",
    "--segment-len",
    16,
    "--memory-chunk-size",
    8,
    "--persistent-tokens",
    4,
    "--memory-layers",
    "1",
)
TOKEN = "hf_testTOKEN0123456789secret"


pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(command, *args):
    result = CliRunner().invoke(command, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output.strip()


@pytest.fixture(scope="module")
def runs(tiny_teacher_dir, small_corpus, tmp_path_factory):
    """Two 3-step runs (plain Llama and MAC) with checkpoints at steps 2 and 3 and a final/ folder."""
    out = tmp_path_factory.mktemp("runs")
    for name, extra in (("llama", ()), ("mac", MAC_FLAGS)):
        code, text = invoke(
            distil,
            "--teacher",
            tiny_teacher_dir,
            "--data",
            small_corpus,
            "--student-layers",
            2,
            "--max-length",
            32,
            "--batch-size",
            2,
            "--validation-fraction",
            0.2,
            "--eval-batches",
            2,
            "--precision",
            "fp32",
            "--max-steps",
            3,
            "--save-every",
            2,
            "--eval-every",
            2,
            "--lr",
            "3e-3",
            "--output-dir",
            out,
            "--run-name",
            name,
            *extra,
        )
        assert code == 0, text
    return out


def ids_for(length, seed=1):
    return torch.randint(3, 49152, (2, length), generator=torch.Generator().manual_seed(seed))


def no_temp_left(parent: Path):
    assert not [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# -------------------------------------------------------------------------------------------- folder contents


def test_a_mac_runs_final_folder_loads_with_the_auto_class(runs):
    """runs/<name>/final is a from_pretrained folder: config.json with auto_map and the shipped model files,
    so AutoModelForCausalLM (trust_remote_code) loads it and computes the logits of the project's own
    class."""
    from transformers import AutoModelForCausalLM

    final = runs / "mac" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mac_llama.MACLlamaForCausalLM"
    for name in SHIPPED_FILES["mac"]:
        assert (final / name).read_bytes() == (ROOT / "models" / name).read_bytes(), name
    auto = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True).eval()
    own = MACLlamaForCausalLM.from_pretrained(final).eval()
    assert type(auto).__module__ != type(own).__module__  # the folder's copy of the code, not the project's
    ids = ids_for(40)
    with torch.no_grad():
        assert torch.equal(auto(ids).logits, own(ids).logits)
    # a plain Llama run's final/ stays a stock folder
    plain = json.loads((runs / "llama" / "final" / "config.json").read_text())
    assert "auto_map" not in plain and not list((runs / "llama" / "final").glob("*.py"))


def test_mac_export_folder_is_complete_and_self_contained(runs, tmp_path):
    out = tmp_path / "mac-export"
    code, text = invoke(export_mac, "--run", runs / "mac", "--checkpoint", "2", "--output", out)
    assert code == 0, text
    lines = text.splitlines()  # progress notes ("loading the student ...") on stderr come first
    assert f"exported MAC student of run mac (step 2) to {out}: 11 files, 1 weight shard" in lines
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "README.md",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        *SHIPPED_FILES["mac"],
    }
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MACLlamaForCausalLM"] and config["model_type"] == "mac_llama"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_mac_llama.MACLlamaConfig",
        "AutoModelForCausalLM": "modeling_mac_llama.MACLlamaForCausalLM",
    }
    assert config["memory_layers"] == [1] and config["segment_len"] == 16 and "_name_or_path" not in config
    # the shipped model files are the project's own, importing nothing but torch, transformers and the stdlib
    for name in SHIPPED_FILES["mac"]:
        assert (out / name).read_bytes() == (ROOT / "models" / name).read_bytes()
    assert foreign_imports(out) == []
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()
    # the model card: teacher, data, steps, metrics from metrics.jsonl, licence, usage, vLLM note
    card = (out / "README.md").read_text()
    rows = [json.loads(line) for line in (runs / "mac" / "metrics.jsonl").read_text().splitlines()]
    data = ModelCard(card).data
    assert (data.library_name, data.pipeline_tag, data.license) == (
        "transformers",
        "text-generation",
        "other",
    )
    for needle in [
        "| training steps | 2 run of max steps 3 (an intermediate checkpoint) |",
        f"`{rows[0]['teacher_val_ppl']:,.2f}`"[1:-1],
        f"| student at step 0 (teacher layers, fresh memory) | {rows[0]['val_ppl']:,.2f} |",
        f"| student at step 2 (these weights) | {rows[2]['val_ppl']:,.2f} |",
        "trust_remote_code=True",
        'update_rule="surprise"',
        "its vLLM plugin registers `MACLlamaForCausalLM`",
        "frozen memory (`update_rule` none)",
        "memory | layers [1], 2-layer MLP, 4 persistent tokens, segments of 16 tokens",
        "check the teacher's licence before you publish",
    ]:
        assert needle in card, needle
    embedded = teacher_card_facts("embedded")
    assert embedded["license"] == "apache-2.0" and embedded["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_llama_export_is_a_stock_llama_folder(runs, tmp_path):
    out = tmp_path / "llama-export"
    code, text = invoke(export_llama, "--run", runs / "llama", "--output", out, "--max-shard-size", "2MB")
    assert code == 0, text
    assert "to " + str(out) + ": 9 files, 2 weight shards" in text
    config = json.loads((out / "config.json").read_text())
    assert (
        config["architectures"] == ["LlamaForCausalLM"]
        and config["model_type"] == "llama"
        and "auto_map" not in config
    )
    assert not list(out.glob("*.py"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    card = (out / "README.md").read_text()
    assert "trust_remote_code" not in card and "vllm serve path/to/llama-export" in card


def test_bfloat16_export_matches_the_checkpoint_cast_to_bfloat16(runs, tmp_path):
    from titans_distil.run_folder import load_run, resolve_checkpoint
    from titans_distil.weights import load_student

    out = tmp_path / "bf16"
    code, text = invoke(export_llama, "--run", runs / "llama", "--output", out, "--dtype", "bfloat16")
    assert code == 0, text
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    run = load_run(runs / "llama")
    reference = load_student(run, resolve_checkpoint(run, "latest"), torch.bfloat16)
    loaded = LlamaForCausalLM.from_pretrained(out).eval()  # stock transformers, in bf16 from the config
    assert loaded.dtype == torch.bfloat16
    ids = ids_for(24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- clean process

CHILD = r"""
import importlib.util, json, os, re, sys
root = os.path.realpath(sys.argv[1])
args = json.loads(sys.argv[2])
# titans-distil is pip-installed in editable mode: drop its finder and every path entry that is the repository
def _editable(finder):
    return (getattr(finder, "__module__", "") or "").startswith("__editable__")
sys.meta_path[:] = [f for f in sys.meta_path if not _editable(f)]
sys.path_hooks[:] = [h for h in sys.path_hooks if not _editable(h)]
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != root]
sys.path_importer_cache.clear()
assert not os.path.realpath(os.getcwd()).startswith(root + os.sep)
assert importlib.util.find_spec("titans_distil") is None, "titans_distil is importable"
assert importlib.util.find_spec("models") is None, "the repository's models/ is importable"
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(args["dir"], trust_remote_code=True).eval()
report = {"class": type(model).__module__ + "." + type(model).__name__, "generated": {}}
if args["stock"]:  # and without remote code at all
    plain = AutoModelForCausalLM.from_pretrained(args["dir"], trust_remote_code=False)
    report["stock_class"] = type(plain).__module__ + "." + type(plain).__name__
ids = torch.tensor(args["ids"])
with torch.no_grad():
    outputs = {"logits": model(ids, use_cache=False).logits.contiguous()}
    if hasattr(model, "memory_cache"):  # a MAC memory session saved and loaded by the shipped files alone
        cache = model.memory_cache()
        model(ids[:1, :30], past_key_values=cache, use_cache=True, update_rule="surprise")
        model.save_memory("memory.safetensors", cache)
        loaded = model.load_memory("memory.safetensors")
        outputs["memory_logits"] = model(ids[:1, 30:], past_key_values=loaded, use_cache=True,
                                         update_rule="surprise").logits.contiguous()
    save_file(outputs, "logits.safetensors")
for rule in args["rules"]:
    extra = {} if rule is None else {"update_rule": rule}
    generated = model.generate(ids, max_new_tokens=6, do_sample=False, **extra)
    report["generated"][str(rule)] = generated[:, ids.shape[1]:].tolist()
# the model card's usage snippet, as a user would paste it
card = open(os.path.join(args["dir"], "README.md")).read()
snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
exec(snippet.replace("path/to/" + os.path.basename(args["dir"]), args["dir"]), {})
print("REPORT " + json.dumps(report))
"""


def load_in_clean_process(
    export_dir: Path, ids: torch.Tensor, rules, stock: bool, workdir: Path
) -> tuple[dict, dict, str]:
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_MODULES_CACHE=str(workdir / "modules"),
        TRANSFORMERS_VERBOSITY="error",
    )
    args = {"dir": str(export_dir), "ids": ids.tolist(), "rules": list(rules), "stock": stock}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT), json.dumps(args)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1])
    outputs = load_file(str(workdir / "logits.safetensors"))
    return report, outputs, proc.stdout.split("REPORT ", 1)[0]


@pytest.mark.parametrize("kind", ["mac", "llama"])
def test_export_loads_without_titans_distil_and_matches_the_checkpoint(runs, tmp_path, kind):
    out = tmp_path / f"{kind}-export"
    command = export_mac if kind == "mac" else export_llama
    code, text = invoke(
        command,
        "--run",
        runs / kind,
        "--checkpoint",
        "checkpoints/step-000003",
        "--output",
        out,
        *(["--max-shard-size", "2MB"] if kind == "llama" else []),
    )
    assert code == 0, text
    ids = ids_for(40)  # 2.5 MAC segments: the memory carries context across segments
    rules = ["surprise", "ema", "none"] if kind == "mac" else [None]
    report, outputs, printed = load_in_clean_process(
        out, ids, rules, stock=kind == "llama", workdir=tmp_path / "child"
    )
    logits = outputs["logits"]

    # reference: the checkpoint loaded with the project's own class, independently of the exporter
    checkpoint = runs / kind / "checkpoints" / "step-000003"
    model_class = MACLlamaForCausalLM if kind == "mac" else LlamaForCausalLM
    reference = model_class.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(ids, use_cache=False).logits, rtol=0, atol=1e-5)
    for rule in rules:
        extra = {} if rule is None else {"update_rule": rule}
        expected = reference.generate(ids, max_new_tokens=6, do_sample=False, **extra)[
            :, ids.shape[1] :
        ].tolist()
        assert report["generated"][str(rule)] == expected, rule
    if kind == "mac":  # the memory file the child wrote (flushed) and loaded carries the same memory as ours
        with torch.no_grad():
            cache = reference.memory_cache()
            reference(ids[:1, :30], past_key_values=cache, use_cache=True, update_rule="surprise")
            flushed = {
                i: reference.model.layers[i].memory.flush(s)
                for i, s in reference.memory_states(cache).items()
            }
            expected = reference(
                ids[:1, 30:],
                past_key_values=reference.memory_cache(flushed),
                use_cache=True,
                update_rule="surprise",
            ).logits
        torch.testing.assert_close(outputs["memory_logits"], expected, rtol=0, atol=1e-5)
        assert (tmp_path / "child" / "memory.safetensors").is_file()
    if kind == "mac":
        assert report["class"].startswith("transformers_modules.") and report["class"].endswith(
            "modeling_mac_llama.MACLlamaForCausalLM"
        )
    else:
        assert (
            report["class"]
            == report["stock_class"]
            == "transformers.models.llama.modeling_llama.LlamaForCausalLM"
        )
    assert printed.strip()  # the card's snippet generated and printed something


def test_export_reimport_export_gives_identical_weights(runs, tmp_path):
    first, second, again = tmp_path / "first", tmp_path / "second", tmp_path / "again" / "first"
    args = ("--run", runs / "mac", "--max-shard-size", "2MB")
    assert invoke(export_mac, *args, "--checkpoint", "2", "--output", first)[0] == 0
    # the export itself is a checkpoint the exporter reads back (sharded, with its index)
    code, text = invoke(export_mac, *args, "--checkpoint", first, "--output", second)
    assert code == 0, text
    weights = lambda folder: {k: v for k, v in file_hashes(folder).items() if ".safetensors" in k}  # noqa: E731
    assert len(weights(first)) == 3 and weights(first) == weights(second)
    assert (first / "config.json").read_text() == (second / "config.json").read_text()
    # and the same checkpoint exported twice gives the same bytes everywhere (no timestamps, no absolute
    # paths; the card names the output folder in its usage example, so `again` has the same name in another
    # place)
    assert invoke(export_mac, *args, "--checkpoint", "2", "--output", again)[0] == 0
    assert file_hashes(first) == file_hashes(again)


# ------------------------------------------------------------------------------------------------ Hub push


class HubStandIn(http.server.BaseHTTPRequestHandler):
    """The four Hub endpoints `create_repo` + `upload_folder` use, recording what they receive."""

    def log_message(self, *args):
        pass

    def reply(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        server = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        server.seen.append((self.path, self.headers.get("Authorization")))
        if self.headers.get("Authorization") != f"Bearer {server.token}":
            return self.reply(401, {"error": "Invalid username or password."})
        if self.path == "/api/repos/create":
            server.created = json.loads(body)
            return self.reply(
                200, {"url": f"{server.endpoint}/{server.created['organization']}/{server.created['name']}"}
            )
        if self.path == "/api/validate-yaml":
            return self.reply(200, {})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self.reply(
                200,
                {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]
                },
            )
        if "/commit/" in self.path:
            server.commit_path = self.path
            repo = self.path.split("/api/models/", 1)[1].rsplit("/commit/", 1)[0]
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    server.uploaded[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return self.reply(
                200, {"commitUrl": f"{server.endpoint}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40}
            )
        return self.reply(404, {"error": f"unexpected {self.path}"})


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubStandIn)
    server.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    server.token, server.seen, server.uploaded, server.created = TOKEN, [], {}, None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest makes the suite offline
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "stored-token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    yield server
    server.shutdown()
    server.server_close()


def test_push_to_hub_uploads_the_export_with_the_token_never_shown(runs, tmp_path, hub, monkeypatch, capfd):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "pushed"
    code, text = invoke(
        export_mac, "--run", runs / "mac", "--output", out, "--push-to-hub", "me/tiny-mac", "--private"
    )
    assert code == 0, text
    assert f"pushed to {hub.endpoint}/me/tiny-mac (private)" in text
    assert hub.created == {"name": "tiny-mac", "organization": "me", "visibility": "private", "type": "model"}
    assert hub.commit_path == "/api/models/me/tiny-mac/commit/main"
    local = {p.name: p.read_bytes() for p in out.iterdir()}
    assert hub.uploaded == local  # every file, byte for byte
    assert (
        'AutoModelForCausalLM.from_pretrained("me/tiny-mac", trust_remote_code=True)'
        in local["README.md"].decode()
    )
    assert all(auth == f"Bearer {TOKEN}" for _, auth in hub.seen)
    captured = capfd.readouterr()
    assert TOKEN not in text + captured.out + captured.err

    # a wrong token: one line, the export stays, the token is not echoed
    monkeypatch.setenv("HF_TOKEN", "hf_wrongWRONGwrong")
    code, text = invoke(
        export_llama,
        "--run",
        runs / "llama",
        "--output",
        tmp_path / "rejected",
        "--push-to-hub",
        "me/tiny-llama",
    )
    assert code == 1 and "\n" not in text.split("Error: ", 1)[1]
    assert re.search(
        r"Error: push to me/tiny-llama failed \(.*401.*\); the export is in .*rejected, "
        r"fix the cause and push again$",
        text,
    )
    assert (tmp_path / "rejected" / "model.safetensors").is_file() and "hf_wrong" not in text

    # the stored login (`hf auth login`) is used when HF_TOKEN is unset
    monkeypatch.delenv("HF_TOKEN")
    Path(tmp_path / "stored-token").write_text(TOKEN)
    code, text = invoke(
        export_llama,
        "--run",
        runs / "llama",
        "--output",
        tmp_path / "stored",
        "--push-to-hub",
        "me/tiny-llama",
    )
    assert code == 0 and f"pushed to {hub.endpoint}/me/tiny-llama (public)" in text
    assert hub.created == {
        "name": "tiny-llama",
        "organization": "me",
        "visibility": "public",
        "type": "model",
    }


def test_push_without_a_token_is_refused_before_anything_is_written(runs, tmp_path, hub):
    out = tmp_path / "never"
    code, text = invoke(export_mac, "--run", runs / "mac", "--output", out, "--push-to-hub", "me/tiny-mac")
    assert (code, text) == (
        1,
        "Error: --push-to-hub needs a Hugging Face token; set HF_TOKEN or run `hf auth login`, then "
        "export again",
    )
    assert not out.exists() and hub.seen == []
    code, text = invoke(export_mac, "--run", runs / "mac", "--output", out, "--push-to-hub", "not a repo")
    assert (code, text) == (
        1,
        "Error: --push-to-hub 'not a repo' is not a Hub repo id; use OWNER/NAME (letters, digits, '-', "
        "'_', '.')",
    )


def fake_report() -> dict:
    """An evaluate.py --output report in its format (settings + one entry per row)."""
    cell = {"loss": 2.5, "ppl": 12.18, "tokens": 100}
    return {
        "settings": {
            "models": ["exports/x"],
            "data": "stdlib",
            "seed": 0,
            "dtype": "auto",
            "checkpoint": "2",
        },
        "results": [
            {
                "name": "exports/x",
                "label": "exports/x (surprise)",
                "kind": "mac",
                "update_rule": "surprise",
                "window": None,
                "perplexity": {"512": {"0-256": cell, "256-1K": cell, "all": cell}},
                "recall": {"passkey": {"256": {"correct": 3, "items": 4, "answer_loss": 0.42}}},
                "seconds": 1.0,
                "tokens_per_s": 100.0,
            }
        ],
    }


def test_model_card_is_a_hub_model_card_with_sections_limits_and_eval_results(runs, tmp_path):
    report = tmp_path / "eval.json"
    report.write_text(json.dumps(fake_report()))
    out = tmp_path / "carded"
    code, text = invoke(
        export_mac, "--run", runs / "mac", "--checkpoint", "3", "--output", out, "--eval-results", report
    )
    assert code == 0, text
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.license == "other" and card.data.base_model is None  # a local teacher folder
    assert {"titans-distil", "distillation", "custom_code", "neural-memory"} <= set(card.data.tags)
    for needle in [
        "## What it is",
        "## Install",
        "pip install torch",
        "## Load and generate",
        'update_rule="surprise"',
        "## Serve (vLLM)",
        "titans-distil vllm --model-path path/to/carded --serve --port 8000",
        "| training steps | 3 run (max steps 3) |",
        "## Evaluation (evaluate.py)",
        "| exports/x (surprise) | 3/4 (0.42) |",
        "## Limits",
        "**A toy run**: 3 optimizer steps",
        "not meaningful as quality figures",
        "written once per completed chunk of 8 tokens",
    ]:
        assert needle in card.text, needle
    assert json.loads((out / "eval.json").read_text()) == fake_report()

    # the embedded teacher: base_model is its Hub id, its licence is the card's
    from titans_distil.card import model_card
    from titans_distil.run_folder import load_run, resolve_checkpoint
    from titans_distil.weights import load_student

    run = load_run(runs / "llama")
    run.config["teacher"] = "embedded"
    ckpt = resolve_checkpoint(run, "latest")
    data = ModelCard(model_card(run, ckpt, "llama", load_student(run, ckpt, None).config, None, "x")).data
    assert (data.base_model, data.license) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")

    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": []}')
    code, text = invoke(export_mac, "--run", runs / "mac", "--output", tmp_path / "no", "--eval-results", bad)
    assert code == 1 and text.startswith(f"Error: --eval-results {bad} is not an evaluate.py report")
    assert not (tmp_path / "no").exists()


def test_training_steps_are_the_steps_run_and_the_run_budget(tmp_path):
    from titans_distil.card import training_steps
    from titans_distil.run_folder import Checkpoint

    folder = tmp_path / "step-000004"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({"step": 4, "total_steps": 6}))
    assert training_steps({"max_steps": 4}, Checkpoint([], folder, "s", 4)) == (
        "4 run of max steps 6 (an intermediate checkpoint)"
    )
    # final/ after a resume that lowered --max-steps below the steps already run: never "6 of 4"
    assert training_steps({"max_steps": 4}, Checkpoint([], None, "final", 6)) == (
        "6 run (the last --resume set max steps 4, below the steps already run)"
    )
    assert training_steps({"max_steps": 6}, Checkpoint([], None, "final", 6)) == "6 run (max steps 6)"
    assert training_steps({"num_epochs": 2}, Checkpoint([], None, "final", 6)) == "6 run (2 epochs)"


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records calls, raises `fail` from upload_folder. Never
    networked."""

    calls: list = []
    fail: BaseException | None = None

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, kwargs))
        return f"https://hub.invalid/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        FakeHfApi.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        if FakeHfApi.fail is not None:
            raise FakeHfApi.fail


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    FakeHfApi.calls, FakeHfApi.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return FakeHfApi


def test_push_command_uploads_an_export_and_refuses_anything_else(runs, tmp_path, fake_hub, capfd):
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    from titans_distil.commands import main

    out = tmp_path / "to-push"
    assert invoke(export_llama, "--run", runs / "llama", "--output", out)[0] == 0
    code, text = invoke(
        main, "push", out, "me/tiny", "--private", "--revision", "dev", "--commit-message", "first"
    )
    assert code == 0, text
    assert text == f"pushed {out} to https://hub.invalid/me/tiny@dev (private)"
    (_, repo, create), (_, _, branch), (_, _, upload) = fake_hub.calls
    assert repo == "me/tiny" and create["private"] is True and branch["branch"] == "dev"
    assert upload["folder_path"] == str(out) and upload["revision"] == "dev"
    assert upload["commit_message"] == "first"
    fake_hub.calls.clear()
    assert invoke(main, "push", out, "me/tiny")[0] == 0
    assert [c[0] for c in fake_hub.calls] == ["create_repo", "upload_folder"]
    assert fake_hub.calls[1][2]["commit_message"] == "Upload Llama student exported by titans-distil"

    def refused(folder, repo, message):
        fake_hub.calls.clear()
        code, text = invoke(main, "push", folder, repo)
        assert (code, text) == (1, f"Error: {message}"), text
        assert fake_hub.calls[1:] == []  # nothing uploaded

    hint = "pass a folder written by export_mac_model.py, export_llama_model.py or package_model.py"
    refused(tmp_path / "nope", "me/x", f"{tmp_path / 'nope'} does not exist; {hint}")
    refused(
        runs / "llama",
        "me/x",
        f"{runs / 'llama'} is not an export (not a Llama, MAC or memory model); {hint}",
    )
    step = sorted((runs / "llama" / "checkpoints").iterdir())[0]
    refused(
        step,
        "me/x",
        f"{step} is a training checkpoint, not an export; export it first "
        "(export_mac_model.py / export_llama_model.py --checkpoint ...), then push the export",
    )
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "me/x", f"{tmp_path / 'empty'} is not an export (no config.json); {hint}")
    refused(
        out,
        "not a repo",
        "REPO_ID 'not a repo' is not a Hub repo id; use OWNER/NAME (letters, digits, '-', '_', '.')",
    )

    # the Hub client's network and HTTP errors: one line, non-zero exit, the token never shown
    request = httpx2.Request("POST", "https://hub.invalid/api/commit")
    for error in [
        HfHubHTTPError("403 Forbidden: no write access", response=httpx2.Response(403, request=request)),
        httpx2.ConnectError(f"[Errno -3] name resolution failed for token {TOKEN}"),
        OfflineModeIsEnabled("offline mode is enabled"),
    ]:
        fake_hub.fail = error
        code, text = invoke(main, "push", out, "me/tiny")
        assert code == 1 and text.count("\n") == 0, text
        assert text.startswith("Error: push to me/tiny failed (") and TOKEN not in text
        assert text.endswith(f"the export is in {out}, fix the cause and push again")
    fake_hub.fail = None
    constants.HF_HUB_OFFLINE = True  # restored by the fixture's monkeypatch
    code, text = invoke(main, "push", out, "me/tiny")
    assert code == 1 and text.startswith("Error: HF_HUB_OFFLINE is set, so nothing can be pushed")
    captured = capfd.readouterr()
    assert TOKEN not in captured.out + captured.err


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_is_one_line_and_overwrites_nothing(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # messages show paths relative to the working directory
    shutil.copytree(runs, "runs")
    out = Path("out")

    def refused(command, *args, message):
        code, text = invoke(command, *args, "--output", out)
        # one line of ours, the last; only progress notes ("loading the student ...") may come before it
        assert (code, text.splitlines()[-1]) == (1, f"Error: {message}"), text
        assert all(line.endswith(" ...") for line in text.splitlines()[:-1]), text
        assert not out.exists()
        no_temp_left(Path("."))

    refused(
        export_mac,
        "--run",
        "runs/nope",
        message="run folder runs/nope does not exist; pass a folder written by distil.py (runs/<run-name>)",
    )
    Path("empty").mkdir()
    refused(
        export_mac,
        "--run",
        "empty",
        message="empty holds no run (no config.json); pass a folder written by distil.py (runs/<run-name>)",
    )
    refused(
        export_mac,
        "--run",
        "runs/llama",
        message="run runs/llama trained a plain Llama student (no neural memory); export it with "
        "export_llama_model.py",
    )
    refused(
        export_llama,
        "--run",
        "runs/mac",
        message="run runs/mac trained a MAC student with neural memory, which a plain LlamaForCausalLM "
        "cannot hold; export it with export_mac_model.py",
    )
    refused(
        export_mac,
        "--run",
        "runs/mac",
        "--checkpoint",
        "99",
        message="checkpoint 99 not found (this run has: step-000002, step-000003, final); pass a "
        "checkpoint folder or .safetensors file, a step number, 'final' or 'latest'",
    )

    # truncated and corrupt weights
    broken = Path("broken")
    shutil.copytree("runs/mac/checkpoints/step-000003", broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    refused(
        export_mac,
        "--run",
        "runs/mac",
        "--checkpoint",
        broken,
        message="checkpoint broken: weights model.safetensors are unreadable (Error while deserializing "
        "header: incomplete metadata, file not fully covered); the file is truncated or corrupt, "
        "use another checkpoint",
    )
    (broken / "model.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[24:]
    )
    refused(
        export_mac,
        "--run",
        "runs/mac",
        "--checkpoint",
        broken / "model.safetensors",
        message="checkpoint broken/model.safetensors: weights model.safetensors are unreadable (Error "
        "while deserializing header: invalid JSON in header: key must be a string at line 1 column "
        "2); the file is truncated or corrupt, use another checkpoint",
    )
    Path("weights.bin").write_bytes(pickle.dumps({"x": 1}))
    refused(
        export_llama,
        "--run",
        "runs/llama",
        "--checkpoint",
        "weights.bin",
        message="checkpoint weights.bin is a pickle file; it is never unpickled here, pass a .safetensors "
        "file",
    )

    # another architecture: the MAC run's checkpoint for the Llama run (as a folder, and as a bare file)
    refused(
        export_llama,
        "--run",
        "runs/llama",
        "--checkpoint",
        "runs/mac/checkpoints/step-000003",
        message="checkpoint runs/mac/checkpoints/step-000003 does not fit run runs/llama (model_type "
        "'mac_llama' vs 'llama', memory_layers [1] vs None, num_persistent_tokens 4 vs None); it "
        "belongs to another architecture or size, pass a checkpoint of this run",
    )
    shutil.copy("runs/mac/checkpoints/step-000003/model.safetensors", "mac.safetensors")
    refused(
        export_llama,
        "--run",
        "runs/llama",
        "--checkpoint",
        "mac.safetensors",
        message="checkpoint mac.safetensors does not fit run runs/llama's LlamaForCausalLM, 2 layers, "
        "hidden 32 (unexpected 12 (model.layers.1.memory.gate_bias, "
        "model.layers.1.memory.gate_weight, model.layers.1.memory.initial_weights.0, ...)); it "
        "belongs to another architecture or size, pass a checkpoint of this run",
    )
    # another size: a wider 3-layer Llama
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained("wide")
    refused(
        export_llama,
        "--run",
        "runs/llama",
        "--checkpoint",
        "wide",
        message="checkpoint wide does not fit run runs/llama (num_hidden_layers 3 vs 2, hidden_size 48 vs "
        "32, head_dim 12 vs 8); it belongs to another architecture or size, pass a checkpoint of "
        "this run",
    )
    shutil.copy("wide/model.safetensors", "wide.safetensors")  # without its config.json: the shapes tell
    refused(
        export_llama,
        "--run",
        "runs/llama",
        "--checkpoint",
        "wide.safetensors",
        message="checkpoint wide.safetensors does not fit run runs/llama's LlamaForCausalLM, 2 layers, "
        "hidden 32 (unexpected 9 (model.layers.2.input_layernorm.weight, "
        "model.layers.2.mlp.down_proj.weight, model.layers.2.mlp.gate_proj.weight, ...); shape "
        "mismatch 20 (model.embed_tokens.weight [49152, 32] vs [49152, 48], "
        "model.layers.0.self_attn.q_proj.weight [32, 32] vs [48, 48], "
        "model.layers.0.self_attn.k_proj.weight [16, 32] vs [24, 48], ...)); it belongs to another "
        "architecture or size, pass a checkpoint of this run",
    )

    # the output: a non-empty folder is kept unless --overwrite; the run itself is never a valid output
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, text = invoke(export_mac, "--run", "runs/mac", "--output", out)
    assert (code, text) == (
        1,
        "Error: --output out is not empty; pass --overwrite to replace it, or choose another --output",
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    code, text = invoke(export_mac, "--run", "runs/mac", "--output", "runs", "--overwrite")
    assert (code, text) == (
        1,
        "Error: --output runs would replace runs/mac, which this command reads; choose another --output",
    )
    code, text = invoke(export_mac, "--run", "runs/mac", "--output", out, "--overwrite")
    assert code == 0, text
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    no_temp_left(Path("."))


# ------------------------------------------------------------------------------------------------ inspection


@pytest.fixture(scope="module")
def mac_export(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "mac"
    assert invoke(export_mac, "--run", runs / "mac", "--output", out)[0] == 0
    return out


def test_inspect_weights_reads_safetensors_and_never_unpickles(mac_export, tmp_path):
    code, text = invoke(inspect_model, "weights", mac_export, "--filter", r"layers\.1\.memory\.initial")
    assert code == 0, text
    state = load_file(str(mac_export / "model.safetensors"))
    norm = state["model.layers.1.memory.initial_weights.0"].double().norm().item()
    assert re.search(
        rf"model\.layers\.1\.memory\.initial_weights\.0\s+F32\s+\[64, 32\]\s+2,048\s+{norm:.4f}", text
    )
    assert (
        "2 tensors, 4,096 parameters (of 32 tensors)" in text
        and file_hashes(mac_export)["model.safetensors"] in text
    )
    # a pickle that would leave a marker file if it were ever unpickled
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "model.bin").write_bytes(pickle.dumps(Trap()))
    code, text = invoke(inspect_model, "weights", tmp_path / "model.bin")
    assert (code, text) == (
        1,
        f"Error: {tmp_path / 'model.bin'} is a pickle file; it is never unpickled here (loading pickle "
        "can run code), convert it to safetensors",
    )
    assert not marker.exists()
    save_file({"w": torch.tensor([1.0, float("nan")])}, str(tmp_path / "nan.safetensors"))
    code, text = invoke(inspect_model, "weights", tmp_path / "nan.safetensors")
    assert code == 1 and text.endswith(
        "Error: 1 tensors hold NaN or Inf (first: w); use an earlier checkpoint"
    )


def test_inspect_architecture(runs, mac_export):
    code, text = invoke(inspect_model, "architecture", mac_export)
    assert code == 0 and text.endswith(
        "OK: every tensor the config needs is present with the right shape, and nothing else"
    )
    code, text = invoke(inspect_model, "architecture", mac_export, "--weights", runs / "llama" / "final")
    assert code == 1 and "  missing    model.layers.1.memory_gate" in text
    assert text.splitlines()[-1] == (
        "Error: the weights do not fit the config (missing 12 (model.layers.1.memory_gate, "
        "model.layers.1.persistent_tokens, model.layers.1.memory.gate_weight, ...))"
    )


def test_inspect_verify_reloads_the_export_without_titans_distil(runs, mac_export, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    code, text = invoke(inspect_model, "verify", mac_export, "--run", runs / "mac", "--max-new-tokens", 4)
    assert code == 0, text
    for digest, name in ((v, k) for k, v in file_hashes(mac_export).items()):
        assert f"sha256 {digest}  {name}" in text
    assert "loaded in a separate Python without titans-distil as transformers_modules." in text
    assert re.search(r"logits on 40 tokens vs checkpoint \S+final: max \|diff\| 0 \(tolerance 1e-05\)", text)
    for rule in ("surprise", "ema", "none"):
        assert f"greedy generation (update_rule={rule}): same 4 tokens" in text
    assert text.splitlines()[-1].startswith("OK: the export reproduces checkpoint")
    # a tampered export is caught
    state = load_file(str(mac_export / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"] * 1.5
    tampered = tmp_path / "tampered"
    shutil.copytree(mac_export, tampered)
    save_file(state, str(tampered / "model.safetensors"), metadata={"format": "pt"})
    code, text = invoke(inspect_model, "verify", tampered, "--run", runs / "mac", "--max-new-tokens", 4)
    assert code == 1 and re.search(
        r"Error: verify failed: logits differ by \S+ > 1e-05.*; re-export from the checkpoint$", text
    )


def test_inspect_tokenizers_compare_and_examples(runs, mac_export, small_corpus, tiny_teacher_dir, tmp_path):
    code, text = invoke(inspect_model, "tokenizers", "--run", runs / "mac", "--export", mac_export)
    assert code == 0, text
    assert re.search(r"eos\s+<\|im_end\|> \(2\)\s+<\|im_end\|> \(2\)\s+<\|im_end\|> \(2\)", text)
    assert "<- differs" not in text and text.endswith("OK: one tokenizer throughout")
    drifted = tmp_path / "drifted"
    shutil.copytree(mac_export, drifted)
    (drifted / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    code, text = invoke(inspect_model, "tokenizers", "--run", runs / "mac", "--export", drifted)
    assert code == 1 and re.search(r"chat template\s+\w+\s+\w+\s+\w+  <- differs", text)
    assert text.splitlines()[-1] == (
        "Error: tokenizers are not aligned (chat template); export from the run again so it "
        "carries the teacher's tokenizer"
    )

    code, text = invoke(inspect_model, "compare", "--run", runs / "mac", "--blocks", 2)
    assert code == 0, text
    kl = float(re.search(r"KL\(teacher \|\| student\)\s+(\S+) nats/token", text).group(1))
    agree = float(re.search(r"top-1 agreement\s+(\S+) %", text).group(1))
    assert kl >= 0 and 0 <= agree <= 100 and "2 blocks x 32 tokens (62 predicted tokens, float32)" in text
    code, exported = invoke(
        inspect_model, "compare", "--run", runs / "mac", "--export", mac_export, "--blocks", 2
    )

    def figures(output):  # the measured lines (not the progress notes and bar on stderr)
        return [line for line in output.splitlines() if line.startswith("  ")]

    assert (
        code == 0 and figures(exported) == figures(text) and len(figures(text)) == 4
    )  # the final checkpoint
    assert "loading the teacher from " in text and "loading the student: export " in exported

    code, text = invoke(inspect_model, "examples", "--run", runs / "mac", "--count", 2, "--max-chars", 0)
    assert code == 0, text
    from titans_distil.data import load_blocks

    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    blocks = load_blocks(
        str(small_corpus), tokenizer, 32, "train", seed=0, validation_fraction=0.2, max_blocks=2
    )
    assert (
        f"--- train block 0: 32 tokens, first ids {blocks[0][:8].tolist()} "
        f"---\n{tokenizer.decode(blocks[0].tolist())}" in text
    )
    assert "--- train block 1:" in text
