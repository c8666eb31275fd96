"""End-to-end distillation runs through the CLI: resume after SIGKILL, multi-process, bad input, offline
cache."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from titans_distil.cli import distil

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def tiny_args(teacher, corpus, out, name, *extra):
    return [
        "--teacher",
        str(teacher),
        "--data",
        str(corpus),
        "--student-layers",
        "2",
        "--max-length",
        "32",
        "--batch-size",
        "2",
        "--validation-fraction",
        "0.2",
        "--eval-batches",
        "2",
        "--precision",
        "fp32",
        "--output-dir",
        str(out),
        "--run-name",
        name,
        *map(str, extra),
    ]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def run_cli(*args, env_extra=None, launcher=(PY, str(ROOT / "distil.py"))):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([*launcher, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)


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


# MAC with the recipe flags: the kill (step 3) and the resume fall on either side of the unfreeze (step 4);
# the items need 32 + 128 tokens.
RECIPE_FLAGS = (
    *MAC_FLAGS,
    "--memory-lr",
    "2e-2",
    "--freeze-backbone-steps",
    4,
    "--long-range-rate",
    "0.5",
    "--max-length",
    160,
)
STUDENT_FLAGS = {"llama": (), "mac": MAC_FLAGS, "mac-recipe": RECIPE_FLAGS}


@pytest.mark.parametrize("student", list(STUDENT_FLAGS))
def test_sigkill_and_resume_reproduces_uninterrupted_losses(
    tiny_teacher_dir, small_corpus, tmp_path, student
):
    common = ("--max-steps", 8, "--save-every", 3, "--eval-every", 0, "--lr", "3e-3", *STUDENT_FLAGS[student])
    full = run_cli(*tiny_args(tiny_teacher_dir, small_corpus, tmp_path, "full", *common))
    assert full.returncode == 0, full.stderr[-2000:]

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            PY,
            str(ROOT / "distil.py"),
            *tiny_args(tiny_teacher_dir, small_corpus, tmp_path, "killed", *common),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = tmp_path / "killed" / "checkpoints" / "step-000003"
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists() and not (tmp_path / "killed" / "final").exists(), (
        "the run must be killed mid-way"
    )

    resumed = run_cli(*tiny_args(tiny_teacher_dir, small_corpus, tmp_path, "killed", *common, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed" in resumed.stdout + resumed.stderr
    want, got = losses(tmp_path / "full"), losses(tmp_path / "killed")
    assert sorted(got) == list(range(1, 9))
    assert got == want  # bit-identical per-step losses


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_teacher_dir, small_corpus, tmp_path):
    common = ("--max-steps", 3, "--save-every", 0, "--eval-every", 0, "--lr", "3e-3")
    one = run_cli(*tiny_args(tiny_teacher_dir, small_corpus, tmp_path, "one", *common))
    assert one.returncode == 0, one.stderr[-2000:]
    want = losses(tmp_path / "one")
    for launcher in ("accelerate", "torchrun"):  # bin/train-distributed: gloo on a CPU-only host
        args = tiny_args(tiny_teacher_dir, small_corpus, tmp_path, launcher, *common)
        args[args.index("--batch-size") + 1] = "1"  # 2 processes x 1 = the single process's batch of 2
        two = run_cli(*args, launcher=[str(ROOT / "bin" / "train-distributed"), "--launcher", launcher, "2"])
        assert two.returncode == 0, two.stderr[-3000:]
        got = losses(tmp_path / launcher)
        assert sorted(got) == [1, 2, 3]
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-4)
        rows = [json.loads(line) for line in (tmp_path / launcher / "metrics.jsonl").read_text().splitlines()]
        assert rows[0]["val_ppl"] == pytest.approx(
            json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[0])["val_ppl"], rel=1e-5
        )
    launch = [
        PY,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29533",
    ]
    # Accelerate's simple launcher (--cpu without MPI, or no --multi_gpu on a host without N GPUs) starts one
    # process: refused with our one line, and the launcher is stopped before it adds a traceback of its own.
    for name, flags, fragment in (
        ("alone-cpu", ["--cpu"], "started a single process (Accelerate needs MPI for that)"),
        ("alone", [], "without --multi_gpu started a single process here"),
    ):
        alone = run_cli(
            *tiny_args(tiny_teacher_dir, small_corpus, tmp_path, name, *common),
            launcher=[*launch, *flags, str(ROOT / "distil.py")],
        )
        assert alone.returncode != 0 and fragment in alone.stderr, alone.stderr[-2000:]
        assert "Traceback" not in alone.stderr and not (tmp_path / name).exists(), alone.stderr[-2000:]


def test_memory_parts_get_their_own_lr_and_learn_while_the_backbone_is_frozen(
    tiny_teacher_dir, small_corpus, tmp_path, one_thread
):
    from safetensors.torch import load_file
    from titans_distil.models.neural_memory import NeuralMemory

    from titans_distil.student import build_student
    from titans_distil.train import parameter_groups

    mac = {"segment_len": 16, "memory_chunk_size": 8, "num_persistent_tokens": 4, "memory_layers": [1]}
    student = build_student(LlamaForCausalLM.from_pretrained(tiny_teacher_dir), [0, 3], mac)
    groups = {name: {id(p) for p in params} for name, params in parameter_groups(student).items()}
    layer = student.model.layers[1]
    assert isinstance(layer.memory, NeuralMemory)
    assert groups["memory"] == {id(p) for p in layer.memory.parameters()}
    assert groups["persistent"] == {id(layer.persistent_tokens)} and groups["gate"] == {id(layer.memory_gate)}
    fresh = groups["memory"] | groups["persistent"] | groups["gate"]
    assert groups["backbone"] == {id(p) for p in student.parameters()} - fresh

    run = ("--max-steps", 3, "--save-every", 1, "--eval-every", 0, "--warmup", 0, "--lr", "1e-3")
    recipe = ("--memory-lr", "2e-2", "--freeze-backbone-steps", 2)
    args = tiny_args(tiny_teacher_dir, small_corpus, tmp_path, "frozen", *MAC_FLAGS, *run, *recipe)
    code, out = invoke(*args)
    assert code == 0, out
    rows = [json.loads(line) for line in (tmp_path / "frozen" / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["lr"] for r in rows] == [0.0, 0.0, 1e-3]  # backbone: frozen, then its own (instant) warm-up
    for name in ("memory", "persistent", "gate"):  # cosine over the 3 steps
        assert [r[f"lr_{name}"] for r in rows] == pytest.approx([2e-2, 2e-2 * 0.75, 2e-2 * 0.25])
    checkpoints = tmp_path / "frozen" / "checkpoints"
    weights = [load_file(checkpoints / f"step-{s:06d}" / "model.safetensors") for s in (1, 2, 3)]
    role = {n: next(g for g, ids in groups.items() if id(p) in ids) for n, p in student.named_parameters()}
    initial = student.state_dict()  # the backbone as built from the teacher
    for name, group in role.items():
        if group == "backbone":
            assert all(torch.equal(w[name], initial[name]) for w in weights[:2]), name
        else:  # the gate opens in step 1, so every memory part has a gradient by step 2
            assert not torch.equal(weights[0][name], weights[1][name]), name
    assert any(not torch.equal(weights[2][n], initial[n]) for n, group in role.items() if group == "backbone")


def test_long_range_items_mixed_into_training_leave_validation_alone(
    tiny_teacher_dir, small_corpus, tmp_path, one_thread
):
    common = (*MAC_FLAGS, "--max-length", 160, "--max-steps", 2, "--save-every", 0, "--eval-every", 0)
    mixing = ("--long-range-rate", "0.5", "--long-range-kinds", "passkey,kv")
    code, out = invoke(*tiny_args(tiny_teacher_dir, small_corpus, tmp_path, "mixed", *common, *mixing))
    assert code == 0, out
    n_train = int(re.search(r"in (\d+) of (\d+) training blocks", out).group(2))
    assert (
        f"long-range items (passkey,kv, distance 32) in {round(0.5 * n_train)} of {n_train} training blocks"
        in out
    )
    code, out = invoke(*tiny_args(tiny_teacher_dir, small_corpus, tmp_path, "plain", *common))
    assert code == 0 and "long-range" not in out, out
    mixed, plain = (
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("mixed", "plain")
    )
    assert mixed[0]["val_ppl"] == plain[0]["val_ppl"]  # same student, same validation blocks
    assert [r["loss"] for r in mixed[1:]] != [r["loss"] for r in plain[1:]]  # different training blocks


def test_answer_weights_mark_the_positions_that_predict_each_answer():
    from titans_distil.long_range import Item
    from titans_distil.train import answer_weights

    item = Item("passkey", list(range(20)), (2, 5), (12, 15), (15, 18), "k")
    weights = answer_weights((3, 20), [(1, item)], 4.0)
    want = torch.ones(3, 19)
    want[1, 14:17] = 4.0  # positions 14, 15, 16 predict the answer tokens 15, 16, 17
    assert torch.equal(weights, want)
    assert answer_weights((3, 20), [(1, item)], 1.0) is None


def test_answer_loss_weight_changes_the_loss_of_long_range_blocks_only(
    tiny_teacher_dir, small_corpus, tmp_path, one_thread
):
    common = (
        *MAC_FLAGS,
        "--max-length",
        160,
        "--max-steps",
        2,
        "--save-every",
        0,
        "--eval-every",
        0,
        "--long-range-rate",
        "1.0",
    )
    runs = {"plain": (), "weighted": ("--answer-loss-weight", "20")}
    for name, extra in runs.items():
        code, out = invoke(*tiny_args(tiny_teacher_dir, small_corpus, tmp_path, name, *common, *extra))
        assert code == 0, out
    plain, weighted = (
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in runs
    )
    assert plain[1]["kd"] == weighted[1]["kd"] and plain[1]["ce"] == weighted[1]["ce"]  # same first forward
    assert plain[1]["loss"] != weighted[1]["loss"]


def test_layer_loss_pulls_each_student_layer_to_its_teacher_layer(
    tiny_teacher_dir, small_corpus, tmp_path, one_thread
):
    from titans_distil.student import build_student
    from titans_distil.train import Distiller, layer_outputs, teacher_targets

    teacher = LlamaForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with layer_outputs(teacher.model.layers, [0, 3]) as captured:
        targets = teacher_targets(teacher, ids)
    reference = teacher.model(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.equal(captured[0], reference[1])  # layer t's output is hidden state t + 1 ...
    assert torch.allclose(teacher.model.norm(captured[3]), reference[4])  # ... the last one before its norm
    teacher_hidden = {s: captured[t].clone() for s, t in enumerate((0, 3))}

    def run(student, weight, hidden, part="hidden"):
        return Distiller(student)(
            ids,
            targets,
            kind="kl",
            temperature=1.0,
            alpha=0.9,
            chunk_size=16,
            layer_targets=hidden,
            layer_part=part,
            layer_weight=weight,
        )

    whole = build_student(teacher, [0, 1, 2, 3])  # the teacher itself: nothing to pull
    with layer_outputs(teacher.model.layers, range(4)) as every:
        teacher_targets(teacher, ids)
    assert run(whole, 1.0, {t: every[t].clone() for t in range(4)})[3]["layer_mse"] == 0

    mac = {"segment_len": 16, "memory_chunk_size": 8, "num_persistent_tokens": 4, "memory_layers": [1]}
    student = build_student(teacher, [0, 3], mac)
    plain, *_ = run(student, 0.0, None)
    plain.backward()
    plain_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    loss, kd, ce, stats = run(student, 0.5, teacher_hidden)
    assert "layer_mse" in stats and stats["layer_mse"] > 0
    assert loss.item() == pytest.approx(plain.item() + 0.5 * stats["layer_mse"].item(), rel=1e-6)
    loss.backward()
    assert any(not torch.equal(p.grad, g) for p, g in zip(student.parameters(), plain_grads, strict=True))

    run_flags = ("--max-steps", 2, "--save-every", 0, "--eval-every", 0, "--layer-loss-weight", "0.5")
    code, out = invoke(*tiny_args(tiny_teacher_dir, small_corpus, tmp_path, "layers", *MAC_FLAGS, *run_flags))
    assert code == 0, out
    rows = [json.loads(line) for line in (tmp_path / "layers" / "metrics.jsonl").read_text().splitlines()][1:]
    for row in rows:
        assert row["layer_mse"] > 0 and "mem_layer_mse" not in row
        kd_and_ce = 0.9 * row["kd"] + 0.1 * row["ce"]
        assert row["loss"] == pytest.approx(kd_and_ce + 0.5 * row["layer_mse"], rel=1e-4)


def test_attention_transfer_pulls_the_memory_layers_attention_to_the_teachers(
    tiny_teacher_dir, small_corpus, tmp_path, one_thread
):
    from titans_distil.student import build_student
    from titans_distil.train import Distiller, layer_outputs, teacher_targets

    teacher = LlamaForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    attention = []  # a hook that returned the tensor would replace the module's output
    hook = teacher.model.layers[3].self_attn.register_forward_hook(
        lambda module, args, output: attention.append(output[0]) and None
    )
    with layer_outputs(teacher.model.layers, [3], "attention") as captured:
        targets = teacher_targets(teacher, ids)
    hook.remove()
    # what attention adds to the residual stream, read as norm input - layer input
    assert torch.allclose(captured[3], attention[0], atol=1e-6)

    mac = {"segment_len": 8, "memory_chunk_size": 4, "num_persistent_tokens": 4, "memory_layers": [1]}
    student = build_student(teacher, [0, 3], mac)
    target = captured[3].clone()  # inference tensors cannot enter the student's graph
    with torch.no_grad(), layer_outputs(student.model.layers, [1], "attention") as mine:
        student.model(input_ids=ids)
    expected = F.mse_loss(mine[1], target) / target.square().mean()
    _, _, _, stats = Distiller(student)(
        ids,
        targets,
        kind="kl",
        temperature=1.0,
        alpha=0.9,
        chunk_size=16,
        layer_targets={1: target},
        layer_part="attention",
        layer_weight=1.0,
    )
    assert stats["attention_mse"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert 0 < expected < 1  # segment-local attention misses part of the full-context output, not all

    run_flags = ("--max-steps", 2, "--save-every", 0, "--eval-every", 0, "--layer-loss-weight", "2")
    flag = ("--layer-loss-target", "attention")
    args = tiny_args(tiny_teacher_dir, small_corpus, tmp_path, "attn", *MAC_FLAGS, *run_flags, *flag)
    code, out = invoke(*args)
    assert code == 0, out
    rows = [json.loads(line) for line in (tmp_path / "attn" / "metrics.jsonl").read_text().splitlines()][1:]
    for row in rows:
        assert row["attention_mse"] > 0 and "layer_mse" not in row
        kd_and_ce = 0.9 * row["kd"] + 0.1 * row["ce"]
        assert row["loss"] == pytest.approx(kd_and_ce + 2 * row["attention_mse"], rel=1e-4)


def as_written_before_the_recipe(run_dir: Path, step: int) -> None:
    """Make a run look like one from before optimizer groups: no recipe fields, one unnamed group."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((run_dir / "config.json").read_text())
    recipe = (
        "memory_lr",
        "freeze_backbone_steps",
        "long_range_rate",
        "long_range_kinds",
        "long_range_distance",
        "layer_loss_weight",
        "answer_loss_weight",
    )
    for key in recipe:
        del config[key]
    (run_dir / "config.json").write_text(json.dumps(config))
    path = run_dir / "checkpoints" / f"step-{step:06d}" / "optimizer.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["optimizer"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    groups = meta["param_groups"]
    meta["param_groups"] = [
        {
            **{k: v for k, v in groups[0].items() if k != "name"},
            "params": [i for g in groups for i in g["params"]],
        }
    ]
    save_file(tensors, str(path), metadata={"optimizer": json.dumps(meta)})


