"""Any Llama with an inference-time memory (the "InferenceMemoryWrapper" that `package_model.py` writes).

This file travels inside packaged checkpoints (`trust_remote_code=True`): it imports only torch, transformers,
the standard library and its sibling files.

What it does
------------
`MemoryLlamaForCausalLM` is a `LlamaForCausalLM` with the same parameter names and computation, plus a memory
that persists across forward / `generate()` calls (and, through `save_memory` / `load_memory`, across
processes) until `reset_memory()`. At the layers in `config.memory_layers` (default: every layer), attention
also attends to memory entries that live in that layer's own key/value space (after `k_proj` / `v_proj`).
Every call can read the memory (`use_memory`, default `config.use_memory`) and write its tokens into it
(`update_rule`: "ema", "surprise" or "none", default `config.update_rule`; anything else is a ValueError):

    model.generate(**inputs, max_new_tokens=50, use_memory=True, update_rule="ema")
    model.save_memory("memory.safetensors"); ...; model.load_memory("memory.safetensors");
    model.reset_memory()

The stores of one memory layer
------------------------------
- Key/value slots (`memory_slots` per key/value head), written by both rules with the token's pre-RoPE key and
  its value: a ring of `memory_recent_slots` (default half) holding the most recent tokens verbatim, and a
  pool receiving the tokens that leave the ring: verbatim while it has room (so the first `memory_slots`
  tokens are all remembered exactly, like a key/value cache of earlier sessions), then
  - "ema": the token is merged into the pool slot whose key is most similar (cosine, per head):
    slot <- (1 - r') slot + r' token, r' = max(memory_ema_rate, 1 / (n + 1)) with n the tokens already in the
    slot (a running mean of its first 1/r tokens, an exponential moving average after);
  - "surprise": a token whose surprise (below) exceeds the lowest surprise in the pool replaces that slot
    verbatim, otherwise it is merged like "ema". Priorities decay by (1 - memory_decay) per written token, so
    old surprises fade; "ema"-written slots have the lowest priority.
  The first token of every sequence is an attention sink (in a Llama its key/value carry the sink's massive
  activations, not content). It is written like any token but never replaced: measured, dropping the sinks
  made the memory harmful (see below), because a remembered stretch of text reads best with its own sink
  before it. Slot j of the f filled ones (pool first, then the ring, oldest first) is read as a key rotated to
  the virtual RoPE position j - f: the memory sits right before the current sequence (whose positions start at
  0), in the order it was written, as an earlier session kept in context would. Empty slots are left out (not
  merely masked).
- A Titans `NeuralMemory` ("surprise" only), one per memory layer with the key/value heads folded into its
batch:
  a linear (depth 1) fast-weight associative memory trained at test time with the Titans surprise rule
  (momentum `memory_momentum`, forgetting `memory_decay`, rate `memory_lr`, per-token gradient clipping
  `memory_max_grad_norm`, chunks of `memory_chunk_size` tokens; all layers are trained as one batch). It
  learns phi(k) -> [k; v] for every written token, with k and v at unit RMS and k centred on the running mean
  of the written keys (keys of a Llama layer share one dominant direction, ~90% of their norm: without
  centring all features are alike and the memory fits worse than their mean). phi(x) = l2norm(silu([x; -x]))
  is the memory's own key map with the FIXED projection W_K = [I; -I] (silu(x) - silu(-x) = x, so nothing of x
  is lost); values and read-out are identities and the initial memory is zero, so an untouched memory reads
  exactly 0 and is left out. A token's surprise is its error ||M(phi(k)) - [k; v]|| (proportional to the
  associative-loss gradient) at the weights its chunk starts from; the slot priority is the mean log-surprise
  over layers and heads (one decision per token, so a token is kept in every layer or in none). Reading: each
  query q reads M(phi(q)) = [kappa; nu] (the stored key q matches and its value, the mean key and the RMS
  scales restored) as ONE extra key/value slot seen by that query only, its key rotated to
  `memory_readout_distance` positions before the query.

Sequences and snapshots
-----------------------
Inside one sequence (a forward call, or a whole `generate()` through its cache) every token reads the memory
as it was when the sequence started; the sequence's tokens are written after each forward. The current
sequence is in the key/value cache already, so it is not read back through the memory: what the memory adds is
everything written by EARLIER calls. Consequences (tested): cached greedy generation equals full recomputation
for a fixed memory; one forward over a text and token-by-token streaming through the cache give the same
logits and the same memory afterwards (all writes are sequential in token order; the neural memory is fed in
chunk-aligned pieces). Generating without a cache (`use_cache=False`) with a writing rule re-runs, and so
re-writes, the whole sequence at every step: use the cache (the default). The last token `generate()` returns
is never run through the model, so it is not written. Padding (attention_mask 0) is never written; a batch
shares one memory (rows are written one after the other).

Exactness: with `use_memory=False`, or while a layer's stores are empty, that layer runs Llama's own attention
code on the same tensors, so the logits are exactly `LlamaForCausalLM`'s (tested to 1e-5).

What works (SmolLM2-135M-Instruct, float32, every layer, 512 slots; tests/test_package.py prints the first
two)
-----------------------------------------------------------------------------------------------------------
- Recall across sessions while the text fits the slots: after one forward over an 86-token text about a
fictitious
  country, the loss of a new reading of that text falls from 3.81 to 0.20 (0.20 is also the loss of the text's
  second copy when both copies are in context: the memory then equals the context), and log p(" Tarsk" | "What
  is the capital of Velmora?") rises from -15.6 to -5.4. Fewer memory layers give less (every other layer from
  6: loss 1.37; every other layer from 10: 2.36).
- Beyond the slots the memory is lossy: with the same text between 700 and 800 tokens of Python source (1586
  tokens written, 512 slots), the loss on it is 4.04 (ema) / 3.97 (surprise) against 3.81 without memory and
  4.1-4.2 with the source alone in context, and the answers are back at their no-memory log-probabilities: the
  ring holds the last code, and the facts were merged into code clusters (ema) or not judged surprising enough
  to be kept (surprise: the mean log-error of the fictitious-country tokens is only 0.09 above the code's,
  whose per-token spread is 0.16).
- The neural memory's read-out has no measurable benefit with these fixed projections: the loss moves by <0.01
  nats with or without it (short and long case). At memory_lr 0.1 it costs ~0.6 nats on a later text after
  4800 written tokens, and at read-out distance 0 (the query's own position) it is much worse. It is the
  Titans rule without trained projections: a linear associative memory of 2 x head_dim features per head
  cannot single out one remembered token the way softmax attention over the slots does. A trained memory (the
  MAC student of this project) is the way to a useful neural memory; here "surprise" differs from "ema" mainly
  in which tokens the pool keeps once it is full.
- Attention with a non-empty memory runs through `torch.nn.functional.scaled_dot_product_attention` with an
  explicit mask (attn_implementation "sdpa" or "eager"; flash/flex are not supported by this class). The
  per-call context lives on the attention modules: one forward at a time per model instance.

Memory files (`save_memory` / `load_memory`): safetensors only, nothing is ever unpickled. Tensors
`layers.<i>.<name>` per memory layer (float32, int64 counters) and metadata: format, the model fingerprint
(`config.memory_fingerprint`, written by `package_model.py` from the weights at packaging time, so a package
gives the same fingerprint in any dtype; without it, computed from the weights: names, shapes and a fixed
sample of values) and the memory layers. Loading checks, in order, the file, format, fingerprint, tensor
names, dtypes and shapes, and raises a one-line ValueError naming the first mismatch; nothing is changed
unless all checks pass. The format, fingerprint function, atomic writer and checks are shared with the MAC
model (`memory_file.py`).
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    apply_rotary_pos_emb,
    repeat_kv,
    rotate_half,
)

from .configuration_memory_llama import MemoryLlamaConfig
from .memory_file import check_tensors, read_memory_file, write_memory_file
from .memory_file import weights_fingerprint as memory_file_fingerprint
from .neural_memory import UPDATE_RULES, MemoryState, NeuralMemory, unit_rms

MEMORY_FORMAT = "memory-llama-memory/1"


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (B, heads, n, d) with `cos`/`sin` of shape (B|1, n, d) (Llama's formula, keys only)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------- one layer's memory


def fixed_neural_parameters(neural: NeuralMemory) -> dict[str, torch.Tensor]:
    """The fixed parameters of a memory layer's `NeuralMemory` (input x = [k; v], width 2d; see the module
    docstring): keys and queries W = [[I, 0], [-I, 0]] (x -> [k; -k]), identity values and read-out, zero gate
    weights (constant gates at the configured rate, momentum and forgetting), zero initial memory."""
    width = neural.dim
    d = width // 2
    eye, zero = torch.eye(d), torch.zeros(d, d)
    keys = torch.cat([torch.cat([eye, zero], 1), torch.cat([-eye, zero], 1)], 0)
    bias = torch.tensor(
        [_logit(neural.init_lr / neural.max_lr), _logit(neural.init_momentum), _logit(neural.init_decay)]
    )
    return {
        "to_keys.weight": keys,
        "to_queries.weight": keys.clone(),
        "to_values.weight": torch.eye(width),
        "out_proj.weight": torch.eye(width),
        "gate_weight": torch.zeros(3, width),
        "gate_bias": bias,
        "initial_weights.0": torch.zeros(width, width),
    }


def set_fixed_neural_parameters(neural: NeuralMemory) -> None:
    """Write `fixed_neural_parameters` into the module (tensors already loaded from a checkpoint are kept)."""
    params = dict(neural.named_parameters())
    for name, value in fixed_neural_parameters(neural).items():
        init.copy_(params[name], value.to(device=params[name].device, dtype=params[name].dtype))


class LayerMemory(nn.Module):
    """The memory of one attention layer: the "ema" key/value slots and the "surprise" neural memory.

    The state is a flat dict of float32 tensors (int64 counters) kept OUTSIDE the module's parameters (it is
    not part of `state_dict()`); writes build new tensors, so a reference to an older state (a sequence's read
    snapshot) stays valid.
    """

    def __init__(self, config: MemoryLlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.num_slots = config.memory_slots
        self.num_recent = (
            config.memory_slots // 2 if config.memory_recent_slots is None else config.memory_recent_slots
        )
        self.num_pool = self.num_slots - self.num_recent
        self.ema_rate = float(config.memory_ema_rate)
        self.priority_decay = -math.log1p(
            -float(config.memory_decay)
        )  # lambda: (1 - decay) per written token
        width = 2 * self.head_dim
        self.neural = NeuralMemory(
            dim=width,
            memory_dim=width,
            depth=1,
            chunk_size=config.memory_chunk_size,
            max_lr=2 * float(config.memory_lr),  # the gate sits at sigmoid(0) = 1/2 of it: theta = memory_lr
            init_lr=float(config.memory_lr),
            init_momentum=float(config.memory_momentum),
            init_decay=float(config.memory_decay),
            max_grad_norm=config.memory_max_grad_norm,
        )
        self.state: dict[str, torch.Tensor] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set the neural memory's projections, gates and initial weights to their fixed values."""
        set_fixed_neural_parameters(self.neural)

    # -- state

    def device(self) -> torch.device:
        return self.neural.gate_bias.device

    def empty_state(self, device=None) -> dict[str, torch.Tensor]:
        device = self.device() if device is None else device
        return {
            name: (
                torch.zeros(shape, device=device, dtype=dtype)
                if shape is not None
                else torch.zeros(self.num_kv_heads, 0, 2 * self.head_dim, device=device, dtype=dtype)
            )
            for name, (shape, dtype) in self.expected_layout().items()
        }

    def current_state(self) -> dict[str, torch.Tensor]:
        """The live state (created empty on first use, moved to this layer's device if the model was
        moved)."""
        if self.state is None:
            self.state = self.empty_state()
        elif self.state["recent_keys"].device != self.device():
            self.state = {name: tensor.to(self.device()) for name, tensor in self.state.items()}
        return self.state

    def expected_layout(self) -> dict[str, tuple[tuple[int, ...] | None, torch.dtype]]:
        """Name -> (shape, dtype) of every state tensor (`None`: the neural memory's pending rows, (H, n < C,
        2d)). Unfilled entries hold zeros; priorities are decayed log-surprises (see `write_begin`), 0 where
        unused."""
        H, R, P, d, width = (
            self.num_kv_heads,
            self.num_recent,
            self.num_pool,
            self.head_dim,
            2 * self.head_dim,
        )
        f32, i64 = torch.float32, torch.int64
        return {
            "recent_keys": ((H, R, d), f32),  # the last written tokens, oldest first
            "recent_values": ((H, R, d), f32),
            "recent_priority": ((H, R), f32),
            "recent_filled": ((), i64),
            "pool_keys": ((H, P, d), f32),  # older tokens: verbatim, then merged / replaced
            "pool_values": ((H, P, d), f32),
            "pool_counts": ((H, P), f32),
            "pool_priority": ((H, P), f32),
            "pool_filled": ((), i64),
            "slot_tokens": ((), i64),  # tokens written to the slots so far
            "key_mean": ((H, d), f32),  # neural memory: running mean of its unit-RMS keys
            "key_rms": ((H,), f32),  # ... and mean RMS of its raw keys and values
            "value_rms": ((H,), f32),
            "neural.weights.0": ((H, width, width), f32),
            "neural.momentum.0": ((H, width, width), f32),
            "neural.pending": (None, f32),
            "neural.position": ((), i64),
        }

    @staticmethod
    def neural_tokens_applied(state) -> int:
        return int(state["neural.position"]) - state["neural.pending"].shape[1]

    @staticmethod
    def is_empty(state) -> bool:
        return int(state["slot_tokens"]) == 0 and LayerMemory.neural_tokens_applied(state) == 0

    # -- writes (no autograd; inputs (N, H_kv, d) pre-RoPE keys and values in write order)

    @torch.no_grad()
    def write_begin(self, state, keys, values, surprise: torch.Tensor | None, sinks: torch.Tensor):
        """Everything of a slot write but the sequential merges: the recent ring and the verbatim filling of
        the pool. `surprise`: None ("ema") or the (N,) log-surprise of each token (see
        `MemoryLlamaForCausalLM`); `sinks`: (N,) bool, the first tokens of sequences (attention sinks, never
        replaced). Returns (state, leftover): leftover = (keys, values, priorities) of the tokens that left
        the ring while the pool was full, to be merged by `merge_into_pools` (None if there are none)."""
        state = dict(state)
        keys = keys.to(device=state["recent_keys"].device, dtype=torch.float32)
        values = values.to(device=state["recent_keys"].device, dtype=torch.float32)
        N, H = keys.shape[0], self.num_kv_heads
        if surprise is not None:
            times = int(state["slot_tokens"]) + torch.arange(N, device=keys.device, dtype=torch.float32)
            # log(surprise) + t * lambda: comparing these compares surprises decayed by (1 - decay) per
            # written token
            scores = (surprise.to(keys.device) + times * self.priority_decay)[:, None].expand(N, H)
        else:
            scores = torch.full(
                (N, H), float("-inf"), device=keys.device
            )  # ema-written: the first to be replaced
        scores = scores.masked_fill(sinks.to(keys.device)[:, None], float("inf"))
        state["slot_tokens"] = state["slot_tokens"] + N

        # the ring of recent tokens: [old ring (oldest first) | new tokens] -> keep the last R, the rest
        # leaves
        filled = int(state["recent_filled"])
        seq_k = torch.cat([state["recent_keys"][:, :filled], keys.transpose(0, 1)], dim=1)
        seq_v = torch.cat([state["recent_values"][:, :filled], values.transpose(0, 1)], dim=1)
        seq_p = torch.cat([state["recent_priority"][:, :filled], scores.transpose(0, 1)], dim=1)
        R = self.num_recent
        keep = min(R, seq_k.shape[1])
        leave = seq_k.shape[1] - keep
        recent_k, recent_v, recent_p = (
            torch.zeros_like(state[n]) for n in ("recent_keys", "recent_values", "recent_priority")
        )
        recent_k[:, :keep], recent_v[:, :keep] = seq_k[:, leave:], seq_v[:, leave:]
        recent_p[:, :keep] = seq_p[:, leave:]
        state.update(recent_keys=recent_k, recent_values=recent_v, recent_priority=recent_p)
        state["recent_filled"] = torch.tensor(keep, dtype=torch.int64, device=keys.device)
        if not leave:
            return state, None

        # tokens leaving the ring: fill the pool verbatim, the rest is merged sequentially
        out_k, out_v, out_p = seq_k[:, :leave], seq_v[:, :leave], seq_p[:, :leave]
        pool_filled = int(state["pool_filled"])
        take = min(self.num_pool - pool_filled, leave)
        if take:
            for name, part in (("pool_keys", out_k), ("pool_values", out_v), ("pool_priority", out_p)):
                tensor = state[name].clone()
                tensor[:, pool_filled : pool_filled + take] = part[:, :take]
                state[name] = tensor
            counts = state["pool_counts"].clone()
            counts[:, pool_filled : pool_filled + take] = 1
            state["pool_counts"] = counts
            state["pool_filled"] = torch.tensor(pool_filled + take, dtype=torch.int64, device=keys.device)
        if take == leave:
            return state, None
        return state, (out_k[:, take:], out_v[:, take:], out_p[:, take:])

    def _neural_state(self, state) -> MemoryState:
        return self.neural.state_from_dict(state, prefix="neural.")

    def neural_inputs(self, state, keys, values):
        """The neural memory's inputs x = [k - mean; v] (H, N, 2d), unit-RMS k and v, and the new state
        without the neural weights (running key mean and RMS statistics updated)."""
        state = dict(state)
        keys = keys.to(device=state["recent_keys"].device, dtype=torch.float32)
        values = values.to(device=state["recent_keys"].device, dtype=torch.float32)
        before, N = int(state["neural.position"]), keys.shape[0]
        unit_keys = unit_rms(keys)
        # centre the keys on the running mean of the written (unit-RMS) keys, token by token: keys of a Llama
        # layer share one dominant direction (~90% of their norm), which would make all features alike
        counts = torch.arange(before + 1, before + N + 1, device=keys.device, dtype=torch.float32)[
            :, None, None
        ]
        means = (state["key_mean"] * before + unit_keys.cumsum(0)) / counts  # (N, H, d)
        x = torch.cat([unit_keys - means, unit_rms(values)], dim=-1).transpose(0, 1)  # (H, N, 2d)
        state["key_mean"] = means[-1]
        state["key_rms"] = (state["key_rms"] * before + keys.square().mean(-1).sqrt().sum(0)) / (before + N)
        state["value_rms"] = (state["value_rms"] * before + values.square().mean(-1).sqrt().sum(0)) / (
            before + N
        )
        return x, state

    # -- reads

    def slot_entries(self, state, cos: torch.Tensor, sin: torch.Tensor, dtype):
        """Filled slots, pool first then the ring (oldest first), as (keys rotated to positions -f..-1,
        values), each (H_kv, f, d); None if nothing is stored. `cos`/`sin`: (1, S, d) for positions -S..-1."""
        pool, recent = int(state["pool_filled"]), int(state["recent_filled"])
        filled = pool + recent
        if not filled:
            return None
        keys = torch.cat([state["pool_keys"][:, :pool], state["recent_keys"][:, :recent]], dim=1).to(dtype)[
            None
        ]
        values = torch.cat([state["pool_values"][:, :pool], state["recent_values"][:, :recent]], dim=1).to(
            dtype
        )[None]
        cos = cos[:, -filled:].to(device=keys.device, dtype=dtype)
        sin = sin[:, -filled:].to(device=keys.device, dtype=dtype)
        return _rotate(keys, cos, sin)[0], values[0]

    def readout(self, state, queries: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """(kappa, nu), each (B, H, T, d) in the queries' dtype, for pre-RoPE queries (B, H, T, d); kappa
        rotated with `cos`/`sin` (the queries' positions minus the read-out distance). None while nothing has
        been learned."""
        if self.neural_tokens_applied(state) == 0:
            return None
        B, H, T, d = queries.shape
        Hkv, groups = self.num_kv_heads, H // self.num_kv_heads
        q = (
            queries.float()
            .reshape(B, Hkv, groups, T, d)
            .permute(1, 0, 2, 3, 4)
            .reshape(Hkv, B * groups * T, d)
        )
        x = torch.cat([unit_rms(q), torch.zeros_like(q)], dim=-1)
        out = self.neural.retrieve(self._neural_state(state), x)  # (Hkv, B*g*T, 2d)
        kappa = (out[..., :d] + state["key_mean"][:, None, :]) * state["key_rms"][:, None, None]
        nu = out[..., d:] * state["value_rms"][:, None, None]

        def back(t):
            return (
                t.reshape(Hkv, B, groups, T, d).permute(1, 0, 2, 3, 4).reshape(B, H, T, d).to(queries.dtype)
            )

        kappa, nu = back(kappa), back(nu)
        return _rotate(kappa, cos.to(kappa.device, kappa.dtype), sin.to(kappa.device, kappa.dtype)), nu


@torch.no_grad()
def merge_into_pools(items, ema_rate: float) -> None:
    """Merge the tokens that left the recent rings into the (full) pools, token after token, for all memory
    layers' heads at once (one loop over the tokens, not one per layer). `items`: (LayerMemory, state, (keys
    (H, M, d), values, priorities (H, M))) with the same M; sets each memory's state.

    Per head and token: if the token's priority exceeds the pool's lowest (a surprising token, see
    `LayerMemory.write_begin`), it replaces that slot verbatim; otherwise it is merged into the slot with the
    most similar key: slot <- (1 - r') slot + r' token, r' = max(ema_rate, 1 / (n + 1)), and the slot keeps
    the larger priority. Tokens written by "ema" have priority -inf: they are always merged."""
    by_device: dict[torch.device, list] = {}
    for item in items:
        by_device.setdefault(item[1]["pool_keys"].device, []).append(item)
    for group in by_device.values():
        pool_k = torch.cat([state["pool_keys"] for _, state, _ in group])  # (G, P, d), G = layers x heads
        pool_v = torch.cat([state["pool_values"] for _, state, _ in group])
        counts = torch.cat([state["pool_counts"] for _, state, _ in group])
        priority = torch.cat([state["pool_priority"] for _, state, _ in group])
        new_k = torch.cat([left[0] for _, _, left in group])  # (G, M, d)
        new_v = torch.cat([left[1] for _, _, left in group])
        new_p = torch.cat([left[2] for _, _, left in group])
        heads = torch.arange(pool_k.shape[0], device=pool_k.device)
        unit, new_unit = F.normalize(pool_k, dim=-1), F.normalize(new_k, dim=-1)
        for t in range(new_k.shape[1]):
            nearest = torch.bmm(unit, new_unit[:, t, :, None])[..., 0].argmax(-1)
            weakest = priority.argmin(-1)
            replace = new_p[:, t] > priority[heads, weakest]
            j = torch.where(replace, weakest, nearest)
            n = torch.where(replace, torch.zeros_like(counts[:, 0]), counts[heads, j])
            rate = torch.where(replace, torch.ones_like(n), torch.clamp(1.0 / (n + 1.0), min=ema_rate))[
                :, None
            ]
            k = pool_k[heads, j] + rate * (new_k[:, t] - pool_k[heads, j])
            pool_k[heads, j] = k
            pool_v[heads, j] = pool_v[heads, j] + rate * (new_v[:, t] - pool_v[heads, j])
            counts[heads, j] = n + 1
            priority[heads, j] = torch.where(
                replace, new_p[:, t], torch.maximum(priority[heads, j], new_p[:, t])
            )
            unit[heads, j] = F.normalize(k, dim=-1)
        start = 0
        for memory, state, _ in group:
            H = memory.num_kv_heads
            part = slice(start, start + H)
            state.update(
                pool_keys=pool_k[part],
                pool_values=pool_v[part],
                pool_counts=counts[part],
                pool_priority=priority[part],
            )
            memory.state = state
            start += H


# ----------------------------------------------------------------------------------------------- attention


class _CallContext:
    """What one forward call tells the memory layers: the read snapshot and the rotary tables for memory
    entries, and whether to record the new tokens' keys/values for the write after the call."""

    def __init__(self, snapshot, slot_rope, readout_rope, record: bool):
        self.snapshot = snapshot  # layer index -> state dict (or None: empty)
        self.slot_rope = slot_rope  # (cos, sin) for positions -S..-1
        self.readout_rope = readout_rope  # (cos, sin) for the query positions minus the read-out distance
        self.record = record
        self.records: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


class MemoryLlamaAttention(LlamaAttention):
    """Llama attention (same weights and names) that also attends to its `LayerMemory` (see the module
    docstring)."""

    def __init__(self, config: MemoryLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.memory = LayerMemory(config, layer_idx)
        self._call: _CallContext | None = None

    def forward(
        self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs
    ):
        call = self._call
        state = None if call is None else call.snapshot.get(self.layer_idx)
        if call is None or (state is None and not call.record):
            return super().forward(
                hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs
            )

        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if call.record:
            call.records[self.layer_idx] = (key_states.detach(), value_states.detach())
        queries_plain = query_states
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        entries = []  # (keys (B, H, n, d), values, visibility (B|1, 1, T, n))
        if state is not None:
            slots = self.memory.slot_entries(state, *call.slot_rope, query_states.dtype)
            if slots is not None:
                B, T = query_states.shape[0], query_states.shape[2]
                k, v = (repeat_kv(t[None], self.num_key_value_groups).expand(B, -1, -1, -1) for t in slots)
                entries.append((k, v, torch.ones(1, 1, T, k.shape[2], dtype=torch.bool, device=k.device)))
            read = self.memory.readout(state, queries_plain, *call.readout_rope)
            if read is not None:
                T = query_states.shape[2]
                entries.append((*read, torch.eye(T, dtype=torch.bool, device=read[0].device)[None, None]))
        if not entries:  # recording only (empty memory): Llama's own attention on the same tensors
            return self._llama_attention(
                query_states, key_states, value_states, attention_mask, input_shape, **kwargs
            )

        B, T, Tk = query_states.shape[0], query_states.shape[2], key_states.shape[2]
        context_mask = _context_visibility(attention_mask, T, Tk, query_states.device)
        keys = torch.cat([e[0] for e in entries] + [repeat_kv(key_states, self.num_key_value_groups)], dim=2)
        values = torch.cat(
            [e[1] for e in entries] + [repeat_kv(value_states, self.num_key_value_groups)], dim=2
        )
        mask = torch.cat(
            [e[2].expand(B, 1, T, -1) for e in entries] + [context_mask.expand(B, 1, T, Tk)], dim=-1
        )
        out = F.scaled_dot_product_attention(
            query_states,
            keys,
            values,
            attn_mask=mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
            scale=self.scaling,
        )
        out = out.transpose(1, 2).reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), None

    def _llama_attention(self, query_states, key_states, value_states, attention_mask, input_shape, **kwargs):
        """The tail of `LlamaAttention.forward`, unchanged."""
        from transformers.models.llama.modeling_llama import ALL_ATTENTION_FUNCTIONS, eager_attention_forward

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


def _context_visibility(attention_mask, T: int, Tk: int, device) -> torch.Tensor:
    """Boolean (B|1, 1, T, Tk) visibility of the cached + new tokens from the mask Llama's model built."""
    if attention_mask is None:  # SDPA's causal shortcut: no padding
        return torch.ones(T, Tk, dtype=torch.bool, device=device).tril(diagonal=Tk - T)[None, None]
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        raise ValueError(
            "MemoryLlama reads its memory with a 4D attention mask (attn_implementation 'sdpa' or "
            f"'eager'); got {type(attention_mask).__name__}"
        )
    mask = attention_mask[..., -Tk:]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


# ----------------------------------------------------------------------------------------------- model


class MemoryLlamaModel(LlamaModel):
    """`LlamaModel` whose layers in `config.memory_layers` use `MemoryLlamaAttention`."""

    config_class = MemoryLlamaConfig

    def __init__(self, config: MemoryLlamaConfig):
        super().__init__(config)
        config.check_memory_settings()
        for i in config.memory_layers:
            self.layers[i].self_attn = MemoryLlamaAttention(config, i)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, NeuralMemory):
            # fixed values, not learned ones (its Linear children were just given generic values)
            set_fixed_neural_parameters(module)
            return
        if isinstance(module, LayerMemory):
            return
        super()._init_weights(module)


