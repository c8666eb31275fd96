"""MAC-Llama (see `modeling_mac_llama.py`) re-expressed in vLLM's serving layers.

What vLLM serves, exactly
-------------------------
- One segment: `max_model_len` is capped at `segment_len` (prompt + generated tokens). Inside one segment the
  MAC attention is plain causal attention, and the memory is only read, never written before it is read again.
- Frozen memory (update rule "none"): retrieval and read-out use the memory's learned initial weights. A
  checkpoint whose `update_rule` is "surprise" or "ema" is refused (its read-outs change after every
  `memory_chunk_size` tokens, which this model does not compute); serve it with
  `--hf-overrides '{"update_rule": "none"}'` or use transformers (`no_vllm_inference.py`) for learning memories.
Within those limits the computation equals the transformers model's (tested: greedy parity).

How it maps onto vLLM
---------------------
Layers without memory are vLLM's own `LlamaDecoderLayer`. A memory layer attends over
[persistent tokens ‖ retrieved tokens h_0..h_i ‖ tokens x_0..x_i]: two context entries per position, which the
paged attention kernels cannot express. So a memory layer owns two vLLM `Attention` layers only for their paged
KV caches (x's K/V and h's K/V; same shapes as every other layer's, so vLLM's allocator, prefix caching and
chunked prefill treat them like any other) and runs the attention itself with torch SDPA: it writes the new
tokens' K/V into those caches at `slot_mapping` and gathers each request's context through its block table.
The memory read-out itself is `NeuralMemory.retrieve` from the training code, so both sides share one
implementation.
"""

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.compilation.decorators import ignore_torch_compile
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from vllm.model_executor.models.utils import extract_layer_index

from .neural_memory import NeuralMemory


def _unit_rms(hidden: torch.Tensor) -> torch.Tensor:
    """The parameter-free RMS normalisation of the memory's inputs (as in `modeling_mac_llama.py`)."""
    return F.rms_norm(hidden, (hidden.shape[-1],), eps=1e-6)


def check_servable(config, max_model_len: int | None) -> None:
    """Refuse what this model cannot compute exactly (called at config time, before any weight is loaded)."""
    if config.update_rule != "none":
        raise ValueError(
            f"this MAC checkpoint's update_rule is {config.update_rule!r}, but vLLM serves MAC models with frozen "
            "memory only; pass --hf-overrides '{\"update_rule\": \"none\"}' (vllm_inference.py does) or generate "
            "with transformers (no_vllm_inference.py) to let the memory learn"
        )
    if max_model_len is not None and max_model_len > config.segment_len:
        raise ValueError(
            f"max_model_len {max_model_len} exceeds this MAC model's segment_len {config.segment_len}: vLLM serves "
            f"one segment; pass --max-model-len {config.segment_len} or less"
        )


