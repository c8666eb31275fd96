"""Llama with Titans "Memory as Context" (MAC) layers (Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize
at Test Time", arXiv 2501.00663, §4.1).

This file travels inside exported checkpoints: it imports only torch, transformers, the standard library and
its sibling files.

The MAC computation
-------------------
The sequence is cut into segments of `segment_len` tokens, counted from the first token of the stream (a
forward call, or a whole `generate()` run through the cache). Every layer attends only inside its segment
(block-diagonal causal attention), so the cost per token does not grow with the sequence length. All Llama
parts keep Llama's names and computation: with `segment_len` >= the sequence length, no persistent tokens and
no memory layers the model is exactly a `LlamaForCausalLM`.

A memory layer (index in `config.memory_layers`) owns a `NeuralMemory` whose fast-weight state is carried from
segment to segment (and through `generate()` in `MACCache`). For a segment with normalised hidden states x
(after `input_layernorm`, positions 0..L-1 inside the segment):

1. retrieval without update: h = memory.retrieve(state at the segment start, rms(x));
2. attention with Llama's q/k/v/o projections over the context [persistent tokens ‖ h ‖ x], queries from x
   only. Token i sees every persistent token, h_j and x_j for j <= i. RoPE: x_j and h_j get token j's
   position, persistent tokens the position of the segment's first token. The result after `o_proj` is y;
3. memory update with y: `readout, state, stats = memory(rms(y), state, update_rule)`; each read-out uses the
   weights at the start of its memory chunk, so it is causal;
4. o = y + g ⊙ readout with a learnable per-channel gate g, then Llama's residual and post-norm MLP. From
memory
   version 3 the read-out is first brought to y's scale, o = y + g ⊙ rms(readout) ⊙ RMS(y) (per token), with g
   starting at 0.2: g is then the read-out's share of the attention output. At the memory's raw scale (~30x
   below y) times a gate of 0.01 the read-out changed nothing a loss could see, and a tiny MAC learned no
   recall.

Other layers are plain Llama layers with segment-local causal attention. rms() is a parameter-free RMS
normalisation: the memory's step sizes are tuned for unit-RMS inputs, and a trained Llama's residual stream
(and attention output) has outlier channels hundreds of times larger, which would make its updates diverge.

Deviations from the paper, and why
----------------------------------
- Causal retrieved context: the paper attends over the retrieved memory h of the whole segment; since h_j is
  computed from token j, that would leak later tokens of the segment into earlier positions of a causal LM.
  Token i sees h_j only for j <= i.
- Read-outs use the memory weights at the start of each memory chunk (see `neural_memory.py`), not the
  weights after the segment's update (M_t in the paper's o_t = y_t ⊗ M*_t(y_t)), again for causality.
- Output combination o = y + g ⊙ readout with g initialised to zero, instead of the paper's y ⊗ M*(y): a
  freshly built student then computes exactly "Llama + extra attention context" (no read-out term), i.e. it
  starts close to the plain Llama student it is initialised from, and the read-out path is opened by training
  (d loss / d g is non-zero from the first step, and the memory itself learns from the first step through the
  retrieved tokens of later segments).
- Persistent tokens go through the layer's own k/v projections (they live in the space of normalised hidden
  states), are initialised small (std `initializer_range`) so they start as near-null "sink" tokens, and get
  the segment-start RoPE position; the paper prepends them without specifying positions.
- Memory placement: the paper draws one memory in front of one attention core; here every layer listed in
  `memory_layers` has its own memory (as in multi-layer MAC implementations) and the other layers are
  segment-local Llama layers, so a student built from Llama teacher layers keeps every teacher weight.
- Attention always runs through `torch.nn.functional.scaled_dot_product_attention` (explicit boolean mask in
  memory layers, segments folded into the batch in the others), whatever `config._attn_implementation` says:
  the memory layers need a custom mask and the segment folding is not expressible through transformers'
  attention dispatch. `output_attentions` is refused.
- Padding: segments are counted from the first position of each row, so left padding would shift segment
  boundaries and feed padding into the memory. Only right padding (each mask row: ones, then zeros) is
  accepted; it changes nothing at the real positions because everything is causal. Other masks are refused.
- With gradient checkpointing in training no cache is kept (as in Llama); the memory state still flows
  through all segments of the forward call.

Memory sessions and files
-------------------------
The memory of a stream lives in its `MACCache`. `save_memory(path, cache)` writes the memory after the tokens
the cache has seen to a safetensors file (`memory_file.py`: model fingerprint, per memory layer the
`NeuralMemory` state); `load_memory(path)` returns a fresh `MACCache` (a new stream at position 0) whose
memory starts from the file, for `forward` / `generate(past_key_values=...)`:

    cache = model.memory_cache()
    model.generate(ids, past_key_values=cache, update_rule="surprise", max_new_tokens=20)
    model.save_memory("alice.safetensors", cache)
    cache = model.load_memory("alice.safetensors")  # a later session, another process

Saving flushes by default: the written rows of the unfinished memory chunk are applied to the saved weights
(the cache itself is not changed), so the file holds every token written and a session from it starts on a
chunk boundary, like its segments. `keep_pending=True` saves the exact state instead (the rows stay pending
and the loaded stream continues the chunk). Files of format version 1 (written before the fingerprint sampled
4096 values per tensor) still load; their pending rows, if any, join the chunk of the next writing call as
before.
"""

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    repeat_kv,
)
from transformers.utils import logging

