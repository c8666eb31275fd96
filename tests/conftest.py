"""Shared fixtures: the embedded teacher (converted once into the user cache), a tiny random Llama teacher
with the same tokenizer (fast multi-step runs), and a small real corpus. Nothing is downloaded."""

import os
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run much faster on one thread, above all when other processes share the two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from titans_distil.teacher import embedded_teacher_dir

    return embedded_teacher_dir()


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, embedded_dir) -> Path:
    """A 4-layer random Llama sharing the embedded teacher's tokenizer (vocab 49152)."""
    out = tmp_path_factory.mktemp("tiny-teacher")
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(embedded_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """Twenty real standard-library modules in a folder: enough for dozens of short blocks."""
    out = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in [
        "abc",
        "bisect",
        "calendar",
        "colorsys",
        "copy",
        "dataclasses",
        "fnmatch",
        "functools",
        "heapq",
        "keyword",
        "linecache",
        "numbers",
        "operator",
        "queue",
        "random",
        "shlex",
        "string",
        "textwrap",
        "types",
        "weakref",
    ]:
        shutil.copy(stdlib / f"{name}.py", out / f"{name}.py")
    return out