class MemoryLlamaForCausalLM(LlamaForCausalLM):
    """`LlamaForCausalLM` plus the inference memory (see the module docstring)."""

    config_class = MemoryLlamaConfig
    config: MemoryLlamaConfig
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_compile_fullgraph = False

    def __init__(self, config: MemoryLlamaConfig):
        LlamaPreTrainedModel.__init__(
            self, config
        )  # LlamaForCausalLM's own __init__ would build a plain LlamaModel
        self.model = MemoryLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._fingerprint: str | None = None
        self.post_init()

    # -- memory access

    def memory_modules(self) -> dict[int, LayerMemory]:
        return {i: self.model.layers[i].self_attn.memory for i in self.config.memory_layers}

    def reset_memory(self) -> None:
        """Forget everything (both stores of every memory layer)."""
        for memory in self.memory_modules().values():
            memory.state = None

    def memory_info(self) -> dict[str, int]:
        """Totals over memory layers: slots filled, tokens written by "ema" and by "surprise"."""
        info = {
            "memory_layers": len(self.config.memory_layers),
            "slots": self.config.memory_slots,
            "slots_filled": 0,
            "slot_tokens": 0,
            "surprise_tokens": 0,
        }
        for memory in self.memory_modules().values():
            if memory.state is not None:
                filled = int(memory.state["pool_filled"]) + int(memory.state["recent_filled"])
                info["slots_filled"] = max(info["slots_filled"], filled)
                info["slot_tokens"] = max(info["slot_tokens"], int(memory.state["slot_tokens"]))
                info["surprise_tokens"] = max(info["surprise_tokens"], int(memory.state["neural.position"]))
        return info

    def resolve_memory_args(self, use_memory, update_rule) -> tuple[bool, str]:
        use_memory = self.config.use_memory if use_memory is None else use_memory
        if not isinstance(use_memory, bool):
            raise ValueError(f"use_memory must be True or False, got {use_memory!r}")
        rule = self.config.update_rule if update_rule is None else update_rule
        if rule not in UPDATE_RULES:
            raise ValueError(
                f"update_rule must be one of {', '.join(repr(r) for r in UPDATE_RULES)}; got {rule!r}"
            )
        return use_memory, rule

    # -- fingerprint and files

    def memory_fingerprint(self) -> str:
        """`config.memory_fingerprint` if set (packaged models), else a hash of the weights (computed
        once)."""
        if self.config.memory_fingerprint:
            return self.config.memory_fingerprint
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self)
        return self._fingerprint

    def memory_state_dict(self) -> dict[str, torch.Tensor]:
        """The memory as flat CPU tensors `layers.<i>.<name>` (empty layers included)."""
        out = {}
        for i, memory in self.memory_modules().items():
            for name, tensor in memory.current_state().items():
                out[f"layers.{i}.{name}"] = tensor.detach().to("cpu").contiguous()
        return out

    def save_memory(self, path) -> None:
        """Write the memory to a safetensors file, atomically (with the model fingerprint; see `load_memory`).
        The neural memory's unfinished chunk is saved as it is (pending): the model's memory lives on and a
        loaded copy continues exactly where this one is."""
        metadata = {
            "format": MEMORY_FORMAT,
            "fingerprint": self.memory_fingerprint(),
            "memory_layers": json.dumps(list(self.config.memory_layers)),
        }
        write_memory_file(path, self.memory_state_dict(), metadata)

    def load_memory(self, path) -> None:
        """Replace the memory by a file written by `save_memory` of this model; refuses (ValueError) a missing
        or foreign file, another model's memory, and tensors of the wrong names, shapes or dtypes. Never
        unpickles."""
        tensors, metadata = read_memory_file(
            path,
            {MEMORY_FORMAT: self.memory_fingerprint},
            "load it into the model that wrote it, or call reset_memory() to start empty",
        )
        path = os.fspath(path)
        modules = self.memory_modules()
        layout, note = {}, ""
        for i, memory in modules.items():
            H, width, C = memory.num_kv_heads, 2 * memory.head_dim, memory.neural.chunk_size
            for name, (shape, dtype) in memory.expected_layout().items():  # shape None: the pending rows
                layout[f"layers.{i}.{name}"] = ((H, range(C), width) if shape is None else shape, dtype)
            note = f" (memory_slots={memory.num_slots}, key/value heads={H}, head_dim={memory.head_dim})"
        check_tensors(path, tensors, metadata, layout, self.config.memory_layers, note=note)
        states = {}
        for i, memory in modules.items():
            state = {
                name: tensors[f"layers.{i}.{name}"].to(memory.device()) for name in memory.expected_layout()
            }
            for name, limit in (("recent_filled", memory.num_recent), ("pool_filled", memory.num_pool)):
                if not 0 <= int(state[name]) <= limit:
                    raise ValueError(f"{path}: layers.{i}.{name} is {int(state[name])}, outside 0..{limit}")
            states[i] = state
        for i, memory in modules.items():
            memory.state = states[i]

    # -- forward and generate

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        use_memory: bool | None = None,
        update_rule: str | None = None,
        **kwargs,
    ):
        r"""
        use_memory (`bool`, *optional*): read and write the memory in this call (default `config.use_memory`).
        update_rule (`str`, *optional*): "ema", "surprise" or "none": how this call's tokens are written
        (default
            `config.update_rule`).
        """
        use_memory, rule = self.resolve_memory_args(use_memory, update_rule)
        memories = self.memory_modules()
        if not use_memory or not memories:
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )

        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        given = input_ids if input_ids is not None else inputs_embeds
        B, T, device = given.shape[0], given.shape[1], given.device
        if use_cache is None:
            use_cache = self.config.use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0

        # the read snapshot: the memory when this sequence started (kept on its cache)
        snapshot = getattr(past_key_values, "_memory_snapshot", None) if past else None
        if snapshot is None:
            snapshot = {
                i: (None if m.state is None or LayerMemory.is_empty(m.current_state()) else m.current_state())
                for i, m in memories.items()
            }
            if past_key_values is not None:
                past_key_values._memory_snapshot = snapshot
        if position_ids is None:
            position_ids = (torch.arange(T, device=device) + past).unsqueeze(0)
        rotary = self.model.rotary_emb
        dtype_ref = inputs_embeds if inputs_embeds is not None else self.model.embed_tokens.weight[:1]
        S = self.config.memory_slots
        slot_rope = rotary(dtype_ref, position_ids=torch.arange(-S, 0, device=device).unsqueeze(0))
        readout_rope = rotary(dtype_ref, position_ids=position_ids - self.config.memory_readout_distance)
        call = _CallContext(snapshot, slot_rope, readout_rope, record=rule != "none")
        for memory in memories.values():
            self.model.layers[memory.layer_idx].self_attn._call = call
        try:
            outputs = super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        finally:
            for memory in memories.values():
                self.model.layers[memory.layer_idx].self_attn._call = None
        if call.records:
            write = _write_mask(attention_mask, B, T, device)
            sinks = _first_tokens(attention_mask, B, T, past, device)[write]
            written = {}
            for i, (keys, values) in call.records.items():
                # (B, H, T, d) -> (N, H, d): the written tokens, row after row
                written[i] = (keys.transpose(1, 2)[write], values.transpose(1, 2)[write])
            states = {i: memories[i].current_state() for i in written}
            surprise = None
            if rule == "surprise" and int(write.sum()):
                surprise = _train_neural_memories(memories, states, written, device)
            leftovers = []
            for i, (keys, values) in written.items():
                if keys.shape[0] == 0:
                    continue
                state, left = memories[i].write_begin(states[i], keys, values, surprise, sinks)
                if left is None:
                    memories[i].state = state
                else:
                    leftovers.append((memories[i], state, left))
            if leftovers:
                merge_into_pools(leftovers, self.config.memory_ema_rate)
        return outputs

    def generate(self, *args, use_memory: bool | None = None, update_rule: str | None = None, **kwargs):
        """`GenerationMixin.generate` with `use_memory` / `update_rule` for the whole call (checked first)."""
        use_memory, rule = self.resolve_memory_args(use_memory, update_rule)
        return super().generate(*args, use_memory=use_memory, update_rule=rule, **kwargs)