from .configuration_mac_llama import MACLlamaConfig
from .memory_file import (
    FINGERPRINT_SAMPLES,
    check_tensors,
    read_memory_file,
    weights_fingerprint,
    write_memory_file,
)
from .neural_memory import UPDATE_RULES, MemoryState, NeuralMemory, unit_rms

logger = logging.get_logger(__name__)

MEMORY_STAT_KEYS = ("surprise_norm", "lr_mean", "momentum_mean", "decay_mean")

MEMORY_FORMAT = "titans-distil-mac-memory/2"
# format -> values sampled per tensor by its fingerprint: files of version 1 (64 samples) still load
MEMORY_FORMATS = {MEMORY_FORMAT: FINGERPRINT_SAMPLES, "titans-distil-mac-memory/1": 64}
# config fields that decide the memory's layout and meaning (the fingerprint hashes them)
FINGERPRINT_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "segment_len",
    "num_persistent_tokens",
    "memory_layers",
    "memory_chunk_size",
    "memory_depth",
    "memory_expansion",
    "memory_dim",
    "memory_max_lr",
    "memory_max_grad_norm",
)
# hashed too when memory_version >= 2 (files written before memory_version existed keep their fingerprint)
FINGERPRINT_FIELDS_V2 = ("memory_version", "memory_heads", "memory_update_bound")


# ----------------------------------------------------------------------------------------------- outputs


@dataclass
class MACModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    memory_stats (`dict[str, torch.Tensor]`):
        Detached scalars averaged over memory layers and segments, weighted by the tokens each update wrote:
        "surprise_norm", "lr_mean", "momentum_mean", "decay_mean", and "updated_tokens" (tokens written per
        sequence and memory layer in this call). Empty when the model has no memory layer.
    """

    memory_stats: dict[str, torch.Tensor] | None = None


@dataclass
class MACCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    memory_stats (`dict[str, torch.Tensor]`):
        See `MACModelOutputWithPast.memory_stats`.
    """

    memory_stats: dict[str, torch.Tensor] | None = None


def _average_memory_stats(
    stats: list[dict[str, torch.Tensor]], num_memory_layers: int
) -> dict[str, torch.Tensor]:
    """Weight each call's stats by the tokens it wrote, so pending-only calls (token-by-token decoding) and
    the "none" rule, which report zeros, do not dilute the averages."""
    if not stats or not stats[0]:
        return {}
    written = (
        torch.stack([s["updated_tokens"].float() for s in stats]) if "updated_tokens" in stats[0] else None
    )
    device = next(iter(stats[0].values())).device
    weights = written if written is not None else torch.ones(len(stats), device=device)
    total = weights.sum()
    out = {}
    for key in MEMORY_STAT_KEYS:
        if key in stats[0]:
            values = torch.stack([s[key].float() for s in stats])
            out[key] = (values * weights).sum() / total.clamp_min(1e-12)
    if written is not None:
        out["updated_tokens"] = total / max(1, num_memory_layers)
    return out


