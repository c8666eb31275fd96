"""MAC-Llama (see `modeling_mac_llama.py`) re-expressed in vLLM's serving layers.

What vLLM serves, exactly
-------------------------
- The update rule of the deployment (`update_rule` of the config, `--hf-overrides '{"update_rule": ...}'`):
  "none" (frozen: retrieval and read-out use the memory's learned initial weights in every segment),
  "surprise" or "ema" (the memory learns per request, from the learned initial weights at its first token, as
  transformers' `MACCache` carries it through `generate()`). One rule for every request.
- Any length up to `max_position_embeddings`, in segments of `segment_len` tokens counted from the request's
first
  token (segment-local attention in every layer, as in transformers), with chunked prefill cut anywhere.
Within those limits the computation equals the transformers model's (tested: greedy parity with each rule,
within one segment and across segment and memory-chunk boundaries, prefill in 64-token steps).

Learning memory: per-request state in vLLM's state cache
--------------------------------------------------------
With "surprise" or "ema" the model is hybrid in vLLM's sense (`IsHybrid`, as its Mamba / linear-attention
models): every memory layer owns a `MACMemoryStateCache` (a `MambaBase` layer of the LINEAR state backend) for
which vLLM allocates one state page per request, hands its index in `state_indices_tensor` and frees it with
the request. A page (`StateLayout`, float32) holds the fast weights after the last complete memory chunk and
the weights at the current segment start, both as differences from the learned initial weights (so a zeroed
page is a valid start: a new request, seq_len == query_len, gets its page zeroed), the momentum, and the rows
written in the unfinished chunk (their count is the position modulo the chunk size). Each step, a memory layer
cuts every request's new tokens at segment boundaries; the k-th pieces of all requests are processed together
(retrieval with the segment-start weights, attention, then the memory write). Reads run the memory MLP on
the pages in place (`StateLayout.retrieve`); a piece that completes no chunk (every decode token but one per
chunk) only appends its rows to the pending ones, and only a piece that completes a chunk runs
`NeuralMemory.forward` (the training code's streaming chunked update), batched over the requests at the same
chunk phase. Prefix caching is turned off (a cached prefix would skip its tokens' memory writes; `configure`,
logged). The page size is logged at start; vLLM raises the attention block size until one attention page holds
one state page (`platforms/interface.py`, `_align_hybrid_block_size`), so a large state means large attention
blocks; a cache set explicitly that cannot hold one request's state is refused at config time
(`check_state_fits`).

How it maps onto vLLM
---------------------
Every layer is a vLLM `LlamaDecoderLayer` (its projections, rotary embedding, norms and MLP) whose attention
runs in torch: segment-local attention is block-diagonal, which vLLM's kernels cannot express (a sliding
window is not the same), and a memory layer attends over [persistent tokens ‖ retrieved tokens h ‖ tokens x]
of its segment, two context entries per position. The layers own vLLM `Attention` layers only for their paged
KV caches (x's K/V and, in memory layers, h's K/V; same shapes everywhere, so vLLM's allocator, prefix caching
and chunked prefill treat them like any other): they write the new tokens' K/V into those caches at
`slot_mapping` and gather each request's segment through its block table. On CPU this costs nothing
measurable: 710 output tokens/s against 720 with vLLM's kernels in the layers without memory (16 requests x
128 tokens, bf16, when that was an option). The memory read-out itself is `NeuralMemory.retrieve` from the
training code, so both sides share one implementation.
"""

import os

import torch
import torch.nn.functional as F
from torch import nn
from vllm.compilation.decorators import ignore_torch_compile
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from .models.modeling_mac_llama import gated_readout, memory_from_config
from .models.neural_memory import UPDATE_RULES, MemoryState, NeuralMemory, unit_rms

logger = init_logger(f"vllm.{__name__}")  # under "vllm": its handler prints our INFO lines


def check_servable(config) -> None:
    """Refuse what this model cannot compute exactly (called at config time, before any weight is loaded)."""
    if config.update_rule not in UPDATE_RULES:
        raise ValueError(
            f"this MAC checkpoint's update_rule {config.update_rule!r} is not one of {UPDATE_RULES}"
        )