def test_runs_from_before_the_recipe_resume_or_say_why_not(
    tiny_teacher_dir, small_corpus, tmp_path, one_thread
):
    common = ("--max-steps", 2, "--save-every", 1, "--eval-every", 0)
    for name in ("full", "old"):
        code, out = invoke(*tiny_args(tiny_teacher_dir, small_corpus, tmp_path, name, *common))
        assert code == 0, out
    shutil.rmtree(tmp_path / "old" / "checkpoints" / "step-000002")
    as_written_before_the_recipe(tmp_path / "old", 1)
    code, out = invoke(*tiny_args(tiny_teacher_dir, small_corpus, tmp_path, "old", *common, "--resume"))
    assert code == 0 and "resumed" in out, out
    assert losses(tmp_path / "old") == losses(tmp_path / "full")

    mac = tiny_args(tiny_teacher_dir, small_corpus, tmp_path, "old-mac", *MAC_FLAGS, "--max-steps", 1)
    code, out = invoke(*mac)
    assert code == 0, out
    as_written_before_the_recipe(tmp_path / "old-mac", 1)
    code, out = invoke(*mac, "--max-steps", 2, "--resume")
    assert code == 1 and "\n" not in out, out
    assert "optimizer groups [None] but this run has ['backbone', 'memory', 'persistent', 'gate']" in out
    assert "written by an older titans-distil: resume it with that version or start a new run" in out