# ----------------------------------------------------------------------------------------------- cache


def _map_tensors(value, fn):
    """Apply `fn` to every tensor of a (nested) tuple / NamedTuple such as a `MemoryState`; keep the rest."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_map_tensors(v, fn) for v in value))
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    return value


class MACCacheLayer(CacheLayerMixin):
    """One layer's generation state for the current segment: `keys`/`values` of its tokens (after RoPE); in a
    memory layer also the K/V of the retrieved tokens (`memory_keys`/`memory_values`), of the persistent
    tokens (`prefix_keys`/`prefix_values`), the memory state at the segment start (`segment_state`, used for
    retrieval) and after the last token (`state`, including the incomplete memory chunk)."""

    is_compileable = False
    is_croppable = False
    _TENSOR_FIELDS = ("keys", "values", "memory_keys", "memory_values", "prefix_keys", "prefix_values")

    def __init__(self):
        super().__init__()
        self.reset()

    def reset(self) -> None:
        for name in self._TENSOR_FIELDS:
            setattr(self, name, None)
        self.segment_state: MemoryState | None = None
        self.state: MemoryState | None = None
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append tokens of the current segment (the model manages segment resets itself)."""
        if not self.is_initialized or self.keys is None:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """Tokens of the current segment held by this layer (the cache-level length counts the whole
        stream)."""
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def _map(self, fn) -> None:
        for name in self._TENSOR_FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))
        self.segment_state = _map_tensors(self.segment_state, fn)
        self.state = _map_tensors(self.state, fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)) if t.dim() else t)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices] if t.dim() else t)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0) if t.dim() else t)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("MACCache cannot be cropped: memory updates cannot be undone")

    def offload(self):
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized:
            self._map(lambda t: t.to(self.device, non_blocking=True))


class MACCache(Cache):
    """Generation cache of a MAC model: one `MACCacheLayer` per layer plus the number of tokens seen.

    `get_seq_length()` is the number of tokens processed so far (what `generate()` uses for positions and for
    slicing a prompt against a reused cache); the segment offset is that count modulo `segment_len`. When a
    segment is full, the next token starts a new one: layers drop their K/V and the memory state after the
    finished segment becomes the retrieval state of the new one. Not croppable (no assisted decoding)."""

    def __init__(self, config: MACLlamaConfig):
        super().__init__(layers=[MACCacheLayer() for _ in range(config.num_hidden_layers)])
        self.segment_len = config.segment_len
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def batch_size(self) -> int:
        for layer in self.layers:
            if layer.keys is not None:
                return layer.keys.shape[0]
        return -1

    def reset(self):
        for layer in self.layers:
            layer.reset()
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("MACCache cannot be cropped: memory updates cannot be undone")


# ----------------------------------------------------------------------------------------------- layers


MEMORY_GATE_INIT = 0.01  # version 2's read-out gate at init: open enough for gradients, small beside y
MEMORY_SHARE_INIT = 0.2  # version 3's: the read-out starts at 20% of the attention output's RMS


def gated_readout(
    gate: torch.Tensor, readout: torch.Tensor, y: torch.Tensor, memory_version: int
) -> torch.Tensor:
    """What the read-out adds to the attention output y (step 4 of the module docstring)."""
    if memory_version < 3:
        return gate * readout
    scale = y.float().pow(2).mean(-1, keepdim=True).sqrt().to(y.dtype)
    return gate * unit_rms(readout) * scale


def initial_gate(memory_version: int) -> float:
    return 0.0 if memory_version == 1 else MEMORY_GATE_INIT if memory_version == 2 else MEMORY_SHARE_INIT


def segment_pieces(offset: int, length: int, segment_len: int) -> list[tuple[int, int, int]]:
    """Cut `length` new tokens, the first one at `offset` inside its segment, into (start, count, offset)
    pieces that each lie inside one segment."""
    pieces, start = [], 0
    while start < length:
        count = min(segment_len - offset, length - start)
        pieces.append((start, count, offset))
        start, offset = start + count, 0
    return pieces


