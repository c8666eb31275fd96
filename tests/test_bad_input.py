"""Bad input (issue 12), class by class and CLI by CLI: every case ends in one line of OUR message and a
non-zero exit, never a traceback, and creates or overwrites nothing.

The classes: config.json with wrong types (model folders and run configs), an output path under a file, in a
read-only folder or on a full disk, pickle-only weights, truncated safetensors, non-UTF-8 prompts / facts
files, an export holding another model's tokenizer, nan/inf floats and --max-new-tokens beyond the model's
positions, a Hub push without network, `accelerate launch --num_processes 2` that started one process, a
--tracker whose package is missing, and leaving --interactive. vLLM is never started: its checks run before it
would.

A read-only folder is simulated through os.access when the tests run as root (root writes anywhere); a full
disk through os.replace, the last step of every atomic writer, failing with ENOSPC; Accelerate's simple
launcher through the environment it gives its one child.
"""

import errno
import json
import os
import pickle
import shutil
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny_models import save_mac_folder, tiny_mac
from transformers import AutoTokenizer

from titans_distil.commands import main

pytestmark = pytest.mark.usefixtures("one_thread")
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


def set_field(folder: Path, **values) -> Path:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **values}))
    return folder


def truncate(folder: Path) -> Path:
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return folder


def other_tokenizer(folder: Path, larger: bool) -> Path:
    """Replace the folder's tokenizer with another model's: 100 tokens more, or a 4-token word-level one."""
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    if larger:
        from titans_distil.teacher import embedded_teacher_dir

        tokenizer = AutoTokenizer.from_pretrained(embedded_teacher_dir())
        tokenizer.add_tokens([f"<extra{i}>" for i in range(100)])
    else:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        words = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2, "hello": 3}, unk_token="<unk>"))
        words.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def world(tiny_teacher_dir, small_corpus, tmp_path_factory):
    """Every input of the table: good and damaged teachers, MAC exports and runs, files that are in the
    way."""
    w = tmp_path_factory.mktemp("world")
    shutil.copytree(tiny_teacher_dir, w / "teacher")
    shutil.copytree(small_corpus, w / "corpus")
    save_mac_folder(tiny_mac(), tiny_teacher_dir, w / "mac")
    set_field(shutil.copytree(w / "teacher", w / "teacher-types"), hidden_size="32")
    set_field(shutil.copytree(w / "mac", w / "mac-types"), num_hidden_layers="3")
    pickled = w / "teacher-pickle"
    pickled.mkdir()
    shutil.copy(w / "teacher" / "config.json", pickled)
    AutoTokenizer.from_pretrained(w / "teacher").save_pretrained(pickled)
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps({"never": "unpickled"}))
    truncate(shutil.copytree(w / "teacher", w / "teacher-truncated"))
    truncate(shutil.copytree(w / "mac", w / "mac-truncated"))
    other_tokenizer(shutil.copytree(w / "mac", w / "mac-bigtok"), larger=True)
    other_tokenizer(shutil.copytree(w / "mac", w / "mac-smalltok"), larger=False)
    other_tokenizer(shutil.copytree(w / "teacher", w / "teacher-smalltok"), larger=False)
    result = CliRunner().invoke(
        main,
        [
            str(a)
            for a in (
                "distil",
                "--teacher",
                w / "teacher",
                "--data",
                w / "corpus",
                "--student-layers",
                2,
                "--max-length",
                32,
                "--batch-size",
                2,
                "--validation-fraction",
                0.2,
                "--eval-batches",
                1,
                "--precision",
                "fp32",
                "--max-steps",
                2,
                "--save-every",
                2,
                "--eval-every",
                2,
                "--output-dir",
                w / "runs",
                "--run-name",
                "mac",
                *MAC_FLAGS,
            )
        ],
    )
    assert result.exit_code == 0, result.output
    for name, values in (("run-types", {"teacher": 5}), ("run-types-length", {"max_length": "32"})):
        (w / "runs" / name).mkdir()
        (w / "runs" / name / "config.json").write_text(
            json.dumps({**json.loads((w / "runs" / "mac" / "config.json").read_text()), **values})
        )
    (w / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (w / "long.txt").write_text("word " * 700 + "\n")
    (w / "afile").write_text("in the way\n")
    (w / "ro").mkdir()
    (w / "full").mkdir()
    return w


def snapshot(root: Path) -> dict:
    """Every file (size, mtime) and folder under `root`: what a command must neither create nor overwrite."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "folder"
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def read_only(world, monkeypatch):
    ro = world / "ro"
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: answer as the kernel would for anyone else
        real = os.access
        monkeypatch.setattr(
            os,
            "access",
            lambda path, mode, **kw: (
                False if Path(path).resolve() == ro.resolve() and mode & os.W_OK else real(path, mode, **kw)
            ),
        )
    yield ro
    ro.chmod(0o755)


@pytest.fixture
def full_disk(world, monkeypatch):
    full, real = world / "full", os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).resolve().is_relative_to(full.resolve()):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return full


@pytest.fixture
def offline_hub(monkeypatch, world):
    """A token, and an endpoint nothing listens on (as without network)."""
    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_testTOKEN0123456789secret")
    yield
    shutil.rmtree(world / "pushed", ignore_errors=True)


def simple_launch(monkeypatch, use_cpu: str) -> None:
    """The environment `accelerate launch --num_processes 2 [--cpu]` gives the ONE process it starts here."""
    from titans_distil import train

    for name in (
        "WORLD_SIZE",
        "RANK",
        "LOCAL_RANK",
        "PMI_SIZE",
        "OMPI_COMM_WORLD_SIZE",
        "MV2_COMM_WORLD_SIZE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", use_cpu)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setattr(train, "_inherited", lambda name: False)  # set by the launcher, not by the shell
    monkeypatch.setattr(train, "_quiet_launcher_at_exit", lambda: None)  # no launcher to stop in a test


@pytest.fixture
def no_wandb(monkeypatch):
    """wandb not installed (whether it is here or not): Accelerate would drop the tracker without a word."""
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)


@pytest.fixture
def launch_without_multi_gpu(monkeypatch):
    simple_launch(monkeypatch, "False")


@pytest.fixture
def launch_cpu_without_mpi(monkeypatch):
    simple_launch(monkeypatch, "True")


DISTIL = (
    "distil",
    "--data",
    "{w}/corpus",
    "--student-layers",
    "2",
    "--max-length",
    "32",
    "--max-steps",
    "1",
    "--output-dir",
    "{w}/new-runs",
)
PUSH = "export-mac", "--run", "{w}/runs/mac", "--output", "{w}/pushed", "--push-to-hub", "me/tiny"

# (class, id, arguments, fragment of our message, setup fixture or None)
CASES = [
    # -- config.json with wrong types: the file and the field are named
    (
        "types",
        "distil-teacher",
        (*DISTIL, "--teacher", "{w}/teacher-types"),
        "teacher-types/config.json: Field 'hidden_size' expected int",
        None,
    ),
    (
        "types",
        "cache-teacher",
        (
            "distil",
            "cache-teacher",
            "--teacher",
            "{w}/teacher-types",
            "--data",
            "{w}/corpus",
            "--output",
            "{w}/cache",
        ),
        "teacher-types/config.json: Field 'hidden_size'",
        None,
    ),
    (
        "types",
        "distil-resume",
        ("distil", "--output-dir", "{w}/runs", "--run-name", "run-types", "--resume"),
        "run-types/config.json: field 'teacher' should be str, not 5",
        None,
    ),
    (
        "types",
        "distil-resume-int",
        ("distil", "--output-dir", "{w}/runs", "--run-name", "run-types-length", "--resume"),
        "field 'max_length' should be int, not \"32\"",
        None,
    ),
    (
        "types",
        "export-mac",
        ("export-mac", "--run", "{w}/runs/run-types", "--output", "{w}/out"),
        "run-types/config.json: field 'teacher' should be str",
        None,
    ),
    (
        "types",
        "export-llama",
        ("export-llama", "--run", "{w}/runs/run-types", "--output", "{w}/out"),
        "field 'teacher' should be str",
        None,
    ),
    (
        "types",
        "inspect-tokenizers",
        ("inspect", "tokenizers", "--run", "{w}/runs/run-types"),
        "field 'teacher' should be str",
        None,
    ),
    (
        "types",
        "inspect-architecture",
        ("inspect", "architecture", "{w}/teacher-types"),
        "Field 'hidden_size' expected int",
        None,
    ),
    (
        "types",
        "quantize",
        ("quantize", "--model-path", "{w}/teacher-types", "--bits", "8", "--output", "{w}/out"),
        "teacher-types/config.json: Field 'hidden_size'",
        None,
    ),
    (
        "types",
        "package",
        ("package", "--model-path", "{w}/teacher-types", "--output", "{w}/out"),
        "teacher-types/config.json: Field 'hidden_size'",
        None,
    ),
    (
        "types",
        "generate",
        ("generate", "--model-path", "{w}/mac-types", "--prompt", "hi"),
        "mac-types/config.json: Field 'num_hidden_layers' expected int",
        None,
    ),
    (
        "types",
        "vllm",
        ("vllm", "--model-path", "{w}/mac-types", "--prompt", "hi"),
        "mac-types/config.json: Field 'num_hidden_layers'",
        None,
    ),
    (
        "types",
        "eval",
        ("eval", "{w}/mac-types", "--output", "{w}/out.json"),
        "mac-types/config.json: Field 'num_hidden_layers'",
        None,
    ),
    (
        "types",
        "recall",
        ("recall", "--model-path", "{w}/mac-types"),
        "mac-types/config.json: Field 'num_hidden_layers'",
        None,
    ),
    # -- the output under a file / in a read-only folder / on a full disk: checked before the work, or one
    # line
    (
        "output",
        "distil-under-file",
        (*DISTIL, "--teacher", "{w}/teacher", "--output-dir", "{w}/afile/runs"),
        "afile, which is a file, not a folder",
        None,
    ),
    (
        "output",
        "distil-is-file",
        (*DISTIL, "--teacher", "{w}/teacher", "--output-dir", "{w}/afile"),
        "is a file",
        None,
    ),
    (
        "output",
        "cache-teacher-under-file",
        (
            "distil",
            "cache-teacher",
            "--teacher",
            "{w}/teacher",
            "--data",
            "{w}/corpus",
            "--output",
            "{w}/afile/cache",
        ),
        "which is a file, not a folder",
        None,
    ),
    (
        "output",
        "export-under-file",
        ("export-mac", "--run", "{w}/runs/mac", "--output", "{w}/afile/out"),
        "--output {w}/afile/out is under",
        None,
    ),
    (
        "output",
        "memory-out-under-file",
        ("generate", "--model-path", "{w}/mac", "--prompt", "hi", "--memory-out", "{w}/afile/m.safetensors"),
        "--memory-out {w}/afile/m.safetensors is under",
        None,
    ),
    (
        "output",
        "quantize-under-file",
        ("quantize", "--model-path", "{w}/teacher", "--bits", "8", "--output", "{w}/afile/q"),
        "--output {w}/afile/q is under",
        None,
    ),
    (
        "output",
        "package-under-file",
        ("package", "--model-path", "{w}/teacher", "--output", "{w}/afile/p"),
        "--output {w}/afile/p is under",
        None,
    ),
    (
        "output",
        "vllm-under-file",
        ("vllm", "--model-path", "{w}/mac", "--prompt", "hi", "--output", "{w}/afile/o.jsonl"),
        "--output {w}/afile/o.jsonl is under",
        None,
    ),
    (
        "output",
        "vllm-is-folder",
        ("vllm", "--model-path", "{w}/mac", "--prompt", "hi", "--output", "{w}/ro"),
        "is a directory",
        None,
    ),
    (
        "output",
        "eval-under-file",
        ("eval", "{w}/mac", "--output", "{w}/afile/e/out.json"),
        "--output {w}/afile/e/out.json is under {w}/afile, which is a file, not a folder",
        None,
    ),
    (
        "output",
        "eval-plot-under-file",
        ("eval", "{w}/mac", "--plot", "{w}/afile/p.png"),
        "--plot {w}/afile/p.png is under",
        None,
    ),
    (
        "output",
        "recall-under-file",
        ("recall", "--model-path", "{w}/mac", "--output", "{w}/afile/r.json"),
        "--output {w}/afile/r.json is under {w}/afile, which is a file, not a folder",
        None,
    ),
    (
        "output",
        "recall-memory-dir-under-file",
        ("recall", "--model-path", "{w}/mac", "--memory-dir", "{w}/afile/mem"),
        "--memory-dir {w}/afile/mem is under",
        None,
    ),
    (
        "output",
        "distil-read-only",
        (*DISTIL, "--teacher", "{w}/teacher", "--output-dir", "{w}/ro/runs"),
        "the folder {w}/ro is not writable",
        "read_only",
    ),
    (
        "output",
        "cache-teacher-read-only",
        (
            "distil",
            "cache-teacher",
            "--teacher",
            "{w}/teacher",
            "--data",
            "{w}/corpus",
            "--output",
            "{w}/ro/c",
        ),
        "is not writable",
        "read_only",
    ),
    (
        "output",
        "export-read-only",
        ("export-mac", "--run", "{w}/runs/mac", "--output", "{w}/ro/out"),
        "the folder {w}/ro is not writable",
        "read_only",
    ),
    (
        "output",
        "memory-out-read-only",
        ("generate", "--model-path", "{w}/mac", "--prompt", "hi", "--memory-out", "{w}/ro/m.safetensors"),
        "is not writable",
        "read_only",
    ),
    (
        "output",
        "quantize-read-only",
        ("quantize", "--model-path", "{w}/teacher", "--bits", "8", "--output", "{w}/ro/q"),
        "is not writable",
        "read_only",
    ),
    (
        "output",
        "package-read-only",
        ("package", "--model-path", "{w}/teacher", "--output", "{w}/ro/p"),
        "is not writable",
        "read_only",
    ),
    (
        "output",
        "vllm-read-only",
        ("vllm", "--model-path", "{w}/mac", "--prompt", "hi", "--output", "{w}/ro/o.jsonl"),
        "is not writable",
        "read_only",
    ),
    (
        "output",
        "eval-read-only",
        ("eval", "{w}/mac", "--output", "{w}/ro/out.json"),
        "--output {w}/ro/out.json: the folder {w}/ro is not writable",
        "read_only",
    ),
    (
        "output",
        "recall-read-only",
        ("recall", "--model-path", "{w}/mac", "--output", "{w}/ro/r.json"),
        "--output {w}/ro/r.json: the folder {w}/ro is not writable",
        "read_only",
    ),
    (
        "output",
        "recall-memory-dir-read-only",
        ("recall", "--model-path", "{w}/mac", "--memory-dir", "{w}/ro/mem"),
        "--memory-dir {w}/ro/mem: the folder {w}/ro is not writable",
        "read_only",
    ),
    (
        "output",
        "export-full-disk",
        ("export-mac", "--run", "{w}/runs/mac", "--output", "{w}/full/out"),
        "cannot write {w}/full/out: No space left on device",
        "full_disk",
    ),
    (
        "output",
        "memory-out-full-disk",
        (
            "generate",
            "--model-path",
            "{w}/mac",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--update-rule",
            "surprise",
            "--memory-out",
            "{w}/full/m.safetensors",
        ),
        "No space left on device",
        "full_disk",
    ),
    (
        "output",
        "package-full-disk",
        ("package", "--model-path", "{w}/teacher", "--output", "{w}/full/p"),
        "cannot write {w}/full/p: No space left on device",
        "full_disk",
    ),
    (
        "output",
        "quantize-full-disk",
        (
            "quantize",
            "--model-path",
            "{w}/teacher",
            "--bits",
            "8",
            "--output",
            "{w}/full/q",
            "--eval-blocks",
            "0",
            "--max-new-tokens",
            "1",
        ),
        "cannot write {w}/full/q: No space left on device",
        "full_disk",
    ),
    # -- pickle-only weights: never unpickled, and one line saying how to convert
    (
        "pickle",
        "distil",
        (*DISTIL, "--teacher", "{w}/teacher-pickle"),
        "holds only pickle weights (pytorch_model.bin), which are never unpickled here: safetensors "
        "are needed; convert them",
        None,
    ),
    (
        "pickle",
        "cache-teacher",
        (
            "distil",
            "cache-teacher",
            "--teacher",
            "{w}/teacher-pickle",
            "--data",
            "{w}/corpus",
            "--output",
            "{w}/cache",
        ),
        "safetensors are needed",
        None,
    ),
    (
        "pickle",
        "generate",
        ("generate", "--model-path", "{w}/teacher-pickle", "--prompt", "hi"),
        "safetensors are needed",
        None,
    ),
    (
        "pickle",
        "quantize",
        ("quantize", "--model-path", "{w}/teacher-pickle", "--bits", "8", "--output", "{w}/out"),
        "safetensors are needed",
        None,
    ),
    (
        "pickle",
        "package",
        ("package", "--model-path", "{w}/teacher-pickle", "--output", "{w}/out"),
        "safetensors are needed",
        None,
    ),
    (
        "pickle",
        "vllm",
        ("vllm", "--model-path", "{w}/teacher-pickle", "--prompt", "hi"),
        "safetensors are needed",
        None,
    ),
    (
        "pickle",
        "eval",
        ("eval", "{w}/teacher-pickle", "--output", "{w}/out.json"),
        "safetensors are needed",
        None,
    ),
    # -- truncated safetensors in a model folder
    (
        "truncated",
        "generate",
        ("generate", "--model-path", "{w}/mac-truncated", "--prompt", "hi"),
        "mac-truncated/model.safetensors is unreadable",
        None,
    ),
    (
        "truncated",
        "quantize",
        ("quantize", "--model-path", "{w}/mac-truncated", "--bits", "8", "--output", "{w}/out"),
        "model.safetensors is unreadable",
        None,
    ),
    (
        "truncated",
        "vllm",
        ("vllm", "--model-path", "{w}/mac-truncated", "--prompt", "hi"),
        "model.safetensors is unreadable",
        None,
    ),
    (
        "truncated",
        "eval",
        ("eval", "{w}/mac-truncated", "--output", "{w}/out.json"),
        "model.safetensors is unreadable",
        None,
    ),
    (
        "truncated",
        "recall",
        ("recall", "--model-path", "{w}/mac-truncated"),
        "model.safetensors is unreadable",
        None,
    ),
    (
        "truncated",
        "distil",
        (*DISTIL, "--teacher", "{w}/teacher-truncated"),
        "teacher-truncated/model.safetensors is unreadable",
        None,
    ),
    (
        "truncated",
        "package",
        ("package", "--model-path", "{w}/teacher-truncated", "--output", "{w}/out"),
        "model.safetensors is unreadable",
        None,
    ),
    # -- prompts files that are not UTF-8
    (
        "utf8",
        "generate",
        ("generate", "--model-path", "{w}/mac", "--prompts-file", "{w}/latin1.txt"),
        "latin1.txt: not UTF-8 text (byte 0xe9 at offset 3); save it as UTF-8",
        None,
    ),
    (
        "utf8",
        "vllm",
        ("vllm", "--model-path", "{w}/mac", "--prompts-file", "{w}/latin1.txt"),
        "not UTF-8 text",
        None,
    ),
    (
        "utf8",
        "recall-facts",
        ("recall", "--model-path", "{w}/mac", "--facts", "{w}/latin1.txt"),
        "--facts {w}/latin1.txt: not UTF-8 text (byte 0xe9 at offset 3); save it as UTF-8 JSON",
        None,
    ),
    # -- another model's tokenizer in the folder: larger than the vocabulary, or far smaller
    (
        "tokenizer",
        "generate-larger",
        ("generate", "--model-path", "{w}/mac-bigtok", "--prompt", "hi"),
        "the tokenizer has 49252 tokens, more tokens than the model's 49152 embeddings",
        None,
    ),
    (
        "tokenizer",
        "generate-smaller",
        ("generate", "--model-path", "{w}/mac-smalltok", "--prompt", "hi"),
        "the tokenizer has 4 tokens, far fewer tokens than the model's 49152",
        None,
    ),
    (
        "tokenizer",
        "vllm-larger",
        ("vllm", "--model-path", "{w}/mac-bigtok", "--prompt", "hi"),
        "more tokens than the model's",
        None,
    ),
    (
        "tokenizer",
        "vllm-smaller",
        ("vllm", "--model-path", "{w}/mac-smalltok", "--prompt", "hi"),
        "far fewer tokens than the model's",
        None,
    ),
    (
        "tokenizer",
        "quantize-smaller",
        ("quantize", "--model-path", "{w}/mac-smalltok", "--bits", "8", "--output", "{w}/out"),
        "another model's tokenizer",
        None,
    ),
    (
        "tokenizer",
        "eval-larger",
        ("eval", "{w}/mac-bigtok", "--output", "{w}/out.json"),
        "another model's tokenizer",
        None,
    ),
    (
        "tokenizer",
        "recall-smaller",
        ("recall", "--model-path", "{w}/mac-smalltok"),
        "another model's tokenizer",
        None,
    ),
    (
        "tokenizer",
        "distil-teacher-smaller",
        (*DISTIL, "--teacher", "{w}/teacher-smalltok"),
        "another model's tokenizer",
        None,
    ),
    (
        "tokenizer",
        "package-smaller",
        ("package", "--model-path", "{w}/teacher-smalltok", "--output", "{w}/out"),
        "another model's tokenizer",
        None,
    ),
    # -- nan / inf floats, and --max-new-tokens beyond the model's positions
    (
        "numbers",
        "lr-nan",
        (*DISTIL, "--lr", "nan"),
        "Invalid value for '--lr': 'nan' is not a finite number",
        None,
    ),
    ("numbers", "lr-inf", (*DISTIL, "--lr", "inf"), "'inf' is not a finite number", None),
    ("numbers", "memory-lr-nan", (*DISTIL, "--memory-lr", "nan"), "--memory-lr", None),
    ("numbers", "alpha-nan", (*DISTIL, "--alpha", "nan"), "--alpha", None),
    ("numbers", "long-range-rate-nan", (*DISTIL, "--long-range-rate", "nan"), "--long-range-rate", None),
    (
        "numbers",
        "layer-loss-weight-inf",
        (*DISTIL, "--layer-loss-weight", "inf"),
        "--layer-loss-weight",
        None,
    ),
    (
        "numbers",
        "generate-temperature-nan",
        ("generate", "--model-path", "{w}/mac", "--prompt", "hi", "--temperature", "nan"),
        "not a finite number",
        None,
    ),
    (
        "numbers",
        "vllm-top-p-nan",
        ("vllm", "--model-path", "{w}/mac", "--prompt", "hi", "--top-p", "nan"),
        "not a finite number",
        None,
    ),
    (
        "numbers",
        "quantize-threshold-nan",
        (
            "quantize",
            "--model-path",
            "{w}/teacher",
            "--bits",
            "8",
            "--int8-threshold",
            "nan",
            "--output",
            "{w}/out",
        ),
        "not a finite number",
        None,
    ),
    (
        "numbers",
        "inspect-atol-nan",
        ("inspect", "verify", "{w}/mac", "--atol", "nan"),
        "not a finite number",
        None,
    ),
    (
        "numbers",
        "eval-fraction-nan",
        ("eval", "{w}/mac", "--validation-fraction", "nan"),
        "not a finite number",
        None,
    ),
    (
        "numbers",
        "max-tokens-huge",
        ("generate", "--model-path", "{w}/mac", "--prompt", "hi", "--max-new-tokens", "1000000000"),
        "--max-new-tokens 1000000000 exceeds what {w}/mac can hold: 1024 positions "
        "(max_position_embeddings) minus the prompt; pass --max-new-tokens 1023 or less",
        None,
    ),
    (
        "numbers",
        "max-tokens-after-prompt",
        ("generate", "--model-path", "{w}/mac", "--prompts-file", "{w}/long.txt", "--max-new-tokens", "1000"),
        "+ 1000 new exceeds the model's 1024 positions (max_position_embeddings); pass --max-new-tokens",
        None,
    ),
    # -- `accelerate launch --num_processes 2` that started one process: refused before any work
    (
        "launch",
        "accelerate-without-multi-gpu",
        (*DISTIL, "--teacher", "{w}/teacher"),
        "without --multi_gpu started a single process here (WORLD_SIZE is unset",
        "launch_without_multi_gpu",
    ),
    (
        "launch",
        "accelerate-cpu-without-mpi",
        (*DISTIL, "--teacher", "{w}/teacher"),
        "`accelerate launch --cpu --num_processes N` started a single process (Accelerate needs MPI",
        "launch_cpu_without_mpi",
    ),
    # -- a tracker whose package is missing: named with its install, before any work
    (
        "tracker",
        "distil-wandb-missing",
        (*DISTIL, "--teacher", "{w}/teacher", "--tracker", "wandb"),
        "--tracker wandb needs the wandb package, which is not installed: pip install wandb",
        "no_wandb",
    ),
    # -- a Hub push without network: one line, the export stays where the message says
    (
        "hub",
        "export-mac-push",
        PUSH,
        "push to me/tiny failed (no connection to the Hub (ConnectError",
        "offline_hub",
    ),
]


@pytest.mark.parametrize("kind, name, args, fragment, setup", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(world, request, kind, name, args, fragment, setup):
    if setup:
        request.getfixturevalue(setup)
    if name.startswith("quantize") or name == "quantize":
        pytest.importorskip("bitsandbytes")
    args = [a.replace("{w}", str(world)) for a in args]
    before = snapshot(world)
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert fragment.replace("{w}", str(world)) in errors[0], result.output
    assert result.output.rstrip().endswith(errors[0]), (
        result.output
    )  # the message is the last line, and one line
    after = snapshot(world)
    if setup == "offline_hub":  # the export is written before the push, and the message says where it is
        after = {k: v for k, v in after.items() if not k.startswith("pushed")}
        assert f"the export is in {world}/pushed" in errors[0]
    assert after == before, sorted(set(after.items()) ^ set(before.items()))[:4]


def counts() -> dict:
    out: dict[str, int] = {}
    for case in CASES:
        out[case[0]] = out.get(case[0], 0) + 1
    return out


# ------------------------------------------------------------------------------------------ --interactive


def interact(world, monkeypatch, lines: str, *extra):
    """Run --interactive with `lines` on stdin; return (result, the prompts the model was asked)."""
    from titans_distil import generate

    asked = []
    real = generate.Session.generate

    def record(self, prompt, *args, **kwargs):
        asked.append(prompt)
        return real(self, prompt, *args, **kwargs)

    monkeypatch.setattr(generate.Session, "generate", record)
    result = CliRunner().invoke(
        main,
        ["generate", "--model-path", str(world / "mac"), "--interactive", "--max-new-tokens", "2", *extra],
        input=lines,
    )
    return result, asked


@pytest.mark.parametrize("leave", ["/quit", "/exit", "quit", "exit", "", None])
def test_interactive_leaves_on_quit_words_and_eof(world, monkeypatch, leave):
    lines = "hello\n" + ("" if leave is None else leave + "\nnever sent\n")  # None: EOF (Ctrl-D)
    result, asked = interact(world, monkeypatch, lines)
    assert result.exit_code == 0, result.output
    assert asked == ["hello"]
    assert "/quit, an empty line or Ctrl-D leaves" in result.output  # said at the start


def test_interactive_save_failure_is_reported_and_the_session_goes_on(world, monkeypatch, read_only):
    lines = (
        f"hello\n/save {world}/afile/m.safetensors\n/save {read_only}/m.safetensors\n"
        f"/save {world}/mac\nagain\n/quit\n"
    )
    before = snapshot(world)
    result, asked = interact(world, monkeypatch, lines, "--update-rule", "surprise")
    assert result.exit_code == 0, result.output
    assert asked == ["hello", "again"]
    errors = [line for line in result.output.splitlines() if "Error:" in line]
    assert len(errors) == 3, result.output
    assert "/save " in errors[0] and "afile, which is a file, not a folder" in errors[0]
    assert "is not writable" in errors[1]
    assert "is a folder; give a file name" in errors[2]
    assert "Traceback" not in result.output
    assert snapshot(world) == before


def test_interactive_turn_too_long_is_reported_and_the_session_goes_on(world, monkeypatch):
    result, asked = interact(world, monkeypatch, "word " * 1030 + "\nhi\n/quit\n", "--max-new-tokens", "1")
    assert result.exit_code == 0, result.output
    assert len(asked) == 2 and "exceeds the model's 1024 positions" in result.output


# ------------------------------------------------------------------------------------------ the rules


def test_tokenizer_rule_allows_padding_to_a_multiple_of_128_only():
    from titans_distil.errors import UserError
    from titans_distil.model_folder import check_tokenizer_fits

    class Tok:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    check_tokenizer_fits(Tok(49152), 49152, "embedded")  # the embedded teacher: exactly its vocabulary
    check_tokenizer_fits(Tok(32011), 32064, "padded")  # rounded up to a multiple of 64 (and of 128)
    check_tokenizer_fits(Tok(49100), 49152, "padded")
    for tokens, vocab in ((49153, 49152), (49000, 49152), (4, 49152)):
        with pytest.raises(UserError, match="another model's tokenizer"):
            check_tokenizer_fits(Tok(tokens), vocab, "wrong")


def test_embedded_teacher_tokenizer_matches_its_vocabulary(embedded_dir):
    from transformers import AutoConfig

    assert (
        len(AutoTokenizer.from_pretrained(embedded_dir))
        == AutoConfig.from_pretrained(embedded_dir).vocab_size
        == 49152
    )


def test_every_class_has_cases():
    assert set(counts()) == {
        "types",
        "output",
        "pickle",
        "truncated",
        "utf8",
        "tokenizer",
        "numbers",
        "hub",
        "launch",
        "tracker",
    }


def test_launch_check_accepts_real_multi_process_starts_and_an_inherited_master_addr(monkeypatch):
    from titans_distil import train

    simple_launch(monkeypatch, "False")
    with pytest.raises(train.UserError, match="--multi_gpu"):
        train.check_launch_environment()
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun / --multi_gpu: a real multi-process start
    train.check_launch_environment()
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(train, "_inherited", lambda name: True)  # MASTER_ADDR came from the shell: no request
    train.check_launch_environment()
    monkeypatch.delenv("ACCELERATE_USE_CPU")  # not Accelerate's simple launcher at all
    monkeypatch.setattr(train, "_inherited", lambda name: False)
    train.check_launch_environment()


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc (Linux)")
def test_inherited_reads_the_parent_environment():
    import subprocess
    import sys

    code = "from titans_distil.train import _inherited as i; print(i('TD_PARENT_VAR'), i('TD_NONE'))"
    script = f"import os, subprocess, sys; subprocess.run([sys.executable, '-c', {code!r}])"
    env = {**os.environ, "TD_PARENT_VAR": "1"}
    env.pop("TD_NONE", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "False"], out.stderr
