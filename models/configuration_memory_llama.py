"""Configuration of a Llama wrapped with an inference-time memory (`MemoryLlamaForCausalLM`, the
"InferenceMemoryWrapper" that `package_model.py` writes).

A `MemoryLlamaConfig` is a `LlamaConfig` (every Llama field keeps its meaning, so any Llama checkpoint's
config converts by adding fields) plus the memory fields below. This file travels inside packaged checkpoints:
it imports only transformers, the standard library and its sibling `neural_memory.py` (for `UPDATE_RULES`).
See `modeling_memory_llama.py` for what the fields do.
"""

from transformers.models.llama.configuration_llama import LlamaConfig

from .neural_memory import UPDATE_RULES


def wrapper_memory_layers(num_hidden_layers: int) -> list[int]:
    """Every layer (the opposite of `configuration_mac_llama.mac_memory_layers`, a quarter of the layers: that
    memory is a trained Titans memory per layer, costly; this one holds each layer's own keys and values).

    Why: the memory stores each layer's own keys and values, so with every layer a remembered token is seen by
    the whole stack exactly as if it were an earlier part of the context. Measured on SmolLM2-135M-Instruct
    (30 layers): after writing an 86-token text, the loss on a later reading of it falls from 3.81 to 0.20
    with every layer (= the loss with the text twice in context), to 1.37 with every other layer from 6 to 28,
    and to 2.36 with every other layer from 10 to 28. Cost per memory layer: `memory_slots` more keys per
    query and a few MB of state.
    """
    return list(range(num_hidden_layers))


