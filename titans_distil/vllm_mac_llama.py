"""MAC-Llama (see `modeling_mac_llama.py`) re-expressed in vLLM's serving layers.

What vLLM serves, exactly
-------------------------
- Frozen memory (update rule "none"): retrieval and read-out use the memory's learned initial weights in every
  segment, as the transformers model does with `update_rule="none"`. A checkpoint whose `update_rule` is
  "surprise" or "ema" is refused (its fast weights change per request, which this model does not keep); serve it
  with `--hf-overrides '{"update_rule": "none"}'` or use transformers (`no_vllm_inference.py`) for learning memories.
- Any length up to `max_position_embeddings`, in segments of `segment_len` tokens counted from the request's first
  token (segment-local attention in every layer, as in transformers).
Within those limits the computation equals the transformers model's (tested: greedy parity, within one segment
and across segment boundaries).

How it maps onto vLLM
---------------------
Every layer is a vLLM `LlamaDecoderLayer` (its projections, rotary embedding, norms and MLP) whose attention runs in
torch: segment-local attention is block-diagonal, which vLLM's kernels cannot express (a sliding window is not the
same), and a memory layer attends over [persistent tokens ‖ retrieved tokens h ‖ tokens x] of its segment, two
context entries per position. The layers own vLLM `Attention` layers only for their paged KV caches (x's K/V and,
in memory layers, h's K/V; same shapes everywhere, so vLLM's allocator, prefix caching and chunked prefill treat
them like any other): they write the new tokens' K/V into those caches at `slot_mapping` and gather each request's
segment through its block table. On CPU this costs nothing measurable: 710 output tokens/s against 720 with
vLLM's kernels in the layers without memory (16 requests x 128 tokens, bf16, when that was an option). The memory
read-out itself is `NeuralMemory.retrieve` from the training code, so both sides share one
implementation.
"""

import torch
from torch import nn
from vllm.compilation.decorators import ignore_torch_compile
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from vllm.model_executor.models.utils import extract_layer_index

from .models.modeling_mac_llama import gated_readout, memory_from_config
from .models.neural_memory import unit_rms

logger = init_logger(__name__)


def check_servable(config) -> None:
    """Refuse what this model cannot compute exactly (called at config time, before any weight is loaded)."""
    if config.update_rule != "none":
        raise ValueError(
            f"this MAC checkpoint's update_rule is {config.update_rule!r}, but vLLM serves MAC models with frozen "
            'memory only; pass --hf-overrides \'{"update_rule": "none"}\' (vllm_inference.py does) or generate '
            "with transformers (no_vllm_inference.py) to let the memory learn"
        )


# ----------------------------------------------------------------------------------------------- paged K/V


def _cache_views(attn: Attention) -> tuple[torch.Tensor, torch.Tensor]:
    """`attn`'s paged cache [blocks, kv_heads, block, 2 * d] as keys and values [blocks, kv_heads, block, d]: the
    first and second half of each token's row (only this module reads the caches it writes). Slices, not `.view()`:
    a backend may hand the cache in a permuted, non-contiguous memory layout, where a view cannot be formed."""
    cache = attn.kv_cache
    d = cache.shape[-1] // 2
    return cache[..., :d], cache[..., d:]


