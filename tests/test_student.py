"""Student construction from teacher layers: layer choice, exact reproduction at full depth, errors."""

import pytest
import torch

from titans_distil.errors import UserError
from titans_distil.student import build_student, pick_layers
from titans_distil.teacher import load_teacher, resolve_teacher


def test_pick_layers_evenly_spaced_and_lists():
    assert pick_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert pick_layers(30, "1") == [0]
    assert pick_layers(30, "30") == list(range(30))
    assert pick_layers(30, "0,10,29") == [0, 10, 29]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("31", "--student-layers 31 is out of range; the teacher has 30 layers, pick 1..30"),
        ("0", "--student-layers 0 is out of range"),
        ("0,30", "names layers outside 0..29"),
        ("1,1", "repeats a layer"),
        ("a,b", "is neither a count nor a comma-separated list"),
    ],
)
def test_pick_layers_rejects_bad_specs(spec, message):
    with pytest.raises(UserError, match=message):
        pick_layers(30, spec)


def test_full_depth_student_reproduces_embedded_teacher(embedded_dir):
    teacher, tokenizer = load_teacher("embedded")
    student = build_student(teacher, list(range(teacher.config.num_hidden_layers)))
    ids = tokenizer("def fibonacci(n):\n    return", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, rtol=0, atol=0)
    small = build_student(teacher, [0, 15, 29])
    assert small.config.num_hidden_layers == 3 and small.config.teacher_layers == [0, 15, 29]
    torch.testing.assert_close(
        small.model.layers[1].mlp.up_proj.weight, teacher.model.layers[15].mlp.up_proj.weight
    )
    assert (
        small.model.embed_tokens.weight.data_ptr() != teacher.model.embed_tokens.weight.data_ptr()
    )  # a copy, not shared


def test_teacher_errors(tmp_path):
    with pytest.raises(UserError, match="teacher file missing.gguf does not exist"):
        resolve_teacher("missing.gguf")
    with pytest.raises(UserError, match="has no config.json"):
        resolve_teacher(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(UserError, match="is a 'gpt2' model; the student is built from Llama layers"):
        load_teacher(str(tmp_path))


@pytest.mark.parametrize("rule", ["surprise", "ema"])
def test_mac_student_of_the_embedded_teacher_stays_finite_on_real_code(embedded_dir, rule):
    """Regression: real hidden states share a dominant direction; the default memory rates must not
    diverge."""
    from titans_distil.data import load_blocks

    teacher, tokenizer = load_teacher("embedded")
    student = build_student(teacher, [0, 6, 12, 17, 23, 29], {"segment_len": 256}).eval()
    assert student.config.memory_layers  # the default places memory in some layers
    ids = load_blocks("stdlib", tokenizer, 2048, "validation", max_blocks=1)
    with torch.no_grad():
        out = student.model(input_ids=ids, update_rule=rule)
    assert torch.isfinite(out.last_hidden_state).all()
    assert all(torch.isfinite(v) for v in out.memory_stats.values())
    assert out.memory_stats["updated_tokens"] == 2048