def _visibility(num_queries: int, offset: int, device) -> torch.Tensor:
    """(num_queries, offset + num_queries) bool: query i (at `offset + i` in its segment) sees positions <=
    its own."""
    q_pos = torch.arange(offset, offset + num_queries, device=device)[:, None]
    k_pos = torch.arange(offset + num_queries, device=device)[None, :]
    return k_pos <= q_pos


def memory_from_config(config: MACLlamaConfig) -> NeuralMemory:
    """The `NeuralMemory` of one memory layer as `config` describes it (the vLLM model builds its memories
    here too).

    Version 2 starts with momentum 0.1 and forgetting 1e-4 per token: on the teacher's hidden states a high
    momentum re-applies each bounded chunk step ~10 times and stores less, and forgetting is toward the
    initial weights, so it only has to make room, not to keep the weights bounded."""
    common = dict(
        dim=config.hidden_size,
        memory_dim=config.memory_dim,
        depth=config.memory_depth,
        expansion=config.memory_expansion,
        chunk_size=config.memory_chunk_size,
        max_lr=config.memory_max_lr,
        init_lr=config.memory_max_lr / 2,
        max_grad_norm=config.memory_max_grad_norm,
    )
    if config.memory_version == 1:
        return NeuralMemory(**common)
    return NeuralMemory(
        **common,
        heads=config.memory_heads,
        update_bound=config.memory_update_bound,
        init_momentum=0.1,
        init_decay=1e-4,
        forget_toward_init=True,
        value_activation=True,
        centre_inputs=True,
    )