def _write_mask(attention_mask, B: int, T: int, device) -> torch.Tensor:
    """(B, T) bool: which new tokens are written (all but padding)."""
    write = torch.ones(B, T, dtype=torch.bool, device=device)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        write &= attention_mask[:, -T:].to(device).bool()
    return write


@torch.no_grad()
def _train_neural_memories(memories, states, written, device) -> torch.Tensor:
    """Train every memory layer's neural memory on its written tokens (updating `states`); returns each
    token's surprise (N,): the mean over layers and heads of log ||M(phi(k)) - [k; v]|| (the error,
    proportional to the associative-loss gradient, at the weights the token's chunk starts from).

    The layers' neural memories have the same fixed parameters, so when they also sit on one device and have
    seen the same number of tokens, they are trained as one batch (layers x heads) by the first one: one loop
    over chunks instead of one per layer. Otherwise each layer runs its own loop."""
    inputs = {}
    for i, (keys, values) in written.items():
        inputs[i], states[i] = memories[i].neural_inputs(states[i], keys, values)
    groups = [list(written)]
    first = memories[groups[0][0]]
    reference = [p.detach() for p in first.neural.parameters()]
    same = all(
        inputs[i].device == inputs[groups[0][0]].device
        and int(states[i]["neural.position"]) == int(states[groups[0][0]]["neural.position"])
        and states[i]["neural.pending"].shape[1] == states[groups[0][0]]["neural.pending"].shape[1]
        and all(torch.equal(p.detach(), r) for p, r in zip(memories[i].neural.parameters(), reference))
        for i in written
    )
    if not same:
        groups = [[i] for i in written]
    logs = []
    for group in groups:
        module = memories[group[0]].neural
        sizes = [inputs[i].shape[0] for i in group]
        x = torch.cat([inputs[i] for i in group])  # (G, N, 2d)
        parts = [module.state_from_dict(states[i], prefix="neural.") for i in group]
        memory = MemoryState(
            tuple(torch.cat([p.weights[k] for p in parts]) for k in range(len(parts[0].weights))),
            tuple(torch.cat([p.momentum[k] for p in parts]) for k in range(len(parts[0].momentum))),
            torch.cat([p.pending for p in parts]),
            parts[0].position,
        )
        errors, start, N = [], 0, x.shape[1]
        while (
            start < N
        ):  # pieces aligned with the memory's chunks (so the split of a text into calls is irrelevant)
            end = min(N, start + module.chunk_size - memory.pending.shape[1])
            piece = x[:, start:end]
            errors.append((module.retrieve(memory, piece) - piece).norm(dim=-1))
            _, memory, _ = module(piece, memory, update_rule="surprise")
            start = end
        errors = torch.cat(errors, dim=1)  # (G, N)
        logs.append(errors.clamp_min(1e-12).log().to(device))
        offset = 0
        for i, size in zip(group, sizes):
            part = slice(offset, offset + size)
            piece_state = MemoryState(
                tuple(w[part] for w in memory.weights),
                tuple(m[part] for m in memory.momentum),
                memory.pending[part],
                memory.position,
            )
            # the layout keeps no phase / rule: fed chunk-aligned with "surprise" only, the phase is the
            # pending count
            flat = module.state_to_dict(piece_state, prefix="neural.")
            states[i].update({k: v for k, v in flat.items() if k in states[i]})
            offset += size
    return torch.cat(logs).mean(0)


def _first_tokens(attention_mask, B: int, T: int, past: int, device) -> torch.Tensor:
    """(B, T) bool: the first real token of each row if this call starts the sequence (an attention sink)."""
    first = torch.zeros(B, T, dtype=torch.bool, device=device)
    if past:
        return first
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        real = attention_mask[:, -T:].to(device).bool()
        return real & (real.long().cumsum(-1) == 1)
    first[:, 0] = True
    return first


def weights_fingerprint(model: nn.Module) -> str:
    """`memory_file.weights_fingerprint` without the memory's fixed parameters (names, shapes and a fixed
    sample of float32 values of every other weight)."""
    return memory_file_fingerprint(model, exclude=".memory.neural.")


__all__ = [
    "LayerMemory",
    "MemoryLlamaAttention",
    "MemoryLlamaForCausalLM",
    "MemoryLlamaModel",
    "weights_fingerprint",
]