def _write_kv(attn: Attention, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    """Store (n, kv_heads, d) K/V at `slots` of `attn`'s paged cache, laid out [blocks, kv_heads, 2 * block, d]
    (keys then values per block; only this module reads these caches)."""
    key_cache, value_cache = _cache_views(attn)
    block_size = key_cache.shape[2]
    keep = slots >= 0  # padding tokens carry slot -1
    slots = slots[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, :, offsets] = key[keep].to(key_cache.dtype)
    value_cache[blocks, :, offsets] = value[keep].to(value_cache.dtype)


def _cache_views(attn: Attention) -> tuple[torch.Tensor, torch.Tensor]:
    cache = attn.kv_cache
    num_blocks, kv_heads, block_size, _ = cache.shape
    return cache.view(num_blocks, kv_heads, 2 * block_size, -1).split(block_size, dim=2)


def _gather_kv(attn: Attention, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions 0..length-1 of every request: (requests, kv_heads, length, d) keys and values (whole blocks are
    gathered, then cut)."""
    key_cache, value_cache = _cache_views(attn)
    requests, kv_heads, block_size = block_table.shape[0], key_cache.shape[1], key_cache.shape[2]
    blocks = block_table[:, : -(-length // block_size)].long()

    def gather(cache):
        return cache[blocks].transpose(1, 2).reshape(requests, kv_heads, -1, cache.shape[-1])[:, :, :length]

    return gather(key_cache), gather(value_cache)


class MACMemoryDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer whose attention context is [persistent ‖ retrieved ‖ tokens] and whose output adds
    the gated memory read-out (steps 1-4 of `modeling_mac_llama.py`, frozen memory, one segment)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        attn = self.self_attn
        self.memory = NeuralMemory(
            dim=config.hidden_size,
            memory_dim=config.memory_dim,
            depth=config.memory_depth,
            expansion=config.memory_expansion,
            chunk_size=config.memory_chunk_size,
            max_lr=config.memory_max_lr,
            init_lr=config.memory_max_lr / 2,
            max_grad_norm=config.memory_max_grad_norm,
        )
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
        serving reads at every step, computed once. The memory runs in
        float32 (as `NeuralMemory` computes anyway, casting each weight per call), its state is the learned initial
        weights, and the persistent tokens' K/V (RoPE'd at position 0) are constants."""
        self.memory.float()
        self.frozen_state = self.memory.init_state(1)
        self.persistent_kv = None
        if self.persistent_tokens is not None:
            attn = self.self_attn
            p_k, p_v = self._kv(self.persistent_tokens)
            positions = torch.zeros(p_k.shape[0], dtype=torch.long, device=p_k.device)
            _, p_k = attn.rotary_emb(positions, torch.empty_like(p_k[:, :0]), p_k.contiguous())
            self.persistent_kv = (p_k, p_v)

    def forward(self, positions, hidden_states, residual):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self._memory_attention(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual

    def _kv(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.self_attn
        _, k, v = attn.qkv_proj(hidden)[0].split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        return k, v

    def _memory_attention(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.frozen_state is None:
            self.freeze_memory()
        attn, state = self.self_attn, self.frozen_state
        q, k, v = attn.qkv_proj(x)[0].split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        h = self.memory.retrieve(state, _unit_rms(x)[None])[0].to(x.dtype)
        h_k, h_v = self._kv(h)
        q, keys = attn.rotary_emb(positions, q, torch.cat([k, h_k], dim=-1))
        k, h_k = keys.split(attn.kv_size, dim=-1)
        out = self._attend(positions, q, [(attn.attn, k, v), (self.retrieved_attn, h_k, h_v)], self.persistent_kv)
        y, _ = attn.o_proj(out)
        readout = self.memory.retrieve(state, _unit_rms(y)[None])[0]
        return y + self.memory_gate * readout.to(y.dtype)

    def _attend(self, positions, q, caches, prefix) -> torch.Tensor:
        """Causal attention of each request's new tokens over the persistent tokens and, for every position up to
        its own, both cached K/V streams. Returns (tokens, heads * d)."""
        attn = self.self_attn
        d, heads, kv_heads = attn.head_dim, attn.num_heads, attn.num_kv_heads
        out = q.new_zeros(q.shape[0], heads * d)
        context = get_forward_context()
        metadata = context.attn_metadata
        metadata = metadata.get(attn.attn.layer_name) if isinstance(metadata, dict) else metadata
        if metadata is None:  # profiling / warm-up run without a KV cache
            return out
        n = metadata.num_actual_tokens
        for layer, key, value in caches:
            slots = context.slot_mapping[layer.layer_name][:n]
            _write_kv(layer, key[:n].view(n, kv_heads, d), value[:n].view(n, kv_heads, d), slots)

        starts = metadata.query_start_loc
        lengths = starts[1:] - starts[:-1]
        steps = torch.arange(int(metadata.max_query_len), device=q.device)
        valid = steps[None] < lengths[:, None]  # (requests, max query length)
        token = torch.where(valid, starts[:-1, None] + steps[None], 0).long()
        query = q[token].view(*token.shape, heads, d).transpose(1, 2)
        query_pos = torch.where(valid, positions[token], 0)

        length = int(metadata.max_seq_len)
        keys, values, masks = [], [], []
        visible = torch.arange(length, device=q.device)[None, None, :] <= query_pos[:, :, None]
        if prefix is not None:
            p_k, p_v = (t.view(-1, kv_heads, d).transpose(0, 1).expand(token.shape[0], -1, -1, -1) for t in prefix)
            keys.append(p_k)
            values.append(p_v)
            masks.append(visible.new_ones(*visible.shape[:2], p_k.shape[2]))
        for layer, _, _ in caches:
            layer_keys, layer_values = _gather_kv(layer, metadata.block_table, length)
            keys.append(layer_keys.to(q.dtype))
            values.append(layer_values.to(q.dtype))
            masks.append(visible)
        result = _grouped_attention(query, torch.cat(keys, dim=2), torch.cat(values, dim=2),
                                    torch.cat(masks, dim=2), attn.scaling)
        out[token[valid]] = result.transpose(1, 2)[valid].reshape(-1, heads * d)
        return out


def _grouped_attention(query, keys, values, mask, scale) -> torch.Tensor:
    """Masked GQA attention: query (B, H, Q, d), keys/values (B, H_kv, K, d), mask (B, Q, K) bool. Written out
    because torch's CPU SDPA with an explicit mask is ~10x slower at these decode shapes (measured: 1.8 ms vs
    0.15 ms for 16 requests); the softmax runs in float32."""
    B, H, Q, d = query.shape
    kv_heads, K = keys.shape[1], keys.shape[2]
    grouped = query.reshape(B, kv_heads, H // kv_heads * Q, d)  # the heads sharing a K/V head as more queries
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float().mul_(scale)
    scores = scores.view(B, kv_heads, H // kv_heads, Q, K).masked_fill_(~mask[:, None, None], float("-inf"))
    weights = scores.softmax(dim=-1).to(values.dtype).view(B, kv_heads, -1, K)
    return torch.matmul(weights, values).view(B, H, Q, d)


@ignore_torch_compile  # the memory layers gather from the paged cache with data-dependent shapes: run eagerly
class MACLlamaModel(LlamaModel):
    pass


class MACLlamaForCausalLM(LlamaForCausalLM):
    """vLLM model for `MACLlamaForCausalLM` checkpoints (see the module docstring for what is supported)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        check_servable(config, vllm_config.model_config.max_model_len)
        memory_layers = set(config.memory_layers)

        def layer_type(*, vllm_config: VllmConfig, prefix: str):
            is_memory = extract_layer_index(prefix) in memory_layers
            return (MACMemoryDecoderLayer if is_memory else LlamaDecoderLayer)(vllm_config=vllm_config, prefix=prefix)

        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)

    def _init_model(self, vllm_config: VllmConfig, prefix: str = "", layer_type=LlamaDecoderLayer):
        return MACLlamaModel(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Llama's loader (stacked q/k/v and gate/up); the memory parameters keep their transformers names
        (`model.layers.N.memory.*`, `.memory_gate`, `.persistent_tokens`) and load one to one. The memory's
        update parameters (keys, values, gates) are loaded too although frozen serving never uses them."""
        return super().load_weights(weights)