class MACLlamaAttention(LlamaAttention):
    """Llama's attention weights (same names); the attention pattern is chosen by the decoder layer."""

    def forward(self, *args, **kwargs):
        """Refused: Llama's forward would compute full causal attention, which is not MAC."""
        raise NotImplementedError(
            "MACLlamaAttention is driven by MACLlamaDecoderLayer (project / attend / attend_blockwise); "
            "call the decoder layer, not its self_attn"
        )

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, hidden) -> q (B, H, T, d), k and v (B, H_kv, T, d), before RoPE."""
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k, v = self.project_kv(hidden_states)
        return q, k, v

    def project_kv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        return k, v

    def attend(self, q, k, v, mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """SDPA with GQA; returns (B, n, H * d) before `o_proj`. `mask` is boolean, True = may attend."""
        out = F.scaled_dot_product_attention(
            q,
            repeat_kv(k, self.num_key_value_groups),
            repeat_kv(v, self.num_key_value_groups),
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=self.attention_dropout if self.training else 0.0,
            scale=self.scaling,
        )
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    def attend_blockwise(self, q, k, v, block: int) -> torch.Tensor:
        """Causal attention inside consecutive blocks of `block` tokens (the last one may be short): the
        blocks are folded into the batch (the last is zero-padded; padding sits after every real token, so it
        is never seen)."""
        B, _, R, d = q.shape
        if R <= block:
            return self.attend(q, k, v, is_causal=True)
        m = -(-R // block)

        def fold(t):
            t = F.pad(t, (0, 0, 0, m * block - R))
            return t.view(B, t.shape[1], m, block, d).transpose(1, 2).reshape(B * m, t.shape[1], block, d)

        out = self.attend(fold(q), fold(k), fold(v), is_causal=True)
        return out.reshape(B, m * block, -1)[:, :R]


class MACLlamaDecoderLayer(GradientCheckpointingLayer):
    """A Llama decoder layer with segment-local attention; in memory layers also a `NeuralMemory`, persistent
    tokens and the read-out gate (see the module docstring)."""

    def __init__(self, config: MACLlamaConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.layer_idx = layer_idx
        self.segment_len = config.segment_len
        self.memory_version = config.memory_version
        self.self_attn = MACLlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

        self.memory = None
        self.memory_gate = None
        self.persistent_tokens = None
        if layer_idx in config.memory_layers:
            self.memory = memory_from_config(config)
            # version 1: zero, the read-out path starts closed; version 2: slightly open, so the memory's own
            # parameters get a gradient through the read-out from the first step (see the module docstring)
            self.memory_gate = nn.Parameter(
                torch.full((config.hidden_size,), initial_gate(config.memory_version))
            )
            if config.num_persistent_tokens:
                self.persistent_tokens = nn.Parameter(
                    torch.randn(config.num_persistent_tokens, config.hidden_size) * config.initializer_range
                )

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        pieces: list[tuple[int, int, int]],
        past_key_values: MACCache | None = None,
        update_rule: str = "surprise",
        **kwargs,
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        layer_cache = past_key_values.layers[self.layer_idx] if past_key_values is not None else None
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        if self.memory is None:
            hidden_states, stats = (
                self._local_attention(hidden_states, position_embeddings, pieces, layer_cache),
                [],
            )
        else:
            hidden_states, stats = self._memory_attention(
                hidden_states, position_embeddings, pieces, layer_cache, update_rule
            )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states, stats

    def _local_attention(self, x, position_embeddings, pieces, layer_cache):
        """Segment-local causal attention; a first piece that continues a cached segment attends to its
        K/V."""
        attn = self.self_attn
        cos, sin = position_embeddings
        q, k, v = attn.project(x)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        outputs, start = [], 0
        _, count, offset = pieces[0]
        if offset:
            keys = torch.cat([layer_cache.keys, k[:, :, :count]], dim=2)
            values = torch.cat([layer_cache.values, v[:, :, :count]], dim=2)
            outputs.append(
                attn.attend(q[:, :, :count], keys, values, mask=_visibility(count, offset, x.device))
            )
            layer_cache.keys, layer_cache.values = keys, values
            start = count
        if start < x.shape[1]:
            outputs.append(
                attn.attend_blockwise(q[:, :, start:], k[:, :, start:], v[:, :, start:], self.segment_len)
            )
            if layer_cache is not None:
                last, count, _ = pieces[-1]
                layer_cache.keys = k[:, :, last : last + count].clone()
                layer_cache.values = v[:, :, last : last + count].clone()
                layer_cache.lazy_initialization(layer_cache.keys, layer_cache.values)
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        return attn.o_proj(out)

    def _persistent_kv(self, cos, sin, batch_size):
        """K/V of the persistent tokens, RoPE'd at the segment start (`cos`/`sin` of shape (B or 1, 1, d))."""
        if self.persistent_tokens is None:
            return None, None
        count = self.persistent_tokens.shape[0]
        k, v = self.self_attn.project_kv(self.persistent_tokens.unsqueeze(0))
        cos, sin = cos.expand(-1, count, -1), sin.expand(-1, count, -1)
        _, k = apply_rotary_pos_emb(k[:, :0], k, cos, sin)  # an empty query: rotate the keys only
        return k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)

    def _memory_attention(self, x, position_embeddings, pieces, layer_cache, update_rule):
        """Steps 1-4 of the module docstring, segment after segment."""
        attn, memory = self.self_attn, self.memory
        B = x.shape[0]
        cos, sin = position_embeddings
        q, k, v = attn.project(x)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)

        if layer_cache is not None and layer_cache.state is not None:
            state, segment_state = layer_cache.state, layer_cache.segment_state
            prefix = (layer_cache.prefix_keys, layer_cache.prefix_values)
            segment_kv = (
                layer_cache.memory_keys,
                layer_cache.memory_values,
                layer_cache.keys,
                layer_cache.values,
            )
        else:
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            state = segment_state = memory.init_state(B, device=x.device, dtype=dtype)
            prefix, segment_kv = (None, None), None

        outputs, stats = [], []
        for start, count, offset in pieces:
            end = start + count
            piece_cos, piece_sin = cos[:, start:end], sin[:, start:end]
            if offset == 0:  # a new segment: retrieve from the state after the previous one
                segment_state, segment_kv = state, None
                prefix = self._persistent_kv(cos[:, start : start + 1], sin[:, start : start + 1], B)
            h = memory.retrieve(segment_state, unit_rms(x[:, start:end])).to(x.dtype)
            h_k, h_v = attn.project_kv(h)
            _, h_k = apply_rotary_pos_emb(h_k[:, :0], h_k, piece_cos, piece_sin)
            new_kv = (h_k, h_v, k[:, :, start:end], v[:, :, start:end])
            if segment_kv is None:
                segment_kv = new_kv
            else:
                segment_kv = tuple(torch.cat([old, new], dim=2) for old, new in zip(segment_kv, new_kv))
            keys = [segment_kv[0], segment_kv[2]]
            values = [segment_kv[1], segment_kv[3]]
            visible = _visibility(count, offset, x.device)
            mask = [visible, visible]
            if prefix[0] is not None:
                keys.insert(0, prefix[0])
                values.insert(0, prefix[1])
                mask.insert(0, visible.new_ones(count, prefix[0].shape[2]))
            y = attn.o_proj(
                attn.attend(
                    q[:, :, start:end],
                    torch.cat(keys, dim=2),
                    torch.cat(values, dim=2),
                    mask=torch.cat(mask, dim=1),
                )
            )
            readout, state, piece_stats = memory(unit_rms(y), state, update_rule=update_rule)
            outputs.append(y + gated_readout(self.memory_gate, readout.to(y.dtype), y, self.memory_version))
            stats.append(piece_stats)

        if layer_cache is not None:
            layer_cache.state, layer_cache.segment_state = state, segment_state
            layer_cache.prefix_keys, layer_cache.prefix_values = prefix
            # clone: a slice of this call's K/V would keep the whole call's K/V alive in the cache
            layer_cache.memory_keys, layer_cache.memory_values = segment_kv[:2]
            layer_cache.keys, layer_cache.values = segment_kv[2].clone(), segment_kv[3].clone()
            layer_cache.lazy_initialization(layer_cache.keys, layer_cache.values)
        return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)), stats


