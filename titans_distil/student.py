"""Build a student from chosen teacher layers: same tokenizer, embeddings, norms and head; fewer blocks.

A student holding every teacher layer is the teacher, so it reproduces the teacher's logits exactly; with
`mac` settings it is a `MACLlamaForCausalLM` whose Llama parts start from the teacher and whose memory parts
start fresh.
"""

from __future__ import annotations

import re

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .errors import UserError


def pick_layers(num_teacher_layers: int, spec: str | int) -> list[int]:
    """`spec` is a count (evenly spaced, first and last included) or a comma-separated list of indices."""
    text = str(spec).strip()
    if re.fullmatch(r"\d+", text):
        count = int(text)
        if not 1 <= count <= num_teacher_layers:
            raise UserError(
                f"--student-layers {count} is out of range; the teacher has {num_teacher_layers} layers, "
                f"pick 1..{num_teacher_layers}"
            )
        if count == 1:
            return [0]
        return [round(i * (num_teacher_layers - 1) / (count - 1)) for i in range(count)]
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(
            f"--student-layers {text!r} is neither a count nor a comma-separated list of layer indices "
            "(e.g. 6 or 0,5,10)"
        ) from None
    bad = [i for i in layers if not 0 <= i < num_teacher_layers]
    if not layers or bad:
        raise UserError(
            f"--student-layers {text!r} names layers outside 0..{num_teacher_layers - 1}; the teacher has "
            f"{num_teacher_layers} layers"
        )
    if len(set(layers)) != len(layers):
        raise UserError(f"--student-layers {text!r} repeats a layer; list each teacher layer at most once")
    return layers


def student_config(teacher_config, layers: list[int], mac: dict | None = None):
    values = teacher_config.to_dict()
    for key in (
        "architectures",
        "auto_map",
        "_name_or_path",
        "quantization_config",
        "model_type",
        "transformers_version",
    ):
        values.pop(key, None)
    values["num_hidden_layers"] = len(layers)
    values["teacher_layers"] = list(layers)
    if mac is None:
        return LlamaConfig(**values)
    from .models.configuration_mac_llama import MACLlamaConfig

    try:
        return MACLlamaConfig(**values, **mac)
    except ValueError as err:  # the config names its fields; the flags are the same names with dashes
        raise UserError(f"invalid memory settings: {err}") from None


def build_student(teacher, layers: list[int], mac: dict | None = None):
    """A fresh student (plain Llama, or MAC when `mac` holds memory settings) initialised from `teacher`."""
    config = student_config(teacher.config, layers, mac)
    if mac is None:
        student = LlamaForCausalLM(config)
    else:
        from .models.modeling_mac_llama import MACLlamaForCausalLM

        student = MACLlamaForCausalLM(config)
    student.to(teacher.dtype)
    renumber = {f"model.layers.{t}.": f"model.layers.{s}." for s, t in enumerate(layers)}
    state = {}
    for name, tensor in teacher.state_dict().items():
        match = re.match(r"model\.layers\.(\d+)\.", name)
        if match is None:
            state[name] = tensor
        elif match.group(0) in renumber:
            state[renumber[match.group(0)] + name[match.end() :]] = tensor
    missing, unexpected = student.load_state_dict(state, strict=False)
    teacher_part_missing = [n for n in missing if _is_llama_param(n, config)]
    if unexpected or teacher_part_missing:
        raise RuntimeError(
            f"student/teacher weight mismatch: missing {teacher_part_missing[:5]}, unexpected "
            f"{unexpected[:5]}"
        )
    student.generation_config = teacher.generation_config
    return student


CALIBRATION_BLOCKS = 4  # training blocks whose memory inputs set each memory's input centre


@torch.no_grad()
def calibrate_memory(student, input_ids: torch.Tensor) -> None:
    """Set every centring memory's `input_centre` to the mean of its inputs on `input_ids` (data-dependent
    init).

    The memory's inputs share one dominant direction, so uncentred keys overlap and writes interfere; see
    `NeuralMemory.calibrate_centre`. Memories without a centre (version 1) and plain students are left
    alone."""
    memories = [m for m in student.modules() if getattr(m, "input_centre", None) is not None]
    if not memories:
        return
    writes = {m: [] for m in memories}
    reads = {m: [] for m in memories}
    hooks = [m.register_forward_pre_hook(lambda m, args: writes[m].append(args[0].float())) for m in memories]
    for (
        m
    ) in memories:  # the host reads with its own inputs through retrieve(); an instance attribute shadows it
        m.retrieve = lambda state, x, m=m: reads[m].append(x.float()) or type(m).retrieve(m, state, x)
    was_training = student.training
    try:
        student.eval()
        student(input_ids.to(student.device), update_rule="none")
    finally:
        student.train(was_training)
        for hook in hooks:
            hook.remove()
        for m in memories:
            del m.retrieve

    def rows(tensors):
        return torch.cat([t.reshape(-1, t.shape[-1]) for t in tensors])

    for memory in memories:
        memory.calibrate_centre(rows(writes[memory]), rows(reads[memory]) if reads[memory] else None)


def _is_llama_param(name: str, config) -> bool:
    """True for parameters a plain Llama also has (so they must come from the teacher)."""
    if name == "lm_head.weight":
        return not config.tie_word_embeddings
    return (
        re.fullmatch(
            r"model\.(embed_tokens|norm|layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.\w+_proj|input_layernorm|post_attention_layernorm))\.weight",
            name,
        )
        is not None
    )