class MemoryLlamaConfig(LlamaConfig):
    r"""
    Llama configuration plus the inference-memory settings.

    memory_layers (`list[int]`, *optional*):
        Indices of the layers whose attention also reads the memory. `None` picks
        `wrapper_memory_layers(num_hidden_layers)`; `[]` disables the memory.
    memory_slots (`int`, defaults to 512):
        Key/value slots per memory layer and key/value head (both rules write them).
    memory_recent_slots (`int`, *optional*):
        Of these, the slots of the ring that holds the most recent tokens verbatim; the others form the pool
        that receives the tokens leaving the ring. `None`: half of `memory_slots`.
    memory_ema_rate (`float`, defaults to 0.1):
        Rate r of a merge into a pool slot: slot <- (1 - r') slot + r' token with r' = max(r, 1 / (n + 1)), n
        the tokens already in that slot (a running mean of its first 1/r tokens, an exponential moving average
        after).
    memory_chunk_size (`int`, defaults to 8):
        Tokens per update chunk of the "surprise" rule's neural memory (gradients inside a chunk are taken at
        the chunk-start weights).
    memory_lr (`float`, defaults to 0.02):
        Learning rate theta of the neural memory (constant: the packaged gates are fixed). Measured on
        SmolLM2-135M, loss on the last 3000 characters of a 4800-token code file after writing all of it with
        "surprise" (2.23 without memory): 0.89 at 0.02, 0.95 at 0.05, 1.51 at 0.1 (the fast weights grow large
        and the read-out hurts), 4.94 at 0.3 (with the default clipping).
    memory_momentum (`float`, defaults to 0.5):
        Momentum eta of the neural memory's surprise.
    memory_decay (`float`, defaults to 0.001):
        Per-token forgetting alpha of the neural memory, and the per-token decay of a slot's surprise
        priority.
    memory_max_grad_norm (`float`, *optional*, defaults to 20.0):
        Per-token gradient clipping of the neural memory. A token's gradient norm is twice its error, measured
        3-10 on SmolLM2 (head_dim 64), so the clip acts only on outliers; it bounds the fast weights' growth
        if the rate is raised. `None`: unclipped.
    memory_readout_distance (`int`, defaults to 64):
        RoPE distance between a query and its neural-memory read-out slot (0, the query's own position,
        measured much worse; 64, 512 and 1000 about the same).
    update_rule (`str`, defaults to `"ema"`):
        Memory update during a forward / `generate()` call: `"ema"` (key/value slots), `"surprise"` (Titans
        neural memory trained at test time) or `"none"` (read only). Overridden per call by `update_rule=`.
    use_memory (`bool`, defaults to `True`):
        Whether calls read and write the memory; overridden per call by `use_memory=`.
    memory_fingerprint (`str`, *optional*):
        Identifies the wrapped weights (written by `package_model.py`); saved memory files carry it and
        `load_memory` refuses files from another model. `None`: computed from the weights when first needed.
    memory_base_model (`str`, *optional*):
        What was wrapped (informational).
    """

    model_type = "memory_llama"

    memory_layers: list[int] | None = None
    memory_slots: int = 512
    memory_recent_slots: int | None = None
    memory_ema_rate: int | float = 0.1
    memory_chunk_size: int = 8
    memory_lr: int | float = 0.02
    memory_momentum: int | float = 0.5
    memory_decay: int | float = 0.001
    memory_max_grad_norm: int | float | None = 20.0
    memory_readout_distance: int = 64
    update_rule: str = "ema"
    use_memory: bool = True
    memory_fingerprint: str | None = None
    memory_base_model: str | None = None

    def __post_init__(self, **kwargs):
        if self.memory_layers is None:
            self.memory_layers = wrapper_memory_layers(self.num_hidden_layers)
        super().__post_init__(**kwargs)
        self.check_memory_settings()
        self.memory_layers = sorted(self.memory_layers)

    def check_memory_settings(self) -> None:
        """Raise a ValueError naming the first invalid memory field (also called by the model at build
        time)."""

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        layers = self.memory_layers
        if not isinstance(layers, (list, tuple)) or not all(is_int(i) for i in layers):
            raise ValueError(
                f"memory_layers must be a list of layer indices (or None for the default), got {layers!r}"
            )
        bad = [i for i in layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"memory_layers {list(layers)} holds indices {bad} outside 0..{self.num_hidden_layers - 1} "
                f"(num_hidden_layers={self.num_hidden_layers})"
            )
        if len(set(layers)) != len(layers):
            raise ValueError(f"memory_layers {list(layers)} repeats a layer index")
        if not is_int(self.memory_slots) or self.memory_slots < 1:
            raise ValueError(f"memory_slots must be an integer >= 1, got {self.memory_slots!r}")
        if self.memory_recent_slots is not None and (
            not is_int(self.memory_recent_slots) or not 0 <= self.memory_recent_slots <= self.memory_slots
        ):
            raise ValueError(
                f"memory_recent_slots must be None (= memory_slots // 2) or an integer in 0..memory_slots "
                f"({self.memory_slots}), got {self.memory_recent_slots!r}"
            )
        if not is_number(self.memory_ema_rate) or not 0 < self.memory_ema_rate <= 1:
            raise ValueError(f"memory_ema_rate must be in (0, 1], got {self.memory_ema_rate!r}")
        if not is_int(self.memory_chunk_size) or self.memory_chunk_size < 1:
            raise ValueError(f"memory_chunk_size must be an integer >= 1, got {self.memory_chunk_size!r}")
        if not is_number(self.memory_lr) or self.memory_lr <= 0:
            raise ValueError(f"memory_lr must be a number > 0, got {self.memory_lr!r}")
        for name in ("memory_momentum", "memory_decay"):
            value = getattr(self, name)
            if not is_number(value) or not 0 < value < 1:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
        if self.memory_max_grad_norm is not None and (
            not is_number(self.memory_max_grad_norm) or self.memory_max_grad_norm <= 0
        ):
            raise ValueError(
                f"memory_max_grad_norm must be a number > 0 or None, got {self.memory_max_grad_norm!r}"
            )
        if not is_int(self.memory_readout_distance) or self.memory_readout_distance < 0:
            raise ValueError(
                f"memory_readout_distance must be an integer >= 0, got {self.memory_readout_distance!r}"
            )
        if self.update_rule not in UPDATE_RULES:
            raise ValueError(
                f"update_rule must be one of {', '.join(UPDATE_RULES)}; got {self.update_rule!r}"
            )
        if not isinstance(self.use_memory, bool):
            raise ValueError(f"use_memory must be true or false, got {self.use_memory!r}")


__all__ = ["MemoryLlamaConfig", "UPDATE_RULES", "wrapper_memory_layers"]