def _write_kv(attn: Attention, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    """Store (n, kv_heads, d) K/V at `slots` of `attn`'s paged cache."""
    key_cache, value_cache = _cache_views(attn)
    block_size = key_cache.shape[2]
    keep = slots >= 0  # padding tokens carry slot -1
    slots = slots[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, :, offsets] = key[keep].to(key_cache.dtype)
    value_cache[blocks, :, offsets] = value[keep].to(value_cache.dtype)


def _gather_kv(
    attn: Attention, block_table: torch.Tensor, key_pos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V at positions `key_pos` (requests, width) of each request: (requests, kv_heads, width, d) each."""
    key_cache, value_cache = _cache_views(attn)
    block_size = key_cache.shape[2]
    blocks = block_table.gather(1, key_pos // block_size).long()
    offsets = key_pos % block_size
    return key_cache[blocks, :, offsets].transpose(1, 2), value_cache[blocks, :, offsets].transpose(1, 2)


def _grouped_attention(query, keys, values, mask, scale) -> torch.Tensor:
    """Masked GQA attention: query (B, H, Q, d), keys/values (B, H_kv, K, d), mask (B, Q, K) bool. Written out
    because torch's CPU SDPA with an explicit mask is ~10x slower at decode shapes (measured: 1.8 ms vs 0.15 ms for
    16 requests); the softmax runs in float32."""
    B, H, Q, d = query.shape
    kv_heads, K = keys.shape[1], keys.shape[2]
    grouped = query.reshape(B, kv_heads, H // kv_heads * Q, d)  # the heads sharing a K/V head as more queries
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float().mul_(scale)
    scores = scores.view(B, kv_heads, H // kv_heads, Q, K).masked_fill_(~mask[:, None, None], float("-inf"))
    weights = scores.softmax(dim=-1).to(values.dtype).view(B, kv_heads, -1, K)
    return torch.matmul(weights, values).view(B, H, Q, d)


def segment_attention(attn, positions, q, streams, segment_len: int, persistent=None) -> torch.Tensor:
    """Causal attention of each request's new tokens inside their segments, through the paged caches.

    `attn` is the layer's vLLM `LlamaAttention` (head sizes, rotary embedding, metadata key); `q` (tokens, heads * d)
    after RoPE; `streams` a list of (`Attention` owning a cache, keys, values) for the new tokens, after RoPE: every
    position contributes one entry per stream, visible to the queries at or after it in its segment. `persistent`
    (keys before RoPE, values) are extra entries visible to every query of a segment, RoPE'd at its first position.
    Returns (tokens, heads * d); zeros in vLLM's profiling runs (no metadata)."""
    d, heads, kv_heads = attn.head_dim, attn.num_heads, attn.num_kv_heads
    out = q.new_zeros(q.shape[0], heads * d)
    context = get_forward_context()
    metadata = context.attn_metadata
    metadata = metadata.get(attn.attn.layer_name) if isinstance(metadata, dict) else metadata
    if metadata is None:
        return out
    n = metadata.num_actual_tokens
    for layer, key, value in streams:
        slots = context.slot_mapping[layer.layer_name][:n]
        _write_kv(layer, key[:n].view(n, kv_heads, d), value[:n].view(n, kv_heads, d), slots)

    # pieces: each request's new tokens (consecutive) cut at segment boundaries, so attention is block-diagonal
    starts = metadata.query_start_loc
    request = torch.repeat_interleave(
        torch.arange(len(starts) - 1, device=q.device), starts[1:] - starts[:-1]
    )
    segment = positions[:n] // segment_len
    new_piece = torch.ones(n, dtype=torch.bool, device=q.device)
    new_piece[1:] = (request[1:] != request[:-1]) | (segment[1:] != segment[:-1])
    piece_starts = torch.nonzero(new_piece)[:, 0]
    piece_lengths = torch.diff(piece_starts, append=piece_starts.new_tensor([n]))
    block_table = metadata.block_table[request[piece_starts]]

    # queries (pieces, heads, max piece length, d) and keys from each piece's segment start to its last query
    steps = torch.arange(int(piece_lengths.max()), device=q.device)
    valid = steps[None] < piece_lengths[:, None]
    token = torch.where(valid, piece_starts[:, None] + steps[None], piece_starts[:, None])
    query = q[token].view(*token.shape, heads, d).transpose(1, 2)
    query_pos = positions[token]
    first = query_pos[:, 0] - query_pos[:, 0] % segment_len
    last = query_pos.max(dim=1).values
    key_pos = first[:, None] + torch.arange(int((last - first).max()) + 1, device=q.device)[None]
    visible = key_pos[:, None, :] <= query_pos[:, :, None]
    key_pos = torch.minimum(
        key_pos, last[:, None]
    )  # beyond a piece's last token: masked, any written slot will do
    keys, values, masks = [], [], []
    if persistent is not None:  # RoPE'd at each piece's segment start
        p_k, p_v = persistent
        count = p_k.shape[0]
        rows = p_k.repeat(len(first), 1)
        _, rows = attn.rotary_emb(first.repeat_interleave(count), torch.empty_like(rows[:, :0]), rows)
        keys.append(rows.view(len(first), count, kv_heads, d).transpose(1, 2))
        values.append(p_v.view(1, count, kv_heads, d).transpose(1, 2).expand(len(first), -1, -1, -1))
        masks.append(visible.new_ones(*visible.shape[:2], count))
    for layer, _, _ in streams:
        layer_keys, layer_values = _gather_kv(layer, block_table, key_pos)
        keys.append(layer_keys.to(q.dtype))
        values.append(layer_values.to(q.dtype))
        masks.append(visible)
    result = _grouped_attention(
        query, torch.cat(keys, dim=2), torch.cat(values, dim=2), torch.cat(masks, dim=2), attn.scaling
    )
    out[token[valid]] = result.transpose(1, 2)[valid].reshape(-1, heads * d)
    return out


# ----------------------------------------------------------------------------------------------- layers


class MACDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer whose attention (`attention`) runs in torch over its segment."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.segment_len = vllm_config.model_config.hf_config.segment_len

    def forward(self, positions, hidden_states, residual):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.attention(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual

    def _qkv(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = self.self_attn
        return attn.qkv_proj(hidden)[0].split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)

    def attention(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Segment-local causal attention (a layer without memory)."""
        attn = self.self_attn
        q, k, v = self._qkv(x)
        q, k = attn.rotary_emb(positions, q, k)
        out = segment_attention(attn, positions, q, [(attn.attn, k, v)], self.segment_len)
        return attn.o_proj(out)[0]


class MACMemoryDecoderLayer(MACDecoderLayer):
    """A decoder layer whose attention context is [persistent ‖ retrieved ‖ tokens] of its segment and whose output
    adds the gated memory read-out (steps 1-4 of `modeling_mac_llama.py`, frozen memory)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        attn = self.self_attn
        self.memory = memory_from_config(config)
        self.memory_version = config.memory_version
        self.memory_gate = nn.Parameter(torch.zeros(config.hidden_size))
        self.persistent_tokens = (
            nn.Parameter(torch.zeros(config.num_persistent_tokens, config.hidden_size))
            if config.num_persistent_tokens
            else None
        )
        self.frozen_state = self.persistent_kv = None  # set by freeze_memory()
        # only for its paged cache of the retrieved tokens' K/V (see the module docstring)
        self.retrieved_attn = Attention(
            attn.num_heads,
            attn.head_dim,
            attn.scaling,
            num_kv_heads=attn.num_kv_heads,
            cache_config=vllm_config.cache_config,
            prefix=f"{prefix}.retrieved_attn",
        )

    @torch.no_grad()
    def freeze_memory(self) -> None:
        """At the first forward (after vLLM has loaded and, on CPU, re-packed the linear weights): what frozen
        serving reads at every step, computed once. The memory runs in float32 (as `NeuralMemory` computes anyway,
        casting each weight per call), its state is the learned initial weights, and the persistent tokens' K/V
        (before RoPE) are constants."""
        self.memory.float()
        self.frozen_state = self.memory.init_state(1)
        if self.persistent_tokens is not None:
            _, p_k, p_v = self._qkv(self.persistent_tokens)
            self.persistent_kv = (p_k.contiguous(), p_v.contiguous())

    def attention(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.frozen_state is None:
            self.freeze_memory()
        attn, state = self.self_attn, self.frozen_state
        q, k, v = self._qkv(x)
        h = self.memory.retrieve(state, unit_rms(x)[None])[0].to(x.dtype)
        _, h_k, h_v = self._qkv(h)
        q, keys = attn.rotary_emb(positions, q, torch.cat([k, h_k], dim=-1))
        k, h_k = keys.split(attn.kv_size, dim=-1)
        streams = [(attn.attn, k, v), (self.retrieved_attn, h_k, h_v)]
        out = segment_attention(attn, positions, q, streams, self.segment_len, self.persistent_kv)
        y, _ = attn.o_proj(out)
        readout = self.memory.retrieve(state, unit_rms(y)[None])[0]
        return y + gated_readout(self.memory_gate, readout.to(y.dtype), y, self.memory_version)


# ----------------------------------------------------------------------------------------------- model


@ignore_torch_compile  # the torch-attention layers gather from the paged cache with data-dependent shapes
class MACLlamaModel(LlamaModel):
    pass


class MACLlamaForCausalLM(LlamaForCausalLM):
    """vLLM model for `MACLlamaForCausalLM` checkpoints (see the module docstring for what is supported).

    `check_servable` has already refused a learning memory when vLLM built its config (the plugin's config hook in
    vllm_plugin.py), before this class is built. Weights load with Llama's own `load_weights` (stacked q/k/v and
    gate/up); the memory parameters keep their transformers names (`model.layers.N.memory.*`, `.memory_gate`,
    `.persistent_tokens`) and load one to one, the memory's update parameters (keys, values, gates) too although
    frozen serving never uses them."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        memory_layers = set(config.memory_layers)
        logger.info(
            "MAC model: frozen memory (update_rule none) in layers %s, segments of %d tokens",
            sorted(memory_layers),
            config.segment_len,
        )

        def layer_type(*, vllm_config: VllmConfig, prefix: str):
            is_memory = extract_layer_index(prefix) in memory_layers
            return (MACMemoryDecoderLayer if is_memory else MACDecoderLayer)(
                vllm_config=vllm_config, prefix=prefix
            )

        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)

    def _init_model(self, vllm_config: VllmConfig, prefix: str = "", layer_type=LlamaDecoderLayer):
        return MACLlamaModel(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