def configure(vllm_config) -> None:
    """The plugin's config hook (vLLM calls it while it builds its config, before the hybrid-model set-up and
    before any weight is loaded). A learning memory makes the model hybrid (per-request state pages), and
    prefix caching is turned off: a cached prefix would skip its tokens' memory writes. Frozen memory keeps
    the model a plain attention model (`layer_types` all full attention, which is what vLLM reads to tell)."""
    config = vllm_config.model_config.hf_config
    check_servable(config)
    memory_layers = set(config.memory_layers)
    if config.update_rule == "none":
        config.layer_types = ["full_attention"] * config.num_hidden_layers
        return
    config.layer_types = [
        "mac_memory" if i in memory_layers else "full_attention" for i in range(config.num_hidden_layers)
    ]
    cache_config = vllm_config.cache_config
    check_state_fits(vllm_config)
    if cache_config.enable_prefix_caching:
        cache_config.enable_prefix_caching = False
        logger.info(
            "MAC model with a learning memory (update_rule %s): prefix caching turned off (a cached prefix "
            "would skip its tokens' memory writes)",
            config.update_rule,
        )


def _configured_cache_bytes(cache_config) -> int | None:
    """The KV cache size when it is set explicitly (`--kv-cache-memory-bytes`, or on CPU the legacy
    `VLLM_CPU_KVCACHE_SPACE` in GiB, which vLLM's platform hook reads only after this one); None when vLLM
    sizes the cache itself from the free memory, known only once the engine has started."""
    if cache_config.kv_cache_memory_bytes is not None:
        return cache_config.kv_cache_memory_bytes
    from vllm.platforms import current_platform

    space = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
    return int(space) << 30 if current_platform.is_cpu() and space else None


def check_state_fits(vllm_config) -> None:
    """Refuse, before any engine starts, a cache that cannot hold one request's memory state (vLLM would stop
    later, after loading the model, blaming `max_model_len`); log how many requests' states it holds when that
    is fewer than `--max-num-seqs`. The state pages are a lower bound of a request's cache: its attention
    blocks come on top."""
    config = vllm_config.model_config.hf_config
    cache_bytes = _configured_cache_bytes(vllm_config.cache_config)
    if cache_bytes is None:
        return
    per_request = StateLayout.from_config(config).nbytes * len(config.memory_layers)
    if per_request > cache_bytes:
        raise ValueError(
            f"MAC learning memory (update_rule {config.update_rule}): one request's memory state "
            f"({per_request / 2**20:.1f} MiB in {len(config.memory_layers)} memory layers) does not fit the "
            f"{cache_bytes / 2**20:.1f} MiB KV cache; raise VLLM_CPU_KVCACHE_SPACE (GiB) or "
            "--kv-cache-memory-bytes, or serve with update_rule none"
        )
    max_num_seqs = vllm_config.scheduler_config.max_num_seqs
    if per_request * max_num_seqs > cache_bytes:
        logger.info(
            "MAC learning memory: the %.1f MiB KV cache holds the memory state of at most %d requests at "
            "once (--max-num-seqs %d; %.1f MiB each, attention blocks come on top): raise "
            "VLLM_CPU_KVCACHE_SPACE or --kv-cache-memory-bytes for more",
            cache_bytes / 2**20,
            cache_bytes // per_request,
            max_num_seqs,
            per_request / 2**20,
        )


# ----------------------------------------------------------------------------------------------- paged K/V