def invoke(*args):
    result = CliRunner().invoke(distil, [str(a) for a in args])
    return result.exit_code, result.output.strip()


def test_bad_input_is_one_line_error_and_touches_nothing(tiny_teacher_dir, small_corpus, tmp_path):
    base = tiny_args(tiny_teacher_dir, small_corpus, tmp_path, "r", "--max-steps", 1)
    # A foreign run in the way: refused, files untouched.
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text('{"precious": true}')
    code, out = invoke(*base)
    assert (
        code == 1
        and out
        == f"Error: {tmp_path / 'r'} already holds a run; pass --resume to continue it, --overwrite to "
        "replace it, or choose another --run-name"
    )
    assert (tmp_path / "r" / "config.json").read_text() == '{"precious": true}'
    # Resume with a different config.
    (tmp_path / "r" / "config.json").write_text(json.dumps({"teacher": "other"}))
    code, out = invoke(*base, "--resume")
    assert (
        code == 1
        and "was started with a different config (teacher: run has 'other'" in out
        and "\n" not in out
    )

    cases = [
        (
            ["--teacher", str(tmp_path / "nope")],
            "does not exist; pass an existing folder, a .gguf file, a Hub id or 'embedded'",
        ),
        (
            ["--max-length", "4096"],
            "--max-length 4096 exceeds the teacher's 1024 positions; pass --max-length 1024 or less",
        ),
        (["--data", str(tmp_path / "empty")], "empty"),
        (
            ["--data", str(tmp_path / "short")],
            "fewer than --max-length 32; use a larger --data or a smaller --max-length",
        ),
        (["--student-layers", "9"], "--student-layers 9 is out of range; the teacher has 4 layers"),
        (
            ["--use-mac", "--segment-len", "16", "--memory-chunk-size", "6"],
            "invalid memory settings: memory_chunk_size (6) must divide segment_len (16)",
        ),
        (
            ["--use-mac", "--memory-layers", "x"],
            "--memory-layers 'x' is not a comma-separated list of student layer indices",
        ),
        (
            ["--use-mac", "--memory-layers", "5"],
            "invalid memory settings: memory_layers [5] holds indices [5] outside 0..1",
        ),
        (["--memory-lr", "1e-3"], "--memory-lr needs a student with memory (nothing else would train)"),
        (["--freeze-backbone-steps", "1"], "--freeze-backbone-steps needs a student with memory"),
        (["--use-mac", "--memory-layers", "", "--freeze-backbone-steps", "1"], "needs a student with memory"),
        (["--use-mac", "--freeze-backbone-steps", "2"], "--freeze-backbone-steps 2 exceeds --max-steps 1"),
        (["--long-range-rate", "-0.1"], "--long-range-rate -0.1 is not a fraction in [0, 1]"),
        (["--long-range-rate", "1.5"], "--long-range-rate 1.5 is not a fraction in [0, 1]"),
        (
            ["--long-range-kinds", "passkey,needle"],
            "--long-range-kinds 'passkey,needle' names no or unknown kinds",
        ),
        (
            ["--long-range-rate", "0.5"],
            "--long-range-distance 512 needs 640 tokens per item (distance + 128) but "
            "--max-length is 32; pass a larger --max-length or a smaller",
        ),
        (
            ["--long-range-rate", "0.5", "--long-range-distance", "8", "--teacher-cache", tmp_path / "cache"],
            "--long-range-rate rewrites training blocks, which the teacher targets stored in --teacher-cache",
        ),
        (["--layer-loss-weight", "-1"], "--layer-loss-weight -1.0 is not a number >= 0"),
        (
            ["--layer-loss-weight", "0.1", "--teacher-cache", tmp_path / "cache"],
            "--layer-loss-weight needs the teacher's hidden states, which a --teacher-cache does not hold",
        ),
        (
            ["--layer-loss-weight", "1", "--layer-loss-target", "attention"],
            "--layer-loss-target attention pulls the memory layers' attention output; add --use-mac",
        ),
        (
            ["--use-mac", "--layer-loss-target", "attention"],
            "--layer-loss-target attention does nothing while --layer-loss-weight is 0",
        ),
        (["--answer-loss-weight", "0"], "--answer-loss-weight 0.0 is not a number > 0; pass e.g. 10"),
        (
            ["--answer-loss-weight", "5"],
            "--answer-loss-weight 5.0 weights the answers of long-range items, and --long-range-rate is 0",
        ),
    ]
    (tmp_path / "empty").mkdir()
    (tmp_path / "short").mkdir()
    for name in "abcde":
        (tmp_path / "short" / f"{name}.txt").write_text("print('hello')\n")
    for extra, message in cases:
        code, out = invoke(*base, "--run-name", "fresh", *extra)
        assert code == 1 and message in out and "\n" not in out, (extra, out)
        assert not (tmp_path / "fresh").exists()
    rejected_by_click = [
        ("--lr", "-1"),
        ("--batch-size", "0"),
        ("--alpha", "1.5"),
        ("--loss", "mse"),
        ("--layer-loss-target", "logits"),
        ("--memory-lr", "-1"),
        ("--freeze-backbone-steps", "-1"),
        ("--long-range-distance", "-1"),
        # nan and inf pass click's range checks; the finite float type refuses them
        ("--memory-lr", "nan"),
        ("--long-range-rate", "nan"),
        ("--layer-loss-weight", "nan"),
        ("--answer-loss-weight", "nan"),
        ("--lr", "inf"),
    ]
    for flag, value in rejected_by_click:
        code, out = invoke(*base, flag, value)
        assert code == 2 and f"Invalid value for '{flag}'" in out


