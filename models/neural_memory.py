"""Titans neural long-term memory (Behrouz, Zhong, Mirrokni, arXiv 2501.00663, §3), chunked and streaming.

This file travels inside exported checkpoints: it imports only torch and the standard library.

Equations (paper §3.1), per token t with input x_t of width D; memory width Dm (``memory_dim``)
------------------------------------------------------------------------------------------------
    k_t = l2norm(silu(W_K x_t)),  q_t = l2norm(silu(W_Q x_t)),  v_t = W_V x_t
    M(x) = W_L silu(... silu(W_1 x))        an MLP of ``depth`` L without biases, hidden width Dm*expansion
    loss  l(M; x_t) = ||M(k_t) - v_t||^2    (summed over features, paper eq. 12)
    theta_t = max_lr * sigmoid(w_theta.x_t + b_theta)    learning rate
    eta_t   = sigmoid(w_eta.x_t + b_eta)                  momentum
    alpha_t = sigmoid(w_alpha.x_t + b_alpha)              forgetting
    S_t = eta_t S_{t-1} - theta_t grad l(M_{t-1}; x_t)    surprise with momentum (eqs. 9-10)
    M_t = (1 - alpha_t) M_{t-1} + S_t                      forgetting (eq. 13)
    y_t = out_proj(M(q_t))                                 retrieval without update (eq. 15)

The weights of M are fast weights: one copy per batch element, initialised from learnable parameters
(``initial_weights``, the meta-learned initial memory). W_K, W_V, W_Q, the gates, ``out_proj`` and the initial
weights are ordinary parameters trained by autograd through the unrolled memory updates.

Chunked parallel form (paper §3.2)
----------------------------------
The stream is cut into chunks of C = ``chunk_size`` tokens, counted from the start of the stream (or the last
``flush``), whatever rule reads them. Inside a chunk,
every gradient u_j is taken at the chunk-start weights W_0; momentum and forgetting are still applied token by
token (with per-token gates) and carried across chunks. The recurrences are linear in u_j, so the chunk-end
state is closed form, with E_i = prod_{l<=i} eta_l, beta_i = prod_{l<=i} (1 - alpha_l), b_i = beta_C / beta_i:

    S_C = E_C S_0 - sum_j (E_C / E_j) theta_j u_j
    W_C = beta_C W_0 + (sum_i b_i E_i) S_0 - sum_j c_j u_j,     c_j = theta_j sum_{i>=j} b_i E_i / E_j

All ratios are computed in log space (cumulative sums of log-sigmoids, a masked C x C matrix of exponentiated
differences, every exponent <= 0), so tiny eta or 1 - alpha never divide by ~0. sum_j w_j u_j is the gradient
of the weighted loss sum_j w_j l_j at W_0: the MLP backward is written by hand with batched matmuls
(silu'(z) = sigmoid(z) (1 + z (1 - sigmoid(z)))), per-token gradients are never materialised, and the two
weighted sums (for S and for W) share one backward pass. Everything is built from differentiable torch ops,
so ordinary autograd trains the parameters through the unrolled updates. Chunks run sequentially.

Read-out: every token of chunk c is read with the weights at the START of chunk c. This keeps the module
causal; with C = 1 it is exactly y_t = M_{t-1}(q_t), then the update with token t (``tests/paper_memory.py``,
the test oracle).

Streaming: ``MemoryState`` holds the weights and momenta at the last chunk boundary, the written inputs of the
current chunk (``pending``), the tokens consumed (``position``) and how far the current chunk has got
(``phase``). ``forward`` prepends the pending rows, applies every chunk that ends inside the call and keeps
the remainder pending; pending tokens are read with the current (chunk-start) weights. Feeding a sequence at
once or in arbitrary pieces (e.g. token by token) gives the same outputs and state.

Update rules: "surprise" (above); "none" (frozen memory: read-outs only, nothing is written); "ema", a
gradient-free moving average that is NOT in the paper (below). Rules may change from call to call on one
stream. Tokens read under "none" are not written but they still count: ``position`` and ``phase`` advance, so
chunk boundaries stay at multiples of C counted from the stream start (a MAC host relies on segment starts
being chunk starts). A chunk is applied when it ends, with only its written rows (as one chunk of that many
rows, at its start weights; the "none" tokens take no part: no gradient, no momentum or forgetting step), and
every token of it, written or not, is read with its start weights. A chunk that ends during a "none" call is
applied there, with the rule its rows were written with (``pending_rule``); a call with the other writing rule
first applies the pending rows of the first as a short chunk (rows of unknown rule, ``pending_rule`` None,
from states saved before the rule was recorded, join the next writing call's chunk). ``flush`` closes the
current chunk early: its rows are applied now and the next token starts a new chunk (a session seeded from a
flushed state starts on a chunk boundary).

"ema": only the last MLP layer moves, toward the one-shot association of the token,
    W_L <- (1 - r_t) W_L + r_t v_t phi_t^T / (||phi_t||^2 + eps),   r_t = theta_t / max_lr in (0, 1),
with phi_t the input features of the last layer for k_t (at the chunk-start weights; phi_t = k_t for depth 1).
The closed form per chunk is the same log-space product as above; other layers and the momentum are untouched.

Deviations from the paper, and why
----------------------------------
- No 1-D depthwise-separable convolution after the q/k/v projections (paper §4.4): it would add a
  convolution cache to the streaming state; the host model can add one before this module if wanted.
- A single memory head (no multi-head split): the MAC host gives each layer its own memory.
- Gates are per token inside a chunk (the paper suggests chunk-constant gates for speed); the log-space closed
  form makes per-token gates as cheap, and with C = 1 the recurrence is exactly the paper's.
- Read-out uses the chunk-start weights (causality, see above), not weights updated inside the chunk.
- The memory MLP has no biases and no residual/LayerNorm wrapper (the paper's M is a plain MLP; the TTT-style
  residual of titans-pytorch is left out).
- The fast-weight state and the memory math run in float32 (float64 if the input is float64) whatever the
input
  dtype, and autocast is disabled inside; outputs are returned in the input dtype.
- The "ema" rule and the "none" rule are additions for ablations (see above).
- Optional per-token gradient clipping (``max_grad_norm``, off by default; the MAC host turns it on): each
  token's gradient is scaled, layer by layer, to norm <= max_grad_norm before it enters the surprise. Real
  hidden states share a dominant direction, so the C gradients of a chunk (all at W_0) add up coherently, and
  a model whose projections and gates are being trained drifts into rates where the unclipped recurrence
  explodes (seen: NaN after 7 distillation steps). Clipped tokens bound every chunk's update, so the fast
  weights can grow at most linearly over a sequence. Per-token norms are free here: ||u_j|| = ||delta_j||
  ||h_j||.

Default hyper-parameters (gate biases are logits of the initial gate values; gate weights start at zero, so
every token starts with the same gates and the data dependence is learned):
- ``init_lr = 0.01`` (theta_0; min(0.01, max_lr / 10) for another max_lr), ``max_lr = 0.1``: inside a chunk
  the C gradients taken at W_0 add up, and keys made by silu-then-l2norm share a large common direction, so
  the stable step shrinks with C. Measured with the defaults (depth 2, C = 64, inputs of unit RMS, D = 128,
  384, 576, random and repeated-pattern streams up to 16k tokens): theta_0 = 0.01 is stable and learns the
  repeated associations (loss / 3); 0.03 diverges. The ceiling max_lr = 0.1 leaves the learned gate 10x
  headroom (ample for small chunks: with C = 1 and unit keys a step moves M(k) by 2 theta (v - M(k))), and
  makes the "ema" rate r_0 = theta_0 / max_lr = 0.1.
- ``init_momentum = 0.9``: the usual heavy-ball value (eta close to 1 keeps past surprise).
- ``init_decay = 0.001``: weak forgetting, half-life ~700 tokens: the memory outlives a sliding attention
  window yet cannot grow without bound.
- ``initial_weights``: normal with std 1/sqrt(fan_in) (with unit-norm keys the memory starts near its linear
  regime with O(1) outputs). ``to_values``: normal with std 1/sqrt(dim * memory_dim), so ||v|| ~ RMS(x) ~ 1
  like the unit keys; with the default nn.Linear init ||v|| grows like sqrt(D) and the memory's fit to v
  diverged at D = 576 even with theta_0 = 0.003. The host should feed RMS-normalised hidden states (raw
  residual streams with outlier tokens make v, hence the surprise, huge).
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MemoryState", "NeuralMemory", "UPDATE_RULES", "unit_rms"]

# The memory update rules, the project's one list of them (the configs, models and command lines take it from
# here). The order is part of the memory file format: `state_to_dict` stores a pending rule as its index here.
UPDATE_RULES = ("surprise", "none", "ema")


def unit_rms(x: Tensor) -> Tensor:
    """Parameter-free RMS normalisation (eps 1e-6) of what a model hands its memory: keys, values and queries
    get unit scale whatever the scale of the layer's hidden states (used by the MAC and the wrapper
    models)."""
    return F.rms_norm(x, (x.shape[-1],), eps=1e-6)


class MemoryState(NamedTuple):
    """Per-batch-element memory state. Tensors are float32 (float64 for float64 inputs)."""

    weights: tuple[Tensor, ...]  # fast weights at the last chunk boundary, one (B, out, in) per MLP layer
    momentum: tuple[Tensor, ...]  # the surprise S, same shapes
    pending: Tensor  # (B, n_pending, D) written inputs of the current (unfinished) chunk, n_pending <= phase
    position: int = 0  # tokens consumed since init_state (written, pending or read under "none")
    phase: int | None = None  # tokens of the current chunk consumed so far (< chunk_size); None: n_pending
    pending_rule: str | None = (
        "surprise"  # the rule of the pending rows (None: unknown, the next writing call's)
    )

    def chunk_phase(self) -> int:
        """Tokens of the current chunk consumed so far, whatever rule read them."""
        return self.pending.shape[1] if self.phase is None else self.phase

    def detach(self) -> MemoryState:
        """Cut the autograd graph (truncated back-propagation through time)."""
        return self._replace(
            weights=tuple(w.detach() for w in self.weights),
            momentum=tuple(s.detach() for s in self.momentum),
            pending=self.pending.detach(),
        )

    def to(self, *args, **kwargs) -> MemoryState:
        """``Tensor.to`` on every tensor (device moves; keep the dtype float32)."""
        return self._replace(
            weights=tuple(w.to(*args, **kwargs) for w in self.weights),
            momentum=tuple(s.to(*args, **kwargs) for s in self.momentum),
            pending=self.pending.to(*args, **kwargs),
        )


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def _silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _no_autocast(device: torch.device):
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # a device type without autocast support
        return contextlib.nullcontext()


class NeuralMemory(nn.Module):
    """Titans neural long-term memory, chunked training form with streaming state (see the module docstring).

    Args:
        dim: input/output width D.
        memory_dim: width Dm of keys, values, queries and of the memory MLP's input/output (default D).
        depth: number of linear layers L of the memory MLP (>= 1).
        expansion: hidden width of the memory MLP is round(memory_dim * expansion) (used when depth >= 2).
        chunk_size: tokens per chunk C (gradients inside a chunk are taken at the chunk-start weights).
        max_lr: upper bound of the learning-rate gate theta_t.
        init_lr: initial theta (gate bias = logit(init_lr / max_lr)), in (0, max_lr); default
            min(0.01, max_lr / 10).
        init_momentum: initial eta, in (0, 1).
        init_decay: initial alpha, in (0, 1).
        ema_eps: epsilon of the "ema" rule's normalisation.
        max_grad_norm: if set, each token's gradient u_j is clipped per memory layer to this norm before it
        enters
            the surprise (None: the paper's unclipped update).
    """

    def __init__(
        self,
        dim: int,
        memory_dim: int | None = None,
        depth: int = 2,
        expansion: float = 2,
        chunk_size: int = 64,
        max_lr: float = 0.1,
        init_lr: float | None = None,
        init_momentum: float = 0.9,
        init_decay: float = 0.001,
        ema_eps: float = 1e-6,
        max_grad_norm: float | None = None,
        heads: int = 1,
        update_bound: float | None = None,
        forget_toward_init: bool = False,
        value_activation: bool = False,
        centre_inputs: bool = False,
    ):
        super().__init__()
        memory_dim = dim if memory_dim is None else memory_dim

        def _check(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"NeuralMemory: {msg}")

        def _is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        _check(_is_int(dim) and dim >= 1, f"dim must be an integer >= 1, got {dim!r}")
        _check(
            _is_int(memory_dim) and memory_dim >= 1, f"memory_dim must be an integer >= 1, got {memory_dim!r}"
        )
        _check(_is_int(depth) and depth >= 1, f"depth must be an integer >= 1, got {depth!r}")
        _check(
            _is_int(chunk_size) and chunk_size >= 1, f"chunk_size must be an integer >= 1, got {chunk_size!r}"
        )
        _check(
            isinstance(expansion, (int, float)) and expansion > 0, f"expansion must be > 0, got {expansion!r}"
        )
        _check(isinstance(max_lr, (int, float)) and max_lr > 0, f"max_lr must be > 0, got {max_lr!r}")
        init_lr = min(0.01, max_lr / 10) if init_lr is None else init_lr
        _check(0 < init_lr < max_lr, f"init_lr must be in (0, max_lr={max_lr}), got {init_lr!r}")
        _check(0 < init_momentum < 1, f"init_momentum must be in (0, 1), got {init_momentum!r}")
        _check(0 < init_decay < 1, f"init_decay must be in (0, 1), got {init_decay!r}")
        _check(ema_eps > 0, f"ema_eps must be > 0, got {ema_eps!r}")
        _check(
            max_grad_norm is None or max_grad_norm > 0,
            f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}",
        )
        _check(
            update_bound is None or update_bound > 0,
            f"update_bound must be > 0 or None, got {update_bound!r}",
        )
        _check(
            _is_int(heads) and heads >= 1 and memory_dim % heads == 0,
            f"heads must be an integer >= 1 dividing memory_dim={memory_dim}, got {heads!r}",
        )
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.update_bound = None if update_bound is None else float(update_bound)
        self.heads, self.head_dim = heads, memory_dim // heads
        self.forget_toward_init, self.value_activation = bool(forget_toward_init), bool(value_activation)
        hidden = max(1, int(round(self.head_dim * expansion)))

        self.dim, self.memory_dim, self.depth, self.hidden_dim = dim, memory_dim, depth, hidden
        self.chunk_size, self.max_lr, self.ema_eps = chunk_size, float(max_lr), float(ema_eps)
        self.init_lr, self.init_momentum, self.init_decay = (
            float(init_lr),
            float(init_momentum),
            float(init_decay),
        )

        self.to_keys = nn.Linear(dim, memory_dim, bias=False)
        self.to_values = nn.Linear(dim, memory_dim, bias=False)
        self.to_queries = nn.Linear(dim, memory_dim, bias=False)
        # rows: learning rate theta, momentum eta, forgetting alpha (raw nn.Parameters, so a host model's
        # generic nn.Linear re-initialisation does not wipe the bias init; call reset_parameters() to restore
        # it)
        self.gate_weight = nn.Parameter(torch.empty(3, dim))
        self.gate_bias = nn.Parameter(torch.empty(3))
        # one MLP per head, stored stacked: layer i is (heads * out_i, in_i), head h owns rows
        # h*out_i:(h+1)*out_i
        dims = [self.head_dim] + [hidden] * (depth - 1) + [self.head_dim]
        self.initial_weights = nn.ParameterList(
            [nn.Parameter(torch.empty(heads * d_out, d_in)) for d_in, d_out in zip(dims[:-1], dims[1:])]
        )
        self.out_proj = nn.Linear(memory_dim, dim, bias=False)
        # subtracted from the written rows before the key/value projections, and from the read-out queries
        # before the query projection (a host may read with other inputs than it writes); see calibrate_centre
        self.input_centre = nn.Parameter(torch.zeros(dim)) if centre_inputs else None
        self.query_centre = nn.Parameter(torch.zeros(dim)) if centre_inputs else None
        self.reset_parameters()

    # ------------------------------------------------------------------ parameters and state

    def reset_parameters(self) -> None:
        """(Re)initialise every parameter; host models should call this from their ``_init_weights``."""
        for lin in (self.to_keys, self.to_queries, self.out_proj):
            lin.reset_parameters()
        with torch.no_grad():
            self.to_values.weight.normal_(0.0, (self.dim * self.head_dim) ** -0.5)
            self.gate_weight.zero_()
            self.gate_bias.copy_(
                torch.tensor(
                    [_logit(self.init_lr / self.max_lr), _logit(self.init_momentum), _logit(self.init_decay)]
                )
            )
            for w in self.initial_weights:
                w.normal_(0.0, w.shape[1] ** -0.5)
            if self.input_centre is not None:
                self.input_centre.zero_()
                self.query_centre.zero_()

    @torch.no_grad()
    def calibrate_centre(self, x: Tensor, queries: Tensor | None = None) -> None:
        """Set ``input_centre`` to the mean of the rows of x (..., D) and ``query_centre`` to that of queries
        (default: x): a data-dependent init.

        Hidden states share a dominant direction (mean pairwise cosine 0.56 on the teacher's code states), so
        their keys overlap and every write lands on the same few directions; centred, the cosine is ~0."""
        if self.input_centre is None:
            raise ValueError("NeuralMemory.calibrate_centre: this memory was built with centre_inputs=False")
        queries = x if queries is None else queries
        self.input_centre.copy_(x.reshape(-1, self.dim).to(self.input_centre).mean(0))
        self.query_centre.copy_(queries.reshape(-1, self.dim).to(self.query_centre).mean(0))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, memory_dim={self.memory_dim}, depth={self.depth}, "
            f"hidden_dim={self.hidden_dim}, chunk_size={self.chunk_size}, max_lr={self.max_lr}, "
            f"heads={self.heads}"
        )

    def init_state(self, batch_size: int, device=None, dtype: torch.dtype = torch.float32) -> MemoryState:
        """Initial state: the learnable initial weights expanded over the batch (still differentiable), zero
        momentum, nothing pending."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                f"NeuralMemory.init_state: batch_size must be an integer >= 1, got {batch_size!r}"
            )
        device = self.initial_weights[0].device if device is None else torch.device(device)
        weights = tuple(
            w.to(device=device, dtype=dtype).unsqueeze(0).expand(batch_size, -1, -1)
            for w in self.initial_weights
        )
        momentum = tuple(
            torch.zeros(batch_size, *w.shape, device=device, dtype=dtype) for w in self.initial_weights
        )
        pending = torch.zeros(batch_size, 0, self.dim, device=device, dtype=dtype)
        return MemoryState(weights, momentum, pending, 0, 0, "surprise")

    def state_to_dict(self, state: MemoryState, prefix: str = "") -> dict[str, Tensor]:
        """Flat, detached, contiguous tensors (safetensors-ready): ``{prefix}weights.{i}``,
        ``{prefix}momentum.{i}``, ``{prefix}pending``, and int64 scalars ``{prefix}position``,
        ``{prefix}phase`` and ``{prefix}pending_rule`` (the index of the rule in ``UPDATE_RULES``)."""
        out = {}
        for i, (w, s) in enumerate(zip(state.weights, state.momentum)):
            out[f"{prefix}weights.{i}"] = w.detach().contiguous()
            out[f"{prefix}momentum.{i}"] = s.detach().contiguous()
        out[f"{prefix}pending"] = state.pending.detach().contiguous()
        out[f"{prefix}position"] = torch.tensor(int(state.position), dtype=torch.int64)
        out[f"{prefix}phase"] = torch.tensor(state.chunk_phase(), dtype=torch.int64)
        if state.pending_rule is not None:  # None (unknown) is saved as no tensor
            out[f"{prefix}pending_rule"] = torch.tensor(
                UPDATE_RULES.index(state.pending_rule), dtype=torch.int64
            )
        return out

    def state_from_dict(self, tensors: dict[str, Tensor], prefix: str = "") -> MemoryState:
        """Inverse of :meth:`state_to_dict`; checks the keys and shapes against this module's configuration.

        ``phase`` and ``pending_rule`` may be missing (dicts written before they existed): the phase is then
        the number of pending rows and the rule unknown (None: the pending rows are written with the rule of
        the next writing call, as before; "surprise" if a "none" call or ``flush`` applies them)."""
        names = [f"{prefix}{kind}.{i}" for kind in ("weights", "momentum") for i in range(self.depth)]
        names += [f"{prefix}pending", f"{prefix}position"]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"NeuralMemory.state_from_dict: missing keys {missing}")
        weights = tuple(tensors[f"{prefix}weights.{i}"] for i in range(self.depth))
        momentum = tuple(tensors[f"{prefix}momentum.{i}"] for i in range(self.depth))
        pending = tensors[f"{prefix}pending"]
        batch = pending.shape[0]
        for i, p in enumerate(self.initial_weights):
            for kind, t in (("weights", weights[i]), ("momentum", momentum[i])):
                if tuple(t.shape) != (batch, *p.shape):
                    raise ValueError(
                        f"NeuralMemory.state_from_dict: {prefix}{kind}.{i} has shape {tuple(t.shape)}, "
                        f"expected {(batch, *p.shape)}"
                    )
        if pending.ndim != 3 or pending.shape[2] != self.dim or pending.shape[1] >= self.chunk_size:
            raise ValueError(
                f"NeuralMemory.state_from_dict: {prefix}pending has shape {tuple(pending.shape)}, expected "
                f"(B, n < {self.chunk_size}, {self.dim})"
            )
        scalars = {}
        for name in ("position", "phase", "pending_rule"):
            t = tensors.get(f"{prefix}{name}")
            if t is not None and (t.ndim != 0 or t.dtype != torch.int64):
                raise ValueError(
                    f"NeuralMemory.state_from_dict: {prefix}{name} must be an int64 scalar, got {t.dtype} "
                    f"of shape {tuple(t.shape)}"
                )
            scalars[name] = None if t is None else int(t.item())
        P, position = pending.shape[1], scalars["position"]
        phase = P if scalars["phase"] is None else scalars["phase"]
        rule = scalars["pending_rule"]
        if not (P <= phase < self.chunk_size and P <= position):
            raise ValueError(
                f"NeuralMemory.state_from_dict: {prefix}position {position} and {prefix}phase {phase} do "
                f"not fit the {P} pending rows (expected pending <= phase < {self.chunk_size} and pending "
                "<= position)"
            )
        if rule is not None and (not 0 <= rule < len(UPDATE_RULES) or UPDATE_RULES[rule] == "none"):
            raise ValueError(
                f"NeuralMemory.state_from_dict: {prefix}pending_rule {rule} names no writing rule of "
                f"{UPDATE_RULES}"
            )
        return MemoryState(
            weights, momentum, pending, position, phase, None if rule is None else UPDATE_RULES[rule]
        )

    # ------------------------------------------------------------------ building blocks

    def _linear(self, x: Tensor, layer: nn.Linear) -> Tensor:
        return F.linear(x, layer.weight.to(x.dtype))

    def _split_heads(self, t: Tensor) -> Tensor:
        """(B, T, heads * d) -> (B * heads, T, d): each head is an independent memory."""
        B, T, width = t.shape
        d = width // self.heads
        return t.view(B, T, self.heads, d).transpose(1, 2).reshape(B * self.heads, T, d)

    def _merge_heads(self, t: Tensor) -> Tensor:
        """(B * heads, T, d) -> (B, T, heads * d)."""
        BH, T, d = t.shape
        B = BH // self.heads
        return t.view(B, self.heads, T, d).transpose(1, 2).reshape(B, T, self.heads * d)

    def _fold(self, w: Tensor) -> Tensor:
        """Fast weights (B, heads * out, in) -> (B * heads, out, in)."""
        return w.reshape(w.shape[0] * self.heads, w.shape[1] // self.heads, w.shape[2])

    def _unfold(self, w: Tensor) -> Tensor:
        return w.reshape(w.shape[0] // self.heads, w.shape[1] * self.heads, w.shape[2])

    @staticmethod
    def _centred(x: Tensor, centre: Tensor | None) -> Tensor:
        return x if centre is None else x - centre.to(x.dtype)

    def _queries(self, x: Tensor) -> Tensor:
        q = self._linear(self._centred(x, self.query_centre), self.to_queries)
        return F.normalize(self._split_heads(F.silu(q)), dim=-1, eps=1e-12)

    def _keys(self, x: Tensor) -> Tensor:
        k = self._linear(self._centred(x, self.input_centre), self.to_keys)
        return F.normalize(self._split_heads(F.silu(k)), dim=-1, eps=1e-12)

    def _values(self, x: Tensor) -> Tensor:
        v = self._linear(self._centred(x, self.input_centre), self.to_values)
        return self._split_heads(F.silu(v) if self.value_activation else v)

    def _gate_logits(self, x: Tensor) -> Tensor:
        """(B, T, 3) logits of theta, eta, alpha, shared by the heads, repeated to (B * heads, T, 3)."""
        a = F.linear(x, self.gate_weight.to(x.dtype), self.gate_bias.to(x.dtype))
        return a.repeat_interleave(self.heads, dim=0)

    def _read(self, weights, q: Tensor) -> Tensor:
        """out_proj(M(q)) for folded queries q (B * heads, T, d) and folded weights."""
        y, _, _ = self._mlp(weights, q)
        return self._linear(self._merge_heads(y), self.out_proj)

    @staticmethod
    def _mlp(weights, h: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Memory MLP on rows h (B, n, in); returns output, layer inputs [h_0..h_{L-1}] and
        pre-activations."""
        inputs, pre = [], []
        for i, w in enumerate(weights):
            if i:
                h = F.silu(pre[-1])
            inputs.append(h)
            pre.append(torch.matmul(h, w.transpose(-1, -2)))
        return pre[-1], inputs, pre

    def _check_input(self, x: Tensor, state: MemoryState | None, what: str) -> None:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"NeuralMemory.{what}: expected input of shape (B, T, {self.dim}), got {tuple(x.shape)}"
            )
        if state is not None:
            if len(state.weights) != self.depth or len(state.momentum) != self.depth:
                raise ValueError(
                    f"NeuralMemory.{what}: state has {len(state.weights)} weight tensors, expected depth "
                    f"{self.depth}"
                )
            if state.weights[0].shape[0] != x.shape[0]:
                raise ValueError(
                    f"NeuralMemory.{what}: state batch size {state.weights[0].shape[0]} != input batch size "
                    f"{x.shape[0]}"
                )

    @staticmethod
    def _compute_dtype(x: Tensor) -> torch.dtype:
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    # ------------------------------------------------------------------ public API

    def retrieve(self, state: MemoryState, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D): out_proj(M(q(x))) with ``state.weights``; no update, pending rows
        ignored."""
        self._check_input(x, state, "retrieve")
        dt = self._compute_dtype(x)
        with _no_autocast(x.device):
            return self._read([self._fold(w.to(dt)) for w in state.weights], self._queries(x.to(dt))).to(
                x.dtype
            )

    @torch.no_grad()
    def recall_error(self, state: MemoryState, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T): the associative loss ||M(k(x)) - v(x)||^2 (summed over heads) with
        ``state.weights``: how well the memory stores the pairs of ``x`` (storage benchmarks and tests)."""
        self._check_input(x, state, "recall_error")
        dt = self._compute_dtype(x)
        with _no_autocast(x.device):
            x = x.to(dt)
            out, _, _ = self._mlp([self._fold(w.to(dt)) for w in state.weights], self._keys(x))
            err = (out - self._values(x)).square().sum(-1)
            return err.view(x.shape[0], self.heads, -1).sum(1)

    def forward(
        self,
        x: Tensor,
        state: MemoryState | None = None,
        update_rule: str = "surprise",
        queries: Tensor | None = None,
    ) -> tuple[Tensor, MemoryState, dict[str, Tensor]]:
        """Read out, then write x into the memory.

        Keys, values and gates come from ``x``; read-out queries from ``queries`` if given, else from ``x``.
        ``update_rule``: "surprise" (Titans), "ema" (gradient-free, last layer only) or "none" (frozen:
        nothing is written, but the tokens advance ``position`` and the chunk phase; see the module
        docstring).

        Returns the read-outs (B, T, D) in x's dtype (each token read with its chunk-start weights), the new
        state and detached scalar stats over the tokens whose update was applied in this call (the complete
        chunks): "surprise_norm" (mean Frobenius norm of the per-token associative-loss gradient at the
        chunk-start weights, exact, never materialised), "lr_mean", "momentum_mean", "decay_mean" (means of
        the theta, eta, alpha gates; "ema" uses only theta) and "updated_tokens" (per sequence). All are 0
        when no token was applied (only pending tokens, or rule "none" unless it ends a chunk holding written
        rows).
        """
        self._check_rule(update_rule, "forward")
        self._check_input(x, state, "forward")
        if queries is not None and tuple(queries.shape) != tuple(x.shape):
            raise ValueError(
                f"NeuralMemory.forward: queries must have the shape of x {tuple(x.shape)}, got "
                f"{tuple(queries.shape)}"
            )
        B, T, _ = x.shape
        dt = self._compute_dtype(x)
        if state is None:
            state = self.init_state(B, device=x.device, dtype=dt)
        with _no_autocast(x.device):
            y, new_state, stats = self._forward(
                x.to(dt), state, update_rule, None if queries is None else queries.to(dt)
            )
        return y.to(x.dtype), new_state, stats

    def flush(self, state: MemoryState, update_rule: str | None = None) -> MemoryState:
        """Close the current chunk now: write its pending rows (the unfinished chunk) into the weights as one
        short chunk, and start a new chunk with the next token (phase 0; ``position`` is unchanged).

        Call it when a session ends or is saved: otherwise up to chunk_size - 1 written tokens never reach the
        fast weights. The rows are written with the rule they were written with (``state.pending_rule``)
        unless ``update_rule`` names another; "none" returns the state unchanged."""
        rule = (state.pending_rule or "surprise") if update_rule is None else update_rule
        self._check_rule(rule, "flush")
        P = state.pending.shape[1]
        if rule == "none" or (P == 0 and state.chunk_phase() == 0):
            return state
        W, S = state.weights, state.momentum
        if P:
            dt = state.pending.dtype
            with _no_autocast(state.pending.device):
                W = [self._fold(w.to(dt)) for w in state.weights]
                S = [self._fold(s.to(dt)) for s in state.momentum]
                W, S, _, _ = self._update(W, S, state.pending, rule, P)
            W, S = tuple(self._unfold(w) for w in W), tuple(self._unfold(s) for s in S)
        return state._replace(
            weights=W, momentum=S, pending=state.pending[:, :0].clone(), phase=0, pending_rule="surprise"
        )

    # ------------------------------------------------------------------ the update

    def _check_rule(self, rule: str, what: str) -> None:
        if rule not in UPDATE_RULES:
            raise ValueError(
                f"NeuralMemory.{what}: unknown update_rule {rule!r}; expected one of {UPDATE_RULES}"
            )

    def _zero_stats(self, device) -> dict[str, Tensor]:
        z = torch.zeros((), device=device)
        return {k: z for k in ("surprise_norm", "lr_mean", "momentum_mean", "decay_mean", "updated_tokens")}

    @staticmethod
    def _merge_stats(parts: list[dict[str, Tensor]], device) -> dict[str, Tensor] | None:
        """Stats of several updates, averaged with the number of tokens each one applied."""
        if len(parts) <= 1:
            return parts[0] if parts else None
        n = torch.stack([p["updated_tokens"] for p in parts])
        total = n.sum()
        out = {
            k: (torch.stack([p[k] for p in parts]) * n).sum() / total
            for k in parts[0]
            if k != "updated_tokens"
        }
        out["updated_tokens"] = total
        return out

    def _forward(self, x: Tensor, state: MemoryState, rule: str, queries: Tensor | None):
        B, T, _ = x.shape
        C = self.chunk_size
        W = [self._fold(w.to(x.dtype)) for w in state.weights]
        q = self._queries(x if queries is None else queries)  # (B * heads, T, d)
        if T == 0:
            return self._read(W, q), state, self._zero_stats(x.device)

        S = [self._fold(s.to(x.dtype)) for s in state.momentum]
        pending, pending_rule, phase = state.pending.to(x.dtype), state.pending_rule, state.chunk_phase()
        parts, reads, t = [], [], 0
        if (
            rule != "none" and pending.shape[1] and pending_rule not in (None, rule)
        ):  # rows of the other writing rule
            W, S, _, stats = self._update(W, S, pending, pending_rule, pending.shape[1])
            parts.append(stats)
            pending = pending[:, :0]
        P = pending.shape[1]
        if phase and (rule == "none" or P < phase):
            # the current chunk began before this call and holds fewer written rows than tokens (some were
            # read under "none", or a rule switch applied them): finish it up to its boundary by hand
            n = min(T, C - phase)
            closes = phase + n == C
            if rule == "none":
                reads.append(self._read(W, q[:, :n]))
                if closes and P:  # the chunk ends: its written rows are applied now, with their own rule
                    W, S, _, stats = self._update(W, S, pending, pending_rule or "surprise", P)
                    parts.append(stats)
                    pending = pending[:, :0]
            else:
                rows = torch.cat([pending, x[:, :n]], dim=1)
                if closes:
                    qc = torch.cat([q.new_zeros(q.shape[0], P, q.shape[-1]), q[:, :n]], dim=1)
                    W, S, chunk_reads, stats = self._update(W, S, rows, rule, P + n, qc)
                    parts.append(stats)
                    reads.append(chunk_reads[0][:, P:])
                    pending = rows[:, :0]
                else:
                    reads.append(self._read(W, q[:, :n]))
                    pending, pending_rule = rows, rule
            t = n
        if t < T:
            if rule == "none":  # nothing is pending here (phase 0, or the chunk was closed above)
                reads.append(self._read(W, q[:, t:]))
            else:  # the pending rows fill the current chunk up to here (P == phase): chunks of C from them
                P = pending.shape[1]
                full = torch.cat([pending, x[:, t:]], dim=1) if P else x[:, t:]
                qf = torch.cat([q.new_zeros(q.shape[0], P, q.shape[-1]), q[:, t:]], dim=1) if P else q[:, t:]
                n_applied = full.shape[1] // C * C
                body = []
                if n_applied:
                    W, S, body, stats = self._update(W, S, full[:, :n_applied], rule, C, qf[:, :n_applied])
                    parts.append(stats)
                if n_applied < full.shape[1]:
                    body.append(self._read(W, qf[:, n_applied:]))
                reads.append(torch.cat(body, dim=1)[:, P:] if len(body) > 1 or P else body[0])
                pending, pending_rule = full[:, n_applied:], rule
        y = reads[0] if len(reads) == 1 else torch.cat(reads, dim=1)
        # clone: a view would pin the whole input's storage (and alias the caller's tensor)
        new_state = MemoryState(
            tuple(self._unfold(w) for w in W),
            tuple(self._unfold(s) for s in S),
            pending.clone(),
            state.position + T,
            (phase + T) % C,
            pending_rule if pending.shape[1] else "surprise",
        )
        return y, new_state, self._merge_stats(parts, x.device) or self._zero_stats(x.device)

    def _update(self, W, S, xa: Tensor, rule: str, C: int, q: Tensor | None = None):
        """Apply the rows xa (B, N * C, D) as N chunks of C tokens to folded weights W and momenta S.

        Returns the new W, S, the read-outs of the folded queries q (one (B, C, D) per chunk; none if q is
        None) and the stats."""
        BH, H = W[0].shape[0], self.heads
        N = xa.shape[1] // C
        k = self._keys(xa).view(BH, N, C, -1)
        v = self._values(xa).view(BH, N, C, -1)
        a = self._gate_logits(xa).view(BH, N, C, 3)
        theta = self.max_lr * torch.sigmoid(a[..., 0])
        if rule == "surprise":
            log_eta = F.logsigmoid(a[..., 1])  # log eta
            log_keep = F.logsigmoid(-a[..., 2])  # log(1 - alpha)
            cE = torch.cumsum(log_eta, -1)  # log E_i
            cB = torch.cumsum(log_keep, -1)  # log beta_i
            cE_C, cB_C = cE[..., -1:], cB[..., -1:]
            mom_coef = theta * torch.exp(cE_C - cE)  # theta_j E_C / E_j
            row = cB_C - cB + cE  # log(b_i E_i)
            diff = row.unsqueeze(-1) - cE.unsqueeze(-2)  # [i, j] = log(b_i E_i / E_j)
            causal = torch.ones(C, C, dtype=torch.bool, device=xa.device).tril()
            w_coef = theta * torch.exp(diff.masked_fill(~causal, float("-inf"))).sum(-2)  # c_j
            s0_coef = torch.exp(row).sum(-1)  # sum_i b_i E_i
            E_C, beta_C = torch.exp(cE_C[..., 0]), torch.exp(cB_C[..., 0])
            if self.forget_toward_init:
                W_init = [
                    self._fold(w.to(xa.dtype).unsqueeze(0).expand(BH // H, -1, -1))
                    for w in self.initial_weights
                ]
        else:  # ema: r_t = theta_t / max_lr
            cR = torch.cumsum(F.logsigmoid(-a[..., 0]), -1)
            ema_coef = torch.sigmoid(a[..., 0]) * torch.exp(cR[..., -1:] - cR)  # r_j prod_{i>j} (1 - r_i)
            keep_C = torch.exp(cR[..., -1])

        reads, gnorm = [], []
        for c in range(N):
            kc, vc = k[:, c], v[:, c]
            rows = kc if q is None else torch.cat([kc, q[:, c * C : (c + 1) * C]], dim=1)
            out, inputs, pre = self._mlp(W, rows)
            if q is not None:
                reads.append(self._linear(self._merge_heads(out[:, C:]), self.out_proj))
            delta = 2 * (out[:, :C] - vc)  # d l_j / d M(k_j), unweighted
            sq = 0
            if rule == "surprise":
                wc, sc = w_coef[:, c, :, None], mom_coef[:, c, :, None]
                e, b, s0 = E_C[:, c, None, None], beta_C[:, c, None, None], s0_coef[:, c, None, None]
                new_W, new_S = [None] * self.depth, [None] * self.depth
                for i in reversed(range(self.depth)):
                    h, dT = inputs[i][:, :C], delta.transpose(1, 2)
                    token_sq = delta.square().sum(-1) * h.square().sum(
                        -1
                    )  # ||u_j||^2 = ||delta_j||^2 ||h_j||^2
                    sq = sq + token_sq.detach()
                    layer_wc, layer_sc = wc, sc
                    if self.max_grad_norm is not None:  # clip each token's gradient for this layer
                        clip = (self.max_grad_norm / token_sq.clamp_min(1e-24).sqrt()).clamp(max=1.0)[
                            ..., None
                        ]
                        layer_wc, layer_sc = wc * clip, sc * clip
                    # sum_j c_j u_j = delta^T diag(c) h: the chunk's gradient step on the weights (and
                    # momentum)
                    step_W, step_S = torch.bmm(dT, h * layer_wc), torch.bmm(dT, h * layer_sc)
                    if self.update_bound is not None:  # bound the chunk's summed step, keep its direction
                        norm = step_W.flatten(1).norm(dim=1).clamp_min(1e-24)
                        scale = (self.update_bound / norm).clamp(max=1.0)[:, None, None]
                        step_W, step_S = step_W * scale, step_S * scale
                    new_S[i] = S[i] * e - step_S
                    kept = (W[i] - W_init[i]) * b + W_init[i] if self.forget_toward_init else W[i] * b
                    new_W[i] = kept + S[i] * s0 - step_W
                    if i:
                        delta = torch.matmul(delta, W[i]) * _silu_grad(pre[i - 1][:, :C])
                W, S = new_W, new_S
            else:
                phi = inputs[-1][:, :C]
                phi_n = phi / (phi.square().sum(-1, keepdim=True) + self.ema_eps)
                with torch.no_grad():
                    d = delta
                    for i in reversed(range(self.depth)):
                        sq = sq + d.square().sum(-1) * inputs[i][:, :C].square().sum(-1)
                        if i:
                            d = torch.matmul(d, W[i]) * _silu_grad(pre[i - 1][:, :C])
                assoc = torch.matmul(vc.transpose(1, 2), ema_coef[:, c].unsqueeze(-1) * phi_n)
                W = W[:-1] + [keep_C[:, c, None, None] * W[-1] + assoc]
            gnorm.append(sq.view(BH // H, H, C).sum(1).sqrt())

        with torch.no_grad():
            stats = {
                "surprise_norm": torch.cat(gnorm, dim=1).mean().float(),
                "lr_mean": theta.mean().float(),
                "momentum_mean": torch.sigmoid(a[..., 1]).mean().float(),
                "decay_mean": torch.sigmoid(a[..., 2]).mean().float(),
                "updated_tokens": torch.tensor(float(N * C), device=xa.device),
            }
        return W, S, reads, stats
