"""Configuration of a Llama student with Titans "Memory as Context" (MAC) layers.

A `MACLlamaConfig` is a `LlamaConfig` (every Llama field keeps its meaning, so a Llama checkpoint's config
converts by adding fields) plus the memory fields below. This file travels inside exported checkpoints: it
imports only transformers and the standard library.
"""

from transformers.models.llama.configuration_llama import LlamaConfig

UPDATE_RULES = ("surprise", "ema", "none")


def default_memory_layers(num_hidden_layers: int) -> list[int]:
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
        Indices of the layers holding a neural memory. `None` picks `default_memory_layers(num_hidden_layers)`
        (a quarter of the layers, evenly spaced); `[]` disables the memory.
    memory_chunk_size (`int`, defaults to 64):
        Tokens per memory update chunk; must divide `segment_len` so that segment starts are chunk starts
        (the retrieval at a segment start then sees every update of the previous segments).
    memory_depth (`int`, defaults to 2):
        Linear layers of the memory MLP.
    memory_expansion (`float`, defaults to 2):
        Hidden width of the memory MLP relative to `memory_dim`.
    memory_dim (`int`, *optional*):
        Width of the memory keys/values; `None` means `hidden_size`.
    memory_max_lr (`float`, defaults to 0.004):
        Upper bound of the memory's data-dependent learning rate; the gate starts at half of it. Measured on
        SmolLM2-135M hidden states (64-token chunks, momentum 0.9): rates up to 0.005 stay stable over 2048
        tokens in every layer tried, 0.006 diverges in some and 0.01 in all, because real hidden states share a
        dominant direction and the gradients of a chunk, all taken at its start, add up.
    memory_max_grad_norm (`float`, *optional*, defaults to 1.0):
        Each token's associative-loss gradient is clipped to this norm (per memory layer) before it enters the
        surprise, so the fast weights cannot explode while the projections and gates are trained; `None` gives
        the paper's unclipped update.
    update_rule (`str`, defaults to `"surprise"`):
        Memory update at test time: `"surprise"` (the paper's momentum + forgetting), `"ema"` (gradient-free
        moving average of the last memory layer) or `"none"` (frozen memory). Can be overridden per call.
    """

    model_type = "mac_llama"

    segment_len: int = 256
    num_persistent_tokens: int = 16
    memory_layers: list[int] | None = None
    memory_chunk_size: int = 64
    memory_depth: int = 2
    memory_expansion: int | float = 2
    memory_dim: int | None = None
    memory_max_lr: int | float = 0.004
    memory_max_grad_norm: int | float | None = 1.0
    update_rule: str = "surprise"

    def __post_init__(self, **kwargs):
        if self.memory_layers is None:
            self.memory_layers = default_memory_layers(self.num_hidden_layers)
        super().__post_init__(**kwargs)
        self.check_memory_settings()
        self.memory_layers = sorted(self.memory_layers)

    def check_memory_settings(self) -> None:
        """Raise a ValueError naming the first invalid memory field (also called by the model at build time)."""

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        if not is_int(self.segment_len) or self.segment_len < 1:
            raise ValueError(f"segment_len must be an integer >= 1, got {self.segment_len!r}")
        if not is_int(self.num_persistent_tokens) or self.num_persistent_tokens < 0:
            raise ValueError(
                f"num_persistent_tokens must be an integer >= 0 (0 disables them), got {self.num_persistent_tokens!r}"
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
                f"memory_chunk_size ({self.memory_chunk_size}) must divide segment_len ({self.segment_len}), so "
                "that every segment starts on a memory chunk boundary"
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
        if self.update_rule not in UPDATE_RULES:
            raise ValueError(f"update_rule must be one of {UPDATE_RULES}, got {self.update_rule!r}")


__all__ = ["MACLlamaConfig", "UPDATE_RULES", "default_memory_layers"]