def test_tokenizer_larger_than_teacher_vocab_is_refused(tiny_teacher_dir, small_corpus, tmp_path):
    small_vocab = tmp_path / "small-vocab"
    config = LlamaConfig(
        vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(small_vocab)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (small_vocab / name).write_bytes((tiny_teacher_dir / name).read_bytes())
    code, out = invoke(*tiny_args(small_vocab, small_corpus, tmp_path, "v", "--max-steps", 1))
    assert code == 1 and out == (
        f"Error: teacher {small_vocab}: the tokenizer has 49152 tokens, more tokens than the "
        "model's 1000 embeddings (at most a padding to a multiple of 128 is allowed); it is "
        "another model's tokenizer: save the model's own tokenizer into the folder"
    )


def test_teacher_cache_trains_without_the_teacher(tiny_teacher_dir, small_corpus, tmp_path):
    data = [
        "--teacher",
        str(tiny_teacher_dir),
        "--data",
        str(small_corpus),
        "--max-length",
        "32",
        "--validation-fraction",
        "0.2",
        "--max-train-blocks",
        "8",
        "--precision",
        "fp32",
    ]
    code, out = invoke(
        "cache-teacher", *data, "--output", tmp_path / "cache", "--top-k", "16", "--blocks-per-shard", "3"
    )
    assert code == 0, out
    # progress: what it loads, how much work lies ahead, and after the first batch its speed and an estimate
    assert f"loading the teacher from {tiny_teacher_dir} ..." in out
    assert "running the teacher over 8 sequences x 32 tokens (248 positions, batches of 4)" in out
    assert re.search(
        r"first batch: 93 positions in [\d.]+ s \([\d,]+ tokens/s\); estimated \d+ s for the remaining 155",
        out,
    ), out
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["n_blocks"] == 8 and len(manifest["shards"]) == 3 and manifest["top_k"] == 16
    args = [
        *data,
        "--student-layers",
        "2",
        "--batch-size",
        "2",
        "--max-steps",
        "2",
        "--eval-batches",
        "1",
        "--output-dir",
        tmp_path,
        "--teacher-cache",
        tmp_path / "cache",
    ]
    code, out = invoke(*args, "--run-name", "cached")
    assert code == 0, out
    assert len(losses(tmp_path / "cached")) == 2
    code, out = invoke(*args, "--run-name", "jsd", "--loss", "jsd")
    assert code == 1 and "a --teacher-cache holds only top-k logits, use --loss kl" in out
    code, out = invoke(*[a if a != "32" else "16" for a in map(str, args)], "--run-name", "len")
    assert code == 1 and "was made with max_length=32, this run uses 16" in out


@pytest.mark.slow
def test_few_steps_on_the_embedded_teacher(embedded_dir, small_corpus, tmp_path):
    result = run_cli(
        "--data",
        small_corpus,
        "--student-layers",
        "3",
        "--max-length",
        "128",
        "--batch-size",
        "2",
        "--max-steps",
        "3",
        "--eval-every",
        "3",
        "--eval-batches",
        "1",
        "--output-dir",
        tmp_path,
        "--run-name",
        "e2e",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "e2e" / "metrics.jsonl").read_text().splitlines()]
    assert (
        rows[0]["teacher_val_ppl"] < rows[0]["val_ppl"]
    )  # a 3-layer cut of the teacher starts worse than it
    assert all(torch.isfinite(torch.tensor(r.get("loss", 0.0))) for r in rows)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "e2e" / "final")
    assert student.config.num_hidden_layers == 3 and student.config.teacher_layers == [0, 14, 29]
    assert f"student saved to {tmp_path / 'e2e' / 'final'}" in result.stdout


