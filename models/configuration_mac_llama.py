"""Configuration of a Llama student with Titans "Memory as Context" (MAC) layers.

A `MACLlamaConfig` is a `LlamaConfig` (every Llama field keeps its meaning, so a Llama checkpoint's config
converts by adding fields) plus the memory fields below. This file travels inside exported checkpoints: it
imports only transformers, the standard library and its sibling `neural_memory.py` (for `UPDATE_RULES`).
"""

from transformers.models.llama.configuration_llama import LlamaConfig

from .neural_memory import UPDATE_RULES

MEMORY_VERSION = 3  # the memory new configs get (see `memory_version`)


def mac_memory_layers(num_hidden_layers: int) -> list[int]:
    """A quarter of the layers (at least one), evenly spaced and centred: 4 layers -> [2], 8 -> [2, 6],
    30 -> [2, 6, 10, 15, 19, 23, 27].

    Why not every layer: each memory layer adds a sequential loop over segments, a per-sequence fast-weight
    state and a prefix of retrieved tokens to its attention, so cost and state size grow with their number,
    while one memory every few layers already lets the stack carry information across segments (the
    other layers read it through the residual stream). Centred spacing keeps a memory in the lower half
    (where the retrieved context can still be processed by several layers) as well as in the upper half.
    """
    count = max(1, num_hidden_layers // 4)
    return sorted({int((k + 0.5) * num_hidden_layers / count) for k in range(count)})


class MACLlamaConfig(LlamaConfig):
    r"""
    Llama configuration plus the MAC memory settings.

    segment_len (`int`, defaults to 256):
        Tokens per attention segment. Every layer attends only inside its segment (block-diagonal causal
        attention), so the per-token cost does not grow with the sequence length.
    num_persistent_tokens (`int`, defaults to 16):
        Learnable context tokens prepended to the attention of every memory layer (0 disables them).
    memory_layers (`list[int]`, *optional*):
        Indices of the layers holding a neural memory. `None` picks `mac_memory_layers(num_hidden_layers)`
        (a quarter of the layers, evenly spaced); `[]` disables the memory.
    memory_version (`int`, defaults to 3):
        Which memory the fields below describe. 3 (the default): version 2's update, and the read-out brought
        to the scale of the attention output it joins (o = y + g ⊙ rms(readout) ⊙ RMS(y), g starting at 0.2):
        at version 2's raw scale, ~30x below y, times a gate of 0.01, a tiny MAC learned no recall at all (see
        the README).
        2: keys/values/queries from centred inputs (`input_centre`, calibrated on data), SiLU on values as in
        the paper, each chunk's summed step bounded (`memory_update_bound`), forgetting toward the learned
        initial weights, learning-rate gate up to `memory_max_lr`. 1: the update of checkpoints written before
        this field existed (per-token gradient clipping, forgetting toward zero); a config.json without
        `memory_version` loads as 1, unchanged.
    memory_chunk_size (`int`, defaults to 32):
        Tokens per memory update chunk; must divide `segment_len` so that segment starts are chunk starts
        (the retrieval at a segment start then sees every update of the previous segments). Inside a chunk all
        gradients are taken at its start: on the teacher's hidden states 16 stores about as well as 1 (the
        paper's token-by-token update) but costs ~3x the time of 64, which stores less; 32 sits between (see
        the README's storage table).
    memory_depth (`int`, defaults to 2):
        Linear layers of the memory MLP.
    memory_expansion (`float`, defaults to 2):
        Hidden width of the memory MLP relative to `memory_dim`.
    memory_dim (`int`, *optional*):
        Width of the memory keys/values; `None` means `hidden_size`.
    memory_heads (`int`, defaults to 1):
        Independent memories over `memory_dim / memory_heads` features each (version 2). More heads shrink the
        per-sequence state but store less (measured: 9 heads of 64 on D = 576 store less than 1 head).
    memory_max_lr (`float`, defaults to 1.0):
        Upper bound of the memory's data-dependent learning rate; the gate starts at half of it. With unit
        keys a step of 0.5 writes a value in one shot (version 1 used 0.004).
    memory_update_bound (`float`, *optional*, defaults to 2.0):
        Version 2: each chunk's summed gradient step is scaled, per memory layer, to norm <= this bound, so
        one chunk cannot move the fast weights by more than about one association whatever the rate.
    memory_max_grad_norm (`float`, *optional*):
        Each token's gradient is clipped to this norm (per memory layer) before it enters the surprise;
        version 1 checkpoints use 1.0. `None` (the default): no per-token clipping.
    update_rule (`str`, defaults to `"surprise"`):
        Memory update at test time: `"surprise"` (the paper's momentum + forgetting), `"ema"` (gradient-free
        moving average of the last memory layer) or `"none"` (frozen memory). Can be overridden per call.
    """

    model_type = "mac_llama"

    segment_len: int = 256
    num_persistent_tokens: int = 16
    memory_layers: list[int] | None = None
    memory_version: int = MEMORY_VERSION
    memory_chunk_size: int = 32
    memory_depth: int = 2
    memory_expansion: int | float = 2
    memory_dim: int | None = None
    memory_heads: int = 1
    memory_max_lr: int | float = 1.0
    memory_update_bound: int | float | None = 2.0
    memory_max_grad_norm: int | float | None = None
    update_rule: str = "surprise"

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """A config.json written before `memory_version` existed describes the version-1 memory."""
        if "memory_version" not in config_dict:
            config_dict = {**config_dict, "memory_version": 1}
        return super().from_dict(config_dict, **kwargs)

    def __post_init__(self, **kwargs):
        if self.memory_layers is None:
            self.memory_layers = mac_memory_layers(self.num_hidden_layers)
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

        if not is_int(self.segment_len) or self.segment_len < 1:
            raise ValueError(f"segment_len must be an integer >= 1, got {self.segment_len!r}")
        if not is_int(self.num_persistent_tokens) or self.num_persistent_tokens < 0:
            raise ValueError(
                "num_persistent_tokens must be an integer >= 0 (0 disables them), got "
                f"{self.num_persistent_tokens!r}"
            )
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
        if not is_int(self.memory_chunk_size) or self.memory_chunk_size < 1:
            raise ValueError(f"memory_chunk_size must be an integer >= 1, got {self.memory_chunk_size!r}")
        if self.segment_len % self.memory_chunk_size:
            raise ValueError(
                f"memory_chunk_size ({self.memory_chunk_size}) must divide segment_len "
                f"({self.segment_len}), so that every segment starts on a memory chunk boundary"
            )
        if not is_int(self.memory_depth) or self.memory_depth < 1:
            raise ValueError(f"memory_depth must be an integer >= 1, got {self.memory_depth!r}")
        if not is_number(self.memory_expansion) or self.memory_expansion <= 0:
            raise ValueError(f"memory_expansion must be a number > 0, got {self.memory_expansion!r}")
        if self.memory_dim is not None and (not is_int(self.memory_dim) or self.memory_dim < 1):
            raise ValueError(
                f"memory_dim must be None (= hidden_size) or an integer >= 1, got {self.memory_dim!r}"
            )
        if not is_number(self.memory_max_lr) or self.memory_max_lr <= 0:
            raise ValueError(f"memory_max_lr must be a number > 0, got {self.memory_max_lr!r}")
        if self.memory_version not in (1, 2, 3):
            raise ValueError(f"memory_version must be 1, 2 or 3, got {self.memory_version!r}")
        width = self.hidden_size if self.memory_dim is None else self.memory_dim
        if not is_int(self.memory_heads) or self.memory_heads < 1 or width % self.memory_heads:
            raise ValueError(
                f"memory_heads must be an integer >= 1 dividing the memory width {width}, got "
                f"{self.memory_heads!r}"
            )
        if self.memory_version == 1 and self.memory_heads != 1:
            raise ValueError(
                "memory_heads must be 1 with memory_version 1 (the version-1 memory has one head)"
            )
        for name in ("memory_update_bound", "memory_max_grad_norm"):
            value = getattr(self, name)
            if value is not None and (not is_number(value) or value <= 0):
                raise ValueError(f"{name} must be a number > 0 or None, got {value!r}")
        if self.update_rule not in UPDATE_RULES:
            raise ValueError(f"update_rule must be one of {UPDATE_RULES}, got {self.update_rule!r}")


__all__ = ["MACLlamaConfig", "MEMORY_VERSION", "UPDATE_RULES", "mac_memory_layers"]