def _cache_views(attn: Attention) -> tuple[torch.Tensor, torch.Tensor]:
    """`attn`'s paged cache [blocks, kv_heads, block, 2 * d] as keys and values [blocks, kv_heads, block, d]:
    the first and second half of each token's row (only this module reads the caches it writes). Slices, not
    `.view()`: a backend may hand the cache in a permuted, non-contiguous memory layout, where a view cannot
    be formed."""
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
    because torch's CPU SDPA with an explicit mask is ~10x slower at decode shapes (measured: 1.8 ms vs 0.15
    ms for 16 requests); the softmax runs in float32."""
    B, H, Q, d = query.shape
    kv_heads, K = keys.shape[1], keys.shape[2]
    grouped = query.reshape(B, kv_heads, H // kv_heads * Q, d)  # the heads sharing a K/V head as more queries
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float().mul_(scale)
    scores = scores.view(B, kv_heads, H // kv_heads, Q, K).masked_fill_(~mask[:, None, None], float("-inf"))
    weights = scores.softmax(dim=-1).to(values.dtype).view(B, kv_heads, -1, K)
    return torch.matmul(weights, values).view(B, H, Q, d)


def _pieces(metadata, positions: torch.Tensor, n: int, segment_len: int):
    """Each request's new tokens (consecutive) cut at segment boundaries, so attention is block-diagonal: the
    request of every token, and the first token and length of every piece."""
    starts = metadata.query_start_loc
    request = torch.repeat_interleave(
        torch.arange(len(starts) - 1, device=positions.device), starts[1:] - starts[:-1]
    )[:n]
    segment = positions[:n] // segment_len
    new_piece = torch.ones(n, dtype=torch.bool, device=positions.device)
    new_piece[1:] = (request[1:] != request[:-1]) | (segment[1:] != segment[:-1])
    piece_starts = torch.nonzero(new_piece)[:, 0]
    piece_lengths = torch.diff(piece_starts, append=piece_starts.new_tensor([n]))
    return request, piece_starts, piece_lengths


def _attend_pieces(
    attn, metadata, positions, q, layers, segment_len, request, piece_starts, piece_lengths, persistent
):
    """Causal attention of the pieces' queries (each inside one segment) over the K/V the caches of `layers`
    hold from their segment start to their own position (the pieces' own K/V already written); `persistent` as
    in `segment_attention`. Returns the token indices (m,) and the outputs (m, heads * d)."""
    d, heads, kv_heads = attn.head_dim, attn.num_heads, attn.num_kv_heads
    piece_requests = request[piece_starts]
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
    all_metadata = get_forward_context().attn_metadata
    for layer in layers:
        # each cache through its own block table: a hybrid model's attention layers form several KV cache
        # groups
        layer_metadata = (
            all_metadata.get(layer.layer_name, metadata) if isinstance(all_metadata, dict) else metadata
        )
        layer_keys, layer_values = _gather_kv(layer, layer_metadata.block_table[piece_requests], key_pos)
        keys.append(layer_keys.to(q.dtype))
        values.append(layer_values.to(q.dtype))
        masks.append(visible)
    result = _grouped_attention(
        query, torch.cat(keys, dim=2), torch.cat(values, dim=2), torch.cat(masks, dim=2), attn.scaling
    )
    return token[valid], result.transpose(1, 2)[valid].reshape(-1, heads * d)


def _piece_tokens(starts: torch.Tensor, length: int) -> torch.Tensor:
    """The token indices of pieces of `length` tokens starting at `starts`, piece after piece."""
    return (starts[:, None] + torch.arange(length, device=starts.device)[None]).reshape(-1)


def _metadata(attn):
    """The attention metadata of `attn` (a vLLM `LlamaAttention`) in this forward; None in profiling runs."""
    metadata = get_forward_context().attn_metadata
    return metadata.get(attn.attn.layer_name) if isinstance(metadata, dict) else metadata


def _write_stream(attn, layer: Attention, key, value, tokens=None) -> None:
    """Write new tokens' K/V (after RoPE) into `layer`'s paged cache; `tokens` selects some of them (default:
    the first `n` of the forward, the real ones)."""
    d, kv_heads = attn.head_dim, attn.num_kv_heads
    slots = get_forward_context().slot_mapping[layer.layer_name]
    slots = slots[: key.shape[0]] if tokens is None else slots[tokens]
    count = key.shape[0]
    _write_kv(layer, key.view(count, kv_heads, d), value.view(count, kv_heads, d), slots)


def segment_attention(attn, positions, q, streams, segment_len: int, persistent=None) -> torch.Tensor:
    """Causal attention of each request's new tokens inside their segments, through the paged caches.

    `attn` is the layer's vLLM `LlamaAttention` (head sizes, rotary embedding, metadata key); `q` (tokens,
    heads * d) after RoPE; `streams` a list of (`Attention` owning a cache, keys, values) for the new tokens,
    after RoPE: every position contributes one entry per stream, visible to the queries at or after it in its
    segment. `persistent` (keys before RoPE, values) are extra entries visible to every query of a segment,
    RoPE'd at its first position. Returns (tokens, heads * d); zeros in vLLM's profiling runs (no
    metadata)."""
    out = q.new_zeros(q.shape[0], attn.num_heads * attn.head_dim)
    metadata = _metadata(attn)
    if metadata is None:
        return out
    n = metadata.num_actual_tokens
    for layer, key, value in streams:
        _write_stream(attn, layer, key[:n], value[:n])
    request, piece_starts, piece_lengths = _pieces(metadata, positions, n, segment_len)
    layers = [layer for layer, _, _ in streams]
    tokens, result = _attend_pieces(
        attn, metadata, positions, q, layers, segment_len, request, piece_starts, piece_lengths, persistent
    )
    out[tokens] = result
    return out


# ----------------------------------------------------------------------------------------------- memory state


class StateLayout:
    """Where one request's memory state lives in its state page (one flat float32 vector per memory layer):

    - `weights`: the fast weights after the last complete memory chunk, as a DIFFERENCE from the learned
    initial
      weights (a zeroed page is the initial memory, the start of every request);
    - `momentum`: the surprise S (zero at the start; "ema" never moves it);
    - `segment`: the weights at the start of the current segment (what its tokens are retrieved with), also as
    a
      difference;
    - `pending`: the rows written in the unfinished chunk (chunk_size rows of width D; how many is the token's
      position modulo chunk_size: chunks and segments are counted from the request's first token, and one rule
      serves the deployment, so every token of the chunk so far was written)."""

    def __init__(self, memory: NeuralMemory):
        self.shapes = [tuple(w.shape) for w in memory.initial_weights]
        self.sizes = [w.numel() for w in memory.initial_weights]
        self.chunk_size, self.dim = memory.chunk_size, memory.dim
        self.weights_size = sum(self.sizes)
        self.pending_offset = 3 * self.weights_size
        self.size = self.pending_offset + self.chunk_size * self.dim

    @classmethod
    def from_config(cls, config) -> "StateLayout":
        with torch.device("meta"):
            return cls(memory_from_config(config))

    @property
    def nbytes(self) -> int:
        return 4 * self.size

    def part(self, part: int) -> slice:
        """Where part 0 (weights), 1 (momentum) or 2 (segment) lies in a page."""
        return slice(part * self.weights_size, (part + 1) * self.weights_size)

    def tensors(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """One part of pages, (B, weights_size), as a list of (B, *shape) views (one per memory MLP layer)."""
        out, offset = [], 0
        for shape, size in zip(self.shapes, self.sizes):
            out.append(flat[:, offset : offset + size].view(-1, *shape))
            offset += size
        return out

    def write(self, pages: torch.Tensor, idx: torch.Tensor, part: int, tensors) -> None:
        """Store (B, *shape) tensors, one per memory MLP layer, as part `part` of the pages `idx` (layer by
        layer: no concatenated copy)."""
        offset = part * self.weights_size
        for t, size in zip(tensors, self.sizes):
            pages[idx, offset : offset + size] = t.reshape(len(idx), size)
            offset += size

    def pending(self, rows: int) -> slice:
        """Where the first `rows` pending rows lie in a page."""
        return slice(self.pending_offset, self.pending_offset + rows * self.dim)

    def weights(self, memory: NeuralMemory, pages: torch.Tensor, idx: torch.Tensor, part: int):
        """Part 0 (weights) or 2 (segment start) of the pages `idx` as absolute fast weights (B, *shape) per
        memory MLP layer: a gathered copy of the differences, the initial weights added in place."""
        deltas = self.tensors(pages[idx, self.part(part)])
        return tuple(d.add_(w) for d, w in zip(deltas, memory.initial_weights))

    def retrieve(
        self, memory: NeuralMemory, pages: torch.Tensor, slots: list[int], part: int, x: torch.Tensor
    ):
        """`memory.retrieve` of x (B, T, D) for B requests whose fast weights are the initial weights plus
        part `part` of their pages `slots`, reading the pages in place: each memory MLP layer is the initial
        weights' product (one matmul for all requests) plus each page's difference times its rows (a view of
        the page). Gathering the pages first (a copy) made the reads of a decode step cost more than the rest
        of the model: one read of 16 single-head pages (D 576, 1 thread) took 53 ms gathered, 8 ms in
        place."""
        B, T, _ = x.shape
        heads = memory.heads
        h = memory._queries(x.float()).transpose(1, 2)  # (B * heads, d, T)
        offset = part * self.weights_size
        for i, (w, (rows, cols), size) in enumerate(zip(memory.initial_weights, self.shapes, self.sizes)):
            if i:
                h = F.silu(h)
            # the initial weights' product as one matmul per head over all requests' columns (a broadcast
            # matmul would expand the weights to every request first: 16 ms instead of 0.4 ms for one head)
            columns = h.view(B, heads, cols, T).permute(1, 2, 0, 3).reshape(heads, cols, B * T)
            pre = torch.bmm(memory._fold(w[None]), columns).view(heads, rows // heads, B, T)
            pre = pre.permute(2, 0, 1, 3).contiguous()  # (B, heads, out, T)
            for r, slot in enumerate(slots):
                delta = pages[slot, offset : offset + size].view(heads, rows // heads, cols)
                pre[r].baddbmm_(delta, h[r * heads : (r + 1) * heads])
            h = pre.view(B * heads, rows // heads, T)
            offset += size
        return memory._linear(memory._merge_heads(h.transpose(1, 2)), memory.out_proj).to(x.dtype)


class MACMemoryStateCache(nn.Module, MambaBase):
    """The per-request memory state of one memory layer, in vLLM's state cache (`MambaSpec` pages, as its
    recurrent layers keep theirs): vLLM allocates one page per request, gives its index in
    `LinearAttentionMetadata.state_indices_tensor` and frees it with the request. No parameters."""

    def __init__(self, layout: StateLayout, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.layout, self.prefix = layout, prefix
        context = vllm_config.compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        context[prefix] = self
        self.kv_cache = (torch.tensor([]),)

    def get_state_shape(self):
        return ((self.layout.size,),)

    def get_state_dtype(self):
        return (torch.float32,)

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.LINEAR  # its metadata: state slots, query starts, sequence lengths

    def metadata(self):
        metadata = get_forward_context().attn_metadata
        return metadata.get(self.prefix) if isinstance(metadata, dict) else None


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
    """A decoder layer whose attention context is [persistent ‖ retrieved ‖ tokens] of its segment and whose
    output adds the gated memory read-out (steps 1-4 of `modeling_mac_llama.py`). With update rule "none" the
    memory is frozen; with "surprise" or "ema" each request's memory learns in its own state page
    (`MACMemoryStateCache`)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        attn = self.self_attn
        self.memory = memory_from_config(config)
        self.memory_version = config.memory_version
        self.update_rule = config.update_rule
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
        self.state_cache = (
            MACMemoryStateCache(StateLayout(self.memory), vllm_config, f"{prefix}.memory_state")
            if self.update_rule != "none"
            else None
        )

    @torch.no_grad()
    def freeze_memory(self) -> None:
        """At the first forward (after vLLM has loaded and, on CPU, re-packed the linear weights): what
        serving reads at every step, computed once. The memory runs in float32 (as `NeuralMemory` computes
        anyway, casting each weight per call), the frozen state is the learned initial weights, and the
        persistent tokens' K/V (before RoPE) are constants."""
        self.memory.float()
        self.frozen_state = self.memory.init_state(1)
        if self.persistent_tokens is not None:
            _, p_k, p_v = self._qkv(self.persistent_tokens)
            self.persistent_kv = (p_k.contiguous(), p_v.contiguous())

    def attention(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.frozen_state is None:
            self.freeze_memory()
        if self.state_cache is not None and _metadata(self.self_attn) is not None:
            return self.learning_attention(positions, x)
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

    # -- the learning memory

    @torch.no_grad()
    def learning_attention(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Steps 1-4 with a memory that learns per request, as `MACLlamaDecoderLayer._memory_attention`
        computes them: each request's new tokens are cut into pieces at segment boundaries; the k-th pieces of
        all requests form round k (a piece's segment start depends on the memory update of the previous one).
        In a round: retrieve with each request's segment-start weights, attend, then write the attention
        output into the request's memory. A piece that completes no memory chunk (every decode token but one
        per chunk) costs one read-out with the current weights, its rows appended to the pending ones; a piece
        that completes one runs `NeuralMemory.forward` (the training code's chunked update). Pieces are
        batched by length (and, for the chunk update, by chunk phase): a decode step makes one retrieval call,
        one read-out call and one update call for the requests whose chunk completes."""
        attn, memory, layout = self.self_attn, self.memory, self.state_cache.layout
        metadata, state_metadata = _metadata(attn), self.state_cache.metadata()
        pages = self.state_cache.kv_cache[0]
        n = metadata.num_actual_tokens
        positions = positions[:n]
        q, k, v = self._qkv(x[:n])
        q, k = attn.rotary_emb(positions, q, k)
        _write_stream(attn, attn.attn, k, v)
        request, piece_starts, piece_lengths = _pieces(metadata, positions, n, self.segment_len)
        num_requests = len(metadata.query_start_loc) - 1
        slots = state_metadata.state_indices_tensor[:num_requests].long()

        # a new request (nothing computed before this step) starts from a zeroed page: the initial memory
        query_lens = state_metadata.query_start_loc[1:] - state_metadata.query_start_loc[:-1]
        fresh = (state_metadata.seq_lens[:num_requests] - query_lens[:num_requests]) == 0
        if bool(fresh.any()):
            pages[slots[fresh]] = 0

        piece_requests = request[piece_starts]
        first_piece = torch.ones_like(piece_requests, dtype=torch.bool)
        first_piece[1:] = piece_requests[1:] != piece_requests[:-1]
        first_index = torch.cummax(torch.where(first_piece, torch.arange(len(piece_starts)), 0), 0).values
        rank = torch.arange(len(piece_starts)) - first_index
        rms_x = unit_rms(x[:n])
        out = x.new_zeros(x.shape[0], x.shape[1])
        chunk, segment_len, width = memory.chunk_size, self.segment_len, x.shape[1]
        for r in range(int(rank.max()) + 1):
            in_round = torch.nonzero(rank == r)[:, 0]
            starts, lengths = piece_starts[in_round], piece_lengths[in_round]
            idx_of_piece = slots[piece_requests[in_round]]
            first_pos = positions[starts]
            by_length: dict[int, list[int]] = {}
            for j, length in enumerate(lengths.tolist()):
                by_length.setdefault(length, []).append(j)

            # 1. retrieval with the segment-start weights; at a segment start (a chunk start: nothing is
            # pending) the current weights become the segment-start copy
            at_segment_start = idx_of_piece[first_pos % segment_len == 0]
            if len(at_segment_start):
                pages[at_segment_start, layout.part(2)] = pages[at_segment_start, layout.part(0)]
            h = x.new_zeros(n, width)
            for length, members in by_length.items():
                members = torch.tensor(members)
                tokens = _piece_tokens(starts[members], length)
                slots_in = idx_of_piece[members].tolist()
                reads = layout.retrieve(
                    memory, pages, slots_in, 2, rms_x[tokens].view(len(members), length, -1)
                )
                h[tokens] = reads.reshape(-1, width).to(x.dtype)
            tokens = torch.cat([_piece_tokens(starts[m], length) for length, m in by_length.items()])
            _, h_k, h_v = self._qkv(h[tokens])
            _, h_k = attn.rotary_emb(positions[tokens], torch.empty_like(h_k[:, :0]), h_k)
            _write_stream(attn, self.retrieved_attn, h_k, h_v, tokens)

            # 2. attention over [persistent ‖ retrieved ‖ tokens] of the pieces' segments
            tokens, result = _attend_pieces(
                attn,
                metadata,
                positions,
                q,
                [attn.attn, self.retrieved_attn],
                segment_len,
                request,
                starts,
                lengths,
                self.persistent_kv,
            )
            y, _ = attn.o_proj(result)
            y_row = torch.empty(n, dtype=torch.long)
            y_row[tokens] = torch.arange(len(tokens))

            # 3. the memory write of y, 4. the gated read-out; pieces completing no chunk grouped by length
            # alone (phase None), the others by length and chunk phase
            phases = first_pos % chunk
            groups: dict[tuple[int, int | None], list[int]] = {}
            for j, (length, phase) in enumerate(zip(lengths.tolist(), phases.tolist())):
                groups.setdefault((length, None if phase + length < chunk else phase), []).append(j)
            for (length, phase), members in groups.items():
                members = torch.tensor(members)
                idx = idx_of_piece[members]
                piece_tokens = _piece_tokens(starts[members], length)
                piece_y = y[y_row[piece_tokens]]
                written = unit_rms(piece_y).float().view(len(members), length, -1)
                if phase is None:  # read with the current (chunk-start) weights, append to the pending rows
                    readout = layout.retrieve(memory, pages, idx.tolist(), 0, written)
                    row_start = layout.pending_offset + phases[members] * layout.dim
                    columns = row_start[:, None] + torch.arange(length * layout.dim)[None]
                    pages[idx[:, None], columns] = written.view(len(members), -1)
                else:  # a chunk completes: the weights and the momentum move
                    state = MemoryState(
                        layout.weights(memory, pages, idx, 0),
                        tuple(layout.tensors(pages[idx, layout.part(1)])),
                        pages[idx, layout.pending(phase)].view(len(members), phase, layout.dim),
                        0,
                        phase,
                        self.update_rule,
                    )
                    readout, state, _ = memory(written, state, self.update_rule)
                    deltas = [w - i for w, i in zip(state.weights, memory.initial_weights)]
                    layout.write(pages, idx, 0, deltas)
                    layout.write(pages, idx, 1, state.momentum)
                    new_phase = state.pending.shape[1]
                    if new_phase:
                        pages[idx, layout.pending(new_phase)] = state.pending.reshape(len(members), -1)
                readout = readout.reshape(-1, width).to(y.dtype)
                out[piece_tokens] = piece_y + gated_readout(
                    self.memory_gate, readout, piece_y, self.memory_version
                )
        return out


# ----------------------------------------------------------------------------------------------- model


@ignore_torch_compile  # the torch-attention layers gather from the paged cache with data-dependent shapes
class MACLlamaModel(LlamaModel):
    pass


class MACLlamaForCausalLM(LlamaForCausalLM, HasInnerState, IsHybrid):
    """vLLM model for `MACLlamaForCausalLM` checkpoints (see the module docstring for what is supported).

    `configure` (the plugin's config hook in vllm_plugin.py) has already checked the checkpoint when vLLM
    built its config, before this class is built. Weights load with Llama's own `load_weights` (stacked q/k/v
    and gate/up); the memory parameters keep their transformers names (`model.layers.N.memory.*`,
    `.memory_gate`, `.persistent_tokens`) and load one to one.

    A learning memory ("surprise", "ema") makes this a hybrid model in vLLM's sense: each memory layer keeps a
    per-request state page (`StateLayout`) next to the paged K/V; with "none" it is a plain attention
    model."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        memory_layers = set(config.memory_layers)
        if config.update_rule == "none":
            logger.info(
                "MAC model: frozen memory (update_rule none) in layers %s, segments of %d tokens",
                sorted(memory_layers),
                config.segment_len,
            )
        else:
            layout = StateLayout.from_config(config)
            logger.info(
                "MAC model: learning memory (update_rule %s) in layers %s, segments of %d tokens, memory "
                "chunks of %d; memory state per request: %.2f MB per memory layer (fast weights, momentum, "
                "segment-start weights: 3 x %d float32; pending rows %d x %d), %.2f MB in all",
                config.update_rule,
                sorted(memory_layers),
                config.segment_len,
                config.memory_chunk_size,
                layout.nbytes / 1e6,
                layout.weights_size,
                layout.chunk_size,
                layout.dim,
                layout.nbytes * len(memory_layers) / 1e6,
            )

        def layer_type(*, vllm_config: VllmConfig, prefix: str):
            is_memory = extract_layer_index(prefix) in memory_layers
            return (MACMemoryDecoderLayer if is_memory else MACDecoderLayer)(
                vllm_config=vllm_config, prefix=prefix
            )

        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)

    def _init_model(self, vllm_config: VllmConfig, prefix: str = "", layer_type=LlamaDecoderLayer):
        return MACLlamaModel(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        return ((StateLayout.from_config(vllm_config.model_config.hf_config).size,),)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        return (torch.float32,)