def test_console_script_groups_the_root_commands():
    from titans_distil.commands import main

    out = CliRunner().invoke(main, ["--help"]).output
    for name in (
        "distil",
        "export-mac",
        "export-llama",
        "inspect",
        "quantize",
        "package",
        "generate",
        "vllm",
        "recall",
    ):
        assert f"  {name} " in out


def test_mlflow_tracker_writes_into_the_run_folder_unless_a_tracking_uri_is_set(
    tiny_teacher_dir, small_corpus, tmp_path, monkeypatch, one_thread
):
    mlflow = pytest.importorskip("mlflow")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # MLflow's own default would put mlflow.db (and mlruns/) here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    common = ("--max-steps", 1, "--save-every", 0, "--eval-every", 0, "--tracker", "mlflow")
    code, out = invoke(*tiny_args(tiny_teacher_dir, small_corpus, tmp_path / "runs", "ml", *common))
    assert code == 0, out
    assert list(work.iterdir()) == []
    db = tmp_path / "runs" / "ml" / "mlflow" / "mlflow.db"
    assert db.is_file()
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the next run in this process picks its own folder
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    try:
        runs = mlflow.search_runs(experiment_names=["ml"])
        assert len(runs) == 1 and runs["metrics.loss"].notna().all()
    finally:
        mlflow.set_tracking_uri(None)
    # A tracking URI the user set is kept: nothing goes into the run folder
    elsewhere = tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere}")
    code, out = invoke(*tiny_args(tiny_teacher_dir, small_corpus, tmp_path / "runs", "ml2", *common))
    assert code == 0, out
    assert elsewhere.is_file() and not (tmp_path / "runs" / "ml2" / "mlflow").exists()
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{elsewhere}" and list(work.iterdir()) == []


def test_wandb_tracker_runs_offline_into_the_run_folder(
    tiny_teacher_dir, small_corpus, tmp_path, monkeypatch, one_thread
):
    pytest.importorskip("wandb")  # without it, --tracker wandb is a row of tests/test_bad_input.py
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    common = ("--max-steps", 1, "--save-every", 0, "--eval-every", 0, "--tracker", "wandb")
    code, out = invoke(*tiny_args(tiny_teacher_dir, small_corpus, tmp_path / "runs", "wb", *common))
    assert code == 0, out
    assert list(work.iterdir()) == []
    assert list((tmp_path / "runs" / "wb" / "wandb").glob("offline-run-*"))
