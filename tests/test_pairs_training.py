"""Input/output training (issue 14, part 2): the loss on the output tokens only, against a direct formula;
one example per block (nothing attends across examples or into pads); the chat template, the plain
separator and FIM; dataset folders; end-to-end runs (Llama and MAC, with an exact resume); bad input."""

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tests.tiny_models import tiny_mac
from titans_distil.cli import distil
from titans_distil.dataset_build.samples import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, dataset_card
from titans_distil.pairs import load_pairs
from titans_distil.train import Distiller, teacher_targets

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [
    {"input": f"Write a function that returns {i}.", "output": f"def f():\n    return {i}\n"}
    for i in range(12)
]
LONG = {"input": "Explain. " * 40, "output": "ok"}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher_dir):
    return AutoTokenizer.from_pretrained(tiny_teacher_dir)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", [*PAIRS, LONG])


def invoke(*args):
    result = CliRunner().invoke(distil, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output.strip()


def run_args(teacher, data, out, name, *extra):
    return [
        "--teacher",
        teacher,
        "--data",
        data,
        "--student-layers",
        2,
        "--max-length",
        96,
        "--batch-size",
        2,
        "--validation-fraction",
        0.2,
        "--eval-batches",
        1,
        "--precision",
        "fp32",
        "--lr",
        "3e-3",
        "--max-steps",
        2,
        "--save-every",
        1,
        "--eval-every",
        1,
        "--output-dir",
        out,
        "--run-name",
        name,
        *extra,
    ]


def own_split(args: list) -> list:
    """The run's arguments without --validation-fraction, which a dataset folder refuses."""
    at = args.index("--validation-fraction")
    return args[:at] + args[at + 2 :]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tiny_llama(seed: int, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


# ------------------------------------------------------------------------------------------------ blocks


def test_chat_template_prompt_output_and_pads(tokenizer, tmp_path):
    pairs = load_pairs(
        str(write_jsonl(tmp_path / "p.jsonl", PAIRS[:3])), tokenizer, 80, "train", validation_fraction=0.0
    )
    assert pairs.blocks.shape == (3, 80) and pairs.weights.shape == (3, 79) and pairs.dropped == 0
    order = {tokenizer.decode(b).split("returns ")[1][0]: i for i, b in enumerate(pairs.blocks)}  # hash order
    block, weight = pairs.blocks[order["1"]], pairs.weights[order["1"]]
    counted = block[1:][weight == 1]  # position p predicts token p + 1
    first = int((weight == 1).nonzero()[0]) + 1
    user = [{"role": "user", "content": PAIRS[1]["input"]}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(block[:first]) == prompt
    assert tokenizer.decode(counted) == PAIRS[1]["output"] + "<|im_end|>\n"
    end = first + len(counted)
    assert (block[end:] == tokenizer.pad_token_id).all() and not weight[end - 1 :].any()


def test_parquet_pairs_give_the_blocks_of_the_same_jsonl(tokenizer, tmp_path):
    pq.write_table(pa.Table.from_pylist(PAIRS), tmp_path / "p.parquet")
    write_jsonl(tmp_path / "p.jsonl", PAIRS)
    rows, lines = (
        load_pairs(str(tmp_path / name), tokenizer, 80, "train", validation_fraction=0.0)
        for name in ("p.parquet", "p.jsonl")
    )
    assert rows.examples == lines.examples == len(PAIRS)
    assert {tuple(b.tolist()) for b in rows.blocks} == {tuple(b.tolist()) for b in lines.blocks}


def test_plain_separator_without_a_template_and_fim_sentinels(tokenizer, tmp_path):
    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    rows = [
        {"input": "2 + 2 =", "output": " 4"},
        {
            "prefix": "def f():\n",
            "middle": "    x = 1\n",
            "suffix": "    return x\n",
            "output": "    x = 1\n",
        },
    ]
    rows[1]["input"] = "<fim_prefix>def f():\n<fim_suffix>    return x\n<fim_middle>"
    pairs = load_pairs(
        str(write_jsonl(tmp_path / "p.jsonl", rows)), plain, 40, "train", validation_fraction=0
    )
    seen = set()
    for block, weight in zip(pairs.blocks, pairs.weights, strict=True):
        first = int((weight == 1).nonzero()[0]) + 1
        seen.add((plain.decode(block[:first]), plain.decode(block[1:][weight == 1])))
    assert seen == {
        ("2 + 2 =\n", " 4<|im_end|>"),  # input, separator; output, eos
        ("<fim_prefix>def f():\n<fim_suffix>    return x\n<fim_middle>", "    x = 1\n<|im_end|>"),
    }
    assert "<fim_prefix>" not in plain.get_vocab()  # plain-text sentinels: ordinary tokens
    # a tokenizer with Qwen-style FIM tokens gets them (one token each), not the plain-text names
    qwen = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    qwen.add_special_tokens(
        {"additional_special_tokens": ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]}
    )
    fim = load_pairs(
        str(write_jsonl(tmp_path / "f.jsonl", rows[1:])), qwen, 40, "train", validation_fraction=0
    )
    first = int((fim.weights[0] == 1).nonzero()[0]) + 1
    assert (
        qwen.decode(fim.blocks[0, :first])
        == "<|fim_prefix|>def f():\n<|fim_suffix|>    return x\n<|fim_middle|>"
    )
    assert fim.blocks[0, 0] == qwen.convert_tokens_to_ids("<|fim_prefix|>")


def fim_row(i: int) -> dict:
    prefix, middle, suffix = f"def f{i}():\n", f"    x = {i}\n", "    return x\n"
    model_input = f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}"
    meta = {"repository": "r", "language": "python", "operation": "modified"}
    return {
        **meta,
        "prefix": prefix,
        "middle": middle,
        "suffix": suffix,
        "input": model_input,
        "output": middle,
        "text": model_input + middle,
    }


def test_dataset_folder_trains_on_its_own_splits(tiny_teacher_dir, tokenizer, tmp_path):
    """A build_dataset.py-shaped folder: `fim` with train and validation splits, `pairs` with train only."""
    built = {
        "fim": {"train": [fim_row(i) for i in range(6)], "validation": [fim_row(i) for i in range(6, 8)]},
        "pairs": {"train": [{**fim_row(0), **PAIRS[0]}]},
    }
    folder = tmp_path / "dataset"
    for name, splits in built.items():
        (folder / name).mkdir(parents=True)
        for split, rows in splits.items():
            pq.write_table(pa.Table.from_pylist(rows), folder / name / f"{split}.parquet")
    (folder / "README.md").write_text(dataset_card(built, {"fim": 0, "pairs": 0}, {}, "commit", (0.1, 0.1)))
    train = load_pairs(f"{folder}:fim", tokenizer, 64, "train", validation_fraction=0.05)
    val = load_pairs(f"{folder}:fim", tokenizer, 64, "validation", validation_fraction=0.05)
    assert (train.examples, val.examples) == (6, 2)
    first = int((val.weights[0] == 1).nonzero()[0]) + 1
    assert tokenizer.decode(val.blocks[0, :first]) == fim_row(6)["input"]
    assert tokenizer.decode(val.blocks[0, 1:][val.weights[0] == 1]) == "    x = 6\n<|im_end|>"

    args = run_args(tiny_teacher_dir, f"{folder}:fim", tmp_path, "fim", "--max-length", 64, "--save-every", 0)
    code, out = invoke(*args)
    assert code == 1 and out == (
        f"Error: --validation-fraction does not apply to dataset folder {folder}:fim, which brings its own "
        "validation split; drop --validation-fraction"
    )
    code, out = invoke(*own_split(args), "--eval-every", 0)
    assert code == 0 and "pairs: 6 training and 2 validation examples" in out, out
    assert records(tmp_path / "fim")[-1]["step"] == 2
    shown = repr(str(folder))
    for data, message in [
        (folder, f"{shown} is a dataset folder (configs: fim, pairs); name one as {folder}:fim"),
        (f"{folder}:nope", f"dataset folder {shown} has no config 'nope'; use one of fim, pairs"),
        (
            f"{folder}:pairs",
            f"dataset folder '{folder}:pairs' has no validation split; build it with a "
            "validation fraction > 0",
        ),
        (
            f"{folder}:fim#text",
            f"a dataset folder is read as input/output pairs, so '#text' does not apply to "
            f"'{folder}:fim#text'; for plain text point --data at one of its .parquet files with #text",
        ),
    ]:
        code, out = invoke(*own_split(run_args(tiny_teacher_dir, data, tmp_path, "bad")))
        assert (code, out) == (1, f"Error: {message}"), out


# ------------------------------------------------------------------------------------------------ loss


def test_loss_counts_output_positions_only_against_the_direct_formula(tokenizer, pairs_file):
    pairs = load_pairs(str(pairs_file), tokenizer, 64, "train", validation_fraction=0.0)
    assert pairs.dropped == 1  # LONG
    ids, weights = pairs.blocks[:3], pairs.weights[:3]
    teacher, student = tiny_llama(0, 3), tiny_llama(1)
    alpha, temperature = 0.4, 2.0
    loss, kd, ce, _ = Distiller(student)(
        ids,
        teacher_targets(teacher, ids),
        kind="kl",
        temperature=temperature,
        alpha=alpha,
        chunk_size=7,
        position_weights=weights,
    )
    with torch.no_grad():
        t_logits, s_logits = teacher(ids).logits[:, :-1], student(ids).logits[:, :-1]
    t_logp = F.log_softmax(t_logits / temperature, -1)
    kl = (t_logp.exp() * (t_logp - F.log_softmax(s_logits / temperature, -1))).sum(-1)
    nll = F.cross_entropy(s_logits.transpose(1, 2), ids[:, 1:], reduction="none")
    mask = weights == 1
    assert 0 < mask.sum() < mask.numel() / 2  # most positions are prompt or pad
    torch.testing.assert_close(kd, kl[mask].mean())
    torch.testing.assert_close(ce, nll[mask].mean())
    torch.testing.assert_close(
        loss, alpha * temperature**2 * kl[mask].mean() + (1 - alpha) * nll[mask].mean()
    )


@pytest.mark.parametrize("student", ["llama", "mac"])
def test_no_example_sees_another_or_its_pads(tokenizer, pairs_file, student):
    pairs = load_pairs(str(pairs_file), tokenizer, 64, "train", validation_fraction=0.0)
    model = tiny_llama(1) if student == "llama" else tiny_mac(segment_len=16, memory_chunk_size=4)
    teacher = tiny_llama(0, 3)

    def loss_of(ids, weights):
        return Distiller(model)(
            ids,
            teacher_targets(teacher, ids),
            kind="kl",
            temperature=1.0,
            alpha=0.5,
            chunk_size=64,
            position_weights=weights,
        )[0]

    ids, weights = pairs.blocks[:2].clone(), pairs.weights[:2].clone()
    alone = loss_of(ids[:1], weights[:1])
    weights[1] = 0  # the other example is in the batch but not counted
    with torch.no_grad():
        together = loss_of(ids, weights)
        ids[1] = pairs.blocks[5]  # another example beside it
        other = loss_of(ids, weights)
        end = int(pairs.weights[0].nonzero()[-1]) + 2  # past the last output token: pads only
        ids[0, end:] = torch.randint(100, 40000, (64 - end,))
        repadded = loss_of(ids, weights)
    for value in (together, other, repadded):
        torch.testing.assert_close(value, alone, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ runs


def test_distil_on_pairs_logs_output_perplexity_and_resumes_exactly(tiny_teacher_dir, pairs_file, tmp_path):
    code, out = invoke(*run_args(tiny_teacher_dir, pairs_file, tmp_path, "full"))
    assert code == 0, out
    assert (
        "pairs: 8 training and 4 validation examples (2 evaluated), one per block padded to 96 tokens; "
        "longer ones dropped: 1 of 9 training, 0 of 4 validation" in out
    )
    rows = records(tmp_path / "full")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["teacher_val_ppl"] > 1 and all(r["val_ppl"] > 1 for r in rows)
    run = tmp_path / "killed"
    shutil.copytree(tmp_path / "full", run)
    shutil.rmtree(run / "checkpoints" / "step-000002")
    shutil.rmtree(run / "final")
    code, out = invoke("--output-dir", tmp_path, "--run-name", "killed", "--resume")
    assert code == 0 and "resumed" in out, out
    assert [r.get("loss") for r in records(run)] == [r.get("loss") for r in rows]


def test_distil_on_pairs_with_mac(tiny_teacher_dir, pairs_file, tmp_path):
    mac = (
        "--use-mac",
        "--segment-len",
        16,
        "--memory-chunk-size",
        8,
        "--persistent-tokens",
        4,
        "--memory-layers",
        1,
    )
    code, out = invoke(*run_args(tiny_teacher_dir, pairs_file, tmp_path, "mac", *mac, "--save-every", 0))
    assert code == 0, out
    rows = records(tmp_path / "mac")
    assert rows[-1]["step"] == 2 and all(r["val_ppl"] > 1 for r in rows)
    assert "mem_surprise_norm" in rows[-1]  # the memory read the sequences
    assert (tmp_path / "mac" / "final" / "config.json").is_file()


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_pairs_input_is_one_line_and_writes_nothing(tiny_teacher_dir, pairs_file, tokenizer, tmp_path):
    missing = write_jsonl(tmp_path / "missing.jsonl", [PAIRS[0], {"input": "x"}])
    empty = write_jsonl(tmp_path / "empty.jsonl", [PAIRS[0], PAIRS[1], {"input": "x", "output": " \n"}])
    first_lacks = write_jsonl(tmp_path / "first.jsonl", [{"output": "y"}, PAIRS[0]])
    too_long = write_jsonl(tmp_path / "long.jsonl", [{**LONG, "output": f"ok {i}"} for i in range(5)])
    rendered = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": LONG["input"]}, {"role": "assistant", "content": f"ok {i}"}],
            tokenize=False,
        )
        for i in range(5)
    ]
    lengths = {len(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]}
    assert len(lengths) == 1
    shortest = lengths.pop()
    cases = [
        (
            missing,
            (),
            "missing.jsonl:2: no 'input' and 'output' strings; every row of a pairs source needs both, "
            "fix or drop the row",
        ),
        (
            first_lacks,
            (),
            "first.jsonl:1: no 'input' and 'output' strings; every row of a pairs source needs "
            "both, fix or drop the row",
        ),
        (empty, (), "empty.jsonl:3: empty 'output'; a pair trains on its output only, fix or drop the row"),
        (
            pairs_file,
            ("--long-range-rate", 0.5, "--max-length", 160),
            "--long-range-rate rewrites packed text blocks, and --data holds input/output pairs; drop "
            "--long-range-rate or train on a text source",
        ),
        (
            pairs_file,
            ("--teacher-cache", tmp_path / "cache"),
            "--teacher-cache holds targets of packed text blocks, and --data holds input/output pairs; drop "
            "--teacher-cache (pairs train with the live teacher)",
        ),
        (
            f"stdlib:0.5,{pairs_file}:0.5",
            (),
            f"--data mixes input/output pairs ({pairs_file}) with other sources; train on the pairs source "
            "alone",
        ),
        (
            too_long,
            ("--max-length", 40),
            f"all 2 train pairs of {str(too_long)!r} are longer than --max-length 40 tokens (the shortest "
            f"takes {shortest}); pass --max-length {shortest} or more",
        ),
    ]
    for data, extra, message in cases:
        code, out = invoke(*run_args(tiny_teacher_dir, data, tmp_path / "runs", "bad", *extra))
        assert (code, out) == (1, f"Error: {message}"), out
        assert not (tmp_path / "runs" / "bad").exists()
    code, out = invoke(
        "cache-teacher", "--teacher", tiny_teacher_dir, "--data", pairs_file, "--output", tmp_path / "c"
    )
    assert (code, out) == (
        1,
        "Error: cache-teacher stores targets of packed text blocks, and --data holds "
        "input/output pairs, which train with the live teacher; pass a text source to --data",
    )
    assert not (tmp_path / "c").exists()