# ----------------------------------------------------------------------------------------------- models


class MACLlamaPreTrainedModel(PreTrainedModel):
    config_class = MACLlamaConfig
    config: MACLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MACLlamaDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_compile_fullgraph = False

    def _init_weights(self, module):
        if isinstance(module, NeuralMemory):
            # the memory's own initialisation (gate biases, initial fast weights, projections), not the
            # generic normal(0, initializer_range) the loop below just gave its Linear children
            module.reset_parameters()
            return
        super()._init_weights(module)
        if isinstance(module, MACLlamaDecoderLayer) and module.memory is not None:
            init.constant_(module.memory_gate, initial_gate(self.config.memory_version))
            if module.persistent_tokens is not None:
                init.normal_(module.persistent_tokens, mean=0.0, std=self.config.initializer_range)


class MACLlamaModel(MACLlamaPreTrainedModel):
    def __init__(self, config: MACLlamaConfig):
        super().__init__(config)
        config.check_memory_settings()
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size

        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [MACLlamaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False

        self.post_init()

    def resolve_update_rule(self, update_rule: str | None) -> str:
        rule = self.config.update_rule if update_rule is None else update_rule
        if rule not in UPDATE_RULES:
            raise ValueError(f"update_rule must be one of {UPDATE_RULES}, got {rule!r}")
        return rule

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: MACCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        update_rule: str | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MACModelOutputWithPast:
        r"""
        past_key_values (`MACCache`, *optional*): continue a stream (created when `use_cache`; `use_cache`
            defaults to `config.use_cache` in eval mode and to False in training).
        update_rule (`str`, *optional*): "surprise", "ema" or "none"; defaults to `config.update_rule`.
        position_ids: RoPE positions (default: the stream positions). Segments are always counted in tokens
            from the start of the stream.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if kwargs.get("output_attentions"):
            raise ValueError("MACLlama does not return attention weights (attention runs through fused SDPA)")
        update_rule = self.resolve_update_rule(update_rule)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch_size, length = inputs_embeds.shape[:2]

        if past_key_values is not None and not isinstance(past_key_values, MACCache):
            raise TypeError(
                "MACLlama needs a MACCache (segment K/V and memory states), got "
                f"{type(past_key_values).__name__}"
            )
        if self.gradient_checkpointing and self.training:
            if past_key_values is not None or use_cache:
                logger.warning_once(
                    "Caching is incompatible with gradient checkpointing; running without a cache."
                )
            past_key_values, use_cache = None, False
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = MACCache(self.config)
        past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past_seen and past_key_values.batch_size not in (-1, batch_size):
            raise ValueError(
                f"the cache holds batch size {past_key_values.batch_size}, the input has {batch_size}"
            )
        _check_attention_mask(attention_mask)

        if position_ids is None:
            position_ids = torch.arange(past_seen, past_seen + length, device=inputs_embeds.device).unsqueeze(
                0
            )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        pieces = segment_pieces(past_seen % self.config.segment_len, length, self.config.segment_len)

        hidden_states = inputs_embeds
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        stats = []
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states, layer_stats = decoder_layer(
                hidden_states,
                position_embeddings=position_embeddings,
                pieces=pieces,
                past_key_values=past_key_values,
                update_rule=update_rule,
            )
            stats.extend(layer_stats)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:  # like Llama: the last entry is the normed output
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)
        if past_key_values is not None:
            past_key_values.seen_tokens += length

        output = MACModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values,
            hidden_states=all_hidden_states,
            memory_stats=_average_memory_stats(stats, len(self.config.memory_layers)),
        )
        return output if return_dict else output.to_tuple()


def _check_attention_mask(attention_mask: torch.Tensor | None) -> None:
    """Accept no mask, all ones, or right padding (ones then zeros per row, over past + new tokens)."""
    if attention_mask is None:
        return
    if attention_mask.dim() != 2:
        raise ValueError(
            "MACLlama accepts only a 2D (batch, length) attention_mask, got shape "
            f"{tuple(attention_mask.shape)}"
        )
    mask = attention_mask.bool()
    if mask.shape[1] > 1 and bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError(
            "MACLlama supports only right padding (attention_mask rows of ones followed by zeros): "
            "segments and memory updates are counted from the first position, so left padding or gaps "
            "would shift them. Use equal-length prompts, right padding for training, or generate one "
            "prompt at a time."
        )


class MACLlamaForCausalLM(MACLlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MACLlamaConfig):
        super().__init__(config)
        self.model = MACLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: MACCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        update_rule: str | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MACCausalLMOutputWithPast:
        r"""
        update_rule (`str`, *optional*): "surprise", "ema" or "none" for this call (and, through
        `generate()`'s
            model kwargs, for a whole generation); defaults to `config.update_rule`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            update_rule=update_rule,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )

        output = MACCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            memory_stats=outputs.memory_stats,
        )
        return output if return_dict else output.to_tuple()

    # -- memory sessions and files (see the module docstring)

    def memory_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.model.layers) if layer.memory is not None]

    def memory_fingerprint(self, samples: int = FINGERPRINT_SAMPLES) -> str:
        """sha256 of the config fields that shape the memory and of a fixed sample of every weight tensor."""
        config = self.config.to_dict()
        fields = FINGERPRINT_FIELDS + (FINGERPRINT_FIELDS_V2 if config.get("memory_version", 1) >= 2 else ())
        return weights_fingerprint(self, fields={k: config.get(k) for k in fields}, samples=samples)

    def _state_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def memory_states(self, memory=None) -> dict[int, MemoryState]:
        """{layer: MemoryState}: the memory after the tokens a `MACCache` has seen (`memory`), the states of a
        dict (checked), or the model's initial memory (None, or a cache that saw no token)."""
        if isinstance(memory, dict):
            if sorted(memory) != self.memory_layers():
                raise ValueError(
                    f"memory states for layers {sorted(memory)}; this model's memory layers are "
                    f"{self.memory_layers()}"
                )
            return dict(memory)
        if memory is not None and not isinstance(memory, MACCache):
            raise TypeError(
                f"memory must be a MACCache, a {{layer: MemoryState}} dict or None, got "
                f"{type(memory).__name__}"
            )
        out = {}
        for i in self.memory_layers():
            state = memory.layers[i].state if memory is not None else None
            out[i] = (
                state
                if state is not None
                else self.model.layers[i].memory.init_state(1, dtype=self._state_dtype())
            )
        return out

    def memory_cache(self, memory=None) -> MACCache:
        """A fresh `MACCache` (a new stream at position 0) whose memory layers start from `memory` (a cache's
        memory, {layer: MemoryState}, or None: the initial memory). The source is never changed."""
        cache = MACCache(self.config)
        if memory is not None:
            for i, state in self.memory_states(memory).items():
                cache.layers[i].state = cache.layers[i].segment_state = state
        return cache

    def save_memory(self, path, memory=None, *, keep_pending: bool = False) -> None:
        """Write the memory of a stream (`memory`: a `MACCache`, {layer: MemoryState} or None for the initial
        memory; batch 1) to a safetensors file, atomically. The unfinished chunk's written rows are flushed
        into the saved weights unless `keep_pending` (the cache is not changed either way)."""
        states = self.memory_states(memory)
        tensors = {}
        for i, state in states.items():
            if state.weights[0].shape[0] != 1:
                raise ValueError(
                    f"save_memory saves one stream, this memory has batch size "
                    f"{state.weights[0].shape[0]}; save one row at a time"
                )
            neural = self.model.layers[i].memory
            if not keep_pending:
                state = neural.flush(state)
            tensors.update(neural.state_to_dict(state, prefix=f"layers.{i}."))
        metadata = {
            "format": MEMORY_FORMAT,
            "fingerprint": self.memory_fingerprint(),
            "memory_layers": json.dumps(sorted(states)),
            "dtype": str(self._state_dtype()).removeprefix("torch."),
        }
        write_memory_file(path, tensors, metadata)

    def load_memory_states(self, path) -> dict[int, MemoryState]:
        """{layer: MemoryState} of a file written by `save_memory` of this model; one-line ValueError for a
        missing or foreign file, another model's memory, and tensors of the wrong names, shapes or dtypes."""
        fingerprints = {fmt: (lambda n=n: self.memory_fingerprint(n)) for fmt, n in MEMORY_FORMATS.items()}
        tensors, metadata = read_memory_file(
            path,
            fingerprints,
            "load it into the model that wrote it, or start from the model's initial memory (no memory file)",
        )
        dtype, i64 = self._state_dtype(), torch.int64
        layout, optional = {}, []
        for i in self.memory_layers():
            neural, prefix = self.model.layers[i].memory, f"layers.{i}."
            for j, w in enumerate(neural.initial_weights):
                layout[f"{prefix}weights.{j}"] = layout[f"{prefix}momentum.{j}"] = ((1, *w.shape), dtype)
            layout[f"{prefix}pending"] = ((1, range(neural.chunk_size), neural.dim), dtype)
            for name in ("position", "phase", "pending_rule"):
                layout[prefix + name] = ((), i64)
            optional += [f"{prefix}phase", f"{prefix}pending_rule"]  # not in files of format version 1
        check_tensors(path, tensors, metadata, layout, self.memory_layers(), optional)
        states = {}
        for i in self.memory_layers():
            neural = self.model.layers[i].memory
            try:
                state = neural.state_from_dict(tensors, prefix=f"layers.{i}.")
            except ValueError as err:
                raise ValueError(
                    f"{os.fspath(path)}: {str(err).removeprefix('NeuralMemory.state_from_dict: ')}; "
                    "the file is damaged, save it again"
                ) from None
            states[i] = state.to(neural.initial_weights[0].device)
        return states

    def load_memory(self, path) -> MACCache:
        """A fresh `MACCache` (a new stream) whose memory starts from a file written by `save_memory` of this
        model (see `load_memory_states` for the checks)."""
        return self.memory_cache(self.load_memory_states(path))

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """`generate()` hook: a MAC model generates with a `MACCache` (a user-supplied one is continued)."""
        cache = model_kwargs.get("past_key_values")
        if cache is not None and not isinstance(cache, MACCache):
            raise TypeError(f"MACLlama generates with a MACCache, got past_key_values={type(cache).__name__}")
        if cache is None and generation_config.use_cache is not False:
            if generation_config.cache_implementation not in (None, "dynamic"):
                raise ValueError(
                    f"cache_implementation={generation_config.cache_implementation!r} is not supported by "
                    "MACLlama, which always generates with its own MACCache; leave cache_implementation "
                    "unset"
                )
            model_kwargs["past_key_values"] = MACCache(self.config)
            return
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)


__all__ = [
    "MACCache",
    "MACCacheLayer",
    "MACCausalLMOutputWithPast",
    "MACLlamaForCausalLM",
    "MACLlamaModel",
    "MACLlamaPreTrainedModel",
    "MACModelOutputWithPast",
]
